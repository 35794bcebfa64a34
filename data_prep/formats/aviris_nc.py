"""AVIRIS-3 and AVIRIS-NG facility products as the ORNL DAAC distributes them: NetCDF-4, via h5netcdf.

``AV320250111t195928_000_L2A_OE_f576f24d_RFL_ORT.nc`` / ``ang..._L2A_OE_..._RFL_ORT.nc`` (and ``_L1B_RDN_..._RDN_ORT``):
the cube is the variable ``reflectance`` (``radiance``) of the group of that name (or of the root), with a
``wavelength`` (or ``bands``) dimension and two spatial dimensions (``northing``/``easting`` or ``y``/``x``) in
either order; band centres (and FWHM) in that group or the root; ``easting``/``northing`` (or ``x``/``y``) 1-D
coordinates of the pixel centres at the root; the CRS from the grid-mapping variable (``spatial_ref`` / ``crs_wkt``
WKT or CF attributes). Beyond the group, variable and dimensions (HyperCoast, BioSCape), the attribute names are
UNVERIFIED: each is looked up under the plausible names, and what is missing is a ProductError naming it (a
missing CRS only drops lat/lon, logged). The sensor comes from the name (``AV3…``/``ang…``) or a root
``instrument``/``sensor``/``title`` attribute naming AVIRIS-3/AVIRIS-NG, never from the band count alone (an EMIT-like
or unknown NetCDF is refused). ``_UNC_ORT.nc`` and quicklooks are sidecars.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import h5netcdf
import numpy as np

from data_prep.formats._common import (
    band_table,
    check_order,
    level_spec_or_error,
    parse_time,
    perr,
    sensor_or_error,
    valid_mask,
)
from data_prep.formats.aviris import SIDECAR_KINDS, parse_name
from data_prep.formats.emit import _text
from data_prep.formats.geo import Grid, crs_from
from data_prep.granule import Granule

log = logging.getLogger(__name__)
VARIABLE = {"L1": "radiance", "L2": "reflectance"}
BAND_DIMS = ("wavelength", "wavelengths", "bands", "band")
X_NAMES, Y_NAMES = ("easting", "x", "projection_x_coordinate"), ("northing", "y", "projection_y_coordinate")


def classify(name: str) -> tuple[str, str] | None:
    """("product", level) / ("sidecar", kind) for AV3/ang NetCDF names; None for other names."""
    stem = name[:-3] if name.lower().endswith(".nc") else name
    n = parse_name(stem)
    if n is None or n.style != "facility":
        return None
    if n.sidecar is not None:
        return "sidecar", f"AVIRIS {SIDECAR_KINDS.get(n.sidecar, n.sidecar)}"
    return "product", n.level


def looks_like(f: h5netcdf.File) -> bool:
    """An AVIRIS facility NetCDF by content: a root attribute naming AVIRIS-3/AVIRIS-NG, and a root or group
    ``reflectance``/``radiance`` holding a 3-D variable of that name."""
    inst = " ".join(_text(f.attrs[k]) for k in ("instrument", "sensor", "title", "source") if k in f.attrs).upper()
    if not re.search(r"AVIRIS[- ]?(3|NG)|\bAV3\b", inst):
        return False
    for v in VARIABLE.values():
        g = f.groups.get(v, f)
        if v in g.variables and len(g.variables[v].shape) == 3:
            return True
    return False


def _find(groups, names):
    for g in groups:
        for n in names:
            if n in g.variables:
                return g.variables[n]
    return None


def open_aviris_nc(path: str | Path) -> Granule:
    path = Path(path)
    kind = classify(path.name)
    if kind is not None and kind[0] == "sidecar":
        raise perr(path, "file name", f"{kind[1]} sidecar, not a radiance or reflectance product")
    try:
        f = h5netcdf.File(path, "r")
    except Exception as e:
        raise perr(path, "netcdf", f"not a readable NetCDF4/HDF5 file: {e}") from None
    with f:
        level = kind[1] if kind else None
        if level is None:
            for lev, v in VARIABLE.items():
                if v in f.groups or v in f.variables:
                    level = lev
                    break
        if level is None:
            raise perr(path, "reflectance", "no 'reflectance' or 'radiance' group or variable; found groups "
                                            f"{sorted(f.groups)} and variables {sorted(f.variables)}")
        vname = VARIABLE[level]
        grp = f.groups.get(vname, f)
        if vname not in grp.variables:
            raise perr(path, f"{vname}/{vname}", f"variable missing; found {sorted(grp.variables)}")
        var = grp.variables[vname]
        dims = tuple(var.dimensions)
        if len(dims) != 3:
            raise perr(path, f"{vname}/{vname}", f"dimensions {dims}; expected (wavelength, northing, easting)")
        wv = _find((grp, f), ("wavelength", "wavelengths", "wavelength_nm"))
        if wv is None:
            raise perr(path, f"{vname}/wavelength", "band centres missing (no wavelength variable in the group or "
                                                    "the root)")
        band_axis = next((i for i, d in enumerate(dims) if d in BAND_DIMS), None)
        if band_axis is None:
            sizes = [i for i, n in enumerate(var.shape) if n == wv.shape[0]]
            if len(sizes) != 1:
                raise perr(path, f"{vname}/{vname}", f"dimensions {dims}: none is the band dimension "
                                                     f"({'/'.join(BAND_DIMS)})")
            band_axis = sizes[0]
        spatial = [i for i in range(3) if i != band_axis]
        ydim = next((i for i in spatial if dims[i] in Y_NAMES), spatial[0])
        xdim = next(i for i in spatial if i != ydim)
        bands, rows, cols = var.shape[band_axis], var.shape[ydim], var.shape[xdim]
        units = wv.attrs.get("units")
        fv = _find((grp, f), ("fwhm", "fwhm_nm"))
        wl, fw = band_table(path, np.asarray(wv[:]), None if fv is None else np.asarray(fv[:]),
                            field=f"{vname}/{wv.name.rsplit('/', 1)[-1]}", fwhm_field=f"{vname}/fwhm",
                            units=None if units is None else _text(units), units_field=f"{wv.name} units",
                            n_bands=bands)
        fill = var.attrs.get("_FillValue")
        gm = var.attrs.get("grid_mapping")
        xs, ys = _find((f, grp), X_NAMES), _find((f, grp), Y_NAMES)
        x = None if xs is None else np.asarray(xs[:], np.float64)
        y = None if ys is None else np.asarray(ys[:], np.float64)
        crs = _crs(path, f, grp, None if gm is None else _text(gm))
        attrs = {k: _text(v) for k, v in f.attrs.items() if isinstance(v, (str, bytes))}
        bbl = _find((grp, f), ("good_wavelengths", "bbl"))
        flags = None if bbl is None else np.asarray(bbl[:]) != 0
    n = parse_name(path.name[:-3]) if path.name.lower().endswith(".nc") else None
    sensor_name = n.sensor if n else None
    if sensor_name is None:
        inst = " ".join(attrs.get(k, "") for k in ("instrument", "sensor", "title", "source")).upper()
        sensor_name = "aviris-3" if re.search(r"AVIRIS[- ]?3|\bAV3\b", inst) else (
            "aviris-ng" if re.search(r"AVIRIS[- ]?NG", inst) else None)
    if sensor_name is None:
        raise perr(path, "instrument", "not an AVIRIS-3/AVIRIS-NG facility product: the name is not AV3…/ang… "
                                       "(…_RFL_ORT.nc, …_RDN_ORT.nc) and no root instrument/sensor/title attribute "
                                       "names the instrument")
    sensor = sensor_or_error(path, sensor_name)
    check_order(path, wl, sensor, f"{vname}/wavelength")
    spec = level_spec_or_error(path, sensor, level)
    if fw is None:
        if sensor.n_bands != bands:
            raise perr(path, f"{vname}/fwhm", f"missing, and the registry's {sensor.name} table has "
                                              f"{sensor.n_bands} bands")
        fw = sensor.fwhm_nm.copy()
    good = sensor.good_band_mask(wl, flags if flags is not None and flags.size == bands else None)
    nodata = float(np.asarray(fill).ravel()[0]) if fill is not None else spec.nodata
    lat = lon = None
    gsd = sensor.gsd_m
    if x is not None and y is not None and x.size == cols and y.size == rows and x.size > 1 and y.size > 1:
        dx, dy = float(np.median(np.diff(x))), float(np.median(np.diff(y)))
        grid = Grid((x[0] - dx / 2, dx, 0.0, y[0] - dy / 2, 0.0, dy), crs)
        lat, lon = grid.latlon(rows, cols)
        gsd = grid.gsd_m(rows, cols) or gsd
    t = parse_time(attrs.get("time_coverage_start", "")) or (n.time if n else None)
    order = (band_axis, ydim, xdim)
    fname = str(path)

    def read_rows(r0: int, r1: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= r0 <= r1 <= rows:
            raise IndexError(f"{fname}: rows {r0}:{r1} outside 0:{rows}")
        sl = [slice(None)] * 3
        sl[ydim] = slice(r0, r1)
        with h5netcdf.File(fname, "r") as ff:
            g = ff.groups.get(vname, ff)
            raw = np.asarray(g.variables[vname][tuple(sl)]).transpose(order)
        cube = raw.astype(np.float32)
        cube[np.isnan(cube) | (raw == nodata)] = np.nan
        return cube, valid_mask(cube, good)

    return Granule(path=fname, granule_id=path.name[:-3] if fname.lower().endswith(".nc") else path.stem,
                   sensor=sensor.name, level=level, shape=(bands, rows, cols), wavelengths_nm=wl, fwhm_nm=fw,
                   good_bands=good, read_rows=read_rows, gsd_m=float(gsd), acquisition_time=t, lat=lat, lon=lon,
                   extra={"format": "aviris-netcdf", "variable": vname, "nodata": nodata})


def _crs(path: Path, f, grp, gm: str | None):
    """The CRS of the grid: the grid-mapping variable named by the cube (group or root), else one of the usual
    names; WKT in ``spatial_ref``/``crs_wkt``, else CF attributes; else a root ``spatial_ref``/``crs`` text."""
    names = [gm] if gm else []
    names += ["crs", "spatial_ref", "transverse_mercator", "utm"]
    for g in (grp, f):
        for nm in names:
            if nm and nm in g.variables:
                a = {k: _text(v) if isinstance(v, (bytes, str)) else v for k, v in g.variables[nm].attrs.items()}
                for key in ("spatial_ref", "crs_wkt", "esri_pe_string"):
                    if key in a:
                        return crs_from(path, f"{nm}:{key}", a[key])
                if "grid_mapping_name" in a:
                    return crs_from(path, f"{nm} (CF grid mapping)", a)
    for key in ("spatial_ref", "crs", "crs_wkt"):
        if key in f.attrs:
            return crs_from(path, key, _text(f.attrs[key]))
    log.warning("%s: no coordinate reference system found: no lat/lon", path)
    return None

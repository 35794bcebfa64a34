"""EMIT L2A reflectance / L1B radiance NetCDF4 granules as the LP DAAC distributes them, via h5netcdf.

Layout (emit-sds ``daac_converter``): ``reflectance`` (or ``radiance``) of (downtrack, crosstrack, bands), fill
-9999; group ``sensor_band_parameters`` with ``wavelengths``, ``fwhm`` (nm) and ``good_wavelengths`` (u1: 1 good,
0 bad, 241 fill); group ``location`` with ``lat``, ``lon``, ``elev`` (downtrack, crosstrack) and the geometry lookup
table ``glt_x``/``glt_y`` (ortho_y, ortho_x; 1-based, 0 = no data); global ``geotransform`` and ``spatial_ref`` of the
GLT grid (EPSG:4326), ``spatialResolution`` (the GLT cell in DEGREES), ``time_coverage_start``.

A granule is several files: ``EMIT_L2A_RFL_001_<time>_<orbit>_<scene>.nc`` with ``EMIT_L2A_RFLUNCERT_...`` and
``EMIT_L2A_MASK_...``; ``EMIT_L1B_RAD_...`` with ``EMIT_L1B_OBS_...``. Only RAD and RFL are products
(:func:`classify`); the others are sidecars.

Guarantees:

- This reader takes only EMIT files: the ``EMIT_`` name, or a root ``instrument``/``sensor``/``title`` attribute
  naming EMIT (:func:`is_emit`); other NetCDFs go to their own readers or are refused.
- ``gsd_m`` in metres: the geodesic spacing of the raw pixel centres in ``location`` (what the stored raw grid
  samples), else ``spatialResolution`` converted from degrees (x 111 320 m), else 60 m.
- The MASK sibling, when beside the file, adds what it knows: pixels under the ``Spacecraft Flag`` (ISS structure
  in view; v001) are invalid, and a band its ``band_mask`` marks interpolated in more than half of the pixels is
  not a good band for this granule.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from pathlib import Path

import h5netcdf
import h5py
import numpy as np

from data_prep.formats._common import (
    band_table,
    check_order,
    level_spec_or_error,
    parse_time,
    perr,
    prepare_cube,
    sensor_or_error,
    utc,
    valid_mask,
)
from data_prep.formats.geo import gsd_from_latlon
from data_prep.granule import Granule
from data_prep.registry import Sensor

NAME = re.compile(r"^EMIT_(?P<lev>L1B|L2A|L2B|L3|L4)_(?P<prod>[A-Z]+)_(?P<ver>\d{3})_(?P<time>\d{8}T\d{6})_(?P<orbit>\d+)"
                  r"_(?P<scene>\d+)")
PRODUCTS = {("L1B", "RAD"): "L1", ("L2A", "RFL"): "L2"}
SIDECARS = {"RFLUNCERT": "EMIT reflectance uncertainty (RFLUNCERT)", "MASK": "EMIT cloud and band masks (MASK)",
            "OBS": "EMIT observation geometry (OBS)"}
VARIABLE = {"L1": "radiance", "L2": "reflectance"}
GOOD_FILL = 241  # uint8(-9999 mod 256): good_wavelengths not known
M_PER_DEG = 111_320.0
#: a band the MASK's band_mask marks interpolated in more than this fraction of pixels is not good in the granule
INTERPOLATED_BAD = 0.5
WKT_4326 = ('GEOGCS["WGS 84",DATUM["WGS_1984",SPHEROID["WGS 84",6378137,298.257223563,AUTHORITY["EPSG","7030"]],'
            'AUTHORITY["EPSG","6326"]],PRIMEM["Greenwich",0,AUTHORITY["EPSG","8901"]],UNIT["degree",'
            '0.0174532925199433,AUTHORITY["EPSG","9122"]],AXIS["Latitude",NORTH],AXIS["Longitude",EAST],'
            'AUTHORITY["EPSG","4326"]]')
MASK_BANDS_V001 = ["Cloud flag", "Cirrus flag", "Water flag", "Spacecraft Flag", "Dilated Cloud Flag", "AOD550",
                   "H2O (g cm-2)", "Aggregate Flag"]


def classify(name: str) -> tuple[str, str] | None:
    """("product", level) for RAD/RFL, ("sidecar", kind) for the other EMIT files, None for non-EMIT names."""
    m = NAME.match(name)
    if not m:
        return ("sidecar", "EMIT other file") if name.startswith("EMIT_") else None
    lev = PRODUCTS.get((m["lev"], m["prod"]))
    if lev:
        return "product", lev
    return "sidecar", SIDECARS.get(m["prod"], f"EMIT {m['lev']} {m['prod']} (not a radiance/reflectance product)")


def _text(v) -> str:
    v = v.decode() if isinstance(v, bytes) else v
    return str(np.asarray(v).ravel()[0]) if isinstance(v, np.ndarray) else str(v)


def is_emit(path: Path, attrs: dict) -> bool:
    """An EMIT file: its name, or a root attribute (instrument, sensor, title, summary) naming EMIT."""
    if path.name.startswith("EMIT_"):
        return True
    for k in ("instrument", "sensor", "title", "summary", "source"):
        if k in attrs and re.search(r"\bEMIT\b", _text(attrs[k])):
            return True
    return False


def _open(path: Path) -> h5netcdf.File:
    try:
        return h5netcdf.File(path, "r")
    except Exception as e:  # h5py raises OSError subclasses for non-HDF5 content
        raise perr(path, "netcdf", f"not a readable NetCDF4/HDF5 file: {e}") from None


def _group(f, path: Path, name: str):
    if name not in f.groups:
        raise perr(path, name, f"group missing; the file has groups {sorted(f.groups)} (expected "
                               "sensor_band_parameters and location)")
    return f.groups[name]


def _var(g, path: Path, name: str, where: str = ""):
    if name not in g.variables:
        raise perr(path, f"{where}{name}", f"variable missing; found {sorted(g.variables)}")
    return g.variables[name]


def sibling(path: Path, prod: str) -> Path | None:
    """The granule's ``prod`` file (e.g. MASK) beside ``path``: same level-independent version, time, orbit and
    scene."""
    m = NAME.match(path.name)
    if not m:
        return None
    pat = re.compile(rf"^EMIT_L\d[A-Z]_{prod}_\d{{3}}_{m['time']}_{m['orbit']}_{m['scene']}\.nc$", re.I)
    for p in sorted(path.parent.iterdir()):
        if pat.match(p.name):
            return p
    return None


def _mask_info(mask: Path, rows: int, cols: int, bands: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(pixels invalid under the spacecraft flag (rows, cols) or None, per-band interpolated fraction or None)."""
    with _open(mask) as f:
        invalid = frac = None
        if "mask" in f.variables:
            v = f.variables["mask"]
            names = MASK_BANDS_V001
            sbp = f.groups.get("sensor_band_parameters")
            if sbp is not None and "mask_bands" in sbp.variables:
                names = [_text(n) for n in np.asarray(sbp.variables["mask_bands"][:]).ravel()]
            norm = [" ".join(str(n).lower().split()) for n in names]
            if "spacecraft flag" in norm and v.shape[:2] == (rows, cols):
                k = norm.index("spacecraft flag")
                invalid = np.asarray(v[:, :, k]) == 1
        if "band_mask" in f.variables:
            bm = np.asarray(f.variables["band_mask"][:])
            if bm.shape[:2] == (rows, cols) and bm.shape[2] * 8 >= bands:
                bits = np.unpackbits(bm.astype(np.uint8), axis=2)[:, :, :bands]
                frac = bits.reshape(-1, bands).mean(axis=0)
    return invalid, frac


def open_emit(path: str | Path) -> Granule:
    path = Path(path)
    m = NAME.match(path.name)
    kind = classify(path.name)
    if kind is not None and kind[0] == "sidecar":
        raise perr(path, "file name", f"{kind[1]}: a sidecar of an EMIT granule, not a radiance or reflectance "
                                      "product (give the EMIT_L1B_RAD or EMIT_L2A_RFL file)")
    with _open(path) as f:
        if not is_emit(path, dict(f.attrs)):
            raise perr(path, "instrument", "not an EMIT file (the name does not start with EMIT_ and no root "
                                           "attribute names EMIT)")
        if m:
            level = PRODUCTS[(m["lev"], m["prod"])]
        elif "reflectance" in f.variables:
            level = "L2"
        elif "radiance" in f.variables:
            level = "L1"
        else:
            raise perr(path, "reflectance", f"neither 'reflectance' nor 'radiance' present; found {sorted(f.variables)}")
        vname = VARIABLE[level]
        var = _var(f, path, vname)
        if len(var.shape) != 3:
            raise perr(path, vname, f"dimensions {var.dimensions}; expected (downtrack, crosstrack, bands)")
        rows, cols, bands = var.shape
        fill = var.attrs.get("_FillValue", None)
        sbp = _group(f, path, "sensor_band_parameters")
        wv = _var(sbp, path, "wavelengths", "sensor_band_parameters/")
        wl = np.asarray(wv[:], dtype=np.float64)
        fw = np.asarray(_var(sbp, path, "fwhm", "sensor_band_parameters/")[:], dtype=np.float64)
        units = wv.attrs.get("units")
        flags = (np.asarray(sbp.variables["good_wavelengths"][:]) if "good_wavelengths" in sbp.variables else None)
        if flags is not None and flags.size != bands:
            raise perr(path, "sensor_band_parameters/good_wavelengths", f"{flags.size} flags for {bands} bands")
        wl, fw = band_table(path, wl, fw, field="sensor_band_parameters/wavelengths",
                            fwhm_field="sensor_band_parameters/fwhm", units=None if units is None else _text(units),
                            units_field="sensor_band_parameters/wavelengths units", n_bands=bands)
        lat = lon = None
        if "location" in f.groups:
            loc = f.groups["location"]
            lat = np.asarray(_var(loc, path, "lat", "location/")[:], dtype=np.float64)
            lon = np.asarray(_var(loc, path, "lon", "location/")[:], dtype=np.float64)
            if lat.shape != (rows, cols) or lon.shape != (rows, cols):
                raise perr(path, "location/lat", f"shape {lat.shape}; expected ({rows}, {cols})")
            lat[lat == -9999], lon[lon == -9999] = np.nan, np.nan
        tattr = f.attrs.get("time_coverage_start")
        t = parse_time(_text(tattr)) if tattr is not None else None
        gt = f.attrs.get("geotransform")
        res = f.attrs.get("spatialResolution")
    if t is None and m:
        t = parse_time(m["time"])
    sensor: Sensor = sensor_or_error(path, "emit")
    check_order(path, wl, sensor, "sensor_band_parameters/wavelengths")
    spec = level_spec_or_error(path, sensor, level)
    nodata = float(np.asarray(fill).ravel()[0]) if fill is not None else spec.nodata
    product_good = None if flags is None else flags != 0
    good = sensor.good_band_mask(wl, product_good)
    invalid = None
    mask_file = sibling(path, "MASK") if level == "L2" else None
    if mask_file is not None:
        invalid, frac = _mask_info(mask_file, rows, cols, bands)
        if frac is not None:
            good &= frac <= INTERPOLATED_BAD
    gsd = gsd_from_latlon(lat, lon)
    if gsd is None and res is not None:
        r = float(np.asarray(res).ravel()[0])
        gsd = r * M_PER_DEG if 0 < r < 1 else r if r > 0 else None
    gsd = gsd or sensor.gsd_m
    fname = str(path)

    def read_rows(r0: int, r1: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= r0 <= r1 <= rows:
            raise IndexError(f"{fname}: rows {r0}:{r1} outside 0:{rows}")
        with h5netcdf.File(fname, "r") as ff:
            raw = np.asarray(ff.variables[vname][r0:r1, :, :]).transpose(2, 0, 1)
        cube = raw.astype(np.float32)
        cube[np.isnan(cube) | (raw == nodata)] = np.nan
        valid = valid_mask(cube, good)
        if invalid is not None:
            valid &= ~invalid[r0:r1]
        return cube, valid

    return Granule(path=fname, granule_id=path.stem, sensor="emit", level=level, shape=(bands, rows, cols),
                   wavelengths_nm=wl, fwhm_nm=fw, good_bands=good, read_rows=read_rows, gsd_m=float(gsd),
                   acquisition_time=t, lat=lat, lon=lon,
                   extra={"format": "emit-netcdf", "variable": vname, "nodata": nodata,
                          "mask_file": None if mask_file is None else str(mask_file),
                          "geotransform": None if gt is None else [float(x) for x in np.asarray(gt).ravel()]})


# ------------------------------------------------------------------ writer
def product_name(level: str, t: dt.datetime, prod: str | None = None) -> str:
    orbit = f"{t:%y%j}{t.hour:02d}"
    lev, p = ("L1B", "RAD") if level == "L1" else ("L2A", "RFL")
    return f"EMIT_{lev}_{prod or p}_001_{t:%Y%m%dT%H%M%S}_{orbit}_{1 + t.minute // 6:03d}"


def build_glt(lat: np.ndarray, lon: np.ndarray, gsd_m: float) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """Geometry lookup table on a north-up EPSG:4326 grid of ``gsd_m / 111 320`` degree cells: nearest raw pixel
    of each ortho cell (1-based), 0 where no raw pixel lies within a pixel; and that grid's geotransform."""
    from scipy.spatial import cKDTree

    d = gsd_m / M_PER_DEG
    x0, y0 = float(lon.min()) - d / 2, float(lat.max()) + d / 2
    nx = int(np.ceil((lon.max() + d / 2 - x0) / d))
    ny = int(np.ceil((y0 - (lat.min() - d / 2)) / d))
    k = np.cos(np.deg2rad(float(lat.mean())))
    tree = cKDTree(np.stack([lon.ravel() * k, lat.ravel()], axis=1))
    oy, ox = np.meshgrid(np.arange(ny) + 0.5, np.arange(nx) + 0.5, indexing="ij")
    q = np.stack([(x0 + ox.ravel() * d) * k, y0 - oy.ravel() * d], axis=1)
    dist, idx = tree.query(q)
    rr, cc = np.unravel_index(idx, lat.shape)
    ok = dist <= d * 0.75
    glt_x = np.where(ok, cc + 1, 0).reshape(ny, nx).astype(np.int32)
    glt_y = np.where(ok, rr + 1, 0).reshape(ny, nx).astype(np.int32)
    return glt_x, glt_y, [x0, d, 0.0, y0, 0.0, -d]


def _write_nc(final: Path, fill_fn) -> None:
    tmp = final.with_name(f".{final.name}.part-{os.getpid()}")
    try:
        with h5netcdf.File(tmp, "w") as f:
            fill_fn(f)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _common_attrs(f, t: dt.datetime, title: str) -> None:
    f.attrs["title"] = title
    f.attrs["instrument"] = "EMIT"
    f.attrs["time_coverage_start"] = t.strftime("%Y-%m-%dT%H:%M:%S+0000")
    f.attrs["time_coverage_end"] = (t + dt.timedelta(seconds=1)).strftime("%Y-%m-%dT%H:%M:%S+0000")


def write_emit(out_dir: Path, *, sensor: Sensor, level: str, cube, name=None, lat=None, lon=None, time=None,
               wavelengths_nm=None, fwhm_nm=None, gsd_m=None) -> Path:
    """The granule as the LP DAAC ships it: RFL + RFLUNCERT + MASK (L2A) or RAD + OBS (L1B) NetCDF4 files, the GLT
    and ``spatialResolution`` in degrees; returns the RAD/RFL file."""
    spec = sensor.level(level)
    cube, wl, fw = prepare_cube(cube, sensor, wavelengths_nm, fwhm_nm)
    bands, rows, cols = cube.shape
    t = utc(time)
    stem = name or product_name(level, t)
    final = out_dir / f"{stem}.nc"
    vname = VARIABLE[level]
    fill = np.float32(spec.nodata)
    good = sensor.good_band_mask(wl).astype(np.uint8)
    gsd = float(gsd_m or sensor.gsd_m)
    glt = build_glt(lat, lon, gsd) if lat is not None else None
    dims = {"downtrack": rows, "crosstrack": cols, "bands": bands}

    def location(f) -> None:
        if glt is None:
            return
        glt_x, glt_y, gt = glt
        f.attrs["geotransform"] = np.asarray(gt, dtype=np.float64)
        f.attrs["spatial_ref"] = WKT_4326
        f.attrs["spatialResolution"] = float(gt[1])  # degrees, as the SDS writes it
        f.dimensions["ortho_y"], f.dimensions["ortho_x"] = glt_x.shape
        loc = f.create_group("location")
        loc.create_variable("lat", ("downtrack", "crosstrack"), "f8", data=lat, fillvalue=-9999.0)
        loc.create_variable("lon", ("downtrack", "crosstrack"), "f8", data=lon, fillvalue=-9999.0)
        loc.create_variable("elev", ("downtrack", "crosstrack"), "f8", data=np.zeros_like(lat), fillvalue=-9999.0)
        loc.create_variable("glt_x", ("ortho_y", "ortho_x"), "i4", data=glt_x, fillvalue=0, compression="gzip",
                            compression_opts=9)
        loc.create_variable("glt_y", ("ortho_y", "ortho_x"), "i4", data=glt_y, fillvalue=0, compression="gzip",
                            compression_opts=9)

    def product(f) -> None:
        f.dimensions = dict(dims)
        _common_attrs(f, t, "EMIT L2A Estimated Surface Reflectance 60 m" if level == "L2"
                      else "EMIT L1B At-Sensor Calibrated Radiance and Geolocation Data 60 m")
        v = f.create_variable(vname, ("downtrack", "crosstrack", "bands"), "f4", fillvalue=fill,
                              chunks=(min(rows, 64), cols, bands))
        v.attrs["units"] = "unitless" if level == "L2" else "uW/cm^2/SR/nm"
        v.attrs["long_name"] = "Surface Reflectance" if level == "L2" else "Radiance Data"
        step = max(1, (64 << 20) // max(1, bands * cols * 4))
        for r in range(0, rows, step):
            b = cube[:, r:r + step, :].transpose(1, 2, 0)
            v[r:r + b.shape[0], :, :] = np.where(np.isnan(b), fill, b)
        g = f.create_group("sensor_band_parameters")
        g.create_variable("wavelengths", ("bands",), "f4", data=wl.astype(np.float32)).attrs["units"] = "nm"
        g.create_variable("fwhm", ("bands",), "f4", data=fw.astype(np.float32)).attrs["units"] = "nm"
        if level == "L2":
            g.create_variable("good_wavelengths", ("bands",), "u1", data=good, fillvalue=GOOD_FILL)
        location(f)

    _write_nc(final, product)
    if level == "L2":
        def uncert(f) -> None:
            f.dimensions = dict(dims)
            _common_attrs(f, t, "EMIT L2A Estimated Surface Reflectance Uncertainty 60 m")
            u = np.where(np.isnan(cube), fill, np.float32(0.01)).transpose(1, 2, 0)
            f.create_variable("reflectance_uncertainty", ("downtrack", "crosstrack", "bands"), "f4", data=u,
                              fillvalue=fill)
            location(f)

        def mask(f) -> None:
            nb = len(MASK_BANDS_V001)
            f.dimensions = {"downtrack": rows, "crosstrack": cols, "bands": nb,
                            "packed_wavelength_bands": -(-bands // 8)}
            _common_attrs(f, t, "EMIT L2A Masks 60 m")
            mk = np.zeros((rows, cols, nb), np.float32)
            mk[np.isnan(cube).all(axis=0)] = -9999.0
            f.create_variable("mask", ("downtrack", "crosstrack", "bands"), "f4", data=mk, fillvalue=-9999.0)
            bm = np.zeros((rows, cols, -(-bands // 8)), np.uint8)
            f.create_variable("band_mask", ("downtrack", "crosstrack", "packed_wavelength_bands"), "u1", data=bm)
            sb = f.create_group("sensor_band_parameters")
            mb = sb.create_variable("mask_bands", ("bands",), dtype=h5py.string_dtype())
            mb[:] = np.array(MASK_BANDS_V001, dtype=object)
            location(f)

        _write_nc(out_dir / f"{product_name(level, t, 'RFLUNCERT')}.nc", uncert)
        _write_nc(out_dir / f"{product_name(level, t, 'MASK')}.nc", mask)
    else:
        def obs(f) -> None:
            f.dimensions = {"downtrack": rows, "crosstrack": cols, "bands": 11}
            _common_attrs(f, t, "EMIT L1B Observation Data 60 m")
            f.create_variable("obs", ("downtrack", "crosstrack", "bands"), "f8", data=np.zeros((rows, cols, 11)),
                              fillvalue=-9999.0)
            location(f)

        _write_nc(out_dir / f"{product_name(level, t, 'OBS')}.nc", obs)
    return final

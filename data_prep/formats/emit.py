"""EMIT L2A reflectance / L1B radiance NetCDF4 (``EMIT_L2A_RFL_001_<time>_<orbit>_<scene>.nc``), via h5netcdf.

Layout as distributed by the LP DAAC: ``reflectance`` (or ``radiance``) of (downtrack, crosstrack,
bands), fill -9999; group ``sensor_band_parameters`` with ``wavelengths``, ``fwhm``,
``good_wavelengths``; group ``location`` with ``lat``, ``lon``, ``elev`` (downtrack, crosstrack) and
the geometry lookup table ``glt_x``, ``glt_y`` (ortho_y, ortho_x; 1-based raw pixel indices, 0 = no
data); global ``geotransform`` (of the GLT grid), ``spatial_ref`` (WKT), ``time_coverage_start``.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from pathlib import Path

import h5netcdf
import numpy as np

from data_prep.formats._common import (
    check_band_table,
    check_increasing,
    level_spec_or_error,
    parse_time,
    perr,
    prepare_cube,
    sensor_or_error,
    utc,
    valid_mask,
)
from data_prep.granule import Granule
from data_prep.registry import Sensor

NAME = re.compile(r"^EMIT_(?P<lev>L1B|L2A)_(?P<prod>RAD|RFL)_\d{3}_(?P<time>\d{8}T\d{6})_\d+_\d+")
VARIABLE = {"L1": "radiance", "L2": "reflectance"}
WKT_4326 = ('GEOGCS["WGS 84",DATUM["WGS_1984",SPHEROID["WGS 84",6378137,298.257223563,AUTHORITY["EPSG","7030"]],'
            'AUTHORITY["EPSG","6326"]],PRIMEM["Greenwich",0,AUTHORITY["EPSG","8901"]],UNIT["degree",'
            '0.0174532925199433,AUTHORITY["EPSG","9122"]],AXIS["Latitude",NORTH],AXIS["Longitude",EAST],'
            'AUTHORITY["EPSG","4326"]]')


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


def open_emit(path: str | Path) -> Granule:
    path = Path(path)
    m = NAME.match(path.name)
    with _open(path) as f:
        if m:
            level = "L1" if m["lev"] == "L1B" else "L2"
        elif "reflectance" in f.variables:
            level = "L2"
        elif "radiance" in f.variables:
            level = "L1"
        else:
            raise perr(path, "reflectance", f"neither 'reflectance' nor 'radiance' present; found {sorted(f.variables)}")
        vname = VARIABLE[level]
        var = _var(f, path, vname)
        if var.dimensions != ("downtrack", "crosstrack", "bands") and len(var.shape) != 3:
            raise perr(path, vname, f"dimensions {var.dimensions}; expected (downtrack, crosstrack, bands)")
        rows, cols, bands = var.shape
        fill = var.attrs.get("_FillValue", None)
        sbp = _group(f, path, "sensor_band_parameters")
        wl = np.asarray(_var(sbp, path, "wavelengths", "sensor_band_parameters/")[:], dtype=np.float64)
        fw = np.asarray(_var(sbp, path, "fwhm", "sensor_band_parameters/")[:], dtype=np.float64)
        flags = (np.asarray(sbp.variables["good_wavelengths"][:]) if "good_wavelengths" in sbp.variables else None)
        if wl.size != bands:
            raise perr(path, "sensor_band_parameters/wavelengths", f"{wl.size} centres for {bands} bands")
        if flags is not None and flags.size != bands:
            raise perr(path, "sensor_band_parameters/good_wavelengths", f"{flags.size} flags for {bands} bands")
        if np.isfinite(wl).all() and wl.max() < 100:  # micrometres
            wl, fw = wl * 1000.0, fw * 1000.0
        wl, fw = check_band_table(path, wl, fw, field="sensor_band_parameters/wavelengths",
                                  fwhm_field="sensor_band_parameters/fwhm")
        lat = lon = None
        if "location" in f.groups:
            loc = f.groups["location"]
            lat = np.asarray(_var(loc, path, "lat", "location/")[:], dtype=np.float64)
            lon = np.asarray(_var(loc, path, "lon", "location/")[:], dtype=np.float64)
            if lat.shape != (rows, cols) or lon.shape != (rows, cols):
                raise perr(path, "location/lat", f"shape {lat.shape}; expected ({rows}, {cols})")
        tattr = f.attrs.get("time_coverage_start")
        t = parse_time(str(tattr)) if tattr is not None else None
        gt = f.attrs.get("geotransform")
        res = f.attrs.get("spatialResolution")
    if t is None and m:
        t = parse_time(m["time"])
    sensor: Sensor = sensor_or_error(path, "emit")
    check_increasing(path, wl, sensor, "sensor_band_parameters/wavelengths")
    spec = level_spec_or_error(path, sensor, level)
    nodata = float(np.asarray(fill).ravel()[0]) if fill is not None else spec.nodata
    good = sensor.good_band_mask(wl, flags)
    gsd = float(np.asarray(res).ravel()[0]) if res is not None else sensor.gsd_m
    fname = str(path)

    def read_rows(r0: int, r1: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= r0 <= r1 <= rows:
            raise IndexError(f"{fname}: rows {r0}:{r1} outside 0:{rows}")
        with h5netcdf.File(fname, "r") as ff:
            raw = np.asarray(ff.variables[vname][r0:r1, :, :])
        cube = np.ascontiguousarray(raw.transpose(2, 0, 1)).astype(np.float32)
        cube[np.isnan(cube) | (raw.transpose(2, 0, 1) == nodata)] = np.nan
        return cube, valid_mask(cube, good)

    return Granule(path=fname, granule_id=path.stem, sensor="emit", level=level, shape=(bands, rows, cols),
                   wavelengths_nm=wl, fwhm_nm=fw, good_bands=good, read_rows=read_rows, gsd_m=gsd,
                   acquisition_time=t, lat=lat, lon=lon,
                   extra={"format": "emit-netcdf", "variable": vname, "nodata": nodata,
                          "geotransform": None if gt is None else [float(x) for x in np.asarray(gt).ravel()]})


# ------------------------------------------------------------------ writer
def product_name(level: str, t: dt.datetime) -> str:
    orbit = f"{t:%y%j}{t.hour:02d}"
    prod = "L1B_RAD" if level == "L1" else "L2A_RFL"
    return f"EMIT_{prod}_001_{t:%Y%m%dT%H%M%S}_{orbit}_{1 + t.minute // 6:03d}"


def build_glt(lat: np.ndarray, lon: np.ndarray, gsd_m: float) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """Geometry lookup table on a north-up EPSG:4326 grid: nearest raw pixel of each ortho cell (1-based), 0 where
    no raw pixel lies within a pixel; and that grid's geotransform."""
    from scipy.spatial import cKDTree

    d = gsd_m / 111_320.0
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


def write_emit(out_dir: Path, *, sensor: Sensor, level: str, cube, name=None, lat=None, lon=None, time=None,
               wavelengths_nm=None, fwhm_nm=None, gsd_m=None) -> Path:
    spec = sensor.level(level)
    cube, wl, fw = prepare_cube(cube, sensor, wavelengths_nm, fwhm_nm)
    bands, rows, cols = cube.shape
    t = utc(time)
    stem = name or product_name(level, t)
    final = out_dir / f"{stem}.nc"
    tmp = out_dir / f".{stem}.nc.part-{os.getpid()}"
    vname = VARIABLE[level]
    fill = np.float32(spec.nodata)
    good = sensor.good_band_mask(wl).astype(np.uint8)
    try:
        with h5netcdf.File(tmp, "w") as f:
            f.dimensions = {"downtrack": rows, "crosstrack": cols, "bands": bands}
            f.attrs["title"] = ("EMIT L2A Estimated Surface Reflectance 60 m" if level == "L2"
                                else "EMIT L1B At-Sensor Calibrated Radiance and Geolocation Data 60 m")
            f.attrs["time_coverage_start"] = t.strftime("%Y-%m-%dT%H:%M:%S+0000")
            f.attrs["time_coverage_end"] = (t + dt.timedelta(seconds=1)).strftime("%Y-%m-%dT%H:%M:%S+0000")
            f.attrs["spatial_ref"] = WKT_4326
            f.attrs["spatialResolution"] = float(gsd_m or sensor.gsd_m)
            v = f.create_variable(vname, ("downtrack", "crosstrack", "bands"), "f4", fillvalue=fill,
                                  chunks=(min(rows, 64), cols, bands))
            v.attrs["units"] = spec.units
            v.attrs["long_name"] = "Surface Reflectance" if level == "L2" else "Radiance Data"
            step = max(1, (64 << 20) // max(1, bands * cols * 4))
            for r in range(0, rows, step):
                b = cube[:, r:r + step, :].transpose(1, 2, 0)
                v[r:r + b.shape[0], :, :] = np.where(np.isnan(b), fill, b)
            g = f.create_group("sensor_band_parameters")
            g.create_variable("wavelengths", ("bands",), "f4", data=wl.astype(np.float32)).attrs["units"] = "nm"
            g.create_variable("fwhm", ("bands",), "f4", data=fw.astype(np.float32)).attrs["units"] = "nm"
            g.create_variable("good_wavelengths", ("bands",), "u1", data=good)
            if lat is not None:
                glt_x, glt_y, gt = build_glt(lat, lon, float(gsd_m or sensor.gsd_m))
                f.attrs["geotransform"] = np.asarray(gt, dtype=np.float64)
                f.dimensions["ortho_y"], f.dimensions["ortho_x"] = glt_x.shape
                loc = f.create_group("location")
                loc.create_variable("lat", ("downtrack", "crosstrack"), "f8", data=lat, fillvalue=-9999.0)
                loc.create_variable("lon", ("downtrack", "crosstrack"), "f8", data=lon, fillvalue=-9999.0)
                loc.create_variable("elev", ("downtrack", "crosstrack"), "f8", data=np.zeros_like(lat),
                                    fillvalue=-9999.0)
                loc.create_variable("glt_x", ("ortho_y", "ortho_x"), "i4", data=glt_x, fillvalue=0)
                loc.create_variable("glt_y", ("ortho_y", "ortho_x"), "i4", data=glt_y, fillvalue=0)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return final

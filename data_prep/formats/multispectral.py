"""PlanetScope SuperDove 8-band and Sentinel-2 MSI 13-band L2 surface reflectance GeoTIFFs.

uint16 reflectance x 10000, nodata 0 (GDAL_NODATA tag), band-sequential, EPSG:4326 geotransform tags, and a
GDAL_METADATA tag with ``ACQUISITION_TIME`` and ``GSD_M`` (the ground sample distance, so that a fusion
product's finer grid survives). Band centres come from the registry (a GeoTIFF carries none).

Not audited against the real distributions (real Sentinel-2 L2A is SAFE with per-band JPEG2000 at 10/20/60 m;
``_stack.tif`` is this project's own form). Names: ``20230405_123456_00_24a3_3B_AnalyticMS_SR_8b.tif`` (PlanetScope; date, time, satellite id) and
``S2A_MSIL2A_20230405T123456_N0509_R123_T33UUP_20230405T150000_stack.tif`` (Sentinel-2 bands stacked).
"""

from __future__ import annotations

import datetime as dt
import os
import re
from pathlib import Path

import numpy as np

from data_prep.formats._common import (
    level_spec_or_error,
    parse_time,
    perr,
    prepare_cube,
    sensor_or_error,
    utc,
    valid_mask,
)
from data_prep.formats._geotiff import GeoTiff, write_geotiff
from data_prep.formats.geo import WGS84, Grid, fit_transform
from data_prep.granule import Granule
from data_prep.registry import Sensor

PLANET = re.compile(r"^(?P<date>\d{8})_(?P<time>\d{6})(?:_\d{2})?_[0-9a-f]{4}_3B_AnalyticMS_SR(?:_8b)?", re.I)
S2 = re.compile(r"^S2[ABC]_MSIL2A_(?P<time>\d{8}T\d{6})_N\d{4}_R\d{3}_T\w{5}_\d{8}T\d{6}")


def parse_name(name: str) -> tuple[str | None, dt.datetime | None]:
    m = PLANET.match(name)
    if m:
        return "planetscope", parse_time(f"{m['date']}T{m['time']}")
    m = S2.match(name)
    if m:
        return "sentinel-2", parse_time(m["time"])
    return None, None


def open_multispectral(path: str | Path) -> Granule:
    path = Path(path)
    img = GeoTiff(path)
    bands, rows, cols = img.shape
    sensor_name, t = parse_name(path.name)
    if sensor_name is None:  # fall back to the band count among the registry's multispectral sensors
        from data_prep.registry import load_registry

        cands = [s.name for s in load_registry().values() if s.kind == "multispectral" and s.n_bands == bands]
        if len(cands) != 1:
            raise perr(path, "sensor", f"unknown sensor: the name matches no PlanetScope/Sentinel-2 pattern and "
                                       f"{bands} bands match {cands or 'no'} registry multispectral sensor")
        sensor_name = cands[0]
    sensor: Sensor = sensor_or_error(path, sensor_name)
    spec = level_spec_or_error(path, sensor, "L2")
    if bands != sensor.n_bands:
        raise perr(path, "bands", f"{bands} bands; {sensor.display_name} has {sensor.n_bands}")
    if img.metadata.get("ACQUISITION_TIME"):
        t = parse_time(img.metadata["ACQUISITION_TIME"]) or t
    gsd = sensor.gsd_m
    if img.metadata.get("GSD_M"):
        try:
            gsd = float(img.metadata["GSD_M"])
        except ValueError:
            raise perr(path, "GSD_M", f"{img.metadata['GSD_M']!r} is not a number") from None
    nodata = img.nodata if img.nodata is not None else spec.nodata
    scale = np.float32(spec.scale_factor)
    lat = lon = None
    if img.grid is not None:
        lat, lon = img.grid.latlon(rows, cols)
    wl, fw = sensor.wavelengths_nm.copy(), sensor.fwhm_nm.copy()
    good = sensor.good_band_mask(wl)

    def read_rows(r0: int, r1: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= r0 <= r1 <= rows:
            raise IndexError(f"{path}: rows {r0}:{r1} outside 0:{rows}")
        raw = img.rows(r0, r1)
        cube = raw.astype(np.float32) * scale
        cube[raw == nodata] = np.nan
        return cube, valid_mask(cube, good)

    return Granule(path=str(path), granule_id=path.stem, sensor=sensor.name, level="L2", shape=(bands, rows, cols),
                   wavelengths_nm=wl, fwhm_nm=fw, good_bands=good, read_rows=read_rows, gsd_m=gsd,
                   acquisition_time=t, lat=lat, lon=lon, extra={"format": "geotiff", "nodata": nodata})


def product_name(sensor: str, t: dt.datetime) -> str:
    if sensor == "planetscope":
        return f"{t:%Y%m%d_%H%M%S}_00_24a3_3B_AnalyticMS_SR_8b"
    proc = t + dt.timedelta(hours=3)
    return f"S2A_MSIL2A_{t:%Y%m%dT%H%M%S}_N0509_R123_T33UUP_{proc:%Y%m%dT%H%M%S}_stack"


def write_multispectral(out_dir: Path, *, sensor: Sensor, level: str, cube, name=None, lat=None, lon=None,
                        time=None, wavelengths_nm=None, fwhm_nm=None, gsd_m=None) -> Path:
    if level != "L2":
        raise ValueError(f"{sensor.name}: only L2 surface reflectance is written, not {level}")
    spec = sensor.level(level)
    cube, _, _ = prepare_cube(cube, sensor, wavelengths_nm, fwhm_nm)
    t = utc(time)
    stem = name or product_name(sensor.name, t)
    final = out_dir / f"{stem}.tif"
    nan = np.isnan(cube)
    dn = np.clip(np.round(np.where(nan, 0, cube) / spec.scale_factor), 1, 65535).astype(np.uint16)
    dn[nan] = int(spec.nodata)
    grid = Grid(fit_transform(lon, lat), WGS84) if lat is not None else None
    md = {"ACQUISITION_TIME": t.strftime("%Y-%m-%dT%H:%M:%SZ"), "GSD_M": f"{float(gsd_m or sensor.gsd_m):g}",
          "SENSOR": sensor.display_name, "SCALE_FACTOR": f"{spec.scale_factor:g}"}
    tmp = out_dir / f".{stem}.tif.part-{os.getpid()}"
    try:
        write_geotiff(tmp, dn, nodata=spec.nodata, grid=grid, metadata=md)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return final

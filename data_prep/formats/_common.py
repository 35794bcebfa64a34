"""Helpers shared by the format modules: checks, sensor matching, geolocation, time, granule assembly."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np

from data_prep.granule import ProductError
from data_prep.registry import RegistryError, Sensor, check_band_order, get_sensor, load_registry
from data_prep.registry import check_band_table as registry_check_band_table

#: a product's band centres may differ from the registry's by at most this to match a sensor (nm)
MATCH_TOLERANCE_NM = 5.0


def perr(path: str | Path, field: str, msg: str) -> ProductError:
    """A ProductError whose message starts with the file and the field."""
    return ProductError(f"{path}: field {field}: {msg}")


def sensor_or_error(path: str | Path, name: str) -> Sensor:
    try:
        return get_sensor(name)
    except RegistryError as e:
        raise perr(path, "sensor", str(e)) from None


def level_spec_or_error(path: str | Path, sensor: Sensor, level: str):
    try:
        return sensor.level(level)
    except RegistryError as e:
        raise perr(path, "level", str(e)) from None


def band_table(path: str | Path, wl, fwhm, *, field: str = "wavelength", fwhm_field: str = "fwhm",
               units: str | None = None, units_field: str = "wavelength units", n_bands: int | None = None,
               hyperspectral: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """A product's band table checked and in nm (see :func:`data_prep.registry.check_band_table`)."""
    return registry_check_band_table(path, wl, fwhm, field=field, width_field=fwhm_field, units=units,
                                     units_field=units_field, n_bands=n_bands, hyperspectral=hyperspectral,
                                     error=ProductError)


def check_order(path: str | Path, wl: np.ndarray, sensor: Sensor, field: str = "wavelength") -> None:
    """Centres ascending, except at the spectrometer starts the sensor's registry entry declares (when the product
    has the registry's band count)."""
    starts = sensor.spectrometer_starts if sensor.n_bands == np.asarray(wl).size else ()
    check_band_order(path, wl, starts, field=field, what=f"{sensor.name}'s registry entry", error=ProductError)


def match_sensor(path: str | Path, wl: np.ndarray, formats: set[str] | None = None) -> Sensor:
    """The registry sensor with this band count and centres within MATCH_TOLERANCE_NM, else ProductError."""
    best: tuple[float, Sensor] | None = None
    for s in load_registry().values():
        if formats is not None and s.format not in formats:
            continue
        if s.n_bands != wl.size:
            continue
        err = float(np.max(np.abs(s.wavelengths_nm - wl)))
        if err <= MATCH_TOLERANCE_NM and (best is None or err < best[0]):
            best = (err, s)
    if best is None:
        raise perr(path, "sensor", f"unknown sensor: no registry sensor has {wl.size} bands with centres within "
                                   f"{MATCH_TOLERANCE_NM} nm of {wl.min():.2f}-{wl.max():.2f} nm; "
                                   f"registry: {sorted(load_registry())}")
    return best[1]


def nodata_to_nan(cube: np.ndarray, nodata: float | None) -> np.ndarray:
    """float32 copy with nodata (and non-finite) stored values as NaN."""
    out = np.asarray(cube, dtype=np.float32).copy() if cube.dtype != np.float32 else np.array(cube, copy=True)
    if nodata is not None and np.isfinite(nodata):
        out[np.asarray(cube) == nodata] = np.nan
    return out


def valid_mask(cube: np.ndarray, good: np.ndarray) -> np.ndarray:
    """False where any good band is NaN (nodata). +/-inf stays 'valid' so that ingest can report it."""
    if not good.any():
        return np.zeros(cube.shape[1:], dtype=bool)
    return ~np.isnan(cube[good]).any(axis=0)


def nodata_bands(cube: np.ndarray) -> np.ndarray:
    """bool (bands,): bands that are NaN (nodata) at every pixel of ``cube`` (bands, rows, cols) where most of the
    other bands hold data: a band the product fills entirely with its nodata value (EnMAP L2A's water-vapour
    bands). Pixels outside the coverage (nodata in most bands) do not count; no pixel with data -> none."""
    has = ~np.isnan(cube)
    covered = has.mean(axis=0) >= 0.5
    if not covered.any():
        return np.zeros(cube.shape[0], dtype=bool)
    return ~has[:, covered].any(axis=1)


# ------------------------------------------------------------------ geolocation
def affine_from_latlon(lat: np.ndarray, lon: np.ndarray) -> tuple[float, ...]:
    """EPSG:4326 geotransform (pixel corners) fitted to pixel-centre lat/lon:
    :func:`data_prep.formats.geo.fit_transform` with longitude as x."""
    from data_prep.formats.geo import fit_transform

    return fit_transform(lon, lat)


def check_latlon(path: str | Path, lat, lon, rows: int, cols: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Writer side: both or neither, shape (rows, cols)."""
    if lat is None and lon is None:
        return None, None
    if lat is None or lon is None:
        raise ValueError(f"{path}: give both lat and lon, or neither")
    lat = np.asarray(lat, dtype=np.float64)
    lon = np.asarray(lon, dtype=np.float64)
    if lat.shape != (rows, cols) or lon.shape != (rows, cols):
        raise ValueError(f"{path}: lat/lon shape {lat.shape}/{lon.shape}; expected ({rows}, {cols})")
    return lat, lon


# ------------------------------------------------------------------ time
def utc(t: dt.datetime | None) -> dt.datetime:
    """The writer's acquisition time (default: a fixed date), as aware UTC without microseconds."""
    if t is None:
        t = dt.datetime(2023, 4, 5, 12, 34, 56, tzinfo=dt.UTC)
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    return t.astimezone(dt.UTC).replace(microsecond=0)


def parse_time(text: str) -> dt.datetime | None:
    """ISO-8601-ish or compact (20230405T123456, 20230405t123456) -> aware UTC; None if unparseable."""
    s = text.strip().strip('"')
    for fmt in ("%Y%m%dT%H%M%S", "%Y%m%dt%H%M%S", "%Y%m%dT%H%M%SZ"):
        try:
            return dt.datetime.strptime(s, fmt).replace(tzinfo=dt.UTC)
        except ValueError:
            pass
    s = s.replace("Z", "+00:00")
    if len(s) >= 5 and (s[-5] in "+-") and s[-3] != ":" and "T" in s:  # +0000 -> +00:00
        s = s[:-2] + ":" + s[-2:]
    try:
        t = dt.datetime.fromisoformat(s)
    except ValueError:
        return None
    return (t if t.tzinfo else t.replace(tzinfo=dt.UTC)).astimezone(dt.UTC)


def prepare_cube(cube, sensor: Sensor, wavelengths_nm, fwhm_nm) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Writer side: cube float32 (bands, rows, cols) and band table (registry's by default), checked."""
    cube = np.asarray(cube, dtype=np.float32)
    if cube.ndim != 3:
        raise ValueError(f"cube must be (bands, rows, cols), got shape {cube.shape}")
    wl = sensor.wavelengths_nm if wavelengths_nm is None else np.asarray(wavelengths_nm, dtype=np.float64)
    fw = sensor.fwhm_nm if fwhm_nm is None else np.asarray(fwhm_nm, dtype=np.float64)
    if wl.shape != (cube.shape[0],) or fw.shape != (cube.shape[0],):
        raise ValueError(f"{sensor.name}: cube has {cube.shape[0]} bands but {wl.size} wavelengths / {fw.size} fwhm")
    return cube, wl, fw

"""Helpers shared by the format modules: checks, sensor matching, geolocation, time, granule assembly."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np

from data_prep.granule import ProductError
from data_prep.registry import WAVELENGTH_RANGE_NM, RegistryError, Sensor, get_sensor, load_registry

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


def check_band_table(path: str | Path, wl: np.ndarray, fwhm: np.ndarray | None, *, field: str = "wavelength",
                     fwhm_field: str = "fwhm", hyperspectral: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Finite, strictly increasing centres within 350-2550 nm (hyperspectral); finite positive FWHM."""
    wl = np.asarray(wl, dtype=np.float64).ravel()
    if wl.size == 0:
        raise perr(path, field, "no band centres; expected one per band")
    bad = ~np.isfinite(wl)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise perr(path, field, f"band {i} centre is {wl[i]!r}; expected a finite wavelength in nm")
    lo, hi = WAVELENGTH_RANGE_NM
    if hyperspectral and (wl.min() < lo or wl.max() > hi):
        raise perr(path, field, f"centres span {wl.min():.2f}-{wl.max():.2f} nm; expected within {lo:g}-{hi:g} nm "
                                "(reflective range of an imaging spectrometer)")
    if fwhm is not None:
        fwhm = np.asarray(fwhm, dtype=np.float64).ravel()
        if fwhm.shape != wl.shape:
            raise perr(path, fwhm_field, f"{fwhm.size} values for {wl.size} bands")
        if not np.isfinite(fwhm).all() or (fwhm <= 0).any():
            i = int(np.flatnonzero(~np.isfinite(fwhm) | (fwhm <= 0))[0])
            raise perr(path, fwhm_field, f"band {i} FWHM is {fwhm[i]!r}; expected a positive finite width in nm")
    return wl, fwhm


def check_increasing(path: str | Path, wl: np.ndarray, sensor: Sensor, field: str = "wavelength") -> None:
    """Centres strictly increasing, except at the spectrometer overlaps the registry's own table has (AVIRIS-Classic
    and EnMAP have a VNIR/SWIR overlap where the next centre is shorter): a step back is allowed only at the same
    band index as in the registry, and by at most 100 nm."""
    d = np.diff(wl)
    allowed = set()
    if sensor.n_bands == wl.size:
        allowed = set(np.flatnonzero(np.diff(sensor.wavelengths_nm) < 0).tolist())
    for i in np.flatnonzero(d <= 0):
        if int(i) in allowed and -100.0 < d[i] < 0:
            continue
        raise perr(path, field, f"centres not strictly increasing at band {i + 1} ({wl[i]:.3f} -> {wl[i + 1]:.3f} "
                                f"nm), and {sensor.name}'s registry table has no spectrometer overlap there")


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


# ------------------------------------------------------------------ geolocation
def affine_from_latlon(lat: np.ndarray, lon: np.ndarray) -> tuple[float, ...]:
    """GDAL-style geotransform (x0, dx_col, dx_row, y0, dy_col, dy_row) of pixel corners, EPSG:4326, least squares
    over pixel centres (exact for an affine grid)."""
    lat = np.asarray(lat, dtype=np.float64)
    lon = np.asarray(lon, dtype=np.float64)
    rows, cols = lat.shape
    rr, cc = np.meshgrid(np.arange(rows) + 0.5, np.arange(cols) + 0.5, indexing="ij")
    a = np.stack([np.ones(rr.size), cc.ravel(), rr.ravel()], axis=1)
    if rows * cols < 3:
        a = a[:, :1]
    px, *_ = np.linalg.lstsq(a, lon.ravel(), rcond=None)
    py, *_ = np.linalg.lstsq(a, lat.ravel(), rcond=None)
    px = np.pad(px, (0, 3 - px.size))
    py = np.pad(py, (0, 3 - py.size))
    return (float(px[0]), float(px[1]), float(px[2]), float(py[0]), float(py[1]), float(py[2]))


def latlon_from_affine(gt: tuple[float, ...], rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """(lat, lon) float64 (rows, cols) of pixel centres."""
    rr, cc = np.meshgrid(np.arange(rows) + 0.5, np.arange(cols) + 0.5, indexing="ij")
    lon = gt[0] + gt[1] * cc + gt[2] * rr
    lat = gt[3] + gt[4] * cc + gt[5] * rr
    return lat, lon


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

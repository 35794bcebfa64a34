"""Shared helpers for the data_prep.formats tests: tiny cubes with nodata, geolocation, one time."""

from __future__ import annotations

import datetime as dt

import numpy as np

from data_prep.registry import get_sensor

ROWS, COLS = 20, 16
TIME = dt.datetime(2021, 6, 7, 18, 9, 10, tzinfo=dt.UTC)
CASES = [("aviris-classic", "L1"), ("aviris-classic", "L2"), ("aviris-ng", "L1"), ("aviris-ng", "L2"),
         ("aviris-3", "L1"), ("aviris-3", "L2"), ("emit", "L1"), ("emit", "L2"), ("enmap", "L1"), ("enmap", "L2"),
         ("desis", "L1"), ("desis", "L2"), ("planetscope", "L2"), ("sentinel-2", "L2")]


def make_cube(sensor: str, level: str, seed: int = 0) -> np.ndarray:
    """Smooth-ish random spectra (radiance-like for L1), NaN at a corner block (nodata) and at one pixel in one
    good band only (must make that pixel invalid), and NaN in one bad band only at another pixel (must not)."""
    s = get_sensor(sensor)
    rng = np.random.default_rng(seed)
    base = rng.uniform(0.02, 0.8, (1, ROWS, COLS)) * np.linspace(0.6, 1.2, s.n_bands)[:, None, None]
    cube = (base + rng.normal(0, 0.01, (s.n_bands, ROWS, COLS))).astype(np.float32)
    if level == "L1":
        cube *= 20.0
    cube[:, 0, :3] = np.nan
    good = s.good_band_mask()
    cube[int(np.flatnonzero(good)[len(np.flatnonzero(good)) // 2]), 5, 5] = np.nan
    if (~good).any():
        cube[int(np.flatnonzero(~good)[0]), 6, 6] = np.nan
    return cube


def geolocation(gsd_m: float, heading_deg: float = 12.0, centre=(35.0, -110.0)) -> tuple[np.ndarray, np.ndarray]:
    """A rotated pixel-centre grid, affine in UTM (as a flight line's)."""
    from data_prep.formats.geo import flight_grid

    return flight_grid(ROWS, COLS, gsd_m, centre, heading_deg).latlon(ROWS, COLS)


def tolerance(sensor: str, level: str, cube: np.ndarray) -> np.ndarray:
    """Per-band absolute tolerance of the format's precision: float32 exact; int16/uint16 half a quantum."""
    s = get_sensor(sensor)
    if (sensor, level) == ("aviris-classic", "L1"):  # int16 DN = radiance x gain (300/600/1200)
        from data_prep.formats.aviris import CLASSIC_GAINS

        gain = np.empty(s.n_bands)
        for lo, hi, g in CLASSIC_GAINS:
            gain[lo - 1:hi] = g
        return (0.5 / gain + 1e-5)[:, None, None].astype(np.float32)
    if s.format in ("envi", "emit-netcdf"):
        return np.zeros((cube.shape[0], 1, 1), dtype=np.float32) + 1e-7
    if level == "L2":
        return np.full((cube.shape[0], 1, 1), 0.5e-4 + 1e-6, dtype=np.float32)
    peak = np.nanmax(np.abs(cube), axis=(1, 2))
    return (peak / 30000.0 * 0.5 + 1e-6)[:, None, None].astype(np.float32)

"""Spectral response functions: a (bands x grid) matrix that resamples fine-grid spectra to a sensor."""

from __future__ import annotations

import numpy as np

from data_prep.simulate.library import GRID_NM

FWHM_TO_SIGMA = 1.0 / (2.0 * np.sqrt(2.0 * np.log(2.0)))


def srf_matrix(centres_nm: np.ndarray, fwhm_nm: np.ndarray, grid_nm: np.ndarray = GRID_NM,
               order: float = 2.0) -> np.ndarray:
    """Row-normalised responses, float64 (bands, len(grid)).

    ``order`` 2 gives Gaussians of the given FWHM (imaging spectrometers); a larger even order gives the
    flat-topped responses of multispectral filters with the same FWHM (``exp(-ln2 |2x/FWHM|^order)``).
    """
    c = np.asarray(centres_nm, dtype=np.float64)[:, None]
    w = np.asarray(fwhm_nm, dtype=np.float64)[:, None]
    if c.shape != w.shape:
        raise ValueError(f"centres ({c.shape[0]}) and fwhm ({w.shape[0]}) differ in length")
    if (w <= 0).any():
        raise ValueError("fwhm must be positive")
    x = np.abs(2.0 * (grid_nm[None, :] - c) / w)
    r = np.exp(-np.log(2.0) * x**order)
    r[r < 1e-9] = 0.0
    s = r.sum(axis=1, keepdims=True)
    if (s <= 0).any():
        bad = np.flatnonzero(s[:, 0] <= 0)
        raise ValueError(f"band(s) {bad.tolist()} have no response on the {grid_nm[0]}-{grid_nm[-1]} nm grid")
    return r / s


_CACHE: dict[tuple, np.ndarray] = {}


def sensor_srf(sensor) -> np.ndarray:
    """The registry sensor's SRF matrix: Gaussian for hyperspectral, flat-topped for multispectral.

    Cached per band table (the returned array is read-only).
    """
    order = 2.0 if sensor.kind == "hyperspectral" else 8.0
    key = (sensor.name, order, sensor.wavelengths_nm.tobytes(), sensor.fwhm_nm.tobytes())
    if key not in _CACHE:
        m = srf_matrix(sensor.wavelengths_nm, sensor.fwhm_nm, order=order)
        m.setflags(write=False)
        _CACHE[key] = m
    return _CACHE[key]


def resample(spectra: np.ndarray, srf: np.ndarray) -> np.ndarray:
    """(..., grid) -> (..., bands)."""
    return spectra @ srf.T

"""Cutting a granule into patches: quality filter, clipping, float16, per-patch metadata.

A granule is read one strip of ``patch_size`` rows at a time, itself read in blocks of at most
``row_block`` rows through :meth:`Granule.read_rows`, so a flightline is never held whole. Patches
are non-overlapping, on a grid anchored at the granule's top-left pixel; patches on the bottom
and right edges that stick out of the granule are padded with invalid pixels (so they are kept
only if the part inside is large and clean enough).

Per pixel:

- invalid where the reader says so, or where any good band is NaN (the readers' nodata);
- +/-inf in a good band of a pixel the reader calls valid is corrupt data: :class:`ProductError`;
- values are clipped to the level's clip range (registry), then stored as float16: if the clip
  range reaches beyond float16 (+/-65504) and a value does too, :class:`ProductError` (no silent
  inf in the store);
- invalid pixels, and NaN/inf in bad bands, are stored as 0; ``valid`` is False where invalid.

A patch is dropped when its invalid fraction exceeds ``max_invalid`` (or it has no valid pixel).

Per patch its ground footprint is kept (:func:`patch_geo`): the affine that maps pixel (column, row) corner
coordinates inside the patch to WGS-84 longitude/latitude, fitted by least squares to the granule's per-pixel
lat/lon over the patch's window (exact for a map-projected grid at patch scale; residual kept small for curved
swaths by the patch's size), and the lon/lat bounds of the patch's four corners under it. Both NaN when the
product has no geolocation. The location index (``python -m data_prep colocate``) is built from them.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np

from data_prep.granule import Granule, ProductError
from data_prep.stats import DEFAULT_BINS, PartialStats
from data_prep.store import NO_TIME

FP16_MAX = float(np.finfo(np.float16).max)
MIN_PATCH = 8
DEFAULT_ROW_BLOCK = 64


@dataclass
class StripTiles:
    """The kept patches of one strip and what the store needs about them."""

    r0: int
    patches: np.ndarray
    """float16 (k, bands, P, P)"""
    valid: np.ndarray
    """bool (k, P, P)"""
    meta: dict[str, np.ndarray]
    """store.META_FIELDS except ``granule``, each (k,)"""
    partial: PartialStats
    """statistics over the valid pixels of the kept patches"""
    valid_pixels: int
    """valid pixels in the whole strip, kept or not (to tell an all-nodata granule)"""
    candidates: int
    """patches considered in this strip"""

    @property
    def count(self) -> int:
        return int(self.patches.shape[0])


def strip_starts(n_rows: int, patch_size: int) -> list[int]:
    return list(range(0, n_rows, patch_size))


def prepare_block(cube: np.ndarray, valid: np.ndarray, good_bands: np.ndarray, clip: tuple[float, float], *,
                  path: str, row0: int) -> tuple[np.ndarray, np.ndarray]:
    """(float16 cube, valid) of one block of rows, following the rules in the module docstring.

    ``cube`` float32 (bands, rows, cols) is modified in place; ``row0`` (the block's first row in
    the granule) is only for error messages.
    """
    if cube.ndim != 3 or valid.shape != cube.shape[1:]:
        raise ProductError(f"{path}: read_rows gave cube {cube.shape} and valid {valid.shape}; "
                           "expected (bands, rows, cols) and (rows, cols)")
    valid = np.asarray(valid, dtype=bool).copy()
    good = cube[good_bands]
    finite_good = np.isfinite(good)
    inf_good = ~finite_good & ~np.isnan(good)
    bad_px = inf_good.any(axis=0) & valid
    if bad_px.any():
        r, c = np.argwhere(bad_px)[0]
        band = int(np.flatnonzero(good_bands)[np.argmax(inf_good[:, r, c])])
        raise ProductError(f"{path}: band {band} (good) holds an infinite value at row {row0 + int(r)}, col {int(c)} "
                           "of a valid pixel; expected finite values or NaN for nodata")
    valid &= finite_good.all(axis=0)
    del good, finite_good, inf_good
    lo, hi = clip
    np.clip(cube, lo, hi, out=cube)
    if max(abs(lo), abs(hi)) > FP16_MAX:
        over = (np.abs(cube) > FP16_MAX) & np.isfinite(cube) & valid[None]
        if over.any():
            b, r, c = np.argwhere(over)[0]
            raise ProductError(
                f"{path}: band {int(b)} value {float(cube[b, r, c]):g} at row {row0 + int(r)}, col {int(c)} "
                f"overflows float16 (max {FP16_MAX:g}); the registry clip range {clip} lets it through")
    cube[~np.isfinite(cube)] = 0.0
    cube[:, ~valid] = 0.0
    return cube.astype(np.float16), valid


GEO_FIELDS = tuple(f"geo_{k}" for k in range(6))
FOOTPRINT_FIELDS = ("lon_min", "lat_min", "lon_max", "lat_max")
_GEO_SAMPLES = 9
"""Points per axis of the patch window the affine is fitted to (the window's corners included)."""


def patch_geo(lat: np.ndarray | None, lon: np.ndarray | None, r0: int, c0: int, p: int
              ) -> tuple[np.ndarray, np.ndarray]:
    """``(geo [6], bounds [4])`` of the ``p`` x ``p`` patch at (r0, c0) of a granule with pixel-centre ``lat``/``lon``.

    ``geo``: ``lon = g0 + g1*x + g2*y``, ``lat = g3 + g4*x + g5*y`` for pixel-corner coordinates (x = column,
    y = row, 0..p) inside the patch; ``bounds``: (lon_min, lat_min, lon_max, lat_max) of the patch's corners.
    NaN when there is no geolocation or fewer than 3 finite points in the window."""
    nan = np.full(6, np.nan), np.full(4, np.nan)
    if lat is None or lon is None:
        return nan
    n_rows, n_cols = lat.shape
    r1, c1 = min(r0 + p, n_rows), min(c0 + p, n_cols)
    ys = np.unique(np.linspace(r0, r1 - 1, _GEO_SAMPLES).round().astype(np.int64))
    xs = np.unique(np.linspace(c0, c1 - 1, _GEO_SAMPLES).round().astype(np.int64))
    la = np.asarray(lat[np.ix_(ys, xs)], dtype=np.float64)
    lo = np.asarray(lon[np.ix_(ys, xs)], dtype=np.float64)
    gy, gx = np.meshgrid(ys - r0 + 0.5, xs - c0 + 0.5, indexing="ij")  # pixel centres in patch coordinates
    ok = np.isfinite(la) & np.isfinite(lo)
    if ok.sum() < 3:
        return nan
    a = np.stack([np.ones(ok.sum()), gx[ok], gy[ok]], 1)
    if np.linalg.matrix_rank(a) < 3:  # one row or one column of pixels: no 2-D affine
        return nan
    geo = np.concatenate([np.linalg.lstsq(a, lo[ok], rcond=None)[0], np.linalg.lstsq(a, la[ok], rcond=None)[0]])
    cx = np.array([0.0, p, 0.0, p])
    cy = np.array([0.0, 0.0, p, p])
    clon = geo[0] + geo[1] * cx + geo[2] * cy
    clat = geo[3] + geo[4] * cx + geo[5] * cy
    return geo, np.array([clon.min(), clat.min(), clon.max(), clat.max()])


def _time_seconds(t: dt.datetime | None) -> int:
    if t is None:
        return int(NO_TIME)
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    return int(t.timestamp())


def tile_strip(granule: Granule, r0: int, *, patch_size: int, max_invalid: float, clip: tuple[float, float],
               hist_range: tuple[float, float] | None = None, hist_bins: int = DEFAULT_BINS,
               row_block: int = DEFAULT_ROW_BLOCK) -> StripTiles:
    """Tile rows ``r0 : r0 + patch_size`` of ``granule`` into its kept patches."""
    p = patch_size
    n_bands, n_rows, n_cols = granule.shape
    good = np.asarray(granule.good_bands, dtype=bool)
    r1 = min(r0 + p, n_rows)
    col_starts = list(range(0, n_cols, p))
    n_cp = len(col_starts)
    buf = np.zeros((n_cp, n_bands, p, p), dtype=np.float16)
    vbuf = np.zeros((n_cp, p, p), dtype=bool)
    row_block = max(1, min(row_block, p))
    for b0 in range(r0, r1, row_block):
        b1 = min(b0 + row_block, r1)
        cube, valid = granule.read_rows(b0, b1)
        cube = np.array(cube, dtype=np.float32, copy=True)
        if cube.shape != (n_bands, b1 - b0, n_cols):
            raise ProductError(f"{granule.path}: read_rows({b0}, {b1}) gave shape {cube.shape}; "
                               f"expected {(n_bands, b1 - b0, n_cols)}")
        c16, v = prepare_block(cube, np.asarray(valid), good, clip, path=granule.path, row0=b0)
        del cube
        y0, y1 = b0 - r0, b1 - r0
        for j, c0 in enumerate(col_starts):
            w = min(p, n_cols - c0)
            buf[j, :, y0:y1, :w] = c16[:, :, c0:c0 + w]
            vbuf[j, y0:y1, :w] = v[:, c0:c0 + w]
    vfrac = vbuf.reshape(n_cp, -1).mean(axis=1)
    keep = (vfrac > 0) & (1.0 - vfrac <= max_invalid + 1e-12)
    lo, hi = hist_range if hist_range is not None else clip
    partial = PartialStats.empty(n_bands, lo, hi, hist_bins)
    kept = np.flatnonzero(keep)
    for j in kept:
        partial.add_patch(buf[j], vbuf[j])
    cols = np.asarray(col_starts, dtype=np.int64)[kept]
    k = kept.size
    lat = np.full(k, np.nan)
    lon = np.full(k, np.nan)
    if granule.lat is not None and granule.lon is not None:
        cy = min(r0 + p // 2, n_rows - 1)
        for i, c0 in enumerate(cols):
            cx = min(int(c0) + p // 2, n_cols - 1)
            lat[i] = granule.lat[cy, cx]
            lon[i] = granule.lon[cy, cx]
    geo = np.full((k, 6), np.nan)
    bounds = np.full((k, 4), np.nan)
    for i, c0 in enumerate(cols):
        geo[i], bounds[i] = patch_geo(granule.lat, granule.lon, r0, int(c0), p)
    meta = {
        **{f: geo[:, j] for j, f in enumerate(GEO_FIELDS)},
        **{f: bounds[:, j] for j, f in enumerate(FOOTPRINT_FIELDS)},
        "row": np.full(k, r0, dtype=np.int32),
        "col": cols.astype(np.int32),
        "lat": lat,
        "lon": lon,
        "time": np.full(k, _time_seconds(granule.acquisition_time), dtype=np.int64),
        "gsd": np.full(k, granule.gsd_m, dtype=np.float32),
        "valid_fraction": vfrac[kept].astype(np.float32),
    }
    if k == n_cp:
        patches, valids = buf, vbuf
    else:
        patches, valids = buf[kept], vbuf[kept]
    return StripTiles(r0=r0, patches=patches, valid=valids, meta=meta, partial=partial,
                      valid_pixels=int(vbuf.sum()), candidates=n_cp)

"""Tiny seeded patch stores for the loader tests, written with data_prep.store directly."""

from __future__ import annotations

import numpy as np

from data_prep.store import NO_TIME, BandStats, append_patches, create_store, write_stats


def make_store(url: str, *, sensor: str = "emit", level: str = "L2", n: int = 24, bands: int = 40,
               patch: int = 32, good: np.ndarray | None = None, seed: int = 0, granules: int = 2,
               band_chunk: int = 8, spatial_chunk: int = 8, invalid_frac: float = 0.05) -> dict:
    """Write a store of ``n`` patches (split over ``granules``) with stats; return what was written."""
    rng = np.random.default_rng(seed)
    wl = np.linspace(400, 2400, bands)
    fw = np.linspace(5, 12, bands)
    good = np.ones(bands, bool) if good is None else np.asarray(good, bool)
    g = create_store(url, sensor=sensor, level=level, wavelengths_nm=wl, fwhm_nm=fw, good_bands=good,
                     patch_size=patch, band_chunk=band_chunk, spatial_chunk=spatial_chunk)
    scale = rng.uniform(0.5, 3.0, bands)[None, :, None, None]
    x = (rng.standard_normal((n, bands, patch, patch)) * scale + 2 * scale).astype(np.float16)
    v = rng.random((n, patch, patch)) > invalid_frac
    parts = np.array_split(np.arange(n), granules)
    for k, idx in enumerate(parts):
        m = len(idx)
        meta = {"row": idx * patch, "col": np.zeros(m), "lat": np.full(m, 34.0), "lon": np.full(m, -118.0),
                "time": np.full(m, NO_TIME), "gsd": np.full(m, 30.0 + k), "valid_fraction": v[idx].mean((1, 2))}
        append_patches(g, granule_id=f"{sensor}-g{k}", source=f"/src/{sensor}-g{k}", patches=x[idx], valid=v[idx],
                       meta=meta)
    xf = x.astype(np.float64)
    vm = np.broadcast_to(v[:, None], xf.shape)
    vals = [xf[:, b][vm[:, b]] for b in range(bands)]
    st = BandStats(count=np.array([a.size for a in vals], float), mean=np.array([a.mean() for a in vals]),
                   std=np.array([a.std() for a in vals]), p01=np.array([np.percentile(a, 1) for a in vals]),
                   p99=np.array([np.percentile(a, 99) for a in vals]))
    write_stats(g, st)
    return {"url": url, "pixels": x, "valid": v, "stats": st, "wavelengths": wl, "fwhm": fw, "good": good}

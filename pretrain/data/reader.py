"""Reading one sample: crop + band window through :class:`data_prep.store.PatchStore`, normalised.

:class:`SampleReader` is the map function of the pipeline's ``ParallelMapper``. It is picklable (for
process workers): opened stores are dropped on pickling and reopened lazily in each worker.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from data_prep.registry import level_index, sensor_index
from data_prep.store import PatchStore


@dataclass
class StoreTables:
    """Per-store arrays a reader needs (float32 per band; per-patch metadata)."""

    url: str
    sensor: str
    level: str
    good_idx: np.ndarray
    wavelengths: np.ndarray
    fwhm: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    mean: np.ndarray
    inv_std: np.ndarray
    gsd: np.ndarray
    granule_ids: list[str]
    granule: np.ndarray


def tables_from_store(store: PatchStore) -> StoreTables:
    """Read once what every sample of ``store`` needs (stats, band tables, per-patch metadata)."""
    st = store.stats
    std = np.asarray(st.std, dtype=np.float64)
    inv_std = np.where(std > 0, 1.0 / np.where(std > 0, std, 1.0), 1.0)
    return StoreTables(
        url=store.url, sensor=store.sensor, level=store.level,
        good_idx=np.flatnonzero(store.good_bands),
        wavelengths=store.wavelengths_nm.astype(np.float32), fwhm=store.fwhm_nm.astype(np.float32),
        lo=st.p01.astype(np.float32), hi=st.p99.astype(np.float32), mean=st.mean.astype(np.float32),
        inv_std=inv_std.astype(np.float32), gsd=store.meta("gsd").astype(np.float32),
        granule_ids=list(store.attrs.get("granules", {}).keys()), granule=store.meta("granule"),
    )


def normalise(px: np.ndarray, valid: np.ndarray, lo: np.ndarray, hi: np.ndarray, mean: np.ndarray,
              inv_std: np.ndarray) -> np.ndarray:
    """float32 ``(C, H, W)``: clip each band to [lo, hi], then (x - mean) / std; 0 where not valid or NaN."""
    x = px.astype(np.float32)
    b = (slice(None), None, None)
    np.clip(x, lo[b], hi[b], out=x)
    x -= mean[b]
    x *= inv_std[b]
    np.nan_to_num(x, copy=False, nan=0.0)
    if not valid.all():
        x[:, ~valid] = 0.0
    return x


def touched_elements(chunks: tuple[int, ...], band_lo: int, band_hi: int, y0: int, x0: int, size: int) -> int:
    """Elements of the ``patches`` array decoded to read one crop (whole chunks touched, from its chunk shape)."""
    _, cb, cy, cx = chunks

    def span(lo: int, hi: int, c: int) -> int:
        return (math.ceil(hi / c) - lo // c) * c

    return span(band_lo, band_hi, cb) * span(y0, y0 + size, cy) * span(x0, x0 + size, cx)


class SampleReader:
    """Map function: sample task -> sample dict (or a ``{"bad": ...}`` marker if a chunk fails to decode)."""

    def __init__(self, tables: dict[str, StoreTables], crop: int, storage_options: dict | None = None):
        self.tables = tables
        self.crop = crop
        self.storage_options = storage_options
        self._stores: dict[str, PatchStore] = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["_stores"] = {}
        d.pop("_lock")
        return d

    def __setstate__(self, d: dict[str, Any]) -> None:
        self.__dict__.update(d)
        self._lock = threading.Lock()

    def store(self, key: str) -> PatchStore:
        s = self._stores.get(key)
        if s is None:
            with self._lock:
                s = self._stores.get(key)
                if s is None:
                    s = PatchStore(self.tables[key].url, self.storage_options)
                    self._stores[key] = s
        return s

    def __call__(self, task: dict) -> dict:
        t = self.tables[task["key"]]
        i = task["index"]
        sel = t.good_idx[task["w0"]:task["w0"] + task["wn"]]
        b0, b1 = int(sel[0]), int(sel[-1]) + 1
        try:
            px, valid = self.store(task["key"]).read(i, b0, b1, task["y0"], task["x0"], self.crop)
        except Exception as e:  # noqa: BLE001 - any decode/IO failure makes this one sample bad
            return {"bad": True, "url": t.url, "index": i, "error": f"{type(e).__name__}: {e}", "task": task}
        if b1 - b0 != sel.shape[0]:
            px = px[sel - b0]
        x = normalise(px, valid, t.lo[sel], t.hi[sel], t.mean[sel], t.inv_std[sel])
        return {
            "pixels": torch.from_numpy(x),
            "valid": torch.from_numpy(np.ascontiguousarray(valid, dtype=bool)),
            "wavelengths": torch.from_numpy(t.wavelengths[sel]),
            "fwhm": torch.from_numpy(t.fwhm[sel]),
            "sensor": 0 if task["drop"] else sensor_index(t.sensor),
            "level": level_index(t.level),
            "gsd": float(t.gsd[i]),
            "meta": {"url": t.url, "index": i, "granule": _granule(t, i), "epoch": task["epoch"],
                     "step": task["step"], "crop_y": task["y0"], "crop_x": task["x0"],
                     "band_start": task["w0"]},
        }


def _granule(t: StoreTables, i: int) -> str:
    g = int(t.granule[i])
    return t.granule_ids[g] if 0 <= g < len(t.granule_ids) else str(g)

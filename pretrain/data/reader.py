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

from data_prep.dataset import open_store
from data_prep.spectral import inverse_std, normalise_into
from data_prep.store import PatchStore
from pretrain.models.vocab import Vocabulary

from .sampling import Substitutes


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
    return StoreTables(
        url=store.url, sensor=store.sensor, level=store.level,
        good_idx=np.flatnonzero(store.good_bands),
        wavelengths=store.wavelengths_nm.astype(np.float32), fwhm=store.fwhm_nm.astype(np.float32),
        lo=st.p01.astype(np.float32), hi=st.p99.astype(np.float32), mean=st.mean.astype(np.float32),
        inv_std=inverse_std(st.std), gsd=store.meta("gsd").astype(np.float32),
        granule_ids=list(store.attrs.get("granules", {}).keys()), granule=store.meta("granule"),
    )


def touched_elements(chunks: tuple[int, ...], band_lo: int, band_hi: int, y0: int, x0: int, size: int) -> int:
    """Elements of the ``patches`` array decoded to read one crop (whole chunks touched, from its chunk shape)."""
    _, cb, cy, cx = chunks

    def span(lo: int, hi: int, c: int) -> int:
        return (math.ceil(hi / c) - lo // c) * c

    return span(band_lo, band_hi, cb) * span(y0, y0 + size, cy) * span(x0, x0 + size, cx)


SUBSTITUTE_TRIES = 3
"""Substitutes tried for one failed sample before its batch is given up (DataError)."""


class SampleReader:
    """Map function: the task list of one batch -> the batch dict, read and normalised in place.

    A sample whose chunks fail to decode is replaced by a substitute from the same store (see
    :class:`pretrain.data.sampling.Substitutes`; up to :data:`SUBSTITUTE_TRIES` tries), so a batch always
    has its full size. The batch then carries ``"_bad"`` (one ``{"url", "index", "step", "substitute_for",
    "error", "replaced_by"}`` per failed read) for the pipeline to count and log. When more than
    ``max_batch_bad * len(tasks)`` of the batch's own samples fail, or a slot cannot be filled, nothing
    is substituted and the batch carries ``"_fatal"`` (the message of the error to raise) instead.
    ``"_reads"`` is the number of reads tried. Never raises for a decode failure: workers may be processes.
    """

    def __init__(self, tables: dict[str, StoreTables], crop: int, storage_options: dict | None = None, *,
                 substitutes: Substitutes | None = None, max_batch_bad: float = 0.5,
                 vocab: Vocabulary | None = None):
        self.tables = tables
        self.vocab = vocab if vocab is not None else Vocabulary.from_registry()  # batch sensor/level indices
        self.crop = crop
        self.storage_options = storage_options
        self.substitutes = substitutes
        self.max_batch_bad = max_batch_bad
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
                    s = open_store(self.tables[key].url, self.storage_options)
                    self._stores[key] = s
        return s

    def __call__(self, tasks: list[dict]) -> dict:
        t = self.tables[tasks[0]["key"]]  # a batch is one store and one window
        sel = t.good_idx[tasks[0]["w0"]:tasks[0]["w0"] + tasks[0]["wn"]]
        b0, b1 = int(sel[0]), int(sel[-1]) + 1
        lo, hi, mean, inv = t.lo[sel], t.hi[sel], t.mean[sel], t.inv_std[sel]
        c, n = self.crop, len(tasks)
        pixels = torch.empty((n, sel.shape[0], c, c), dtype=torch.float32)
        valid = torch.empty((n, c, c), dtype=torch.bool)
        store = self.store(tasks[0]["key"])
        bad: list[dict] = []
        reads = 0

        def read(j: int, task: dict) -> dict | None:
            """Read ``task`` into slot ``j``; on failure, the entry appended to ``bad``."""
            nonlocal reads
            reads += 1
            try:
                px, v = store.read(task["index"], b0, b1, task["y0"], task["x0"], c)
            except Exception as e:  # noqa: BLE001 - any decode/IO failure makes this one read bad
                bad.append({"url": t.url, "index": task["index"], "step": task["step"],
                            "substitute_for": task.get("replaces"), "error": f"{type(e).__name__}: {e}",
                            "replaced_by": None})
                return bad[-1]
            if b1 - b0 != sel.shape[0]:
                px = px[sel - b0]
            normalise_into(pixels[j], px, v, lo, hi, mean, inv)
            valid[j] = torch.from_numpy(np.asarray(v, dtype=bool))
            return None

        used = list(tasks)
        failed = {j: e for j, task in enumerate(tasks) if (e := read(j, task)) is not None}
        fatal = None
        if failed and (len(failed) > self.max_batch_bad * n or self.substitutes is None):
            fatal = (f"{len(failed)} of the {n} samples of batch step {tasks[0]['step']} failed to decode "
                     f"(more than max_bad_batch_fraction={self.max_batch_bad} allows)")
        else:
            avoid = {task["index"] for task in tasks}
            for j, entry in failed.items():
                for attempt in range(SUBSTITUTE_TRIES):
                    sub = self.substitutes.task(tasks[j], attempt, avoid)  # type: ignore[union-attr]
                    avoid.add(sub["index"])
                    entry["replaced_by"] = sub["index"]
                    entry = read(j, sub)
                    if entry is None:
                        used[j] = sub
                        break
                else:
                    fatal = (f"patch {tasks[j]['index']} of batch step {tasks[0]['step']} failed to decode and "
                             f"so did {SUBSTITUTE_TRIES} substitutes from the same store")
                    break
        if fatal is not None:
            idx = sorted({b["index"] for b in bad})
            return {"_fatal": f"{t.url}: {fatal}; failed patches {idx}; first error: {bad[0]['error']}",
                    "_bad": bad, "_reads": reads}
        batch = {
            "pixels": pixels,
            "wavelengths": torch.from_numpy(t.wavelengths[sel]).expand(n, -1).clone(),
            "fwhm": torch.from_numpy(t.fwhm[sel]).expand(n, -1).clone(),
            "valid": valid,
            "sensor": torch.tensor([0 if k["drop"] else self.vocab.sensor_index(t.sensor) for k in used],
                                   dtype=torch.int64),
            "level": torch.full((n,), self.vocab.level_index(t.level), dtype=torch.int64),
            "gsd": torch.tensor([float(t.gsd[k["index"]]) for k in used], dtype=torch.float32),
            "meta": {
                "url": [t.url] * n,
                "index": [k["index"] for k in used],
                "granule": [_granule(t, k["index"]) for k in used],
                "epoch": [k["epoch"] for k in used],
                "step": [k["step"] for k in used],
                "crop_y": [k["y0"] for k in used],
                "crop_x": [k["x0"] for k in used],
                "band_start": [k["w0"] for k in used],
                "replaces": [k.get("replaces", -1) for k in used],
            },
        }
        if bad:
            batch["_bad"] = bad
        batch["_reads"] = reads
        return batch


def _granule(t: StoreTables, i: int) -> str:
    g = int(t.granule[i])
    return t.granule_ids[g] if 0 <= g < len(t.granule_ids) else str(g)

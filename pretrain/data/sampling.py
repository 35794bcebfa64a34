"""Who reads what: per-store rank shards, the per-batch plan (store, window, crops, dropout).

Every random choice is a pure function of the seed and counters, so the pipeline state is a few
integers and resuming gives exactly the batches an uninterrupted run would have given:

- Subset of a store (``SourceConfig.subset``): the first ``subset`` entries of a permutation seeded
  by (seed, store); the same subset in every epoch.
- Epoch ``e`` of a store: a permutation of its patches (or subset) seeded by (seed, store, e), the same
  on every rank. Rank ``r`` of ``W`` takes the contiguous slice ``[r*m, (r+1)*m)`` with
  ``m = n // W``; it cuts that into ``m // B`` batches of ``B`` samples. The remainder
  (``n - W * B * (m // B)`` patches per store and epoch, a different set each epoch) is dropped so every
  rank has the same number of full batches. Workers only map tasks, so they never overlap.
- Which store the next batch comes from: :class:`torchdata.nodes.MultiNodeWeightedSampler` over the
  per-store shard nodes (seeded by seed and rank; ``ALL_DATASETS_EXHAUSTED`` for finite epochs,
  ``CYCLE_FOREVER`` for an endless stream). A batch holds patches of one store, so it never mixes
  band counts; each sample still carries its own wavelengths and FWHM.
- Band window of step ``s`` on rank ``r``: drawn from (seed, r, s) among the starts
  ``0, stride, 2*stride, ...`` (in good-band indices) that leave a full window; all good bands when
  the store has no more good bands than the window. With ``band_step`` k the window spans
  ``(window - 1) * k + 1`` good bands and takes every k-th (task field ``ws``).
- Crop corner and sensor dropout of a sample: drawn from (seed, store, epoch, patch index).
- Substitute for a sample that fails to decode (:class:`Substitutes`): another patch of the same store
  (its subset, if any), drawn from (seed, store, epoch, step, slot in the batch, attempt), avoiding the
  batch's other patches; its crop and dropout are that patch's own. So a batch keeps its size, a rank
  its batch count, and a resumed run re-draws the very same substitutes.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
from torchdata.nodes import BaseNode

_TAG_SUBSET, _TAG_PERM, _TAG_WINDOW, _TAG_CROP, _TAG_DROP, _TAG_SUB = 11, 12, 13, 14, 15, 16


def store_tag(url: str) -> int:
    """A stable integer for a store URL (seeds its permutations independently of list order)."""
    return zlib.crc32(url.encode())


def _rng(*key: int) -> np.random.Generator:
    words = [int(k) for k in key]
    # the same entropy as the list (each int below 2**32 is one uint32 word), passed as an array: SeedSequence
    # coerces a list of ints one by one in Python (~13 of the ~45 us of a generator; two are made per sample)
    entropy = np.array(words, np.uint32) if all(0 <= w < 1 << 32 for w in words) else words
    return np.random.default_rng(np.random.SeedSequence(entropy))


@dataclass(frozen=True)
class StoreInfo:
    """What planning needs to know about one store (read once at build time)."""

    key: str
    url: str
    tag: int
    n_patches: int
    patch_size: int
    good_idx: np.ndarray
    """Indices of the good bands in the store's band axis."""
    spatial_chunk: int

    @property
    def n_good(self) -> int:
        return int(self.good_idx.shape[0])


def subset_indices(n: int, subset: int | None, seed: int, tag: int) -> np.ndarray:
    """The patches a source draws from: all of them, or a seeded subset of exactly ``subset``."""
    if subset is None:
        return np.arange(n, dtype=np.int64)
    return np.sort(_rng(seed, _TAG_SUBSET, tag).permutation(n)[:subset]).astype(np.int64)


def rank_shard(base: np.ndarray, seed: int, tag: int, epoch: int, rank: int, world_size: int) -> np.ndarray:
    """This rank's slice of epoch ``epoch``'s permutation of ``base`` (equal length on every rank)."""
    perm = base[_rng(seed, _TAG_PERM, tag, epoch).permutation(base.shape[0])]
    m = base.shape[0] // world_size
    return perm[rank * m:(rank + 1) * m]


def window_for(seed: int, rank: int, step: int, n_good: int, window: int, stride: int) -> tuple[int, int]:
    """(start, count) of the band window in good-band indices for batch ``step`` on ``rank``."""
    if n_good <= window:
        return 0, n_good
    n_starts = (n_good - window) // stride + 1
    k = int(_rng(seed, _TAG_WINDOW, rank, step).integers(n_starts))
    return k * stride, window


def crop_for(seed: int, tag: int, epoch: int, index: int, patch_size: int, crop: int, align: int) -> tuple[int, int]:
    """Top-left (y0, x0) of the crop of one sample; both multiples of ``align``."""
    n_pos = (patch_size - crop) // align + 1
    y, x = _rng(seed, _TAG_CROP, tag, epoch, index).integers(n_pos, size=2)
    return int(y) * align, int(x) * align


def dropped(seed: int, tag: int, epoch: int, index: int, p: float) -> bool:
    """Whether this sample's sensor name is dropped (replaced by unknown)."""
    return p > 0 and bool(_rng(seed, _TAG_DROP, tag, epoch, index).random() < p)


def substitute_index(seed: int, tag: int, epoch: int, step: int, slot: int, attempt: int, pool: np.ndarray,
                     avoid: set[int]) -> int:
    """The patch that replaces slot ``slot`` of batch ``step`` after ``attempt`` failed tries (seeded draw
    from ``pool``, skipping ``avoid`` when the pool has anything else)."""
    rng = _rng(seed, _TAG_SUB, tag, epoch, step, slot, attempt)
    i = -1
    for _ in range(64):  # rejection draws; a pool that is mostly in ``avoid`` falls through to the exact draw
        i = int(pool[rng.integers(pool.shape[0])])
        if i not in avoid:
            return i
    rest = np.setdiff1d(pool, np.fromiter(avoid, np.int64, len(avoid)))
    return int(rest[rng.integers(rest.shape[0])]) if rest.size else i


def make_task(info: StoreInfo, *, seed: int, index: int, epoch: int, step: int, slot: int, w0: int, wn: int,
              crop: int, crop_align: int, sensor_dropout: float, ws: int = 1) -> dict:
    """One sample task: store key, patch index, epoch, step, slot, crop corner, window (start ``w0``, span
    ``wn`` good bands, every ``ws``-th of them), dropout flag."""
    align = crop_align or info.spatial_chunk
    y0, x0 = crop_for(seed, info.tag, epoch, index, info.patch_size, crop, align)
    return {"key": info.key, "index": int(index), "epoch": epoch, "step": step, "j": slot, "y0": y0, "x0": x0,
            "w0": w0, "wn": wn, "ws": ws, "drop": dropped(seed, info.tag, epoch, index, sensor_dropout)}


@dataclass
class Substitutes:
    """Draws the replacement task for a sample that failed to decode (picklable: lives in the reader)."""

    infos: dict[str, StoreInfo]
    pools: dict[str, np.ndarray]
    """Per store key: the patches the store draws from (all, or its subset)."""
    seed: int
    crop: int
    crop_align: int
    sensor_dropout: float

    def task(self, failed: dict, attempt: int, avoid: set[int]) -> dict:
        """Replacement for ``failed`` (a task) on try ``attempt`` (0, 1, ...); marks it ``replaces``."""
        info = self.infos[failed["key"]]
        orig = failed.get("replaces", failed["index"])
        i = substitute_index(self.seed, info.tag, failed["epoch"], failed["step"], failed["j"], attempt,
                             self.pools[failed["key"]], avoid)
        t = make_task(info, seed=self.seed, index=i, epoch=failed["epoch"], step=failed["step"], slot=failed["j"],
                      w0=failed["w0"], wn=failed["wn"], crop=self.crop, crop_align=self.crop_align,
                      sensor_dropout=self.sensor_dropout, ws=failed.get("ws", 1))
        t["replaces"] = orig
        return t


class ShardSource(BaseNode[dict]):
    """Batches of patch indices of one store for one rank: ``{"key", "epoch", "indices"}``.

    Finite (``epochs`` passes, then StopIteration) or endless (``epochs=None``). State: epoch and
    position, nothing else.
    """

    def __init__(self, info: StoreInfo, base: np.ndarray, *, batch_size: int, seed: int, rank: int,
                 world_size: int, epochs: int | None):
        super().__init__()
        self.info, self.base = info, base
        self.batch_size, self.seed, self.rank, self.world_size, self.epochs = (
            batch_size, seed, rank, world_size, epochs)
        self.batches_per_epoch = (base.shape[0] // world_size) // batch_size
        self._epoch = 0
        self._pos = 0
        self._shard: np.ndarray | None = None
        self._shard_epoch = -1

    def reset(self, initial_state: dict | None = None) -> None:
        super().reset(initial_state)
        self._epoch = int(initial_state["epoch"]) if initial_state else 0
        self._pos = int(initial_state["pos"]) if initial_state else 0

    def _shard_of(self, epoch: int) -> np.ndarray:
        if self._shard_epoch != epoch:
            self._shard = rank_shard(self.base, self.seed, self.info.tag, epoch, self.rank, self.world_size)
            self._shard_epoch = epoch
        return self._shard  # type: ignore[return-value]

    def next(self) -> dict:
        if self._pos >= self.batches_per_epoch:
            self._epoch += 1
            self._pos = 0
        if self.epochs is not None and self._epoch >= self.epochs:
            self._pos = self.batches_per_epoch
            self._epoch = self.epochs - 1
            raise StopIteration
        shard = self._shard_of(self._epoch)
        b = self.batch_size
        idx = shard[self._pos * b:(self._pos + 1) * b]
        self._pos += 1
        return {"key": self.info.key, "epoch": self._epoch, "indices": idx.tolist()}

    def get_state(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "pos": self._pos}


class PlanNode(BaseNode[list]):
    """Turns each drawn batch of indices into a list of sample tasks with the batch's band window.

    Each task is a small dict: store key, patch index, epoch, step, crop corner, window (start,
    count in good bands), dropout flag. State: the step counter and the sampler's state.
    """

    def __init__(self, source: BaseNode[dict], infos: dict[str, StoreInfo], *, seed: int, rank: int,
                 band_window: int, band_stride: int, crop: int, crop_align: int, sensor_dropout: float,
                 band_step: int = 1):
        super().__init__()
        self.source, self.infos = source, infos
        self.seed, self.rank = seed, rank
        self.band_window, self.band_stride, self.band_step = band_window, band_stride, band_step
        self.crop, self.crop_align, self.sensor_dropout = crop, crop_align, sensor_dropout
        self._step = 0

    def reset(self, initial_state: dict | None = None) -> None:
        super().reset(initial_state)
        if initial_state is not None:
            self._step = int(initial_state["step"])
            self.source.reset(initial_state["source"])
        else:
            self._step = 0
            self.source.reset()

    def next(self) -> list[dict]:
        item = next(self.source)
        info = self.infos[item["key"]]
        step = self._step
        self._step += 1
        span = (self.band_window - 1) * self.band_step + 1
        w0, wn = window_for(self.seed, self.rank, step, info.n_good, span, self.band_stride)
        return [make_task(info, seed=self.seed, index=i, epoch=item["epoch"], step=step, slot=j, w0=w0, wn=wn,
                          crop=self.crop, crop_align=self.crop_align, sensor_dropout=self.sensor_dropout,
                          ws=self.band_step)
                for j, i in enumerate(item["indices"])]

    def get_state(self) -> dict[str, Any]:
        return {"step": self._step, "source": self.source.state_dict()}

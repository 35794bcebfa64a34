"""Mixed batches: any sensor mix in one micro-batch (``DataConfig.mix = "mixed"``), padded, with a band mask.

The contract (also in ``/work/coord/COLOCATED.md``, section 1). ``mix: store`` (the default) gives batches of ONE
store and one band window, without ``band_mask``. ``mix: mixed`` draws every sample of a micro-batch from the
weighted store mixture on its own, each with its own store's band window of that step, so band counts differ
inside the batch:

- ``pixels`` float32 ``[B, Cmax, H, W]``, normalised; sample b's real bands are the PREFIX ``[:C_b]``, padded
  bands are 0. ``Cmax = max_b C_b`` of the batch.
- ``wavelengths`` / ``fwhm`` float32 ``[B, Cmax]`` nm; padded entries are 0 and mean nothing.
- ``band_mask`` bool ``[B, Cmax]``: True = a real band (``C_b`` Trues, then Falses).
- ``valid`` ``[B, H, W]``, ``sensor`` / ``level`` int64 ``[B]`` (vocabulary indices; dropout -> 0), ``gsd``
  float32 ``[B]``: per sample, as in a single-store batch.
- ``meta``: per-sample lists ``url``, ``index``, ``granule``, ``epoch``, ``step``, ``crop_y``, ``crop_x``,
  ``band_start``, ``replaces`` and ``n_bands`` (``C_b``).
- ``normalise_on="device"`` batches carry ``raw`` ``[B, Cmax, H, W]`` (FP16) and ``norm`` ``[B, 4, Cmax]`` instead of
  ``pixels``; their padded entries are 0, so normalising them gives 0.

A batch without ``band_mask`` means every band is real. Every model part honours the mask exactly (a padded band
contributes nothing: ``tests/pretrain/test_mixed_batch.py`` shows a sample's tokens equal its tokens alone to
fp32 rounding, max |diff| ~1e-6 for the debug model). The recipe options too: spectral masking
(``band_mask_ratio``) hides ``round(ratio * C_b)`` of each sample's own real bands, the band-condition
decorrelation term and the training instruments count only real bands (garbage in the padding moves none of them).

Pipeline (``torchdata.nodes``, like the single-store one)::

    ShardSource per store (batches of 1) --> MultiNodeWeightedSampler --> Batcher(B, drop_last)
        --> MixedPlanNode --> ParallelMapper(MixedReader) --> Prefetcher --> Collate --> Loader

Sharding, epochs and exact resume are the single-store loader's (:mod:`pretrain.data.sampling`): per-store
permutations per epoch, rank r's contiguous slice, one sample per draw of the weighted sampler (seeded by seed and
rank), the band window of store s at step t drawn from (seed, rank, t) among s's good bands, crops and dropout per
(seed, store, epoch, patch). Every rank yields ``floor(sum_s |shard_s| x epochs / B)`` batches (the same on every
rank). The reader reads each store's samples of a batch together (the single-store :class:`SampleReader`), so a
sample that fails to decode is replaced by a seeded substitute from its own store, and the batch is assembled in
slot order with one copy per sample into the padded tensor.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torchdata.nodes import BaseNode, Batcher, MultiNodeWeightedSampler, StopCriteria

from .reader import SampleReader
from .sampling import PlanNode, ShardSource, StoreInfo, make_task, window_for

MODES = ("store", "mixed")

#: keys of a reader batch holding one row per sample, and the axis of their bands (None: no band axis)
_BAND_AXIS = {"pixels": 1, "raw": 1, "wavelengths": 1, "fwhm": 1, "norm": 2, "valid": None, "sensor": None,
              "level": None, "gsd": None}


def assemble(parts: list[tuple[list[int], dict]], n: int) -> dict[str, Any]:
    """One padded batch of ``n`` samples from reader batches, each the batch of some slots of it.

    ``parts``: ``[(slots, batch), ...]``; every slot 0..n-1 appears once. Tensors with a band axis are padded to the
    largest band count with zeros, ``band_mask`` says which entries are real, ``meta`` lists are put back in slot
    order (plus ``n_bands``). Non-tensor bookkeeping (``_bad``, ``_reads``) is merged by the caller."""
    cmax = max(int(b["wavelengths"].shape[1]) for _, b in parts)
    ref = parts[0][1]
    out: dict[str, Any] = {}
    for key, axis in _BAND_AXIS.items():
        if key not in ref:
            continue
        t = ref[key]
        shape = list(t.shape)
        shape[0] = n
        if axis is not None:
            shape[axis] = cmax
        out[key] = torch.zeros(shape, dtype=t.dtype)
    mask = torch.zeros(n, cmax, dtype=torch.bool)
    meta: dict[str, list] = {k: [None] * n for k in ref["meta"]}
    meta["n_bands"] = [0] * n
    for slots, b in parts:
        idx = torch.as_tensor(slots, dtype=torch.long)
        c = int(b["wavelengths"].shape[1])
        for key, axis in _BAND_AXIS.items():
            if key not in out:
                continue
            if axis is None:
                out[key][idx] = b[key]
            elif axis == 1:
                out[key][idx, :c] = b[key]
            else:
                out[key][idx, :, :c] = b[key]
        mask[idx, :c] = True
        for k, vals in b["meta"].items():
            for j, v in zip(slots, vals):
                meta[k][j] = v
        for j in slots:
            meta["n_bands"][j] = c
    out["band_mask"] = mask
    out["meta"] = meta
    return out


class MixedPlanNode(PlanNode):
    """Batches of drawn samples -> task lists; each sample gets its own store's band window of this step.

    State: the step counter and the source's state (:class:`~pretrain.data.sampling.PlanNode`'s)."""

    def next(self) -> list[dict]:
        items = next(self.source)
        step = self._step
        self._step += 1
        tasks = []
        for j, item in enumerate(items):
            info = self.infos[item["key"]]
            w0, wn = window_for(self.seed, self.rank, step, info.n_good, self.band_window, self.band_stride)
            tasks.append(make_task(info, seed=self.seed, index=item["indices"][0], epoch=item["epoch"], step=step,
                                   slot=j, w0=w0, wn=wn, crop=self.crop, crop_align=self.crop_align,
                                   sensor_dropout=self.sensor_dropout))
        return tasks


class MixedReader:
    """Map function: a mixed task list -> one padded batch (see the module docstring).

    The samples of each store (one window per store and step) are read together by the single-store
    :class:`~pretrain.data.reader.SampleReader` (its substitution, limits and bookkeeping), then assembled in slot
    order. ``_reads`` is a dict ``{url: reads tried}`` (a batch touches several stores). Picklable."""

    def __init__(self, reader: SampleReader):
        self.reader = reader

    def __call__(self, tasks: list[dict]) -> dict:
        groups: dict[tuple, list[int]] = {}
        for j, t in enumerate(tasks):
            groups.setdefault((t["key"], t["w0"], t["wn"]), []).append(j)
        parts, bad, reads = [], [], {}
        for slots in groups.values():
            b = self.reader([tasks[j] for j in slots])
            url = self.reader.tables[tasks[slots[0]]["key"]].url
            reads[url] = reads.get(url, 0) + b.pop("_reads")
            bad += b.pop("_bad", [])
            if "_fatal" in b:
                return {"_fatal": b["_fatal"], "_bad": bad, "_reads": reads}
            parts.append((slots, b))
        out = assemble(parts, len(tasks))
        if bad:
            out["_bad"] = bad
        out["_reads"] = reads
        return out


def mixed_sources(infos: dict[str, StoreInfo], bases: dict[str, np.ndarray], weights: dict[str, float], *,
                  batch_size: int, seed: int, rank: int, world_size: int, epochs: int | None
                  ) -> tuple[BaseNode[list], int]:
    """Per-store shards of single samples under one weighted sampler, batched: (node, samples per epoch)."""
    sources, total = {}, 0
    for key, info in infos.items():
        src = ShardSource(info, bases[key], batch_size=1, seed=seed, rank=rank, world_size=world_size, epochs=epochs)
        total += src.batches_per_epoch
        sources[key] = src
    stop = StopCriteria.ALL_DATASETS_EXHAUSTED if epochs else StopCriteria.CYCLE_FOREVER
    sampler = MultiNodeWeightedSampler(sources, weights, stop_criteria=stop, rank=rank, world_size=world_size,
                                       seed=seed)
    return Batcher(sampler, batch_size=batch_size, drop_last=True), total

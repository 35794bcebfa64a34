"""The streaming pipeline: a ``torchdata.nodes`` graph from patch stores to batches, resumable exactly.

Graph (one per rank)::

    ShardSource per store --> MultiNodeWeightedSampler --> PlanNode (task list of one batch)
        --> ParallelMapper(SampleReader, threads|processes, in order) --> Collate (bad-sample count)
        --> Prefetcher [--> PinMemory] --> Loader

Workers map whole batches: each reads its batch's crops and normalises them straight into the
batch tensor (no per-sample float32 copies, no stacking); ``num_workers`` batches are in flight.

Every node snapshots its source after each item, so the state of a mid-epoch loader is the exact
position of the last batch handed out; resuming re-reads nothing that was already delivered.
See :mod:`pretrain.data.sampling` for the sharding, mixture, window, crop and dropout rules.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from torchdata.nodes import (
    BaseNode,
    Loader,
    MultiNodeWeightedSampler,
    ParallelMapper,
    PinMemory,
    Prefetcher,
    StopCriteria,
)

from data_prep.store import PatchStore, StoreError

from .config import DataConfig, DataError
from .reader import SampleReader, StoreTables, tables_from_store
from .sampling import PlanNode, ShardSource, StoreInfo, store_tag, subset_indices

log = logging.getLogger(__name__)


class Collate(BaseNode[dict]):
    """Counts samples whose chunks failed to decode (the reader left them out) and logs the first.

    A batch whose samples all failed is skipped. Raises :class:`DataError` once more than
    ``max(1, max_bad_fraction * attempted)`` samples have failed (``max_bad_fraction == 0``: the first).
    """

    def __init__(self, source: BaseNode[list], max_bad_fraction: float):
        super().__init__()
        self.source = source
        self.max_bad_fraction = max_bad_fraction
        self.seen = 0
        self.bad = 0
        self._logged = False

    def reset(self, initial_state: dict | None = None) -> None:
        super().reset(initial_state)
        if initial_state is not None:
            self.seen, self.bad = int(initial_state["seen"]), int(initial_state["bad"])
            self.source.reset(initial_state["source"])
        else:
            self.seen = self.bad = 0
            self.source.reset()

    def next(self) -> dict:
        while True:
            batch = next(self.source)
            self.seen += batch.pop("_attempted")
            for s in batch.pop("_bad", []):
                self.bad += 1
                msg = f"skipping patch {s['index']} of {s['url']}: {s['error']}"
                if not self._logged:
                    log.warning("%s (further bad samples are counted, not logged)", msg)
                    self._logged = True
                else:
                    log.debug(msg)
                allowed = max(1.0, self.max_bad_fraction * self.seen) if self.max_bad_fraction > 0 else 0.0
                if self.bad > allowed:
                    raise DataError(
                        f"{self.bad} of {self.seen} samples failed to decode, more than max_bad_fraction="
                        f"{self.max_bad_fraction} allows; last: {msg}")
            if batch["pixels"] is not None:
                return batch

    def get_state(self) -> dict[str, Any]:
        return {"seen": self.seen, "bad": self.bad, "source": self.source.state_dict()}


def _to_plain(obj: Any) -> Any:
    """State with tensors turned into tagged lists, so it is JSON- and weights_only-safe."""
    if isinstance(obj, torch.Tensor):
        return {"__tensor__": str(obj.dtype).removeprefix("torch."), "data": obj.tolist()}
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_to_plain(v) for v in obj]
    return obj


def _from_plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj and set(obj) == {"__tensor__", "data"}:
            return torch.tensor(obj["data"], dtype=getattr(torch, obj["__tensor__"]))
        return {k: _from_plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_from_plain(v) for v in obj]
    return obj


class SpecLoader:
    """Iterable of batches for one rank, with ``state_dict()`` / ``load_state_dict()`` for exact resume.

    ``state_dict()`` returns plain dicts, lists, ints, floats, bools and strings (JSON-safe, loads with
    ``torch.load(weights_only=True)``). It describes the position after the last batch handed out.
    One pass of ``for batch in loader`` gives ``cfg.epochs`` epochs (or never ends when None).
    """

    def __init__(self, cfg: DataConfig, rank: int, world_size: int, root: BaseNode, collate_node: Collate,
                 num_batches: int | None, infos: dict[str, StoreInfo]):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self._collate = collate_node
        self.num_batches = num_batches
        """Batches one pass yields on this rank (None when endless); fewer if whole batches fail to decode."""
        self.stores = infos
        self._loader = Loader(root)

    def __iter__(self):
        return iter(self._loader)

    def state_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "world_size": self.world_size, "loader": _to_plain(self._loader.state_dict())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state.get("rank"), state.get("world_size")) != (self.rank, self.world_size):
            raise DataError(f"loader state is for rank {state.get('rank')} of {state.get('world_size')}, "
                            f"this loader is rank {self.rank} of {self.world_size}")
        self._loader.load_state_dict(_from_plain(state["loader"]))

    @property
    def bad_samples(self) -> int:
        """Samples skipped so far because a chunk failed to decode."""
        return self._collate.bad

    @property
    def samples_seen(self) -> int:
        return self._collate.seen


def _open(cfg: DataConfig) -> tuple[dict[str, StoreInfo], dict[str, StoreTables], dict[str, np.ndarray], dict]:
    infos, tables, bases, weights = {}, {}, {}, {}
    for k, src in enumerate(cfg.sources):
        if src.weight == 0:
            continue
        try:
            store = PatchStore(src.url, cfg.storage_options)
            if len(store) == 0:
                raise DataError(f"{src.url}: the store is empty (n_patches = 0)")
            tab = tables_from_store(store)
        except StoreError as e:
            raise DataError(f"source {k} ({src.url}): {e}") from None
        chunks = store.chunks
        key = f"{k}:{store.sensor}_{store.level}"
        if cfg.crop > store.patch_size:
            raise DataError(f"{src.url}: crop {cfg.crop} is larger than the patch size {store.patch_size}")
        if not tab.good_idx.size:
            raise DataError(f"{src.url}: no good bands")
        tag = store_tag(src.url)
        if src.subset is not None and src.subset > len(store):
            raise DataError(f"{src.url}: subset of {src.subset} patches asked, the store has {len(store)}")
        infos[key] = StoreInfo(key=key, url=src.url, tag=tag, n_patches=len(store), patch_size=store.patch_size,
                               good_idx=tab.good_idx, spatial_chunk=int(chunks[2]))
        tables[key] = tab
        bases[key] = subset_indices(len(store), src.subset, cfg.seed, tag)
        weights[key] = float(src.weight)
    if max(i.n_good for i in infos.values()) < cfg.band_window:
        raise DataError(f"band_window {cfg.band_window} is longer than every source's good bands: "
                        + ", ".join(f"{i.url}: {i.n_good}" for i in infos.values()))
    return infos, tables, bases, weights


def build_plan(cfg: DataConfig, rank: int = 0, world_size: int = 1,
               _opened: tuple | None = None) -> tuple[PlanNode, dict[str, StoreInfo], int | None]:
    """The planning half of the graph (no pixel reads): a node yielding lists of sample tasks."""
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is not in [0, world_size={world_size})")
    infos, _, bases, weights = _opened or _open(cfg)
    sources = {}
    total = 0
    for key, info in infos.items():
        src = ShardSource(info, bases[key], batch_size=cfg.batch_size, seed=cfg.seed, rank=rank,
                          world_size=world_size, epochs=cfg.epochs)
        if src.batches_per_epoch == 0:
            raise DataError(f"{info.url}: {bases[key].shape[0]} patches cannot give one batch of {cfg.batch_size} "
                            f"to each of {world_size} ranks")
        total += src.batches_per_epoch
        sources[key] = src
    stop = StopCriteria.ALL_DATASETS_EXHAUSTED if cfg.epochs else StopCriteria.CYCLE_FOREVER
    sampler = MultiNodeWeightedSampler(sources, weights, stop_criteria=stop, rank=rank, world_size=world_size,
                                       seed=cfg.seed)
    plan = PlanNode(sampler, infos, seed=cfg.seed, rank=rank, band_window=cfg.band_window,
                    band_stride=cfg.band_stride, crop=cfg.crop, crop_align=cfg.crop_align,
                    sensor_dropout=cfg.sensor_dropout)
    return plan, infos, (total * cfg.epochs if cfg.epochs else None)


def build_loader(cfg: DataConfig, rank: int = 0, world_size: int = 1) -> SpecLoader:
    """Open and check every source (DataError before any batch), then build this rank's pipeline."""
    opened = _open(cfg)
    plan, infos, num_batches = build_plan(cfg, rank, world_size, _opened=opened)
    tables = opened[1]
    reader = SampleReader(tables, cfg.crop, cfg.storage_options)
    node: BaseNode = ParallelMapper(plan, reader, num_workers=cfg.num_workers, in_order=True,
                                    method=cfg.worker_type,
                                    multiprocessing_context="spawn" if cfg.worker_type == "process" else None)
    coll = Collate(node, cfg.max_bad_fraction)
    node = Prefetcher(coll, prefetch_factor=cfg.prefetch)
    if cfg.pin_memory and torch.cuda.is_available():
        node = PinMemory(node)
    return SpecLoader(cfg, rank, world_size, node, coll, num_batches, infos)

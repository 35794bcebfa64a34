"""The streaming pipeline: a ``torchdata.nodes`` graph from patch stores to batches, resumable exactly.

Graph (one per rank)::

    ShardSource per store --> MultiNodeWeightedSampler --> PlanNode (task list of one batch)
        --> ParallelMapper(SampleReader, threads|processes, in order) [--> CopyOut (processes)] --> Prefetcher
        --> Collate (bad-read count, logs, limits) [--> PinMemory] --> Loader

Chunks that fail to decode never change the number or size of batches (ranks stay in step): the reader
replaces a failed sample by a seeded substitute from the same store (:class:`SampleReader`), each failure is
logged with store, patch and error, and :class:`Collate` raises :class:`DataError` past the configured
limits. A reader process that dies is caught by :class:`WorkerWatchdog` (:class:`LoaderWorkerError`).
Process workers use the ``spawn`` context: a launching script needs the ``if __name__ == "__main__":`` guard.

Workers map whole batches: each decodes its batch's crops straight into the batch tensor (no per-sample
copies, no stacking) and, with ``normalise_on="workers"``, normalises them there; with ``"device"`` they
deliver the stored FP16 values and :class:`SpecLoader` normalises on the GPU. ``num_workers`` batches are in
flight. No batch tensor is a fresh allocation (whose pages the kernel would fault in and zero every batch):
thread workers decode into reused batch buffers, each written again only once nothing references it; process
workers decode into a few reused shared-memory slots each, which :class:`CopyOut` lends to the consumer as they
are (no copy; a slot is written again only once nothing references the consumer's tensors of it) or, on a GPU host
with ``pin_memory``, copies into pinned memory (:class:`pretrain.data.reader.BatchBuffers`). :meth:`SpecLoader.close` stops the threads and processes of a loader
that is no longer needed.

Every node snapshots its source after each item, so the state of a mid-epoch loader is the exact
position of the last batch handed out; resuming re-reads nothing that was already delivered.
See :mod:`pretrain.data.sampling` for the sharding, mixture, window, crop and dropout rules.
"""

from __future__ import annotations

import collections
import logging
import signal
import threading
import time
import weakref
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

from data_prep.store import StoreError
from pretrain.models.vocab import Vocabulary

from .config import DataConfig, DataError, LoaderWorkerError
from .reader import BatchBuffers, SampleReader, StoreTables, finish_batch, open_store, tables_from_store
from .sampling import PlanNode, ShardSource, StoreInfo, Substitutes, store_tag, subset_indices

log = logging.getLogger(__name__)


STATE_FORMAT = 2
"""Version of :meth:`SpecLoader.state_dict` (2: substitutes, per-store counts, Collate after Prefetcher)."""

SHARED_SLOTS_PER_WORKER = 3
"""Shared-memory batch slots each reader process reuses for the batches it decodes and sends
(:class:`pretrain.data.reader.BatchBuffers`): the mapper keeps ~2 batches per worker in flight, one more covers the
hand-over. A worker has ``local_slots(0, prefetch)`` more for the batches :class:`CopyOut` lends to the consumer
(none when they are copied into pinned memory). Slots are made when first needed: more only cost /dev/shm
(26 MB a slot for 8 x 100 x 128 x 128 FP16)."""


def local_slots(num_workers: int, prefetch: int) -> int:
    """Reused in-process batch buffers (:class:`pretrain.data.reader.BatchBuffers`, ``shared=False``) that cover
    every batch alive at once: ``2 * num_workers`` in the mapper, ``prefetch`` queued, one the Prefetcher thread is
    putting and two the consumer may hold (the current batch and the last one, while the next is fetched). A
    batch held longer only makes the pool hand out fresh tensors; an idle slot costs its memory (26 MB for
    8 x 100 x 128 x 128 FP16)."""
    return 2 * num_workers + prefetch + 3

_WARN_PER_STORE = 5
"""Failed reads of one store logged at WARNING (each naming the patch, error and substitute); then DEBUG."""


class Collate(BaseNode[dict]):
    """Counts and logs reads that failed to decode (the reader substituted them) and enforces the limits.

    Raises :class:`DataError` naming the store, the patch indices and the first error when a batch came
    back ``_fatal`` (more than ``max_bad_batch_fraction`` of it failed, or a slot could not be filled), or
    once a store's failed reads exceed ``max(1, max_bad_fraction * reads tried from it)``
    (``max_bad_fraction == 0``: the first). Under ``torchrun`` the exception ends this rank with a
    non-zero exit and the agent stops the others. Raises :class:`LoaderWorkerError` when the
    :class:`WorkerWatchdog` saw a reader process die. Counts are part of the state (exact resume).
    """

    def __init__(self, source: BaseNode[dict], max_bad_fraction: float, watchdog: WorkerWatchdog | None = None):
        super().__init__()
        self.source = source
        self.max_bad_fraction = max_bad_fraction
        self.watchdog = watchdog
        self.delivered = 0
        self.reads: dict[str, int] = {}
        self.bad: dict[str, int] = {}
        self._bad_idx: dict[str, list[int]] = {}
        self._first_error: dict[str, str] = {}

    def reset(self, initial_state: dict | None = None) -> None:
        super().reset(initial_state)
        if self.watchdog is not None:
            self.watchdog.stop()
        self._bad_idx, self._first_error = {}, {}
        if initial_state is not None:
            self.delivered = int(initial_state["delivered"])
            self.reads = {k: int(v) for k, v in initial_state["reads"].items()}
            self.bad = {k: int(v) for k, v in initial_state["bad"].items()}
            self.source.reset(initial_state["source"])
        else:
            self.delivered, self.reads, self.bad = 0, {}, {}
            self.source.reset()
        if self.watchdog is not None:
            self.watchdog.start()

    def _check_workers(self) -> None:
        if self.watchdog is not None and self.watchdog.error is not None:
            raise LoaderWorkerError(self.watchdog.error)

    def next(self) -> dict:
        self._check_workers()
        try:
            batch = next(self.source)
        except StopIteration:
            self._check_workers()  # the watchdog ends a stuck mapper this way
            raise
        reads = batch.pop("_reads")
        bad = batch.pop("_bad", [])
        fatal = batch.pop("_fatal", None)
        if not isinstance(reads, dict):  # a single-store batch; mixed and co-located ones count per store
            reads = {bad[0]["url"] if bad else batch["meta"]["url"][0]: reads}
        for url, r in reads.items():
            self.reads[url] = self.reads.get(url, 0) + r
        for s in bad:
            self._count(s)
        if fatal is not None:
            raise DataError(fatal)
        for url in reads:
            n = self.bad.get(url, 0)
            allowed = max(1.0, self.max_bad_fraction * self.reads[url]) if self.max_bad_fraction > 0 else 0.0
            if n > allowed:
                raise DataError(
                    f"{url}: {n} of {self.reads[url]} reads failed to decode, more than max_bad_fraction="
                    f"{self.max_bad_fraction} allows; failed patches (this run) "
                    f"{sorted(set(self._bad_idx[url]))[:50]}; first error: {self._first_error[url]}")
        self.delivered += batch_size(batch)
        return batch

    def _count(self, s: dict) -> None:
        url = s["url"]
        k = self.bad[url] = self.bad.get(url, 0) + 1
        self._bad_idx.setdefault(url, []).append(s["index"])
        self._first_error.setdefault(url, f"patch {s['index']}: {s['error']}")
        sub = f"replaced by patch {s['replaced_by']}" if s["replaced_by"] is not None else "not replaced"
        what = f"substitute for patch {s['substitute_for']}, " if s.get("substitute_for") is not None else ""
        msg = f"{url}: patch {s['index']} ({what}batch step {s['step']}) failed to decode, {sub}: {s['error']}"
        if k <= _WARN_PER_STORE:
            tail = "; further failures of this store are logged at DEBUG" if k == _WARN_PER_STORE else ""
            log.warning("%s%s", msg, tail)
        else:
            log.debug(msg)

    def get_state(self) -> dict[str, Any]:
        return {"delivered": self.delivered, "reads": dict(self.reads), "bad": dict(self.bad),
                "source": self.source.state_dict()}


class _Lease:
    """One shared-memory slot lent to the consumer (:class:`CopyOut`): clears the slot's busy flag once both of the
    consumer's tensors of it (``raw``/``pixels`` and ``valid``) are gone, and counts the worker's lent slots."""

    __slots__ = ("flag", "worker", "lent", "lock", "alive")

    def __init__(self, flag: torch.Tensor, worker: int, lent: dict[int, int], lock: threading.RLock):
        self.flag, self.worker, self.lent, self.lock, self.alive = flag, worker, lent, lock, 2

    def drop(self) -> None:
        with self.lock:
            self.alive -= 1
            if self.alive:
                return
            self.lent[self.worker] = self.lent.get(self.worker, 1) - 1
        self.flag[0] = 0  # the worker may write the slot again


class CopyOut(BaseNode[dict]):
    """Hands a process worker's batch out of its reused shared-memory slot: lent without a copy, or copied out.

    Process workers decode into :class:`pretrain.data.reader.BatchBuffers` slots; this node runs in the training
    process, between the mapper and the Prefetcher (on the Prefetcher's thread). A batch with a slot is

    - *lent* (``lend > 0``, unpinned): its ``raw``/``pixels`` and ``valid`` become tensors viewing the slot itself,
      each owned by a numpy view of the slot (``torch.from_numpy``, as the in-process pools do), so every tensor or
      view the consumer makes of them keeps that owner alive; when the last is gone (its reference count; nothing
      the consumer must do) the slot's busy flag is cleared and the worker may write it again. At most ``lend``
      slots of one worker are lent at once; the worker has that many slots more than the
      :data:`SHARED_SLOTS_PER_WORKER` it decodes and sends in. Measured (process/1, 2-core box): the copy it
      replaces cost 4-6 ms of CPU per 26 MB batch (~0.6 ms of ~13 per sample) on the Prefetcher's thread.
    - *copied* (``pin``: into pinned memory, the copy a GPU host makes anyway; or when ``lend`` slots of its worker
      are already lent, e.g. batches the consumer keeps): into tensors of this process (reused buffers,
      :class:`pretrain.data.reader.BatchBuffers` ``shared=False``, unless pinned), and the flag is cleared at once.

    Either way no slot is written while the consumer can still read it, and the node never waits for one: a
    worker whose slots are all busy sends fresh shared memory instead (:class:`BatchBuffers`). The small
    per-sample arrays the worker sent inline (numpy) become tensors again. A batch without a slot passes through.
    Its state is its source's, unchanged (the node keeps nothing).

    It keeps the last ``hold`` slots' tensors referenced, so that a slot coming back is found in
    ``torch.multiprocessing``'s cache of shared storages, already mapped, instead of being mapped (and its pages
    faulted in) again for every batch.
    """

    def __init__(self, source: BaseNode[dict], pin: bool = False, hold: int = 0, slots: int = 0, lend: int = 0):
        super().__init__()
        self.source = source
        self.pin = pin
        self.lend = 0 if pin else lend
        # copies go into reused buffers (BatchBuffers, shared=False): a fresh 26 MB tensor per batch had its
        # pages faulted in each time; pinned ones come from torch's caching host allocator
        self._out = BatchBuffers(slots, shared=False) if slots > 0 and not pin else None
        self._held: collections.deque = collections.deque(maxlen=max(hold, 1))
        # re-entrant: a lease may be dropped by the cyclic garbage collector, which an allocation on this very
        # thread can start while it holds the lock
        self._lock = threading.RLock()
        self._lent: dict[int, int] = {}  # worker pid -> its slots lent now (a new dict per reset)

    def reset(self, initial_state: dict | None = None) -> None:
        super().reset(initial_state)
        self._held.clear()  # the workers (and their slots) are replaced
        self._lent = {}  # leases of the old workers' slots count in the old dict
        self.source.reset(initial_state)

    def lent(self) -> int:
        """Slots lent to the consumer now (all workers)."""
        with self._lock:
            return sum(self._lent.values())

    def _lease(self, flag: torch.Tensor, worker: int) -> _Lease | None:
        lease = _Lease(flag, worker, self._lent, self._lock)  # made first: no allocation between count and update
        with self._lock:
            n = self._lent.get(worker, 0)
            if n >= self.lend:
                return None
            self._lent[worker] = n + 1
        return lease

    def next(self) -> dict:
        batch = next(self.source)
        release = batch.pop("_release", None)
        if release is not None:
            flag, worker = release
            px_key = "raw" if "raw" in batch else "pixels"
            t_px, t_va = batch[px_key], batch["valid"]
            self._held.append((flag, t_px, t_va))
            lease = self._lease(flag, worker)
            if lease is not None:  # the consumer's tensors view the slot; the last one gone frees it
                for k, t in ((px_key, t_px), ("valid", t_va)):
                    owner = t.numpy()
                    batch[k] = torch.from_numpy(owner)
                    weakref.finalize(owner, lease.drop).atexit = False
            else:
                if self._out is not None:
                    out_px, out_va, _ = self._out.take(tuple(t_px.shape), t_px.dtype)
                else:
                    out_px = torch.empty(t_px.shape, dtype=t_px.dtype, pin_memory=self.pin)
                    out_va = torch.empty(t_va.shape, dtype=t_va.dtype, pin_memory=self.pin)
                for k, t, out in ((px_key, t_px, out_px), ("valid", t_va, out_va)):
                    np.copyto(out.numpy(), t.numpy())  # one thread: torch's copy_ spun its intra-op pool (4x CPU)
                    batch[k] = out
                flag[0] = 0
            for k, v in batch.items():
                if isinstance(v, np.ndarray):  # the small tensors, sent inline (SampleReader)
                    batch[k] = torch.from_numpy(v)
        return batch

    def get_state(self) -> dict[str, Any]:
        return self.source.state_dict()


def batch_size(batch: dict) -> int:
    """Samples in a batch: single-store, mixed (``pixels`` or ``raw``) or co-located (``location``)."""
    for k in ("pixels", "raw", "location"):
        if k in batch:
            return int(batch[k].shape[0])
    raise KeyError("batch has none of pixels, raw, location")


class WorkerWatchdog:
    """Stops the pipeline when a reader worker process dies, instead of letting it wait forever.

    torchdata 0.11's ``ParallelMapper`` has no timeout or liveness check: a worker process killed
    mid-batch (OOM killer, SIGKILL, a segfault in a codec) leaves its batch missing and the in-order
    mapper waits for it forever (with ``torchrun`` every other rank then hangs in a collective). This
    thread polls the worker processes every ``poll_s``; when one has exited with a non-zero code it
    records which and sets the mapper's stop event, so the mapper's ``next`` ends and :class:`Collate`
    raises :class:`LoaderWorkerError` naming the worker, pid and exit code. It reads torchdata's private
    attributes (``ParallelMapper._it._it._workers`` / ``._stop``); if they are not found (another
    torchdata version) it logs a warning and guards nothing. Thread workers cannot die silently (an
    exception in the map function is re-raised by torchdata), so only process workers are watched.
    """

    def __init__(self, mapper: ParallelMapper, poll_s: float = 0.2):
        self.mapper = mapper
        self.poll_s = poll_s
        self.error: str | None = None
        self._halt: threading.Event | None = None

    def _target(self) -> tuple[list, threading.Event] | None:
        it = getattr(getattr(self.mapper, "_it", None), "_it", None)
        procs, stop = getattr(it, "_workers", None), getattr(it, "_stop", None)
        if not isinstance(procs, list) or not isinstance(stop, threading.Event):
            return None
        return procs, stop

    def start(self) -> None:
        self.error = None
        target = self._target()
        if target is None:
            log.warning("torchdata ParallelMapper internals not found: reader worker processes are not watched, "
                        "a dead worker would hang the loader")
            return
        self._halt = threading.Event()
        threading.Thread(target=self._watch, args=(*target, self._halt), daemon=True,
                         name="specfm-loader-watchdog").start()

    def stop(self) -> None:
        if self._halt is not None:
            self._halt.set()
            self._halt = None

    def _watch(self, procs: list, stop: threading.Event, halt: threading.Event) -> None:
        while not halt.wait(self.poll_s):
            if stop.is_set():  # the mapper is shutting down: workers exit on their own
                return
            for k, p in enumerate(procs):
                code = p.exitcode
                if code is not None and code != 0:
                    why = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
                    self.error = (f"data loader reader worker process {k} (pid {p.pid}) died ({why}; e.g. the "
                                  f"out-of-memory killer); its batch is lost, so the loader stops instead of "
                                  f"waiting forever. Restart from the last checkpoint.")
                    stop.set()
                    return


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

    ``for batch in loader`` yields training batches on :attr:`device` (normalised float32 ``pixels``; see
    :func:`pretrain.data.finish_batch`). On a CUDA device the next batch's copy (from pinned memory,
    ``non_blocking``) and normalisation run on a side stream while the current step computes: the loader reads
    one batch ahead, and ``state_dict()`` still describes the position after the last batch *handed out*.
    :meth:`batches` gives the pipeline's own CPU batches (``raw`` + ``norm`` when ``normalise_on`` is device).

    ``state_dict()`` returns plain dicts, lists, ints, floats, bools and strings (JSON-safe, loads with
    ``torch.load(weights_only=True)``). One pass of ``for batch in loader`` gives ``cfg.epochs`` epochs (or never
    ends when None). :attr:`data_wait_s` adds up the seconds the consumer spent blocked on the pipeline.
    """

    def __init__(self, cfg: DataConfig, rank: int, world_size: int, root: BaseNode, collate_node: Collate,
                 num_batches: int | None, infos: dict[str, StoreInfo], device: torch.device | None = None,
                 normalise_on: str = "workers"):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self._collate = collate_node
        self.num_batches = num_batches
        """Batches one pass yields on this rank (None when endless), each of ``batch_size`` samples; the same
        on every rank, whatever fails to decode (failed samples are substituted or the loader raises)."""
        self.stores = infos
        self.device = device if device is not None else torch.device("cpu")
        self.normalise_on = normalise_on
        """``workers`` or ``device``: where the pixels are normalised (``DataConfig.normalise_on`` resolved)."""
        self.data_wait_s = 0.0
        self._loader = Loader(root)
        self._state: dict | None = None  # the handed-out position while reading ahead (CUDA)

    def batches(self):
        """The pipeline's batches as the workers made them, on the CPU (no device copy, no normalisation)."""
        return iter(self._loader)

    def _next(self, it) -> dict:
        t = time.perf_counter()
        try:
            return next(it)
        finally:
            self.data_wait_s += time.perf_counter() - t

    def __iter__(self):
        it = iter(self._loader)
        self._state = None
        if self.device.type != "cuda":
            while True:
                try:
                    b = self._next(it)
                except StopIteration:
                    return
                yield finish_batch(b, self.device) if self.normalise_on == "device" else b
        stream = torch.cuda.Stream(device=self.device)

        def fetch() -> tuple[dict, dict] | None:
            try:
                b = self._next(it)
            except StopIteration:
                return None
            state = self._loader.state_dict()
            with torch.cuda.stream(stream):
                return finish_batch(b, self.device, non_blocking=True), state

        nxt = fetch()
        while nxt is not None:
            batch, state = nxt
            cur = torch.cuda.current_stream(self.device)
            cur.wait_stream(stream)
            for v in batch.values():
                if isinstance(v, torch.Tensor):
                    v.record_stream(cur)
            nxt = fetch()  # the next copy overlaps the consumer's step on this batch
            self._state = state
            yield batch

    def state_dict(self) -> dict[str, Any]:
        st = self._state if self._state is not None else self._loader.state_dict()
        return {"format": STATE_FORMAT, "rank": self.rank, "world_size": self.world_size,
                "loader": _to_plain(st)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != STATE_FORMAT:
            raise DataError(f"loader state has format {state.get('format')!r}, this pipeline reads format "
                            f"{STATE_FORMAT} (state saved by an older pretrain.data; restart the stage)")
        if (state.get("rank"), state.get("world_size")) != (self.rank, self.world_size):
            raise DataError(f"loader state is for rank {state.get('rank')} of {state.get('world_size')}, "
                            f"this loader is rank {self.rank} of {self.world_size}")
        self._state = None
        self._loader.load_state_dict(_from_plain(state["loader"]))

    def close(self) -> None:
        """Stop the pipeline's threads and reader processes now (the loader cannot be iterated afterwards).

        torchdata 0.11 nodes stop their threads and worker processes only when garbage-collected, and their own
        threads keep them referenced: a dropped loader went on decoding until its queues were full (a bench timing
        something else meanwhile measured it too) and then held its workers and shared memory. This calls each
        node's shutdown (torchdata's private ``_shutdown``; a node without one is left alone)."""
        if self._collate.watchdog is not None:
            self._collate.watchdog.stop()
        seen: set[int] = set()
        todo: list[Any] = [self._loader.root]
        procs: list = []
        while todo:
            obj = todo.pop()
            if obj is None or id(obj) in seen:
                continue
            seen.add(id(obj))
            stop = getattr(obj, "_shutdown", None)
            if callable(stop):
                stop()
            procs += [w for w in getattr(obj, "_workers", None) or [] if hasattr(w, "terminate")]
            todo += [getattr(obj, a, None) for a in ("_it", "source")]
        for p in procs:  # a stopped worker process still works off the tasks queued for it first
            if p.is_alive():
                p.terminate()
            p.join(timeout=10)

    @property
    def bad_samples(self) -> int:
        """Reads that failed to decode so far (each replaced by a substitute), all stores."""
        return sum(self._collate.bad.values())

    @property
    def bad_by_store(self) -> dict[str, int]:
        """Failed reads so far per store URL."""
        return dict(self._collate.bad)

    @property
    def samples_seen(self) -> int:
        """Samples delivered so far (batches x batch_size)."""
        return self._collate.delivered


def _open(cfg: DataConfig) -> tuple[dict[str, StoreInfo], dict[str, StoreTables], dict[str, np.ndarray], dict]:
    infos, tables, bases, weights = {}, {}, {}, {}
    for k, src in enumerate(cfg.sources):
        if src.weight == 0:
            continue
        try:
            store = open_store(src.url, cfg.storage_options, cfg.decoder)  # a store or a logical dataset
            if len(store) == 0:
                raise DataError(f"{src.url}: the store is empty (n_patches = 0)")
            tab = tables_from_store(store)
        except StoreError as e:
            raise DataError(f"source {k} ({src.url}): {e}") from None
        chunks = store.chunks
        key = f"{k}:{store.sensor}_{store.level}"
        if cfg.crop > store.patch_size and cfg.colocated is None:  # co-located views have their own sides
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
    if cfg.mix == "mixed":
        return _mixed_plan(cfg, rank, world_size, infos, bases, weights)
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
                    sensor_dropout=cfg.sensor_dropout, band_step=cfg.band_step)
    return plan, infos, (total * cfg.epochs if cfg.epochs else None)


def _mixed_plan(cfg: DataConfig, rank: int, world_size: int, infos, bases, weights):
    """The planning half of a ``mix: mixed`` pipeline (:mod:`pretrain.data.mixed`)."""
    from .mixed import MixedPlanNode, mixed_sources

    batched, per_epoch = mixed_sources(infos, bases, weights, batch_size=cfg.batch_size, seed=cfg.seed, rank=rank,
                                       world_size=world_size, epochs=cfg.epochs)
    if per_epoch * (cfg.epochs or 1) < cfg.batch_size:
        raise DataError(f"{per_epoch} patches per rank and epoch over all sources cannot give one mixed batch of "
                        f"{cfg.batch_size} to each of {world_size} ranks")
    plan = MixedPlanNode(batched, infos, seed=cfg.seed, rank=rank, band_window=cfg.band_window,
                         band_stride=cfg.band_stride, crop=cfg.crop, crop_align=cfg.crop_align,
                         sensor_dropout=cfg.sensor_dropout)
    return plan, infos, (per_epoch * cfg.epochs // cfg.batch_size if cfg.epochs else None)


def build_loader(cfg: DataConfig, rank: int = 0, world_size: int = 1, vocab: Vocabulary | None = None,
                 device: torch.device | str | None = None) -> SpecLoader:
    """Open and check every source (DataError before any batch), then build this rank's pipeline.

    ``vocab`` maps each store's sensor and level to the batch's ``sensor``/``level`` indices: training passes
    the model's (``model.vocab``), so the indices are the ones the model was built with; without one (tools,
    tests) the registry's current vocabulary is used. ``device`` is where the batches are consumed (default
    CPU); with CUDA and ``normalise_on`` auto the workers only decode (FP16, pinned) and the loader normalises
    on the GPU (see :class:`SpecLoader`)."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    mode = cfg.normalise_on if cfg.normalise_on != "auto" else ("device" if dev.type == "cuda" else "workers")
    cuda = dev.type == "cuda" and torch.cuda.is_available()
    pin_in_workers = cfg.pin_memory and cuda and cfg.worker_type == "thread"
    opened = _open(cfg)
    if cfg.colocated is not None:  # co-located groups: a pipeline of their own (pretrain.data.colocated)
        from .colocated import build_colocated_loader

        return build_colocated_loader(cfg, rank, world_size, opened, vocab)
    plan, infos, num_batches = build_plan(cfg, rank, world_size, _opened=opened)
    tables = opened[1]
    subs = Substitutes(infos, opened[2], seed=cfg.seed, crop=cfg.crop, crop_align=cfg.crop_align,
                       sensor_dropout=cfg.sensor_dropout)
    # process workers decode into reused shared-memory slots (a fresh segment per batch cost ~3.5 ms a sample);
    # mixed batches are assembled from per-store reads inside the worker, so they take no slot
    pooled = cfg.worker_type == "process" and cfg.num_workers > 0 and cfg.mix != "mixed"
    pin_on_copy = cfg.pin_memory and cuda and pooled
    # unpinned, CopyOut lends slots to the consumer (no copy): each worker has as many more as may be lent at once
    lend = local_slots(0, cfg.prefetch) if pooled and not pin_on_copy else 0
    reader = SampleReader(tables, cfg.crop, cfg.storage_options, substitutes=subs,
                          max_batch_bad=cfg.max_bad_batch_fraction, vocab=vocab, decoder=cfg.decoder,
                          normalise_on=mode, pin=pin_in_workers,
                          shared_slots=SHARED_SLOTS_PER_WORKER + lend if pooled else 0,
                          local_slots=local_slots(cfg.num_workers, cfg.prefetch)
                          if cfg.worker_type == "thread" and cfg.mix != "mixed" else 0)
    if cfg.mix == "mixed":
        from .mixed import MixedReader

        reader = MixedReader(reader)
    mapper = ParallelMapper(plan, reader, num_workers=cfg.num_workers, in_order=True, method=cfg.worker_type,
                            multiprocessing_context="spawn" if cfg.worker_type == "process" else None)
    watch = WorkerWatchdog(mapper) if cfg.worker_type == "process" and cfg.num_workers > 0 else None
    # Collate after the Prefetcher: it counts, logs and raises at the batch being handed out, so the
    # counters (loader.bad_samples ...) describe exactly the batches delivered so far.
    src = CopyOut(mapper, pin=pin_on_copy, hold=(SHARED_SLOTS_PER_WORKER + lend) * cfg.num_workers,
                  slots=local_slots(0, cfg.prefetch), lend=lend) if pooled else mapper
    coll = Collate(Prefetcher(src, prefetch_factor=cfg.prefetch), cfg.max_bad_fraction, watch)
    node: BaseNode = coll
    if cfg.pin_memory and cuda and not pin_in_workers and not pin_on_copy:
        node = PinMemory(node)
    return SpecLoader(cfg, rank, world_size, node, coll, num_batches, infos, device=dev, normalise_on=mode)

"""Reading one batch: crops + band windows decoded from :class:`data_prep.store.PatchStore` into the batch tensor.

:class:`SampleReader` is the map function of the pipeline's ``ParallelMapper``. It is picklable (for
process workers): opened stores are dropped on pickling and reopened lazily in each worker.

Guarantees (measured by ``bench/loader.py``; figures in its docstring):

- Local stores are decoded by the ``zarrs`` codec pipeline (Rust; one decode thread per read, so ``num_workers``
  is the decode parallelism: zarr's process-wide pool, on which the reads run, is made wide enough first, see
  :func:`_make_zarr_executor`), other URLs by zarr-python's own (``DataConfig.decoder`` chooses).
- Per sample the reader does the decode, the missing-chunk check and nothing that touches storage again: each
  granule's band table is read once per reader (:func:`_band_tables`), process workers hand batches over
  in reused shared memory and thread workers decode into reused batch buffers (:class:`BatchBuffers`).
  Measured (2-core box, ``bench/loader.py`` ``cpu_efficiency``: CPU per sample of the bare decode of the same
  chunks / of the loader), median of 5 runs at load 1.4-6.5: 0.89-0.95 at 1 and 2 workers, threads and
  processes (0.83-0.90 before the reused buffers, median of 4; it was 12.5 ms against ~7 ms with threads and 16 ms
  with processes before the band-table cache and the shared slots). Process workers' batches reach the consumer
  without a copy (``pretrain.data.loader.CopyOut`` lends the slot): the training process's CPU per sample went
  from 1.93 to 1.28 ms with a consumer that reads each batch (median of 8 interleaved runs of 48 batches,
  process/1, load 4.0-4.9; 1.30 -> 0.65 ms when it does not, 6 runs at load 2.9-3.5), the workers' CPU and the samples/s did not
  move beyond the noise (the worker, busy 99% of the time, sets the rate; the copy ran on another core).
  A sample's band segments and valid mask are decoded in one round trip to zarr's event loop (:func:`decode_into`;
  one ``get_basic_selection`` each was ~0.3 ms of CPU per call beside the decode), the valid mask straight into the
  batch: ``bench/loader.py`` thread/1 went from 13.2 ms per sample (``cpu_efficiency`` 0.890, idle box) to 9.1
  (1.043, load 3.3-4.0; the bare reads make zarr's calls one by one).
- A window's raw band indices are read as *segments* (:func:`window_segments`): maximal runs of adjacent band
  chunks holding at least one selected band. A chunk that holds only bad bands of the window is never decoded, and
  no chunk is decoded twice; a segment without bad bands inside decodes straight into its slot of the batch
  tensor (``get_basic_selection(out=...)``), with no intermediate copy.
- Two output modes. ``normalise_on="workers"``: workers write normalised float32 ``pixels`` (clip to the store's
  p01/p99, standardise, 0 where invalid or NaN). ``"device"``: workers write the stored FP16 values into ``raw``
  (pinned when CUDA is there and workers are threads) plus the per-band ``norm`` ``[B, 4, C]`` (p01, p99, mean,
  1/std), and :func:`finish_batch` normalises on the training device, with the same formula, so a GPU host's CPUs
  only decode; half the bytes cross PCIe.
"""

from __future__ import annotations

import asyncio
import math
import os
import sys
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import zarr
from zarr.core.buffer.core import default_buffer_prototype
from zarr.core.buffer.cpu import NDBuffer
from zarr.core.indexing import BasicIndexer
from zarr.core.sync import sync as zarr_sync

from data_prep import dataset
from data_prep.spectral import inverse_std, normalise_into
from data_prep.store import PatchStore, window_segments
from pretrain.models.vocab import Vocabulary

from .sampling import Substitutes

#: zarr config under which the loader opens local stores (``decoder="zarrs"``): one Rust decode thread per read.
ZARRS_CONFIG = {"codec_pipeline.path": "zarrs.ZarrsCodecPipeline", "threading.max_workers": 1}


def is_local(url: str) -> bool:
    """Whether ``url`` is a local path (no scheme, or ``file://``): the stores zarrs can decode."""
    return "://" not in url or url.startswith("file://")


def resolve_decoder(decoder: str, url: str) -> str:
    """``"zarrs"`` or ``"zarr"`` for ``url`` under the ``DataConfig.decoder`` setting (``auto``: zarrs where it can)."""
    if decoder == "auto":
        try:
            import zarrs  # noqa: F401
        except ImportError:  # pragma: no cover - a declared dependency; an install without it still reads
            return "zarr"
        return "zarrs" if is_local(url) else "zarr"
    return decoder


_OPEN_LOCK = threading.Lock()
_EXECUTOR_MADE = False

ZARR_EXECUTOR_THREADS = max(32, (os.cpu_count() or 1) + 4)
"""Threads of zarr's process-wide pool, on which every decode of the process runs (threads are made as needed)."""


def _make_zarr_executor() -> None:
    """Make zarr's process-wide thread pool with :data:`ZARR_EXECUTOR_THREADS` threads before the first zarrs open.

    zarr makes that pool at its first synchronous call, sized from ``threading.max_workers`` as the config has it
    *then*; zarrs reads the same key when an array is opened, for its own per-read threads. Opening the first
    store under :data:`ZARRS_CONFIG` therefore made a ONE-thread pool, and every decode of the process ran on
    that one thread: N loader threads (and the bench's ceiling threads) decoded one read at a time."""
    global _EXECUTOR_MADE
    if not _EXECUTOR_MADE:
        with zarr.config.set({"threading.max_workers": ZARR_EXECUTOR_THREADS}):
            zarr_sync(asyncio.sleep(0))
        _EXECUTOR_MADE = True


def open_store(url: str, storage_options: dict | None = None, decoder: str = "auto") -> Any:
    """A store or a logical dataset (:func:`data_prep.dataset.open_store`) whose arrays decode with ``decoder``
    (see :func:`resolve_decoder`)."""
    # the codec pipeline is chosen when an array is opened, from zarr's config, which is process-wide: opens are
    # serialised so that one thread's switch to zarrs never leaks into another thread's open (loader threads
    # open stores while the caller may open one with the other decoder)
    with _OPEN_LOCK:
        if resolve_decoder(decoder, url) == "zarrs":
            _make_zarr_executor()
            with zarr.config.set(ZARRS_CONFIG):
                return dataset.open_store(url, storage_options)
        return dataset.open_store(url, storage_options)


def chunk_probe_rows(segs: list[tuple[int, int, int, np.ndarray | None]], band_chunk: int) -> np.ndarray:
    """Rows of a window read as ``segs`` (:func:`window_segments`) holding the first selected band of each band chunk.

    The missing-chunk check needs one element per decoded chunk, not the whole crop: a chunk missing from storage
    decodes to the fill value NaN in *all* its elements, and stored data never holds NaN (the writer refuses
    non-finite pixels; :mod:`data_prep.store`). So the crop's elements at these rows x the first row and column
    of each spatial chunk in the crop (:func:`_probe_axis`) find every missing chunk; the full bit test over a
    100 x 128 x 128 crop cost 0.3-0.6 ms of a ~7 ms read in the loader (it ran on data just written by the decode
    in another thread), the probe of ~50 elements a few microseconds."""
    rows = []
    for o, r0, r1, keep in segs:
        raw = np.arange(r0, r1) if keep is None else r0 + keep
        _, first = np.unique(raw // band_chunk, return_index=True)
        rows.append(o + first)
    return np.concatenate(rows)


def _probe_axis(start: int, size: int, chunk: int) -> np.ndarray:
    """Offsets in ``[0, size)`` of the first element of each chunk of ``chunk`` that ``[start, start+size)`` touches."""
    edges = np.arange((start // chunk + 1) * chunk, start + size, chunk)
    return np.concatenate([[0], edges - start])


ONE_ROUND_TRIP = hasattr(zarr.AsyncArray, "_get_selection")
"""Whether :func:`decode_into` decodes a sample's reads in one round trip to zarr's event loop (zarr 3's
``AsyncArray._get_selection``, what ``Array.get_basic_selection`` awaits); else one ``get_basic_selection`` each."""


async def _decode_in_turn(reads: list[tuple[Any, BasicIndexer, NDBuffer]], prototype: Any) -> None:
    for arr, indexer, out in reads:  # one after another: a worker decodes one read at a time, as before
        await arr._get_selection(indexer, prototype=prototype, out=out)


def decode_into(reads: list[tuple[zarr.Array, tuple, np.ndarray]]) -> None:
    """Decode each ``(array, basic selection, out)`` into ``out`` (a contiguous numpy array of the selection's shape
    and the array's dtype), in order; the first failure raises.

    ``Array.get_basic_selection(out=...)`` does the same one read at a time, each a round trip to zarr's event-loop
    thread (``zarr.core.sync.sync``: the coroutine handed over, a future waited on in this thread, the loop woken);
    a sample's 2-3 reads (band segments + valid) cost ~0.3 ms each of CPU that way, in this thread and the loop's,
    beside the decode. Here the reads are awaited in turn inside one coroutine: one round trip per sample, the
    same decodes (the indexers are made in this thread, as there, so the loop thread does no more work than before)."""
    if not ONE_ROUND_TRIP:
        for arr, sel, out in reads:
            arr.get_basic_selection(sel, out=NDBuffer.from_numpy_array(out))
        return
    zarr_sync(_decode_in_turn([(arr.async_array, BasicIndexer(sel, arr.shape, arr.metadata.chunk_grid),
                                NDBuffer.from_numpy_array(out)) for arr, sel, out in reads],
                              default_buffer_prototype()))


def touched_elements(chunks: tuple[int, ...], bands: np.ndarray, y0: int, x0: int, size: int) -> int:
    """Elements of the ``patches`` array decoded to read one crop of the raw bands ``bands`` (whole chunks,
    segment rule of :func:`data_prep.store.window_segments`), from the array's chunk shape."""
    _, cb, cy, cx = chunks

    def span(lo: int, hi: int, c: int) -> int:
        return (math.ceil(hi / c) - lo // c) * c

    nb = sum(span(r0, r1, cb) for _, r0, r1, _ in window_segments(bands, cb))
    return nb * span(y0, y0 + size, cy) * span(x0, x0 + size, cx)


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


def normalise_tensor(raw: torch.Tensor, valid: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """:func:`data_prep.spectral.normalise_into` (the one formula) as torch ops for a batch on any device: ``raw`` ``[B,C,H,W]`` (stored FP16 values), ``valid``
    ``[B,H,W]``, ``norm`` ``[B,4,C]`` (p01, p99, mean, 1/std) -> float32 ``[B,C,H,W]`` (a new tensor)."""
    lo, hi, mean, inv = (t[:, :, None, None] for t in norm.to(torch.float32).unbind(1))
    x = torch.clamp(raw.to(torch.float32), lo, hi)  # NaN stays NaN
    x = x.sub_(mean).mul_(inv)
    return x.masked_fill_(x.isnan() | ~valid[:, None].to(torch.bool), 0.0)


def finish_batch(batch: dict[str, Any], device: torch.device | str | None = None,
                 non_blocking: bool = True) -> dict[str, Any]:
    """The training batch on ``device``: every tensor moved (``non_blocking``: asynchronous from pinned memory),
    and a ``normalise_on="device"`` batch's ``raw`` + ``norm`` turned into normalised float32 ``pixels`` there
    (:func:`normalise_tensor`). A batch already normalised (``pixels``) is only moved. Non-tensor entries
    (``meta``) are passed through."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    out = {k: (v.to(dev, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v)
           for k, v in batch.items() if k not in ("raw", "norm")}
    if "raw" in batch:
        raw = batch["raw"].to(dev, non_blocking=non_blocking)
        out["pixels"] = normalise_tensor(raw, out["valid"], batch["norm"].to(dev, non_blocking=non_blocking))
    return out


class BatchBuffers:
    """Reused ``pixels``/``raw`` + ``valid`` batch tensors: a few slots, each written again only once it is free.

    A fresh 8 x 100 x 128 x 128 batch tensor (26 MB) per batch has its pages faulted in (and zeroed by the kernel)
    every time: glibc hands memory that large back to the system when it is freed. Two kinds of slot:

    - ``shared=True`` (a reader worker *process*): the slots are shared-memory tensors. A batch handed to the
      training process travels through shared memory (``torch.multiprocessing``), and a tensor not in shared
      memory yet is copied into a fresh segment when the batch is pickled: for one such batch that fresh segment
      (create, fault and zero its pages, copy, unmap) cost ~30 ms of the worker's time on the 2-core box, ~3.5 ms
      per sample, a third of a sample's decode (``bench/loader.py`` process/1 was at 0.59-0.65 of the bare decode
      rate). The batch carries the slot's busy flag (``_release``: a 1-element shared tensor, and the worker's
      pid): the training process (``pretrain.data.loader.CopyOut``) lends the slot's tensors to the consumer and
      clears the flag once nothing references them any more, or copies them out and clears it at once; only then
      may the worker write that slot again.
    - ``shared=False`` (reader threads, and ``CopyOut``'s copies in the training process): the slots are
      ordinary memory, owned by a numpy array each; a slot's tensors are ``torch.from_numpy`` views, so every
      tensor or view made from them keeps the owner referenced, and a slot is free again exactly when nothing
      but this pool references its owner (its reference count; no flag to clear, nothing the consumer must do).
      Measured (thread/2, 2-core box, fresh tensors against these, interleaved): ~410 page faults and ~0.65 ms
      CPU per 100 x 128 x 128 sample (of ~9.9), nearly all system time in the decode threads; the free slot
      handed out last is reused first (likeliest in cache; ~1% less CPU than the oldest in three A/B runs).

    When every slot is busy :meth:`take` returns fresh tensors (flag None), as without a pool: the pool never
    waits and never hands out a slot the other side may still read. A free slot of another shape (another store's
    band count) is replaced. Thread-safe (reader threads share one pool).
    """

    _OWNED_REFS = 2
    """``sys.getrefcount`` of a free local slot's owner: the slot's own reference and the call's argument."""

    def __init__(self, slots: int, shared: bool = True):
        self.slots = slots
        self.shared = shared
        # per slot: [shape, dtype, pixels, valid, busy flag]; local slots hold numpy owners and no flag
        self._ring: list[list] = []
        self._lock = threading.Lock()

    def _free(self, slot: list) -> bool:
        if self.shared:
            return int(slot[4][0]) == 0
        return sys.getrefcount(slot[2]) <= self._OWNED_REFS and sys.getrefcount(slot[3]) <= self._OWNED_REFS

    def _new(self, shape: tuple[int, ...], dtype: torch.dtype) -> list:
        vshape = (shape[0], *shape[2:])
        if self.shared:
            return [shape, dtype, torch.empty(shape, dtype=dtype).share_memory_(),
                    torch.empty(vshape, dtype=torch.bool).share_memory_(), torch.zeros(1, dtype=torch.int8).share_memory_()]
        return [shape, dtype, np.empty(shape, torch.empty(0, dtype=dtype).numpy().dtype), np.empty(vshape, np.bool_),
                None]

    def _hand_out(self, slot: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if self.shared:
            slot[4][0] = 1
            return slot[2], slot[3], slot[4]
        return torch.from_numpy(slot[2]), torch.from_numpy(slot[3]), None

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(pixels ``shape`` of ``dtype``, valid ``(shape[0], *shape[2:])`` bool, busy flag: shared slots only)."""
        shape = tuple(shape)
        with self._lock:
            free = [k for k, slot in enumerate(self._ring) if self._free(slot)]
            for k in reversed(free):  # the free slot handed out last: the likeliest still in cache
                if self._ring[k][0] == shape and self._ring[k][1] == dtype:
                    self._ring.append(self._ring.pop(k))  # the ring is kept in hand-out order
                    return self._hand_out(self._ring[-1])
            if len(self._ring) >= self.slots:
                if not free:  # every slot still busy: fresh tensors (copied to shared memory when pickled)
                    return (torch.empty(shape, dtype=dtype), torch.empty((shape[0], *shape[2:]), dtype=torch.bool),
                            None)
                del self._ring[free[0]]  # a free slot of another shape makes room
            self._ring.append(self._new(shape, dtype))
            return self._hand_out(self._ring[-1])


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
                 vocab: Vocabulary | None = None, decoder: str = "auto", normalise_on: str = "workers",
                 pin: bool = False, shared_slots: int = 0, local_slots: int = 0):
        self.tables = tables
        self.vocab = vocab if vocab is not None else Vocabulary.from_registry()  # batch sensor/level indices
        self.crop = crop
        self.storage_options = storage_options
        self.substitutes = substitutes
        self.max_batch_bad = max_batch_bad
        self.decoder = decoder
        self.normalise_on = normalise_on
        self.pin = pin
        self.shared_slots = shared_slots
        """> 0 (process workers): decode into that many reused shared-memory batches (:class:`BatchBuffers`)."""
        self.local_slots = local_slots
        """> 0 (thread workers, without ``pin``): decode into that many reused batches of ordinary memory, each
        written again once nothing references it (:class:`BatchBuffers`, ``shared=False``)."""
        self._pool = self._make_pool()
        self._stores: dict[str, PatchStore] = {}
        self._tables: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]] = {}  # per store: granule -> band table
        self._lock = threading.Lock()
        self._local = threading.local()
        self._probes: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray]] = {}

    def __getstate__(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["_stores"] = {}
        d["_tables"] = {}
        d["_pool"] = None  # made in the worker process (segments of its own)
        d.pop("_lock")
        d.pop("_local")
        return d

    def __setstate__(self, d: dict[str, Any]) -> None:
        self.__dict__.update(d)
        self._pool = self._make_pool()
        self._lock = threading.Lock()
        self._local = threading.local()

    def _make_pool(self) -> BatchBuffers | None:
        if self.shared_slots > 0:
            return BatchBuffers(self.shared_slots, shared=True)
        if self.local_slots > 0 and not self.pin:  # pinned tensors come from torch's caching host allocator
            return BatchBuffers(self.local_slots, shared=False)
        return None

    def store(self, key: str) -> PatchStore:
        s = self._stores.get(key)
        if s is None:
            with self._lock:
                s = self._stores.get(key)
                if s is None:
                    s = open_store(self.tables[key].url, self.storage_options, self.decoder)
                    self._stores[key] = s
        return s

    def _scratch(self, shape: tuple[int, ...], name: str = "buf", dtype: Any = np.float16) -> np.ndarray:
        """This thread's reusable buffer ``name`` (no fresh pages per sample)."""
        n = math.prod(shape)
        buf = getattr(self._local, name, None)
        if buf is None or buf.size < n or buf.dtype != dtype:
            buf = np.empty(n, dtype)
            setattr(self._local, name, buf)
        return buf[:n].reshape(shape)

    def _probe_index(self, y0: int, x0: int, chunks: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        """(rows ``(-1, 1)``, columns ``(1, -1)``) of the crop at ``(y0, x0)`` that hold the first element of each
        spatial chunk (:func:`_probe_axis`), kept per corner (a store has few crop corners)."""
        key = (y0, x0, self.crop, chunks[2], chunks[3])
        idx = self._probes.get(key)
        if idx is None:
            idx = self._probes[key] = (_probe_axis(y0, self.crop, chunks[2])[:, None],
                                       _probe_axis(x0, self.crop, chunks[3])[None, :])
        return idx

    def __call__(self, tasks: list[dict]) -> dict:
        t = self.tables[tasks[0]["key"]]  # a batch is one store and one window
        sel = t.good_idx[tasks[0]["w0"]:tasks[0]["w0"] + tasks[0]["wn"]:tasks[0].get("ws", 1)]
        lo, hi, mean, inv = t.lo[sel], t.hi[sel], t.mean[sel], t.inv_std[sel]
        c, n, nb = self.crop, len(tasks), sel.shape[0]
        store = self.store(tasks[0]["key"])
        chunks = store.chunks
        segs = window_segments(sel, chunks[1])
        probe_rows = chunk_probe_rows(segs, chunks[1])[:, None, None]
        gathered = sum(r1 - r0 for _, r0, r1, keep in segs if keep is not None)  # bands decoded, then gathered
        on_device = self.normalise_on == "device"
        # on_device: the stored values, normalised by finish_batch on the training device
        dtype = torch.float16 if on_device else torch.float32
        release = None
        if self._pool is not None:
            pixels, valid, release = self._pool.take((n, nb, c, c), dtype)
        else:
            pixels = torch.empty((n, nb, c, c), dtype=dtype, pin_memory=self.pin)
            valid = torch.empty((n, c, c), dtype=torch.bool, pin_memory=self.pin)
        px_np, va_np = pixels.numpy(), valid.numpy()
        bad: list[dict] = []
        reads = 0

        def read(j: int, task: dict) -> dict | None:
            """Read ``task`` into slot ``j``; on failure, the entry appended to ``bad``."""
            nonlocal reads
            reads += 1
            i, y0, x0 = task["index"], task["y0"], task["x0"]
            ys, xs = slice(y0, y0 + c), slice(x0, x0 + c)
            dst = px_np[j] if on_device else self._scratch((nb, c, c))
            # a logical dataset (shard stores) reads patch i from the shard holding it
            part, k = store.locate(i) if hasattr(store, "locate") else (store, i)
            try:
                todo, gather = [], []
                held = self._scratch((gathered, c, c), "gather") if gathered else None
                g = 0
                for o, r0, r1, keep in segs:
                    if keep is None:  # straight into its slot
                        todo.append((part.patches, (k, slice(r0, r1), ys, xs), dst[o:o + r1 - r0]))
                    else:  # into this thread's scratch, then the selected bands into the slot
                        todo.append((part.patches, (k, slice(r0, r1), ys, xs), held[g:g + r1 - r0]))
                        gather.append((o, keep, held[g:g + r1 - r0]))
                        g += r1 - r0
                # valid (uint8 0/1; the fill value where a chunk is missing) straight into the batch's bool slot,
                # whose bytes check_read vets before anything reads them as bool; other dtypes via a copy
                direct = part.valid.dtype == np.uint8
                va = va_np[j].view(np.uint8) if direct else np.empty((c, c), part.valid.dtype)
                todo.append((part.valid, (k, ys, xs), va))
                decode_into(todo)
                for o, keep, src in gather:
                    np.take(src, keep, axis=0, out=dst[o:o + keep.shape[0]], mode="clip")  # (unbuffered)
                check = getattr(part, "check_read", None)  # stores that detect chunks missing from storage
                if check is not None:  # one element of every decoded chunk (see chunk_probe_rows)
                    ya, xa = self._probe_index(y0, x0, chunks)
                    v = check(f"patch {k}", dst[probe_rows, ya, xa], va)
                else:
                    v = np.asarray(va, dtype=bool)
            except Exception as e:  # noqa: BLE001 - any decode/IO failure makes this one read bad
                bad.append({"url": t.url, "index": task["index"], "step": task["step"],
                            "substitute_for": task.get("replaces"), "error": f"{type(e).__name__}: {e}",
                            "replaced_by": None})
                return bad[-1]
            if not (direct and np.may_share_memory(v, va_np[j])):  # e.g. a schema-1 store's bool copy
                va_np[j] = v
            if not on_device:
                normalise_into(pixels[j], dst, va_np[j], lo, hi, mean, inv)
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
            if release is not None:
                release[0] = 0  # the batch is not handed out: its slot is free again
            idx = sorted({b["index"] for b in bad})
            return {"_fatal": f"{t.url}: {fatal}; failed patches {idx}; first error: {bad[0]['error']}",
                    "_bad": bad, "_reads": reads}
        batch = {
            ("raw" if on_device else "pixels"): pixels,
            **_band_tables(store, t, sel, used, self._tables.setdefault(tasks[0]["key"], {})),
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
        if on_device:
            norm = torch.from_numpy(np.stack([lo, hi, mean, inv]))  # [4, C]
            batch["norm"] = norm.expand(n, -1, -1).clone()
        if bad:
            batch["_bad"] = bad
        if release is not None:
            batch["_release"] = (release, os.getpid())  # the slot's flag, and whose slot (CopyOut's lending budget)
            # the small per-sample tensors go pickled inline as numpy arrays: as tensors, each took a fresh
            # shared-memory segment and a file-descriptor hand-over per batch; CopyOut makes tensors of them again
            for name in ("wavelengths", "fwhm", "sensor", "level", "gsd", "norm"):
                if name in batch:
                    batch[name] = batch[name].numpy()
        batch["_reads"] = reads
        return batch


def _band_tables(store: Any, t: StoreTables, sel: np.ndarray, used: list[dict],
                 cache: dict[int, tuple[np.ndarray, np.ndarray]]) -> dict[str, torch.Tensor]:
    """``wavelengths`` and ``fwhm`` ``[B, C]`` of the window: each patch's own granule table where the store keeps
    per-granule tables (``band_table(i)``), else the store's.

    A granule's table is the same for all its patches, so ``store.band_table`` is asked once per granule (the
    first patch of it this reader meets) and kept in ``cache`` (granule index -> float32 table): asking per
    sample opened the ``meta`` group and ``granule`` array from storage each time, ~3 ms of a ~12 ms read."""
    n = len(used)
    if not hasattr(store, "band_table"):
        return {"wavelengths": torch.from_numpy(t.wavelengths[sel]).expand(n, -1).clone(),
                "fwhm": torch.from_numpy(t.fwhm[sel]).expand(n, -1).clone()}
    wl = np.empty((n, sel.shape[0]), np.float32)
    fw = np.empty((n, sel.shape[0]), np.float32)
    for j, k in enumerate(used):
        g = int(t.granule[k["index"]])
        tab = cache.get(g)
        if tab is None:
            w, f = store.band_table(k["index"])
            tab = cache[g] = (np.asarray(w, np.float32), np.asarray(f, np.float32))
        wl[j], fw[j] = tab[0][sel], tab[1][sel]
    return {"wavelengths": torch.from_numpy(wl), "fwhm": torch.from_numpy(fw)}


def _granule(t: StoreTables, i: int) -> str:
    g = int(t.granule[i])
    return t.granule_ids[g] if 0 <= g < len(t.granule_ids) else str(g)

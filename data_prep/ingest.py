"""Ingest: products -> patches -> one Zarr patch store per sensor and level under a root.

``ingest(inputs, out_root, ...)`` finds products (``data_prep.formats.find_products``), opens them
(``open_product``: headers only) and hands the granules to :func:`ingest_granules`, which does
the work and is also what tests and other code call with in-memory :class:`Granule` objects.

Guarantees:

- **Checked before writing.** Every granule is checked (sensor and level in the registry, band
  tables consistent, matching an existing store) and the output root is checked writable before
  anything is written; a failure raises :class:`ProductError` / :class:`StoreError` naming the
  file and field, and no store changes.
- **Idempotent, resumable per granule.** Granule ids already in a store's manifest are skipped.
  A granule's patches are written beyond ``n_patches`` and become visible only at its commit (one
  attribute write: ``n_patches``, manifest, statistics), so an interrupted granule leaves no
  visible patches, and the next run truncates and rewrites that uncommitted tail.
- **Failing granules.** A granule that fails while being tiled (all nodata, inf, float16 overflow,
  a truncated read) is rolled back (store exactly as before it); by default the run stops there
  with the error (granules committed before it stay committed: a re-run skips them), with
  ``keep_going=True`` it is recorded in the summary's ``failed`` and the run goes on.
- **Parallel.** ``workers > 1`` reads and tiles strips in worker processes; the parent alone
  writes, in order, so memory is bounded by the strips in flight (about ``2 x workers``). A
  worker exits within moments of its parent's death (kill -9 included): no orphan processes.
- **Sharding.** ``shard=(k, n)`` keeps the products whose file name hashes (SHA-1) to ``k`` mod
  ``n``, stable across machines and runs, so a job array can split an archive. Two processes must
  never write to the same store at once (the commit is a read-modify-write of the attributes):
  give each shard its own root (``ROOT/shard-K``) and list the shard stores as loader sources.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import hashlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data_prep import dataset as ds
from data_prep import store as st
from data_prep.errors import UserError
from data_prep.granule import Granule, ProductError
from data_prep.registry import WAVELENGTH_RANGE_NM, RegistryError, get_sensor
from data_prep.stats import DEFAULT_BINS, PartialStats
from data_prep.tiling import MIN_PATCH, StripTiles, strip_starts, tile_strip

log = logging.getLogger(__name__)

#: a granule whose band centres differ from its store's table by more than this (nm) keeps its own table
WAVELENGTH_TOLERANCE_NM = 2.0
#: ... and by more than this it is refused: not a calibration shift but another band order or sensor table
MAX_CENTRE_SHIFT_NM = 20.0


def parse_shard(text: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """``"k/N"`` (0 <= k < N) -> (k, N)."""
    if text is None:
        return None
    if isinstance(text, tuple):
        k, n = text
    else:
        try:
            ks, ns = str(text).split("/")
            k, n = int(ks), int(ns)
        except ValueError:
            raise UserError(f"shard {text!r}: expected k/N with integers, e.g. 0/8") from None
    if n < 1 or not 0 <= k < n:
        raise UserError(f"shard {k}/{n}: expected 0 <= k < N")
    return int(k), int(n)


def in_shard(key: str, shard: tuple[int, int] | None) -> bool:
    if shard is None:
        return True
    h = int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big")
    return h % shard[1] == shard[0]


@dataclass
class _Plan:
    granule: Granule
    url: str
    clip: tuple[float, float]
    strips: list[int]
    patch_size: int


def _fs(root: str, storage_options: dict | None):
    import fsspec

    return fsspec.core.url_to_fs(root, **(storage_options or {}))


def check_root(out_root: str, storage_options: dict | None = None) -> None:
    """Make sure ``out_root`` is (or can be made) a writable directory; StoreError otherwise."""
    try:
        fs, path = _fs(out_root, storage_options)
    except (ValueError, ImportError) as e:
        raise st.StoreError(f"output root {out_root!r}: cannot open: {e}") from None
    try:
        if fs.exists(path) and not fs.isdir(path):
            raise st.StoreError(f"output root {out_root!r} exists and is not a directory")
        fs.makedirs(path, exist_ok=True)
    except st.StoreError:
        raise
    except OSError as e:
        raise st.StoreError(f"output root {out_root!r} is not writable: {e}") from None
    if "://" not in out_root or out_root.startswith("file://"):
        if not os.access(path, os.W_OK):
            raise st.StoreError(f"output root {out_root!r} is not writable (permission denied)")


def _validate(g: Granule, patch_size: int) -> tuple[float, float]:
    """Registry and shape checks of one granule; returns the level's clip range."""
    try:
        sensor = get_sensor(g.sensor)
        spec = sensor.level(g.level)
    except RegistryError as e:
        raise ProductError(f"{g.path}: field sensor/level: {e}") from None
    nb, nr, nc = g.shape
    for name in ("wavelengths_nm", "fwhm_nm", "good_bands"):
        n = np.asarray(getattr(g, name)).shape
        if n != (nb,):
            raise ProductError(f"{g.path}: field {name} has shape {n}, expected ({nb},) for {nb} bands")
    wl = np.asarray(g.wavelengths_nm, dtype=np.float64)
    lo, hi = WAVELENGTH_RANGE_NM
    if not np.isfinite(wl).all() or wl.min() < lo or wl.max() > hi:
        raise ProductError(f"{g.path}: field wavelengths_nm spans {np.nanmin(wl):g}-{np.nanmax(wl):g} nm; "
                           f"expected values in {lo:g}-{hi:g} nm")
    fw = np.asarray(g.fwhm_nm, dtype=np.float64)
    if not (np.isfinite(fw) & (fw > 0)).all():
        raise ProductError(f"{g.path}: field fwhm_nm has non-positive or non-finite values; expected widths in nm")
    if nr <= 0 or nc <= 0 or nb <= 0:
        raise ProductError(f"{g.path}: field shape {g.shape}: expected positive bands, rows, cols")
    if not np.asarray(g.good_bands, dtype=bool).any():
        raise ProductError(f"{g.path}: field good_bands: no good band")
    if not np.isfinite(g.gsd_m) or g.gsd_m <= 0:
        raise ProductError(f"{g.path}: field gsd_m is {g.gsd_m!r}; expected a positive number of metres")
    if nr < patch_size and nc < patch_size:
        log.warning("%s: %dx%d pixels is smaller than one %d-pixel patch; its edge patches are padded",
                    g.path, nr, nc, patch_size)
    return spec.clip


def _check_compatible(g: Granule, w: st.StoreWriter, url: str, patch_size: int) -> None:
    a = w.attrs
    if int(a["patch_size"]) != patch_size:
        raise st.StoreError(f"{url}: store has patch_size {a['patch_size']}, this run asks for {patch_size} "
                            f"(use another --out root or the store's patch size)")
    wl = np.asarray(a["wavelengths_nm"])
    gwl = np.asarray(g.wavelengths_nm, dtype=np.float64)
    if wl.shape != gwl.shape:
        raise ProductError(f"{g.path}: field wavelengths_nm: {gwl.size} bands, but the store {url} has {wl.size}")
    d = float(np.max(np.abs(wl - gwl)))
    if d > MAX_CENTRE_SHIFT_NM:
        raise ProductError(f"{g.path}: field wavelengths_nm differs from the store {url} by up to {d:.2f} nm, more "
                           f"than a calibration shift ({MAX_CENTRE_SHIFT_NM:g} nm): another band order or sensor "
                           "table (stores of EnMAP are in ascending wavelength); use another --out root")


def _band_entry(g: Granule, w: st.StoreWriter) -> dict:
    """The manifest fields of a granule's own band table: its centres and FWHM when they differ from the store's
    by more than WAVELENGTH_TOLERANCE_NM (per-scene calibrations win over the table)."""
    wl = np.asarray(w.attrs["wavelengths_nm"], dtype=np.float64)
    gwl = np.asarray(g.wavelengths_nm, dtype=np.float64)
    if float(np.max(np.abs(wl - gwl))) > WAVELENGTH_TOLERANCE_NM:
        return {"wavelengths_nm": gwl.tolist(), "fwhm_nm": np.asarray(g.fwhm_nm, dtype=np.float64).tolist()}
    return {}


# ---------------------------------------------------------------- worker side
_SOURCES: list[Any] = []
_OPENED: dict[int, Granule] = {}
_TILE_KW: dict[str, Any] = {}


def _exit_with_parent() -> None:
    """In a worker process: exit as soon as the parent is gone (killed with -9 it cannot shut the pool down).

    The spawned worker holds both ends of its task queue, so it would wait for work forever; this
    thread waits on the parent's sentinel (a pipe that closes when the parent dies) instead."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="ingest-parent-watch").start()


def _init_worker(sources: list[Any], tile_kw: dict[str, Any], watch_parent: bool = False) -> None:
    global _SOURCES, _TILE_KW
    _SOURCES, _TILE_KW = sources, tile_kw
    _OPENED.clear()
    if watch_parent:
        _exit_with_parent()


def _granule(i: int) -> Granule:
    g = _OPENED.get(i)
    if g is None:
        src = _SOURCES[i]
        if isinstance(src, Granule):
            g = src
        else:
            from data_prep.formats import open_product

            g = open_product(src)
        _OPENED.clear()  # one granule open per worker at a time (they come mostly in order)
        _OPENED[i] = g
    return g


def _work(i: int, r0: int, clip: tuple[float, float], patch_size: int) -> StripTiles:
    return tile_strip(_granule(i), r0, clip=clip, **{**_TILE_KW, "patch_size": patch_size})


# ---------------------------------------------------------------- parent side
class _Writers:
    """The run's :class:`StoreWriter` per store, opened or created lazily; removes a store this run
    created when a failure leaves it empty (so the root is as it was)."""

    def __init__(self, storage_options: dict | None, hist_bins: int, max_invalid: float):
        self.storage_options, self.hist_bins = storage_options, hist_bins
        self.max_invalid = max_invalid
        self.writers: dict[str, st.StoreWriter] = {}
        self.created: set[str] = set()

    def get(self, url: str, g: Granule, clip: tuple[float, float], patch_size: int) -> st.StoreWriter:
        w = self.writers.get(url)
        if w is not None:
            return w
        w = st.StoreWriter.open(url, self.storage_options, missing_ok=True)
        if w is None:
            good = np.asarray(g.good_bands, dtype=bool)
            # the layout from the registry's bad-band rule, not this granule's flags: every store (and every shard
            # store of a logical dataset) of a sensor gets the same chunks, whichever granule came first
            bc, sc, amp = st.choose_chunks(get_sensor(g.sensor).good_band_mask(g.wavelengths_nm), patch_size)
            try:
                w = st.StoreWriter.create(url, sensor=g.sensor, level=g.level, wavelengths_nm=g.wavelengths_nm,
                                          fwhm_nm=g.fwhm_nm, good_bands=good, patch_size=patch_size,
                                          band_chunk=bc, spatial_chunk=sc, storage_options=self.storage_options,
                                          hist_range=clip, hist_bins=self.hist_bins,
                                          attrs={"read_amplification": round(float(amp), 4)})
            except OSError as e:
                raise st.StoreError(f"{url}: cannot create the store: {e}") from None
            self.created.add(url)
            log.info("created %s: chunks %s, read amplification %.3f", url, w.chunks, amp)
        self.writers[url] = w
        return w

    def discard_if_empty(self, url: str) -> None:
        """Remove a store this run created if nothing was committed to it."""
        w = self.writers.get(url)
        if url in self.created and w is not None and w.n_patches == 0 and not w.granules:
            try:
                w.remove()
            except OSError as e:  # pragma: no cover - best effort
                log.warning("could not remove empty store %s: %s", url, e)
            self.writers.pop(url, None)
            self.created.discard(url)


def ingest_granules(granules: Sequence[Granule], out_root: str, *, patch_size: int = 256,
                    patch_size_for: dict[str, int] | None = None, max_invalid: float = 0.2,
                    workers: int = 1, shard: str | tuple[int, int] | None = None, progress: bool = True,
                    storage_options: dict | None = None, keep_going: bool = False, sources: Sequence[Any] | None = None,
                    hist_bins: int = DEFAULT_BINS, row_block: int = 64, finalise: bool = True) -> dict:
    """Tile ``granules`` and commit them to ``<out_root>/<sensor>_<level>.zarr`` stores.

    ``sources`` (same length as ``granules``) tells worker processes how to reopen each granule
    (a product path for :func:`data_prep.formats.open_product`); by default the Granule objects
    themselves are sent (their ``read_rows`` must then pickle). With ``shard`` (k, N) the stores
    are shard ``k``'s of the logical datasets (:mod:`data_prep.dataset`) and, without ``sources``,
    the granules are selected by a hash of their id; at the end the shard's run marker is written
    and, when every shard has one and ``finalise``, the datasets' manifests. Returns the summary
    described in :func:`ingest`. ``patch_size_for`` (sensor -> pixels) gives some sensors another patch side than
    ``patch_size`` (co-located stores cover the same ground: a 3 m sensor needs 10x the pixels of a 30 m one).
    """
    t_start = time.perf_counter()
    sizes = {**(patch_size_for or {})}
    for name, ps in [("patch_size", patch_size), *((f"patch_size_for[{k!r}]", v) for k, v in sizes.items())]:
        if not isinstance(ps, int) or ps < MIN_PATCH:
            raise UserError(f"{name} {ps!r}: expected an integer of at least {MIN_PATCH}")
    for k in sizes:
        get_sensor(k)  # RegistryError naming an unknown sensor

    def ps_of(g: Granule) -> int:
        return int(sizes.get(g.sensor, patch_size))

    if not 0.0 <= max_invalid <= 1.0:
        raise UserError(f"max_invalid {max_invalid}: expected a fraction in [0, 1]")
    shard_t = parse_shard(shard)
    out_root = str(out_root).rstrip("/") or "/"
    granules = list(granules)
    srcs = list(sources) if sources is not None else list(granules)
    if len(srcs) != len(granules):
        raise ValueError("sources must match granules one to one")
    if sources is None and shard_t is not None:
        keep_idx = [i for i, g in enumerate(granules) if in_shard(g.granule_id, shard_t)]
        granules, srcs = [granules[i] for i in keep_idx], [srcs[i] for i in keep_idx]

    # 1. check everything before writing anything
    clips = [_validate(g, ps_of(g)) for g in granules]
    check_root(out_root, storage_options)
    if shard_t is not None:
        ds.check_layout(out_root, shard_t[1], storage_options)

    def url_of(g: Granule) -> str:
        if shard_t is None:
            return st.store_url(out_root, g.sensor, g.level)
        return ds.shard_store_url(out_root, g.sensor, g.level, shard_t)

    summary: dict[str, Any] = {"root": out_root, "stores": {}, "granules_added": 0, "granules_skipped": 0,
                               "patches_added": 0, "failed": [], "bytes_read": 0}
    plans: list[tuple[int, _Plan]] = []
    seen: set[tuple[str, str]] = set()
    existing: dict[str, st.StoreWriter | None] = {}
    for i, (g, clip) in enumerate(zip(granules, clips, strict=True)):
        url = url_of(g)
        if url not in existing:
            existing[url] = st.StoreWriter.open(url, storage_options, missing_ok=True)
        w = existing[url]
        s = summary["stores"].setdefault(url, {"sensor": g.sensor, "level": g.level, "granules_added": [],
                                               "granules_skipped": [], "patches_added": 0})
        if (url, g.granule_id) in seen or (w is not None and w.has(g.granule_id)):
            s["granules_skipped"].append(g.granule_id)
            summary["granules_skipped"] += 1
            continue
        seen.add((url, g.granule_id))
        if w is not None:
            _check_compatible(g, w, url, ps_of(g))
        plans.append((i, _Plan(g, url, clip, strip_starts(g.n_rows, ps_of(g)), ps_of(g))))
    if not plans:
        summary["seconds"] = time.perf_counter() - t_start
        _finish_summary(summary, storage_options)
        return _end_shard(summary, out_root, shard_t, finalise, storage_options)

    # 2. tile (in workers or here) and write (here, serially, in order)
    tile_kw = {"max_invalid": max_invalid, "hist_bins": hist_bins, "row_block": row_block}
    writers = _Writers(storage_options, hist_bins, max_invalid)
    tasks = [(i, r0, plan.clip, plan.patch_size) for i, plan in plans for r0 in plan.strips]
    plan_of = dict(plans)
    bar = None
    if progress:
        from data_prep.progress import progress as progress_bar

        bar = progress_bar(total=len(tasks), desc="ingest", unit="strip", every=100)
    executor: cf.Executor
    if workers > 1:
        # spawn, not fork: the parent runs zarr's event-loop thread, which a fork would copy mid-state
        executor = cf.ProcessPoolExecutor(max_workers=workers, initializer=_init_worker,
                                          initargs=(srcs, tile_kw, True),
                                          mp_context=multiprocessing.get_context("spawn"))
    else:  # one thread tiles the next strip while this one writes (numpy and blosc release the GIL)
        _init_worker(granules, tile_kw)
        executor = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="ingest-tile")
    try:
        results = _ordered_results(tasks, executor, lookahead=max(2, 2 * workers))
        _consume(results, plan_of, writers, summary, keep_going, bar)
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
        if bar is not None:
            bar.close()
        for url in list(writers.created):
            writers.discard_if_empty(url)
    summary["seconds"] = time.perf_counter() - t_start
    _finish_summary(summary, storage_options)
    return _end_shard(summary, out_root, shard_t, finalise, storage_options)


def _end_shard(summary: dict, out_root: str, shard: tuple[int, int] | None, finalise: bool,
               storage_options: dict | None) -> dict:
    """A shard's run is over: its marker, and the manifests when it is the last shard to finish."""
    if shard is not None:
        ds.write_marker(out_root, shard, summary, storage_options)
        summary["shard"] = list(shard)
        summary["datasets"] = (ds.finalise_if_complete(out_root, storage_options) if finalise else None)
    return summary


def _ordered_results(tasks: list[tuple[int, int, tuple[float, float], int]], executor, lookahead: int):
    """Yield (task, StripTiles | Exception) in task order, running up to ``lookahead`` ahead."""
    pending: collections.deque = collections.deque()
    it = iter(tasks)
    for t in it:
        pending.append((t, executor.submit(_work, *t)))
        if len(pending) >= lookahead:
            break
    while pending:
        t, fut = pending.popleft()
        try:
            res: StripTiles | Exception = fut.result()
        except Exception as e:  # noqa: BLE001
            res = e
        nxt = next(it, None)
        if nxt is not None:
            pending.append((nxt, executor.submit(_work, *nxt)))
        yield t, res


def _consume(results: Iterable, plan_of: dict[int, _Plan], writers: _Writers, summary: dict, keep_going: bool,
             bar) -> None:
    cur: int | None = None
    failed: set[int] = set()
    w: st.StoreWriter | None = None
    offset = start = 0
    meta: dict[str, list[np.ndarray]] = {}
    partial: PartialStats | None = None
    valid_pixels = 0
    done_strips = 0

    def fail(i: int, err: Exception) -> None:
        plan = plan_of[i]
        if w is not None:
            w.rollback()
        failed.add(i)
        writers.discard_if_empty(plan.url)
        if not keep_going:
            raise err
        log.error("skipping %s: %s", plan.granule.path, err)
        summary["failed"].append({"path": plan.granule.path, "granule_id": plan.granule.granule_id,
                                  "error": str(err)})

    for (i, r0, _clip, _ps), res in results:
        if bar is not None:
            bar.update(1)
        if i in failed:
            continue
        plan = plan_of[i]
        g = plan.granule
        if i != cur:
            cur, done_strips, valid_pixels = i, 0, 0
            meta = {k: [] for k in st.META_FIELDS if k != "granule"}
            partial = None
            w = None
        try:
            if isinstance(res, Exception):
                raise res
            if w is None:
                w = writers.get(plan.url, g, plan.clip, plan.patch_size)
                start = offset = w.begin()
            if res.count:
                offset = w.write(offset, res.patches, res.valid)
            for k in meta:
                meta[k].append(res.meta[k])
            partial = res.partial if partial is None else partial.merge(res.partial)
            valid_pixels += res.valid_pixels
            summary["bytes_read"] += g.n_bands * (min(r0 + plan.patch_size, g.n_rows) - r0) * g.n_cols * 4
            done_strips += 1
            if done_strips == len(plan.strips):
                if valid_pixels == 0:
                    raise ProductError(f"{g.path}: all-nodata granule: no valid pixel in {g.n_rows} x {g.n_cols} "
                                       f"(every pixel is nodata, NaN in a good band, or outside the coverage)")
                n = offset - start
                w.commit(granule_id=g.granule_id, source=str(g.path), start=start, count=n,
                         meta={k: np.concatenate(v) for k, v in meta.items()}, partial=partial,
                         entry={"max_invalid": writers.max_invalid, **_band_entry(g, w)},
                         good_bands=np.asarray(g.good_bands, dtype=bool))
                s = summary["stores"][plan.url]
                s["granules_added"].append(g.granule_id)
                s["patches_added"] += n
                summary["granules_added"] += 1
                summary["patches_added"] += n
                if n == 0:
                    log.warning("%s: every patch is over the invalid threshold; committed with 0 patches", g.path)
                if bar is not None:
                    bar.set_postfix(patches=summary["patches_added"])
                w = None
        except (ProductError, st.StoreError, OSError, ValueError) as e:
            if isinstance(e, OSError):
                e = st.StoreError(f"{plan.url}: writing {g.path}: {e}")
            fail(i, e)
        except BaseException:
            if w is not None:
                w.rollback()
            raise


def _finish_summary(summary: dict, storage_options: dict | None) -> None:
    for url, s in summary["stores"].items():
        w = st.StoreWriter.open(url, storage_options, missing_ok=True)
        s["n_patches"] = w.n_patches if w is not None else 0
        s["n_granules"] = len(w.granules) if w is not None else 0
    secs = summary.get("seconds") or 0.0
    summary["mb_per_s"] = summary["bytes_read"] / 1e6 / secs if secs > 0 else 0.0


def retile_granule(w: st.StoreWriter, g: Granule, damaged: Sequence[int] | None = None,
                   row_block: int = 64) -> int:
    """Repair: tile ``g`` again exactly as ingest did and rewrite its damaged committed patches in place.

    ``damaged``: store indices to rewrite (None: every patch of the granule). Every patch of the
    granule that still reads must equal its re-tiling, and the patch positions must equal the
    stored ``row``/``col`` where those read, else :class:`StoreError` (another product or other
    settings) before that strip is written. The metadata of the granule is rewritten too.
    Returns the number of patches rewritten.
    """
    e = w.granules.get(g.granule_id)
    if e is None:
        raise st.StoreError(f"{w.url}: granule {g.granule_id!r} ({g.path}) is not committed here: nothing to repair")
    patch_size = int(w.attrs["patch_size"])
    clip = _validate(g, patch_size)
    _check_compatible(g, w, w.url, patch_size)
    start, count = int(e["start"]), int(e["count"])
    todo = set(range(start, start + count)) if damaged is None else set(damaged)
    reader = st.PatchStore(w.url, w.storage_options)
    stored_pos = None
    try:
        stored_pos = (reader.meta("row")[start:start + count], reader.meta("col")[start:start + count])
    except st.StoreError:
        pass  # lost metadata: positions are checked by count and pixels only
    h = w.attrs.get("stats_hist") or {}
    at, rewritten = 0, 0
    for r0 in strip_starts(g.n_rows, patch_size):
        t = tile_strip(g, r0, patch_size=patch_size, max_invalid=float(e.get("max_invalid", 0.2)), clip=clip,
                       hist_bins=int(h.get("bins", DEFAULT_BINS)), row_block=row_block)
        if at + t.count > count:
            raise st.StoreError(f"{g.path}: tiling it again gives more than the {count} patches the store holds for "
                                f"granule {g.granule_id!r}: not the product (or settings) it was ingested from")
        if stored_pos is not None:
            rows, cols = stored_pos[0][at:at + t.count], stored_pos[1][at:at + t.count]
            if not (np.array_equal(rows, t.meta["row"]) and np.array_equal(cols, t.meta["col"])):
                raise st.StoreError(f"{g.path}: patch positions of rows {r0}.. differ from the store's for granule "
                                    f"{g.granule_id!r}: not the product it was ingested from")
        for j in range(t.count):
            i = start + at + j
            if i in todo:
                continue
            try:
                px, _ = reader.read(i)
            except st.StoreError:
                todo.add(i)  # damaged as well (not in the report): rewrite it too
                continue
            if not np.array_equal(px, t.patches[j]):
                raise st.StoreError(f"{g.path}: patch {i} tiled again differs from the stored one: not the product "
                                    f"granule {g.granule_id!r} was ingested from; nothing more rewritten")
        for j in range(t.count):
            if start + at + j in todo:
                w.rewrite(g.granule_id, at + j, t.patches[j:j + 1], t.valid[j:j + 1])
                rewritten += 1
        if t.count:
            w.rewrite_meta(g.granule_id, at, t.meta)
        at += t.count
    if at != count:
        raise st.StoreError(f"{g.path}: tiling it again gives {at} patches, the store holds {count} for granule "
                            f"{g.granule_id!r}: not the product (or settings) it was ingested from")
    return rewritten


def ingest(inputs: Sequence[str | Path] | str | Path, out_root: str | Path, *, patch_size: int = 256,
           patch_size_for: dict[str, int] | None = None, max_invalid: float = 0.2, workers: int = 1, shard: str | tuple[int, int] | None = None,
           progress: bool = True, storage_options: dict | None = None, keep_going: bool = False,
           executor: str | None = None, shards: int | None = None, finalise: bool = True) -> dict:
    """Ingest products (files or folders, expanded with ``find_products``) into stores under ``out_root``.

    Returns a summary: ``{"root", "stores": {url: {"sensor", "level", "granules_added",
    "granules_skipped", "patches_added", "n_patches", "n_granules"}}, "granules_added",
    "granules_skipped", "patches_added", "failed": [{"path", "granule_id", "error"}], "bytes_read",
    "seconds", "mb_per_s", "skipped"}`` (``skipped``: one line per kind of file that is not a product,
    e.g. the sidecars of a folder as downloaded; archives are unpacked into a temporary folder for the
    run), with ``"shard"`` and ``"datasets"`` (manifest URLs, or None while shards are missing) in
    sharded runs.

    ``shard`` ("k/N"): this run is shard ``k`` of a job array; it takes the products whose file
    name hashes to ``k`` (:func:`in_shard`) and writes shard ``k``'s stores of the logical datasets
    (:mod:`data_prep.dataset`). ``executor="dask://HOST:PORT"`` (a running Dask scheduler) or
    ``"dask://local:N"`` (a LocalCluster of N worker processes started here): the products are
    split into ``shards`` shards (default: the count recorded for ``out_root``, else the cluster's
    worker threads), one Dask task per shard, and the manifests are written when all are done.
    Products must be reachable from the workers under the same paths (a shared file system or URLs).
    """
    from data_prep.formats import discover, open_product

    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    shard_t = parse_shard(shard)
    if executor not in (None, "local") and shard_t is not None:
        raise UserError("--executor dask://... shards the run itself: give it --shards N, not --shard k/N")
    with discover(list(inputs)) as found:  # folders as downloaded; archives unpacked while this is open
        paths = [str(p) for p in found.products if in_shard(Path(p).name, shard_t)]
        if not paths and shard_t is None:
            raise ProductError(f"no products found in {[str(p) for p in inputs]}"
                               + "".join(f"; {line}" for line in found.summary_lines()))
        kw = {"patch_size": patch_size, "patch_size_for": patch_size_for, "max_invalid": max_invalid,
              "keep_going": keep_going}
        if executor not in (None, "local"):
            summary = _ingest_dask(paths, str(out_root), executor, shards, storage_options, kw)
        else:
            granules = []
            for p in paths:
                g = open_product(p, found.formats[Path(p)])
                g.path = found.origin(p)
                granules.append(g)
            summary = ingest_granules(granules, str(out_root), workers=workers, shard=shard_t, progress=progress,
                                      storage_options=storage_options, sources=paths, finalise=finalise, **kw)
    summary["skipped"] = found.summary_lines()
    return summary


def _ingest_shard(paths: list[str], out_root: str, shard: tuple[int, int], storage_options: dict | None,
                  kw: dict) -> dict:
    """One Dask task: shard ``shard``'s products, ingested serially into its shard stores (on a worker)."""
    from data_prep.formats import open_product

    return ingest_granules([open_product(p) for p in paths], out_root, shard=shard, progress=False,
                           storage_options=storage_options, sources=paths, finalise=False, **kw)


def _dask_client(address: str):
    """(client, cluster or None) for ``dask://HOST:PORT`` or ``dask://local:N``."""
    try:
        from distributed import Client, LocalCluster
    except ImportError:  # pragma: no cover - distributed is a dependency
        raise UserError("--executor dask://... needs the 'distributed' package (pip install 'dask[distributed]')") \
            from None
    spec = address.removeprefix("dask://")
    if spec == "local" or spec.startswith("local:"):
        try:
            n = int(spec.split(":", 1)[1]) if ":" in spec else max(1, os.cpu_count() or 1)
        except ValueError:
            raise UserError(f"executor {address!r}: expected dask://local:N with an integer N") from None
        if n < 1:
            raise UserError(f"executor {address!r}: N must be at least 1")
        cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None,
                               silence_logs=logging.ERROR)
        client = Client(cluster)
        client.run(_exit_with_parent)  # workers of a local cluster die with this process, even by kill -9
        return client, cluster
    if ":" not in spec:
        raise UserError(f"executor {address!r}: expected dask://HOST:PORT or dask://local:N")
    try:
        return Client(spec, timeout="60s"), None
    except (OSError, TimeoutError) as e:
        raise UserError(f"executor {address!r}: cannot reach the Dask scheduler: {e}") from None


def _ingest_dask(paths: list[str], out_root: str, address: str, shards: int | None, storage_options: dict | None,
                 kw: dict) -> dict:
    t0 = time.perf_counter()
    out_root = out_root.rstrip("/") or "/"
    check_root(out_root, storage_options)
    environ = dict(os.environ)
    client, cluster = _dask_client(address)
    try:
        n = shards or ds.layout(out_root, storage_options) or max(1, sum(client.nthreads().values()))
        ds.check_layout(out_root, n, storage_options)
        parts = [[p for p in paths if in_shard(Path(p).name, (k, n))] for k in range(n)]
        futures = [client.submit(_ingest_shard, parts[k], out_root, (k, n), storage_options, kw, pure=False,
                                 key=f"specfm-ingest-{ds.shard_name(k, n)}-{os.getpid()}-{time.time_ns()}")
                   for k in range(n)]
        results = client.gather(futures)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
        # distributed's Nanny writes its pre-spawn environment (MALLOC_TRIM_THRESHOLD_, ...) into this
        # process's os.environ; give the caller its own environment back
        os.environ.clear()
        os.environ.update(environ)
    summary: dict[str, Any] = {"root": out_root, "stores": {}, "granules_added": 0, "granules_skipped": 0,
                               "patches_added": 0, "failed": [], "bytes_read": 0, "shards": n}
    for r in results:
        summary["stores"].update(r["stores"])
        for k in ("granules_added", "granules_skipped", "patches_added", "bytes_read"):
            summary[k] += r[k]
        summary["failed"] += r["failed"]
    summary["datasets"] = ds.finalise(out_root, storage_options)
    summary["seconds"] = time.perf_counter() - t0
    summary["mb_per_s"] = summary["bytes_read"] / 1e6 / summary["seconds"]
    return summary

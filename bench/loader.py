"""Loader throughput against the bare zarr decode of the same chunks, and the read amplification of a layout.

Builds a realistic store in a temporary directory (EMIT-like: 285 bands with the registry's good-band mask,
256 x 256 FP16 patches, written through data_prep.store), then, for each worker type (threads, processes) and
worker count (default 1, 2 and the number of CPUs):

- the loader (``build_loader``, ``normalise_on="device"``: the GPU path, where workers only decode into the
  batch tensor and the GPU normalises): samples/s, decoded GB/s (whole chunks touched, FP16) and delivered GB/s
  (the FP16 crops handed out);
- the ceiling: the very same reads (same patches, windows, crops, the same band segments, so the same chunks, the
  same decoder, each segment decoded straight into new memory as the loader does) done by bare zarr calls in as
  many threads (or processes) as the loader has workers, no batching, no missing-chunk check, and for processes
  no hand-over of the pixels to this process (the loader does all three on top). The bare reads make zarr's own
  call per read (``get_basic_selection``: a round trip to zarr's event-loop thread each); the loader awaits a
  sample's reads in one round trip (``pretrain.data.reader.decode_into``), ~1 ms of CPU per sample less, so its
  CPU per sample can be below the ceiling's (``cpu_efficiency`` > 1);
- steady state: each loader is timed after :func:`warmup_batches` batches (its start and the growth of its reused
  batch buffers are left out, as in a training run that reads thousands of batches);
- fairness: each loader is closed (``SpecLoader.close``) before its ceiling is timed. Before, a dropped loader's
  torchdata threads/processes went on decoding ahead while the ceiling ran (measured: 0.5 CPU s in the second
  after a thread/2 loader was dropped), which slowed the ceiling and flattered the loader; and zarr's one decode
  thread per process (see ``pretrain.data.reader._make_zarr_executor``) had capped the thread ceilings too;
- ``cpu_efficiency``: CPU seconds per sample of the ceiling / of the loader (this process and its worker processes;
  robust to a loaded machine, where the wall-clock rates swing with what else runs); ``main_cpu_ms_per_sample``:
  the training process's share alone (with process workers: receiving the batches, the pipeline's threads);
- ``fraction_of_ceiling`` = loader / ceiling, measured back to back (loader, ceiling, loader, ceiling ...), the
  median over ``--repeats`` pairs; the spread is printed.
- the same with ``normalise_on="workers"`` (CPU training: workers also normalise to float32) for thread workers.

Read amplification = elements decoded (whole chunks touched by the segment reads of
:func:`pretrain.data.window_segments`) / elements delivered, over the timed reads. ``--compare-chunks`` writes
the same patches in a second layout and reports its amplification (old contiguous-range rule and segment rule),
its write MB/s and file count beside the main layout's: the cost of the layout choice.

``--json`` makes the last printed line one JSON object: ``fraction_of_ceiling`` (the lowest over worker types and
counts), ``read_amplification``, and per configuration samples/s and GB/s.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
from zarr.core.buffer.cpu import NDBuffer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_prep.progress import progress  # noqa: E402
from data_prep.registry import get_sensor  # noqa: E402
from data_prep.store import NO_TIME, BandStats, append_patches, create_store, write_stats  # noqa: E402
from pretrain.data import DataConfig, SourceConfig, build_loader, touched_elements, window_segments  # noqa: E402
from pretrain.data.loader import local_slots  # noqa: E402
from pretrain.data.reader import open_store  # noqa: E402

DEFAULT_CHUNKS = (8, 64)
"""(band chunk, spatial chunk) of the main store: read amplification <= 1.2 for every registry hyperspectral
sensor under the segment rule (see the module docstring and ``data_prep.store.choose_chunks``)."""


def make_patches(n: int, patch: int, sensor: str, seed: int = 0) -> np.ndarray:
    """Smooth spectra mixed from a few endmembers over smooth abundance maps, plus noise (compresses like data)."""
    s = get_sensor(sensor)
    rng = np.random.default_rng(seed)
    wl = s.wavelengths_nm
    yy, xx = np.mgrid[0:patch, 0:patch] / patch
    x = np.empty((n, s.n_bands, patch, patch), np.float16)
    for j in progress(range(n), desc="making patches", every=16):
        ends = np.stack([0.3 + 0.2 * np.sin(wl / rng.uniform(150, 600) + rng.uniform(0, 6)) for _ in range(4)])
        ab = np.stack([1 + np.sin(2 * np.pi * (rng.uniform(0.5, 3) * yy + rng.uniform(0.5, 3) * xx)
                                  + rng.uniform(0, 6)) for _ in range(4)])
        ab /= ab.sum(0, keepdims=True)
        cube = np.tensordot(ends.astype(np.float32), ab.astype(np.float32), axes=(0, 0))
        cube += 0.005 * rng.standard_normal(cube.shape, dtype=np.float32)
        x[j] = cube.astype(np.float16)
    return x


def write_store(url: str, x: np.ndarray, sensor: str, chunks: tuple[int, int]) -> dict:
    """Write ``x`` through data_prep.store in ``chunks`` = (band, spatial); returns write MB/s, files, bytes."""
    s = get_sensor(sensor)
    n, bands, patch, _ = x.shape
    g = create_store(url, sensor=sensor, level="L2", wavelengths_nm=s.wavelengths_nm, fwhm_nm=s.fwhm_nm,
                     good_bands=s.good_band_mask(), patch_size=patch, band_chunk=chunks[0], spatial_chunk=chunks[1])
    per = 8
    t0 = time.perf_counter()
    for k in range(0, n, per):
        m = min(per, n - k)
        meta = {"row": np.arange(k, k + m) * patch, "col": np.zeros(m), "lat": np.full(m, 34.0),
                "lon": np.full(m, -118.0), "time": np.full(m, NO_TIME), "gsd": np.full(m, 60.0),
                "valid_fraction": np.ones(m)}
        append_patches(g, granule_id=f"g{k}", source=f"/bench/g{k}", patches=x[k:k + m],
                       valid=np.ones((m, patch, patch), bool), meta=meta)
    dt = time.perf_counter() - t0
    ones = np.ones(bands)
    write_stats(g, BandStats(count=ones, mean=ones * 0.3, std=ones * 0.1, p01=ones * 0.05, p99=ones * 0.6))
    files = [p for p in Path(url).rglob("*") if p.is_file()]
    return {"write_mb_per_s": x.nbytes / dt / 1e6, "files": len(files),
            "files_per_patch": sum("patches" in p.parts for p in files) / n,
            "bytes": sum(p.stat().st_size for p in files)}


def cpu_seconds() -> float:
    """CPU seconds (user + system) used so far by this process and all its live descendants (worker processes)."""
    me = psutil.Process()
    total = 0.0
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
        except psutil.Error:  # exited meanwhile
            continue
        total += t.user + t.system
    return total


# ---------------------------------------------------------------- the bare reads (the ceiling)
_BARE: dict = {}


def _bare_init(url: str, decoder: str) -> None:
    _BARE["store"] = open_store(url, decoder=decoder)


def _bare_read(job: tuple) -> int:
    """One sample's reads with zarr alone, as the loader reads them: the same segments, decoded straight into a new
    buffer (``out=``; new memory, as a loader must hand out) where the segment is exactly the window's bands, else
    decoded and gathered; and the valid mask. No missing-chunk check, no batch tensor, no metadata, no hand-over
    to another process: the loader does those on top."""
    s = _BARE["store"]
    i, segs, nb, y0, x0, c = job
    buf = np.empty((nb, c, c), np.float16)
    ys, xs = slice(y0, y0 + c), slice(x0, x0 + c)
    for o, r0, r1, keep in segs:
        if keep is None:
            s.patches.get_basic_selection((i, slice(r0, r1), ys, xs), out=NDBuffer.from_numpy_array(buf[o:o + r1 - r0]))
        else:
            buf[o:o + keep.shape[0]] = s.patches[i, r0:r1, ys, xs][keep]
    s.valid[i, ys, xs]
    return nb


def _bare_chunk(jobs: list) -> int:
    return sum(_bare_read(j) for j in jobs)


def ceiling(url: str, decoder: str, jobs: list, workers: int, kind: str, pool=None) -> tuple[float, float]:
    """(samples/s, CPU s per sample) of the bare reads ``jobs`` in ``workers`` threads (or processes, warmed up
    in ``pool``)."""
    if kind == "thread":
        _bare_init(url, decoder)
        with ThreadPoolExecutor(workers) as ex:
            list(ex.map(_bare_read, jobs[:workers]))
            c0, t0 = cpu_seconds(), time.perf_counter()
            list(ex.map(_bare_read, jobs))
            return len(jobs) / (time.perf_counter() - t0), (cpu_seconds() - c0) / len(jobs)
    per = math.ceil(len(jobs) / workers)
    parts = [jobs[k:k + per] for k in range(0, len(jobs), per)]
    c0, t0 = cpu_seconds(), time.perf_counter()
    list(pool.map(_bare_chunk, parts))
    return len(jobs) / (time.perf_counter() - t0), (cpu_seconds() - c0) / len(jobs)


def warmup_batches(cfg: DataConfig) -> int:
    """Batches read before a loader is timed: past its start (threads, worker processes, opened stores) and past
    the growth of its reused batch buffers (``pretrain.data.loader.local_slots``: one per batch alive at once, each
    made, and its pages faulted in, the first time it is needed), so the timed batches are the steady state a
    training run sees. With 2 warm-up batches, the ~5-7 buffers still being made in the timed 16 were counted."""
    return local_slots(cfg.num_workers, cfg.prefetch) + 1


def run_loader(cfg: DataConfig, n_batches: int, warmup: int) -> tuple[float, float, list[dict], float]:
    """(samples/s and CPU s per sample over ``n_batches`` after ``warmup``, per-sample read descriptors of the
    timed batches, CPU s per sample of this process alone: the training process's share, without the workers)."""
    loader = build_loader(cfg)
    it = loader.batches() if cfg.normalise_on == "device" else iter(loader)
    for _ in range(warmup):
        next(it)
    reads, ns = [], 0
    c0, m0, t0 = cpu_seconds(), time.process_time(), time.perf_counter()
    for _ in range(n_batches):
        b = next(it)
        px = b["raw"] if "raw" in b else b["pixels"]
        ns += px.shape[0]
        m = b["meta"]
        for j in range(px.shape[0]):
            reads.append({"index": m["index"][j], "y0": m["crop_y"][j], "x0": m["crop_x"][j], "w0": m["band_start"][j],
                          "wn": px.shape[1]})
    dt, cpu, main = time.perf_counter() - t0, cpu_seconds() - c0, time.process_time() - m0
    loader.close()  # its threads/processes would go on decoding ahead while the ceiling is timed
    return ns / dt, cpu / ns, reads, main / ns


def amplification(reads: list[dict], good: np.ndarray, chunks: tuple[int, ...], crop: int) -> tuple[float, float]:
    """(segment rule, contiguous raw range rule) decoded / delivered elements over ``reads``."""
    seg = whole = delivered = 0
    _, cb, cy, cx = chunks
    for r in reads:
        sel = good[r["w0"]:r["w0"] + r["wn"]]
        seg += touched_elements(chunks, sel, r["y0"], r["x0"], crop)
        sp = touched_elements(chunks, np.array([0]), r["y0"], r["x0"], crop) // cb
        whole += (math.ceil((int(sel[-1]) + 1) / cb) - int(sel[0]) // cb) * cb * sp
        delivered += r["wn"] * crop * crop
    return seg / delivered, whole / delivered


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patches", type=int, default=64, help="patches in the store (default 64)")
    ap.add_argument("--patch-size", type=int, default=256)
    ap.add_argument("--sensor", default="emit", help="registry sensor whose bands the store uses (default emit)")
    ap.add_argument("--chunks", type=int, nargs=2, metavar=("BAND", "SPATIAL"), default=list(DEFAULT_CHUNKS),
                    help=f"band and spatial chunk of the store (default {DEFAULT_CHUNKS[0]} {DEFAULT_CHUNKS[1]})")
    ap.add_argument("--compare-chunks", type=int, nargs=2, metavar=("BAND", "SPATIAL"), default=[32, 64],
                    help="a second layout written from the same patches, for its amplification, write speed and "
                         "files (default 32 64, the layout before issue 16; 0 0 skips it)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--crop", type=int, default=128)
    ap.add_argument("--band-window", type=int, default=100)
    ap.add_argument("--batches", type=int, default=16, help="timed batches per measurement (default 16)")
    ap.add_argument("--repeats", type=int, default=5,
                    help="loader/ceiling pairs per configuration (median; default 5: on a shared 2-core box single "
                         "pairs swing by +-30%%)")
    ap.add_argument("--workers", type=int, nargs="+", default=None,
                    help="worker counts (default 1, 2 and the number of CPUs)")
    ap.add_argument("--worker-types", nargs="+", default=["thread", "process"], choices=["thread", "process"])
    ap.add_argument("--decoder", default="auto", choices=["auto", "zarrs", "zarr"])
    ap.add_argument("--store", default=None,
                    help="use (or build once, then keep) the store at this path instead of a temporary one")
    ap.add_argument("--json", action="store_true", help="last printed line is one JSON object of figures")
    args = ap.parse_args(argv)
    workers = args.workers or sorted({1, 2, os.cpu_count() or 2})
    chunks_arg = tuple(args.chunks)

    with tempfile.TemporaryDirectory() as tmp:
        url = args.store or f"{tmp}/{args.sensor}_L2.zarr"
        layout: dict = {}
        if not Path(url).exists() or (args.compare_chunks[0] > 0):
            x = make_patches(args.patches, args.patch_size, args.sensor)
            if not Path(url).exists():
                layout["main"] = write_store(url, x, args.sensor, chunks_arg)
            if args.compare_chunks[0] > 0:
                layout["compare"] = write_store(f"{tmp}/compare.zarr", x, args.sensor, tuple(args.compare_chunks))
            del x
        store = open_store(url, decoder=args.decoder)
        good = np.flatnonzero(store.good_bands)
        chunks = store.chunks
        load0 = os.getloadavg()
        print(f"store: {len(store)} x {store.n_bands} bands x {store.patch_size}^2, chunks {chunks}; "
              f"load average {load0[0]:.1f} on {os.cpu_count()} CPUs")
        c = args.crop
        results: dict = {}
        reads_all: list[dict] = []
        pools: dict = {}
        try:
            for kind in args.worker_types:
                for w in workers:
                    if kind == "process":
                        pools[w] = pools.get(w) or ProcessPoolExecutor(w, mp_context=mp.get_context("spawn"), initializer=_bare_init,
                                                                       initargs=(url, args.decoder))
                        list(pools[w].map(_bare_chunk, [[] for _ in range(w)]))
                    modes = ["device"] + (["workers"] if kind == "thread" else [])
                    for mode in modes:
                        fr, sp, cl, cf, cpl, cpm = [], [], [], [], [], []
                        for _ in range(args.repeats):
                            cfg = DataConfig(sources=[SourceConfig(url)], batch_size=args.batch_size, crop=c,
                                             band_window=args.band_window, num_workers=w, worker_type=kind,
                                             sensor_dropout=0.1, prefetch=2, decoder=args.decoder,
                                             normalise_on=mode, seed=len(sp))
                            sps, cpu_l, reads, cpu_m = run_loader(cfg, args.batches, warmup=warmup_batches(cfg))
                            reads_all += reads
                            jobs = []
                            for r in reads:
                                sel = good[r["w0"]:r["w0"] + r["wn"]]
                                jobs.append((r["index"], window_segments(sel, chunks[1]), sel.shape[0], r["y0"],
                                             r["x0"], c))
                            ceil, cpu_c = ceiling(url, args.decoder, jobs, w, kind, pools.get(w))
                            fr.append(sps / ceil)
                            cf.append(cpu_c / cpu_l)
                            cpl.append(cpu_l)
                            cpm.append(cpu_m)
                            sp.append(sps)
                            cl.append(ceil)
                        amp_seg, _ = amplification(reads, good, chunks, c)
                        s_med = statistics.median(sp)
                        dec_gb = s_med * amp_seg * args.band_window * c * c * 2 / 1e9
                        key = f"{kind}/{w}" + ("" if mode == "device" else "/normalise_in_workers")
                        results[key] = {"samples_per_s": s_med, "decoded_gb_per_s": dec_gb,
                                        "delivered_gb_per_s": s_med * args.band_window * c * c * 2 / 1e9,
                                        "ceiling_samples_per_s": statistics.median(cl),
                                        "fraction_of_ceiling": statistics.median(fr),
                                        "fraction_spread": [min(fr), max(fr)],
                                        "cpu_ms_per_sample": statistics.median(cpl) * 1e3,
                                        "main_cpu_ms_per_sample": statistics.median(cpm) * 1e3,
                                        "cpu_efficiency": statistics.median(cf)}
                        r = results[key]
                        print(f"{key:34s} {r['samples_per_s']:7.1f} samples/s, decoded {dec_gb:.3f} GB/s, delivered "
                              f"{r['delivered_gb_per_s']:.3f} GB/s; ceiling {r['ceiling_samples_per_s']:7.1f} "
                              f"samples/s; fraction {r['fraction_of_ceiling']:.3f} "
                              f"(pairs {', '.join(f'{f:.3f}' for f in fr)}); CPU per sample: ceiling / loader "
                              f"{r['cpu_efficiency']:.3f} (loader {r['cpu_ms_per_sample']:.1f} ms, of which the training process "
                              f"{r['main_cpu_ms_per_sample']:.2f} ms)", flush=True)
        finally:
            for p in pools.values():
                p.shutdown()
        amp, amp_whole = amplification(reads_all, good, chunks, c)
        print(f"read amplification (decoded / delivered elements of patches, chunks {chunks}): {amp:.3f} "
              f"(whole raw band range, the rule before issue 16: {amp_whole:.3f})")
        out = {
            "fraction_of_ceiling": round(min(r["fraction_of_ceiling"] for k, r in results.items()
                                             if not k.endswith("normalise_in_workers")), 3),
            "read_amplification": round(amp, 4),
            "cpu_efficiency": round(min(r["cpu_efficiency"] for k, r in results.items()
                                        if not k.endswith("normalise_in_workers")), 3),
            "read_amplification_whole_range": round(amp_whole, 4),
            "by_config": {k: {kk: (round(v, 4) if isinstance(v, float) else [round(u, 3) for u in v])
                              for kk, v in r.items()} for k, r in results.items()},
            "store": {"patches": len(store), "bands": store.n_bands, "patch_size": store.patch_size,
                      "chunks": list(chunks), "sensor": args.sensor,
                      "decoder": type(store.patches.async_array.codec_pipeline).__name__},
            "batch_size": args.batch_size, "crop": c, "band_window": args.band_window, "workers": workers,
            "timed_samples": len(reads_all), "load_average": [round(load0[0], 2), round(os.getloadavg()[0], 2)],
            "cpus": os.cpu_count(),
        }
        if layout:
            from data_prep.store import read_amplification as store_rule

            for name, lay in layout.items():
                ch = tuple(args.chunks) if name == "main" else tuple(args.compare_chunks)
                full = (1, min(ch[0], store.n_bands), ch[1], ch[1])
                segs = amplification(reads_all, good, full, c)
                lay.update({"chunks": list(full), "read_amplification": round(segs[0], 4),
                            "read_amplification_whole_range": round(segs[1], 4),
                            "store_rule_amplification": round(store_rule(full, store.good_bands, store.patch_size,
                                                                         window=args.band_window, crop=c), 4)})
                print(f"layout {name} {full}: write {lay['write_mb_per_s']:.1f} MB/s, {lay['files']} files "
                      f"({lay['files_per_patch']:.0f} per patch), {lay['bytes'] / 1e6:.1f} MB; amplification "
                      f"{lay['read_amplification']:.3f} (segments) / {lay['read_amplification_whole_range']:.3f} "
                      f"(whole range)")
            out["layouts"] = {k: {kk: (round(v, 2) if isinstance(v, float) else v) for kk, v in lay.items()}
                              for k, lay in layout.items()}
        frac = out["fraction_of_ceiling"]
        print(f"fraction of ceiling (lowest over worker types and counts, GPU path): {frac:.3f}")
        if args.json:
            print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

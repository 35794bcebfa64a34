"""Loader throughput against the bare zarr decode of the same chunks.

Builds a realistic store in a temporary directory (EMIT-like: 285 bands with the registry's good-band
mask, 256 x 256 FP16 patches, written through data_prep.store), then measures:

- samples/s and MB/s (normalised float32 pixels) delivered by ``build_loader`` for 1 and 2 workers;
- read amplification: elements of ``patches`` decoded (whole chunks touched, from the array's own chunk
  shape) per element delivered;
- the ceiling: the same (patch, band range, crop) reads done with zarr alone (``patches`` and ``valid``
  slices, no normalisation, no batching), with 1 and 2 threads.

``--json`` makes the last printed line one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import zarr

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_prep.progress import progress  # noqa: E402
from data_prep.registry import get_sensor  # noqa: E402
from data_prep.store import (  # noqa: E402
    DEFAULT_BAND_CHUNK,
    DEFAULT_SPATIAL_CHUNK,
    NO_TIME,
    BandStats,
    append_patches,
    create_store,
    write_stats,
)

try:  # the ingest helper's layout choice; absent in older store.py
    from data_prep.store import choose_chunks
except ImportError:  # pragma: no cover
    choose_chunks = None
from pretrain.data import DataConfig, SourceConfig, build_loader, touched_elements  # noqa: E402


def build_store(url: str, n: int, patch: int, sensor: str, chunks: tuple[int, int] | None = None,
                seed: int = 0) -> None:
    """Smooth spectra mixed from a few endmembers over smooth abundance maps, plus noise (compresses like data).

    ``chunks`` = (band chunk, spatial chunk); None = what ingest chooses (``store.choose_chunks``).
    """
    s = get_sensor(sensor)
    bands = s.n_bands
    rng = np.random.default_rng(seed)
    good = s.good_band_mask()
    if chunks is None:
        if choose_chunks is None:
            chunks = (DEFAULT_BAND_CHUNK, DEFAULT_SPATIAL_CHUNK)
        else:
            chunks = choose_chunks(good, patch)[:2]
    g = create_store(url, sensor=sensor, level="L2", wavelengths_nm=s.wavelengths_nm, fwhm_nm=s.fwhm_nm,
                     good_bands=good, patch_size=patch, band_chunk=chunks[0], spatial_chunk=chunks[1])
    wl = s.wavelengths_nm
    yy, xx = np.mgrid[0:patch, 0:patch] / patch
    per = 8
    for k in progress(range(0, n, per), desc="building store", every=10):
        m = min(per, n - k)
        x = np.empty((m, bands, patch, patch), np.float16)
        for j in range(m):
            ends = np.stack([0.3 + 0.2 * np.sin(wl / rng.uniform(150, 600) + rng.uniform(0, 6)) for _ in range(4)])
            ab = np.stack([1 + np.sin(2 * np.pi * (rng.uniform(0.5, 3) * yy + rng.uniform(0.5, 3) * xx)
                                      + rng.uniform(0, 6)) for _ in range(4)])
            ab /= ab.sum(0, keepdims=True)
            cube = np.tensordot(ends.astype(np.float32), ab.astype(np.float32), axes=(0, 0))
            cube += 0.005 * rng.standard_normal(cube.shape, dtype=np.float32)
            x[j] = cube.astype(np.float16)
        v = np.ones((m, patch, patch), bool)
        meta = {"row": np.arange(k, k + m) * patch, "col": np.zeros(m), "lat": np.full(m, 34.0),
                "lon": np.full(m, -118.0), "time": np.full(m, NO_TIME), "gsd": np.full(m, 60.0),
                "valid_fraction": np.ones(m)}
        append_patches(g, granule_id=f"g{k}", source=f"/bench/g{k}", patches=x, valid=v, meta=meta)
    ones = np.ones(bands)
    write_stats(g, BandStats(count=ones, mean=ones * 0.3, std=ones * 0.1, p01=ones * 0.05, p99=ones * 0.6))


def run_loader(cfg: DataConfig, n_batches: int, warmup: int) -> tuple[float, float, list[dict]]:
    """(samples/s, MB/s of pixels, per-sample read descriptors of the timed batches)."""
    loader = build_loader(cfg)
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    reads, nbytes, ns = [], 0, 0
    t0 = time.perf_counter()
    for _ in range(n_batches):
        b = next(it)
        ns += b["pixels"].shape[0]
        nbytes += b["pixels"].numel() * 4
        m = b["meta"]
        for j in range(b["pixels"].shape[0]):
            reads.append({"index": m["index"][j], "y0": m["crop_y"][j], "x0": m["crop_x"][j],
                          "w0": m["band_start"][j], "wn": b["pixels"].shape[1]})
    dt = time.perf_counter() - t0
    return ns / dt, nbytes / dt / 1e6, reads


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patches", type=int, default=64, help="patches in the store (default 64)")
    ap.add_argument("--patch-size", type=int, default=256)
    ap.add_argument("--sensor", default="emit", help="registry sensor whose bands the store uses (default emit)")
    ap.add_argument("--chunks", type=int, nargs=2, metavar=("BAND", "SPATIAL"), default=None,
                    help="band and spatial chunk of the store (default: what ingest chooses for the sensor)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--crop", type=int, default=128)
    ap.add_argument("--band-window", type=int, default=100)
    ap.add_argument("--batches", type=int, default=24, help="timed batches per worker count")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--worker-type", default="thread", choices=["thread", "process"])
    ap.add_argument("--store", default=None,
                    help="use (or build once, then keep) the store at this path instead of a temporary one")
    ap.add_argument("--json", action="store_true", help="last printed line is one JSON object of figures")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        url = args.store or f"{tmp}/{args.sensor}_L2.zarr"
        if not Path(url).exists():
            t0 = time.perf_counter()
            build_store(url, args.patches, args.patch_size, args.sensor, args.chunks)
            print(f"store: {args.patches} x {get_sensor(args.sensor).n_bands} bands x {args.patch_size}^2 "
                  f"built in {time.perf_counter() - t0:.1f} s")
        sps, mbs, reads = {}, {}, []
        for w in args.workers:
            cfg = DataConfig(sources=[SourceConfig(url)], batch_size=args.batch_size, crop=args.crop,
                             band_window=args.band_window, num_workers=w, worker_type=args.worker_type,
                             sensor_dropout=0.1, prefetch=2)
            sps[w], mbs[w], r = run_loader(cfg, args.batches, warmup=2)
            reads = reads or r
            print(f"loader, {w} {args.worker_type} worker(s): {sps[w]:.1f} samples/s, {mbs[w]:.1f} MB/s delivered")

        g = zarr.open_group(url, mode="r")
        patches, valid = g["patches"], g["valid"]
        good = np.flatnonzero(np.asarray(g.attrs["good_bands"], bool))
        chunks = tuple(patches.chunks)
        c = args.crop
        decoded = delivered = 0
        jobs = []
        for r in reads:
            sel = good[r["w0"]:r["w0"] + r["wn"]]
            b0, b1 = int(sel[0]), int(sel[-1]) + 1
            decoded += touched_elements(chunks, b0, b1, r["y0"], r["x0"], c)
            delivered += r["wn"] * c * c
            jobs.append((r["index"], b0, b1, r["y0"], r["x0"]))
        amp = decoded / delivered

        def bare(job):
            i, b0, b1, y0, x0 = job
            return patches[i, b0:b1, y0:y0 + c, x0:x0 + c], valid[i, y0:y0 + c, x0:x0 + c]

        ceiling = {}
        for w in args.workers:
            with ThreadPoolExecutor(w) as ex:
                list(ex.map(bare, jobs[:8]))
                t0 = time.perf_counter()
                list(ex.map(bare, jobs))
                ceiling[w] = len(jobs) / (time.perf_counter() - t0)
            print(f"zarr alone, same reads, {w} thread(s): {ceiling[w]:.1f} samples/s")
        frac = {w: sps[w] / ceiling[w] for w in args.workers}
        print(f"read amplification (decoded / delivered elements of patches, chunks {chunks}): {amp:.3f}")
        print("fraction of ceiling: " + ", ".join(f"{w} worker(s) {f:.2f}" for w, f in frac.items()))
        out = {
            "samples_per_s": {str(w): round(v, 2) for w, v in sps.items()},
            "mb_per_s": {str(w): round(v, 1) for w, v in mbs.items()},
            "read_amplification": round(amp, 4),
            "ceiling_samples_per_s": {str(w): round(v, 2) for w, v in ceiling.items()},
            "fraction_of_ceiling": round(min(frac.values()), 3),
            "fraction_of_ceiling_by_workers": {str(w): round(v, 3) for w, v in frac.items()},
            "store": {"patches": args.patches, "bands": int(patches.shape[1]), "patch_size": args.patch_size,
                      "chunks": list(chunks), "sensor": args.sensor},
            "batch_size": args.batch_size, "crop": c, "band_window": args.band_window,
            "worker_type": args.worker_type, "timed_samples": len(reads),
        }
        if args.json:
            print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

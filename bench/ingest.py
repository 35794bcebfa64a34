"""Ingest throughput (one machine, and a Dask cluster of 1 and 2 workers), read amplification, missing-data check cost.

    python bench/ingest.py [--sensor aviris-ng --level L1 --rows 512 --cols 512 --products 4 --machines 32] [--json]

1. Ingest, single process: an in-memory AVIRIS-NG-sized granule (the sensor's band count, 512 x 512 by
   default, smooth spectra plus noise and a nodata margin) is ingested with 256-pixel patches into a local
   store; MB/s = float32 input bytes read / wall seconds (tiling, float16, statistics, zstd, CRC, writes).
2. Ingest on Dask: ``--products`` such granules written as ENVI products, ingested with
   ``--executor dask://...`` on a LocalCluster of 1 and then 2 worker processes (one shard per worker, each
   writing its own shard store; the cluster is started before the clock). ``projected_hours_17tb``: 17 TB of
   float32 input at N machines, each ingesting at the 2-worker rate measured here (a machine = this box; shards
   write independently, nothing is shared but the input file system, so the figure scales with N until that
   saturates: an assumption, not a measurement).
3. Read amplification: the loader's reads (100 good bands starting on the 32-band stride, read as
   ``window_segments``; 128 x 128 crop with corners on the spatial-chunk grid, the loader's default; also on
   a 32-pixel grid) through ``PatchStore.read``; bytes decoded are counted by wrapping the Blosc codec's
   decode (every float16 chunk it decompresses), bytes delivered = 100 x 128 x 128 x 2. Also printed: the
   analytic figure from the chunk grid, and the same for every sensor.
4. Missing-data detection: the time of ``PatchStore.check_read`` (the NaN / fill-value test of one read)
   beside the time of the read itself, over the same reads.

The last line printed with ``--json`` is one JSON object with ``ingest_mb_s``, ``dask_mb_s`` (per worker
count), ``projected_hours_17tb``, ``read_amplification`` and ``missing_check_fraction``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_prep import store as st  # noqa: E402
from data_prep.granule import Granule  # noqa: E402
from data_prep.ingest import ingest_granules  # noqa: E402
from data_prep.registry import get_sensor, load_registry  # noqa: E402


class _Reader:
    def __init__(self, cube):
        self.cube = cube

    def __call__(self, r0, r1):
        c = self.cube[:, r0:r1].copy()
        return c, np.isfinite(c).all(axis=0)


def make_granule(sensor: str, level: str, rows: int, cols: int, seed: int = 0) -> Granule:
    s = get_sensor(sensor)
    rng = np.random.default_rng(seed)
    nb = s.n_bands
    hi = s.level(level).clip[1]
    spectra = rng.uniform(0.05, 0.5, size=(4, nb)).astype(np.float32) * (hi / 1.5)
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
    w = np.stack([np.sin(yy / 37 + k) * np.cos(xx / 23 - k) + 1.0 for k in range(4)])
    w /= w.sum(axis=0, keepdims=True)
    cube = np.einsum("kb,kyx->byx", spectra, w).astype(np.float32)
    cube += rng.normal(0, 0.01 * hi / 1.5, size=cube.shape).astype(np.float32)
    cube[:, :, :12] = np.nan  # nodata margin along the flightline edge
    return Granule(path=f"/bench/{sensor}_{level}.bin", granule_id=f"bench-{sensor}-{level}", sensor=sensor,
                   level=level, shape=cube.shape, wavelengths_nm=s.wavelengths_nm, fwhm_nm=s.fwhm_nm,
                   good_bands=s.good_band_mask(), read_rows=_Reader(cube), gsd_m=s.gsd_m)


def write_products(d: Path, sensor: str, level: str, rows: int, cols: int, n: int) -> list[Path]:
    from data_prep.formats import write_product

    out = []
    for k in range(n):
        g = make_granule(sensor, level, rows, cols, seed=k)
        cube, _ = g.read_rows(0, rows)
        out.append(write_product(d, sensor=sensor, level=level, cube=cube, name=f"ang2025010{k}t000000_rdn"))
    return out


def dask_rates(products_dir: Path, workers: list[int], patch_size: int, tmp: Path) -> dict:
    """MB/s of ``ingest --executor dask://...`` on a LocalCluster of each worker count (cluster started first)."""
    import logging

    from distributed import LocalCluster

    from data_prep.ingest import ingest

    out = {}
    for w in workers:
        with LocalCluster(n_workers=w, threads_per_worker=1, processes=True, dashboard_address=None,
                          silence_logs=logging.ERROR) as cluster:
            addr = cluster.scheduler_address.removeprefix("tcp://")
            res = ingest([str(products_dir)], str(tmp / f"dask{w}"), patch_size=patch_size, progress=False,
                         executor=f"dask://{addr}", shards=w)
        out[w] = {"mb_s": round(res["mb_per_s"], 2), "seconds": round(res["seconds"], 2),
                  "input_mb": round(res["bytes_read"] / 1e6, 1), "patches": res["patches_added"]}
    return out


def check_cost(url: str, n: int, window=100, stride=32, crop=128, seed=2) -> dict:
    """ms of the read and of its missing-data check (``PatchStore.check_read``), over the same crops."""
    s = st.PatchStore(url)
    good = np.flatnonzero(s.good_bands)
    rng = np.random.default_rng(seed)
    n_starts = (good.size - window) // stride + 1
    positions = list(range(0, s.patch_size - crop + 1, s.chunks[2]))
    t_read = t_check = 0.0
    for _ in range(n):
        i = int(rng.integers(s.n_patches))
        sel = good[int(rng.integers(n_starts)) * stride:][:window]
        y0, x0 = (int(v) for v in rng.choice(positions, 2))
        t0 = time.perf_counter()
        px = s.patches[i, int(sel[0]):int(sel[-1]) + 1, y0:y0 + crop, x0:x0 + crop]
        va = s.valid[i, y0:y0 + crop, x0:x0 + crop]
        t1 = time.perf_counter()
        s.check_read(f"patch {i}", px, va)
        t_check += time.perf_counter() - t1
        t_read += t1 - t0
    return {"read_ms": 1000 * t_read / n, "check_ms": 1000 * t_check / n, "fraction": t_check / t_read}


class DecodeCounter:
    """Counts the bytes the Blosc codec decompresses for float16 arrays (the ``patches`` chunks)."""

    def __init__(self):
        from zarr.codecs.blosc import BloscCodec

        self.cls = BloscCodec
        self.orig = BloscCodec._decode_single
        self.bytes = 0
        self.chunks = 0
        counter = self

        async def wrapped(codec, chunk_bytes, chunk_spec):
            out = await counter.orig(codec, chunk_bytes, chunk_spec)
            if np.dtype(chunk_spec.dtype.to_native_dtype()) == np.float16:
                counter.bytes += int(np.prod(chunk_spec.shape)) * 2
                counter.chunks += 1
            return out

        BloscCodec._decode_single = wrapped

    def close(self):
        self.cls._decode_single = self.orig


def measure_reads(url: str, n: int, window=100, stride=32, crop=128, seed=0, align: int | None = None) -> dict:
    s = st.PatchStore(url)
    good = np.flatnonzero(s.good_bands)
    rng = np.random.default_rng(seed)
    n_starts = (good.size - window) // stride + 1
    align = align or s.chunks[2]  # the loader's default: crop corners on the spatial-chunk grid
    positions = list(range(0, s.patch_size - crop + 1, align))
    counter = DecodeCounter()
    delivered = 0
    t0 = time.perf_counter()
    try:
        for _ in range(n):
            i = int(rng.integers(s.n_patches))
            w0 = int(rng.integers(n_starts)) * stride
            sel = good[w0:w0 + window]
            y0, x0 = (int(v) for v in rng.choice(positions, 2))
            for _, r0, r1, keep in st.window_segments(sel, s.chunks[1]):  # as the loader reads
                px, _ = s.read(i, r0, r1, y0, x0, crop)
                delivered += (px if keep is None else px[keep]).nbytes
    finally:
        secs = time.perf_counter() - t0
        counter.close()
    return {"read_amplification": counter.bytes / delivered, "chunks_per_sample": counter.chunks / n,
            "ms_per_sample": 1000 * secs / n,
            "analytic": st.read_amplification(s.chunks, s.good_bands, s.patch_size, window=window, stride=stride,
                                              crop=crop, align=align)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sensor", default="aviris-ng")
    ap.add_argument("--level", default="L1")
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--cols", type=int, default=512)
    ap.add_argument("--patch-size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--samples", type=int, default=64, help="reads for the amplification measurement")
    ap.add_argument("--products", type=int, default=4, help="products for the Dask measurement")
    ap.add_argument("--dask-workers", type=int, nargs="+", default=[1, 2], help="LocalCluster sizes to measure")
    ap.add_argument("--machines", type=int, nargs="+", default=[1, 8, 32, 128],
                    help="machine counts for the 17 TB projection")
    ap.add_argument("--out", default=None, help="store root (default: a temporary folder)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)

    g = make_granule(a.sensor, a.level, a.rows, a.cols)
    with tempfile.TemporaryDirectory() as tmp:
        root = a.out or tmp
        res = ingest_granules([g], root, patch_size=a.patch_size, workers=a.workers, progress=False)
        url = st.store_url(root, a.sensor, a.level)
        mb = res["bytes_read"] / 1e6
        s = st.PatchStore(url)
        import fsspec

        fs, path = fsspec.core.url_to_fs(url)
        disk = sum(int(v["size"]) for v in fs.find(path, detail=True).values())
        reads = measure_reads(url, a.samples)
        reads32 = measure_reads(url, max(8, a.samples // 4), align=32, seed=1)
        cost = check_cost(url, a.samples)
        pdir = Path(tmp) / "products"
        write_products(pdir, a.sensor, a.level, a.rows, a.cols, a.products)
        dask = dask_rates(pdir, a.dask_workers, a.patch_size, Path(tmp))
        rate = dask[max(dask)]["mb_s"]
        hours = {str(m): round(17e6 / (rate * m) / 3600, 1) for m in a.machines} if rate > 0 else None
        per_sensor = {}
        for name, sensor in load_registry().items():
            good = sensor.good_band_mask()
            bc, sc, amp = st.choose_chunks(good, a.patch_size)
            per_sensor[name] = {"chunks": [1, bc, sc, sc], "read_amplification": round(amp, 3),
                                "chunks_per_read": round(st.chunks_per_read((1, bc, sc, sc), good, a.patch_size), 1),
                                "with_1x32x64x64": round(st.read_amplification((1, 32, 64, 64), good, a.patch_size), 3)}
        out = {
            "sensor": a.sensor, "level": a.level, "granule_shape": list(g.shape), "workers": a.workers,
            "patches": s.n_patches, "input_mb": round(mb, 1), "seconds": round(res["seconds"], 3),
            "ingest_mb_s": round(res["mb_per_s"], 2),
            "dask_mb_s": {str(w): v["mb_s"] for w, v in dask.items()}, "dask": {str(w): v for w, v in dask.items()},
            "dask_scaling": round(dask[max(dask)]["mb_s"] / dask[min(dask)]["mb_s"], 2) if len(dask) > 1 else None,
            "projected_hours_17tb": hours, "projection_rate_mb_s_per_machine": rate,
            "stored_mb": round(disk / 1e6, 2), "compression_ratio": round(s.n_patches * s.n_bands * a.patch_size ** 2 * 2
                                                                          / max(disk, 1), 3),
            "chunks": list(s.chunks), "shards": list(s.patches.shards),
            "read_amplification": round(reads["read_amplification"], 4),
            "read_amplification_analytic": round(reads["analytic"], 4),
            "chunks_per_sample": round(reads["chunks_per_sample"], 1),
            "read_ms_per_sample": round(reads["ms_per_sample"], 2),
            "read_amplification_crops_on_32px_grid": round(reads32["read_amplification"], 4),
            "read_ms": round(cost["read_ms"], 3), "missing_check_ms": round(cost["check_ms"], 3),
            "missing_check_fraction": round(cost["fraction"], 4),
            "per_sensor": per_sensor,
        }
    if not a.json:
        for k, v in out.items():
            if k != "per_sensor":
                print(f"{k}: {v}")
        for k, v in out["per_sensor"].items():
            print(f"  {k}: chunks {v['chunks']} amplification {v['read_amplification']}, "
                  f"{v['chunks_per_read']} chunks per read (1x32x64x64 chunks: {v['with_1x32x64x64']})")
    else:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

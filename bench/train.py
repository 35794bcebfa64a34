"""Training throughput and memory per ZeRO stage: DeepSpeed on two CPU ranks (gloo) at the same model.

    python bench/train.py [--model base] [--steps 6] [--json]

For each of ZeRO 0, 2 and 3, launches ``torchrun --nproc_per_node=2 launch/pretrain.py`` on a seeded random
patch store and reads the run's summary: median samples/s over the logged steps (after the first) and the
peak resident memory of each rank while training (before the end-of-stage checkpoint and export; the peak
including them is reported too). With ``--json`` the last line is one JSON object with ``samples_per_s``
and ``peak_rss_mb_per_rank``, each keyed ``zero0``, ``zero2``, ``zero3``.

Peak RSS is the kernel's high-water mark (``ru_maxrss``), so it includes memory the C allocator holds but
no tensor uses. ZeRO-3 CPU ranks run with a fixed glibc mmap threshold
(``pretrain.engine.bound_cpu_allocator``; an exported ``MALLOC_MMAP_THRESHOLD_`` overrides it), without
which ZeRO-3's gather/release pattern fragments the heap and its RSS grows every step (the price: page
faults, ZeRO-3 steps are slower). The default model is ViT-B ("base", 117 M parameters): a few minutes on
two cores; timings are noisy on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.launching import launch_env  # noqa: E402


def make_store(url: str, n: int = 16, bands: int = 64, patch: int = 32, seed: int = 0) -> None:
    from data_prep.store import NO_TIME, BandStats, append_patches, create_store, write_stats

    rng = np.random.default_rng(seed)
    g = create_store(url, sensor="emit", level="L2", wavelengths_nm=np.linspace(400, 2400, bands),
                     fwhm_nm=np.full(bands, 8.0), good_bands=np.ones(bands, bool), patch_size=patch,
                     band_chunk=32, spatial_chunk=16)
    x = rng.random((n, bands, patch, patch)).astype(np.float16)
    meta = {"row": np.arange(n) * patch, "col": np.zeros(n), "lat": np.zeros(n), "lon": np.zeros(n),
            "time": np.full(n, NO_TIME), "gsd": np.full(n, 30.0), "valid_fraction": np.ones(n)}
    append_patches(g, granule_id="bench", source="bench", patches=x, valid=np.ones((n, patch, patch), bool), meta=meta)
    xf = x.astype(np.float64)
    write_stats(g, BandStats(count=np.full(bands, xf[:, 0].size, float), mean=xf.mean((0, 2, 3)),
                             std=xf.std((0, 2, 3)), p01=np.percentile(xf, 1, axis=(0, 2, 3)),
                             p99=np.percentile(xf, 99, axis=(0, 2, 3))))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="base", help="model size (pretrain.models.MODEL_SIZES)")
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps per ZeRO stage")
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--crop", type=int, default=32)
    ap.add_argument("--bands", type=int, default=32, help="band window")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = ap.parse_args(argv)
    env = {**launch_env(wandb=os.environ.get("WANDB_MODE", "disabled")), "DS_ACCELERATOR": "cpu"}  # CPU ranks always
    result: dict = {"model": args.model, "world_size": 2, "steps": args.steps, "micro_batch": args.micro_batch,
                    "crop": args.crop, "band_window": args.bands, "samples_per_s": {}, "peak_rss_mb_per_rank": {},
                    "wall_s": {}, "precision": "fp32",
                    "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_", "zero3: 1 MiB (bound_cpu_allocator); zero0/2: glibc default")}
    with tempfile.TemporaryDirectory() as tmp:
        url = f"{tmp}/emit_L2.zarr"
        make_store(url, n=max(16, 4 * args.micro_batch), bands=max(64, args.bands), patch=max(32, args.crop))
        for zero in (0, 2, 3):
            run = Path(tmp) / f"zero{zero}"
            cfg = {"run_dir": str(run), "data": {"sources": [{"url": url}], "crop": args.crop,
                                                 "band_window": args.bands, "num_workers": 0},
                   "model": {"name": args.model},
                   "parallel": {"zero_stage": zero, "micro_batch": args.micro_batch, "grad_accum": 1},
                   "checkpoint": {"every": 10**6}, "optim": {"warmup_steps": 1},
                   "logging": {"wandb": "disabled", "every": 1, "viz_every": -1, "progress": False},
                   "stages": [{"name": "bench", "steps": args.steps}]}
            path = Path(tmp) / f"zero{zero}.yaml"
            path.write_text(yaml.safe_dump(cfg))
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                   f"--master_port={free_port()}", str(REPO / "launch/pretrain.py"), "--config", str(path)]
            t = time.perf_counter()
            r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
            if r.returncode != 0:
                print(r.stdout[-2000:], r.stderr[-4000:], file=sys.stderr)
                return 1
            s = json.loads((run / "summary.json").read_text())
            key = f"zero{zero}"
            result["samples_per_s"][key] = round(s["samples_per_s"], 2)
            result["peak_rss_mb_per_rank"][key] = s["train_peak_rss_mb_per_rank"]
            result.setdefault("peak_rss_mb_per_rank_incl_save", {})[key] = s["peak_rss_mb_per_rank"]
            result["wall_s"][key] = round(time.perf_counter() - t, 1)
            print(f"ZeRO-{zero}: {s['samples_per_s']:.2f} samples/s, peak RSS per rank (MiB) "
                  f"{s['train_peak_rss_mb_per_rank']} (with checkpoint+export {s['peak_rss_mb_per_rank']}), {result['wall_s'][key]} s wall", flush=True)
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

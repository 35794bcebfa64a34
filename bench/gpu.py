"""The GPU path in one command: samples/s per GPU, MFU, data-wait fraction and peak memory of a pretraining stage.

Simulates an EMIT-like store (285 bands, 256 x 256 FP16 patches, the loader's 8 x 64 x 64 chunks), then runs
the real trainer (``launch/pretrain.py``, one process, one GPU) on the SpecAware ViT-B MAE stage: micro-batch
32, 128 x 128 crops, 100-band windows at stride 32, ``bf16-autocast``, fused AdamW, pinned loader batches
normalised on the GPU. Each variant (eager / ``torch.compile``, ZeRO 0 / 2) runs ``--steps`` optimizer steps
in its own process; from its ``metrics.jsonl`` the first ``--skip`` records (warm-up, compilation) are dropped
and the median of the rest is printed:

- ``samples_per_s`` (per GPU: one process), ``mfu`` (model FLOPs / ``--peak-tflops``), ``data_wait_fraction``
  (time the step loop was blocked on the loader / step time), peak GPU memory (``cuda_max_allocated_mb``) and
  peak host RSS; and the final loss of each variant (eager and compiled should agree: adopt ``parallel.compile``
  only where they do).

Targets of issue 16 for an H100-class GPU: >= 1,000 samples/s, >= 40% MFU, data wait <= 5%.

``--smoke``: the debug model, a tiny store, 4 steps, fp32, eager only, ZeRO 0 and 2, on whatever device there is
(CPU in the test suite, so this script cannot rot before a GPU is at hand). ``--json``: the last line is one
JSON object of figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from loader import make_patches, write_store  # noqa: E402  (bench/loader.py: the same simulated store)

from bench.launching import launch_env  # noqa: E402


def stage_config(store: str, run_dir: Path, *, model: str, micro_batch: int, crop: int, window: int, steps: int,
                 zero: int, compile_: bool, precision: str, workers: int, peak_tflops: float) -> dict:
    return {
        "run_dir": str(run_dir), "seed": 0,
        "data": {"sources": [{"url": store}], "crop": crop, "band_window": window, "band_stride": 32,
                 "sensor_dropout": 0.1, "num_workers": workers, "prefetch": 4, "pin_memory": True},
        "model": {"name": model, "objective": "mae"},
        "parallel": {"zero_stage": zero, "micro_batch": micro_batch, "global_batch": micro_batch,
                     "precision": precision, "compile": compile_},
        "optim": {"lr": 1.5e-4, "min_lr": 1e-5, "warmup_steps": 2},
        "checkpoint": {"every": 10**9, "keep": 1},
        "logging": {"wandb": "disabled", "every": 1, "viz_every": -1, "peak_tflops": peak_tflops, "progress": False},
        "stages": [{"name": "bench", "steps": steps}],
    }


def run_variant(cfg: dict, path: Path, timeout: float) -> dict:
    """Run one variant in its own process; the medians of its step records (first ``skip`` dropped)."""
    path.write_text(yaml.safe_dump(cfg))
    env = launch_env(omp_threads=None)
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, str(REPO / "launch/pretrain.py"), "--config", str(path)], env=env,
                         capture_output=True, text=True, timeout=timeout, check=False)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"variant {path.stem} failed (exit {res.returncode}):\n{res.stderr[-3000:]}")
    recs = [json.loads(x) for x in (Path(cfg["run_dir"]) / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {"records": [r for r in recs if "samples_per_s" in r], "wall_s": wall}


def summarise(records: list[dict], skip: int) -> dict:
    use = records[skip:] or records[-1:]

    def med(key: str) -> float | None:
        vals = [r[key] for r in use if r.get(key) is not None]
        return statistics.median(vals) if vals else None

    return {"samples_per_s": med("samples_per_s"), "mfu": med("mfu"), "data_wait_fraction": med("data_wait_fraction"),
            "tflops_per_rank": med("tflops_per_rank"),
            "peak_gpu_mb": max((r.get("cuda_max_allocated_mb") or 0.0) for r in records) or None,
            "peak_rss_mb": max((r.get("peak_rss_mb") or 0.0) for r in records),
            "first_loss": records[0].get("loss"), "final_loss": records[-1].get("loss"), "records": len(use)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny model and store, a few steps (CPU-friendly)")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per variant (default 40; smoke 4)")
    ap.add_argument("--skip", type=int, default=None, help="first records dropped (default 10; smoke 1)")
    ap.add_argument("--micro-batch", type=int, default=None, help="default 32 (smoke 2)")
    ap.add_argument("--patches", type=int, default=None, help="patches in the simulated store (default 48; smoke 8)")
    ap.add_argument("--workers", type=int, default=None, help="loader workers (default 8; smoke 1)")
    ap.add_argument("--variants", default=None,
                    help="comma-separated eager|compiled x zero0|zero2, e.g. eager-zero0,compiled-zero2 "
                         "(default all four; smoke eager-zero0,eager-zero2)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="peak bf16 TFLOP/s per GPU (H100 SXM dense)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per variant before it is given up")
    ap.add_argument("--out", default=None, help="keep the store and runs here instead of a temporary folder")
    ap.add_argument("--json", action="store_true", help="last printed line is one JSON object of figures")
    args = ap.parse_args(argv)
    smoke = args.smoke
    steps = args.steps or (4 if smoke else 40)
    skip = args.skip if args.skip is not None else (1 if smoke else 10)
    mb = args.micro_batch or (2 if smoke else 32)
    patches = args.patches or (8 if smoke else 48)
    workers = args.workers if args.workers is not None else (1 if smoke else 8)
    variants = (args.variants or ("eager-zero0,eager-zero2" if smoke else
                                  "eager-zero0,eager-zero2,compiled-zero0,compiled-zero2")).split(",")
    import torch

    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if cuda else "cpu"
    precision = "bf16-autocast" if cuda and not smoke else "fp32"
    size, crop, window = (32, 32, 24) if smoke else (256, 128, 100)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out or tmp)
        root.mkdir(parents=True, exist_ok=True)
        store = str(root / "emit_L2.zarr")
        t0 = time.perf_counter()
        if not Path(store).exists():
            write_store(store, make_patches(patches, size, "emit"), "emit", (8, 32 if smoke else 64))
        print(f"device {device}; store {patches} x 285 x {size}^2 ready in {time.perf_counter() - t0:.1f} s; "
              f"{'debug' if smoke else 'base'} MAE, micro-batch {mb}, {precision}, {steps} steps per variant",
              flush=True)
        out: dict = {"device": device, "precision": precision, "micro_batch": mb, "steps": steps, "smoke": smoke,
                     "variants": {}}
        for v in variants:
            kind, zero = v.split("-")
            cfg = stage_config(store, root / f"run_{v}", model="debug" if smoke else "base", micro_batch=mb, crop=crop,
                               window=window, steps=steps, zero=int(zero.removeprefix("zero")),
                               compile_=kind == "compiled", precision=precision, workers=workers,
                               peak_tflops=args.peak_tflops)
            r = run_variant(cfg, root / f"{v}.yaml", args.timeout)
            s = summarise(r["records"], skip)
            s["wall_s"] = r["wall_s"]
            out["variants"][v] = s
            mem = f"{s['peak_gpu_mb']:.0f} MiB GPU" if s["peak_gpu_mb"] else f"{s['peak_rss_mb']:.0f} MiB RSS"
            mfu = f"{100 * s['mfu']:.1f}%" if s["mfu"] is not None else "n/a"
            dw = f"{100 * s['data_wait_fraction']:.1f}%" if s["data_wait_fraction"] is not None else "n/a"
            print(f"{v:16s} {s['samples_per_s']:8.1f} samples/s per GPU, MFU {mfu}, data wait {dw}, peak {mem}, "
                  f"loss {s['first_loss']:.4f} -> {s['final_loss']:.4f} ({s['wall_s']:.0f} s)", flush=True)
        if args.json:
            print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""MAE step cost with the HyperEmbedding against the same MAE with a fixed Conv2d patch embedding.

For the base size (``--sizes``) at 100 bands, 128 x 128, patch 8, over a grid of batch sizes (``--batches``,
default 2 and 8) and hypernetwork ranks (``--ranks``, default 32 and 64, SpecAware's default and its own), this
prints:

- forward+backward step time (wall) of the MAE with HyperEmbedding + HyperLinear output and of the same MAE with a
  fixed Conv2d patch embedding and a fixed Linear output (same token count, same ViT and decoder), measured
  in one run, alternating the two models step by step so both see the same machine load (median of reps, and
  the spread of the per-rep ratios), and the same for the process's CPU time (``--threads 1`` makes that ratio
  immune to other processes taking the cores of a shared box, which the wall-clock ratio is not);
- the same for the embedding alone (conditioning + token making, forward+backward);
- FLOPs per sample (``torch.utils.flop_counter.FlopCounterMode``, forward+backward) of both models, and the
  forward FLOPs of the hyper embedding alone; the contraction order the hyper embedding picked;
- parameter counts of the hyper embedding (hypernetworks, meta + content encoders);
- with ``--memory``: peak memory of a step (the growth of resident memory during the first step after building,
  sampled by a thread, each configuration in its own fresh process).

``--json`` makes the last printed line one JSON object with ``worst_hyper_over_fixed`` (the largest step-time
ratio over the grid), ``worst_hyper_over_fixed_cpu_time`` (the same in CPU time), ``hyper_over_fixed`` per
``b<batch>_r<rank>``, and the rest of the figures.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pretrain.models import build_model  # noqa: E402


def make_batch(b: int, c: int, size: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"pixels": torch.randn(b, c, size, size, generator=g),
            "wavelengths": torch.linspace(420, 2450, c).expand(b, -1).clone(),
            "fwhm": torch.full((b, c), 8.0), "sensor": torch.tensor([1, 2] * b)[:b],
            "level": torch.tensor([1, 2] * b)[:b], "valid": torch.ones(b, size, size, dtype=torch.bool)}


def build(size: str, embed: str, bands: int, rank: int | None = None) -> torch.nn.Module:
    torch.manual_seed(0)
    if embed == "hyper":
        return build_model(size, **({"rank": rank} if rank else {}))
    return build_model(size, patch_embed="fixed", fixed_bands=bands)


def step(model: torch.nn.Module, batch: dict, seed: int) -> None:
    out = model(batch, generator=torch.Generator().manual_seed(seed))
    out["loss"].backward()
    model.zero_grad(set_to_none=True)


def embed_step(model: torch.nn.Module, batch: dict) -> None:
    tok, _ = model.encoder.embed(batch["pixels"], batch["wavelengths"], batch["fwhm"], batch["sensor"],
                                 batch["level"], batch["valid"])
    tok.square().mean().backward()
    model.zero_grad(set_to_none=True)


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call."""
    t, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t, time.process_time() - c


def flops(model: torch.nn.Module, bands: int, size: int) -> tuple[float, float]:
    """(forward+backward FLOPs of one MAE sample, forward FLOPs of the embedding of one sample)."""
    from torch.utils.flop_counter import FlopCounterMode

    batch = make_batch(1, bands, size)
    fc = FlopCounterMode(display=False)
    with fc:
        step(model, batch, 0)
    total = fc.get_total_flops()
    fc = FlopCounterMode(display=False)
    with fc, torch.no_grad():
        model.encoder.embed(batch["pixels"], batch["wavelengths"], batch["fwhm"], batch["sensor"], batch["level"])
    return float(total), float(fc.get_total_flops())


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_step_memory(model: torch.nn.Module, batch: dict, seed: int) -> float:
    """Peak resident-memory growth (MiB) during one step, sampled every 0.5 ms by a thread.

    Meaningful for the first step in a fresh process (see :func:`memory`): later steps reuse memory that
    malloc kept. tracemalloc does not see torch's allocator and ru_maxrss keeps earlier peaks (the build)."""
    gc.collect()
    base = rss_bytes()
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.0005)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    step(model, batch, seed)
    stop.set()
    t.join()
    return (max(peak[0], rss_bytes()) - base) / 2**20


def child_memory(size: str, embed: str, bands: int, image: int, batch_size: int, rank: int | None) -> None:
    """Subprocess body: build, then print the RSS growth of the first training step (gradients included)."""
    model = build(size, embed, bands, rank)
    batch = make_batch(batch_size, bands, image)
    print(json.dumps({"peak_step_mib": peak_step_memory(model, batch, 0)}))


def memory(size: str, embed: str, args: argparse.Namespace, batch: int, rank: int) -> float:
    """Peak step memory of one configuration, measured in its own fresh process."""
    cmd = [sys.executable, __file__, "--child", size, embed, "--bands", str(args.bands), "--image",
           str(args.image), "--batches", str(batch), "--ranks", str(rank)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"memory subprocess for {size}/{embed} failed:\n{res.stderr[-2000:]}")
    return float(json.loads(res.stdout.strip().splitlines()[-1])["peak_step_mib"])


def bench_config(size: str, args: argparse.Namespace, batch_size: int, rank: int, fixed: torch.nn.Module) -> dict:
    hyper = build(size, "hyper", args.bands, rank)
    batch = make_batch(batch_size, args.bands, args.image)
    for m in (hyper, fixed):  # warm-up
        step(m, batch, 0)
    th, tf, ch, cf, eh, ef = [], [], [], [], [], []
    for r in range(args.reps):
        for times, cpus, m in ((th, ch, hyper), (tf, cf, fixed)):
            wall, cpu = timed(lambda r=r, m=m: step(m, batch, r + 1))
            times.append(wall)
            cpus.append(cpu)
        if args.embed_times:
            eh.append(timed(lambda: embed_step(hyper, batch))[0])
            ef.append(timed(lambda: embed_step(fixed, batch))[0])
    fh, feh = flops(hyper, args.bands, args.image)
    ff, fef = flops(fixed, args.bands, args.image)
    enc = hyper.encoder
    n = (args.image // enc.patch_size) ** 2
    n_vis = n - min(max(int(round(hyper.args.mask_ratio * n)), 0), n - 1)
    hyper_params = sum(p.numel() for p in enc.hyper.parameters())
    cond_params = sum(p.numel() for p in enc.meta.parameters()) + sum(p.numel() for p in enc.content.parameters())
    ratios = [a / b for a, b in zip(th, tf)]
    cpu_ratios = [a / b for a, b in zip(ch, cf)]
    res = {
        "batch": batch_size, "rank": rank,
        "step_s_hyper": statistics.median(th), "step_s_fixed": statistics.median(tf),
        "ratio_per_rep": [round(x, 4) for x in ratios],
        "cpu_s_hyper": statistics.median(ch), "cpu_s_fixed": statistics.median(cf),
        "cpu_ratio_per_rep": [round(x, 4) for x in cpu_ratios],
        "hyper_over_fixed_cpu_time": statistics.median(cpu_ratios),
        "gflops_per_sample_hyper": fh / 1e9, "gflops_per_sample_fixed": ff / 1e9,
        "gflops_per_sample_estimate": hyper.flops_per_sample(args.bands, args.image) / 1e9,
        "embed_gflops_fwd_hyper": feh / 1e9, "embed_gflops_fwd_fixed": fef / 1e9,
        "contraction": enc.hyper.contraction(args.bands, n_vis),
        "hyper_embed_params": hyper_params + cond_params, "hypernet_params": hyper_params,
        "conditioning_params": cond_params, "hyperlinear_params": sum(p.numel() for p in hyper.head.parameters()),
        "fixed_embed_params": sum(p.numel() for p in fixed.encoder.fixed.parameters()),
        "total_params_hyper": sum(p.numel() for p in hyper.parameters()),
        "total_params_fixed": sum(p.numel() for p in fixed.parameters()),
    }
    if eh:
        res["embed_step_s_hyper"], res["embed_step_s_fixed"] = statistics.median(eh), statistics.median(ef)
    res["hyper_over_fixed_step_time"] = statistics.median(ratios)
    res["hyper_over_fixed_flops"] = fh / ff
    res["hyper_share_of_step"] = max(0.0, res["step_s_hyper"] - res["step_s_fixed"]) / res["step_s_hyper"]
    hyper = None  # noqa: F841 - free it before the memory subprocesses
    gc.collect()
    if args.memory:
        res["peak_step_mib_hyper"] = memory(size, "hyper", args, batch_size, rank)
        res["peak_step_mib_fixed"] = memory(size, "fixed", args, batch_size, rank)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="base", help="comma-separated model sizes (default base)")
    ap.add_argument("--bands", type=int, default=100, help="bands per sample (default 100)")
    ap.add_argument("--image", type=int, default=128, help="square image side in pixels (default 128)")
    ap.add_argument("--batches", default="2,8", help="comma-separated batch sizes (default 2,8)")
    ap.add_argument("--ranks", default="32,64", help="comma-separated hypernetwork ranks (default 32,64)")
    ap.add_argument("--reps", type=int, default=3, help="timed steps per model (median; default 3)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (default: torch's own). With 1, the CPU-time ratio "
                         "(hyper_over_fixed_cpu_time) is not moved by other processes on a shared box")
    ap.add_argument("--embed-times", action="store_true", help="also time the embedding alone")
    ap.add_argument("--memory", action="store_true", help="measure peak step memory (fresh processes; slow)")
    ap.add_argument("--child", nargs=2, metavar=("SIZE", "EMBED"), help=argparse.SUPPRESS)
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON object on the last line")
    args = ap.parse_args(argv)
    batches = [int(x) for x in args.batches.split(",") if x]
    ranks = [int(x) for x in args.ranks.split(",") if x]
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.child:
        child_memory(args.child[0], args.child[1], args.bands, args.image, batches[0], ranks[0])
        return 0
    sizes = [s for s in args.sizes.split(",") if s]
    out: dict = {"bands": args.bands, "image": args.image, "patch": 8, "batches": batches, "ranks": ranks,
                 "threads": torch.get_num_threads(), "device": "cpu", "load_average_start": os.getloadavg()[0],
                 "sizes": {}}
    worst = 0.0
    for size in sizes:
        out["sizes"][size] = {}
        for bs in batches:
            fixed = build(size, "fixed", args.bands)
            for rank in ranks:
                print(f"[{size}] {args.bands} bands, {args.image}x{args.image}, batch {bs}, rank {rank} ...", flush=True)
                r = bench_config(size, args, bs, rank, fixed)
                out["sizes"][size][f"b{bs}_r{rank}"] = r
                worst = max(worst, r["hyper_over_fixed_step_time"])
                print(f"  step (fwd+bwd): hyper {r['step_s_hyper']:.3f} s, fixed {r['step_s_fixed']:.3f} s, ratio "
                      f"{r['hyper_over_fixed_step_time']:.3f} (per rep {r['ratio_per_rep']}); contraction "
                      f"{r['contraction']}")
                print(f"  CPU time: hyper {r['cpu_s_hyper']:.3f} s, fixed {r['cpu_s_fixed']:.3f} s, ratio "
                      f"{r['hyper_over_fixed_cpu_time']:.3f} (per rep {r['cpu_ratio_per_rep']})")
                if "embed_step_s_hyper" in r:
                    print(f"  embedding alone (fwd+bwd): hyper {r['embed_step_s_hyper']:.3f} s, fixed "
                          f"{r['embed_step_s_fixed']:.3f} s")
                print(f"  GFLOPs/sample (fwd+bwd): hyper {r['gflops_per_sample_hyper']:.2f}, fixed "
                      f"{r['gflops_per_sample_fixed']:.2f} (ratio {r['hyper_over_fixed_flops']:.3f}); embedding fwd "
                      f"hyper {r['embed_gflops_fwd_hyper']:.3f}, fixed {r['embed_gflops_fwd_fixed']:.3f}; estimate "
                      f"{r['gflops_per_sample_estimate']:.2f}")
                print(f"  hyper embedding params {r['hyper_embed_params'] / 1e6:.2f} M (hypernetworks "
                      f"{r['hypernet_params'] / 1e6:.2f} M), fixed embedding {r['fixed_embed_params'] / 1e6:.2f} M")
                if "peak_step_mib_hyper" in r:
                    print(f"  peak RSS growth over a step: hyper {r['peak_step_mib_hyper']:.0f} MiB, fixed "
                          f"{r['peak_step_mib_fixed']:.0f} MiB")
            del fixed
            gc.collect()
    out["worst_hyper_over_fixed"] = worst
    out["worst_hyper_over_fixed_cpu_time"] = max(v["hyper_over_fixed_cpu_time"] for d in out["sizes"].values()
                                                 for v in d.values())
    out["hyper_over_fixed"] = {f"{size}/{k}": round(v["hyper_over_fixed_step_time"], 4)
                               for size, d in out["sizes"].items() for k, v in d.items()}
    out["load_average_end"] = os.getloadavg()[0]
    if "base" in out["sizes"] and out["sizes"]["base"]:
        b = next(iter(out["sizes"]["base"].values()))
        out["hyper_embed_params_base"] = b["hyper_embed_params"]
        out["hypernet_params_base"] = b["hypernet_params"]
        out["gflops_per_sample_base"] = b["gflops_per_sample_hyper"]
        out["embed_gflops_fwd_base"] = b["embed_gflops_fwd_hyper"]
    print(f"worst hyper/fixed step-time ratio over the grid: {worst:.3f}")
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Co-located pretraining, measured: the loader's group throughput beside the single-store rate, and what the
co-located JEPA stage is worth downstream.

    python bench/colocated.py [--json]                     # loader: single-store, mixed and co-located rates
    python bench/colocated.py --value [--seeds 3] [--json] # + pretraining and the downstream comparison

Loader (``--stores ROOT`` or simulated here: EnMAP, EMIT, DESIS, Sentinel-2, Landsat 8/9 at 1920 m squares, one
patch per location and sensor, ``prepare_colocated``): the same stores read three ways, back to back, ``--repeats``
times (median, min-max spread printed), thread workers: ``store`` (one store per batch, the EnMAP store),
``mixed`` (every store, any sensor mix in a batch), ``colocated`` (groups: 2 global + 2 local views per location).
Figures: samples/s (a group counts once; ``views_per_s`` counts its views), delivered MB/s (float32 pixels handed
out). On a loaded 2-core box only ratios within one run mean anything.

Value (``--value``): two pretraining runs of the same debug encoder (``fusion_depth 1``) on the same co-located
stores, each through ``torchrun launch/pretrain.py`` on 2 CPU ranks: ``mae`` (``--mae-steps + --jepa-steps`` MAE
steps, mixed batches) and ``colocated_jepa`` (``--mae-steps`` MAE steps, then ``--jepa-steps`` of the co-located JEPA
objective: global view = EnMAP + Sentinel-2 fused, local views from every sensor), each pair once per
``--pretrain-seeds`` seed. Downstream, on places neither saw (another simulation seed): the cross-sensor task (linear
probe trained on EnMAP tiles, tested on DESIS tiles and on Sentinel-2 tiles of the same places;
``finetune.tasks.crosssensor``) and the fusion task (EnMAP + Sentinel-2, ``finetune.tasks.fusion``), for the JEPA
export, the MAE export and random init of the same architecture (a fresh draw per pretraining seed), over
``--seeds`` task seeds per encoder: mean and standard deviation over all (pretraining seed, task seed) pairs; the
JSON keeps every value. ``token_spread_desis``: a collapse check per encoder (:func:`token_spread`).

Measured (2-core box shared with other jobs, ``--value --pretrain-seeds 3 --seeds 3``, 150 + 150 steps, mean +- std
over the 9 pretraining x task seeds): cross-sensor EnMAP -> DESIS OA: co-located JEPA 0.376 +- 0.034, MAE
0.380 +- 0.032, random init 0.240 +- 0.047; EnMAP -> Sentinel-2 OA: 0.274 +- 0.042, 0.347 +- 0.037, 0.236 +- 0.029;
fusion PSNR: 23.04 +- 0.23, 22.92 +- 0.30, 22.93 +- 0.21 dB. Both pretrained encoders beat random init on the
cross-sensor task; the co-located JEPA stage adds nothing over MAE at this scale (below it on Sentinel-2), and no
encoder beats random init on fusion. Loader: co-located groups 0.36-0.45 x the single-store samples/s (4 views each:
1.4-1.8 x its views/s).
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

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import yaml  # noqa: E402

from bench.launching import launch_env  # noqa: E402
from pretrain.data import DataConfig, SourceConfig, build_loader  # noqa: E402

SENSORS = ("enmap", "emit", "desis", "sentinel-2", "landsat-8-9-oli")
COLOCATED = {"global_sensors": ["enmap", "sentinel-2"], "local_sensors": list(SENSORS), "local_views": 2,
             "footprint_m": 480.0}


def make_stores(root: Path, locations: int, seed: int) -> Path:
    from data_prep.simulate.colocated import prepare_colocated

    prepare_colocated(root / "raw", str(root / "stores"), sensors=SENSORS, levels=["L2"], locations=locations,
                      extent_m=1920.0, patch_m=1920.0, seed=seed, progress=False)
    return root / "stores"


def _sources(stores: Path, only: tuple[str, ...] = SENSORS) -> list[SourceConfig]:
    return [SourceConfig(str(stores / f"{s}_L2.zarr")) for s in only]


def _bytes(batch: dict) -> int:
    if "views" in batch:
        return sum(v["pixels"].numel() * 4 for v in batch["views"])
    return batch["pixels"].numel() * 4


def time_loader(cfg: DataConfig, batches: int, warmup: int = 2) -> dict:
    loader = build_loader(cfg)
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    t0 = time.perf_counter()
    n = nbytes = views = 0
    for _ in range(batches):
        b = next(it)
        n += cfg.batch_size
        nbytes += _bytes(b)
        views += cfg.batch_size * len(b.get("views", [None]))
    dt = time.perf_counter() - t0
    return {"samples_per_s": n / dt, "views_per_s": views / dt, "mb_per_s": nbytes / dt / 1e6}


def loader_figures(stores: Path, workers: int, batches: int, repeats: int) -> dict:
    base = dict(batch_size=4, crop=32, band_window=64, band_stride=32, num_workers=workers, sensor_dropout=0.0,
                prefetch=2)
    modes = {"store": DataConfig(sources=_sources(stores, ("enmap",)), **base),
             "mixed": DataConfig(sources=_sources(stores), mix="mixed", **base),
             "colocated": DataConfig(sources=_sources(stores), colocated=COLOCATED, **base)}
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for _ in range(repeats):
        for m, cfg in modes.items():
            runs[m].append(time_loader(cfg, batches))
    out = {}
    for m, rs in runs.items():
        out[m] = {k: round(statistics.median(r[k] for r in rs), 2) for k in rs[0]}
        out[m]["samples_per_s_range"] = [round(min(r["samples_per_s"] for r in rs), 2),
                                         round(max(r["samples_per_s"] for r in rs), 2)]
    out["colocated_over_store_samples"] = round(out["colocated"]["samples_per_s"] / out["store"]["samples_per_s"], 3)
    out["colocated_over_store_mb"] = round(out["colocated"]["mb_per_s"] / out["store"]["mb_per_s"], 3)
    return out


# ----------------------------------------------------------------------------------------------- value
def run_config(stores: Path, run_dir: Path, mae_steps: int, jepa_steps: int, jepa: bool, seed: int = 0) -> dict:
    stages = [{"name": "mae", "steps": mae_steps + (0 if jepa else jepa_steps)}]
    if jepa:
        stages.append({"name": "colocated_jepa", "objective": "jepa", "steps": jepa_steps,
                       "data": {"band_window": 32, "colocated": COLOCATED}})
    return {"run_dir": str(run_dir), "seed": seed,
            "data": {"sources": [{"url": s.url} for s in _sources(stores)], "crop": 32, "band_window": 32,
                     "band_stride": 16, "num_workers": 1, "mix": "mixed"},
            "model": {"name": "debug", "objective": "mae", "overrides": {"fusion_depth": 1, "gsd_pos": True}},
            "parallel": {"zero_stage": 2, "micro_batch": 4, "global_batch": 8},
            "optim": {"lr": 1e-3, "warmup_steps": 10},
            "checkpoint": {"every": 1000, "keep": 1},
            "logging": {"wandb": "disabled", "every": 10, "viz_every": -1, "progress": False},
            "stages": stages}


def pretrain(cfg: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    env = launch_env()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "launch/pretrain.py"), "--config", str(path)]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"pretraining failed ({path}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return Path(cfg["run_dir"]) / "export" / cfg["stages"][-1]["name"]


def losses(run_dir: Path) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "loss" in r and "stage" in r:
            out.setdefault(r["stage"], []).append(round(float(r["loss"]), 4))
    return out


def downstream(encoders: dict, cross_manifest: Path, fusion_manifest: Path, seeds: int, probe_steps: int,
               fusion_steps: int) -> dict:
    from data_prep import configtree
    from finetune.config import TaskConfig
    from finetune.datasets import load_dataset
    from finetune.tasks import run_task

    tasks = {
        "cross_enmap_to_desis": {"kind": "cross_sensor", "data": {
            "loader": "synthetic_cross_sensor", "manifest": str(cross_manifest), "train_sensor": "enmap",
            "test_sensor": "desis", "band_stride": 4}, "train": {"mode": "linear_probe", "steps": probe_steps,
                                                                "batch_size": 16, "lr": 0.01}},
        "cross_enmap_to_sentinel2": {"kind": "cross_sensor", "data": {
            "loader": "synthetic_cross_sensor", "manifest": str(cross_manifest), "train_sensor": "enmap",
            "test_sensor": "sentinel-2", "band_stride": 4}, "train": {"mode": "linear_probe", "steps": probe_steps,
                                                                     "batch_size": 16, "lr": 0.01}},
        "fusion": {"kind": "fusion", "data": {"loader": "synthetic_fusion", "manifest": str(fusion_manifest),
                                              "hs_sensor": "enmap", "band_stride": 4},
                   "head": {"features": 32}, "train": {"mode": "finetune", "steps": fusion_steps, "batch_size": 8,
                                                       "lr": 0.005, "encoder_lr": 0.0002},
                   "eval": {"tile": 24, "overlap": 12, "train_fraction": 0.5}},
    }
    data = {name: load_dataset(t["data"]) for name, t in tasks.items()}
    out: dict = {}
    for name, t in tasks.items():
        out[name] = {}
        for label, makers in encoders.items():
            vals, metric = [], None
            for make in makers:  # one encoder per pretraining seed (random init: one fresh draw per seed)
                for seed in range(seeds):
                    cfg = configtree.build(TaskConfig, {"name": name, **t, "train": {**t["train"], "seed": seed}},
                                           name)
                    res = run_task(make(), data[name], cfg)
                    metric = {"cross_sensor": "OA", "fusion": "PSNR"}[t["kind"]]
                    vals.append(float(res.metrics[metric]))
            out[name][label] = {"metric": metric, "values": [round(v, 4) for v in vals],
                                "mean": round(statistics.mean(vals), 4),
                                "std": round(statistics.stdev(vals), 4) if len(vals) > 1 else 0.0}
    return out


@torch.no_grad()
def token_spread(enc, data) -> float:
    """Collapse check: the mean over feature channels of the std across tiles of each tile's mean-pooled tokens,
    relative to their root mean square (0 when every tile maps to the same vector)."""
    from finetune.datasets.base import normalise
    from finetune.tasks.base import spectral_tensors

    d = data.test
    x = torch.from_numpy(normalise(d.patches, d.valid)[0].astype("float32"))
    side = max(x.shape[-1] // enc.patch_size, 1) * enc.patch_size
    x = torch.nn.functional.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
    wl, fw = spectral_tensors(d.spectral)
    tok = enc.eval()(x[:64], wl, fw, d.spectral.sensor, d.spectral.level).float()  # [B, N, D]
    pooled = tok.mean(1)
    return float(pooled.std(0).mean() / pooled.pow(2).mean().sqrt().clamp_min(1e-12))


def value(tmp: Path, args) -> dict:
    from bench.downstream import random_twin
    from data_prep.simulate.corpus import simulate_corpus
    from finetune.encoder_api import load_encoder

    stores = make_stores(tmp / "pretrain", args.locations, seed=0)
    runs: dict = {}
    for ps in range(args.pretrain_seeds):
        for label, jepa in (("colocated_jepa", True), ("mae", False)):
            cfg = run_config(stores, tmp / f"run_{label}_{ps}", args.mae_steps, args.jepa_steps, jepa, seed=ps)
            t0 = time.time()
            r = {"export": pretrain(cfg, tmp / f"{label}_{ps}.yaml"), "seconds": round(time.time() - t0, 1),
                 "losses": losses(Path(cfg["run_dir"]))}
            runs.setdefault(label, []).append(r)
            print(f"[pretrain {label} seed {ps}] {r['seconds']} s; losses {r['losses']}", flush=True)
    # downstream data the pretraining never saw: other places (seed 1) and a fusion pair (seed 7)
    from data_prep.simulate.colocated import simulate_colocated

    cross = simulate_colocated(tmp / "cross", sensors=["enmap", "desis", "sentinel-2"], levels=["L2"],
                               locations=args.cross_locations, extent_m=1920.0, seed=1, progress=False)
    fusion = simulate_corpus(tmp / "fusion", sensors=["enmap"], levels=["L2"], scenes=1, size=48, seed=7,
                             change_pairs=False, progress=False)
    def loader(path):
        return lambda: load_encoder(path)

    def fresh(path, seed):
        return lambda: random_twin(load_encoder(path), seed=seed)

    mae_exports = [r["export"] for r in runs["mae"]]
    encoders = {"colocated_jepa": [loader(r["export"]) for r in runs["colocated_jepa"]],
                "mae": [loader(e) for e in mae_exports],
                "random_init": [fresh(e, ps) for ps, e in enumerate(mae_exports)]}
    res = downstream(encoders, cross, fusion, args.seeds, args.probe_steps, args.fusion_steps)
    from finetune.datasets import load_dataset

    tiles = load_dataset({"loader": "synthetic_cross_sensor", "manifest": str(cross), "train_sensor": "enmap",
                          "test_sensor": "desis", "band_stride": 4})
    spread = {label: [round(token_spread(make(), tiles), 4) for make in makers] for label, makers in encoders.items()}
    return {"pretraining": {k: [{"seconds": r["seconds"], "losses": r["losses"]} for r in v] for k, v in runs.items()},
            "downstream": res, "token_spread_desis": spread, "seeds": args.seeds,
            "pretrain_seeds": args.pretrain_seeds, "mae_steps": args.mae_steps, "jepa_steps": args.jepa_steps}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stores", default=None, help="a root of co-located stores with locations.json (default: "
                                                   "simulated here)")
    ap.add_argument("--locations", type=int, default=8, help="simulated locations for the loader and pretraining")
    ap.add_argument("--workers", type=int, default=2, help="loader thread workers")
    ap.add_argument("--batches", type=int, default=12, help="timed batches per measurement")
    ap.add_argument("--repeats", type=int, default=3, help="measurements per mode (median)")
    ap.add_argument("--value", action="store_true", help="also pretrain and compare downstream (tens of minutes)")
    ap.add_argument("--mae-steps", type=int, default=150)
    ap.add_argument("--jepa-steps", type=int, default=150)
    ap.add_argument("--seeds", type=int, default=3, help="downstream task seeds (per pretraining seed)")
    ap.add_argument("--pretrain-seeds", type=int, default=1,
                    help="pretraining seeds: each pair of runs (and the random init) per seed; the spread pools "
                         "pretraining seeds x task seeds")
    ap.add_argument("--cross-locations", type=int, default=6, help="places of the cross-sensor task")
    ap.add_argument("--probe-steps", type=int, default=100)
    ap.add_argument("--fusion-steps", type=int, default=60)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--json", action="store_true", help="last printed line is one JSON object of figures")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-colocated-") as tmp:
        tmp = Path(tmp)
        stores = Path(args.stores) if args.stores else make_stores(tmp / "loader", args.locations, seed=0)
        out["loader"] = loader_figures(stores, args.workers, args.batches, args.repeats)
        for m in ("store", "mixed", "colocated"):
            f = out["loader"][m]
            print(f"loader {m:9s}: {f['samples_per_s']:7.2f} samples/s (range {f['samples_per_s_range']}), "
                  f"{f['views_per_s']:7.2f} views/s, {f['mb_per_s']:7.2f} MB/s delivered", flush=True)
        print(f"co-located / single-store: {out['loader']['colocated_over_store_samples']} x samples/s, "
              f"{out['loader']['colocated_over_store_mb']} x MB/s", flush=True)
        if args.value:
            out["value"] = value(tmp, args)
            for task, per in out["value"]["downstream"].items():
                for label, r in per.items():
                    print(f"{task:26s} {label:15s} {r['metric']}: {r['mean']:.4f} +- {r['std']:.4f} "
                          f"(seeds: {r['values']})")
            print(f"token spread on DESIS tiles (0 = collapsed): {out['value']['token_spread_desis']}")
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

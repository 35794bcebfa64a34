"""What pretraining buys downstream: the synthetic suite with a pretrained encoder beside the same encoder
randomly initialised (same architecture, same frozen sensor/level text table, same seeds and protocol).

    python bench/downstream.py [--checkpoint EXPORT] [--steps N] [--seeds 3] [--tasks a,b] [--json]

The pretrained encoder is ``--checkpoint``, else the demo's last stage export under runs/demo/export/, else a
debug model pretrained here briefly (MAE on random crops of a simulated corpus). The suite's corpus is
simulated from the held-out materials (``materials="heldout"``: none of them is in a pretraining corpus).
Spread: ``--seeds`` runs of the suite per encoder; run ``s`` trains every task with ``train.seed = s`` (split,
head init, batches), and the random encoder of run ``s`` is a fresh init with seed ``s``. Each task reports
the mean and standard error over the runs for both encoders and of their paired difference, and each task with
encoder-free baselines against them (fusion: the training-free unmixing the decoder starts from, bilinear /
bicubic / unsharp upsampling and the decoder trained without its encoder branch, PSNR and SAM; scene, change and
segmentation tasks: ``raw_spectrum``, a logistic regression fitted to convergence on the raw mean / pixel spectra
(change: both dates' and their difference) of the same training samples). With ``--json`` the last line printed is one JSON object: ``{"pretrained": {task:
mean}, "random": {task: mean}, "spread": {task: {...}}, "baselines": {task: {"<row> <metric>": {mean, se}}},
...}``.

Measured (issue 11, the README command's export stage4_colocated_jepa, 5 seeds, paired difference pretrained -
random +/- SE; loaded 2-core box, 28.5 min at the suite's earlier 60 steps for the fine-tuned tasks):
scene_linear_probe OA +0.045 +/- 0.019, segmentation_pangaea mIoU +0.153 +/- 0.020, change F1 +0.093 +/- 0.013,
change_pangaea F1 +0.155 +/- 0.030, cross_sensor OA +0.28 +/- 0.06 (ahead); fusion PSNR +0.03 +/- 0.14 dB (level;
also at 400 steps, 3 seeds: -0.02 +/- 0.19; with the unmixing start +0.16 +/- 0.15). At the suite's present steps for the fine-tuned tasks (300, 200):
scene_finetune OA +0.017 +/- 0.002 (8 SE, every seed ahead), segmentation mIoU +0.049 +/- 0.015 (3.2 SE); at 60
steps both were inside their noise (+0.020 +/- 0.023, +0.011 +/- 0.023). The raw-spectrum baseline beats both
encoders on every task that has one except PANGAEA segmentation (level): scene OA 0.83 (pretrained probe 0.60),
segmentation mIoU 0.47, change F1 0.98, PANGAEA change F1 0.94; the simulated materials are spectrally distinct.
The fusion head (started from the training-free unmixing since; 5 seeds) is ahead of the fusion papers' baselines
(PSNR 44.08 +/- 0.09 dB vs bicubic 31.44, SAM 0.93 deg vs 1.46), level in PSNR with its own training-free start (the
unmixing, 44.39 / 0.95), and not ahead of itself without the encoder: the same decoder with no encoder branch
(``no_encoder``, trained the same way) reaches 44.04 +/- 0.05 dB (random encoder 43.93 +/- 0.10, paired difference
+0.16 +/- 0.15; with the earlier convex decoder 30.54 pretrained, 30.51 random, 30.77 without): on this suite the
fusion task does not measure the encoder.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from finetune.config import load_suite  # noqa: E402
from finetune.encoder_api import Encoder, load_encoder  # noqa: E402
from finetune.runner import headline, prepare_corpus, run_suite  # noqa: E402


def find_demo_export() -> Path | None:
    """The last stage (by completion time) under runs/demo/export/ that holds a full export."""
    root = REPO / "runs" / "demo" / "export"
    stages = [d for d in root.glob("*") if (d / "encoder.safetensors").is_file() and (d / "model_args.json").is_file()]
    if not stages:
        return None
    return max(stages, key=lambda d: ((d / "stage_done.json").stat().st_mtime if (d / "stage_done.json").exists()
                                      else (d / "encoder.safetensors").stat().st_mtime, d.name))


def pretrain_briefly(out: Path, manifest: str, steps: int = 150) -> Path:
    """MAE-pretrain a debug model on random 32 x 32 crops of the corpus products; export it."""
    from finetune.datasets import normalise
    from finetune.datasets.synthetic import load_manifest, read_product
    from pretrain.models import build_model
    from pretrain.models.export import save_encoder

    root, m = load_manifest(manifest)
    cubes = []
    for e in m["products"]:
        if e["sensor"] in ("planetscope", "sentinel-2"):
            continue
        cube, valid, spec = read_product(root, e, 1)
        cubes.append((normalise(cube, valid=valid)[0], spec))  # as the tasks prepare their inputs
    torch.manual_seed(0)
    model = build_model("debug")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    g = np.random.default_rng(0)
    for _ in range(steps):
        cube, spec = cubes[g.integers(len(cubes))]
        c = cube.shape[0]
        nb = min(60, c)
        b0 = int(g.integers(0, c - nb + 1))
        xs = []
        for _ in range(8):
            y, x = (int(g.integers(0, s - 32 + 1)) for s in cube.shape[1:])
            xs.append(cube[b0:b0 + nb, y:y + 32, x:x + 32])
        batch = {"pixels": torch.from_numpy(np.stack(xs)).float(),
                 "wavelengths": torch.from_numpy(spec.wavelengths[b0:b0 + nb]).float().expand(8, -1),
                 "fwhm": torch.from_numpy(spec.fwhm[b0:b0 + nb]).float().expand(8, -1),
                 "sensor": torch.full((8,), model.vocab.sensor_index(spec.sensor)),
                 "level": torch.full((8,), model.vocab.level_index(spec.level))}
        loss = model(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return save_encoder(model, out, extra={"pretrained_by": "bench/downstream.py", "steps": steps})


def random_twin(enc: Encoder, seed: int = 0, init: str = "project") -> Encoder:
    """Same architecture and vocabularies, fresh random weights; the frozen text-embedding buffers are copied.

    ``init="project"``: the model's own initialisation (what pretraining starts from); ``"torch"``: PyTorch's
    default initialisation of every layer (``reset_parameters``), the other common random baseline."""
    from pretrain.models.args import ModelArgs
    from pretrain.models.encoder import SpectralEncoder

    if init not in ("project", "torch"):
        raise ValueError(f"init must be 'project' or 'torch', got {init!r}")
    inner = enc.inner
    torch.manual_seed(seed)
    fresh = SpectralEncoder(ModelArgs.from_dict(enc.args["args"]), inner.vocab, compute_text=False)
    if init == "torch":  # construction gave the project's scheme; PyTorch's own default instead, layer by layer
        for m in fresh.modules():
            if isinstance(m, torch.nn.Linear):
                torch.nn.Linear.reset_parameters(m)
            elif isinstance(m, torch.nn.LayerNorm):
                m.reset_parameters()
    bufs = dict(inner.named_buffers())
    for name, b in fresh.named_buffers():
        if name in bufs:
            b.copy_(bufs[name])
    return Encoder(fresh.eval(), enc.args, source=f"random init ({init}, seed {seed})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="encoder export (default: the demo's last stage)")
    ap.add_argument("--suite", default=str(REPO / "configs/benchmarks/synthetic.yaml"))
    ap.add_argument("--steps", type=int, default=None,
                    help="train.steps of every task without train.epochs (default: each task's own, as the suite "
                         "gives it; the PANGAEA tasks keep their epochs). At 40 the fusion head (150 in the suite) "
                         "stays below bicubic upsampling on SAM")
    ap.add_argument("--seeds", type=int, default=3, help="runs per encoder (task seed, random-init seed)")
    ap.add_argument("--first-seed", type=int, default=0,
                    help="seed of the first run (runs are seeds first-seed .. first-seed + seeds - 1; a run depends on "
                         "its seed alone, so runs split over invocations pool into one sample)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--tasks", default=None, help="comma-separated task names of the suite to run (default: all)")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = ap.parse_args(argv)
    if args.seeds < 1 or args.first_seed < 0:
        ap.error(f"--seeds must be >= 1 and --first-seed >= 0; got {args.seeds} and {args.first_seed}")
    torch.set_num_threads(args.threads)
    suite = load_suite(args.suite)
    if args.tasks:
        wanted = [n.strip() for n in args.tasks.split(",") if n.strip()]
        names = [t.name for t in suite.tasks]
        unknown = [n for n in wanted if n not in names]
        if unknown:
            ap.error(f"--tasks: {', '.join(unknown)} not in {args.suite} (its tasks: {', '.join(names)})")
        suite.tasks = [t for t in suite.tasks if t.name in wanted]
    for t in suite.tasks:
        if t.train.epochs is None and args.steps is not None:  # PANGAEA's tasks keep their epochs (lr 1e-4 is set
            t.train.steps = args.steps                           # for 80 of them)
    t0 = time.time()
    if suite.simulate is not None:
        suite.simulate = {**suite.simulate, "materials": "heldout"}  # materials no pretraining corpus has
    runs: dict[str, list[dict[str, float]]] = {"pretrained": [], "random": []}
    # tasks against their encoder-free baselines, per run: fusion against the fusion papers' (bilinear, bicubic
    # upsampling; PSNR and SAM), classification, segmentation and change against a linear model of the raw spectra
    against: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        manifest = prepare_corpus(suite, tmp)
        ckpt = Path(args.checkpoint) if args.checkpoint else find_demo_export()
        source = "given" if args.checkpoint else "demo export"
        if ckpt is None:
            ckpt = pretrain_briefly(tmp / "export", manifest)
            source = "pretrained here (debug MAE, 150 steps)"
        enc = load_encoder(ckpt)
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            for t in suite.tasks:
                t.train.seed = seed
            for label, e in (("pretrained", enc), ("random", random_twin(enc, seed=seed))):
                t1 = time.time()
                rep = run_suite(suite, e, tmp / f"{label}_{seed}", checkpoint=str(ckpt), data=manifest,
                                progress=False)
                runs[label].append(headline(rep))
                for n, t in rep["tasks"].items():
                    if t["details"].get("baselines"):
                        # the baselines do not depend on the encoder: taken once per seed, from the pretrained run
                        rows = {label: t["metrics"], **(t["details"]["baselines"] if label == "pretrained" else {})}
                        for k, m in rows.items():
                            for q in ("PSNR", "SAM") if t["kind"] == "fusion" else (t["headline"],):
                                against.setdefault(n, {}).setdefault(f"{k} {q}", []).append(float(m[q]))
                print(f"[{label} seed {seed}] {time.time() - t1:.0f} s", flush=True)
    metric = {n: t["headline"] for n, t in rep["tasks"].items()}
    spread = {n: spread_of([r[n] for r in runs["pretrained"]], [r[n] for r in runs["random"]]) for n in metric}
    steps = f"{args.steps} steps per task" if args.steps is not None else "the suite's steps per task"
    print(f"encoder: {ckpt} ({source}); {steps}; {args.seeds} seeds from {args.first_seed}; held-out materials")
    print(f"{'task':22s} {'metric':6s} {'pretrained':>17s} {'random':>17s} {'difference':>17s}")
    for n, sp in spread.items():
        print(f"{n:22s} {metric[n]:6s} {sp['pretrained']:9.4f} +/- {sp['pretrained_se']:.4f} "
              f"{sp['random']:9.4f} +/- {sp['random_se']:.4f} {sp['difference']:+9.4f} +/- {sp['difference_se']:.4f}")
    baselines = {n: {k: {"mean": float(np.mean(v)), "se": float(np.std(v, ddof=1) / np.sqrt(len(v)))
                         if len(v) > 1 else float("nan")} for k, v in rows.items()} for n, rows in against.items()}
    for n, rows in baselines.items():
        fusion = any(k.endswith(" SAM") for k in rows)
        print(f"{n} against its baselines ({'PSNR dB, SAM deg; ' if fusion else ''}mean +/- SE over the runs): "
              + ", ".join(f"{k} {v['mean']:.{2 if fusion else 3}f} +/- {v['se']:.{2 if fusion else 3}f}"
                          for k, v in rows.items()))
    if args.json:
        print(json.dumps({"pretrained": {n: sp["pretrained"] for n, sp in spread.items()}, "baselines": baselines,
                          "random": {n: sp["random"] for n, sp in spread.items()}, "spread": spread,
                          "runs": runs, "metric": metric, "checkpoint": str(ckpt), "source": source,
                          "steps": args.steps, "seeds": args.seeds, "first_seed": args.first_seed, "seconds": round(time.time() - t0, 1)}))
    return 0


def spread_of(pre: list[float], rnd: list[float]) -> dict[str, float]:
    """Means and standard errors over the runs of both encoders and of their paired difference (every headline
    of the suite is higher-is-better: OA, mIoU, F1, PSNR)."""
    def mse(x: list[float]) -> tuple[float, float]:
        a = np.asarray(x, dtype=np.float64)
        return float(a.mean()), float(a.std(ddof=1) / np.sqrt(a.size)) if a.size > 1 else float("nan")

    (pm, ps), (rm, rs) = mse(pre), mse(rnd)
    dm, ds = mse([a - b for a, b in zip(pre, rnd)])
    return {"pretrained": pm, "pretrained_se": ps, "random": rm, "random_se": rs, "difference": dm,
            "difference_se": ds}


if __name__ == "__main__":
    sys.exit(main())

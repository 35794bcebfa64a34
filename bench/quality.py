"""Does pretraining pay? The pretrained encoder against the same architecture at random init, on tasks built
from materials the pretraining corpus never contained, with the raw spectrum as the ceiling.

    python bench/quality.py [--checkpoint EXPORT] [--config configs/pretrain/quality_cpu.yaml] [--json]

Without ``--checkpoint`` it first pretrains ``--config`` with ``torchrun --nproc_per_node=2 launch/pretrain.py``
(the quality config: two CPU ranks; the whole benchmark from an empty data/ took 10 min on an idle 2-core machine:
corpus 3.4 min, 3000 steps 6.5 min, evaluation 40 s) and evaluates that run's last
stage export; its band-condition instruments (``pretrain.instruments``) are read from the run's metrics.

Evaluation data: ``--scenes`` scenes simulated from the held-out materials
(``data_prep.simulate.library.split_materials(lib, "heldout")``; the pretraining corpus draws only from
"pretrain") rendered as ``--sensor``/``--level`` products (good bands, every ``--band-stride``-th),
normalised per band as pretraining does (1st/99th percentile clip, z-score over valid pixels), cut into
``--tile`` x ``--tile`` tiles. Labels are material classes (vegetation, soil, ...). Frozen features:
the encoder's output tokens (final LayerNorm); a tile's feature is the mean token. Tasks:

- ``scene_probe``: tile class (dominant class of its valid pixels) by logistic regression (C chosen by inner
  3-fold CV) on the tile feature; accuracy on held-out scenes.
- ``few_shot``: 5 tiles per class for training (logistic regression, C = 1), accuracy on all other tiles.
- ``segmentation``: per-pixel class from the tokens bilinearly upsampled to pixels (logistic regression on
  sampled pixels of the training scenes), mIoU on the test scenes' valid pixels.
- ``abundance``: per token cell (patch), the fraction of each class from the token (ridge regression,
  alpha by efficient leave-one-out), variance-weighted R^2 on the test scenes.

Splits: ``--repeats`` shuffled splits of the scenes (a third held out for testing; the few-shot draws are
``--shots``-per-class draws, 4x as many repeats), identical for every encoder. Encoders: the pretrained one;
``--seeds`` random inits of its architecture with the project's initialisation and as many with PyTorch's
default initialisation (``reset_parameters`` of every layer; the frozen text-embedding table is copied);
the raw input (tile mean spectrum, pixel spectrum, cell mean spectrum) as the ceiling. For each encoder
family: mean over its encoders of the per-encoder mean score, standard error over encoders (random) or over
splits (pretrained, raw). ``margin_se`` = (pretrained - best random family) / sqrt(se_pre^2 + se_rand^2);
``beats`` when it is >= 3. With ``--json`` the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

TASKS = ("scene_probe", "few_shot", "segmentation", "abundance")
METRICS = {"scene_probe": "accuracy", "few_shot": "accuracy", "segmentation": "mIoU", "abundance": "R2"}
DEFAULT_CONFIG = REPO / "configs" / "pretrain" / "quality_cpu.yaml"
PROBE_CS = (0.01, 0.1, 1.0, 10.0)
"""Inverse L2 strengths the scene probe chooses from (inner 3-fold CV on its training scenes)."""
SEG_C = 1.0
"""Inverse L2 strength of the per-pixel probe (sampled pixels of the training scenes)."""


# ----------------------------------------------------------------------------------------------- data

@dataclass
class EvalSet:
    """Normalised tiles of held-out scenes with their labels (see the module docstring)."""

    tiles: np.ndarray
    """float32 (n, C, T, T)."""
    valid: np.ndarray
    """bool (n, T, T)."""
    pixel_class: np.ndarray
    """int64 (n, T, T); -1 where not valid."""
    fractions: np.ndarray
    """float32 (n, K, T, T) class fractions of each pixel (sum 1 where valid)."""
    tile_class: np.ndarray
    """int64 (n,) dominant class of the tile's valid pixels."""
    scene: np.ndarray
    """int64 (n,) scene of each tile (the unit of the splits)."""
    wavelengths: np.ndarray
    fwhm: np.ndarray
    sensor: str
    level: str
    class_names: list[str]


def build_eval_set(*, sensor: str = "emit", level: str = "L2", scenes: int = 36, size: int = 96, tile: int = 32,
                   band_stride: int = 4, seed: int = 7, subset: str = "heldout", min_valid: float = 0.5,
                   materials_per_scene: int = 24) -> EvalSet:
    """Simulate ``scenes`` scenes of the ``subset`` materials and cut them into tiles (deterministic in seed)."""
    from data_prep.registry import get_sensor
    from data_prep.simulate.atmosphere import Atmosphere
    from data_prep.simulate.library import CLASSES, load_library, split_materials
    from data_prep.simulate.render import raster_blocks, render_cube, sensor_model
    from data_prep.simulate.scene import make_scene
    from data_prep.spectral import normalise

    lib = load_library()
    pool = split_materials(lib, subset)
    pool_classes = [lib.classes[i] for i in pool]
    spectra = lib.spectra[pool]
    sen = get_sensor(sensor)
    keep = np.flatnonzero(sen.good_band_mask())[::band_stride]
    cubes, valids, classes, fracs, scene_ids = [], [], [], [], []
    for s in range(scenes):
        rng = np.random.default_rng(np.random.SeedSequence([seed, s]))
        scene = make_scene(rng, pool_classes, materials_per_scene=materials_per_scene)
        atm = Atmosphere(sza_deg=float(rng.uniform(20, 55)), vza_deg=float(rng.uniform(0, 10)),
                         water_vapour_cm=float(rng.uniform(0.5, 3.0)), aod550=float(rng.uniform(0.05, 0.3)))
        model = sensor_model(sen, level, scene.spectra_of(spectra), atm)
        blocks = list(raster_blocks(scene, scene.material_count(len(pool)), size, size))
        cube, labels, valid = render_cube(model, iter(blocks), size, size, rng)
        eff = np.concatenate([b.eff for b in blocks], axis=1).astype(np.float64)  # (K_local, H, W)
        frac_local = eff / np.maximum(eff.sum(0, keepdims=True), 1e-12)
        local_cls = np.array([CLASSES.index(pool_classes[int(i)]) for i in scene.pool_index(
            np.arange(scene.material_count(len(pool))))])
        frac = np.zeros((len(CLASSES), size, size))
        np.add.at(frac, local_cls, frac_local)
        pix = np.where(labels >= 0, np.array([CLASSES.index(c) for c in pool_classes] + [-1])[labels], -1)
        for y in range(0, size - tile + 1, tile):
            for x in range(0, size - tile + 1, tile):
                v = valid[y:y + tile, x:x + tile]
                if v.mean() < min_valid:
                    continue
                cubes.append(cube[keep, y:y + tile, x:x + tile])
                valids.append(v)
                classes.append(pix[y:y + tile, x:x + tile])
                fracs.append(frac[:, y:y + tile, x:x + tile])
                scene_ids.append(s)
    tiles, _ = normalise(np.stack(cubes), valid=np.stack(valids))
    pixel_class = np.stack(classes).astype(np.int64)
    tile_class = np.array([np.bincount(c[c >= 0], minlength=len(CLASSES)).argmax() for c in pixel_class])
    return EvalSet(tiles.astype(np.float32), np.stack(valids), pixel_class, np.stack(fracs).astype(np.float32),
                   tile_class, np.array(scene_ids), sen.wavelengths_nm[keep].astype(np.float32),
                   sen.fwhm_nm[keep].astype(np.float32), sensor, level, list(CLASSES))


# ----------------------------------------------------------------------------------------------- features

@torch.no_grad()
def encoder_tokens(enc, ev: EvalSet, batch: int = 32) -> np.ndarray:
    """Frozen output tokens ``(n, h, w, D)`` of every tile."""
    enc.eval()
    out = []
    for i in range(0, len(ev.tiles), batch):
        x = torch.from_numpy(ev.tiles[i:i + batch])
        v = torch.from_numpy(ev.valid[i:i + batch])
        t = enc(x, torch.from_numpy(ev.wavelengths), torch.from_numpy(ev.fwhm), ev.sensor, ev.level, valid=v)
        h, w = enc.grid(x.shape[-2], x.shape[-1])
        out.append(t.float().reshape(len(x), h, w, -1).numpy())
    return np.concatenate(out)


@dataclass
class Features:
    tile: np.ndarray
    """(n, D) per tile."""
    cell: np.ndarray
    """(n, h, w, D) per token cell."""
    pixel_fn: object
    """(tile indices, rows, cols) -> (m, D) per pixel."""


def token_features(tokens: np.ndarray, tile: int) -> Features:
    def pixels(ti: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(tokens[ti]).permute(0, 3, 1, 2)  # (m, D, h, w): one per sampled pixel
        h = t.shape[-1]
        # bilinear sample at the pixel centre (align_corners=False convention of a token grid)
        gy = (torch.from_numpy(ys).float() + 0.5) / tile * 2 - 1
        gx = (torch.from_numpy(xs).float() + 0.5) / tile * 2 - 1
        grid = torch.stack([gx, gy], -1).view(-1, 1, 1, 2)
        del h
        return torch.nn.functional.grid_sample(t, grid, mode="bilinear", align_corners=False,
                                               padding_mode="border").view(len(ti), -1).numpy()

    return Features(tokens.mean((1, 2)), tokens, pixels)


def raw_features(ev: EvalSet, patch: int) -> Features:
    """The raw input as features: tile mean spectrum (valid pixels), cell mean spectrum, pixel spectrum."""
    x, v = ev.tiles, ev.valid[:, None].astype(np.float32)
    tile = (x * v).sum((2, 3)) / np.maximum(v.sum((2, 3)), 1)
    n, c, t, _ = x.shape
    h = t // patch
    xs = (x * v).reshape(n, c, h, patch, h, patch).sum((3, 5))
    vs = v.reshape(n, 1, h, patch, h, patch).sum((3, 5))
    cell = (xs / np.maximum(vs, 1)).transpose(0, 2, 3, 1)

    def pixels(ti, ys, xs_):
        return x[ti, :, ys, xs_]

    return Features(tile, cell, pixels)


# ----------------------------------------------------------------------------------------------- tasks

def scene_splits(ev: EvalSet, repeats: int, seed: int = 0, test_fraction: float = 1 / 3) -> list[np.ndarray]:
    """Test-scene sets of ``repeats`` shuffled splits (the same for every encoder)."""
    scenes = np.unique(ev.scene)
    k = max(1, int(round(test_fraction * scenes.size)))
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x9A]))
    return [np.sort(rng.permutation(scenes)[:k]) for _ in range(repeats)]


def _scaled(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mu, sd = train.mean(0), train.std(0) + 1e-6
    return (train - mu) / sd, (test - mu) / sd


def scene_probe(f: Features, ev: EvalSet, splits: list[np.ndarray]) -> list[float]:
    from sklearn.linear_model import LogisticRegressionCV

    out = []
    for test_scenes in splits:
        te = np.isin(ev.scene, test_scenes)
        a, b = _scaled(f.tile[~te], f.tile[te])
        clf = LogisticRegressionCV(Cs=PROBE_CS, cv=3, scoring="accuracy", max_iter=500, tol=1e-3).fit(a, ev.tile_class[~te])
        out.append(float((clf.predict(b) == ev.tile_class[te]).mean()))
    return out


def few_shot(f: Features, ev: EvalSet, repeats: int, shots: int = 5, seed: int = 0) -> list[float]:
    from sklearn.linear_model import LogisticRegression

    y = ev.tile_class
    classes = [c for c in np.unique(y) if (y == c).sum() > shots]
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5F]))
    sel = np.isin(y, classes)
    out = []
    for _ in range(repeats):
        tr = np.concatenate([rng.choice(np.flatnonzero(y == c), shots, replace=False) for c in classes])
        te = np.setdiff1d(np.flatnonzero(sel), tr)
        a, b = _scaled(f.tile[tr], f.tile[te])
        clf = LogisticRegression(C=1.0, max_iter=500, tol=1e-3).fit(a, y[tr])
        out.append(float((clf.predict(b) == y[te]).mean()))
    return out


def _sample_pixels(ev: EvalSet, tiles: np.ndarray, n: int, rng: np.random.Generator):
    ti, ys, xs = np.nonzero(ev.pixel_class[tiles] >= 0)
    pick = rng.choice(ti.size, size=min(n, ti.size), replace=False)
    return tiles[ti[pick]], ys[pick], xs[pick]


def miou(truth: np.ndarray, pred: np.ndarray) -> float:
    ious = []
    for c in np.unique(truth):
        inter = ((truth == c) & (pred == c)).sum()
        union = ((truth == c) | (pred == c)).sum()
        ious.append(inter / union)
    return float(np.mean(ious))


def segmentation(f: Features, ev: EvalSet, splits: list[np.ndarray], n_train: int = 3000, n_test: int = 6000,
                 seed: int = 0) -> list[float]:
    from sklearn.linear_model import LogisticRegression

    out = []
    for k, test_scenes in enumerate(splits):
        rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5E, k]))
        te = np.isin(ev.scene, test_scenes)
        trp = _sample_pixels(ev, np.flatnonzero(~te), n_train, rng)
        tep = _sample_pixels(ev, np.flatnonzero(te), n_test, rng)
        a, b = _scaled(f.pixel_fn(*trp), f.pixel_fn(*tep))
        clf = LogisticRegression(C=SEG_C, max_iter=300, tol=1e-3).fit(a, ev.pixel_class[trp])
        out.append(miou(ev.pixel_class[tep], clf.predict(b)))
    return out


def abundance(f: Features, ev: EvalSet, splits: list[np.ndarray], patch: int) -> list[float]:
    from sklearn.linear_model import RidgeCV
    from sklearn.metrics import r2_score

    n, k, t, _ = ev.fractions.shape
    h = t // patch
    v = ev.valid.reshape(n, h, patch, h, patch).mean((2, 4)).reshape(-1)
    frac = ev.fractions.reshape(n, k, h, patch, h, patch).mean((3, 5)).transpose(0, 2, 3, 1).reshape(-1, k)
    x = f.cell.reshape(n * h * h, -1)
    cell_scene = np.repeat(ev.scene, h * h)
    ok = v >= 0.5
    out = []
    for test_scenes in splits:
        te = np.isin(cell_scene, test_scenes)
        tr, ts = ok & ~te, ok & te
        a, b = _scaled(x[tr], x[ts])
        reg = RidgeCV(alphas=np.logspace(-2, 4, 13)).fit(a, frac[tr])
        out.append(float(r2_score(frac[ts], reg.predict(b), multioutput="variance_weighted")))
    return out


def evaluate(f: Features, ev: EvalSet, splits: list[np.ndarray], patch: int, shots: int = 5) -> dict[str, list[float]]:
    """Every task's scores (one per split or draw) for one set of features.

    The probes run with BLAS on one thread: these problems are small (hundreds to thousands of rows, tens of
    features), and OpenBLAS's worker threads spin-wait for work, which on a 2-core box with anything else running
    made the fits ~30x slower (48 s vs 1.6 s for the scene probe and segmentation of 12 scenes, measured)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        return {"scene_probe": scene_probe(f, ev, splits),
                "few_shot": few_shot(f, ev, 4 * len(splits), shots),
                "segmentation": segmentation(f, ev, splits),
                "abundance": abundance(f, ev, splits, patch)}


# ----------------------------------------------------------------------------------------------- encoders

def random_encoders(ref, seeds: int, init: str) -> list:
    """``seeds`` fresh encoders of ``ref``'s architecture (see bench/downstream.py ``random_twin``)."""
    from bench.downstream import random_twin

    return [random_twin(ref, seed=s, init=init) for s in range(seeds)]


def summarise(scores: dict[str, dict[str, list]]) -> dict:
    """``scores[family][task]`` = per-encoder lists of split scores -> the table of the module docstring."""
    def stats(runs: list[list[float]]) -> dict:
        per = [float(np.mean(r)) for r in runs]
        if len(runs) == 1:
            r = runs[0]
            se = float(np.std(r, ddof=1) / math.sqrt(len(r))) if len(r) > 1 else float("nan")
        else:
            se = float(np.std(per, ddof=1) / math.sqrt(len(per)))
        return {"mean": float(np.mean(per)), "se": se, "per_encoder": [round(p, 4) for p in per]}

    table = {}
    for task in TASKS:
        row = {fam: stats(s[task]) for fam, s in scores.items() if task in s}
        rand = [k for k in row if k.startswith("random")]
        if "pretrained" in row and rand:
            best = max(rand, key=lambda k: row[k]["mean"])
            pre = row["pretrained"]
            se = math.sqrt(pre["se"] ** 2 + row[best]["se"] ** 2)
            z = (pre["mean"] - row[best]["mean"]) / se if se > 0 else float("nan")
            row["best_random"] = best
            row["margin_se"] = z
            row["beats"] = bool(z >= 3.0)
        row["metric"] = METRICS[task]
        table[task] = row
    return table


def score_encoders(pretrained, ev: EvalSet, *, seeds: int = 5, repeats: int = 10, shots: int = 5,
                   random_inits: tuple[str, ...] = ("project", "torch"), raw: bool = True,
                   progress: bool = False) -> dict[str, dict[str, list]]:
    """Features and task scores of the pretrained encoder, its random twins and the raw input."""
    patch = pretrained.patch_size
    splits = scene_splits(ev, repeats)
    scores: dict[str, dict[str, list]] = {}

    def add(family: str, f: Features) -> None:
        res = evaluate(f, ev, splits, patch, shots)
        for t, v in res.items():
            scores.setdefault(family, {}).setdefault(t, []).append(v)

    tile = ev.tiles.shape[-1]
    add("pretrained", token_features(encoder_tokens(pretrained, ev), tile))
    for init in random_inits:
        for k, enc in enumerate(random_encoders(pretrained, seeds, init)):
            if progress:
                print(f"  random ({init} init) seed {k}", file=sys.stderr, flush=True)
            add(f"random_{init}_init", token_features(encoder_tokens(enc, ev), tile))
    if raw:
        add("raw_spectrum", raw_features(ev, patch))
    return scores


# ----------------------------------------------------------------------------------------------- pretraining

def pretrain(config: Path, run_dir: Path, overrides: list[str], nproc: int = 2) -> Path:
    """Run the launcher on ``config``; returns the last stage's export directory."""
    import yaml

    from bench.launching import launch_env

    env = launch_env(wandb="offline")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(REPO / "launch" / "pretrain.py"),
           "--config", str(config), f"run_dir={run_dir}", "logging.progress=false", *overrides]
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    rc = subprocess.call(cmd, cwd=REPO, env=env)
    if rc != 0:
        raise SystemExit(f"pretraining failed with exit code {rc}: {' '.join(cmd)}")
    stages = yaml.safe_load(Path(config).read_text())["stages"]
    return run_dir / "export" / stages[-1]["name"]


def run_instruments(run_dir: Path) -> dict:
    """First and last instrument values of a run (from its metrics.jsonl) and the curves figure."""
    from pretrain.instruments import KEYS, plot_curves, read_records

    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    recs = [r for r in read_records(path) if "cond_similarity" in r]
    if not recs:
        return {}
    fig = plot_curves(recs, run_dir / "figures" / "instruments.png", title=str(run_dir))
    out = {"figure": str(fig), "steps": len(recs)}
    for k in KEYS:
        vals = [r[k] for r in recs if k in r and math.isfinite(r[k])]
        if vals:
            out[k] = {"first": round(vals[0], 4), "last": round(vals[-1], 4), "max": round(max(vals), 4),
                      "min": round(min(vals), 4)}
    return out


# ----------------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="encoder export to evaluate (default: pretrain --config first)")
    ap.add_argument("--config", default=str(DEFAULT_CONFIG), help="pretraining config (without --checkpoint)")
    ap.add_argument("--run-dir", default=None, help="run directory of that pretraining (default runs/quality_cpu)")
    ap.add_argument("--override", action="append", default=[], help="key=value override for the pretraining")
    ap.add_argument("--sensor", default="emit")
    ap.add_argument("--level", default="L2")
    ap.add_argument("--scenes", type=int, default=36, help="held-out scenes (96 x 96, 9 tiles each)")
    ap.add_argument("--band-stride", type=int, default=4)
    ap.add_argument("--seeds", type=int, default=5, help="random inits per initialisation")
    ap.add_argument("--repeats", type=int, default=10, help="shuffled scene splits")
    ap.add_argument("--shots", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads for the evaluation")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = ap.parse_args(argv)
    # scikit-learn >= 1.8 warns, at every probe fit, about defaults it will change (scoring, l1_ratios, fitted
    # attributes); the probes pass what they rely on, and the hundreds of repeats would bury the figures
    warnings.filterwarnings("ignore", category=FutureWarning, module="sklearn")
    from finetune.encoder_api import load_encoder

    t0 = time.time()
    inst = {}
    if args.checkpoint:
        ckpt = Path(args.checkpoint)
        run_dir = ckpt.parent.parent if (ckpt.parent.parent / "metrics.jsonl").is_file() else None
    else:
        run_dir = Path(args.run_dir) if args.run_dir else REPO / "runs" / "quality_cpu"
        ckpt = pretrain(Path(args.config), run_dir, args.override)
    if run_dir is not None:
        inst = run_instruments(run_dir)
    t_pre = time.time() - t0
    torch.set_num_threads(args.threads)
    enc = load_encoder(ckpt)
    ev = build_eval_set(sensor=args.sensor, level=args.level, scenes=args.scenes, band_stride=args.band_stride)
    print(f"eval set: {len(ev.tiles)} tiles of {ev.tiles.shape[1]} bands from {args.scenes} held-out scenes "
          f"({args.sensor} {args.level}); classes {np.bincount(ev.tile_class, minlength=len(ev.class_names)).tolist()}")
    scores = score_encoders(enc, ev, seeds=args.seeds, repeats=args.repeats, shots=args.shots, progress=True)
    table = summarise(scores)
    fams = [f for f in scores]
    print(f"\nencoder: {ckpt}")
    print(f"{'task':13s} {'metric':8s} " + " ".join(f"{f:>22s}" for f in fams) + "   margin")
    for task, row in table.items():
        cells = " ".join(f"{row[f]['mean']:13.4f} +/- {row[f]['se']:.4f}" for f in fams)
        print(f"{task:13s} {row['metric']:8s} {cells}   {row.get('margin_se', float('nan')):+.1f} SE"
              f"{' (beats)' if row.get('beats') else ''}")
    if inst:
        s = inst.get("cond_similarity", {})
        r = inst.get("band_map_rank", {})
        print(f"instruments: band-condition similarity {s.get('first')} -> {s.get('last')} (max {s.get('max')}); "
              f"band-map effective rank {r.get('first')} -> {r.get('last')}; curves {inst.get('figure')}")
    if args.json:
        print(json.dumps({"checkpoint": str(ckpt), "tasks": table, "instruments": inst,
                          "all_beat": all(r.get("beats", False) for r in table.values()),
                          "eval": {"sensor": args.sensor, "level": args.level, "tiles": int(len(ev.tiles)),
                                   "bands": int(ev.tiles.shape[1]), "scenes": args.scenes, "repeats": args.repeats,
                                   "seeds": args.seeds},
                          "seconds": {"pretrain": round(t_pre, 1), "total": round(time.time() - t0, 1)}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

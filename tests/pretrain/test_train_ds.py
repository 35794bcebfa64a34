"""Real DeepSpeed on two CPU ranks (gloo) through ``torchrun launch/pretrain.py`` with the debug model.

One module-scoped set of launches serves several checks: ZeRO-1/2/3 runs, resume after SIGTERM (ZeRO-2)
and after max_steps (ZeRO-3) with losses equal to an uninterrupted run, a two-stage pipeline passing
weights on, the export against the trained weights, and errors on every rank.

No launch has a wall-clock budget (a loaded box compiling DeepSpeed's op into an empty cache takes
minutes): tests/watch.py fails a launch only when it makes no progress (no output, no CPU) for a long time.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests import watch
from tests.launching import ENV, REPO, torchrun_cmd
from tests.pretrain.data_fixtures import make_store


def torchrun(config: Path, *overrides: str, wait: bool = True):
    """``torchrun --standalone ... launch/pretrain.py`` (rendezvous on the agent's own port), hang-watched."""
    cmd = torchrun_cmd(REPO / "launch/pretrain.py", "--config", config, *overrides)
    if not wait:
        return watch.Watched(cmd, cwd=REPO, env=ENV)
    return watch.run(cmd, cwd=REPO, env=ENV)


def losses(run_dir: Path) -> dict[int, float]:
    """global step -> loss (the last record of a step wins, as after a resume)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            out[r["global_step"]] = r["loss"]
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("train")
    a = make_store(str(root / "aviris-3_L1.zarr"), sensor="aviris-3", level="L1", n=24, bands=40, patch=32, seed=1)
    b = make_store(str(root / "emit_L2.zarr"), sensor="emit", level="L2", n=24, bands=40, patch=32, seed=2)
    cfg = {
        "run_dir": str(root / "run"),
        "data": {"sources": [{"url": a["url"]}, {"url": b["url"]}], "crop": 16, "band_window": 16,
                 "band_stride": 8, "num_workers": 0, "sensor_dropout": 0.1},
        "model": {"name": "debug"},
        "parallel": {"zero_stage": 2, "micro_batch": 2, "grad_accum": 2},
        "optim": {"lr": 1e-3, "warmup_steps": 2},
        "checkpoint": {"every": 2, "keep": 2},
        "logging": {"wandb": "disabled", "every": 1, "viz_every": 0, "progress": False},
        "stages": [{"name": "first", "steps": 4, "sources": [{"url": a["url"]}]},
                   {"name": "second", "steps": 4}],
    }
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return {"root": root, "config": path}


@pytest.fixture(scope="module")
def zero3(setup) -> dict:
    """Uninterrupted ZeRO-3 run, and one stopped by max_steps=5 (inside stage two) then re-run."""
    root, config = setup["root"], setup["config"]
    full, parts = root / "z3_full", root / "z3_parts"
    r_full = torchrun(config, f"run_dir={full}", "parallel.zero_stage=3")
    # the stopped/resumed run recomputes activations in backward (activation checkpointing); the full run
    # stores them: equal losses check the resume and checkpointing under ZeRO-3 at once
    ac = "model.activation_checkpointing=true"
    r_stop = torchrun(config, f"run_dir={parts}", "parallel.zero_stage=3", "max_steps=5", ac)
    r_again = torchrun(config, f"run_dir={parts}", "parallel.zero_stage=3", ac)
    return {"full": full, "parts": parts, "runs": (r_full, r_stop, r_again)}


def _ok(r) -> None:
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def test_zero3_stop_and_resume_gives_the_same_losses(zero3):
    for r in zero3["runs"]:
        _ok(r)
    full, parts = losses(zero3["full"]), losses(zero3["parts"])
    assert sorted(full) == list(range(1, 9))
    assert sorted(parts) == list(range(1, 9))
    assert "resumed from" in zero3["runs"][2].stdout + zero3["runs"][2].stderr
    for s in range(1, 9):
        assert parts[s] == pytest.approx(full[s], abs=1e-6), (s, parts[s], full[s])
    # the stop happened inside stage two: the re-run skipped stage one and resumed stage two at step 1
    recs = [json.loads(x) for x in (zero3["parts"] / "metrics.jsonl").read_text().splitlines()]
    starts = [r for r in recs if r.get("event") == "stage_start"]
    assert [r["stage"] for r in starts] == ["first", "second", "second"]


def test_stage_two_starts_from_stage_one_export(zero3):
    run = zero3["full"]
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    starts = {r["stage"]: r for r in recs if r.get("event") == "stage_start"}
    assert starts["first"]["init_from"] is None
    assert Path(starts["second"]["init_from"]) == run / "export" / "first"
    exported = load_file(str(run / "export/first/encoder.safetensors"))
    total = float(sum(v.double().abs().sum() for v in exported.values()))
    assert starts["second"]["encoder_abs_sum"] == pytest.approx(total, rel=1e-9)
    assert starts["first"]["encoder_abs_sum"] != pytest.approx(total, rel=1e-6)
    # the MAE's decoder and head go on from stage one's too (stages.N.carry_objective), gathered and scattered
    # back under ZeRO-3 like the encoder
    own = load_file(str(run / "export/first/objective.safetensors"))
    assert own and not any(k.startswith("encoder.") for k in own) and "mask_token" in own
    own_total = float(sum(v.double().abs().sum() for v in own.values()))
    assert not starts["first"]["objective_carried"] and starts["second"]["objective_carried"]
    assert starts["second"]["objective_abs_sum"] == pytest.approx(own_total, rel=1e-9)
    assert starts["first"]["objective_abs_sum"] != pytest.approx(own_total, rel=1e-6)


def test_export_matches_trained_weights_and_loads_without_deepspeed(zero3):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    run = zero3["full"]
    ck = run / "checkpoints" / "second"
    tag = sorted(p.name for p in ck.iterdir() if (p / "complete").exists())[-1]
    assert tag == "step_00000004"
    trained = get_fp32_state_dict_from_zero_checkpoint(str(ck), tag=tag)
    exported = load_file(str(run / "export/second/encoder.safetensors"))
    enc = {k[len("encoder."):]: v for k, v in trained.items() if k.startswith("encoder.")}
    assert set(exported) >= set(enc) and enc
    for k, v in enc.items():
        assert torch.equal(exported[k], v), k
    from pretrain.models.export import load_encoder

    encoder = load_encoder(run / "export/second")
    sd = encoder.state_dict()
    assert all(torch.equal(sd[k], exported[k]) for k in exported)
    meta = json.loads((run / "export/second/model_args.json").read_text())
    assert meta["extra"]["stage"] == "second" and meta["extra"]["global_step"] == 8
    # the release folder the trainer writes beside: the same tensors, the training stores' statistics
    hf = run / "export/second/hf"
    assert load_file(str(hf / "model.safetensors")).keys() == exported.keys()
    rel = json.loads((hf / "config.json").read_text())
    assert set(rel["normalisation"]) == {"aviris-3_L1", "emit_L2"} and rel["training"]["hardware"]["world_size"] == 2


def test_run_dir_has_provenance_and_checkpoints_are_pruned(zero3):
    run = zero3["full"]
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["parallel"]["zero_stage"] == 3 and cfg["run_dir"] == str(run)
    sha = (run / "git_sha.txt").read_text().strip()
    assert len(sha.split("-")[0]) == 40
    tags = sorted(p.name for p in (run / "checkpoints/first").iterdir() if p.name.startswith("step_"))
    assert tags == ["step_00000002", "step_00000004"]  # keep=2
    summary = json.loads((run / "summary.json").read_text())
    assert len(summary["peak_rss_mb_per_rank"]) == 2


SLOW = ["stages.1.steps=12"]


@pytest.fixture(scope="module")
def zero2_full(setup) -> Path:
    run = setup["root"] / "z2_full"
    _ok(torchrun(setup["config"], f"run_dir={run}", *SLOW))
    return run


def test_zero3_starts_from_the_same_weights_as_zero2(zero3, zero2_full):
    """Same seed, same data: stage one's losses under ZeRO-3 equal those under ZeRO-2 (the partitioned
    model starts from the same weights and takes the same steps)."""
    z2, z3 = losses(zero2_full), losses(zero3["full"])
    assert z3[1] == pytest.approx(z2[1], abs=1e-6)
    for s in (2, 3, 4):
        assert z3[s] == pytest.approx(z2[s], rel=1e-4), (s, z2[s], z3[s])


def test_zero2_sigterm_saves_then_resume_gives_the_same_losses(setup, zero2_full):
    root, config = setup["root"], setup["config"]
    full, parts = zero2_full, root / "z2_parts"
    slow = SLOW
    proc = torchrun(config, f"run_dir={parts}", *slow, wait=False)

    def at_step_6() -> bool:
        f = parts / "metrics.jsonl"
        return f.exists() and any(json.loads(x).get("global_step", 0) >= 6 and "loss" in x
                                  for x in f.read_text().splitlines())

    proc.wait(until=at_step_6)
    proc.proc.send_signal(signal.SIGTERM)
    out = proc.wait().output
    assert proc.returncode != 0, out[-2000:]
    assert "SIGTERM: checkpoint saved" in out, out[-3000:]
    stopped = losses(parts)
    assert max(stopped) < 16
    _ok(torchrun(config, f"run_dir={parts}", *slow))
    a, b = losses(full), losses(parts)
    assert sorted(a) == sorted(b) == list(range(1, 17))
    for s in a:
        assert b[s] == pytest.approx(a[s], abs=1e-6), (s, a[s], b[s])


def test_zero1_runs_with_wandb_offline_and_figures(setup):
    root, config = setup["root"], setup["config"]
    run = root / "z1"
    r = torchrun(config, f"run_dir={run}", "parallel.zero_stage=1", "stages.0.steps=2", "stages.1.steps=1",
                 "logging.wandb=offline", "logging.viz_every=2")
    _ok(r)
    assert sorted(losses(run)) == [1, 2, 3]
    assert all(v == v for v in losses(run).values())
    assert (run / "figures/first/step_00000002.png").stat().st_size > 1000
    assert list((run / "wandb").glob("offline-run-*"))
    assert (run / "export/second/encoder.safetensors").exists()
    assert f"export: {run.resolve() / 'export' / 'second'}" in r.stdout


def test_bad_input_fails_on_every_rank_before_training(setup, zero3):
    root, config = setup["root"], setup["config"]
    r = torchrun(config, f"run_dir={root / 'bad1'}", "parallel.grad_accum=null", "parallel.global_batch=6")
    assert r.returncode != 0
    err = r.stderr
    assert "error (rank 0)" in err and "error (rank 1)" in err and "not divisible" in err
    assert not (root / "bad1" / "metrics.jsonl").exists()
    # a checkpoint of another model shape: copy stage one's checkpoints into a fresh run, change the width
    import shutil

    bad = root / "bad2"
    shutil.copytree(zero3["full"] / "checkpoints" / "first", bad / "checkpoints" / "first")
    r = torchrun(config, f"run_dir={bad}", "parallel.zero_stage=3", "model.overrides={dim: 96, heads: 2}")
    assert r.returncode != 0
    assert "error (rank 0)" in r.stderr and "error (rank 1)" in r.stderr
    assert "another model shape" in r.stderr
    assert not (bad / "metrics.jsonl").exists() or "loss" not in (bad / "metrics.jsonl").read_text()

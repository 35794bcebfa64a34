"""Fault injection, in CI: what a reliability engineer does by hand to a pretraining run, each with its check.

Real runs of ``launch/pretrain.py`` on two CPU ranks (gloo, the debug model, a few steps), started by the
launcher itself (``--nproc_per_node=2``) so that the exit status the shell sees is the documented one:

- kill -9 of a rank mid-stage: the launch exits 137; the re-run resumes and its losses equal those of an
  uninterrupted run to 1e-6;
- kill -9 of rank 0 during a checkpoint save (after the shards, before the ``complete`` marker): the
  partial tag is ignored, the re-run resumes from the previous complete one, losses equal again;
- SIGTERM to the launcher: the ranks save, the shell sees 143;
- a data error on one rank (a store whose patches that rank reads are corrupt, ``max_bad_fraction=0``):
  every rank ends promptly (no collective waits on the rank that left), the error is named, exit 2;
- a deleted chunk object: the run trains on, its rank logs each failed read (substituted) and the log
  records count them over the ranks (``bad_samples``);
- bad config: exit 2 from the launcher before any rank starts; a stale extension build lock: exit 2
  naming the lock file instead of a silent hang (also under torchrun, on every rank).

Hangs are detected by progress (tests/watch.py), never by a wall-clock budget. The data-side cases
(deleted/truncated chunks, a killed ingest) join this module from the store's side.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml

from tests.launching import ENV, REPO, pretrain_cmd, torchrun_cmd
from tests.pretrain.data_fixtures import make_store
from tests.watch import Watched

pytestmark = pytest.mark.slow

ENV = {**ENV, "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
STEPS = 8


def launch(config: Path, *overrides: str, env: dict | None = None, torchrun: bool = False) -> Watched:
    """``python launch/pretrain.py --nproc_per_node=2 ...`` (or under ``torchrun``), watched for hangs."""
    cmd = (torchrun_cmd(REPO / "launch/pretrain.py", "--config", config, *overrides) if torchrun
           else pretrain_cmd(config, *overrides))
    return Watched(cmd, cwd=REPO, env={**ENV, **(env or {})})


def losses(run_dir: Path) -> dict[int, float]:
    """global step -> loss (the last record of a step wins, as after a resume)."""
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["global_step"]: r["loss"] for r in recs if "loss" in r}


def logged_step(run_dir: Path) -> int:
    f = run_dir / "metrics.jsonl"
    if not f.exists():
        return 0
    return max((json.loads(x).get("global_step", 0) for x in f.read_text().splitlines() if '"loss"' in x), default=0)


def rank_process(w: Watched, rank: int) -> psutil.Process:
    for p in w.tree():
        try:
            if "launch/pretrain.py" in " ".join(p.cmdline()) and p.environ().get("RANK") == str(rank):
                return p
        except psutil.Error:
            continue
    raise AssertionError(f"rank {rank} not found among {[p.pid for p in w.tree()]}")


def complete_tags(run_dir: Path, stage: str = "only") -> list[str]:
    d = run_dir / "checkpoints" / stage
    return sorted(p.name for p in d.iterdir() if (p / "complete").exists()) if d.exists() else []


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("faults")
    store = make_store(str(root / "emit_L2.zarr"), n=24, bands=40, patch=32, seed=3)["url"]
    cfg = {
        "run_dir": str(root / "ref"),
        "data": {"sources": [{"url": store}], "crop": 16, "band_window": 16, "band_stride": 8, "num_workers": 0},
        "model": {"name": "debug"},
        "parallel": {"zero_stage": 2, "micro_batch": 2, "grad_accum": 2},
        "optim": {"lr": 1e-3, "warmup_steps": 2},
        "checkpoint": {"every": 2, "keep": 2},
        "logging": {"wandb": "disabled", "every": 1, "viz_every": -1, "progress": False},
        "stages": [{"name": "only", "steps": STEPS}],
    }
    config = root / "faults.yaml"
    config.write_text(yaml.safe_dump(cfg))
    ref = launch(config).wait()
    assert ref.returncode == 0, ref.output[-3000:]
    return {"root": root, "config": config, "store": store, "ref": losses(root / "ref")}


def _assert_same_losses(run: Path, ref: dict[int, float]) -> None:
    got = losses(run)
    assert sorted(got) == sorted(ref) == list(range(1, STEPS + 1))
    for s in ref:
        assert got[s] == pytest.approx(ref[s], abs=1e-6), (s, got[s], ref[s])


def test_kill_9_of_a_rank_mid_stage_then_rerun_resumes_with_equal_losses(setup):
    run = setup["root"] / "kill_rank"
    w = launch(setup["config"], f"run_dir={run}")
    w.wait(until=lambda: logged_step(run) >= 5)  # step 4's checkpoint is complete by then
    rank_process(w, 1).kill()
    w.wait()
    assert w.returncode == 128 + signal.SIGKILL, w.output[-3000:]
    assert "rank 1: killed by SIGKILL" in w.stderr
    done = complete_tags(run)
    assert done and done[-1] >= "step_00000004"
    again = launch(setup["config"], f"run_dir={run}").wait()
    assert again.returncode == 0, again.output[-3000:]
    assert f"resumed from {run / 'checkpoints/only' / done[-1]}" in again.output
    _assert_same_losses(run, setup["ref"])


def test_kill_9_during_a_checkpoint_save_resumes_from_the_previous_complete_one(setup):
    run = setup["root"] / "kill_save"
    w = launch(setup["config"], f"run_dir={run}", env={"SPECFM_FAILPOINT": "checkpoint.before_marker@step_00000004"})
    w.wait()
    assert w.returncode == 128 + signal.SIGKILL, w.output[-3000:]
    partial = run / "checkpoints/only/step_00000004"
    assert partial.is_dir() and not (partial / "complete").exists()  # every shard written, no marker
    assert (partial / "rank_00001.json").exists()
    assert complete_tags(run) == ["step_00000002"]
    again = launch(setup["config"], f"run_dir={run}").wait()
    assert again.returncode == 0, again.output[-3000:]
    assert f"resumed from {run / 'checkpoints/only/step_00000002'}" in again.output
    _assert_same_losses(run, setup["ref"])
    tags = sorted(p.name for p in (run / "checkpoints/only").iterdir() if p.name.startswith("step_"))
    assert tags == ["step_00000006", "step_00000008"]  # the partial tag was re-saved and pruned like any other


def test_sigterm_to_the_launcher_saves_and_exits_143(setup):
    run = setup["root"] / "sigterm"
    w = launch(setup["config"], f"run_dir={run}", "stages.0.steps=500")
    w.wait(until=lambda: logged_step(run) >= 2)
    w.proc.send_signal(signal.SIGTERM)
    w.wait()
    assert w.returncode == 143, w.output[-3000:]
    assert "SIGTERM: checkpoint saved" in w.output
    stopped = logged_step(run)
    assert complete_tags(run)[-1] == f"step_{stopped:08d}" and stopped < 500


def _corrupt_rank_patches(url: str, rank: int, positions: slice) -> list[int]:
    """Garble every chunk file of the patches that ``rank`` of 2 reads at ``positions`` of epoch 0."""
    from pretrain.data.sampling import rank_shard, store_tag

    patches = rank_shard(np.arange(24), 0, store_tag(url), 0, rank, 2)[positions].tolist()
    other = set(rank_shard(np.arange(24), 0, store_tag(url), 0, 1 - rank, 2)[:8].tolist())
    assert not other & set(patches)
    rng = np.random.default_rng(0)
    for i in patches:
        for f in Path(url, "patches", "c", str(i)).rglob("*"):
            if f.is_file():
                f.write_bytes(rng.integers(0, 256, f.stat().st_size, dtype=np.uint8).tobytes())
    return patches


def test_a_data_error_on_one_rank_ends_every_rank_promptly_with_the_error_named(setup):
    url = str(setup["root"] / "bad" / "emit_L2.zarr")
    shutil.copytree(setup["store"], url)
    _corrupt_rank_patches(url, rank=1, positions=slice(4, 12))  # rank 1's batches 2.. (its second step)
    run = setup["root"] / "data_error"
    w = launch(setup["config"], f"run_dir={run}", f"data.sources.0.url={url}", "data.max_bad_fraction=0")
    # before: rank 1 left, rank 0 waited 10 minutes in an end-of-run collective; now a hang is any 120 s
    # without output or CPU (the rank waiting on a peer that left uses none)
    w.wait(until=lambda: "error (rank 1)" in w.stderr, idle_s=120)
    seen = time.monotonic()
    w.wait(idle_s=120)
    ended_after = time.monotonic() - seen
    assert w.returncode == 2, w.output[-3000:]
    line = next(x for x in w.stderr.splitlines() if x.startswith("error (rank 1)"))
    assert url in line, line
    assert "rank 1: exit 2 (bad input)" in w.stderr
    assert "Traceback" not in w.stderr.split("error (rank 1)")[-1]
    print(f"rank 1's data error -> every rank ended {ended_after:.1f} s later")


def test_a_deleted_chunk_is_logged_counted_and_substituted_in_a_run(setup):
    """A store with a lost chunk object trains on (within max_bad_fraction): each failed read is logged by its
    rank, and the log records count them over all ranks (``bad_samples``), so the run's metrics say it."""
    from pretrain.data.sampling import rank_shard, store_tag

    url = str(setup["root"] / "lost" / "emit_L2.zarr")
    shutil.copytree(setup["store"], url)
    # 4 steps x 2 micro-batches of 2 = 16 reads per rank > 12 per epoch: both ranks start epoch 1. The lost patch is
    # one that rank 1 reads in epoch 0 (at its first step: 4 reads) and rank 0 never reads in epoch 1, whose
    # permutation depends on the store's path (store_tag): a fixed position gave it to rank 0 for some tmp dirs
    tag = store_tag(url)
    r1e0 = [int(i) for i in rank_shard(np.arange(24), 0, tag, 0, 1, 2)]
    r0e1 = {int(i) for i in rank_shard(np.arange(24), 0, tag, 1, 0, 2)}
    first = [i for i in r1e0[:4] if i not in r0e1]
    lost = first[0] if first else next(i for i in r1e0 if i not in r0e1)
    chunks = [f for f in Path(url, "patches", "c", str(lost)).rglob("*") if f.is_file()]
    assert chunks
    for f in chunks:  # every shard object of the patch (one per band block)
        f.unlink()
    run = setup["root"] / "lost_run"
    w = launch(setup["config"], f"run_dir={run}", f"data.sources.0.url={url}", "data.max_bad_fraction=0.5",
               "stages.0.steps=4").wait()
    assert w.returncode == 0, w.output[-3000:]
    warned = [x for x in w.output.splitlines() if f"patch {lost} (batch" in x and "MissingDataError" in x]
    assert warned and all("[rank 1]" in x and "replaced by patch" in x for x in warned), w.output[-3000:]
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    counts = [r["bad_samples"] for r in recs if "loss" in r]
    assert (counts[0] if first else counts[-1]) >= 1, counts  # counted from the step that read it
    assert counts == sorted(counts) and counts[-1] == len(warned), (counts, len(warned))


def test_bad_config_exits_2_at_the_shell_before_any_rank_starts(setup):
    run = setup["root"] / "bad_config"
    w = launch(setup["config"], f"run_dir={run}", "model.name=debugg").wait()
    assert w.returncode == 2
    assert w.stderr.strip().splitlines()[-1].startswith("error: model: unknown model size 'debugg'")
    assert "rank" not in w.stderr and not run.exists()


@pytest.mark.parametrize("torchrun", [False, True], ids=["launcher", "torchrun"])
def test_stale_extension_build_lock_is_reported_not_waited_on(setup, tmp_path, torchrun):
    ext = tmp_path / "ext"
    shutil.copytree(ENV["TORCH_EXTENSIONS_DIR"], ext) if Path(ENV["TORCH_EXTENSIONS_DIR"]).is_dir() else None
    lock = ext / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text("")
    old = time.time() - 3600  # left by a build killed an hour ago
    for p in lock.parent.iterdir():
        os.utime(p, (old, old))
    run = setup["root"] / f"lock_{torchrun}"
    w = launch(setup["config"], f"run_dir={run}", env={"TORCH_EXTENSIONS_DIR": str(ext)}, torchrun=torchrun)
    w.wait(idle_s=120)
    assert w.returncode == (1 if torchrun else 2), w.output[-3000:]  # torchrun's own status is 1
    assert f"extension build lock {lock} was left by a killed build" in w.stderr
    if torchrun:
        assert "error (rank 0)" in w.stderr and "error (rank 1)" in w.stderr

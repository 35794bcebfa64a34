"""launch/pretrain.py on bad input, in-process: a clear error and exit code 2 before any training."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml

from tests.pretrain.data_fixtures import make_store

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def launch():
    spec = importlib.util.spec_from_file_location("launch_pretrain", REPO / "launch/pretrain.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture()
def config(tmp_path: Path) -> Path:
    url = make_store(str(tmp_path / "emit_L2.zarr"), n=8, bands=20, patch=16)["url"]
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "data": {"sources": [{"url": url}], "crop": 16,
                                                                             "band_window": 8},
                                 "stages": [{"name": "a", "steps": 2}, {"name": "b", "steps": 2}]}))
    return p


@pytest.mark.parametrize(("overrides", "expect"), [
    (["optim.learning_rate=1"], "unknown key(s) ['learning_rate'] in 'optim'; valid keys"),
    (["data.sources.0.url=/nowhere/x.zarr"], "patch store(s) not found: ['/nowhere/x.zarr']"),
    (["stages.1.init_from=/nowhere/export"], "init_from='/nowhere/export' is not an export directory"),
    (["model.builder=pretrain.models:nope"], "has no 'nope'"),
])
def test_bad_input_exits_2_with_a_clear_message(launch, config: Path, overrides, expect, capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert launch.main(["--config", str(config), *overrides]) == 2
    err = capsys.readouterr().err
    assert "error (rank 0)" in err and expect in err
    assert not (config.parent / "run").exists()


def test_global_batch_checked_against_torchrun_world_size(launch, config: Path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "2")
    assert launch.main(["--config", str(config), "parallel.micro_batch=2", "parallel.global_batch=8"]) == 2
    err = capsys.readouterr().err
    assert "error (rank 2)" in err and "micro_batch x world size = 2 x 3 = 6" in err


def test_stage_started_without_the_previous_export_is_an_error(launch, config: Path, capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    (config.parent / "run" / "checkpoints" / "b").mkdir(parents=True)
    assert launch.main(["--config", str(config)]) == 2
    assert "the export of the stage before it" in capsys.readouterr().err


def test_help_explains_itself(launch, capsys):
    with pytest.raises(SystemExit):
        launch.main(["--help"])
    out = capsys.readouterr().out
    assert "key=value" in out and "resumes" in out and "--nproc_per_node" in out and "exit" in out


@pytest.mark.parametrize(("codes", "expect"), [
    ({1: 2, 0: -15}, 2),      # bad input on one rank, the other stopped by the launcher
    ({1: 2, 0: 1}, 2),
    ({0: 143, 1: 143}, 143),  # SIGTERM to every rank: they saved and stopped
    ({1: -9, 0: 143}, 137),   # a rank killed (kill -9, the OOM killer)
    ({0: 1, 1: -15}, 1),      # a bug on rank 0 (its traceback is above)
])
def test_run_outcome_maps_the_ranks_codes(launch, codes, expect):
    assert launch.run_outcome(codes) == expect


def test_launcher_options_are_torchruns(launch, capsys):
    args = launch.parse_args(["--config", "c.yaml", "--nproc_per_node", "2", "a=1", "--nnodes=1", "b=2"])
    assert args.overrides == ["a=1", "b=2"] and args.nproc_per_node == 2
    assert launch.launcher_argv(args) == ["--nproc_per_node=2", "--nnodes=1", "--shutdown_timeout=120"]
    from torch.distributed.run import parse_args

    parse_args([*launch.launcher_argv(args), "launch/pretrain.py"])  # torchrun takes every one of them


def test_nproc_per_node_under_torchrun_is_an_error(launch, config: Path, capsys, monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    assert launch.main(["--config", str(config), "--nproc_per_node=2"]) == 2
    assert "under torchrun leave it out" in capsys.readouterr().err

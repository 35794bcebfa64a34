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
    assert "key=value" in out and "resumes" in out

"""The one mapping of outcomes to exit codes (data_prep.errors.run_main), on every command.

UserError -> one line + 2; an OS error on a named path -> one line + 2; SIGTERM -> 143; a bug -> traceback.
The torchrun-level codes (ranks started by launch/pretrain.py itself) are in tests/test_faults.py.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_prep.errors import EXIT_BAD_INPUT, EXIT_SIGTERM, UserError, run_main

REPO = Path(__file__).resolve().parents[1]


def _launch(name: str):
    spec = importlib.util.spec_from_file_location(f"launch_{name}_codes", REPO / "launch" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_run_main_maps_outcomes(capsys):
    before = signal.getsignal(signal.SIGTERM)
    assert run_main(lambda: None) == 0 and run_main(lambda: 3) == 3
    assert signal.getsignal(signal.SIGTERM) is before  # a command run in-process leaves the caller's handler

    def bad():
        raise UserError("stages.0.steps: expected int, got 'ten'")

    assert run_main(bad, prefix="error (rank 1)") == EXIT_BAD_INPUT
    assert capsys.readouterr().err == "error (rank 1): stages.0.steps: expected int, got 'ten'\n"

    def missing():
        open("/nonexistent/dir/file.yaml")

    assert run_main(missing) == EXIT_BAD_INPUT
    assert capsys.readouterr().err == "error: No such file or directory: /nonexistent/dir/file.yaml\n"

    def terminated():
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not stop the command")

    old = signal.getsignal(signal.SIGTERM)
    try:
        assert run_main(terminated) == EXIT_SIGTERM
    finally:
        signal.signal(signal.SIGTERM, old)
    assert capsys.readouterr().err == "error: stopped by SIGTERM\n"

    def bug():
        raise KeyError("internal")

    with pytest.raises(KeyError):  # a bug keeps its traceback
        run_main(bug)


def test_data_prep_commands_exit_2_in_one_line(tmp_path, capsys):
    from data_prep.cli import main

    assert main(["inspect", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nowhere" in err and err.count("\n") == 1
    assert main(["ingest", str(tmp_path), "--out", str(tmp_path / "o"), "--shard", "3/2", "--no-progress"]) == 2
    assert "shard 3/2: expected 0 <= k < N" in capsys.readouterr().err


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    from pretrain.models import build_model
    from pretrain.models.export import save_encoder

    torch.manual_seed(0)
    return save_encoder(build_model("debug"), tmp_path_factory.mktemp("export") / "debug")


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_finetune_and_benchmark_on_a_damaged_export_exit_2(export, tmp_path, capsys, damage):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(export, bad)
    f = bad / "encoder.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"not a tensor file" * 64)
    rc = _launch("finetune").main(["--config", str(REPO / "configs/finetune/synthetic_linear_probe.yaml"),
                                   "--checkpoint", str(bad), "--out", str(tmp_path / "ft")])
    err = capsys.readouterr().err
    assert rc == 2 and "encoder.safetensors: not a readable safetensors file" in err, err
    assert "Traceback" not in err and not (tmp_path / "ft").exists()
    rc = _launch("benchmark").main(["--suite", str(REPO / "configs/benchmarks/synthetic.yaml"), "--checkpoint",
                                    str(bad), "--out", str(tmp_path / "b"), "--no-progress"])
    assert rc == 2 and "not a readable safetensors file" in capsys.readouterr().err


def test_finetune_float_overrides_run_and_bad_ones_exit_2(export, tmp_path, capsys):
    from data_prep.simulate.corpus import simulate_corpus

    corpus = simulate_corpus(tmp_path / "corpus", sensors=("emit",), levels=("L2",), scenes=1, size=32, seed=1,
                             progress=False, change_pairs=False, fusion=False)
    ft = _launch("finetune")
    base = ["--config", str(REPO / "configs/finetune/synthetic_linear_probe.yaml"), "--checkpoint", str(export),
            "--data", str(corpus), "data.band_stride=16", "data.tile=8", "train.steps=1"]
    # used to be the string '1e-4' and "'<=' not supported between instances of 'str' and 'int'"
    assert ft.main([*base, "--out", str(tmp_path / "ok"), "train.lr=1e-4", "train.encoder_lr=1e-4"]) == 0
    capsys.readouterr()
    assert ft.main([*base, "--out", str(tmp_path / "no"), "train.lr=fast"]) == 2
    err = capsys.readouterr().err
    assert "train.lr: expected float, got 'fast'" in err and "Traceback" not in err
    assert _launch("benchmark").main(["--suite", str(REPO / "configs/benchmarks/synthetic.yaml"), "--checkpoint",
                                      str(export), "--out", str(tmp_path / "b"), "--each", "train.stepz=1"]) == 2
    assert "unknown key(s) ['stepz']" in capsys.readouterr().err


@pytest.mark.parametrize(("override", "expect"), [
    ("model.name=debugg", "unknown model size 'debugg'"),
    ("model.overrides={dimm: 64}", "unknown model override(s) ['dimm']"),
])
def test_pretrain_model_typos_exit_2_before_any_process_group(tmp_path, capsys, monkeypatch, override, expect):
    import torch.distributed as dist
    import yaml

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "data": {"sources": [{"url": "nowhere.zarr"}]},
                                   "stages": [{"name": "a", "steps": 1}]}))
    assert _launch("pretrain").main(["--config", str(cfg), override]) == 2
    err = capsys.readouterr().err
    assert f"error (rank 0): model: {expect}" in err, err
    assert not dist.is_initialized() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("launcher", ["pretrain.py", "finetune.py"])
def test_launchers_do_not_shadow_their_packages_with_pythonpath_set(tmp_path, launcher):
    """Issue 11: ``PYTHONPATH=$repo torchrun launch/pretrain.py`` failed with "'pretrain' is not a package"."""
    args = ["--config", str(tmp_path / "none.yaml")] + (["--checkpoint", "x", "--out", "y"]
                                                       if launcher == "finetune.py" else [])
    r = subprocess.run([sys.executable, str(REPO / "launch" / launcher), *args], cwd=tmp_path, text=True,
                       capture_output=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 2, r.stderr
    assert "is not a package" not in r.stderr and "none.yaml does not exist" in r.stderr


def test_sigterm_while_lingering_after_an_error_keeps_the_error_code(capsys):
    """Under torchrun the first rank to leave makes the agent SIGTERM the others, which are lingering after
    printing their own error: they still exit 2, without a traceback."""
    import threading

    def bad():
        threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM)).start()
        raise UserError("model: unknown model size 'debugg'")

    old = signal.getsignal(signal.SIGTERM)
    try:
        assert run_main(bad, prefix="error (rank 1)", linger=5.0) == EXIT_BAD_INPUT
    finally:
        signal.signal(signal.SIGTERM, old)
    assert capsys.readouterr().err == "error (rank 1): model: unknown model size 'debugg'\n"

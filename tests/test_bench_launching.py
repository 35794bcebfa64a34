"""bench/launching.launch_env: what every benchmark's training run gets (one implementation for all benches)."""

from pathlib import Path

from bench.launching import EXTENSIONS_DIR, launch_env

REPO = Path(__file__).resolve().parents[1]


def test_launch_env_defaults_and_what_the_caller_keeps(monkeypatch):
    for k in ("TORCH_EXTENSIONS_DIR", "OMP_NUM_THREADS", "DS_ACCELERATOR", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    monkeypatch.setenv("WANDB_MODE", "online")
    env = launch_env()
    assert env["PYTHONPATH"] == str(REPO)  # this checkout is what a bench measures
    assert env["TORCH_EXTENSIONS_DIR"] == str(EXTENSIONS_DIR) and env["HF_HUB_OFFLINE"] == "1"
    assert env["WANDB_MODE"] == "disabled" and env["OMP_NUM_THREADS"] == "1"
    assert env["DS_ACCELERATOR"] == "cpu"  # no GPU on the test machines
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/tmp/ext")
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    env = launch_env(wandb="offline", omp_threads=None)
    assert env["TORCH_EXTENSIONS_DIR"] == "/tmp/ext" and env["OMP_NUM_THREADS"] == "4"
    assert env["WANDB_MODE"] == "offline"
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert "OMP_NUM_THREADS" not in launch_env(omp_threads=None)

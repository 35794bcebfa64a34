"""The environment every benchmark gives the training runs it launches (``torchrun launch/pretrain.py``).

One place for what a bench's child run needs on any machine: the repository on ``PYTHONPATH``, DeepSpeed's CPU
accelerator where no GPU is visible (under torchrun it falls back to gloo), no model-hub access, the bench's wandb
mode (``disabled`` unless it asks for another), and one JIT-extension cache (``TORCH_EXTENSIONS_DIR``, default
``~/.cache/specfm/torch_extensions``, so DeepSpeed's shared-memory op is compiled once per machine, not once per
run). Anything already set in the caller's environment wins, except ``PYTHONPATH`` (the benches measure this
checkout) and ``WANDB_MODE``. (The test suite's launches use ``tests/launching.ENV`` instead: CPU forced and a
per-checkout extension cache.)
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EXTENSIONS_DIR = Path.home() / ".cache" / "specfm" / "torch_extensions"


def launch_env(*, wandb: str = "disabled", omp_threads: int | None = 1) -> dict[str, str]:
    """``os.environ`` plus the defaults above; ``omp_threads`` None leaves OpenMP's thread count alone."""
    import torch

    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(EXTENSIONS_DIR))
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["WANDB_MODE"] = wandb
    if omp_threads is not None:
        env.setdefault("OMP_NUM_THREADS", str(omp_threads))
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    return env

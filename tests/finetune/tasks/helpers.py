"""Small constructed tasks shared by the task tests (a real debug encoder comes from tests/finetune/conftest.py)."""

from __future__ import annotations

import numpy as np

from finetune.config import TaskConfig
from finetune.datasets.base import Spectral
from tests.finetune.conftest import band_table

C = 6


def spectral(c: int = C, sensor: str = "emit") -> Spectral:
    wl, fw = band_table(c)
    return Spectral(wl.numpy(), fw.numpy(), sensor, "L2")


def cfg(kind: str, mode: str = "finetune", steps: int = 40, seed: int = 0, lr: float = 3e-3, **kw) -> TaskConfig:
    """A task config; ``train_extra`` overrides or adds ``train`` keys (e.g. ``epochs``)."""
    train = {"mode": mode, "steps": steps, "batch_size": 8, "lr": lr, "encoder_lr": 1e-3, "seed": seed,
             **kw.pop("train_extra", {})}
    return TaskConfig(name=f"t_{kind}", kind=kind, data={"loader": "x"}, normalise=kw.pop("normalise", False),
                      train=train, **kw)


def two_class_patches(n: int = 16, size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    g = np.random.default_rng(0)
    labels = np.arange(n) % 2
    x = g.normal(0, 0.3, (n, C, size, size)).astype(np.float32)
    x[labels == 1, :3] += 1.5
    x[labels == 0, 3:] += 1.5
    return x, labels

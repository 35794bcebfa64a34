"""Schedules as pure functions of the step, so resuming needs no scheduler state."""

from __future__ import annotations

import math


def lr_at(step: int, *, total_steps: int, peak_lr: float, min_lr: float, warmup_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based) of a stage.

    Linear warm-up from ``peak_lr / warmup_steps`` to ``peak_lr`` over the first ``warmup_steps`` steps,
    then a half cosine from ``peak_lr`` down to ``min_lr`` at the last step (``total_steps - 1``).
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    decay = max(1, total_steps - 1 - warmup_steps)
    t = min(1.0, (step - warmup_steps) / decay)
    return min_lr + 0.5 * (peak_lr - min_lr) * (1.0 + math.cos(math.pi * t))


def ema_momentum(step: int, *, total_steps: int, start: float = 0.996, end: float = 1.0) -> float:
    """EMA momentum for a JEPA target encoder: cosine from ``start`` to ``end`` over the stage."""
    t = min(1.0, step / max(1, total_steps - 1))
    return end - (end - start) * 0.5 * (1.0 + math.cos(math.pi * t))

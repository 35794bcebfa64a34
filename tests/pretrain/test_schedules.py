"""Learning-rate and EMA schedules are pure functions of the step."""

import math

import pytest

from pretrain.schedules import ema_momentum, lr_at


def test_warmup_then_cosine_to_floor():
    kw = {"total_steps": 110, "peak_lr": 1.5e-4, "min_lr": 1e-5, "warmup_steps": 10}
    lrs = [lr_at(s, **kw) for s in range(110)]
    assert lrs[0] == pytest.approx(1.5e-5)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))  # warm-up rises
    assert lrs[9] == pytest.approx(1.5e-4) and lrs[10] == pytest.approx(1.5e-4)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # then decays monotonically
    assert lrs[-1] == pytest.approx(1e-5)
    mid = 10 + (109 - 10) / 2
    assert lr_at(int(mid), **kw) == pytest.approx(1e-5 + 0.5 * 1.4e-4 * (1 + math.cos(math.pi * (int(mid) - 10) / 99)))
    assert lr_at(500, **kw) == pytest.approx(1e-5)  # past the end: the floor


def test_no_warmup_starts_at_peak_and_is_deterministic():
    kw = {"total_steps": 5, "peak_lr": 1.0, "min_lr": 0.0, "warmup_steps": 0}
    assert lr_at(0, **kw) == 1.0 and lr_at(4, **kw) == pytest.approx(0.0)
    assert [lr_at(s, **kw) for s in range(5)] == [lr_at(s, **kw) for s in range(5)]
    with pytest.raises(ValueError):
        lr_at(-1, **kw)


def test_ema_momentum_goes_from_start_to_one():
    assert ema_momentum(0, total_steps=100) == pytest.approx(0.996)
    assert ema_momentum(99, total_steps=100) == pytest.approx(1.0)

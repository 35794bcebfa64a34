"""Checkpoint bookkeeping: only complete tags count, pruning, shape/world-size checks, RNG round trip."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pretrain import checkpoint as ckpt


def _tag(d: Path, step: int, complete: bool, shapes: dict | None = None, world: int = 1) -> Path:
    p = d / ckpt.tag_name(step)
    p.mkdir(parents=True)
    (p / "mp_rank_00_model_states.pt").write_bytes(b"x")
    if complete:
        (p / ckpt.MARKER).write_text(json.dumps({"step": step, "world_size": world, "param_shapes": shapes or {}}))
    return p


def test_latest_complete_ignores_a_half_written_save(tmp_path: Path):
    _tag(tmp_path, 2, True)
    _tag(tmp_path, 10, True)
    _tag(tmp_path, 12, False)  # killed during the save
    assert ckpt.latest_complete(tmp_path).name == "step_00000010"
    assert [p.name for p in ckpt.complete_tags(tmp_path)] == ["step_00000002", "step_00000010"]
    assert ckpt.latest_complete(tmp_path / "missing") is None


def test_prune_keeps_the_newest_complete_and_drops_stale_partials(tmp_path: Path):
    for s in (2, 4, 6):
        _tag(tmp_path, s, True)
    _tag(tmp_path, 3, False)
    _tag(tmp_path, 8, False)  # newer than the newest complete: could be in progress, kept
    ckpt.prune(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000004", "step_00000006", "step_00000008"]


def test_check_compatible_names_the_mismatch(tmp_path: Path):
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8))
    shapes = ckpt.param_shapes(model)
    assert shapes["0.weight"] == [8, 4]
    good = _tag(tmp_path, 1, True, shapes)
    assert ckpt.check_compatible(good, shapes)["step"] == 1
    other = ckpt.param_shapes(nn.Sequential(nn.Linear(4, 16), nn.LayerNorm(16)))
    with pytest.raises(ckpt.CheckpointError, match=r"another model shape.*0.weight: checkpoint \[8, 4\] vs model \[16, 4\]"):
        ckpt.check_compatible(good, other)
    two = _tag(tmp_path, 2, True, shapes, world=2)
    with pytest.raises(ckpt.CheckpointError, match="written by 2 ranks, this run has 1"):
        ckpt.check_compatible(two, shapes)


def test_rng_state_round_trips_through_json():
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    st = json.loads(json.dumps(ckpt.rng_state()))
    a = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    ckpt.set_rng_state(st)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]

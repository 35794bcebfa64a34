"""The plan: derived values resolved once (accumulation, per-stage schedules and data, DeepSpeed dict, layout)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pretrain.config import ConfigError, load_config
from pretrain.layout import RunLayout
from pretrain.plan import make_plan, preflight

BASE = {
    "run_dir": "RUN",
    "optim": {"lr": 1e-3, "min_lr": 1e-5, "warmup_steps": 7},
    "parallel": {"micro_batch": 2, "global_batch": 8},
    "data": {"sources": [{"url": "a.zarr"}, {"url": "b.zarr", "weight": 0}], "crop": 16},
    "stages": [{"name": "one", "steps": 5, "sources": [{"url": "a.zarr"}], "lr": 5e-4, "warmup_steps": 1},
               {"name": "two", "epochs": 1, "min_lr": 0.0}],
}


@pytest.fixture()
def cfg(tmp_path: Path):
    doc = json.loads(json.dumps(BASE).replace("RUN", str(tmp_path / "run")))
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(doc))
    return load_config(p)


def test_plan_resolves_layout_schedules_and_data_once(cfg, tmp_path: Path):
    plan = make_plan(cfg, world_size=2)
    assert (plan.grad_accum, plan.global_batch) == (2, 8)
    assert plan.deepspeed["gradient_accumulation_steps"] == 2 and plan.deepspeed["train_batch_size"] == 8
    one, two = plan.stages
    assert (one.lr, one.min_lr, one.warmup_steps, one.steps) == (5e-4, 1e-5, 1, 5)
    assert (two.lr, two.min_lr, two.warmup_steps, two.steps, two.epochs) == (1e-3, 0.0, 7, None, 1)
    assert [s.url for s in one.data.sources] == ["a.zarr"] and one.data.batch_size == 2
    assert [s.url for s in two.data.sources] == ["a.zarr", "b.zarr"] and two.data.epochs == 1
    assert plan.store_urls() == ["a.zarr"]  # weight 0 is left out
    assert one.init_from == "none" and two.init_from == "previous"
    lay = plan.layout
    assert lay == RunLayout(tmp_path / "run", tmp_path / "run" / "checkpoints")
    assert lay.checkpoints("two") == tmp_path / "run/checkpoints/two"
    assert lay.figure("one", 3) == tmp_path / "run/figures/one/step_00000003.png"
    assert plan.steps_from_batches(two, 9) == 4
    with pytest.raises(ConfigError, match="fewer than one optimizer step of 2 micro-batches"):
        plan.steps_from_batches(two, 1)
    with pytest.raises(ConfigError, match="not divisible by micro_batch x world size = 2 x 3 = 6"):
        make_plan(cfg, world_size=3)


def test_init_export_needs_the_previous_stage_done(cfg):
    plan = make_plan(cfg, world_size=1)
    assert plan.init_export(plan.stages[0]) is None
    with pytest.raises(ConfigError, match="starts from the export of stage 'one'.*stage_done.json missing"):
        plan.init_export(plan.stages[1])
    lay = plan.layout
    lay.export("one").mkdir(parents=True)
    lay.mark_done("one", {"global_step": 5})
    assert plan.init_export(plan.stages[1]) == lay.export("one") and lay.stage_done("one") == {"global_step": 5}


def test_checkpoint_dir_moves_checkpoints_only(cfg, tmp_path: Path):
    cfg.checkpoint.dir = str(tmp_path / "ck")
    lay = make_plan(cfg, 1).layout
    assert lay.checkpoints("one") == tmp_path / "ck/one" and lay.export("one") == tmp_path / "run/export/one"


def test_stage_min_lr_above_lr_is_an_error(cfg):
    cfg.stages[0].min_lr = 1e-2
    with pytest.raises(ConfigError, match=r"stages.0 \(one\): min_lr 0.01 > lr 0.0005"):
        make_plan(cfg, 2)


def test_preflight_names_missing_stores(cfg):
    with pytest.raises(ConfigError, match=r"patch store\(s\) not found: \['a.zarr'\]"):
        preflight(make_plan(cfg, 2))

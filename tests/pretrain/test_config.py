"""Typed config: YAML + key=value overrides, unknown keys, layout checks, every shipped config parses."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pretrain.config import ConfigError, TrainConfig, dump_config, load_config

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted((REPO / "configs" / "pretrain").glob("*.yaml"))

BASE = {
    "run_dir": "runs/x",
    "data": {"sources": [{"url": "a.zarr"}, {"url": "b.zarr", "weight": 2}], "crop": 16},
    "stages": [{"name": "one", "steps": 5, "sources": [{"url": "a.zarr"}]}, {"name": "two", "epochs": 1}],
}


@pytest.fixture()
def base_yaml(tmp_path: Path) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(BASE))
    return p


def test_shipped_configs_exist_and_parse():
    names = {p.name for p in SHIPPED}
    assert "demo.yaml" in names and "specaware_vitb.yaml" in names
    for p in SHIPPED:
        cfg = load_config(p)
        assert isinstance(cfg, TrainConfig) and cfg.stages
        for st in cfg.stages:
            assert cfg.stage_data(st).sources


def test_specaware_config_is_the_paper_recipe():
    cfg = load_config(REPO / "configs/pretrain/specaware_vitb.yaml")
    assert cfg.model.name == "base" and [s.name for s in cfg.stages][0].startswith("stage1")
    assert [s.url for s in cfg.stages[0].sources] == ["data/stores/aviris-3_L1.zarr"]
    subsets = {s.url.rsplit("/", 1)[1]: s.subset for s in cfg.stages[1].sources}
    assert all(v == (20000 if "_L1" in k else 10000) for k, v in subsets.items()) and len(subsets) == 12
    assert cfg.stages[2].sources is None and len(cfg.data.sources) == 12
    assert cfg.parallel.global_batch == 256 and cfg.optim.lr == 1.5e-4 and cfg.optim.min_lr == 1e-5
    assert cfg.parallel.resolve(8) == (1, 256)
    assert cfg.stages[1].init_from == "previous" and cfg.stages[0].init_from == "none"
    assert (cfg.data.band_window, cfg.data.band_stride, cfg.data.crop) == (100, 32, 128)


def test_overrides_with_dotted_paths_and_list_indices(base_yaml: Path):
    cfg = load_config(base_yaml, ["optim.lr=1e-4", "stages.0.steps=10", "data.sources.1.subset=3",
                                  "parallel.zero_stage=3", "model.overrides={mask_ratio: 0.5}", "max_steps=7"])
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.stages[0].steps == 10 and cfg.data.sources[1].subset == 3
    assert cfg.parallel.zero_stage == 3 and cfg.model.overrides == {"mask_ratio": 0.5} and cfg.max_steps == 7
    assert cfg.data.crop == 16  # from the YAML, the rest from defaults
    assert cfg.data.batch_size == cfg.parallel.micro_batch


def test_carry_objective_defaults_on_and_is_a_bool(base_yaml: Path):
    assert [s.carry_objective for s in load_config(base_yaml).stages] == [True, True]
    assert load_config(base_yaml, ["stages.1.carry_objective=false"]).stages[1].carry_objective is False
    with pytest.raises(ConfigError, match=r"stages.1.carry_objective: expected bool, got 3"):
        load_config(base_yaml, ["stages.1.carry_objective=3"])


def test_stage_data_uses_stage_sources_or_the_default(base_yaml: Path):
    cfg = load_config(base_yaml, ["parallel.micro_batch=3"])
    d1, d2 = cfg.stage_data(cfg.stages[0]), cfg.stage_data(cfg.stages[1])
    assert [s.url for s in d1.sources] == ["a.zarr"] and d1.epochs is None and d1.batch_size == 3
    assert [s.url for s in d2.sources] == ["a.zarr", "b.zarr"] and d2.epochs == 1


@pytest.mark.parametrize(("override", "expect"), [
    ("optim.lrr=1", "unknown key(s) ['lrr'] in 'optim'; valid keys: ['lr', 'min_lr'"),
    ("paralel.zero_stage=1", "unknown key(s) ['paralel'] at the top level; valid keys: ['run_dir'"),
    ("data.crops=3", "unknown key(s) ['crops'] in 'data'"),
    ("stages.0.stepz=3", "unknown key(s) ['stepz'] in 'stages.0'"),
    ("stages.5.steps=3", "stages has 2 entries, '5' is not an index"),
    ("parallel.zero_stage=4", "zero_stage must be 0, 1, 2 or 3, got 4"),
    ("parallel.micro_batch=two", "parallel.micro_batch: expected int, got 'two'"),
    ("optim.lr=1e-6", "min_lr <= lr"),
    ("stages.1.steps=4", "set exactly one of steps or epochs"),
    ("logging.wandb=maybe", "'online', 'offline' or 'disabled'"),
    ("noequals", "must look like key=value"),
])
def test_bad_overrides_name_key_and_valid_choices(base_yaml: Path, override: str, expect: str):
    with pytest.raises(ConfigError) as e:
        load_config(base_yaml, [override])
    assert expect in str(e.value)


def test_missing_file_and_bad_yaml(tmp_path: Path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "b.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(tmp_path / "b.yaml")
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({**BASE, "stages": []}))
    with pytest.raises(ConfigError, match="at least one entry in 'stages'"):
        load_config(tmp_path / "s.yaml")


@pytest.mark.parametrize(("parallel", "world", "expect"), [
    ({"micro_batch": 4, "grad_accum": 2}, 2, (2, 16)),
    ({"micro_batch": 4, "global_batch": 32}, 2, (4, 32)),
    ({"micro_batch": 4}, 3, (1, 12)),
    ({"micro_batch": 4, "grad_accum": 2, "global_batch": 16}, 2, (2, 16)),
])
def test_global_batch_resolution(base_yaml: Path, parallel: dict, world: int, expect: tuple):
    cfg = load_config(base_yaml, [f"parallel.{k}={v}" for k, v in parallel.items()])
    assert cfg.parallel.resolve(world) == expect


def test_global_batch_not_divisible_is_a_clear_error(base_yaml: Path):
    cfg = load_config(base_yaml, ["parallel.micro_batch=4", "parallel.global_batch=20"])
    with pytest.raises(ConfigError, match=r"global_batch=20 is not divisible by micro_batch x world size = 4 x 2 = 8"):
        cfg.parallel.resolve(2)
    cfg = load_config(base_yaml, ["parallel.micro_batch=4", "parallel.grad_accum=2", "parallel.global_batch=20"])
    with pytest.raises(ConfigError, match=r"global_batch=20 != micro_batch x grad_accum x world size"):
        cfg.parallel.resolve(2)


def test_dump_round_trips(base_yaml: Path, tmp_path: Path):
    cfg = load_config(base_yaml, ["optim.lr=3e-4", "stages.0.warmup_steps=2"])
    out = tmp_path / "resolved.yaml"
    out.write_text(dump_config(cfg))
    again = load_config(out)
    assert again.to_dict() == cfg.to_dict()


@pytest.mark.parametrize(("override", "expect"), [
    ("model.name=debugg", "unknown model size 'debugg'; known sizes: ['base', 'debug'"),
    ("model.overrides={dimm: 64}", "unknown model override(s) ['dimm']"),
    ("model.overrides={dim: 63}", "dim/heads: 63 is not divisible by 2"),
    ("model.overrides={mask_ratio: high}", "overrides.mask_ratio: expected float, got 'high'"),
    ("model.builder=pretrain.models:nope", "has no 'nope'"),
    ("logging.instruments=[pretrain.nowhere:fn]", "cannot import module 'pretrain.nowhere'"),
])
def test_model_name_and_overrides_checked_when_the_config_loads(base_yaml: Path, override: str, expect: str):
    """No process group, no DeepSpeed, no model built: the builder's check_args sees the name and overrides."""
    with pytest.raises(ConfigError) as e:
        load_config(base_yaml, [override])
    assert expect in str(e.value)


def test_float_overrides_in_yaml_and_model_overrides(base_yaml: Path, tmp_path: Path):
    doc = yaml.safe_load(base_yaml.read_text())
    doc["optim"] = {"lr": "3e-4", "min_lr": "1e-6"}  # as PyYAML reads `lr: 3e-4`
    doc["model"] = {"overrides": {"mask_ratio": "6e-1"}}
    p = tmp_path / "f.yaml"
    p.write_text(yaml.safe_dump(doc))
    cfg = load_config(p, ["stages.0.lr=2e-4"])
    assert cfg.optim.lr == 3e-4 and cfg.optim.min_lr == 1e-6 and cfg.stages[0].lr == 2e-4
    assert cfg.model.overrides == {"mask_ratio": 0.6}

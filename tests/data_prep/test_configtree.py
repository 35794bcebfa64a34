"""The one config mechanism (data_prep.configtree) and its users: pretraining, finetuning, data, model args."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from data_prep import configtree
from data_prep.configtree import ConfigError
from data_prep.errors import UserError

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Leaf:
    name: str
    rate: float = 0.5
    sizes: tuple[int, int] = (1, 2)

    def __post_init__(self) -> None:
        if self.rate < 0:
            raise UserError(f"rate must be >= 0, got {self.rate}")


@dataclass
class Root:
    count: int = 1
    ratio: float = 1.0
    flag: bool = False
    label: str | None = None
    leaves: list[Leaf] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    by_name: dict[str, Leaf] = field(default_factory=dict)


def test_yaml_floats_without_a_dot_are_floats_where_a_float_is_expected():
    # PyYAML reads 1e-4 as the string '1e-4'; the float field and untyped content take it as a float
    tree = yaml.safe_load("ratio: 1e-4\nextra: {lr: 3e-5, name: 1e3x}\nleaves: [{name: a, rate: 2E-1}]")
    assert tree["ratio"] == "1e-4"
    r = configtree.build(Root, tree)
    assert r.ratio == 1e-4 and isinstance(r.ratio, float)
    assert r.extra == {"lr": 3e-5, "name": "1e3x"} and r.leaves[0].rate == 0.2
    assert configtree.build(Root, {"ratio": 2}).ratio == 2.0  # an int where a float is expected


def test_overrides_dotted_paths_list_indices_and_flow_values():
    tree = {"leaves": [{"name": "a"}, {"name": "b"}]}
    configtree.apply_overrides(tree, ["leaves.1.rate=1e-2", "count=3", "extra={k: [1, 2]}", "label=",
                                      "by_name.x.name=y", "leaves.0.sizes=[3, 4]"])
    r = configtree.build(Root, tree)
    assert r.leaves[1].rate == 0.01 and r.count == 3 and r.extra == {"k": [1, 2]} and r.label == ""
    assert r.by_name["x"] == Leaf(name="y") and r.leaves[0].sizes == (3, 4)


@pytest.mark.parametrize(("tree", "expect"), [
    ({"cont": 1}, "unknown key(s) ['cont'] at the top level; valid keys: ['count', 'ratio'"),
    ({"leaves": [{"name": "a", "rat": 1}]}, "unknown key(s) ['rat'] in 'leaves.0'; valid keys: ['name', 'rate'"),
    ({"count": "two"}, "count: expected int, got 'two' (str)"),
    ({"count": True}, "count: expected int, got True"),
    ({"ratio": "fast"}, "ratio: expected float, got 'fast'"),
    ({"flag": "yes please"}, "flag: expected bool"),
    ({"leaves": {"name": "a"}}, "leaves: expected a list"),
    ({"leaves": [{"rate": 1}]}, "leaves.0: missing required key(s) ['name']"),
    ({"leaves": [{"name": "a", "sizes": [1, 2, 3]}]}, "leaves.0.sizes: expected 2 values"),
    ({"leaves": [{"name": "a", "rate": -1}]}, "leaves.0: rate must be >= 0, got -1.0"),
    ({"by_name": {"x": {"name": 3}}}, "by_name.x.name: expected str, got 3"),
])
def test_bad_trees_name_the_dotted_key_and_what_was_expected(tree, expect):
    with pytest.raises(ConfigError) as e:
        configtree.build(Root, tree)
    assert expect in str(e.value)


@pytest.mark.parametrize(("override", "expect"), [
    ("noequals", "must look like key=value"),
    ("=3", "the key must be a dotted path"),
    ("leaves.2.rate=1", "leaves has 1 entries, '2' is not an index of it"),
    ("count.x=1", "count is a value (1), not a section"),
])
def test_bad_overrides(override, expect):
    with pytest.raises(ConfigError, match=expect.replace("(", r"\(").replace(")", r"\)")):
        configtree.apply_overrides({"leaves": [{"name": "a"}], "count": 1}, [override])


def test_error_class_of_the_caller_and_chained_cause():
    class MyError(UserError):
        pass

    with pytest.raises(MyError, match="unknown thing"):
        configtree.build(Root, {"x": 1}, error=MyError, what="thing")
    with pytest.raises(ConfigError) as e:
        configtree.build(Root, {"leaves": [{"name": "a", "rate": -1}]})
    assert isinstance(e.value.__cause__, UserError)


def test_dump_round_trips(tmp_path: Path):
    r = configtree.build(Root, {"leaves": [{"name": "a", "sizes": [5, 6]}], "extra": {"p": Path("x")}})
    f = tmp_path / "r.yaml"
    f.write_text(configtree.dump(r))
    assert configtree.load(Root, f) == configtree.build(Root, {"leaves": [{"name": "a", "sizes": [5, 6]}],
                                                               "extra": {"p": "x"}})


def test_read_yaml_errors_name_the_file(tmp_path: Path):
    with pytest.raises(ConfigError, match="does not exist"):
        configtree.read_yaml(tmp_path / "none.yaml")
    (tmp_path / "l.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match=r"l.yaml: the top level must be a mapping"):
        configtree.read_yaml(tmp_path / "l.yaml")
    (tmp_path / "b.yaml").write_text("a: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        configtree.read_yaml(tmp_path / "b.yaml")
    (tmp_path / "e.yaml").write_text("")
    assert configtree.read_yaml(tmp_path / "e.yaml") == {}


def test_import_object():
    assert configtree.import_object("data_prep.configtree:build") is configtree.build
    with pytest.raises(ConfigError, match="has no 'nope'"):
        configtree.import_object("data_prep.configtree:nope")
    with pytest.raises(ConfigError, match="cannot import module 'no_such_mod'"):
        configtree.import_object("no_such_mod:x")
    with pytest.raises(ConfigError, match="must be 'module:name'"):
        configtree.import_object("data_prep.configtree")


# ----------------------------------------------------------------------------- the users

def test_finetune_task_takes_float_overrides_it_used_to_read_as_strings():
    from finetune.config import load_task

    path = REPO / "configs/finetune/synthetic_change.yaml"
    task = load_task(path, ["train.lr=1e-4", "train.encoder_lr=1e-5", "train.steps=3"])
    assert task.train.lr == 1e-4 and task.train.encoder_lr == 1e-5 and isinstance(task.train.lr, float)
    with pytest.raises(ConfigError, match=r"synthetic_change.yaml: .*train.encoder_lr: expected float, got 'fast'"):
        load_task(path, ["train.encoder_lr=fast"])
    with pytest.raises(ConfigError, match=r"encoder_lr > 0"):
        load_task(path, ["train.encoder_lr=-1e-4"])


def test_finetune_suite_overrides_reach_tasks_by_index_and_every_task():
    from finetune.config import load_suite

    suite = load_suite(REPO / "configs/benchmarks/synthetic.yaml", ["tasks.0.train.steps=7"], ["train.lr=2e-3"])
    assert suite.tasks[0].train.steps == 7 and all(t.train.lr == 2e-3 for t in suite.tasks)
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['stepz'\] in 'tasks.1.train'"):
        load_suite(REPO / "configs/benchmarks/synthetic.yaml", ["tasks.1.train.stepz=7"])


def test_data_config_and_model_args_use_the_same_checks():
    from pretrain.data import DataConfig, DataError
    from pretrain.models import ModelError, get_args
    from pretrain.models.args import ModelArgs

    d = DataConfig.from_dict({"sources": [{"url": "a.zarr", "weight": 2}], "crop": 16})
    assert d.sources[0].weight == 2.0 and isinstance(d.sources[0].weight, float)
    with pytest.raises(DataError, match=r"data.crop: expected int, got '16px'"):
        DataConfig.from_dict({"sources": [{"url": "a.zarr"}], "crop": "16px"})
    assert get_args("debug", mask_ratio="5e-1").mask_ratio == 0.5
    with pytest.raises(ModelError, match=r"unknown model override\(s\) \['dimm'\]"):
        get_args("debug", dimm=3)
    with pytest.raises(ModelError, match=r"overrides.depth: expected int, got 'deep'"):
        get_args("debug", depth="deep")
    a = ModelArgs.from_dict({**get_args("debug").to_dict()})
    assert a == get_args("debug") and isinstance(a.jepa_band_frac, tuple)

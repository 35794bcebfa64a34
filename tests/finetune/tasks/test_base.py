"""finetune.tasks.base: the kind registry is the set of Task subclasses; every task is seeded before it builds
its data split and head, so it scores the same alone and inside a suite (issue 15)."""

import numpy as np
import pytest
import torch

from finetune.config import ConfigError, SuiteConfig, TaskConfig
from finetune.datasets.base import ClassificationData, DatasetError, SegmentationData
from finetune.runner import run_suite
from finetune.tasks import Task, kinds, run_task, task_class
from finetune.tasks.base import Task as BaseTask
from tests.finetune.tasks.helpers import cfg, spectral, two_class_patches


def test_kinds_are_the_registered_task_classes():
    assert kinds() == ("change", "classification", "cross_sensor", "fusion", "segmentation")
    for k in kinds():
        cls = task_class(k)
        assert issubclass(cls, Task) and cls.kind == k and cls.headline and cls.data_type
    with pytest.raises(DatasetError, match="unknown task kind 'pansharpen'.*classification"):
        task_class("pansharpen")
    with pytest.raises(ConfigError, match="kind is 'pansharpen'; expected one of"):
        TaskConfig(name="x", kind="pansharpen", data={"loader": "x"})


def test_a_new_kind_is_one_subclass(monkeypatch):
    monkeypatch.setattr(BaseTask, "_registry", dict(BaseTask._registry))

    class Counting(Task):
        kind = "counting"
        data_type = ClassificationData
        headline = "MAE"

    assert task_class("counting") is Counting and "counting" in kinds()
    TaskConfig(name="c", kind="counting", data={"loader": "x"})  # the config accepts it with no other change
    with pytest.raises(TypeError, match="registered twice"):
        type("Again", (Task,), {"kind": "counting"})


def test_wrong_container_is_a_clear_error(encoder):
    x, y = two_class_patches()
    with pytest.raises(DatasetError, match="needs SegmentationData, got ClassificationData"):
        run_task(encoder, ClassificationData(x, y, ["a", "b"], spectral()), cfg("segmentation"))


def _classification():
    x, y = two_class_patches(n=24)
    x = x + np.random.default_rng(5).normal(0, 1.0, x.shape).astype(np.float32)  # not trivially separable
    return ClassificationData(x, y, ["a", "b"], spectral())


def test_same_figures_whatever_the_global_random_state(encoder):
    data = _classification()
    state = {k: v.clone() for k, v in encoder.state_dict().items()}
    runs = []
    for seed in (1, 12345):
        torch.manual_seed(seed)  # what earlier tasks or the caller left behind
        np.random.seed(seed)
        encoder.load_state_dict(state)
        res = run_task(encoder, data, cfg("classification", "linear_probe", steps=8))
        runs.append((res.arrays["losses"], res.metrics))
    assert runs[0] == runs[1]
    encoder.load_state_dict(state)
    other = run_task(encoder, data, cfg("classification", "linear_probe", steps=8, seed=3))
    assert other.arrays["losses"] != runs[0][0]  # the seed does matter: the check above can fail


def test_a_task_scores_the_same_alone_and_after_another_in_a_suite(encoder, tmp_path, monkeypatch):
    data = {"cls": _classification()}
    g = np.random.default_rng(0)
    lab = np.zeros((16, 16), np.int64)
    lab[:, 8:] = 1
    data["seg"] = SegmentationData(g.normal(0, 1, (6, 16, 16)).astype(np.float32), lab, ["a", "b"], spectral())
    monkeypatch.setattr("finetune.runner.load_dataset", lambda spec: data[spec["loader"]])
    probe = TaskConfig(name="probe", kind="classification", data={"loader": "cls"},
                       train={"mode": "linear_probe", "steps": 8, "batch_size": 8})
    seg = TaskConfig(name="seg", kind="segmentation", data={"loader": "seg"}, head={"channels": 8},
                     train={"steps": 2, "batch_size": 2}, eval={"window": 16, "stride": 8})
    alone = run_suite(SuiteConfig("alone", [probe]), encoder, tmp_path / "a", progress=False)
    after = run_suite(SuiteConfig("suite", [seg, probe]), encoder, tmp_path / "b", progress=False)
    assert alone["tasks"]["probe"]["metrics"] == after["tasks"]["probe"]["metrics"]
    assert alone["tasks"]["probe"]["details"]["loss"] == after["tasks"]["probe"]["details"]["loss"]

"""finetune.tasks.base: the kind registry is the set of Task subclasses; every task is seeded before it builds
its data split and head, so it scores the same alone and inside a suite (issue 15)."""

import math

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
    # a suite ending with a fine-tuned task gives the caller its encoder back as it was (bench/downstream.py runs
    # the suite once per seed on one encoder: seed 1 started from seed 0's fine-tuned weights)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    run_suite(SuiteConfig("last", [probe, seg]), encoder, tmp_path / "c", progress=False)
    assert all(torch.equal(v, before[k]) for k, v in encoder.state_dict().items())


def test_layer_decay_gives_the_documented_per_layer_learning_rates(encoder):
    """BEiT / MAE layer-wise decay: embedding (meta, content, hypernetwork) encoder_lr * d^(L+1), block i
    encoder_lr * d^(L-i), what follows the blocks (final norm, fusion) encoder_lr; the head at lr; every encoder
    parameter in exactly one group."""
    from finetune.heads import SceneClassifier
    from finetune.tasks.base import _optimizer, encoder_layer_id

    depth = encoder.depth
    assert depth == 2
    encoder.unfreeze()
    model = SceneClassifier(encoder, 2)
    c = cfg("classification", train_extra={"encoder_lr": 1e-3, "lr": 1e-2, "layer_decay": 0.5})
    opt = _optimizer(model, encoder, c)
    lr_of = {id(p): (g["lr"], g["layer"]) for g in opt.param_groups for p in g["params"]}
    names = dict(encoder.named_parameters())
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    expect = {"inner.meta": 1e-3 * 0.5 ** 3, "inner.content": 1e-3 * 0.5 ** 3, "inner.hyper": 1e-3 * 0.5 ** 3,
              "inner.blocks.0": 1e-3 * 0.5 ** 2, "inner.blocks.1": 1e-3 * 0.5, "inner.norm": 1e-3}
    for prefix, lr in expect.items():
        ps = [p for n, p in names.items() if n.startswith(prefix + ".")]
        assert ps, prefix
        assert all(math.isclose(lr_of[id(p)][0], lr) for p in ps), prefix
    assert {lr_of[id(p)][0] for p in model.head.parameters()} == {1e-2}
    assert encoder_layer_id("inner.fusion.blocks.0.attn.qkv.weight", depth) == depth + 1
    # no decay: one encoder group at encoder_lr (what every task did before layer_decay existed)
    opt1 = _optimizer(model, encoder, cfg("classification", train_extra={"encoder_lr": 1e-3}))
    assert [g["lr"] for g in opt1.param_groups] == [3e-3, 1e-3]
    encoder.freeze()  # a frozen encoder has no groups
    assert [g["layer"] for g in _optimizer(model, encoder, c).param_groups] == ["head"]


def test_layer_decay_slows_the_embedding_in_training(encoder):
    """In a fine-tuning run the embedding moves less relative to the last block with decay than without."""
    data = _classification()
    state = {k: v.clone() for k, v in encoder.state_dict().items()}

    def moved(decay):
        encoder.load_state_dict(state)
        run_task(encoder, data, cfg("classification", steps=6, train_extra={"layer_decay": decay}))
        after = dict(encoder.named_parameters())
        d = {k: float((after[k].detach() - state[k]).norm() / state[k].norm().clamp(min=1e-8))
             for k in ("inner.hyper.to_u.weight", "inner.blocks.1.attn.qkv.weight")}
        return d["inner.hyper.to_u.weight"] / d["inner.blocks.1.attn.qkv.weight"]

    assert moved(0.25) < 0.5 * moved(1.0)
    encoder.load_state_dict(state)


def test_layer_decay_is_checked():
    with pytest.raises(ConfigError, match="layer_decay"):
        cfg("classification", train_extra={"layer_decay": 0.0})
    with pytest.raises(ConfigError, match="layer_decay"):
        cfg("classification", train_extra={"layer_decay": 1.5})


def test_raw_linear_fits_a_capped_seeded_draw_of_the_training_rows():
    from finetune.tasks.base import raw_linear

    g = np.random.default_rng(0)
    y = np.arange(5000) % 3
    x = g.normal(0, 0.3, (5000, 4)) + np.eye(3, 4)[y] * 2  # each class bright in its own band
    pred = raw_linear(x, y, np.arange(5000), max_train=300, seed=1)
    assert (pred == y).mean() > 0.95
    assert np.array_equal(pred, raw_linear(x, y, np.arange(5000), max_train=300, seed=1))  # the draw is the seed's
    # the cap is what is fitted: 3 rows of one class each can't be a 3-class fit, so it falls to one class
    one = raw_linear(x, y, np.arange(5000), np.arange(10), max_train=1, seed=0)
    assert one.shape == (10,) and np.unique(one).size == 1
    assert raw_linear(x, y, np.arange(5000), np.arange(0)).shape == (0,)

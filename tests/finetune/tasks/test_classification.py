"""finetune.tasks.classification: the linear probe trains only the head; the task learns a separable set."""

import numpy as np
import torch

from finetune.datasets.base import ClassificationData
from finetune.heads import SceneClassifier
from finetune.tasks import run_task, stratified_split, train_loop
from tests.finetune.conftest import band_table
from tests.finetune.tasks.helpers import C, cfg, spectral, two_class_patches


def _train(encoder, mode: str, steps: int) -> tuple[SceneClassifier, dict, list[float]]:
    """Train a probe on two separable classes; the model, its parameters before, the loss curve."""
    x, y = two_class_patches()
    model = SceneClassifier(encoder, 2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    wl, fw = band_table(C)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    losses = train_loop(model, encoder, cfg("classification", mode, steps=steps),
                        lambda r: ((xt, wl, fw), yt), torch.nn.functional.cross_entropy)
    return model, before, losses


def test_linear_probe_changes_only_head_parameters(encoder):
    model, before, losses = _train(encoder, "linear_probe", 10)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"head.fc.weight", "head.fc.bias"}
    assert losses[-1] < losses[0]


def test_full_finetune_changes_encoder(encoder):
    model, before, _ = _train(encoder, "finetune", 2)
    assert any(not torch.equal(p, before[f"encoder.{n}"]) for n, p in encoder.named_parameters())


def test_classification_learns_held_out_samples(encoder):
    x, y = two_class_patches(n=24)
    data = ClassificationData(x, y, ["a", "b"], spectral())
    res = run_task(encoder, data, cfg("classification", steps=30, eval={"train_fraction": 0.5}))
    assert res.metrics["OA"] >= 0.9
    assert res.details["n_train"] + res.details["n_test"] == 24


def test_raw_spectrum_baseline_classifies_the_mean_spectrum(encoder):
    """The encoder-free baseline: a logistic regression on each sample's mean spectrum, scored on the same test
    samples; perfect when the classes differ in mean spectrum, chance when only their layout differs."""
    x, y = two_class_patches(n=24)
    short = cfg("classification", steps=1, eval={"train_fraction": 0.5})
    res = run_task(encoder, ClassificationData(x, y, ["a", "b"], spectral()), short)
    assert res.details["baselines"]["raw_spectrum"]["OA"] == 1.0
    g = np.random.default_rng(0)
    y = np.arange(40) % 2
    layout = g.normal(0, 0.3, (40, C, 8, 8)).astype(np.float32)
    layout[y == 0, :, :4] += 1.5  # the same bright half-tile in every class: top half or bottom half
    layout[y == 1, :, 4:] += 1.5
    res = run_task(encoder, ClassificationData(layout, y, ["a", "b"], spectral()), short)
    assert res.details["baselines"]["raw_spectrum"]["OA"] <= 0.75


def test_stratified_split_keeps_every_class_on_both_sides():
    labels = np.array([0] * 10 + [1] * 3 + [2] * 2)
    tr, te = stratified_split(labels, 0.5, seed=0)
    assert sorted(np.concatenate([tr, te]).tolist()) == list(range(15))
    for c in (0, 1, 2):
        assert (labels[tr] == c).any() and (labels[te] == c).any()
    assert (labels[tr] == 0).sum() == 5

"""finetune.tasks.change: balanced sampling and a learnable change."""

import numpy as np

from finetune.datasets.base import ChangeData
from finetune.heads.change import balanced_split
from finetune.tasks import run_task
from tests.finetune.tasks.helpers import C, cfg, spectral


def test_change_learns_with_balanced_sampling(encoder):
    g = np.random.default_rng(0)
    h, w = 24, 24
    t1 = g.normal(0, 0.2, (C, h, w)).astype(np.float32)
    t2 = t1 + g.normal(0, 0.05, t1.shape).astype(np.float32)
    change = np.zeros((h, w), np.int64)
    change[6:18, 6:18] = 1
    t2[:, change == 1] += 2.0
    data = ChangeData(t1, t2, change, spectral())
    res = run_task(encoder, data, cfg("change", steps=30, eval={"n_per_class": 40, "test_max": 200}))
    assert res.details["n_train"] == 80 and res.details["n_test"] == 200
    assert res.metrics["F1"] >= 0.85, res.metrics
    # the encoder-free baseline (a logistic regression on both spectra and their difference) sees the change too
    assert res.details["baselines"]["raw_spectrum"]["F1"] >= 0.95
    # and only what the pixels show: the same labels over dates that differ by noise alone give it nothing
    t2 = t1 + g.normal(0, 0.05, t1.shape).astype(np.float32)
    res = run_task(encoder, ChangeData(t1, t2, change, spectral()), cfg("change", steps=1, eval={"n_per_class": 40,
                                                                                                  "test_max": 200}))
    assert res.details["baselines"]["raw_spectrum"]["F1"] < 0.8


def test_balanced_split_is_disjoint_and_balanced():
    change = np.zeros((10, 10), np.int64)
    change[:3] = 1
    change[9, 9] = -1
    tr, te = balanced_split(change, 10, seed=0)
    flat = change.reshape(-1)
    assert (flat[tr] == 1).sum() == (flat[tr] == 0).sum() == 10
    assert not set(tr) & set(te) and 99 not in te and len(tr) + len(te) == 99


def _square_change(h=32, w=64, seed=0):
    g = np.random.default_rng(seed)
    t1 = g.normal(0, 0.2, (C, h, w)).astype(np.float32)
    t2 = t1 + g.normal(0, 0.05, t1.shape).astype(np.float32)
    change = np.zeros((h, w), np.int64)
    for x0 in (4, 36):  # one changed block in the training half, one in the test half
        change[8:24, x0:x0 + 16] = 1
    change[0, :] = -1  # an unknown row is ignored in training and scoring
    t2[:, change == 1] += 2.0
    return ChangeData(t1, t2, change, spectral())


def test_pangaea_change_maps_the_scene_with_a_frozen_encoder(encoder):
    import torch

    from finetune.heads import SiameseUperNet
    from finetune.tasks.change import ChangeTask

    data = _square_change()
    before = {n: p.detach().clone() for n, p in encoder.named_parameters()}
    c = cfg("change", "finetune", steps=40, lr=3e-3, protocol="pangaea", head={"channels": 16},
            eval={"window": 16, "train_fraction": 0.5})
    task = ChangeTask(c)
    res = task.run(encoder, data)
    assert all(torch.equal(p, before[n]) for n, p in encoder.named_parameters())  # frozen though mode=finetune
    assert res.metrics["F1"] >= 0.8 and res.metrics["mIoU"] >= 0.7, res.metrics
    assert res.details["n_test"] == int((data.change[:, 32:] >= 0).sum())  # every labelled test pixel scored
    assert res.details["baselines"]["raw_spectrum"]["mIoU"] >= 0.9  # the change is in the spectra: raw input sees it
    assert (res.arrays["pred"][:, :32] == -1).all()  # training columns are not scored
    head = task.build_head(encoder)
    assert isinstance(head, SiameseUperNet) and head.strategy == "concat" and not head.pixel_skip


def test_pangaea_change_rejects_an_unknown_strategy(encoder):
    import pytest

    from data_prep.configtree import ConfigError

    c = cfg("change", steps=1, protocol="pangaea", head={"strategy": "sum"}, eval={"window": 16})
    with pytest.raises(ConfigError, match="strategy.*'concat'.*'diff'"):
        run_task(encoder, _square_change(), c)

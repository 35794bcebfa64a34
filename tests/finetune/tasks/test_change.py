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


def test_balanced_split_is_disjoint_and_balanced():
    change = np.zeros((10, 10), np.int64)
    change[:3] = 1
    change[9, 9] = -1
    tr, te = balanced_split(change, 10, seed=0)
    flat = change.reshape(-1)
    assert (flat[tr] == 1).sum() == (flat[tr] == 0).sum() == 10
    assert not set(tr) & set(te) and 99 not in te and len(tr) + len(te) == 99

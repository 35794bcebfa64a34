"""finetune.tasks.segmentation: UperNet learns a separable scene and is scored on the held-out half."""

import numpy as np
import torch

from finetune.datasets.base import SegmentationData
from finetune.heads.upernet import predict_scene, window_starts
from finetune.tasks import run_task
from tests.finetune.tasks.helpers import C, cfg, spectral


def test_segmentation_learns_and_scores_the_held_out_half(encoder):
    g = np.random.default_rng(0)
    h, w = 16, 32
    lab = np.zeros((h, w), np.int64)
    lab[:, 8:16] = 1
    lab[:, 24:] = 1
    img = g.normal(0, 0.2, (C, h, w)).astype(np.float32)
    img[:3] += 2 * lab
    data = SegmentationData(img, lab, ["bg", "fg"], spectral())
    res = run_task(encoder, data, cfg("segmentation", steps=40, head={"channels": 16},
                                      eval={"window": 16, "stride": 8, "train_fraction": 0.5}))
    assert res.metrics["OA"] >= 0.8 and res.metrics["mIoU"] >= 0.65, res.metrics
    assert res.arrays["train_mask"][:, :16].all() and not res.arrays["train_mask"][:, 16:].any()


def test_sliding_window_covers_the_scene():
    assert window_starts(32, 16, 12) == [0, 12, 16]

    class Uniform(torch.nn.Module):
        def forward(self, x, *a, **k):
            return torch.zeros(x.shape[0], 2, *x.shape[-2:])

    prob = predict_scene(Uniform(), torch.zeros(C, 20, 20), None, None, 2, 16, 8)
    assert prob.shape == (2, 20, 20) and torch.allclose(prob, torch.full_like(prob, 0.5))


def test_pixel_skip_resolves_boundaries_inside_a_token(encoder):
    """Classes alternating pixel by pixel (a token covers 8 x 8, the pyramid's finest level 2 x 2): the spectral
    pixel branch labels them; the pyramid alone cannot."""
    g = np.random.default_rng(1)
    h, w = 16, 32
    yy, xx = np.mgrid[0:h, 0:w]
    lab = ((yy + xx) % 2).astype(np.int64)
    img = g.normal(0, 0.2, (C, h, w)).astype(np.float32)
    img[:3] += 2 * lab
    data = SegmentationData(img, lab, ["a", "b"], spectral())
    scores = {}
    for skip in (True, False):
        res = run_task(encoder, data, cfg("segmentation", steps=30, head={"channels": 16, "pixel_skip": skip},
                                          eval={"window": 16, "stride": 8, "train_fraction": 0.5}))
        scores[skip] = res.metrics["OA"]
    assert scores[True] >= 0.9 and scores[False] < 0.75, scores

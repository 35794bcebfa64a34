"""finetune.tasks.segmentation: UperNet learns a separable scene and is scored on the held-out half."""

import numpy as np
import pytest
import torch

from finetune.datasets.base import SegmentationData
from finetune.heads.upernet import predict_scene
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


def test_raw_spectrum_baseline_is_a_per_pixel_classifier_of_the_training_half(encoder):
    """The encoder-free baseline reads each pixel's own spectrum: perfect where the class is in the spectrum,
    chance where it is only in the layout (the same spectra for both classes)."""
    g = np.random.default_rng(1)
    h, w = 16, 32
    lab = np.zeros((h, w), np.int64)
    lab[:, 4:12] = 1
    lab[:, 20:28] = 1
    img = g.normal(0, 0.2, (C, h, w)).astype(np.float32)
    spectral_cls = img.copy()
    spectral_cls[:3] += 2 * lab
    short = cfg("segmentation", steps=1, head={"channels": 16}, eval={"window": 16, "stride": 8, "train_fraction": 0.5})
    res = run_task(encoder, SegmentationData(spectral_cls, lab, ["bg", "fg"], spectral()), short)
    assert res.details["baselines"]["raw_spectrum"]["mIoU"] == 1.0
    layout_only = run_task(encoder, SegmentationData(img, lab, ["bg", "fg"], spectral()), short)
    assert layout_only.details["baselines"]["raw_spectrum"]["OA"] < 0.7


def test_sliding_window_covers_the_scene():
    class Uniform(torch.nn.Module):
        def forward(self, x, *a, **k):
            return torch.zeros(x.shape[0], 2, *x.shape[-2:])

    prob = predict_scene(Uniform(), torch.zeros(C, 20, 20), None, None, 2, 16, 8)
    assert prob.shape == (2, 20, 20) and torch.allclose(prob, torch.full_like(prob, 0.5))


def test_sliding_window_stride_below_half_the_window_is_a_config_error(encoder):
    from finetune.windows import WindowError

    data = SegmentationData(np.zeros((C, 16, 32), np.float32), np.zeros((16, 32), np.int64), ["a", "b"], spectral())
    with pytest.raises(WindowError, match="eval.stride 4 must lie between eval.window / 2 and eval.window"):
        run_task(encoder, data, cfg("segmentation", steps=1, eval={"window": 16, "stride": 4}))


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


def test_pangaea_protocol_freezes_the_encoder_and_uses_plain_upernet_on_its_layers(encoder):
    from finetune.tasks.pangaea import pangaea_layers
    from finetune.tasks.segmentation import SegmentationTask

    g = np.random.default_rng(0)
    lab = np.zeros((16, 32), np.int64)
    lab[:, 8:16] = 1
    img = g.normal(0, 0.2, (C, 16, 32)).astype(np.float32)
    img[:3] += 2 * lab
    data = SegmentationData(img, lab, ["bg", "fg"], spectral())
    before = {n: p.detach().clone() for n, p in encoder.named_parameters()}
    c = cfg("segmentation", "finetune", steps=6, head={"channels": 16}, protocol="pangaea",
            eval={"window": 16, "stride": 8})
    task = SegmentationTask(c)
    res = task.run(encoder, data)
    assert all(torch.equal(p, before[n]) for n, p in encoder.named_parameters())  # frozen though mode=finetune
    assert 0 <= res.metrics["OA"] <= 1 and res.details["steps"] == 6
    task.prepare(encoder, data)
    head = task.build_head(encoder)
    assert not head.pixel_skip and head.layers == pangaea_layers(encoder.depth)
    assert isinstance(head.dropout, torch.nn.Dropout2d) and head.dropout.p == 0.1
    assert [task.lr_schedule(s, 100) for s in (0, 59, 60, 89, 90)] == [1.0, 1.0, 0.1, 0.1, pytest.approx(0.01)]
    # no flips under PANGAEA: every drawn window is a crop of the scene as it is
    (x, *_), y = task.batch(np.random.default_rng(3))
    crops = {tuple(task.windows.labels[yy:yy + 16, xx:xx + 16].flatten().tolist()) for yy, xx in task.windows.origins}
    assert all(tuple(t.flatten().tolist()) in crops for t in y)


def test_epochs_set_the_steps_from_the_labelled_tiles(encoder):
    g = np.random.default_rng(0)
    lab = g.integers(0, 2, (16, 64))
    img = g.normal(0, 0.2, (C, 16, 64)).astype(np.float32)
    data = SegmentationData(img, lab, ["a", "b"], spectral())
    c = cfg("segmentation", steps=999, head={"channels": 8}, train_extra={"epochs": 3, "batch_size": 1},
            eval={"window": 16, "stride": 16, "train_fraction": 0.5})
    res = run_task(encoder, data, c)
    assert res.details["steps"] == 3 * 2 and len(res.arrays["losses"]) == 6  # 2 labelled 16 x 16 tiles in 32 columns

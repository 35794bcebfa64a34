"""finetune.tasks.pangaea and the Siamese UPerNet: PANGAEA's schedule, layers, limited labels and sliding grid."""

import numpy as np
import pytest
import torch

from finetune.heads import SiameseUperNet
from finetune.heads.upernet import pangaea_window_starts, predict_scene
from finetune.tasks import pangaea as P
from tests.finetune.conftest import band_table


@pytest.mark.parametrize("total", [7, 10, 100, 333])
def test_multistep_factor_is_torch_multisteplr_with_pangaeas_integer_milestones(total):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [int(total * r) for r in (0.6, 0.9)], gamma=0.1)
    for step in range(total):
        assert P.multistep_factor(step, total) == pytest.approx(opt.param_groups[0]["lr"]), step
        opt.step()
        sched.step()


def test_layers_of_pangaea_scaled_to_the_depth():
    assert P.pangaea_layers(12) == (3, 5, 7, 11)
    assert P.pangaea_layers(24) == (7, 11, 15, 23)
    assert P.pangaea_layers(2) == (0, 0, 0, 1)


def test_limited_labels_keep_whole_tiles_stratified_by_class_share():
    w = 8
    lab = np.full((8, 8 * w), -1, np.int64)
    # 8 tiles: 4 all class 0, 2 all class 1, 2 half/half
    for k, kind in enumerate([0, 0, 0, 0, 1, 1, 2, 2]):
        t = lab[:, k * w:(k + 1) * w]
        t[:] = kind if kind < 2 else 0
        if kind == 2:
            t[:, : w // 2] = 1
    kept = P.limited_label_tiles(lab, 0.5, w, 2, seed=0)
    tiles = [kept[:, k * w:(k + 1) * w] for k in range(8)]
    whole = [bool((t >= 0).all()) for t in tiles]
    assert all(bool((t >= 0).all()) or bool((t < 0).all()) for t in tiles)  # tiles kept whole or dropped whole
    assert sum(whole[:4]) == 2 and sum(whole[4:6]) == 1 and sum(whole[6:]) == 1  # int(max(1, n * 0.5)) per group
    assert np.array_equal(kept[kept >= 0], lab[kept >= 0])
    assert P.labelled_tiles(kept, w) == 4 and P.limited_label_tiles(lab, 1.0, w, 2, 0) is lab


def test_window_grid_without_stride_is_pangaeas_even_spread():
    assert pangaea_window_starts(100, 32) == [0, 23, 45, 68]  # ceil(100 / 32) windows, linspace(0, 68, 4) rounded
    assert pangaea_window_starts(64, 32) == [0, 32] and pangaea_window_starts(20, 32) == [0]


def test_sliding_inference_averages_logits_or_probabilities():
    class Ramp(torch.nn.Module):  # logits (x, 0) at every pixel: softmax and mean do not commute
        def forward(self, x, *a, **k):
            return torch.stack([x[:, 0], torch.zeros_like(x[:, 0])], 1)

    img = torch.zeros(1, 8, 12)
    img[0, :, 4:8] = 4.0
    logit = predict_scene(Ramp(), img, None, None, 2, 8, 4, average="logits")
    prob = predict_scene(Ramp(), img, None, None, 2, 8, 4)
    assert torch.allclose(logit[0], img[0]) and torch.allclose(prob.sum(0), torch.ones(8, 12))


def test_siamese_upernet_diff_sees_only_the_difference_and_concat_both_dates(encoder):
    wl, fw = band_table(6)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 6, 16, 16, generator=g), torch.randn(2, 6, 16, 16, generator=g)
    torch.manual_seed(0)
    diff = SiameseUperNet(encoder, 2, channels=8, strategy="diff", dropout=0.0).eval()
    with torch.no_grad():
        out = diff(a, a, wl, fw)
        assert out.shape == (2, 2, 16, 16)
        assert torch.allclose(out, diff(b, b, wl, fw), atol=1e-5)  # no change: the map does not depend on the image
        assert not torch.allclose(out, diff(a, b, wl, fw), atol=1e-3)
    concat = SiameseUperNet(encoder, 2, channels=8, strategy="concat").eval()
    assert concat.rescale[2].__class__ is torch.nn.Identity and concat.lateral[0][0].in_channels == 2 * encoder.embed_dim
    with torch.no_grad():
        assert not torch.allclose(concat(a, a, wl, fw), concat(b, b, wl, fw), atol=1e-3)

"""Charbonnier + spectral-angle reconstruction loss and the JEPA latent loss."""

from __future__ import annotations

import math

import pytest
import torch

from pretrain.losses import charbonnier, latent_loss, reconstruction_loss, sam_loss, spectral_angle
from pretrain.models import build_model


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_zero_for_perfect_reconstruction_positive_otherwise():
    t = rand(2, 30, 16, 64)
    w = (rand(2, 16, 64, seed=1) > 0).float()
    out = reconstruction_loss(t.clone(), t, w)
    assert out["loss"].item() == 0.0 and out["charbonnier"].item() == 0.0 and out["sam"].item() == 0.0
    noisy = t + 0.1 * rand(2, 30, 16, 64, seed=2)
    out = reconstruction_loss(noisy, t, w)
    assert out["charbonnier"] > 0.05 and out["sam"] > 0.01
    assert torch.isclose(out["loss"], out["charbonnier"] + out["sam"])


def test_gradient_is_finite_at_perfect_reconstruction():
    t = rand(2, 10, 4, 9)
    p = t.clone().requires_grad_(True)
    reconstruction_loss(p, t)["loss"].backward()
    assert torch.isfinite(p.grad).all()


def test_spectral_angle_ignores_scale_and_matches_arccos():
    t = rand(3, 50, 7).abs() + 0.1
    p = t + 0.3 * rand(3, 50, 7, seed=3)
    assert spectral_angle(4.2 * t, t).abs().max() < 1e-3
    torch.testing.assert_close(spectral_angle(0.01 * p, t), spectral_angle(p, t), atol=1e-5, rtol=1e-4)
    cos = (p * t).sum(1) / (p.norm(dim=1) * t.norm(dim=1))
    torch.testing.assert_close(spectral_angle(p, t), torch.arccos(cos), atol=1e-4, rtol=1e-4)
    assert math.isclose(spectral_angle(-t, t).mean().item(), math.pi, rel_tol=1e-4)
    # Charbonnier does see the scale
    assert charbonnier(4.2 * t, t) > 1.0


def test_weight_selects_pixels_and_normalises_by_their_count():
    t = rand(2, 5, 4, 9)
    p = rand(2, 5, 4, 9, seed=1)
    w = torch.zeros(2, 4, 9)
    w[0, 1, :] = 1
    w[1, 3, 2:5] = 1
    sel = w.bool()
    # reference: plain means over the selected pixels (all bands)
    ce = torch.sqrt((p - t) ** 2 + 1e-6) - 1e-3
    ref_ch = ce.permute(0, 2, 3, 1)[sel].mean()
    ref_sam = spectral_angle(p, t)[sel].mean()
    torch.testing.assert_close(charbonnier(p, t, w), ref_ch)
    torch.testing.assert_close(sam_loss(p, t, w), ref_sam)
    # a weight that broadcasts over pixels ([B,N,1]) means the same as the full one
    w2 = torch.zeros(2, 4, 1)
    w2[0, 1] = 1
    torch.testing.assert_close(charbonnier(p, t, w2), charbonnier(p, t, w2.expand(-1, -1, 9)))
    # unselected pixels do not matter
    p2 = p.clone()
    p2.permute(0, 2, 3, 1)[~sel] = 100.0
    torch.testing.assert_close(reconstruction_loss(p2, t, w)["loss"], reconstruction_loss(p, t, w)["loss"])


def test_loss_weights_are_configurable():
    t = rand(1, 6, 4, 4)
    p = rand(1, 6, 4, 4, seed=1)
    a = reconstruction_loss(p, t, charbonnier_weight=1.0, sam_weight=0.0)
    b = reconstruction_loss(p, t, charbonnier_weight=0.0, sam_weight=2.0)
    torch.testing.assert_close(a["loss"], a["charbonnier"])
    torch.testing.assert_close(b["loss"], 2 * b["sam"])


def test_mae_loss_ignores_invalid_pixels():
    torch.manual_seed(0)
    model = build_model("debug").eval()
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(2, 6, 16, 16, generator=g)
    valid = torch.rand(2, 16, 16, generator=g) > 0.3
    batch = {"pixels": pixels, "wavelengths": torch.linspace(400, 2400, 6).expand(2, -1).clone(),
             "fwhm": torch.full((2, 6), 10.0), "valid": valid}
    a = model(batch, generator=torch.Generator().manual_seed(1))["loss"]
    garbage = pixels.clone()
    garbage[~valid.unsqueeze(1).expand_as(garbage)] = 1e4
    b = model({**batch, "pixels": garbage}, generator=torch.Generator().manual_seed(1))["loss"]
    torch.testing.assert_close(a, b)
    c = model({**batch, "pixels": garbage, "valid": None}, generator=torch.Generator().manual_seed(1))["loss"]
    assert c > 10 * a  # without the mask the garbage counts


def test_latent_loss_kinds():
    a = rand(2, 4, 8)
    assert latent_loss(a, a).item() == 0.0 and latent_loss(a, a, "mse").item() == 0.0
    torch.testing.assert_close(latent_loss(a, a + 2.0, "mse"), torch.tensor(4.0))
    torch.testing.assert_close(latent_loss(a, a + 2.0), torch.tensor(1.5))  # smooth L1: |d| - 0.5


def test_per_band_weight_scores_only_the_weighted_bands():
    from pretrain.losses import charbonnier as ch

    t = torch.zeros(1, 3, 2, 4)
    p = t.clone()
    p[:, 1] = 2.0  # band 1 wrong everywhere
    w = torch.zeros(1, 3, 2, 4)
    w[:, 0] = 1.0
    assert ch(p, t, w, eps=1e-6).item() == 0.0  # band 1 not weighted
    w[:, 1, 0] = 1.0  # band 1, token 0
    assert ch(p, t, w, eps=1e-6).item() == pytest.approx(2.0 * 4 / (8 + 4), rel=1e-5)
    # a per-band weight that is the same in every band equals the shared weight
    shared = (rand(1, 2, 4, seed=3) > 0).float()
    q = rand(1, 3, 2, 4, seed=4)
    assert ch(q, t, shared).item() == pytest.approx(ch(q, t, shared.unsqueeze(1).expand(1, 3, 2, 4)).item(), rel=1e-6)
    full = reconstruction_loss(q, t, shared.unsqueeze(1).expand(1, 3, 2, 4))
    assert full["sam"].item() == pytest.approx(sam_loss(q, t, shared).item(), rel=1e-6)


def test_condition_decorrelation_of_known_conditions():
    from pretrain.losses import condition_decorrelation

    same = rand(1, 1, 8).expand(2, 5, 8)
    assert condition_decorrelation(same).item() == pytest.approx(1.0, abs=1e-6)
    assert condition_decorrelation(torch.eye(6).unsqueeze(0)).item() == pytest.approx(0.0, abs=1e-7)
    opposite = torch.tensor([[[1.0, 0.0], [-1.0, 0.0]]])
    assert condition_decorrelation(opposite).item() == pytest.approx(1.0, abs=1e-6)  # squared: anti-aligned too
    x = rand(3, 7, 16, seed=5).requires_grad_(True)
    condition_decorrelation(x).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0

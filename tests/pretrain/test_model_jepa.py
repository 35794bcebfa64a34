"""JEPA objective: target encoder without gradients that follows the EMA, local views inside the batch."""

from __future__ import annotations

import pytest
import torch

from pretrain.models import build_model
from pretrain.schedules import ema_momentum


def make_batch(b=2, c=24, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"pixels": torch.randn(b, c, size, size, generator=g),
            "wavelengths": torch.sort(torch.rand(b, c, generator=g) * 2000 + 420, 1).values,
            "fwhm": torch.rand(b, c, generator=g) * 8 + 3, "sensor": torch.tensor([0, 2])[:b],
            "level": torch.tensor([1, 2])[:b], "valid": torch.rand(b, size, size, generator=g) > 0.1}


@pytest.fixture(scope="module")
def jepa():
    torch.manual_seed(0)
    return build_model("debug", objective="jepa")


def test_target_encoder_gets_no_gradient_context_does(jepa):
    jepa.zero_grad()
    out = jepa(make_batch())
    out["loss"].backward()
    assert out["loss"] > 0
    assert all(not p.requires_grad and p.grad is None for p in jepa.target_encoder.parameters())
    trainable = [n for n, p in jepa.named_parameters() if p.requires_grad]
    assert trainable and not any(n.startswith("target_encoder.") for n in trainable)
    for n, p in jepa.named_parameters():
        if p.requires_grad and not n.startswith("encoder.meta.level_unknown"):
            assert p.grad is not None, n


def test_target_follows_ema(jepa):
    with torch.no_grad():
        for p in jepa.encoder.parameters():
            p.add_(0.01 * torch.randn_like(p))
    before = [p.clone() for p in jepa.target_encoder.parameters()]
    online = [p.clone() for p in jepa.encoder.parameters()]
    assert any((a - b).abs().max() > 0 for a, b in zip(before, online))
    jepa.update_target(0.9)
    for t, t0, o in zip(jepa.target_encoder.parameters(), before, online):
        torch.testing.assert_close(t, 0.9 * t0 + 0.1 * o)
    jepa.update_target(1.0)  # momentum 1: unchanged
    jepa.update_target(0.0)  # momentum 0: a copy
    for t, o in zip(jepa.target_encoder.parameters(), jepa.encoder.parameters()):
        torch.testing.assert_close(t, o)
    with pytest.raises(ValueError, match="momentum"):
        jepa.update_target(1.5)


def test_target_starts_as_a_copy_and_init_weights_keeps_it_one(jepa):
    fresh = build_model("debug", objective="jepa")
    for t, o in zip(fresh.target_encoder.state_dict().values(), fresh.encoder.state_dict().values()):
        assert torch.equal(t, o)
    before = fresh.encoder.blocks[0].attn.qkv.weight.clone()
    fresh.init_weights()
    assert not torch.equal(before, fresh.encoder.blocks[0].attn.qkv.weight)
    for t, o in zip(fresh.target_encoder.state_dict().values(), fresh.encoder.state_dict().values()):
        assert torch.equal(t, o)


def test_local_view_is_band_window_and_smaller_crop(jepa):
    g = torch.Generator().manual_seed(0)
    seen_k, seen_side = set(), set()
    for _ in range(50):
        b0, k, y0, sh, x0, sw = jepa.draw_view(100, 16, 16, g)
        assert 25 <= k <= 75 and 0 <= b0 <= 100 - k
        assert 8 <= sh <= 12 and 8 <= sw <= 12 and y0 + sh <= 16 and x0 + sw <= 16
        seen_k.add(k)
        seen_side.add(sh)
    assert len(seen_k) > 5 and len(seen_side) > 1


def test_jepa_loss_decreases_on_one_batch():
    torch.manual_seed(0)
    model = build_model("debug", objective="jepa")
    batch = make_batch()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for step in range(20):
        out = model(batch, generator=torch.Generator().manual_seed(step % 3))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        model.update_target(ema_momentum(step, total_steps=20))
        losses.append(out["loss"].item())
    assert sum(losses[-3:]) < 0.7 * sum(losses[:3]), losses

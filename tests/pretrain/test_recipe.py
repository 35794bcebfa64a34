"""The learning-recipe options of issue 11: spectral masking masks what its config says, the content-free output
condition, the band-condition decorrelation term, the loss on visible patches."""

from __future__ import annotations

import pytest
import torch

from pretrain.models import build_model
from pretrain.models.args import ModelError, get_args
from pretrain.models.mae import random_band_mask


def _batch(b=3, c=20, s=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"pixels": torch.randn(b, c, s, s, generator=g), "wavelengths": torch.linspace(400, 2400, c).expand(b, -1),
            "fwhm": torch.full((b, c), 10.0), "valid": torch.ones(b, s, s, dtype=torch.bool)}


def test_random_band_mask_hides_exactly_the_configured_count():
    g = torch.Generator().manual_seed(1)
    for c, ratio, hide in ((20, 0.5, 10), (20, 0.25, 5), (7, 0.3, 2), (3, 0.99, 2), (10, 0.0, 0)):
        hidden, visible = random_band_mask(4, c, ratio, torch.device("cpu"), g)
        assert hidden.shape == (4, c) and visible.shape == (4, c - hide)
        assert (hidden.sum(1) == hide).all()
        assert (torch.diff(visible, dim=1) > 0).all()  # ascending: the bands keep their order
        assert not hidden.gather(1, visible).any()  # visible indices are exactly the non-hidden bands
    h1, _ = random_band_mask(64, 20, 0.5, torch.device("cpu"), torch.Generator().manual_seed(2))
    assert len({tuple(r.tolist()) for r in h1}) > 32  # drawn per sample


def _capture(model):
    seen = {}
    orig_embed = model.encoder.embed

    def embed(pixels, wavelengths, fwhm, *a, **k):
        seen.update(pixels=pixels.detach().clone(), wavelengths=wavelengths.detach().clone())
        out = orig_embed(pixels, wavelengths, fwhm, *a, **k)
        seen["tokens"] = out[0].detach().clone()
        return out

    model.encoder.embed = embed
    model.head.register_forward_pre_hook(lambda m, args: seen.__setitem__("head_cond", args[1].detach().clone()))
    return seen


def test_spectral_masking_hides_the_bands_from_the_encoder_and_scores_them(monkeypatch):
    import pretrain.models.mae as mae_mod

    torch.manual_seed(0)
    model = build_model("debug", band_mask_ratio=0.5, head_condition="meta")
    seen = _capture(model)
    weights = []
    real = mae_mod.reconstruction_loss
    monkeypatch.setattr(mae_mod, "reconstruction_loss", lambda pred, tgt, w, *a: weights.append(w) or real(pred, tgt, w, *a))
    batch = _batch()
    out = model(batch, generator=torch.Generator().manual_seed(5))
    hidden = out["hidden_bands"]
    assert hidden.shape == (3, 20) and (hidden.sum(1) == 10).all()
    # the encoder got exactly the visible bands, with their wavelengths, in order
    assert seen["pixels"].shape[1] == 10
    for i in range(3):
        vis = (~hidden[i]).nonzero().flatten()
        torch.testing.assert_close(seen["pixels"][i], batch["pixels"][i, vis])
        torch.testing.assert_close(seen["wavelengths"][i], batch["wavelengths"][i, vis])
    # the loss scores masked patches in every band and the hidden bands of the visible patches, nothing else
    (w,) = weights
    mask = out["mask"].flatten(1)  # [B, N]
    expect = (mask[:, None, :] | hidden[:, :, None]).float()  # [B, C, N]
    assert w.shape == (3, 20, 4, 64)
    torch.testing.assert_close(w.amax(-1), expect)
    torch.testing.assert_close(w.amin(-1), expect)
    # changing the hidden bands changes nothing the encoder sees
    other = {**batch, "pixels": batch["pixels"].clone()}
    other["pixels"][hidden] = 100.0
    tok = seen["tokens"]
    model(other, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(seen["tokens"], tok)
    other["pixels"][~hidden] += 1.0  # while the visible ones do
    model(other, generator=torch.Generator().manual_seed(5))
    assert not torch.allclose(seen["tokens"], tok)
    assert out["loss"].requires_grad and torch.isfinite(out["loss"])


def test_visible_loss_weight_scores_the_visible_patches_with_its_weight(monkeypatch):
    import pretrain.models.mae as mae_mod

    weights = []
    real = mae_mod.reconstruction_loss
    monkeypatch.setattr(mae_mod, "reconstruction_loss", lambda pred, tgt, w, *a: weights.append(w) or real(pred, tgt, w, *a))
    torch.manual_seed(0)
    plain = build_model("debug", visible_loss_weight=0.25)
    out = plain(_batch(), generator=torch.Generator().manual_seed(5))
    mask = out["mask"].flatten(1).float()  # [B, N]
    assert weights[-1].shape == (3, 4, 64)
    torch.testing.assert_close(weights[-1], (mask + 0.25 * (1 - mask))[:, :, None].expand(-1, -1, 64))
    torch.manual_seed(0)
    spectral = build_model("debug", visible_loss_weight=0.25, band_mask_ratio=0.5, head_condition="meta")
    out = spectral(_batch(), generator=torch.Generator().manual_seed(5))
    mask, hidden = out["mask"].flatten(1), out["hidden_bands"]
    # masked patches and hidden bands weigh 1, the visible bands of the visible patches 0.25
    expect = torch.where(mask[:, None, :] | hidden[:, :, None], 1.0, 0.25)
    torch.testing.assert_close(weights[-1].amax(-1), expect)
    torch.testing.assert_close(weights[-1].amin(-1), expect)
    with pytest.raises(ModelError, match="visible_loss_weight"):
        get_args("debug", visible_loss_weight=-0.1)


def test_meta_head_condition_does_not_see_the_image():
    torch.manual_seed(0)
    model = build_model("debug", head_condition="meta")
    seen = _capture(model)
    model(_batch(seed=1))
    a = seen["head_cond"]
    model(_batch(seed=2))
    torch.testing.assert_close(seen["head_cond"], a)  # other pixels, same output conditions
    plain = build_model("debug")
    seen2 = _capture(plain)
    plain(_batch(seed=1))
    b = seen2["head_cond"]
    plain(_batch(seed=2))
    assert not torch.allclose(seen2["head_cond"], b)  # the default output condition carries image content


def test_decorrelation_term_is_added_with_its_weight():
    batch = _batch()
    torch.manual_seed(0)
    off = build_model("debug")
    torch.manual_seed(0)
    on = build_model("debug", cond_decorrelation=0.5)
    a = off(batch, generator=torch.Generator().manual_seed(3))
    b = on(batch, generator=torch.Generator().manual_seed(3))
    assert 0.0 < b["cond_decorrelation"].item() <= 1.0
    assert b["loss"].item() == pytest.approx(a["loss"].item() + 0.5 * b["cond_decorrelation"].item(), rel=1e-5)
    torch.manual_seed(0)
    jepa = build_model("debug", objective="jepa", cond_decorrelation=0.5)
    assert "cond_decorrelation" in jepa(batch, generator=torch.Generator().manual_seed(3))


def test_recipe_arguments_are_checked():
    with pytest.raises(ModelError, match="band_mask_ratio"):
        get_args("debug", band_mask_ratio=1.0)
    with pytest.raises(ModelError, match="head_condition"):
        get_args("debug", band_mask_ratio=0.5)  # a hidden band's content would reach the output layer
    with pytest.raises(ModelError, match="head_condition"):
        get_args("debug", head_condition="text")
    with pytest.raises(ModelError, match="cond_decorrelation"):
        get_args("debug", cond_decorrelation=-1.0)

"""The any-sensor encoder and the MAE: band counts, band-order invariance, parameter count, gradients to the
hypernetworks, exact masking, overfitting one batch, shapes and clear errors."""

from __future__ import annotations

import pytest
import torch

from pretrain.models import MODEL_SIZES, ModelError, build_model, random_mask


def make_batch(b: int, c: int, size: int, seed: int = 0, valid: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    wl = torch.sort(torch.rand(b, c, generator=g) * 2100 + 400, 1).values  # different per sample
    batch = {
        "pixels": torch.randn(b, c, size, size, generator=g),
        "wavelengths": wl,
        "fwhm": torch.rand(b, c, generator=g) * 12 + 2.5,
        "sensor": torch.arange(b) % 4,
        "level": torch.arange(b) % 3,
    }
    if valid:
        batch["valid"] = torch.rand(b, size, size, generator=g) > 0.2
    return batch


def enc_inputs(batch: dict) -> tuple:
    return batch["pixels"], batch["wavelengths"], batch["fwhm"], batch["sensor"], batch["level"]


@pytest.fixture(scope="module")
def mae():
    torch.manual_seed(0)
    return build_model("debug")


@pytest.mark.parametrize("c", [1, 2, 7, 100, 425])
def test_any_band_count_with_per_sample_wavelengths(mae, c):
    batch = make_batch(2, c, 16, seed=c)
    assert not torch.equal(batch["wavelengths"][0], batch["wavelengths"][1])
    tok = mae.encoder(*enc_inputs(batch))
    assert tok.shape == (2, 4, MODEL_SIZES["debug"].dim)
    assert torch.isfinite(tok).all()
    out = mae(batch)
    assert out["pred"].shape == (2, c, 16, 16)
    assert torch.isfinite(out["loss"])


def test_band_permutation_leaves_tokens_unchanged(mae):
    mae.eval()
    batch = make_batch(2, 37, 16, seed=1)
    perm = torch.randperm(37, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a = mae.encoder(*enc_inputs(batch))
        b = mae.encoder(batch["pixels"][:, perm], batch["wavelengths"][:, perm], batch["fwhm"][:, perm],
                        batch["sensor"], batch["level"])
        # the bands' metadata matters: permuting pixels alone (wavelengths fixed) changes the tokens
        c = mae.encoder(batch["pixels"][:, perm], batch["wavelengths"], batch["fwhm"], batch["sensor"],
                        batch["level"])
    torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    assert (a - c).abs().max() > 1e-3
    mae.train()


def test_parameter_count_independent_of_band_count():
    model = build_model("debug")
    n0 = sum(p.numel() for p in model.parameters())
    shapes = []
    for c in (3, 400):
        batch = make_batch(1, c, 16)
        cond = model.encoder.condition(batch["pixels"], batch["wavelengths"], batch["fwhm"])
        v, u, _ = model.encoder.hyper.weights(cond)
        shapes.append((tuple(v.shape), tuple(u.shape)))
        model(batch)["loss"].backward()
        assert sum(p.numel() for p in model.parameters()) == n0
    # generated per-band weights do scale with the bands, the parameters do not
    assert shapes[0][0][1] == 3 and shapes[1][0][1] == 400


def test_gradients_reach_every_hypernetwork_and_conditioning_parameter():
    torch.manual_seed(0)
    model = build_model("debug")
    batch = make_batch(4, 12, 16, valid=True)  # sensors 0..3 and levels 0..2: unknown and known both used
    model(batch)["loss"].backward()
    enc = model.encoder
    groups = {"meta": enc.meta, "content": enc.content, "hyper": enc.hyper, "head": model.head,
              "blocks": enc.blocks}
    for gname, module in groups.items():
        for n, p in module.named_parameters():
            assert p.grad is not None, f"{gname}.{n} got no gradient"
            assert p.grad.abs().sum() > 0, f"{gname}.{n} got a zero gradient"


@pytest.mark.parametrize("n", [4, 16, 33, 256])
def test_mask_ratio_is_exact_per_sample(n):
    mask, keep, restore = random_mask(8, n, 0.75, torch.device("cpu"), torch.Generator().manual_seed(n))
    expected = min(round(0.75 * n), n - 1)
    assert mask.sum(1).tolist() == [expected] * 8
    assert keep.shape == (8, n - expected)
    assert not mask.gather(1, keep).any()
    assert len({tuple(m.tolist()) for m in mask}) > 1  # samples differ
    assert torch.equal(restore.argsort(1).argsort(1), restore)


def test_mae_outputs_mask_and_pred_shapes(mae):
    batch = make_batch(3, 9, 32)
    out = mae(batch)
    assert out["mask"].shape == (3, 4, 4) and out["mask"].dtype == torch.bool
    assert out["mask"].flatten(1).sum(1).tolist() == [12, 12, 12]
    assert out["pred"].shape == (3, 9, 32, 32)
    assert out["loss"].ndim == 0 and out["loss"].requires_grad


def test_mae_overfits_one_batch():
    torch.manual_seed(0)
    model = build_model("debug")  # 0.75 masking
    g = torch.Generator().manual_seed(0)
    x = torch.linspace(0, 1, 16)
    # smooth, band-correlated spectra so masked patches are predictable
    base = torch.stack([torch.sin(3 * x[:, None] + 2 * x[None, :] + k) for k in range(4)])  # [4,16,16]
    mix = torch.rand(2, 20, 4, generator=g)
    pixels = torch.einsum("bck,khw->bchw", mix, base) + 0.5
    batch = {"pixels": pixels, "wavelengths": torch.linspace(450, 2400, 20).expand(2, -1).clone(),
             "fwhm": torch.full((2, 20), 10.0), "sensor": torch.tensor([1, 2]), "level": torch.tensor([1, 2])}
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for step in range(250):
        out = model(batch, generator=torch.Generator().manual_seed(step % 4))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first / 8, (first, last)


def test_features_returns_chosen_blocks_and_last_equals_forward(mae):
    mae.eval()
    batch = make_batch(2, 5, 16)
    with torch.no_grad():
        feats = mae.encoder.features(*enc_inputs(batch), layers=(0, -1))
        tok = mae.encoder(*enc_inputs(batch))
    assert [f.shape for f in feats] == [tok.shape, tok.shape]
    torch.testing.assert_close(feats[1], tok)
    assert (feats[0] - feats[1]).abs().max() > 1e-4
    mae.train()


def test_unknown_sensor_and_new_sensor_names(mae):
    mae.eval()
    batch = make_batch(2, 6, 16)
    enc = mae.encoder
    p, wl, fw = batch["pixels"], batch["wavelengths"], batch["fwhm"]
    with torch.no_grad():
        none = enc(p, wl, fw)
        zero = enc(p, wl, fw, torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long))
        emit = enc(p, wl, fw, torch.full((2,), enc.vocab.sensor_index("emit")), None)
    torch.testing.assert_close(none, zero)
    assert (emit - none).abs().max() > 1e-5
    assert enc.vocab.sensor_index("not-a-sensor") == 0
    n_params = sum(q.numel() for q in mae.parameters())
    idx = enc.add_sensor("HyMap airborne imaging spectrometer")
    assert idx == len(enc.sensor_names) - 1 and enc.vocab.sensor_index("HyMap airborne imaging spectrometer") == idx
    assert enc.add_sensor("HyMap airborne imaging spectrometer") == idx  # idempotent
    assert sum(q.numel() for q in mae.parameters()) == n_params  # the table is a buffer
    with torch.no_grad():
        new = enc(p, wl, fw, torch.full((2,), idx), None)
    assert (new - none).abs().max() > 1e-5 and (new - emit).abs().max() > 1e-5
    mae.train()


def test_grad_checkpointing_gives_same_loss_and_grads():
    torch.manual_seed(0)
    model = build_model("debug")
    batch = make_batch(2, 8, 16)
    out = model(batch, generator=torch.Generator().manual_seed(1))
    out["loss"].backward()
    g1 = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    out2 = model(batch, generator=torch.Generator().manual_seed(1))
    out2["loss"].backward()
    torch.testing.assert_close(out["loss"], out2["loss"])
    for a, b in zip(g1, [p.grad for p in model.parameters()]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_gsd_scaled_positions_change_tokens_only_when_enabled():
    torch.manual_seed(0)
    plain = build_model("debug").eval()
    scaled = build_model("debug", gsd_pos=True).eval()
    scaled.load_state_dict(plain.state_dict())
    batch = make_batch(2, 4, 16)
    with torch.no_grad():
        a = plain.encoder(*enc_inputs(batch), gsd=torch.tensor([5.0, 60.0]))
        b = plain.encoder(*enc_inputs(batch))
        c = scaled.encoder(*enc_inputs(batch), gsd=torch.tensor([30.0, 60.0]))
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(c[0], b[0], atol=1e-5, rtol=1e-4)  # gsd == reference: unscaled
    assert (c[1] - b[1]).abs().max() > 1e-4


def test_fixed_patch_embedding_baseline_has_same_tokens():
    model = build_model("debug", patch_embed="fixed", fixed_bands=10)
    batch = make_batch(2, 10, 16)
    out = model(batch)
    assert out["pred"].shape == (2, 10, 16, 16)
    assert model.encoder(*enc_inputs(batch)).shape == (2, 4, 64)
    with pytest.raises(ValueError, match="10 bands"):
        model(make_batch(2, 11, 16))


def test_flops_per_sample_matches_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model("small", decoder_depth=2)
    batch = make_batch(1, 50, 64)
    counter = FlopCounterMode(display=False)
    with counter:
        model(batch)["loss"].backward()
    measured = counter.get_total_flops()
    estimate = model.flops_per_sample(50, 64)
    assert 0.8 < estimate / measured < 1.25, (estimate, measured)


def test_clear_errors():
    with pytest.raises(ModelError, match="unknown model size 'gigantic'"):
        build_model("gigantic")
    with pytest.raises(ModelError, match="unknown model override"):
        build_model("debug", dimension=3)
    with pytest.raises(ModelError, match="objective"):
        build_model("debug", objective="simclr")
    with pytest.raises(ModelError, match="not divisible"):
        build_model("debug", heads=3)
    model = build_model("debug")
    batch = make_batch(2, 5, 20)
    with pytest.raises(ModelError, match="multiples of the patch size 8"):
        model(batch)
    batch = make_batch(2, 5, 16)
    with pytest.raises(ModelError, match=r"wavelengths .* must be \[B, C\]"):
        model.encoder(batch["pixels"], batch["wavelengths"][:, :4], batch["fwhm"])
    with pytest.raises(ModelError, match="sensor index out of range"):
        model.encoder(batch["pixels"], batch["wavelengths"], batch["fwhm"], torch.tensor([0, 999]))

"""Mixed batches (pretrain.data.mixed): a sample's tokens do not depend on the company of other sensors.

Compared to fp32 tolerance, not bitwise: padding changes the length of the band reduction inside one matmul
(``[N, C*r] x [C*r, D]``) and the batch size changes the kernels' blocking, so the same real terms are summed in
another order. The padded terms themselves are exact zeros (and garbage in the padding changes nothing, which
is checked separately: that would fail if any padded value leaked in)."""

from __future__ import annotations

import pytest
import torch

from pretrain.models import build_model
from pretrain.models.jepa import window_mask

BANDS = (7, 13, 30)  # e.g. a multispectral, another multispectral, a hyperspectral window
SIZE = 16


def sample(c: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"pixels": torch.randn(1, c, SIZE, SIZE, generator=g),
            "wavelengths": torch.sort(torch.rand(1, c, generator=g) * 2100 + 400, 1).values,
            "fwhm": torch.rand(1, c, generator=g) * 30 + 5,
            "valid": torch.rand(1, SIZE, SIZE, generator=g) > 0.1,
            "sensor": torch.tensor([1 + seed % 3]), "level": torch.tensor([1 + seed % 2]),
            "gsd": torch.tensor([10.0 * (1 + seed)])}


def pad(samples: list[dict], fill: float = 0.0) -> dict:
    """The mixed batch of ``samples`` (layout of pretrain.data.mixed; ``fill`` goes into every padded entry)."""
    cmax = max(s["pixels"].shape[1] for s in samples)
    b = len(samples)
    out = {"pixels": torch.full((b, cmax, SIZE, SIZE), fill), "wavelengths": torch.full((b, cmax), fill),
           "fwhm": torch.full((b, cmax), fill), "band_mask": torch.zeros(b, cmax, dtype=torch.bool)}
    for i, s in enumerate(samples):
        c = s["pixels"].shape[1]
        out["pixels"][i, :c] = s["pixels"][0]
        out["wavelengths"][i, :c] = s["wavelengths"][0]
        out["fwhm"][i, :c] = s["fwhm"][0]
        out["band_mask"][i, :c] = True
    for k in ("valid", "sensor", "level", "gsd"):
        out[k] = torch.cat([s[k] for s in samples])
    return out


def tokens(enc, batch: dict) -> torch.Tensor:
    return enc(batch["pixels"], batch["wavelengths"], batch["fwhm"], batch["sensor"], batch["level"],
               batch["valid"], batch["gsd"], band_mask=batch.get("band_mask"))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_model("debug", gsd_pos=True)
    return m.eval()


@torch.no_grad()
def test_tokens_unchanged_by_the_company_of_other_sensors(model):
    enc = model.encoder
    samples = [sample(c, k) for k, c in enumerate(BANDS)]
    alone = [tokens(enc, s)[0] for s in samples]
    mixed = tokens(enc, pad(samples))
    # the same samples in another order and with a fourth of yet another band count
    other = tokens(enc, pad([sample(3, 9), samples[2], samples[0], samples[1]]))
    worst = 0.0
    for i, a in enumerate(alone):
        worst = max(worst, float((mixed[i] - a).abs().max()))
        torch.testing.assert_close(mixed[i], a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(other[2], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(other[3], alone[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(other[1], alone[2], atol=1e-5, rtol=1e-5)
    print(f"max |tokens(mixed) - tokens(alone)| = {worst:.2e}")
    scale = float(torch.stack(alone).abs().max())
    assert worst < 1e-5 * max(1.0, scale)


@torch.no_grad()
def test_padding_values_never_leak(model):
    """Garbage (large values) in every padded entry gives the same tokens as zeros: nothing padded is read."""
    enc = model.encoder
    samples = [sample(c, k) for k, c in enumerate(BANDS)]
    zero = tokens(enc, pad(samples, 0.0))
    junk = tokens(enc, pad(samples, 1234.5))
    torch.testing.assert_close(junk, zero, atol=1e-5, rtol=1e-5)
    # without the mask the same padded batch gives other tokens for the short samples (the test can fail)
    b = pad(samples, 0.0)
    b.pop("band_mask")
    unmasked = tokens(enc, b)
    assert (unmasked[0] - zero[0]).abs().max() > 1e-3


def test_mae_and_jepa_train_on_a_mixed_batch(model):
    torch.manual_seed(1)
    batch = pad([sample(c, k) for k, c in enumerate(BANDS)])
    mae = build_model("debug")
    out = mae(batch, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    # padded bands count nowhere in the loss: garbage in padded pixels does not move it
    junk = dict(batch, pixels=batch["pixels"].masked_fill(~batch["band_mask"][:, :, None, None], 50.0),
                wavelengths=batch["wavelengths"].masked_fill(~batch["band_mask"], 777.0))
    with torch.no_grad():
        a = mae(batch, generator=torch.Generator().manual_seed(3))["loss"]
        b = mae(junk, generator=torch.Generator().manual_seed(3))["loss"]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    jepa = build_model("debug", objective="jepa")
    out = jepa(batch, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out["loss"])
    out["loss"].backward()


def test_context_window_stays_inside_each_samples_bands():
    mask = torch.zeros(3, 30, dtype=torch.bool)
    for i, c in enumerate(BANDS):
        mask[i, :c] = True
    for frac, start in ((0.25, 0.0), (0.5, 0.99), (1.0, 0.5), (0.01, 0.7)):
        w = window_mask(mask, frac, start)
        assert not (w & ~mask).any()
        n = w.sum(1)
        assert (n >= 1).all()
        for i, c in enumerate(BANDS):
            idx = torch.nonzero(w[i]).flatten()
            assert idx.numel() == min(c, max(1, int(torch.ceil(torch.tensor(frac * c)))))
            assert bool((idx.diff() == 1).all())  # contiguous


def test_spectral_masking_in_a_mixed_batch_hides_each_samples_own_bands():
    """band_mask_ratio (issue 11's spectral masking) with a mixed batch: each sample hides round(ratio * C_b) of its
    own real bands, never a padded one, and the encoder sees its visible bands as a real prefix."""
    from pretrain.models.mae import random_band_mask

    mask = torch.zeros(3, 30, dtype=torch.bool)
    for i, c in enumerate(BANDS):
        mask[i, :c] = True
    for ratio in (0.25, 0.5, 0.9):
        hidden, vis = random_band_mask(3, 30, ratio, torch.device("cpu"), torch.Generator().manual_seed(4), mask)
        assert not (hidden & ~mask).any()
        for i, c in enumerate(BANDS):
            n_hide = min(round(ratio * c), c - 1)
            assert int(hidden[i].sum()) == n_hide
            real = vis[i][vis[i] < 30]
            assert real.numel() == c - n_hide and bool((real.diff() > 0).all())  # ascending, real bands only
            assert set(real.tolist()) == set(torch.nonzero(mask[i] & ~hidden[i]).flatten().tolist())
    # an all-True band mask draws exactly the bands of no mask (a one-store batch is unchanged)
    a = random_band_mask(4, 20, 0.5, torch.device("cpu"), torch.Generator().manual_seed(2))
    b = random_band_mask(4, 20, 0.5, torch.device("cpu"), torch.Generator().manual_seed(2),
                         torch.ones(4, 20, dtype=torch.bool))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_mae_spectral_masking_and_decorrelation_on_a_mixed_batch_ignore_padding():
    torch.manual_seed(2)
    batch = pad([sample(c, k) for k, c in enumerate(BANDS)])
    mae = build_model("debug", band_mask_ratio=0.5, head_condition="meta", cond_decorrelation=0.1)
    out = mae(batch, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out["loss"]) and "cond_decorrelation" in out
    assert not (out["hidden_bands"] & ~batch["band_mask"]).any()
    out["loss"].backward()
    junk = dict(batch, pixels=batch["pixels"].masked_fill(~batch["band_mask"][:, :, None, None], 50.0),
                wavelengths=batch["wavelengths"].masked_fill(~batch["band_mask"], 777.0),
                fwhm=batch["fwhm"].masked_fill(~batch["band_mask"], 3.0))
    with torch.no_grad():
        a = mae(batch, generator=torch.Generator().manual_seed(3))
        b = mae(junk, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a["loss"], b["loss"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a["cond_decorrelation"], b["cond_decorrelation"], atol=1e-6, rtol=1e-5)


def test_condition_decorrelation_counts_only_real_band_pairs():
    from pretrain.losses import condition_decorrelation

    g = torch.Generator().manual_seed(0)
    conds = [torch.randn(1, c, 8, generator=g) for c in BANDS]
    alone = [condition_decorrelation(x) for x in conds]
    padded = torch.full((3, 30, 8), 9.0)  # padding all alike: it would pull the value up if it counted
    mask = torch.zeros(3, 30, dtype=torch.bool)
    for i, x in enumerate(conds):
        padded[i, :x.shape[1]] = x[0]
        mask[i, :x.shape[1]] = True
    torch.testing.assert_close(condition_decorrelation(padded, mask), torch.stack(alone).mean())
    assert condition_decorrelation(padded) > condition_decorrelation(padded, mask) + 0.1


def test_instruments_of_a_mixed_batch_are_each_samples_own(model):
    """pretrain.instruments.record on a mixed batch: the mean of each sample's instruments alone (padding unseen)."""
    from pretrain.instruments import record

    samples = [sample(c, k) for k, c in enumerate(BANDS)]
    alone = [record(model, s, {}) for s in samples]
    for fill in (0.0, 1234.5):
        mixed = record(model, pad(samples, fill), {})
        for k in ("cond_similarity", "band_map_rank", "band_map_mean_energy"):
            assert mixed[k] == pytest.approx(sum(a[k] for a in alone) / len(alone), rel=1e-4, abs=1e-5), k

"""finetune.tasks.fusion: Wald's protocol over valid pixels; the decoder starts as bilinear upsampling and,
trained, beats bilinear, bicubic and unsharp-mask upsampling on a scene of sharp-edged materials."""

import numpy as np
import pytest
import torch

from finetune import metrics as M
from finetune.datasets.base import FusionData, Spectral
from finetune.heads import FusionDecoder
from finetune.heads.fusion import upsample
from finetune.tasks import run_task
from tests.finetune.conftest import band_table
from tests.finetune.tasks.helpers import C, cfg, spectral

MS_SPECTRAL = Spectral(np.array([600.0, 1500.0], np.float32), np.array([100.0, 300.0], np.float32), "planetscope",
                       "L2")


def material_scene(r: int = 3, h: int = 24, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """High-resolution HS truth (C, r h, r h) of sharp-edged regions of 5 materials (a Voronoi map), its
    box-degraded HS (C, h, h) and a 2-band MS of the truth (band means over the two halves of the spectrum)."""
    g = np.random.default_rng(seed)
    n = h * r
    seeds = g.uniform(0, n, (12, 2))
    yy, xx = np.mgrid[0:n, 0:n]
    region = np.argmin((yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2, -1) % 5
    spectra = g.uniform(0.05, 0.6, (5, C)).astype(np.float32)
    hr = spectra[region].transpose(2, 0, 1) * g.uniform(0.9, 1.1, (1, n, n)).astype(np.float32)
    hs = hr.reshape(C, h, r, h, r).mean((2, 4))
    ms = np.stack([hr[:C // 2].mean(0), hr[C // 2:].mean(0)]).astype(np.float32)
    return hr.astype(np.float32), hs.astype(np.float32), ms


def test_untrained_decoder_is_bilinear_upsampling(encoder):
    _, hs, ms = material_scene()
    hs_t, ms_t = torch.from_numpy(hs[None, :, :8, :8]), torch.from_numpy(ms[None, :, :24, :24])
    dec = FusionDecoder(encoder, features=8)
    with torch.no_grad():
        out = dec(hs_t, ms_t, *band_table(C), torch.from_numpy(MS_SPECTRAL.wavelengths),
                  torch.from_numpy(MS_SPECTRAL.fwhm))
    ref = upsample(hs_t, (24, 24), "bilinear")
    assert torch.allclose(out, ref, rtol=2e-3, atol=2e-3 * float(ref.abs().max()))


def test_fusion_decoder_beats_every_baseline_after_training(encoder):
    _, hs, ms = material_scene()  # the task degrades both by the ratio again (Wald) and scores against `hs`
    data = FusionData(hs, ms, spectral(), MS_SPECTRAL, 3)
    res = run_task(encoder, data, cfg("fusion", steps=60, head={"features": 16}, lr=5e-3,
                                      eval={"tile": 24, "overlap": 12, "train_fraction": 0.5}))
    assert res.arrays["losses"][-1] < 0.8 * res.arrays["losses"][0]
    for name in ("bilinear", "bicubic", "unsharp"):
        base = res.details["baselines"][name]
        assert res.metrics["PSNR"] > base["PSNR"] and res.metrics["SAM"] < base["SAM"], (name, res.metrics, base)


def test_no_encoder_baseline_is_the_decoder_trained_without_its_encoder(encoder):
    _, hs, ms = material_scene()
    data = FusionData(hs, ms, spectral(), MS_SPECTRAL, 3)
    kw = dict(steps=30, lr=5e-3, eval={"tile": 24, "overlap": 12, "train_fraction": 0.5})
    a = run_task(encoder, data, cfg("fusion", head={"features": 8}, **kw))
    base = a.details["baselines"]["no_encoder"]
    assert base["PSNR"] > a.details["baselines"]["bilinear"]["PSNR"]  # trained, not the bilinear start
    # the same figures as the task run with the encoder branch off (same seed, batches, steps), which has no
    # such row of its own
    off = run_task(encoder, data, cfg("fusion", head={"features": 8, "use_encoder": False}, **kw))
    assert "no_encoder" not in off.details["baselines"]
    assert off.metrics["PSNR"] == pytest.approx(base["PSNR"], abs=1e-6)
    assert off.metrics["SAM"] == pytest.approx(base["SAM"], abs=1e-6)
    # and it does not depend on the encoder: another encoder changes the head's figures, not the baseline's
    with torch.no_grad():
        for q in encoder.parameters():
            q.add_(0.5 * torch.randn_like(q))
    b = run_task(encoder, data, cfg("fusion", head={"features": 8}, **kw))
    assert b.metrics["PSNR"] != a.metrics["PSNR"]
    assert b.details["baselines"]["no_encoder"] == base


def test_nodata_pixels_are_left_out_of_the_scores(encoder):
    _, hs, ms = material_scene()
    hs_valid = np.ones(hs.shape[1:], bool)
    hs_valid[:, -4:] = False  # a nodata strip in the test columns, zeros as readers deliver it
    hs[:, ~hs_valid] = 0.0
    ms_valid = np.repeat(np.repeat(hs_valid, 3, 0), 3, 1)
    ms[:, ~ms_valid] = 0.0
    data = FusionData(hs, ms, spectral(), MS_SPECTRAL, 3, hs_valid=hs_valid, ms_valid=ms_valid)
    res = run_task(encoder, data, cfg("fusion", steps=0, head={"features": 8},
                                      eval={"tile": 24, "overlap": 12, "train_fraction": 0.5}))
    assert 0 < res.details["valid_fraction"] < 1
    # scored on valid pixels only, the untrained decoder equals its bilinear start; counting nodata pixels would
    # add 90 degrees each to the spectral angle
    assert abs(res.metrics["SAM"] - res.details["baselines"]["bilinear"]["SAM"]) < 0.5
    truth = res.arrays["truth"]
    v = np.isfinite(truth).all(0)
    all_px = M.sam(np.nan_to_num(truth), res.arrays["fused"])
    assert all_px > res.metrics["SAM"] + 5 and M.sam(np.nan_to_num(truth), res.arrays["fused"], v) == res.metrics["SAM"]


def test_decoder_outputs_any_band_count(encoder):
    dec = FusionDecoder(encoder, features=8)
    out = dec(torch.rand(1, 9, 8, 8), torch.rand(1, 2, 16, 16), *band_table(9), *band_table(2))
    assert out.shape == (1, 9, 16, 16)

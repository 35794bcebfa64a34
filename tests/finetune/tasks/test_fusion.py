"""finetune.tasks.fusion: Wald's protocol over valid pixels; the decoder starts as the training-free unmixing of
the low-resolution neighbours (or bilinear upsampling) and, trained, beats bilinear, bicubic and unsharp-mask
upsampling on a scene of sharp-edged materials; the unmixing recovers sub-pixel mixes that upsampling blurs."""

import numpy as np
import pytest
import torch

from data_prep.configtree import ConfigError
from finetune import metrics as M
from finetune.datasets.base import FusionData, Spectral
from finetune.heads import FusionDecoder
from finetune.heads.fusion import (
    band_gains,
    bilinear_log_weights,
    neighbours,
    synth_matrix,
    unmix,
    unmix_fuse,
    upsample,
)
from finetune.tasks import run_task
from finetune.tasks.fusion import FusionTask
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


def gaussian_ms(hr: np.ndarray, wl: np.ndarray, centres, fwhm) -> np.ndarray:
    """A multispectral image of ``hr (C, H, W)``: each band the Gaussian-response-weighted mean of the bands."""
    sig = np.asarray(fwhm, np.float64) / (2 * np.sqrt(2 * np.log(2)))
    resp = np.exp(-0.5 * ((wl[None] - np.asarray(centres, np.float64)[:, None]) / sig[:, None]) ** 2)
    resp /= resp.sum(1, keepdims=True)
    return np.einsum("mc,chw->mhw", resp, hr).astype(np.float32)


def subpixel_scene(r: int = 3, h: int = 12, c: int = 24, seed: int = 0):
    """HS truth ``(c, r h, r h)`` of 4 smooth random spectra in regions finer than the low-resolution pixel
    (checkerboard-like blobs of 1-4 pixels), its box-degraded HS, and a 6-band Gaussian-response MS of the truth."""
    g = np.random.default_rng(seed)
    n = h * r
    wl = np.linspace(420, 980, c)
    base = np.cumsum(g.normal(0, 0.03, (4, c)), 1) + g.uniform(0.1, 0.5, (4, 1))
    spectra = np.clip(base, 0.02, None)
    region = g.integers(0, 4, (n // 2 + 1, n // 2 + 1)).repeat(2, 0).repeat(2, 1)[:n, :n]
    hr = spectra[region].transpose(2, 0, 1).astype(np.float32)
    hs = hr.reshape(c, h, r, h, r).mean((2, 4))
    ms_wl, ms_fw = [450, 520, 600, 680, 780, 900], [40, 40, 40, 40, 60, 60]
    ms = gaussian_ms(hr, wl, ms_wl, ms_fw)
    spec_hs = Spectral(wl.astype(np.float32), np.full(c, 15.0, np.float32), "emit", "L2")
    spec_ms = Spectral(np.asarray(ms_wl, np.float32), np.asarray(ms_fw, np.float32), "planetscope", "L2")
    return hr, hs, ms, spec_hs, spec_ms


def _t(spec):
    return torch.from_numpy(spec.wavelengths), torch.from_numpy(spec.fwhm)


def test_unmixing_recovers_subpixel_materials_that_upsampling_blurs():
    hr, hs, ms, sh, sm = subpixel_scene()
    hr_t, hs_t, ms_t = (torch.from_numpy(a)[None] for a in (hr, hs, ms))
    out = unmix_fuse(hs_t, ms_t, *_t(sh), *_t(sm))[0].numpy()
    bic = upsample(hs_t, hr.shape[-2:], "bicubic")[0].numpy()
    p_u, p_b = M.psnr(hr, out), M.psnr(hr, bic)
    assert p_u > p_b + 6, (p_u, p_b)
    assert M.sam(hr, out) < 0.7 * M.sam(hr, bic)
    # the residual it reports is the multispectral misfit of its weights: small where the mix explains the pixel
    w, res = unmix(hs_t, ms_t, *_t(sh), *_t(sm))
    assert w.shape == (1, 9, *hr.shape[-2:]) and res.shape == ms_t.shape
    assert float(res.abs().mean()) < 0.3 * float((ms_t - upsample(
        torch.einsum("mc,bchw->bmhw", synth_matrix(*_t(sh), *_t(sm)), hs_t), hr.shape[-2:], "bilinear")).abs().mean())


def test_unmixing_without_covered_multispectral_bands_is_bilinear():
    hr, hs, ms, sh, _ = subpixel_scene()
    far = Spectral(np.array([1600.0, 2200.0], np.float32), np.array([50.0, 50.0], np.float32), "x", "L2")
    S = synth_matrix(*_t(sh), *_t(far))
    assert torch.count_nonzero(S) == 0  # both bands lie beyond 420-980 nm (+- one FWHM)
    hs_t = torch.from_numpy(hs)[None]
    out = unmix_fuse(hs_t, torch.from_numpy(ms[:2])[None], *_t(sh), *_t(far))
    ref = upsample(hs_t, hr.shape[-2:], "bilinear")
    assert torch.allclose(out, ref, atol=1e-5)
    # a band inside the range keeps its row (normalised)
    S2 = synth_matrix(*_t(sh), torch.tensor([600.0, 2200.0]), torch.tensor([40.0, 50.0]))
    assert torch.allclose(S2[0].sum(), torch.tensor(1.0)) and torch.count_nonzero(S2[1]) == 0


def test_unmixing_leaves_out_bands_the_hyperspectral_image_does_not_explain():
    hr, hs, ms, sh, sm = subpixel_scene()
    hs_t = torch.from_numpy(hs)[None]
    noise = torch.from_numpy(np.random.default_rng(3).uniform(0.1, 0.5, ms.shape).astype(np.float32))[None]
    # another date / registration: no band's low-resolution mean is explained -> no band steers the mix
    assert torch.allclose(unmix_fuse(hs_t, noise, *_t(sh), *_t(sm)), upsample(hs_t, hr.shape[-2:], "bilinear"),
                          atol=1e-5)
    # one bad band among good ones is dropped: the mix is the one of the good bands alone
    mixed = torch.from_numpy(ms)[None].clone()
    mixed[:, 2] = noise[:, 2]
    keep = [0, 1, 3, 4, 5]
    sub = Spectral(sm.wavelengths[keep], sm.fwhm[keep], "planetscope", "L2")
    assert torch.allclose(unmix_fuse(hs_t, mixed, *_t(sh), *_t(sm)),
                          unmix_fuse(hs_t, mixed[:, keep], *_t(sh), *_t(sub)), atol=1e-4)


def test_scene_gains_carry_the_multispectral_units():
    hr, hs, ms, sh, sm = subpixel_scene()
    hs_t, ms_t = torch.from_numpy(hs), torch.from_numpy(ms)
    g1 = band_gains(hs_t, ms_t, *_t(sh), *_t(sm))
    g = band_gains(hs_t, 2.5 * ms_t, *_t(sh), *_t(sm))  # e.g. a DN scale of the multispectral product
    assert torch.allclose(g, 2.5 * g1, rtol=1e-5) and torch.allclose(g1, torch.ones(6), atol=0.05)
    ref = unmix_fuse(hs_t[None], ms_t[None], *_t(sh), *_t(sm), ms_gain=g1)
    assert torch.allclose(unmix_fuse(hs_t[None], 2.5 * ms_t[None], *_t(sh), *_t(sm), ms_gain=g), ref, atol=1e-5)
    # the valid mask leaves nodata out of the fit
    bad = ms_t.clone()
    bad[:, :6] = 0.0
    valid = torch.ones(hs.shape[1:], dtype=torch.bool)
    valid[:2] = False
    assert torch.allclose(band_gains(hs_t, bad, *_t(sh), *_t(sm), valid),
                          band_gains(hs_t[:, 2:], ms_t[:, 6:], *_t(sh), *_t(sm)), rtol=1e-5)


def test_halo_gives_a_tile_its_real_neighbours():
    x = torch.rand(1, 3, 10, 12)
    r = 3
    whole = neighbours(x, r, 3)  # [1, 3, 9, 30, 36]
    tile = neighbours(x[..., 2:8, 3:9], r, 3, halo=1)  # the 4 x 4 pixels at rows 3-6, columns 4-7
    assert torch.equal(tile, whole[..., 9:21, 12:24])
    assert not torch.equal(neighbours(x[..., 3:7, 4:8], r, 3), tile)  # without: the tile's edge replicated
    # a halo wider than the window needs is cropped to it
    assert torch.equal(neighbours(x[..., 1:9, 2:10], r, 3, halo=2), tile)
    wb = bilinear_log_weights(r, (10, 12), 3, "cpu").exp()
    wt = bilinear_log_weights(r, (4, 4), 3, "cpu", clamp=False).exp()
    assert torch.allclose(wt, wb[..., 9:21, 12:24])  # inside the scene the weights are the interior ones


def test_task_fills_nodata_with_the_nearest_valid_spectrum(encoder):
    _, hs, ms = material_scene()
    hs_valid = np.ones(hs.shape[1:], bool)
    hs_valid[:, -4:] = False
    hs[:, ~hs_valid] = 0.0
    ms_valid = np.repeat(np.repeat(hs_valid, 3, 0), 3, 1)
    ms[:, ~ms_valid] = 0.0
    task = FusionTask(cfg("fusion", steps=0, head={"features": 8},
                          eval={"tile": 24, "overlap": 12, "train_fraction": 0.5}))
    task.prepare(encoder, FusionData(hs, ms, spectral(), MS_SPECTRAL, 3, hs_valid=hs_valid, ms_valid=ms_valid))
    lr = task.hs_lr.numpy()  # the degraded grid: 8 x 8, its last 2 columns (4 of the reference's) nodata
    assert np.array_equal(lr[:, :, 6], lr[:, :, 5]) and np.array_equal(lr[:, :, 7], lr[:, :, 5])
    assert (lr[:, :, 5] > 0).all()  # a real spectrum, not the zeros nor the band means
    assert not np.allclose(lr[:, :, 7], task.hmean[:, :, 0])
    msi = task.ms_hr.numpy()  # the multispectral image on the reference's grid: its last 4 columns nodata
    assert np.array_equal(msi[:, :, -1], msi[:, :, 19]) and (msi[:, :, 19] > 0).all()


def test_untrained_decoder_is_the_unmixing(encoder):
    hr, hs, ms, sh, sm = subpixel_scene(h=8)
    hs_t, ms_t = torch.from_numpy(hs)[None], torch.from_numpy(ms)[None]
    dec = FusionDecoder(encoder, features=8)
    with torch.no_grad():
        out = dec(hs_t, ms_t, *_t(sh), *_t(sm))
    assert torch.allclose(out, unmix_fuse(hs_t, ms_t, *_t(sh), *_t(sm)), atol=1e-5)


def test_decoder_can_fall_back_from_the_unmixing_to_bilinear_weights(encoder):
    # the guide's share-back channel (after the window^2 corrections) at 1 gives bilinear upsampling's weights: what
    # training reaches for where a misregistered multispectral image misleads the unmixing
    hr, hs, ms, sh, sm = subpixel_scene(h=8)
    hs_t, ms_t = torch.from_numpy(hs)[None], torch.from_numpy(ms)[None]
    dec = FusionDecoder(encoder, features=8)
    with torch.no_grad():
        dec.guide[-1].bias[9] = 1.0
        out = dec(hs_t, ms_t, *_t(sh), *_t(sm))
    assert torch.allclose(out, upsample(hs_t, hr.shape[-2:], "bilinear"), atol=1e-5)
    assert not torch.allclose(out, unmix_fuse(hs_t, ms_t, *_t(sh), *_t(sm)), atol=1e-3)


def test_untrained_bilinear_start_decoder_is_bilinear_upsampling(encoder):
    _, hs, ms = material_scene()
    hs_t, ms_t = torch.from_numpy(hs[None, :, :8, :8]), torch.from_numpy(ms[None, :, :24, :24])
    dec = FusionDecoder(encoder, features=8, start="bilinear")
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


def test_decoder_trained_from_the_unmixing_beats_it(encoder):
    _, hs, ms, sh, sm = subpixel_scene(h=48, seed=1)
    # the task degrades both by the ratio again (Wald) and scores against `hs` (48 x 48, still finer than the
    # blobs' low-resolution pixels)
    ms = gaussian_ms(np.repeat(np.repeat(hs, 3, 1), 3, 2), sh.wavelengths.astype(np.float64),
                     sm.wavelengths, sm.fwhm)
    res = run_task(encoder, FusionData(hs, ms, sh, sm, 3),
                   cfg("fusion", steps=40, head={"features": 8, "use_encoder": False}, lr=5e-3,
                       eval={"tile": 24, "overlap": 12, "train_fraction": 0.5}))
    un = res.details["baselines"]["unmix"]
    assert un["PSNR"] > res.details["baselines"]["bicubic"]["PSNR"] + 3
    assert res.metrics["PSNR"] > un["PSNR"], (res.metrics, un)


def test_no_encoder_baseline_is_the_decoder_trained_without_its_encoder(encoder):
    _, hs, ms = material_scene()
    data = FusionData(hs, ms, spectral(), MS_SPECTRAL, 3)
    kw = dict(steps=30, lr=5e-3, eval={"tile": 24, "overlap": 12, "train_fraction": 0.5})
    a = run_task(encoder, data, cfg("fusion", head={"features": 8}, **kw))
    base = a.details["baselines"]["no_encoder"]
    assert base["PSNR"] > a.details["baselines"]["unmix"]["PSNR"]  # trained, not its start (the unmixing)
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
    # scored on valid pixels only, the untrained decoder equals its start (the unmixing); counting nodata pixels
    # would add 90 degrees each to the spectral angle
    assert abs(res.metrics["SAM"] - res.details["baselines"]["unmix"]["SAM"]) < 1e-3
    truth = res.arrays["truth"]
    v = np.isfinite(truth).all(0)
    all_px = M.sam(np.nan_to_num(truth), res.arrays["fused"])
    assert all_px > res.metrics["SAM"] + 5 and M.sam(np.nan_to_num(truth), res.arrays["fused"], v) == res.metrics["SAM"]


def test_decoder_outputs_any_band_count(encoder):
    dec = FusionDecoder(encoder, features=8)
    out = dec(torch.rand(1, 9, 8, 8), torch.rand(1, 2, 16, 16), *band_table(9), *band_table(2))
    assert out.shape == (1, 9, 16, 16)


def test_bad_start_or_ridge_is_a_config_error_naming_the_key(encoder):
    with pytest.raises(ConfigError, match="head.start.*unmix, bilinear.*'nearest'"):
        FusionDecoder(encoder, start="nearest")
    with pytest.raises(ConfigError, match="head.ridge.*> 0, got 0"):
        FusionDecoder(encoder, ridge=0)

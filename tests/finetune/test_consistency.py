"""Downstream inputs are prepared the way pretraining prepared them (data_prep.spectral, tested in
tests/data_prep/test_spectral.py); the encoder API takes names and masks as pretraining wrote them."""

import json
import warnings

import numpy as np
import pytest
import scipy.io
import torch

import finetune
from finetune.datasets import load_scene_folders, normalise, synthetic_change, synthetic_segmentation
from tests.finetune.conftest import band_table


def test_synthetic_tasks_carry_valid_masks(tiny_corpus):
    seg = synthetic_segmentation(tiny_corpus, band_stride=8)
    assert seg.valid is not None and seg.valid.shape == seg.labels.shape and not seg.valid.all()
    assert (seg.labels[~seg.valid] == -1).all()
    img, sc = normalise(seg.image, valid=seg.valid)
    assert (img[:, ~seg.valid] == 0).all()
    np.testing.assert_allclose(sc.mean, seg.image[:, seg.valid].mean(1), rtol=1e-5)
    ch = synthetic_change(tiny_corpus, band_stride=8)
    assert ch.valid is not None and (ch.change[~ch.valid] == -1).all()


def test_sensor_and_level_names_are_matched_as_pretraining_wrote_them(encoder):
    x = torch.randn(1, 5, 16, 16)
    wl, fw = band_table(5)
    with torch.no_grad():
        ref = encoder(x, wl, fw, sensor="emit", level="L2")
        for s, lv in (("EMIT", "l2"), (" Emit", "L2A"), ("emit", "L2B")):
            assert torch.allclose(encoder(x, wl, fw, sensor=s, level=lv), ref, atol=1e-6), (s, lv)
        l1 = encoder(x, wl, fw, sensor="emit", level="L1B")
        assert torch.allclose(l1, encoder(x, wl, fw, sensor="emit", level="L1"), atol=1e-6)
        assert not torch.allclose(l1, ref)
        with pytest.warns(UserWarning, match="not in the encoder's vocabulary.*unknown"):
            unk = encoder(x, wl, fw, sensor="hyperion-xyz", level="L2")
        assert torch.allclose(unk, encoder(x, wl, fw, sensor=None, level="L2"), atol=1e-6)


def test_loaded_encoder_is_in_eval_mode(debug_export):
    enc = finetune.load_encoder(debug_export)
    assert not enc.training and not enc.inner.training


def test_valid_mask_reaches_the_encoder(encoder):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 16, 16, generator=g)
    wl, fw = band_table(5)
    valid = torch.ones(2, 16, 16, dtype=torch.bool)
    valid[:, :5, :7] = False
    with torch.no_grad():
        masked = encoder(x, wl, fw, sensor="emit", valid=valid)
        direct = encoder.inner(x, wl[None].expand(2, -1), fw[None].expand(2, -1),
                               sensor=torch.full((2,), encoder.sensor_vocab.index("emit")), valid=valid)
        plain = encoder(x, wl, fw, sensor="emit")
        feats = encoder.features(x, wl, fw, sensor="emit", layers=(-1,), valid=valid)
    assert torch.allclose(masked, direct, atol=1e-6) and not torch.allclose(masked, plain)
    assert torch.allclose(feats[0], masked, atol=1e-5)
    with pytest.raises(ValueError, match=r"valid \(16, 16\) must be \[B, H, W\]"):
        encoder(x, wl, fw, valid=valid[0])


def test_gsd_reaches_an_encoder_trained_with_gsd_positions(tmp_path):
    from pretrain.models import build_model
    from pretrain.models.export import save_encoder

    torch.manual_seed(0)
    path = save_encoder(build_model("debug", gsd_pos=True), tmp_path / "gsd")
    assert json.loads((path / "model_args.json").read_text())["args"]["gsd_pos"] is True
    enc = finetune.load_encoder(path)
    x = torch.randn(2, 4, 16, 16)
    wl, fw = band_table(4)
    with torch.no_grad():
        a, b = enc(x, wl, fw, gsd=60.0), enc(x, wl, fw, gsd=torch.tensor([60.0, 60.0]))
        c = enc(x, wl, fw)
    assert torch.allclose(a, b) and not torch.allclose(a, c)


def test_public_loaders_drop_bad_bands_of_the_named_sensor_or_water_vapour(tmp_path):
    from data_prep.registry import get_sensor

    g = np.random.default_rng(1)
    for k, cls in enumerate(("a", "b")):
        (tmp_path / cls).mkdir()
        for i in range(2):
            scipy.io.savemat(tmp_path / cls / f"{i}.mat", {"d": (g.random((8, 8, 224)) + k).astype(np.float32)})
    av = get_sensor("aviris-classic")
    d = load_scene_folders(tmp_path, wavelengths={"sensor": "aviris-classic"})
    assert d.patches.shape[1] == int(av.good_band_mask().sum()) == d.spectral.wavelengths.size
    # a plain band table (no sensor) loses the water-vapour bands only
    d2 = load_scene_folders(tmp_path, wavelengths={"start": 400, "step": 10})
    wl = 400 + 10 * np.arange(224)
    vapour = ((wl >= 1340) & (wl <= 1460)) | ((wl >= 1790) & (wl <= 1970))
    assert d2.patches.shape[1] == 224 - vapour.sum()
    np.testing.assert_allclose(d2.spectral.wavelengths, wl[~vapour])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        d3 = load_scene_folders(tmp_path, wavelengths={"start": 400, "step": 10}, drop_bad_bands=False)
    assert d3.patches.shape[1] == 224

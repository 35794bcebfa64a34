"""finetune.load_encoder on a real exported debug encoder: names, freezing, bad exports."""

import json
import shutil

import pytest
import torch

import finetune
from finetune.encoder_api import ExportError
from tests.finetune.conftest import band_table


def test_tokens_shape_any_band_count(encoder):
    for c in (5, 17):
        wl, fw = band_table(c)
        tok = encoder(torch.randn(2, c, 16, 24), wl, fw, sensor="emit", level="L2")
        assert tok.shape == (2, (16 // encoder.patch_size) * (24 // encoder.patch_size), encoder.embed_dim)


def test_names_map_to_indices_and_unseen_is_unknown(encoder):
    torch.manual_seed(0)
    x = torch.randn(2, 6, 16, 16)
    wl, fw = band_table(6)
    with torch.no_grad():
        unknown = encoder(x, wl, fw, sensor=None, level=None)
        with pytest.warns(UserWarning, match="'no-such-sensor' is not in the encoder's vocabulary"), \
                pytest.warns(UserWarning, match="'L9' is not in the encoder's vocabulary"):
            unseen = encoder(x, wl, fw, sensor="no-such-sensor", level="L9")
        emit = encoder(x, wl, fw, sensor="emit", level="L2")
        mixed = encoder(x, wl, fw, sensor=["emit", None], level=["L2", None])
    assert torch.allclose(unknown, unseen)
    assert not torch.allclose(unknown, emit)
    assert torch.allclose(mixed[0], emit[0], atol=1e-5) and torch.allclose(mixed[1], unknown[1], atol=1e-5)
    with pytest.raises(ValueError, match="names for a batch of 2"):
        encoder(x, wl, fw, sensor=["emit"])


def test_freeze_unfreeze_one_call(encoder):
    encoder.freeze()
    assert not any(p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert not encoder.training  # stays in eval while frozen
    encoder.unfreeze()
    assert all(p.requires_grad for p in encoder.parameters())


def test_features_four_levels(encoder):
    wl, fw = band_table(4)
    feats = encoder.features(torch.randn(1, 4, 16, 16), wl, fw, layers=encoder.default_layers())
    assert len(feats) == 4 and all(f.shape == (1, 4, encoder.embed_dim) for f in feats)


def test_bad_pixels_shape_is_a_clear_error(encoder):
    wl, fw = band_table(4)
    with pytest.raises(ValueError, match="multiples of the encoder's patch size"):
        encoder(torch.randn(1, 4, 12, 16), wl, fw)
    with pytest.raises(ValueError, match=r"must be \[B, C\]"):
        encoder(torch.randn(1, 4, 16, 16), *band_table(5))


def test_missing_export_names_path_and_expected_files(tmp_path, debug_export):
    with pytest.raises(ExportError, match="does not exist.*encoder.safetensors"):
        finetune.load_encoder(tmp_path / "nope")
    part = tmp_path / "partial"
    part.mkdir()
    shutil.copy(debug_export / "model_args.json", part)
    with pytest.raises(ExportError, match=r"partial lacks encoder.safetensors"):
        finetune.load_encoder(part)


def test_mismatched_export_is_a_clear_error(tmp_path, debug_export):
    bad = tmp_path / "mismatch"
    shutil.copytree(debug_export, bad)
    meta = json.loads((bad / "model_args.json").read_text())
    meta["args"]["dim"] = meta["args"]["dim"] * 2
    (bad / "model_args.json").write_text(json.dumps(meta))
    with pytest.raises(ExportError, match=r"mismatch does not fit the model"):
        finetune.load_encoder(bad)


def test_torchgeo_sample_dict_in_micrometres(encoder):
    x = torch.randn(2, 5, 16, 16)
    wl, fw = band_table(5)
    with torch.no_grad():
        ref = encoder(x, wl, torch.gradient(wl)[0].abs(), sensor="emit")
        from_dict = encoder({"image": x, "wavelength": wl / 1000}, sensor="emit")  # TorchGeo: um, no FWHM
        one = encoder({"image": x[0], "wavelength": (wl / 1000).tolist()}, sensor="emit")
        um_tensors = encoder(x, wl / 1000, fw / 1000, sensor="emit")
        nm_tensors = encoder(x, wl, fw, sensor="emit")
    assert torch.allclose(from_dict, ref, atol=1e-5) and torch.allclose(one[0], ref[0], atol=1e-5)
    assert torch.allclose(um_tensors, nm_tensors, atol=1e-5)
    with pytest.raises(ValueError, match="needs 'wavelength'"):
        encoder({"image": x})

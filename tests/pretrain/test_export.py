"""Encoder export: safetensors + JSON round trip with equal outputs, no text model on load, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from pretrain.models import ModelError, build_model
from pretrain.models import text as text_mod
from pretrain.models.export import ExportError, load_encoder, save_encoder


def batch(c=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, c, 16, 16, generator=g), torch.rand(2, c, generator=g) * 2000 + 400,
            torch.rand(2, c, generator=g) * 10 + 3)


@pytest.mark.parametrize("objective", ["mae", "jepa"])
def test_round_trip_equal_outputs_without_text_model(tmp_path, monkeypatch, objective):
    torch.manual_seed(0)
    model = build_model("debug", objective=objective)
    idx = model.encoder.add_sensor("Some Future Imager") if objective == "mae" else model.add_sensor("Some Future Imager")
    with torch.no_grad():  # make the weights differ from any fresh init
        for p in model.encoder.parameters():
            p.add_(0.01 * torch.randn_like(p))
    out = save_encoder(model, tmp_path / "exp", extra={"step": 7})
    assert sorted(f.name for f in out.iterdir()) == ["encoder.safetensors", "model_args.json"]
    meta = json.loads((out / "model_args.json").read_text())
    assert meta["args"]["name"] == "debug" and meta["sensor_vocab"][idx] == "Some Future Imager"
    assert meta["extra"] == {"step": 7} and meta["patch_size"] == 8

    def no_text_model(texts):
        raise AssertionError("load_encoder must not run the text model")

    monkeypatch.setattr(text_mod, "_run_minilm", no_text_model)
    enc = load_encoder(out)
    assert not enc.training and enc.sensor_names == model.encoder.sensor_names
    model.eval()
    p, wl, fw = batch()
    sensor = torch.tensor([idx, 3])
    level = torch.tensor([1, 0])
    with torch.no_grad():
        torch.testing.assert_close(enc(p, wl, fw, sensor, level), model.encoder(p, wl, fw, sensor, level),
                                   atol=0, rtol=0)
    assert torch.equal(enc.meta.sensor_text, model.encoder.meta.sensor_text)


def test_load_export_of_another_shape_is_a_clear_error(tmp_path):
    save_encoder(build_model("debug"), tmp_path / "a")
    args = json.loads((tmp_path / "a" / "model_args.json").read_text())
    args["args"]["rank"] = 4
    (tmp_path / "a" / "model_args.json").write_text(json.dumps(args))
    with pytest.raises(ExportError, match=r"does not fit the model.*hyper\.to_v\.weight: export \["):
        load_encoder(tmp_path / "a")
    args["args"]["depth"] = 3
    (tmp_path / "a" / "model_args.json").write_text(json.dumps(args))
    with pytest.raises(ExportError, match=r"missing \['blocks\.2\."):
        load_encoder(tmp_path / "a")


def test_load_errors_name_file_and_field(tmp_path):
    with pytest.raises(ExportError, match=r"lacks encoder.safetensors, model_args.json"):
        load_encoder(tmp_path)
    save_encoder(build_model("debug"), tmp_path)
    meta = json.loads((tmp_path / "model_args.json").read_text())
    meta["format"] = "something-else"
    (tmp_path / "model_args.json").write_text(json.dumps(meta))
    with pytest.raises(ExportError, match="model_args.json: field 'format' is 'something-else'"):
        load_encoder(tmp_path)
    with pytest.raises(ModelError, match="needs a SpectralEncoder"):
        save_encoder(torch.nn.Linear(2, 2), tmp_path / "x")


def test_save_from_explicit_state_dict(tmp_path):
    model = build_model("debug")
    sd = {k: torch.zeros_like(v) if k.startswith("blocks.0.") else v for k, v in model.encoder.state_dict().items()}
    save_encoder(model, tmp_path, state_dict=sd)
    enc = load_encoder(tmp_path)
    assert enc.blocks[0].attn.qkv.weight.abs().sum() == 0

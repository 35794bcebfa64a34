"""MiniLM text embeddings: computed once, cached in $SPECFM_CACHE, the model's table built from them."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from data_prep.registry import get_sensor, sensor_vocab
from pretrain.models import build_model
from pretrain.models import text as text_mod


def test_embeddings_are_cached_by_text(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECFM_CACHE", str(tmp_path))
    monkeypatch.setattr(text_mod, "_MEMO", {})
    a = text_mod.embed_texts(["EMIT", "AVIRIS-3", "EMIT"])
    assert a.shape == (3, 384) and a.dtype == torch.float32
    torch.testing.assert_close(a[0], a[2])
    assert (a[0] - a[1]).abs().max() > 1e-2
    cached = load_file(str(tmp_path / "text_embeddings.safetensors"))
    assert set(cached) == {"EMIT", "AVIRIS-3"}
    torch.testing.assert_close(cached["EMIT"], a[0])
    # a fresh process (empty memo) reads the file and never runs the text model
    monkeypatch.setattr(text_mod, "_MEMO", {})

    def boom(texts):
        raise AssertionError(f"text model ran for {texts}")

    monkeypatch.setattr(text_mod, "_run_minilm", boom)
    torch.testing.assert_close(text_mod.embed_texts(["AVIRIS-3"])[0], a[1])


def test_model_table_holds_registry_display_names():
    model = build_model("debug")
    enc = model.encoder
    assert enc.sensor_names == list(sensor_vocab()) and enc.level_names == ["unknown", "L1", "L2"]
    i = enc.vocab.sensor_index("emit")
    torch.testing.assert_close(enc.meta.sensor_text[i], text_mod.embed_texts([get_sensor("emit").display_name])[0])
    assert enc.meta.sensor_text[0].abs().sum() == 0  # unknown: learned embedding instead
    assert (enc.meta.level_text[1] - enc.meta.level_text[2]).abs().max() > 1e-2

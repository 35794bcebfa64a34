"""``data.mix: mixed``: any sensor mix in one micro-batch, padded with a band mask (pretrain.data.mixed).

Stores of 40, 20 and 9 bands; every sample of a mixed batch equals the same patch, crop and window read alone
by the single-store reader; coverage over two ranks; exact resume; the encoder's tokens of each sample equal its
tokens in a batch of its own store (the mixed company changes nothing)."""

from __future__ import annotations

import io
from collections import Counter

import numpy as np
import pytest
import torch

from pretrain.data import DataConfig, DataError, SourceConfig, build_loader
from pretrain.models import build_model

from .data_fixtures import make_store

GOOD = np.ones(40, bool)
GOOD[15:20] = False


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    d = tmp_path_factory.mktemp("mixed")
    a = make_store(str(d / "emit_L2.zarr"), n=24, good=GOOD)
    b = make_store(str(d / "enmap_L1.zarr"), sensor="enmap", level="L1", n=16, bands=20, seed=1)
    c = make_store(str(d / "sentinel-2_L2.zarr"), sensor="sentinel-2", level="L2", n=12, bands=9, seed=2)
    return a, b, c


def _cfg(stores, **kw):
    base = dict(sources=[SourceConfig(s["url"]) for s in stores], batch_size=4, crop=16, band_window=24,
                band_stride=8, num_workers=2, mix="mixed", sensor_dropout=0.0)
    base.update(kw)
    return DataConfig(**base)


def _single(stores, url: str, **kw) -> DataConfig:
    return _cfg(stores, sources=[SourceConfig(url)], mix="store", batch_size=1, **kw)


def test_mixed_batches_hold_several_sensors_padded_with_a_mask(stores):
    loader = build_loader(_cfg(stores, epochs=1))
    batches = list(loader)
    mixed = [b for b in batches if len(set(b["meta"]["url"])) > 1]
    assert len(mixed) >= len(batches) // 2  # most batches mix stores
    from data_prep.dataset import open_store
    from pretrain.data.reader import SampleReader, tables_from_store

    for bt in batches:
        n = bt["band_mask"].sum(1)
        assert bt["pixels"].shape[1] == bt["wavelengths"].shape[1] == int(n.max())
        assert n.tolist() == bt["meta"]["n_bands"]
        for i in range(bt["pixels"].shape[0]):  # real bands are the prefix; padding is zero
            c = int(n[i])
            assert bool(bt["band_mask"][i, :c].all()) and not bool(bt["band_mask"][i, c:].any())
            assert float(bt["pixels"][i, c:].abs().sum()) == 0.0 and float(bt["wavelengths"][i, c:].abs().sum()) == 0
    # every sample is what the single-store reader gives for the same patch, crop and band window
    bt = mixed[0]
    tabs = {}
    for i in range(4):
        url = bt["meta"]["url"][i]
        if url not in tabs:
            tabs[url] = tables_from_store(open_store(url))
        reader = SampleReader({"k": tabs[url]}, 16)
        t = tabs[url]
        c = bt["meta"]["n_bands"][i]
        task = {"key": "k", "index": bt["meta"]["index"][i], "epoch": 0, "step": 0, "j": 0,
                "y0": bt["meta"]["crop_y"][i], "x0": bt["meta"]["crop_x"][i], "w0": bt["meta"]["band_start"][i],
                "wn": c, "drop": False}
        one = reader([task])
        assert torch.equal(one["pixels"][0], bt["pixels"][i, :c])
        assert torch.equal(one["wavelengths"][0], bt["wavelengths"][i, :c])
        assert torch.equal(one["valid"][0], bt["valid"][i])
        assert one["sensor"][0] == bt["sensor"][i] and t.url == url


def test_coverage_two_ranks_equal_batch_counts(stores):
    cfg = _cfg(stores, epochs=1)
    seen, counts = [], []
    for rank in (0, 1):
        loader = build_loader(cfg, rank=rank, world_size=2)
        batches = list(loader)
        counts.append(len(batches))
        assert len(batches) == loader.num_batches == (12 + 8 + 6) // 4
        for bt in batches:
            assert bt["pixels"].shape[0] == 4
            seen += list(zip(bt["meta"]["url"], bt["meta"]["index"]))
    assert counts[0] == counts[1]
    assert len(seen) == len(set(seen))  # no patch twice across ranks
    per = Counter(u for u, _ in seen)
    assert sum(per.values()) == 2 * 6 * 4 and len(per) == 3


def test_exact_resume_mid_epoch(stores):
    cfg = _cfg(stores, epochs=2, prefetch=2)
    ref = build_loader(cfg)
    it = iter(ref)
    for _ in range(3):
        next(it)
    buf = io.BytesIO()
    torch.save(ref.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    expected = [next(it) for _ in range(5)]  # crosses the epoch boundary (6 batches per epoch)
    resumed = build_loader(cfg)
    resumed.load_state_dict(state)
    got = [b for _, b in zip(range(5), resumed)]
    for e, g in zip(expected, got):
        for k in ("pixels", "wavelengths", "fwhm", "band_mask", "valid", "sensor", "level", "gsd"):
            assert torch.equal(e[k], g[k]), k
        assert e["meta"] == g["meta"]
    assert got[0]["meta"]["step"][0] == 3


@torch.no_grad()
def test_tokens_of_a_loaded_sample_do_not_depend_on_its_batch(stores):
    torch.manual_seed(0)
    enc = build_model("debug").encoder.eval()
    bt = next(iter(build_loader(_cfg(stores))))
    assert len(set(bt["meta"]["url"])) > 1
    tok = enc(bt["pixels"], bt["wavelengths"], bt["fwhm"], bt["sensor"], bt["level"], bt["valid"],
              band_mask=bt["band_mask"])
    for i in range(4):
        c = bt["meta"]["n_bands"][i]
        alone = enc(bt["pixels"][i:i + 1, :c], bt["wavelengths"][i:i + 1, :c], bt["fwhm"][i:i + 1, :c],
                    bt["sensor"][i:i + 1], bt["level"][i:i + 1], bt["valid"][i:i + 1])
        torch.testing.assert_close(tok[i], alone[0], atol=1e-5, rtol=1e-5)


def test_bad_mix_value():
    with pytest.raises(DataError, match="mix"):
        DataConfig(sources=[SourceConfig("x.zarr")], mix="per-sample")

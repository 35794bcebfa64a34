"""Learning instruments on constructed cases: each computes what its docstring claims."""

import logging
import math

import pytest
import torch

from pretrain import instruments as I
from pretrain.models import build_model
from pretrain.models.hyper import HyperEmbedding


def test_identical_conditions_have_similarity_one_and_orthogonal_zero():
    row = torch.randn(1, 1, 16)
    same = row.expand(3, 7, 16)
    assert I.condition_similarity(same).item() == pytest.approx(1.0, abs=1e-6)
    eye = torch.eye(8).unsqueeze(0)  # 8 bands with orthogonal conditions
    assert I.condition_similarity(eye).item() == pytest.approx(0.0, abs=1e-7)
    # a pair at 60 degrees and its opposite: known mean
    pair = torch.tensor([[[1.0, 0.0], [0.5, math.sqrt(3) / 2]], [[1.0, 0.0], [-1.0, 0.0]]])
    assert I.condition_similarity(pair).item() == pytest.approx((0.5 - 1.0) / 2, abs=1e-6)
    with pytest.raises(ValueError):
        I.condition_similarity(torch.randn(2, 1, 4))


def test_effective_rank_and_band_average_energy_of_known_matrices():
    assert I.effective_rank(torch.eye(6)).item() == pytest.approx(6.0, rel=1e-6)
    rank_one = torch.randn(5, 1) @ torch.randn(1, 9)
    assert I.effective_rank(rank_one).item() == pytest.approx(1.0, abs=1e-4)
    diag = torch.diag(torch.tensor([1.0, 1.0, 0.0, 0.0]))
    assert I.effective_rank(diag).item() == pytest.approx(2.0, rel=1e-5)
    same_rows = torch.randn(1, 12).expand(7, 12)
    assert I.mean_direction_energy(same_rows).item() == pytest.approx(1.0, rel=1e-6)
    assert I.mean_direction_energy(torch.eye(10)).item() == pytest.approx(0.1, rel=1e-6)
    opposite = torch.tensor([[1.0, 2.0], [-1.0, -2.0]])
    assert I.mean_direction_energy(opposite).item() == pytest.approx(0.0, abs=1e-7)


def test_band_token_map_of_identical_conditions_is_rank_one():
    torch.manual_seed(0)
    hyper = HyperEmbedding(cond_dim=16, patch_size=4, rank=6, dim=24)
    cond = torch.randn(2, 1, 16).expand(2, 10, 16).contiguous()
    m = I.band_token_map(hyper, cond)
    assert m.shape == (2, 10, 24)
    assert I.effective_rank(m).max().item() == pytest.approx(1.0, abs=1e-3)
    assert I.mean_direction_energy(m).min().item() == pytest.approx(1.0, rel=1e-5)
    distinct = I.band_token_map(hyper, torch.randn(2, 10, 16))
    assert I.effective_rank(distinct).min().item() > 3.0
    # row c is the embedding's response to a uniform unit patch in band c, bias removed
    patches = torch.zeros(2, 10, 1, 16)
    patches[:, 3] = 1.0
    x = torch.randn(2, 10, 16)
    tok = hyper(patches, x)[:, 0] - hyper(torch.zeros_like(patches), x)[:, 0]
    torch.testing.assert_close(I.band_token_map(hyper, x)[:, 3], tok)


def test_baselines_on_constructed_images():
    p = 4
    px = torch.arange(3.0).view(1, 3, 1, 1).expand(2, 3, 8, 8).clone()  # each band constant
    mask = torch.tensor([[[True, False], [False, True]], [[False, True], [True, True]]])
    torch.testing.assert_close(I.band_mean_baseline(px, mask, p), px)
    torch.testing.assert_close(I.interpolation_baseline(px, mask, p), px)
    # interpolation keeps visible patches and fills a masked one from the visible patches' mean spectra
    img = torch.zeros(1, 2, 8, 8)
    img[:, :, :4, 4:] = 2.0  # visible patch (0, 1)
    img[:, :, 4:, :4] = 4.0  # visible patch (1, 0)
    img[:, :, 4:, 4:] = 9.0  # masked patch (1, 1): equidistant from both visible ones
    img[:, :, :4, :4] = 7.0  # masked patch (0, 0)
    m = torch.tensor([[[True, False], [False, True]]])
    out = I.interpolation_baseline(img, m, p)
    torch.testing.assert_close(out[:, :, :4, 4:], img[:, :, :4, 4:])
    torch.testing.assert_close(out[:, :, 4:, 4:], torch.full((1, 2, 4, 4), 3.0))
    # the band mean counts only visible, valid pixels
    valid = torch.ones(1, 8, 8, dtype=torch.bool)
    valid[:, 4:, :4] = False
    torch.testing.assert_close(I.band_mean_baseline(img, m, p, valid), torch.full((1, 2, 8, 8), 2.0))


def test_skill_and_collapse_warnings(caplog):
    assert I.skill(0.5, 1.0) == pytest.approx(0.5)
    assert I.skill(1.2, 1.0) == pytest.approx(-0.2)
    assert math.isnan(I.skill(1.0, 0.0))
    bad = {"stage": "s1", "step": 40, "cond_similarity": 0.95, "band_map_rank": 1.3, "band_map_mean_energy": 0.9,
           "skill_vs_band_mean": 0.01}
    msgs = I.collapse_warnings(bad)
    assert len(msgs) == 3 and "0.950" in msgs[0] and "1.30" in msgs[1] and "s1 step 40" in msgs[0]
    assert I.collapse_warnings({"cond_similarity": 0.5, "band_map_rank": 7.0, "skill_vs_band_mean": 0.3}) == []
    assert I.collapse_warnings({"cond_similarity": 0.99})[0].startswith("instruments: band conditions")
    collapsed = build_model("debug")
    with torch.no_grad():  # every band gets the same condition: the meta encoder ignores the band
        collapsed.encoder.meta.norm.weight.zero_()
        collapsed.encoder.meta.norm.bias.normal_()
    batch = _batch()
    with caplog.at_level(logging.WARNING, logger="specfm.pretrain"):
        rec = I.log_metrics(collapsed, batch, collapsed(batch))
    assert rec["cond_similarity"] == pytest.approx(1.0, abs=1e-5) and rec["band_map_rank"] < 1.01
    assert "collapsing" in caplog.text and "panchromatic" in caplog.text


def _batch(b=2, c=12, s=16):
    g = torch.Generator().manual_seed(0)
    return {"pixels": torch.randn(b, c, s, s, generator=g), "wavelengths": torch.linspace(400, 2400, c).expand(b, -1),
            "fwhm": torch.full((b, c), 10.0), "valid": torch.ones(b, s, s, dtype=torch.bool)}


def test_record_on_a_model_and_exact_skill():
    torch.manual_seed(0)
    model = build_model("debug")
    batch = _batch()
    out = model(batch)
    rec = I.record(model, batch, out)
    assert set(I.KEYS) <= set(rec) and all(math.isfinite(v) for v in rec.values())
    assert -1.0 <= rec["cond_similarity"] <= 1.0 and 1.0 <= rec["band_map_rank"] <= 12.0
    assert model.training  # record leaves the mode as it was
    # a perfect prediction has skill 1; predicting the band means has skill 0 against that baseline
    perfect = dict(out, pred=batch["pixels"])
    assert I.reconstruction_skill(model, batch, perfect)["skill_vs_band_mean"] == pytest.approx(1.0, abs=1e-3)
    meanpred = dict(out, pred=I.band_mean_baseline(batch["pixels"], out["mask"], 8, batch["valid"]))
    assert I.reconstruction_skill(model, batch, meanpred)["skill_vs_band_mean"] == pytest.approx(0.0, abs=1e-6)


def test_plot_curves_writes_a_png(tmp_path):
    recs = [{"stage": "a" if i < 3 else "b", "step": i, "global_step": i, "loss": 1.0 / (i + 1),
             "cond_similarity": 0.5 + 0.05 * i, "band_map_rank": 6 - i * 0.5, "band_map_mean_energy": 0.2,
             "skill_vs_band_mean": 0.1, "skill_vs_interp": -0.1} for i in range(6)]
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(__import__("json").dumps(r) for r in recs) + '\n{"event": "stage_start"}\n')
    assert len(I.read_records(path)) == 6
    png = I.plot_curves(path, tmp_path / "fig" / "instruments.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

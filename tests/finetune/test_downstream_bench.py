"""bench/downstream.py --seeds: per-seed runs of both encoders, means and standard errors of each and of the
paired difference, a fresh random init per seed, and the suite's corpus drawn from held-out materials."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from bench import downstream
from finetune.encoder_api import load_encoder

REPO = Path(__file__).resolve().parents[2]


def test_spread_of_pairs_the_runs():
    pre, rnd = [0.50, 0.60, 0.70], [0.40, 0.52, 0.61]
    s = downstream.spread_of(pre, rnd)
    assert math.isclose(s["pretrained"], 0.6) and math.isclose(s["random"], np.mean(rnd))
    assert math.isclose(s["pretrained_se"], np.std(pre, ddof=1) / math.sqrt(3))
    d = np.subtract(pre, rnd)
    assert math.isclose(s["difference"], d.mean()) and math.isclose(s["difference_se"], d.std(ddof=1) / math.sqrt(3))
    # the runs move together here, so the paired difference is far tighter than either encoder's spread
    assert s["difference_se"] < 0.2 * s["pretrained_se"]
    one = downstream.spread_of([0.5], [0.4])
    assert math.isclose(one["difference"], 0.1) and math.isnan(one["difference_se"])


def test_random_twin_is_a_fresh_init_per_seed(debug_export):
    enc = load_encoder(debug_export)
    a, a2, b = (downstream.random_twin(enc, seed=s) for s in (0, 0, 1))
    wa, wa2, wb = (dict(e.inner.named_parameters()) for e in (a, a2, b))
    name = "hyper.to_u.weight"
    assert torch.equal(wa[name], wa2[name]) and not torch.equal(wa[name], wb[name])
    bufs = dict(enc.inner.named_buffers())
    for n, buf in b.inner.named_buffers():  # the frozen text table is the pretrained encoder's
        assert torch.equal(buf, bufs[n])


def test_seeds_run_both_encoders_per_seed_on_held_out_materials(tmp_path, debug_export, monkeypatch, capsys):
    suite = yaml.safe_load((REPO / "configs/benchmarks/synthetic.yaml").read_text())
    suite["tasks"] = [t for t in suite["tasks"] if t["name"] == "scene_linear_probe"]
    suite["simulate"].update(scenes=1, size=32)
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    seen = {}
    real_prepare = downstream.prepare_corpus

    def prepare(s, work, data=None):
        seen["simulate"] = dict(s.simulate)
        return real_prepare(s, work, data)

    monkeypatch.setattr(downstream, "prepare_corpus", prepare)
    assert downstream.main(["--checkpoint", str(debug_export), "--suite", str(path), "--steps", "2", "--seeds", "2",
                            "--json"]) == 0
    assert seen["simulate"]["materials"] == "heldout"
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["seeds"] == 2
    pre = [r["scene_linear_probe"] for r in out["runs"]["pretrained"]]
    rnd = [r["scene_linear_probe"] for r in out["runs"]["random"]]
    assert len(pre) == len(rnd) == 2
    sp = out["spread"]["scene_linear_probe"]
    assert math.isclose(sp["difference"], np.mean(np.subtract(pre, rnd)))
    assert math.isclose(out["pretrained"]["scene_linear_probe"], np.mean(pre))
    # runs split over invocations pool: --first-seed 1 --seeds 1 is the second run above, both encoders
    assert downstream.main(["--checkpoint", str(debug_export), "--suite", str(path), "--steps", "2", "--seeds", "1",
                            "--first-seed", "1", "--json"]) == 0
    second = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["runs"]
    assert second["pretrained"] == out["runs"]["pretrained"][1:] and second["random"] == out["runs"]["random"][1:]
    with pytest.raises(SystemExit) as e:
        downstream.main(["--checkpoint", str(debug_export), "--suite", str(path), "--first-seed", "-1"])
    assert e.value.code == 2


def test_tasks_picks_tasks_and_fusion_reports_its_baselines(tmp_path, debug_export, capsys):
    suite = yaml.safe_load((REPO / "configs/benchmarks/synthetic.yaml").read_text())
    suite["simulate"].update(scenes=1, size=32)
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    assert downstream.main(["--checkpoint", str(debug_export), "--suite", str(path), "--steps", "2", "--seeds", "2",
                            "--tasks", "fusion,segmentation", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(out["pretrained"]) == set(out["random"]) == {"fusion", "segmentation"}
    seg = out["baselines"]["segmentation"]  # both encoders and the raw-spectrum classifier, headline metric
    assert set(seg) == {"pretrained mIoU", "random mIoU", "raw_spectrum mIoU"}
    assert math.isclose(seg["random mIoU"]["mean"], out["random"]["segmentation"])
    rows = out["baselines"]["fusion"]  # PSNR and SAM of both encoders and of the upsampling baselines, per run
    assert {"pretrained PSNR", "random SAM", "unmix PSNR", "bilinear PSNR", "bicubic SAM", "no_encoder PSNR"} <= set(rows)
    assert math.isclose(rows["pretrained PSNR"]["mean"], out["pretrained"]["fusion"])
    with pytest.raises(SystemExit) as e:
        downstream.main(["--checkpoint", str(debug_export), "--suite", str(path), "--tasks", "fusion,segmentaton"])
    assert e.value.code == 2
    assert "--tasks: segmentaton not in" in capsys.readouterr().err

"""configs/pretrain/quality_cpu.yaml (what bench/quality.py pretrains) parses, and runs a few steps under the real
launcher on two CPU ranks with its own recipe and data settings (a tiny corpus in place of its 16 scenes), logging
the learning instruments every log step and drawing their curves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pretrain.config import load_config
from tests import watch
from tests.launching import ENV, torchrun_cmd

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "pretrain" / "quality_cpu.yaml"


def test_quality_config_parses_with_the_lessons_of_issue_11():
    cfg = load_config(str(CONFIG), [])
    assert cfg.prepare.enabled and cfg.prepare.patch_size >= 2 * cfg.data.crop  # crops move inside patches
    assert cfg.data.crop_align == 1
    assert not cfg.logging.instruments  # the model logs its own (Objective.log_metrics): no second copy
    assert len(cfg.data.sources) == 12 and all(s.url.startswith(cfg.prepare.store_root) for s in cfg.data.sources)
    assert cfg.parallel.global_batch == 2 * cfg.parallel.micro_batch  # two CPU ranks
    # the measured recipe: whole-range band windows, decorrelated conditions, spectral masking, few masked patches
    assert cfg.data.band_step > 1 and (cfg.data.band_window - 1) * cfg.data.band_step + 1 >= 200
    ov = cfg.model.overrides
    assert ov["cond_decorrelation"] > 0 and ov["head_condition"] == "meta"
    assert ov["band_mask_ratio"] >= 0.5 and ov["mask_ratio"] <= 0.25


@pytest.mark.slow
def test_quality_config_runs_a_few_steps_on_two_ranks(tmp_path):
    raw = yaml.safe_load(CONFIG.read_text())
    root = str(tmp_path / "data")
    raw["run_dir"] = str(tmp_path / "run")
    raw["prepare"].update(raw_dir=f"{root}/raw", store_root=f"{root}/stores", scenes=1, size=128)  # 4 patches per store
    for s in raw["data"]["sources"]:
        s["url"] = s["url"].replace("data/quality/stores", f"{root}/stores")
    raw["stages"] = [{"name": "quality", "steps": 3}]
    raw["logging"].update(every=1, viz_every=0, progress=False, wandb="disabled")
    raw["parallel"]["micro_batch"], raw["parallel"]["global_batch"] = 2, 4
    cfg = tmp_path / "quality.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    r = watch.run(torchrun_cmd(REPO / "launch/pretrain.py", "--config", cfg), cwd=REPO, env=ENV)  # hang = no progress
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in recs if "loss" in x]
    assert [x["step"] for x in steps] == [1, 2, 3]
    for x in steps:
        assert 0.0 < x["cond_similarity"] <= 1.0 and x["band_map_rank"] >= 1.0
        assert "skill_vs_band_mean" in x and "skill_vs_interp" in x
    assert (tmp_path / "run" / "figures" / "instruments.png").is_file()
    assert (tmp_path / "run" / "export" / "quality" / "encoder.safetensors").is_file()

"""The vocabulary travels with the model: one name-to-index map, never re-derived from the registry.

A sensor YAML added to a finished run's registry (one that sorts first, so a registry-derived order would
shift every index) changes nothing for a resumed run (same losses as an uninterrupted run), is appended at
the next stage's start, and finetuning maps names by the export's vocabulary.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from pretrain import engine as eng
from pretrain.checkpoint import CheckpointError
from pretrain.models import ModelError, Vocabulary, build_model
from pretrain.models.export import ExportError, save_encoder
from tests import watch
from tests.launching import EXTENSIONS_DIR
from tests.pretrain.data_fixtures import make_store
from tests.pretrain.test_train_ds import losses

REPO = Path(__file__).resolve().parents[2]


def test_matching_rules_and_append_only_growth():
    v = Vocabulary(("unknown", "emit", "enmap"), ("unknown", "L1", "L2"))
    assert v.sensor_index("enmap") == 2 and v.sensor_index("EMIT") == 1 and v.sensor_index(" Emit") == 1
    assert v.sensor_index("nope") == 0 and v.sensor_index(None) == 0 and v.lookup("nope") is None
    assert v.level_index("L2A") == v.level_index("l2") == 2 and v.level_index("L1C") == 1
    assert v.sensor_index("L2A") == 0  # level families are for levels only
    w = v.extended(["aaa", "emit", "zzz"])
    assert w.sensors == ("unknown", "emit", "enmap", "aaa", "zzz") and v.extended(["emit"]) is v
    assert Vocabulary.from_json(w.to_json()) == w
    with pytest.raises(ModelError, match="must start with 'unknown'"):
        Vocabulary(("emit",), ("unknown",))
    with pytest.raises(ModelError, match="unique; repeated: \\['emit'\\]"):
        Vocabulary(("unknown", "emit", "emit"), ("unknown",))
    with pytest.raises(ModelError, match="x.json: field\\(s\\) \\['level_vocab'\\] missing"):
        Vocabulary.from_json({"sensor_vocab": ["unknown"]}, "x.json")


def test_model_builds_with_the_given_vocabulary_and_appends_to_every_encoder():
    v = Vocabulary(("unknown", "enmap", "emit"), ("unknown", "L1", "L2"))
    jepa = build_model("debug", objective="jepa", vocab=v)
    assert jepa.vocab == v and jepa.target_encoder.vocab == v and jepa.encoder.meta.sensor_text.shape[0] == 3
    assert jepa.add_sensor("Some Future Imager") == 3
    for enc in (jepa.encoder, jepa.target_encoder):
        assert enc.vocab.sensors[-1] == "Some Future Imager" and enc.meta.sensor_text.shape[0] == 4
    assert jepa.add_sensor("some future imager") == 3  # already there (matched case-insensitively)


def test_load_export_into_refuses_another_vocabulary_order(tmp_path):
    a = Vocabulary(("unknown", "emit", "enmap"), ("unknown", "L1", "L2"))
    b = Vocabulary(("unknown", "enmap", "emit"), ("unknown", "L1", "L2"))  # same size, indices swapped
    save_encoder(build_model("debug", vocab=a), tmp_path / "a")
    eng.load_export_into(build_model("debug", vocab=a), tmp_path / "a")
    with pytest.raises(ExportError, match="its vocabulary .* differs from the model's"):
        eng.load_export_into(build_model("debug", vocab=b), tmp_path / "a")


def test_stage_vocabulary_follows_checkpoint_then_export_then_registry(tmp_path):
    reg = Vocabulary.from_registry()
    assert eng.stage_vocabulary(None, None) == (reg, reg)
    old = Vocabulary(("unknown", "emit"), reg.levels)
    save_encoder(build_model("debug", vocab=old), tmp_path / "exp")
    build, run = eng.stage_vocabulary(None, tmp_path / "exp")
    assert build == old and run.sensors[:2] == old.sensors and set(run.sensors) == set(reg.sensors)
    tag = tmp_path / "step_00000002"
    tag.mkdir()
    saved = old.extended(["zz-late"])
    (tag / "complete").write_text(json.dumps({"client_state": {"vocab": saved.to_json()}}))
    assert eng.stage_vocabulary(tag, tmp_path / "exp") == (old, saved)
    assert eng.stage_vocabulary(tag, None) == (saved, saved)
    other = Vocabulary(("unknown", "enmap", "emit"), reg.levels)
    (tag / "complete").write_text(json.dumps({"client_state": {"vocab": other.to_json()}}))
    with pytest.raises(CheckpointError, match="does not extend the vocabulary"):
        eng.stage_vocabulary(tag, tmp_path / "exp")


# ------------------------------------------------------------------------------- a real run, resumed
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
       "TORCH_EXTENSIONS_DIR": EXTENSIONS_DIR, "WANDB_MODE": "disabled"}
# one process (no torchrun variables); the launcher puts its own checkout on sys.path (no PYTHONPATH: issue 11.5)
for _k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "PYTHONPATH"):
    ENV.pop(_k, None)


def _pretrain(config: Path, sensors: Path, *overrides: str) -> None:
    r = watch.run([sys.executable, str(REPO / "launch/pretrain.py"), "--config", str(config), *overrides],
                  cwd=REPO, env={**ENV, "SPECFM_SENSORS": str(sensors)})  # hangs detected by progress
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def test_adding_a_sensor_yaml_to_a_finished_run_keeps_every_sensors_embedding(tmp_path):
    sensors = tmp_path / "sensors"
    shutil.copytree(REPO / "configs/sensors", sensors)
    a = make_store(str(tmp_path / "emit_L2.zarr"), sensor="emit", level="L2", n=8, bands=24, patch=16, seed=1)
    b = make_store(str(tmp_path / "aviris-3_L1.zarr"), sensor="aviris-3", level="L1", n=8, bands=24, patch=16,
                   seed=2)
    cfg = {"data": {"sources": [{"url": a["url"]}, {"url": b["url"]}], "crop": 16, "band_window": 12,
                    "num_workers": 0, "sensor_dropout": 0.0},
           "model": {"name": "debug"}, "parallel": {"zero_stage": 2, "micro_batch": 2, "grad_accum": 1},
           "optim": {"lr": 1e-3, "warmup_steps": 1}, "checkpoint": {"every": 2, "keep": 1},
           "logging": {"wandb": "disabled", "every": 1, "viz_every": 0, "progress": False},
           "stages": [{"name": "first", "steps": 4}, {"name": "second", "steps": 2}]}
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(cfg))
    ref, run = tmp_path / "ref", tmp_path / "run"
    _pretrain(config, sensors, f"run_dir={ref}")  # uninterrupted, the registry as it was
    _pretrain(config, sensors, f"run_dir={run}", "max_steps=2")
    before = Vocabulary.from_registry()  # this process reads the shipped registry, the run's copy of it
    marker = json.loads((run / "checkpoints/first/step_00000002/complete").read_text())
    assert Vocabulary.from_json(marker["client_state"]["vocab"]) == before
    # a new sensor YAML whose name sorts before every other: a registry-derived order would shift all indices
    (sensors / "aaa-imager.yaml").write_text((sensors / "emit.yaml").read_text()
                                             .replace("name: emit", "name: aaa-imager", 1)
                                             .replace("display_name:", "display_name: Aaa Imager #", 1))
    _pretrain(config, sensors, f"run_dir={run}")  # resumes stage one, then stage two
    assert losses(run) == pytest.approx(losses(ref), abs=1e-6) and sorted(losses(run)) == list(range(1, 7))
    first = json.loads((run / "export/first/model_args.json").read_text())
    second = json.loads((run / "export/second/model_args.json").read_text())
    assert first["sensor_vocab"] == list(before.sensors)  # resumed with the checkpoint's vocabulary
    assert second["sensor_vocab"] == [*before.sensors, "aaa-imager"]  # appended at the next stage's start
    t1 = load_file(str(run / "export/first/encoder.safetensors"))["meta.sensor_text"]
    t2 = load_file(str(run / "export/second/encoder.safetensors"))["meta.sensor_text"]
    tref = load_file(str(ref / "export/second/encoder.safetensors"))["meta.sensor_text"]
    n = len(before.sensors)
    assert torch.equal(t2[:n], t1) and torch.equal(t2[:n], tref) and t2[n].abs().sum() > 0
    # finetuning maps names with the export's vocabulary: every old sensor keeps its row, the new one is embedded
    import finetune

    enc = finetune.load_encoder(run / "export/second")
    assert enc.vocab.sensor_index("emit") == before.sensor_index("emit") > 0
    assert enc.vocab.sensor_index("aaa-imager") == n
    x = torch.randn(1, 6, 16, 16)
    wl, fw = torch.linspace(450, 2300, 6), torch.full((6,), 10.0)
    ref_enc = finetune.load_encoder(ref / "export/second")
    with torch.no_grad():
        for s in ("emit", "aviris-3"):
            assert torch.equal(enc(x, wl, fw, sensor=s), ref_enc(x, wl, fw, sensor=s)), s


def test_old_checkpoint_without_vocabulary_resumes_with_the_registrys(tmp_path):
    """A checkpoint written before the vocabulary was recorded: the registry's order, as it was then."""
    tag = tmp_path / "step_00000002"
    tag.mkdir()
    (tag / "complete").write_text(json.dumps({"client_state": {"stage": 0}}))
    reg = Vocabulary.from_registry()
    assert eng.stage_vocabulary(tag, None) == (reg, reg)
    w = tmp_path / "w"
    w.mkdir()
    save_file({"x": torch.zeros(1)}, str(w / "encoder.safetensors"))  # a custom exporter's: no model_args.json
    assert eng.stage_vocabulary(None, w) == (reg, reg)

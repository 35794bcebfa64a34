"""A co-located JEPA stage in a real run: DeepSpeed (ZeRO-2 and ZeRO-3) on two CPU ranks through ``launch/pretrain.py``.

Stage one is MAE on any sensor mix per micro-batch (``data.mix: mixed``), stage two the co-located JEPA objective
on group batches (``stages.1.objective: jepa``, ``stages.1.data.colocated``), initialised from stage one's export.
A run stopped by ``max_steps`` inside stage two and run again gives the uninterrupted run's losses (exact resume of
model, optimizer, EMA target and the group loader); the export carries the fusion module and loads without
DeepSpeed; ``features(..., views=...)`` works on it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.launching import REPO
from tests.pretrain.test_train_ds import _ok, losses, torchrun  # --standalone rendezvous, hang-watched

SENSORS = ("enmap", "emit", "sentinel-2", "planetscope")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=[2, 3], ids=["zero2", "zero3"])
def runs(request, colocated_root, tmp_path_factory) -> dict:
    """The same two-stage run under ZeRO-2 and ZeRO-3 (JEPA's EMA target on each rank's partitions there)."""
    root = tmp_path_factory.mktemp(f"train-colocated-zero{request.param}")
    stores = colocated_root["stores"]
    sources = [{"url": str(stores / f"{s}_L2.zarr")} for s in SENSORS]
    cfg = {
        "run_dir": str(root / "run"),
        "data": {"sources": sources, "crop": 16, "band_window": 16, "band_stride": 8, "num_workers": 0,
                 "mix": "mixed"},
        "model": {"name": "debug", "overrides": {"fusion_depth": 1}},
        "parallel": {"zero_stage": request.param, "micro_batch": 1, "global_batch": 2},
        "optim": {"lr": 1e-3, "warmup_steps": 1},
        "checkpoint": {"every": 2, "keep": 2},
        "logging": {"wandb": "disabled", "every": 1, "viz_every": -1, "progress": False},
        "stages": [{"name": "mixed_mae", "steps": 2},
                   {"name": "colocated_jepa", "objective": "jepa", "steps": 4,
                    "data": {"colocated": {"global_sensors": ["enmap", "sentinel-2"],
                                           "local_sensors": ["emit", "enmap", "planetscope"], "local_views": 1,
                                           "footprint_m": 480}}}],
    }
    path = root / "colocated.yaml"
    path.write_text(yaml.safe_dump(cfg))
    full, parts = root / "full", root / "parts"
    r_full = torchrun(path, f"run_dir={full}")
    r_stop = torchrun(path, f"run_dir={parts}", "max_steps=4")  # inside stage two, after its checkpoint at step 2
    r_again = torchrun(path, f"run_dir={parts}")
    return {"full": full, "parts": parts, "runs": (r_full, r_stop, r_again)}


def test_colocated_jepa_stage_resumes_exactly(runs):
    for r in runs["runs"]:
        _ok(r)
    recs = [json.loads(x) for x in (runs["full"] / "metrics.jsonl").read_text().splitlines()]
    start = next(r for r in recs if r.get("event") == "stage_start" and r["stage"] == "colocated_jepa")
    # the JEPA stage starts from the MAE stage's export: its EMA target starts as that encoder (partitioned too),
    # not at its own random draw; the MAE's decoder is another objective's, so nothing else is carried
    assert start["target_abs_sum"] == pytest.approx(start["encoder_abs_sum"], rel=1e-9)
    assert start["objective_carried"] is False
    full, parts = losses(runs["full"]), losses(runs["parts"])
    assert sorted(full) == list(range(1, 7)) and sorted(parts) == list(range(1, 7))
    assert "resumed from" in runs["runs"][2].stdout + runs["runs"][2].stderr
    for s in range(1, 7):
        assert parts[s] == pytest.approx(full[s], abs=1e-6), (s, parts[s], full[s])
    recs = [json.loads(x) for x in (runs["full"] / "metrics.jsonl").read_text().splitlines()]
    starts = {r["stage"]: r for r in recs if r.get("event") == "stage_start"}
    assert Path(starts["colocated_jepa"]["init_from"]) == runs["full"] / "export" / "mixed_mae"


def test_export_carries_the_fusion_module(runs, colocated_root):
    import torch

    from pretrain.data import DataConfig, SourceConfig, build_loader
    from pretrain.models.export import load_encoder

    enc = load_encoder(runs["full"] / "export" / "colocated_jepa").eval()
    assert any(k.startswith("fusion.") for k in enc.state_dict())
    stores = colocated_root["stores"]
    cfg = DataConfig(sources=[SourceConfig(str(stores / f"{s}_L2.zarr")) for s in SENSORS], batch_size=1,
                     band_window=16, num_workers=0,
                     colocated={"global_sensors": ["enmap", "sentinel-2"], "local_sensors": ["emit"],
                                "local_views": 1, "footprint_m": 480})
    b = next(iter(build_loader(cfg, vocab=enc.vocab)))
    with torch.no_grad():
        f = enc.features(views=b["views"][:2], layers=(0, 1))
    assert [tuple(x.shape) for x in f] == [(1, 4, 64)] * 2 and all(torch.isfinite(x).all() for x in f)


def test_demo_config_ends_with_a_colocated_jepa_stage_on_its_prepared_stores():
    """The README's main command runs a co-located JEPA stage: its sources are the stores prepare.colocated makes,
    and every sensor it fuses or crops is among them (a demo run of it: the issue 13 note)."""
    from pretrain.config import load_config

    cfg = load_config(REPO / "configs/pretrain/demo.yaml")
    st = cfg.stages[-1]
    co = cfg.prepare.colocated
    assert st.objective == "jepa" and co is not None and cfg.model.overrides.get("fusion_depth", 0) >= 1
    data = cfg.stage_data(st)
    assert all(s.url.startswith(co.store_root + "/") for s in data.sources)
    stored = {s.url.rsplit("/", 1)[1].rsplit("_", 1)[0] for s in data.sources}
    assert stored == set(co.sensors)
    assert set(data.colocated.global_sensors) | set(data.colocated.local_sensors) <= stored

"""The release folder (pretrain/release.py): Hugging Face layout, model card, loading back, torch.hub, hub ids.

Nothing downloads: hub ids are resolved from a Hugging Face cache laid out here as huggingface_hub lays it out
(models--owner--name/refs/main + snapshots/<commit>/)."""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import finetune
from pretrain.release import model_card, write_release
from tests.pretrain.data_fixtures import make_store

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """A pretraining run's files as the trainer leaves them: config.yaml, metrics.jsonl, export/<stage>/."""
    from pretrain.config import dump_config, load_config
    from pretrain.models import build_model
    from pretrain.models.export import save_encoder

    root = tmp_path_factory.mktemp("run")
    a = make_store(str(root / "emit_L2.zarr"), sensor="emit", level="L2", n=6, bands=24, patch=16, seed=1)
    b = make_store(str(root / "aviris-3_L1.zarr"), sensor="aviris-3", level="L1", n=4, bands=24, patch=16, seed=2)
    cfg = {"run_dir": str(root), "data": {"sources": [{"url": a["url"]}, {"url": b["url"], "weight": 0.5}],
                                          "crop": 16, "band_window": 16},
           "model": {"name": "debug"}, "parallel": {"micro_batch": 2, "global_batch": 4},
           "stages": [{"name": "s1", "steps": 6, "sources": [{"url": b["url"]}]}, {"name": "s2", "steps": 10}]}
    src = root / "in.yaml"
    src.write_text(yaml.safe_dump(cfg))
    (root / "config.yaml").write_text(dump_config(load_config(src)))
    sps = [3.0, 10.0, 12.0, 11.0]  # the first logged step (warm-up) is left out: median 11
    with open(root / "metrics.jsonl", "w") as f:
        f.write(json.dumps({"stage": "s1", "step": 2, "loss": 1.0, "samples_per_s": 99.0}) + "\n")
        for k, v in enumerate(sps):
            f.write(json.dumps({"stage": "s2", "step": 2 * k + 2, "loss": 1.0, "samples_per_s": v,
                                "tokens_per_s": 4 * v, "peak_rss_mb": 500.0 + k}) + "\n")
    torch.manual_seed(0)
    export = save_encoder(build_model("debug"), root / "export" / "s2",
                          extra={"stage": "s2", "steps": 10, "global_step": 16, "samples_seen": 64,
                                 "model": "debug", "git_sha": "abc1234"})
    return {"root": root, "export": export, "stores": (a, b), "median_sps": statistics.median(sps[1:])}


def _outputs(enc) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 12, 16, 16, generator=g)
    with torch.no_grad():
        return enc(x, torch.linspace(420, 2300, 12), torch.full((12,), 9.0), sensor="emit", level="L2")


def test_release_folder_has_the_hf_files_training_record_and_statistics(run):
    from pretrain.release import hardware

    hf = write_release(run["export"], hw=hardware(world_size=2, precision="fp32"))
    assert hf == run["export"] / "hf"
    assert sorted(p.name for p in hf.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert (hf / "model.safetensors").read_bytes() == (run["export"] / "encoder.safetensors").read_bytes()
    cfg = json.loads((hf / "config.json").read_text())
    meta = json.loads((run["export"] / "model_args.json").read_text())
    assert {k: cfg[k] for k in meta} == meta  # the export's fields unchanged
    assert cfg["model_type"] and cfg["hidden_size"] == meta["embed_dim"] and cfg["num_hidden_layers"] == 2
    a, b = run["stores"]
    for key, st in (("emit_L2", a["stats"]), ("aviris-3_L1", b["stats"])):
        np.testing.assert_allclose(cfg["normalisation"][key]["mean"], st.mean)
        np.testing.assert_allclose(cfg["normalisation"][key]["p99"], st.p99)
    np.testing.assert_allclose(cfg["bands"]["emit_L2"]["wavelengths_nm"], a["wavelengths"])
    t = cfg["training"]
    assert (t["stage"], t["steps"], t["global_step"], t["samples_seen"]) == ("s2", 10, 16, 64)
    assert [r["patches"] for r in t["data"]] == [6, 4] and t["data"][1]["weight"] == 0.5
    assert t["throughput"]["samples_per_s"] == run["median_sps"] and t["throughput"]["peak_rss_mb"] == 503.0
    assert t["hardware"]["world_size"] == 2
    card = (hf / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: specfm")
    for text in (a["url"], "| optimizer steps (this stage) | 10 |", "11 samples/s", "abc1234", "emit_L2`: 24 bands",
                 "2 ranks", "None recorded yet"):
        assert text in card, text


def test_release_loads_back_with_equal_outputs_and_through_torch_hub(run):
    hf = write_release(run["export"])
    ref = _outputs(finetune.load_encoder(run["export"]))
    enc = finetune.load_encoder(hf)
    torch.testing.assert_close(_outputs(enc), ref, rtol=0, atol=0)
    assert "emit_L2" in enc.args["normalisation"]  # what launch/embed.py --stats auto uses
    hub = torch.hub.load(str(REPO), "encoder", source="local", path=str(hf))
    torch.testing.assert_close(_outputs(hub), ref, rtol=0, atol=0)


def test_hub_id_resolves_from_the_local_cache_only(run, tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    import huggingface_hub.constants as hc

    from pretrain.release import ReleaseError

    hf = write_release(run["export"])
    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = cache / "models--specfm--debug-encoder" / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in hf.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (cache / "models--specfm--debug-encoder" / "refs").mkdir()
    (cache / "models--specfm--debug-encoder" / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)  # "specfm/debug-encoder" is not a local path here
    enc = finetune.load_encoder("specfm/debug-encoder")
    torch.testing.assert_close(_outputs(enc), _outputs(finetune.load_encoder(hf)), rtol=0, atol=0)
    with pytest.raises(ReleaseError, match="not in the Hugging Face cache; pass download=True"):
        finetune.load_encoder("specfm/not-cached")


def test_benchmark_figures_go_into_config_and_card(run, tmp_path):
    report = {"suite": "synthetic", "checkpoint": str(run["export"]), "tasks": {
        "seg": {"kind": "segmentation", "dataset": "synthetic", "mode": "linear_probe", "headline": "mIoU",
                "metrics": {"OA": 0.91, "mIoU": 0.6789}, "paper": {"mIoU": 77.82}}}}
    (tmp_path / "report.json").write_text(json.dumps(report))
    from pretrain.release import main

    assert main([str(run["export"]), "--benchmark", str(tmp_path / "report.json")]) == 0
    cfg = json.loads((run["export"] / "hf" / "config.json").read_text())
    assert cfg["benchmarks"]["tasks"]["seg"]["value"] == 0.6789
    assert cfg["training"]["steps"] == 10  # the training record is kept
    card = model_card(cfg)
    assert "| seg | segmentation | synthetic | linear_probe | mIoU | 0.6789 | 77.82 |" in card
    assert main([str(tmp_path / "missing")]) == 2


def test_release_of_an_export_outside_a_run_says_what_is_unknown(tmp_path):
    from pretrain.models import build_model
    from pretrain.models.export import save_encoder

    exp = save_encoder(build_model("debug"), tmp_path / "lone")
    hf = write_release(exp, tmp_path / "rel")
    card = (hf / "README.md").read_text()
    assert "Unknown (the release was written without the run's config and stores)" in card
    assert "| global step | unknown |" in card
    assert os.path.samefile(hf / "model.safetensors", exp / "encoder.safetensors") or \
        (hf / "model.safetensors").read_bytes() == (exp / "encoder.safetensors").read_bytes()


def test_embed_uses_the_release_statistics_of_the_training_store(tiny_corpus, tmp_path):
    """launch/embed.py --stats auto: the training store's statistics recorded in the release, not the scene's."""
    from data_prep.ingest import ingest
    from data_prep.store import PatchStore
    from finetune.inference import embed, open_embeddings
    from pretrain.config import dump_config, load_config
    from pretrain.models import build_model
    from pretrain.models.export import save_encoder

    product = next(Path(tiny_corpus).parent.rglob("EMIT_L2A_RFL_*.nc"))
    res = ingest([product], tmp_path / "stores", patch_size=16, progress=False)
    url = next(iter(res["stores"]))
    src = tmp_path / "in.yaml"
    src.write_text(yaml.safe_dump({"run_dir": str(tmp_path), "data": {"sources": [{"url": url}]},
                                   "model": {"name": "debug"}, "stages": [{"name": "only", "steps": 1}]}))
    (tmp_path / "config.yaml").write_text(dump_config(load_config(src)))
    exp = save_encoder(build_model("debug"), tmp_path / "export" / "only", extra={"stage": "only"})
    write_release(exp)
    s = embed(finetune.load_encoder(exp), product, tmp_path / "e.zarr", tile=16, overlap=0, progress=False)
    assert s["normalisation"] == "export emit_L2"
    store = PatchStore(url)
    got = open_embeddings(str(tmp_path / "e.zarr")).attrs["normalisation"]
    np.testing.assert_allclose(got["mean"], store.stats.mean[store.good_bands], rtol=1e-6)
    s2 = embed(finetune.load_encoder(exp), product, tmp_path / "e2.zarr", tile=16, overlap=0, stats="scene",
               progress=False)
    assert s2["normalisation"] == "scene"

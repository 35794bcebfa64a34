"""The synthetic suite end to end on a real debug encoder; configs parse; bad exports fail cleanly."""

import csv
import importlib.util
import json
from pathlib import Path

import pytest

from finetune.config import ConfigError, load_suite, load_task

REPO = Path(__file__).resolve().parents[2]


def _launch(name: str):
    """Import launch/<name>.py by path (launch/ is not put on sys.path: its pretrain.py would shadow the package)."""
    spec = importlib.util.spec_from_file_location(f"launch_{name}", REPO / "launch" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_synthetic_suite_end_to_end(tmp_path, debug_export, tiny_corpus):
    benchmark = _launch("benchmark")

    out = tmp_path / "bench"
    rc = benchmark.main(["--suite", str(REPO / "configs/benchmarks/synthetic.yaml"), "--checkpoint", str(debug_export),
                         "--out", str(out), "--data", str(tiny_corpus), "--steps", "2", "--no-progress",
                         "--each", "data.band_stride=16", "--each", "eval.test_max=64",
                         "--each", "eval.n_per_class=20"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    kinds = {t["kind"] for t in report["tasks"].values()}
    assert kinds == {"classification", "segmentation", "change", "fusion", "cross_sensor"}
    cross = report["tasks"]["cross_sensor"]  # simulated co-located EnMAP + DESIS products (${colocated})
    assert (cross["details"]["train_sensor"], cross["details"]["test_sensor"]) == ("enmap", "desis")
    assert cross["details"]["n_train"] == cross["details"]["n_test"] >= 9
    for name, t in report["tasks"].items():
        assert (out / t["figure"]).stat().st_size > 1000, name
        assert all(isinstance(v, float) for v in t["metrics"].values())
    fusion = next(t for t in report["tasks"].values() if t["kind"] == "fusion")
    assert set(fusion["details"]["baselines"]) == {"unmix", "bilinear", "bicubic", "unsharp", "no_encoder"}
    rows = list(csv.DictReader(open(out / "report.csv")))
    assert {r["task"] for r in rows} == set(report["tasks"]) and "specaware_paper" in rows[0]
    for name in ("segmentation_pangaea", "change_pangaea"):  # the PANGAEA protocol runs in CI
        assert report["tasks"][name]["protocol"] == "pangaea" and report["tasks"][name]["details"]["steps"] == 2
    assert "mIoU" in report["tasks"]["change_pangaea"]["metrics"]
    assert report["tasks"]["segmentation"]["protocol"] == "finetune"
    md = (out / "report.md").read_text()
    assert "protocol pangaea" in md
    assert all(f"## {n}" in md for n in report["tasks"]) and "bicubic" in md


def test_bad_export_exits_nonzero_and_writes_nothing(tmp_path, capsys):
    benchmark = _launch("benchmark")

    out = tmp_path / "bench"
    rc = benchmark.main(["--suite", str(REPO / "configs/benchmarks/synthetic.yaml"), "--checkpoint",
                         str(tmp_path / "no-export"), "--out", str(out), "--no-progress"])
    assert rc == 2 and "encoder.safetensors" in capsys.readouterr().err
    assert not out.exists()


def test_shipped_configs_parse():
    for p in sorted((REPO / "configs/benchmarks").glob("*.yaml")):
        if p.stem in ("synthetic", "paper"):
            assert load_suite(p).tasks
    for p in sorted((REPO / "configs/finetune").glob("*.yaml")):
        assert load_task(p).kind in ("classification", "segmentation", "change", "fusion")
    with pytest.raises(ConfigError, match="unknown key"):
        load_task(REPO / "configs/finetune/synthetic_change.yaml", ["train.stepz=3"])
    with pytest.raises(ConfigError, match="train.mode"):
        load_task(REPO / "configs/finetune/synthetic_change.yaml", ["train.mode=probe"])


def test_finetune_cli_one_task(tmp_path, debug_export, tiny_corpus):
    import importlib.util

    import finetune as _  # noqa: F401

    spec = importlib.util.spec_from_file_location("launch_finetune", REPO / "launch/finetune.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rc = mod.main(["--config", str(REPO / "configs/finetune/synthetic_linear_probe.yaml"), "--checkpoint",
                   str(debug_export), "--out", str(tmp_path / "ft"), "--data", str(tiny_corpus),
                   "train.steps=3", "data.band_stride=16", "data.tile=8"])
    assert rc == 0 and (tmp_path / "ft/report.json").exists()


def test_paper_suite_list_names_found_and_missing_files(tmp_path, capsys):
    from tests.finetune.fixtures import write_aerorit, write_citius_change, write_mshfnet, write_qingpu

    benchmark = _launch("benchmark")
    write_aerorit(tmp_path / "AeroRIT", rows=56, cols=16)
    write_citius_change(tmp_path / "bayArea", "bay_area")
    write_qingpu(tmp_path / "Qingpu-HSI")
    write_mshfnet(tmp_path / "MSHFNet")
    rc = benchmark.main(["--suite", str(REPO / "configs/benchmarks/paper.yaml"), "--data-root", str(tmp_path), "--list"])
    out = capsys.readouterr().out
    for name in ("aerorit", "bay_area", "qingpu", "emit_planetscope_sf", "aerorit_pangaea", "bay_area_pangaea"):
        assert f"{name}: found" in out, name
    assert rc == 0 and "Qingpu_HSI_gt.dat" in out and "1_train_Planet.tif" in out
    assert "santa_barbara: MISSING 3 of 3" in out and "barbara_gtChanges.mat" in out and "citius.usc.es" in out
    assert "hrssc: MISSING" in out and "whu_h2sr: LAYOUT UNKNOWN" in out and "set data.image" in out
    empty = tmp_path / "empty"
    empty.mkdir()
    benchmark.main(["--suite", str(REPO / "configs/benchmarks/paper.yaml"), "--data-root", str(empty), "--list"])
    out = capsys.readouterr().out
    for name in ("aerorit", "qingpu", "bay_area", "santa_barbara", "hrssc", "emit_planetscope_sf"):
        assert f"{name}: MISSING" in out, name
    assert "3sobs.cn" in out and "FujiangJi/hyperspectral_reconstruction_datasets" in out
    assert benchmark.main(["--suite", str(REPO / "configs/benchmarks/paper.yaml")]) == 2  # no --checkpoint/--out

"""`python -m data_prep inspect|stats|export-wds|ingest`: output, and bad input -> `error: ...`, exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from data_prep import store as st
from data_prep.cli import main
from data_prep.ingest import ingest_granules
from data_prep.store import PatchStore
from tests.data_prep.test_ingest import make_cube, make_granule


@pytest.fixture
def root(tmp_path):
    r = str(tmp_path / "root")
    ingest_granules([make_granule(make_cube(rows=64, cols=64, seed=1), "a"),
                     make_granule(make_cube(rows=32, cols=64, seed=2), "b")], r, patch_size=32, progress=False)
    l1 = make_cube(rows=32, cols=32, seed=3) * 20
    ingest_granules([make_granule(l1, "c", level="L1")], r, patch_size=32, progress=False)
    return r


def test_inspect_json_on_root_and_store(root, capsys):
    assert main(["inspect", root, "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["by_sensor_level"] == {"enmap/L1": 1, "enmap/L2": 6} and out["patches"] == 7
    l2 = next(d for d in out["stores"] if d["level"] == "L2")
    assert l2["granules"] == 2 and l2["bands"] == 224 and l2["good_bands"] == int(PatchStore(l2["url"]).good_bands.sum())
    assert l2["chunks"] == [1, 16, 32, 32] and l2["shards"] == [1, 224, 32, 32]
    assert l2["bytes_on_disk"] > 0 and l2["objects"] >= 6
    assert 0 < l2["stats"]["mean_min"] <= l2["stats"]["mean_max"] <= 1.5
    assert main(["inspect", l2["url"], "--json"]) == 0
    one = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [d["url"] for d in one["stores"]] == [l2["url"]]


def test_stats_recomputes_from_the_patches(root, capsys):
    url = st.store_url(root, "enmap", "L2")
    good = PatchStore(url).attrs["stats"]
    g = zarr.open_group(url, mode="r+")  # damaged by hand, behind the writer's back
    g.attrs["stats"] = {**good, "mean": [0.0] * 224}
    assert main(["stats", url, "--json", "--no-progress"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["max_abs_change"]["mean"] > 0.1 and res["written"]
    np.testing.assert_allclose(PatchStore(url).stats.mean, good["mean"], rtol=1e-12)
    g.attrs["stats"] = {**good, "std": [0.0] * 224}
    assert main(["stats", url, "--from-accumulator", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["max_abs_change"]["std"] > 0.01
    np.testing.assert_allclose(PatchStore(url).stats.std, good["std"], rtol=1e-12)


def test_export_wds_cli(root, tmp_path, capsys):
    assert main(["export-wds", st.store_url(root, "enmap", "L2"), "--out", str(tmp_path / "w"), "--no-progress"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["samples"] == 6 and len(res["shards"]) == 1


@pytest.mark.parametrize("argv", [["inspect", "{tmp}/nothing"], ["stats", "{tmp}/nothing.zarr"],
                                  ["export-wds", "{tmp}/nothing.zarr", "--out", "{tmp}/w"]])
def test_missing_store_is_a_clear_error(tmp_path, capsys, argv):
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nothing" in err


# ---------------------------------------------------------------- ingest from real-format files
def _products(tmp_path):
    formats = pytest.importorskip("data_prep.formats")
    from data_prep.registry import get_sensor

    s = get_sensor("aviris-ng")
    cube = make_cube(rows=40, cols=40, sensor="aviris-ng") * 10  # radiance-like
    d = tmp_path / "in"
    d.mkdir()
    p = formats.write_product(d, sensor="aviris-ng", level="L1", cube=cube, wavelengths_nm=s.wavelengths_nm,
                              fwhm_nm=s.fwhm_nm)
    return d, p, cube


def test_ingest_cli_from_files_parallel_equals_serial_and_rerun(tmp_path, capsys):
    d, _, _ = _products(tmp_path)
    out = str(tmp_path / "root")
    assert main(["ingest", str(d), "--out", out, "--patch-size", "16", "--workers", "2", "--json",
                 "--no-progress"]) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["granules_added"] == 1 and first["patches_added"] >= 1
    assert main(["ingest", str(d), "--out", out, "--patch-size", "16", "--json", "--no-progress"]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["granules_skipped"] == 1 and again["patches_added"] == 0
    serial = str(tmp_path / "serial")
    assert main(["ingest", str(d), "--out", serial, "--patch-size", "16", "--no-progress"]) == 0
    a, b = PatchStore(st.store_url(out, "aviris-ng", "L1")), PatchStore(st.store_url(serial, "aviris-ng", "L1"))
    np.testing.assert_array_equal(a.patches[:], b.patches[:])
    assert a.attrs["stats"] == b.attrs["stats"]


def test_ingest_cli_unwritable_output(tmp_path, capsys):
    d, _, _ = _products(tmp_path)
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    assert main(["ingest", str(d), "--out", str(blocker), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(blocker) in err and blocker.read_text() == "x"


def test_ingest_cli_missing_input(tmp_path, capsys):
    pytest.importorskip("data_prep.formats")
    assert main(["ingest", str(tmp_path / "nope"), "--out", str(tmp_path / "root"), "--no-progress"]) == 2
    assert "error: " in capsys.readouterr().err and not (tmp_path / "root").exists()


def test_ingest_the_real_aviris_ng_cube(real_data, tmp_path, capsys):
    from data_prep.formats import open_product

    hdr = real_data / "ang20170323t202244_rdn_7000-7010.hdr"
    out = str(tmp_path / "root")
    assert main(["ingest", str(hdr), "--out", out, "--patch-size", "8", "--json", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["patches_added"] == 1  # 10x10: one 8x8 kept
    s = PatchStore(st.store_url(out, "aviris-ng", "L1"))
    g = open_product(hdr)
    cube, valid = g.read_rows(0, 8)
    np.testing.assert_array_equal(s.read(0)[0], np.clip(cube[:, :, :8], -1.0, 80.0).astype(np.float16))
    assert s.read(0)[1].all() and s.meta("valid_fraction")[0] == 1.0
    assert s.meta("lat")[0] == g.lat[4, 4] and s.meta("lon")[0] == g.lon[4, 4]
    ref = cube[:, :, :8].astype(np.float16).astype(np.float64)
    np.testing.assert_allclose(s.stats.mean[50], ref[50].mean(), rtol=1e-12)
    assert s.attrs["granules"]["ang20170323t202244_rdn_7000-7010"]["source"] == str(hdr)


def test_ingest_cli_stops_on_a_truncated_product_and_writes_nothing(tmp_path, capsys):
    d, hdr, _ = _products(tmp_path)
    data = hdr.with_suffix("")
    assert data.exists()
    data.write_bytes(data.read_bytes()[:1000])  # truncated ENVI binary
    out = tmp_path / "root"
    assert main(["ingest", str(d), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and hdr.stem in err
    assert not out.exists()


# ---------------------------------------------------------------- damaged stores: verify, repair, stats, inspect
def _two_products(tmp_path):
    formats = pytest.importorskip("data_prep.formats")
    d = tmp_path / "in"
    for k in range(2):
        formats.write_product(d, sensor="aviris-ng", level="L1", name=f"ang2020010{k}t000000_rdn",
                              cube=make_cube(rows=32, cols=32, sensor="aviris-ng", seed=10 + k) * 10)
    return d


def _shard(url, array, i):
    return Path(url, array, "c", str(i), *(["0"] * (3 if array == "patches" else 2)))


def test_verify_repair_rewrites_damaged_granules_from_their_products(tmp_path, capsys):
    d = _two_products(tmp_path)
    out, ref = str(tmp_path / "root"), str(tmp_path / "ref")
    for r in (out, ref):
        assert main(["ingest", str(d), "--out", r, "--patch-size", "16", "--no-progress"]) == 0
    url = st.store_url(out, "aviris-ng", "L1")
    assert main(["verify", url]) == 0 and "whole" in capsys.readouterr().out
    _shard(url, "patches", 1).unlink()  # granule 0
    f = _shard(url, "valid", 6)  # granule 1
    f.write_bytes(f.read_bytes()[:10])
    Path(url, "meta", "gsd", "c", "0").unlink()
    # one product given: its granule is rewritten, the other is reported as not given
    assert main(["verify", url, "--json", "--repair", str(d / "ang20200100t000000_rdn.hdr")]) == 1
    rep = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rep["repair"]["before"] == {"missing": [1], "corrupt": [6], "nan": []}
    assert rep["repair"]["repaired"] == ["ang20200100t000000_rdn"] and rep["corrupt"] == [6]
    assert [n["granule"] for n in rep["repair"]["not_given"]] == ["ang20200101t000000_rdn"]
    assert main(["verify", url, "--repair", str(d)]) == 0
    assert "whole" in capsys.readouterr().out
    a, b = PatchStore(url), PatchStore(st.store_url(ref, "aviris-ng", "L1"))
    np.testing.assert_array_equal(a.read_range(0, 8)[0], b.read_range(0, 8)[0])
    np.testing.assert_array_equal(a.read_range(0, 8)[1], b.read_range(0, 8)[1])
    for k in st.META_FIELDS:
        np.testing.assert_array_equal(a.meta(k), b.meta(k))
    assert a.attrs["stats"] == b.attrs["stats"] and a.attrs["granules"] == b.attrs["granules"]


def test_verify_repair_refuses_another_product(tmp_path, capsys):
    formats = pytest.importorskip("data_prep.formats")
    d = _two_products(tmp_path)
    out = str(tmp_path / "root")
    assert main(["ingest", str(d), "--out", out, "--patch-size", "16", "--no-progress"]) == 0
    url = st.store_url(out, "aviris-ng", "L1")
    _shard(url, "patches", 0).unlink()
    other = tmp_path / "other"  # same name (granule id), other pixels
    formats.write_product(other, sensor="aviris-ng", level="L1", name="ang20200100t000000_rdn",
                          cube=make_cube(rows=32, cols=32, sensor="aviris-ng", seed=99) * 10)
    before = PatchStore(url).read(1)[0]
    assert main(["verify", url, "--repair", str(other)]) == 2
    assert "differs from the stored one" in capsys.readouterr().err
    np.testing.assert_array_equal(PatchStore(url).read(1)[0], before)


def test_stats_dry_run_on_a_corrupt_store_is_a_clear_error(root, capsys):
    url = st.store_url(root, "enmap", "L2")
    f = _shard(url, "patches", 3)
    f.write_bytes(np.random.default_rng(0).integers(0, 256, f.stat().st_size, dtype=np.uint8).tobytes())
    for extra in ([], ["--dry-run"]):
        assert main(["stats", url, "--no-progress", *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "patch 3: failed to read" in err and "verify" in err
        assert "Traceback" not in err and "cannot schedule" not in err


def test_inspect_warns_when_shard_objects_are_missing(root, capsys):
    url = st.store_url(root, "enmap", "L2")
    assert main(["inspect", url]) == 0 and "warning" not in capsys.readouterr().err
    _shard(url, "patches", 2).unlink()
    assert main(["inspect", url, "--json"]) == 0
    cap = capsys.readouterr()
    d = json.loads(cap.out.strip().splitlines()[-1])["stores"][0]
    assert d["shard_objects"] == {"patches": 5, "valid": 6} and d["missing_objects"] == {"patches": [2]}
    assert "warning: " in cap.err and "5 shard objects for 6 committed patches: 1 missing (patches [2])" in cap.err

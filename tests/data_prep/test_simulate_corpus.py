"""simulate_corpus end to end: products, sidecars, manifest, determinism, change and fusion pairs, CLI."""

import json
from pathlib import Path

import numpy as np
import pytest

from data_prep.registry import get_sensor
from data_prep.simulate.corpus import HYPERSPECTRAL, MATERIALS_PER_SCENE, plan, render_job, simulate_corpus
from data_prep.simulate.library import load_library, split_materials
from data_prep.simulate.render import raster_blocks
from data_prep.simulate.srf import sensor_srf

ARGS = dict(sensors=HYPERSPECTRAL, levels=("L1", "L2"), scenes=1, size=24, seed=3, progress=False)


def _formats():
    try:
        import data_prep.formats as f
        return f if hasattr(f, "open_product") else None
    except ImportError:
        return None


def _read(path: Path) -> np.ndarray:
    """Cube (bands, rows, cols) with NaN nodata, through data_prep.formats when it exists."""
    f = _formats()
    if f is not None:
        g = f.open_product(path)
        return g.read_rows(0, g.n_rows)[0]
    import spectral

    c = np.asarray(spectral.open_image(str(path)).load(), dtype=np.float32).transpose(2, 0, 1)
    return np.where(c == -9999.0, np.nan, c)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, real_data):
    out = tmp_path_factory.mktemp("corpus")
    manifest = simulate_corpus(out, **ARGS)
    return out, json.loads(manifest.read_text())


@pytest.fixture(scope="module")
def materials(real_data):
    lib = load_library()
    sel = split_materials(lib, "pretrain")  # the corpus's default pool
    return lib.spectra[sel], [lib.classes[i] for i in sel]


def _jobs(classes):
    return plan(sensors=ARGS["sensors"], levels=ARGS["levels"], scenes=1, size=ARGS["size"], lines=None,
                seed=ARGS["seed"], change_pairs=True, fusion=True, ratio=3, material_classes=classes,
                materials_per_scene=MATERIALS_PER_SCENE)


def test_manifest_lists_every_product(corpus):
    out, m = corpus
    prods = m["products"]
    roles = [p["role"] for p in prods]
    assert roles.count("scene") == 12 and roles.count("change_t1") == 1 and roles.count("change_t2") == 1
    assert roles.count("fusion_hs") == 2 and roles.count("fusion_ms") == 2
    assert {(p["sensor"], p["level"]) for p in prods if p["role"] == "scene"} == {
        (s, lv) for s in HYPERSPECTRAL for lv in ("L1", "L2")}
    assert m["seed"] == 3 and len(m["materials"]) >= 10
    by_scene = {p["scene"]: p for p in prods if p["pair"]}
    for p in prods:
        assert (out / p["path"]).exists(), p["path"]
        side = np.load(out / p["materials"])
        assert side["labels"].dtype == np.int16
        assert list(side["names"]) == m["materials"]
        assert side["labels"].max() < len(m["materials"]) and side["labels"].min() >= -1
        if p["pair"]:
            assert by_scene[p["pair"]]["pair"] == p["scene"]
        if p["role"].startswith("fusion"):
            assert p["ratio"] == 3
    fus = {(p["sensor"], p["role"]) for p in prods if p["role"].startswith("fusion")}
    assert fus == {("emit", "fusion_hs"), ("planetscope", "fusion_ms"), ("enmap", "fusion_hs"),
                   ("sentinel-2", "fusion_ms")}
    # nothing but products, sidecars and the manifest is left behind
    assert not [q for q in out.iterdir() if q.name.startswith(".")]


def test_products_reopen_with_their_material_map(corpus):
    out, m = corpus
    for p in m["products"]:
        cube = _read(out / p["path"])
        labels = np.load(out / p["materials"])["labels"]
        s = get_sensor(p["sensor"])
        rows = ARGS["size"] * (3 if p["role"] == "fusion_ms" else 1)
        assert cube.shape == (s.n_bands, rows, rows) == (s.n_bands, *labels.shape)
        filled = np.isnan(cube).all(axis=(1, 2))  # the product's no-data bands (EnMAP L2A: six near 1.4 um)
        assert filled.sum() == (6 if (p["sensor"], p["level"]) == ("enmap", "L2") else 0), p["path"]
        nodata = np.isnan(cube[~filled]).all(axis=0)
        np.testing.assert_array_equal(nodata, labels < 0)
        assert np.isfinite(cube[~filled][:, ~nodata]).all()
        if _formats() is not None:
            g = _formats().open_product(out / p["path"])
            assert (g.sensor, g.level) == (p["sensor"], p["level"])
            np.testing.assert_allclose(g.wavelengths_nm, s.wavelengths_nm, atol=0.01)


def test_same_seed_same_bytes_and_other_seed_differs(corpus, tmp_path):
    out, m = corpus
    again = tmp_path / "again"
    simulate_corpus(again, **ARGS)
    files = sorted(q.relative_to(out) for q in out.rglob("*") if q.is_file())
    assert files == sorted(q.relative_to(again) for q in again.rglob("*") if q.is_file())
    for f in files:
        if f.suffix.lower() in (".hdr", ".xml", ".json", ".npz", "") or f.suffix.lower() in (".tif", ".nc"):
            a, b = (out / f).read_bytes(), (again / f).read_bytes()
            if f.suffix.lower() == ".nc" and a != b:  # HDF5 may stamp object times: compare the cube
                np.testing.assert_array_equal(_read(out / f), _read(again / f))
            else:
                assert a == b, f
    other = tmp_path / "other"
    simulate_corpus(other, **{**ARGS, "seed": 4, "sensors": ("aviris-ng",), "levels": ("L2",)})
    mo = json.loads((other / "manifest.json").read_text())
    pa = next(p for p in m["products"] if p["role"] == "scene" and p["sensor"] == "aviris-ng" and p["level"] == "L2")
    pb = next(p for p in mo["products"] if p["role"] == "scene")
    assert not np.array_equal(_read(out / pa["path"]), _read(other / pb["path"]), equal_nan=True)


def test_change_map_marks_exactly_the_swapped_regions(corpus, materials):
    out, m = corpus
    spectra, classes = materials
    t2 = next(j for j in _jobs(classes) if j.role == "change_t2")
    p1 = next(p for p in m["products"] if p["role"] == "change_t1")
    p2 = next(p for p in m["products"] if p["role"] == "change_t2")
    assert p2["scene"] == t2.scene_id and p1["pair"] == p2["scene"]
    side = np.load(out / p2["materials"])
    k = t2.scene.material_count(len(classes))
    region = np.concatenate([b.region for b in raster_blocks(t2.scene, k, t2.rows, t2.cols)])
    valid = side["labels"] >= 0
    expected = np.isin(region, t2.change) & valid
    np.testing.assert_array_equal(side["change"], expected)
    assert 0 < expected.sum() < valid.sum()
    l1 = np.load(out / p1["materials"])["labels"]
    np.testing.assert_array_equal(l1[~expected], side["labels"][~expected])
    assert (l1[expected] != side["labels"][expected]).all()
    # the spectra change where the map says so, and only by noise elsewhere
    c1, c2 = _read(out / p1["path"]), _read(out / p2["path"])
    d = np.abs(c1 - c2)[:, valid].mean(axis=0)
    assert np.median(d[expected[valid]]) > 3 * np.median(d[~expected[valid]])


def test_fusion_ms_is_srf_of_the_high_resolution_scene(materials):
    spectra, classes = materials
    jobs = _jobs(classes)
    for hs_name, ms_name in (("emit", "planetscope"), ("enmap", "sentinel-2")):
        hs = next(j for j in jobs if j.role == "fusion_hs" and j.sensor == hs_name)
        ms = next(j for j in jobs if j.role == "fusion_ms" and j.sensor == ms_name)
        assert ms.pair == hs.scene_id and (ms.rows, ms.cols) == (3 * hs.rows, 3 * hs.cols)
        assert ms.gsd_m == pytest.approx(hs.gsd_m / 3)
        ms_cube, _, ms_valid = render_job(ms, spectra, ARGS["seed"], noise=False)
        hs_cube, _, hs_valid = render_job(hs, spectra, ARGS["seed"], noise=False)
        k = ms.scene.material_count(len(classes))
        eff = np.concatenate([b.eff for b in raster_blocks(ms.scene, k, ms.rows, ms.cols)], axis=1)
        fine = np.einsum("kg,kij->gij", ms.scene.spectra_of(spectra), eff)  # 1 nm high-resolution reflectance
        expect_ms = np.einsum("bg,gij->bij", sensor_srf(get_sensor(ms_name)), fine)
        np.testing.assert_allclose(ms_cube[:, ms_valid], expect_ms[:, ms_valid], atol=2e-5)
        g = fine.shape[0]
        coarse = fine.reshape(g, hs.rows, 3, hs.cols, 3).mean(axis=(2, 4))
        expect_hs = np.einsum("bg,gij->bij", sensor_srf(get_sensor(hs_name)), coarse)
        np.testing.assert_allclose(hs_cube[:, hs_valid], expect_hs[:, hs_valid], atol=2e-5)
        np.testing.assert_array_equal(ms_valid, np.repeat(np.repeat(hs_valid, 3, 0), 3, 1))


def test_cli_runs_and_rejects_bad_input(tmp_path, capsys, real_data):
    from data_prep.cli import main

    rc = main(["simulate", "--out", str(tmp_path / "c"), "--sensors", "desis", "--levels", "L2", "--size", "16",
               "--no-progress", "--seed", "1"])
    assert rc == 0
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert [p["sensor"] for p in m["products"]] == ["desis", "desis", "desis"]  # scene + change pair
    assert main(["simulate", "--out", str(tmp_path / "d"), "--sensors", "hyperion", "--no-progress"]) == 2
    assert "hyperion" in capsys.readouterr().err
    assert main(["simulate", "--out", str(tmp_path / "e"), "--sensors", "planetscope", "--levels", "L1",
                 "--no-progress"]) == 2
    assert "L1" in capsys.readouterr().err
    assert main(["simulate", "--out", str(tmp_path / "f"), "--size", "4", "--no-progress"]) == 2
    assert not (tmp_path / "e").exists() and not (tmp_path / "f").exists()  # nothing written


def test_flightline_lines_option(tmp_path, real_data):
    man = simulate_corpus(tmp_path, sensors=("aviris-classic",), levels=("L1",), size=16, lines=80,
                          change_pairs=False, fusion=False, progress=False)
    m = json.loads(man.read_text())
    (p,) = m["products"]
    assert np.load(tmp_path / p["materials"])["labels"].shape == (80, 16)
    assert _read(tmp_path / p["path"]).shape == (224, 80, 16)


def test_written_values_match_the_rendered_cube(corpus, materials):
    """Each format round-trips the simulator's cube (to the format's quantisation)."""
    if _formats() is None:
        pytest.skip("data_prep.formats not available")
    out, m = corpus
    spectra, classes = materials
    jobs = {(j.scene_id, j.sensor, j.level): j for j in _jobs(classes)}
    picks = {("aviris-ng", "L1"), ("emit", "L2"), ("enmap", "L2"), ("desis", "L1"), ("planetscope", "L2")}
    seen = set()
    for p in m["products"]:
        if (p["sensor"], p["level"]) not in picks or (p["sensor"], p["level"]) in seen:
            continue
        seen.add((p["sensor"], p["level"]))
        expect, _, valid = render_job(jobs[(p["scene"], p["sensor"], p["level"])], spectra, ARGS["seed"])
        got = _read(out / p["path"])
        scale = get_sensor(p["sensor"]).level(p["level"]).scale_factor
        kept = ~np.isnan(got).all(axis=(1, 2))  # EnMAP L2A's no-data bands hold no values
        np.testing.assert_allclose(got[kept][:, valid], expect[kept][:, valid], rtol=1e-3, atol=scale,
                                   err_msg=p["path"])
    assert seen == picks

"""The real product layouts (REAL_FORMATS.md), folders as downloaded, written by tests/data_prep/fixtures (not by
data_prep): the readers find the physical values, band tables, validity, lat/lon, GSD and time the fixtures put
there, and ``python -m data_prep ingest FOLDER`` writes stores that an independent checker (zarr + the fixture's own
arrays) finds equal to them at float16 precision, with nodata kept out and every sidecar listed, not ingested."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import zarr

from data_prep.formats import discover, open_product
from tests.data_prep.fixtures.real_layouts import LAYOUTS, Expect

P = 8  # patch size: 20 x 18 pixel products give 3 x 3 patches


@pytest.fixture(scope="module")
def layouts(tmp_path_factory, real_data):
    root = tmp_path_factory.mktemp("real-layouts")
    return root, {kind: fn(root) for kind, fn in LAYOUTS.items()}


def _opened(found, e: Expect):
    for p in found.products:
        if Path(p).name.startswith(e.granule_id) or (Path(p).stem == e.granule_id):
            return open_product(p, found.formats[p])
    raise AssertionError(f"{e.granule_id} not found among {[Path(p).name for p in found.products]}")


@pytest.mark.parametrize("kind", sorted(LAYOUTS))
def test_readers_find_what_the_fixtures_wrote(layouts, kind):
    root, exps = layouts[0], layouts[1][kind]
    with discover([root / kind]) as found:
        assert len(found.products) == len(exps), [str(p) for p in found.products]
        for e in exps:
            g = _opened(found, e)
            assert (g.sensor, g.level, g.granule_id) == (e.sensor, e.level, e.granule_id)
            assert g.shape == e.cube.shape
            np.testing.assert_allclose(g.wavelengths_nm, e.wavelengths, atol=1e-3)
            np.testing.assert_allclose(g.fwhm_nm, e.fwhm, atol=1e-3)
            assert not g.good_bands[e.flagged].any()
            assert g.good_bands[(e.wavelengths > 450) & (e.wavelengths < 900) & ~e.flagged].all()
            assert g.acquisition_time == e.time
            assert g.gsd_m == pytest.approx(e.gsd_m, rel=1e-2 if g.extra.get("loc_file") or kind == "emit" else 1e-6)
            np.testing.assert_allclose(g.lat, e.lat, atol=1e-7)
            np.testing.assert_allclose(g.lon, e.lon, atol=1e-7)
            assert -90 <= g.lat.min() and g.lat.max() <= 90  # degrees, never metres
            cube, valid = g.read_rows(0, g.n_rows)
            np.testing.assert_array_equal(valid, e.valid)
            ok = np.isfinite(e.cube)
            np.testing.assert_array_equal(np.isnan(cube), ~ok)
            np.testing.assert_allclose(cube[ok], e.cube[ok], rtol=1e-6, atol=1e-6)
        lines = found.summary_lines()
    for e in exps:
        for what in e.sidecars:
            assert any(what in line for line in lines), (what, lines)
    assert not any("other (not a product)" in line for line in lines), lines


def check_stores(out: Path, exps: list[Expect]) -> int:
    """Independent of data_prep: open the stores with zarr and compare every patch with the fixture's arrays."""
    checked = 0
    by_id = {e.granule_id: e for e in exps}
    for url in sorted(out.glob("*.zarr")):
        g = zarr.open_group(str(url), mode="r")
        a = dict(g.attrs)
        n = int(a["n_patches"])
        gid = np.asarray(g["meta/granule"][:n])
        rows, cols = np.asarray(g["meta/row"][:n]), np.asarray(g["meta/col"][:n])
        good = np.asarray(a["good_bands"], dtype=bool)
        for k, (name, entry) in enumerate(a["granules"].items()):
            e = by_id[name]
            assert (a["sensor"], a["level"]) == (e.sensor, e.level)
            if "wavelengths_nm" in entry:  # its own centres, kept because they differ from the store's table
                np.testing.assert_allclose(entry["wavelengths_nm"], e.wavelengths, atol=1e-3)
            else:
                np.testing.assert_allclose(a["wavelengths_nm"], e.wavelengths, atol=2.0)
            assert not good[e.flagged].any(), name
            idx = np.flatnonzero(gid == k)
            assert idx.size >= 4 and idx.size == entry["count"], (name, idx.size)
            b, h, w = e.cube.shape
            for i in idx:
                r0, c0 = int(rows[i]), int(cols[i])
                exp = np.full((b, P, P), np.nan)
                expv = np.zeros((P, P), bool)
                exp[:, : min(P, h - r0), : min(P, w - c0)] = e.cube[:, r0:r0 + P, c0:c0 + P]
                expv[: min(P, h - r0), : min(P, w - c0)] = e.valid[r0:r0 + P, c0:c0 + P]
                px = np.asarray(g["patches"][i], dtype=np.float64)
                np.testing.assert_array_equal(np.asarray(g["valid"][i]), expv, err_msg=f"{name} patch {i}")
                assert (px[:, ~expv] == 0).all()  # nodata kept out: invalid pixels hold 0
                empty = np.isnan(e.cube).all(axis=(1, 2))  # the product's no-data bands
                got, want = px[~empty][:, expv], exp[~empty][:, expv]
                assert np.isfinite(want).all()
                np.testing.assert_allclose(got, want, rtol=2.0**-10, atol=1e-6, err_msg=f"{name} patch {i}")
                assert (px[empty] == 0).all()  # a no-data band stores no values
                cy, cx = min(r0 + P // 2, h - 1), min(c0 + P // 2, w - 1)
                assert g["meta/lat"][i] == pytest.approx(e.lat[cy, cx], abs=1e-7)
                assert g["meta/lon"][i] == pytest.approx(e.lon[cy, cx], abs=1e-7)
                assert int(g["meta/time"][i]) == int(e.time.timestamp())
                assert float(g["meta/gsd"][i]) == pytest.approx(e.gsd_m, rel=1e-2)
                checked += 1
    return checked


@pytest.mark.parametrize("kind", sorted(LAYOUTS))
def test_ingest_of_a_folder_as_downloaded_equals_the_files(layouts, kind, tmp_path, capsys):
    from data_prep.cli import main

    root, exps = layouts[0], layouts[1][kind]
    out = tmp_path / "stores"
    rc = main(["ingest", str(root / kind), "--out", str(out), "--patch-size", str(P), "--max-invalid", "0.9",
               "--no-progress", "--json"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and summary["granules_added"] == len(exps) and not summary["failed"]
    want = Counter()
    for e in exps:
        want.update(e.sidecars)
    for what, n in want.items():  # one line per kind: "skipped N <kind> file(s): ..."
        line = next((x for x in summary["skipped"] if what in x), None)
        assert line is not None and line.split()[1] == str(n), (what, n, summary["skipped"])
    assert check_stores(out, exps) >= 4 * len(exps)
    if kind == "aviris-classic":  # two flights whose calibrations differ by 2.7 nm: the second keeps its table
        a = dict(zarr.open_group(str(out / "aviris-classic_L1.zarr"), mode="r").attrs)
        assert ["wavelengths_nm" in v for v in a["granules"].values()] == [False, True]
    if kind in ("enmap", "aviris-classic"):  # .ZIP / .tar.gz as downloaded: the member is the source
        sources = [v["source"] for url in out.glob("*.zarr")
                   for v in dict(zarr.open_group(str(url), mode="r").attrs)["granules"].values()]
        assert any((".ZIP/" in s or ".tar.gz/" in s) for s in sources), sources


def test_compressed_pixel_interleaved_tiff_is_read_by_windows(tmp_path):
    """A deflate pixel-interleaved TIFF (DESIS) read a few rows at a time decodes only those rows' strips: the
    read's peak memory is a small fraction of the whole decoded image (never the whole image per strip)."""
    import tracemalloc

    import tifffile

    from data_prep.formats._geotiff import GeoTiff

    rng = np.random.default_rng(0)
    img = rng.integers(0, 10000, (400, 60, 235), dtype=np.int16)  # rows, cols, bands: 11 MB decoded
    path = tmp_path / "x-SPECTRAL_IMAGE.tif"
    tifffile.imwrite(path, img, photometric="minisblack", planarconfig="contig", compression="zlib", rowsperstrip=1)
    t = GeoTiff(path)
    assert t.shape == (235, 400, 60) and t.compressed and not t.planar_separate
    tracemalloc.start()
    block = t.rows(200, 204)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    np.testing.assert_array_equal(block, img[200:204].transpose(2, 0, 1))
    assert peak < img.nbytes / 20, (peak, img.nbytes)
    tiled = tmp_path / "y-SPECTRAL_IMAGE_COG.TIF"
    tifffile.imwrite(tiled, img, photometric="minisblack", planarconfig="contig", compression="zlib", tile=(32, 32))
    t = GeoTiff(tiled)
    got = np.concatenate([t.rows(r, min(r + 24, 400)) for r in range(0, 400, 24)], axis=1)
    np.testing.assert_array_equal(got, img.transpose(2, 0, 1))

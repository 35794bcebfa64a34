"""Ingest core on in-memory granules: round trip, idempotence, interruption, memory://, workers, shards, bad input."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest

from data_prep import store as st
from data_prep.granule import Granule, ProductError
from data_prep.ingest import in_shard, ingest_granules, parse_shard
from data_prep.registry import get_sensor
from data_prep.store import PatchStore, StoreError

SENSOR = "enmap"  # 224 bands, L2 clip [-0.05, 1.5]


class ArrayReader:
    """Picklable read_rows over an in-memory cube (NaN = nodata), counting the rows it was asked for."""

    def __init__(self, cube: np.ndarray, valid: np.ndarray | None = None):
        self.cube = cube
        self.valid = valid
        self.max_rows = 0

    def __call__(self, r0: int, r1: int):
        self.max_rows = max(self.max_rows, r1 - r0)
        c = self.cube[:, r0:r1].copy()
        v = np.isfinite(c).all(axis=0) if self.valid is None else self.valid[r0:r1].copy()
        return c, v


def make_cube(rows=80, cols=72, sensor=SENSOR, seed=0, lo=-0.1, hi=1.7):
    n = get_sensor(sensor).n_bands
    rng = np.random.default_rng(seed)
    base = rng.uniform(0.05, 0.6, size=(n, 1, 1)).astype(np.float32)
    cube = (base + rng.normal(0, 0.15, size=(n, rows, cols))).astype(np.float32)
    cube[:, :2, :2] = hi  # some values beyond the clip range
    cube[:, -1, -1] = lo
    return cube


def make_granule(cube, gid="g0", sensor=SENSOR, level="L2", valid=None, path=None, lat=True) -> Granule:
    s = get_sensor(sensor)
    _, rows, cols = cube.shape
    yy, xx = np.mgrid[0:rows, 0:cols]
    return Granule(path=path or f"/archive/{gid}.tif", granule_id=gid, sensor=sensor, level=level, shape=cube.shape,
                   wavelengths_nm=s.wavelengths_nm, fwhm_nm=s.fwhm_nm, good_bands=s.good_band_mask(),
                   read_rows=ArrayReader(cube, valid), gsd_m=30.0,
                   acquisition_time=dt.datetime(2024, 5, 1, 10, 30, tzinfo=dt.UTC),
                   lat=(45.0 + yy * 1e-4) if lat else None, lon=(7.0 + xx * 1e-4) if lat else None)


def expected_patches(cube, p, good, clip, max_invalid=0.2):
    """Reference tiling written plainly (whole cube in memory)."""
    nb, rows, cols = cube.shape
    out = []
    for r0 in range(0, rows, p):
        for c0 in range(0, cols, p):
            x = np.zeros((nb, p, p), np.float32)
            v = np.zeros((p, p), bool)
            blk = cube[:, r0:r0 + p, c0:c0 + p]
            h, w = blk.shape[1:]
            x[:, :h, :w] = blk
            v[:h, :w] = np.isfinite(blk[good]).all(axis=0)
            x = np.clip(np.nan_to_num(x, nan=0.0), *clip)
            x[:, ~v] = 0
            if v.any() and 1 - v.mean() <= max_invalid:
                out.append((r0, c0, x.astype(np.float16), v))
    return out


def committed_view(url):
    s = PatchStore(url)
    return s.n_patches, dict(s.attrs["granules"]), s.attrs.get("stats")


def test_round_trip_equals_clipped_input_with_metadata(tmp_path):
    cube = make_cube(rows=80, cols=72)
    cube[:, 0:20, 40:] = np.nan  # nodata corner: patch (0, 32) is 50% invalid -> dropped
    cube[5, 50, 10] = np.nan  # one good band NaN -> that pixel invalid
    g = make_granule(cube)
    res = ingest_granules([g], str(tmp_path), patch_size=32, progress=False)
    url = st.store_url(str(tmp_path), SENSOR, "L2")
    s = PatchStore(url)
    ref = expected_patches(cube, 32, s.good_bands, (-0.05, 1.5))
    assert res["patches_added"] == len(ref) == s.n_patches
    assert (0, 32) not in [(r, c) for r, c, _, _ in ref]
    for i, (r0, c0, x, v) in enumerate(ref):
        px, val = s.read(i)
        np.testing.assert_array_equal(px, x)
        np.testing.assert_array_equal(val, v)
        assert (s.meta("row")[i], s.meta("col")[i]) == (r0, c0)
    assert float(s.patches[:].max()) <= 1.5 and float(s.patches[:].min()) >= -0.05
    assert s.meta("lat")[0] == pytest.approx(45.0 + 16e-4) and s.meta("lon")[0] == pytest.approx(7.0 + 16e-4)
    assert s.meta("time")[0] == int(dt.datetime(2024, 5, 1, 10, 30, tzinfo=dt.UTC).timestamp())
    np.testing.assert_allclose(s.meta("valid_fraction"), [v.mean() for *_, v in ref], rtol=1e-6)
    assert s.attrs["granules"]["g0"] == {"start": 0, "count": len(ref), "source": g.path, "max_invalid": 0.2}
    assert g.read_rows.max_rows <= 32  # read a strip at a time, never the whole granule


def test_drop_threshold_is_configurable(tmp_path):
    cube = make_cube(rows=32, cols=64)
    cube[:, :8, :32] = np.nan  # left patch 25% invalid, right patch clean
    n_default = ingest_granules([make_granule(cube)], str(tmp_path / "a"), patch_size=32,
                                progress=False)["patches_added"]
    n_loose = ingest_granules([make_granule(cube)], str(tmp_path / "b"), patch_size=32, max_invalid=0.3,
                              progress=False)["patches_added"]
    assert (n_default, n_loose) == (1, 2)


def test_rerun_is_idempotent_and_adds_only_new_granules():
    url_root = "memory://idem"
    g0, g1 = make_granule(make_cube(seed=1), "g0"), make_granule(make_cube(seed=2), "g1")
    ingest_granules([g0], url_root, patch_size=32, progress=False)
    url = st.store_url(url_root, SENSOR, "L2")
    n0, man0, stats0 = committed_view(url)
    res = ingest_granules([g0, g1, g0], url_root, patch_size=32, progress=False)
    assert res["granules_skipped"] == 2 and res["granules_added"] == 1
    n1, man1, _ = committed_view(url)
    assert n1 == 2 * n0 and list(man1) == ["g0", "g1"] and man1["g0"] == man0["g0"]
    res = ingest_granules([g0, g1], url_root, patch_size=32, progress=False)
    assert res["patches_added"] == 0 and committed_view(url)[:2] == (n1, man1)
    assert PatchStore(url).meta("granule").tolist() == [0] * n0 + [1] * n0
    assert stats0 is not None


class Crash(BaseException):
    """Stands in for a kill: nothing in ingest may catch it."""


def test_interrupted_granule_leaves_no_visible_patches_and_rerun_completes(tmp_path, monkeypatch):
    root = str(tmp_path)
    g0 = make_granule(make_cube(seed=3), "g0")
    cube1 = make_cube(seed=4)
    ingest_granules([g0], root, patch_size=32, progress=False)
    url = st.store_url(root, SENSOR, "L2")
    before = committed_view(url)

    # a hard kill: patches of g1 written, no commit, no rollback
    def crash(*a, **k):
        raise Crash()

    monkeypatch.setattr(st.StoreWriter, "commit", crash)
    monkeypatch.setattr(st.StoreWriter, "rollback", lambda w: None)
    with pytest.raises(Crash):
        ingest_granules([g0, make_granule(cube1, "g1")], root, patch_size=32, progress=False)
    monkeypatch.undo()
    s = PatchStore(url)
    assert s.patches.shape[0] > s.n_patches  # the tail is there...
    assert committed_view(url) == before  # ...but invisible
    with pytest.raises(IndexError):
        s.read(s.n_patches)

    res = ingest_granules([g0, make_granule(cube1, "g1")], root, patch_size=32, progress=False)
    assert res["granules_added"] == 1 and res["granules_skipped"] == 1
    s = PatchStore(url)
    ref = expected_patches(cube1, 32, s.good_bands, (-0.05, 1.5))
    assert s.n_patches == before[0] + len(ref) == s.patches.shape[0]
    np.testing.assert_array_equal(s.read(before[0])[0], ref[0][2])


def test_workers_give_the_same_store_as_serial(tmp_path):
    gs = [make_granule(make_cube(rows=64, cols=64, seed=k), f"g{k}") for k in range(3)]
    ingest_granules(gs, str(tmp_path / "serial"), patch_size=32, progress=False)
    ingest_granules(gs, str(tmp_path / "par"), patch_size=32, workers=2, progress=False)
    a = PatchStore(st.store_url(str(tmp_path / "serial"), SENSOR, "L2"))
    b = PatchStore(st.store_url(str(tmp_path / "par"), SENSOR, "L2"))
    assert a.n_patches == b.n_patches == 12 and a.attrs["granules"] == b.attrs["granules"]
    np.testing.assert_array_equal(a.patches[:], b.patches[:])
    np.testing.assert_array_equal(a.stats.mean, b.stats.mean)


def test_shards_partition_the_granules():
    assert parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "x/2", "1"):
        with pytest.raises(ValueError):
            parse_shard(bad)
    ids = [f"ang2017{k:04d}" for k in range(200)]
    parts = [[i for i in ids if in_shard(i, (k, 3))] for k in range(3)]
    assert sorted(sum(parts, [])) == sorted(ids) and all(len(p) > 40 for p in parts)
    gs = [make_granule(make_cube(rows=32, cols=32, seed=k), f"g{k}") for k in range(6)]
    got = [ingest_granules(gs, "memory://shards", patch_size=32, shard=f"{k}/2", progress=False)["granules_added"]
           for k in range(2)]
    assert sum(got) == 6 and min(got) > 0


def test_store_layout_is_chosen_for_the_loader_reads(tmp_path):
    ingest_granules([make_granule(make_cube(rows=32, cols=32))], str(tmp_path), patch_size=256, max_invalid=1.0,
                    progress=False)
    s = PatchStore(st.store_url(str(tmp_path), SENSOR, "L2"))
    assert s.chunks == (1, 16, 64, 64) and tuple(s.patches.shards) == (1, 224, 256, 256)
    assert s.attrs["read_amplification"] == pytest.approx(1.12)
    # AVIRIS-NG: with the loader's segment reads, 16-band chunks decode 1.30x, 32-band 1.52x: 8-band chunks (1.13)
    ng = get_sensor("aviris-ng").good_band_mask()
    assert st.read_amplification((1, 16, 64, 64), ng, 256) > 1.2 > st.read_amplification((1, 8, 64, 64), ng, 256)
    assert st.choose_chunks(ng, 256)[:2] == (8, 64)
    assert st.choose_chunks(np.ones(8, bool), 256)[:2] == (8, 64)  # multispectral: all bands in one chunk
    assert st.choose_chunks(np.ones(224, bool), 48)[1] == 48  # small patches: one spatial chunk


def test_read_amplification_counts_segments_not_skipped_bad_band_chunks():
    good = np.ones(64, bool)
    good[16:40] = False  # 24 bad bands: band chunks 2-4 (of 8) hold no good band
    sel = np.flatnonzero(good)
    assert [(r0, r1) for _, r0, r1, _ in st.window_segments(sel, 8)] == [(0, 16), (40, 64)]
    # the window is all 40 good bands: 5 chunks of 8 decoded, not the 8 the raw range 0:64 spans
    assert st.read_amplification((1, 8, 8, 8), good, 8, window=40, crop=8) == pytest.approx(1.0)
    assert st.read_amplification((1, 16, 8, 8), good, 8, window=40, crop=8) == pytest.approx(48 / 40)


# ------------------------------------------------------------------ bad input: clear error, store as before
@pytest.fixture
def populated(tmp_path):
    root = str(tmp_path / "root")
    ingest_granules([make_granule(make_cube(seed=9), "good")], root, patch_size=32, progress=False)
    url = st.store_url(root, SENSOR, "L2")
    return root, url, committed_view(url), PatchStore(url).patches.shape


def test_unknown_sensor_names_file_and_field(populated):
    root, url, before, shape = populated
    g = make_granule(make_cube(), "x")
    g.sensor = "hyperion-9"
    with pytest.raises(ProductError, match=r"/archive/x\.tif.*sensor.*hyperion-9"):
        ingest_granules([make_granule(make_cube(seed=5), "ok"), g], root, patch_size=32, progress=False)
    assert committed_view(url) == before  # checked before anything was written


def test_wavelengths_in_micrometres_are_rejected_before_writing(populated):
    root, url, before, _ = populated
    g = make_granule(make_cube(), "um")
    g.wavelengths_nm = g.wavelengths_nm / 1000.0
    with pytest.raises(ProductError, match=r"um\.tif: field wavelengths_nm spans 0.418.*350-2550 nm"):
        ingest_granules([g], root, patch_size=32, progress=False)
    assert committed_view(url) == before


def test_all_nodata_granule_is_an_error_and_rolled_back(populated):
    root, url, before, shape = populated
    cube = np.full((224, 64, 64), np.nan, np.float32)
    with pytest.raises(ProductError, match=r"/archive/empty\.tif.*all-nodata"):
        ingest_granules([make_granule(cube, "empty")], root, patch_size=32, progress=False)
    assert committed_view(url) == before and PatchStore(url).patches.shape == shape
    # a new store is not left behind either
    with pytest.raises(ProductError, match="all-nodata"):
        ingest_granules([make_granule(cube, "empty", level="L1")], root, patch_size=32, progress=False)
    with pytest.raises(StoreError):
        PatchStore(st.store_url(root, SENSOR, "L1"))


def test_infinite_value_in_a_valid_pixel_names_file_band_and_row(populated):
    root, url, before, shape = populated
    cube = make_cube(seed=6)
    cube[30, 70, 5] = np.inf  # row 70: the third strip, after two strips were written
    with pytest.raises(ProductError, match=r"/archive/inf\.tif: band 30 .*infinite.*row 70"):
        ingest_granules([make_granule(cube, "inf", valid=np.ones(cube.shape[1:], bool))], root, patch_size=32,
                        progress=False)
    assert committed_view(url) == before and PatchStore(url).patches.shape == shape


def test_keep_going_skips_the_bad_granule_and_reports_it(populated):
    root, url, before, shape = populated
    bad = make_granule(np.full((224, 32, 32), np.nan, np.float32), "empty")
    res = ingest_granules([bad, make_granule(make_cube(seed=7), "ok")], root, patch_size=32, progress=False,
                          keep_going=True)
    assert [f["granule_id"] for f in res["failed"]] == ["empty"] and res["granules_added"] == 1
    assert list(PatchStore(url).attrs["granules"]) == ["good", "ok"]


def test_unwritable_output_is_a_store_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreError, match="not a directory"):
        ingest_granules([make_granule(make_cube())], str(blocker), patch_size=32, progress=False)
    with pytest.raises(StoreError, match="not writable|not a directory"):
        ingest_granules([make_granule(make_cube())], str(blocker / "sub"), patch_size=32, progress=False)
    assert blocker.read_text() == "not a directory"


def test_mismatched_patch_size_or_bands_for_an_existing_store(populated):
    root, url, before, _ = populated
    with pytest.raises(StoreError, match="patch_size 32"):
        ingest_granules([make_granule(make_cube(), "p64")], root, patch_size=64, progress=False)
    g = make_granule(make_cube()[:200], "fewer")
    g.wavelengths_nm, g.fwhm_nm, g.good_bands = g.wavelengths_nm[:200], g.fwhm_nm[:200], g.good_bands[:200]
    with pytest.raises(ProductError, match=r"fewer\.tif: field wavelengths_nm: 200 bands"):
        ingest_granules([g], root, patch_size=32, progress=False)
    g = make_granule(make_cube(), "reordered")  # e.g. EnMAP in detector order into a sorted store
    g.wavelengths_nm = g.wavelengths_nm[::-1].copy()
    with pytest.raises(ProductError, match=r"reordered\.tif: field wavelengths_nm differs .* more than a calibration"):
        ingest_granules([g], root, patch_size=32, progress=False)
    assert committed_view(url) == before


def test_per_granule_band_centres_and_good_bands_are_kept(populated):
    """A granule whose calibration moved its centres by more than the tolerance keeps its own table in the store
    (per-scene centres win); a band nodata in one granule is no longer a good band of the store."""
    root, url, before, _ = populated
    g = make_granule(make_cube(seed=3), "shifted")
    g.wavelengths_nm = g.wavelengths_nm + 10.0
    g.fwhm_nm = g.fwhm_nm + 1.0
    g.good_bands = g.good_bands.copy()
    g.good_bands[5] = False
    ingest_granules([g], root, patch_size=32, progress=False)
    store = PatchStore(url)
    entry = store.attrs["granules"]["shifted"]
    np.testing.assert_allclose(entry["wavelengths_nm"], g.wavelengths_nm)
    first, mine = 0, entry["start"]
    np.testing.assert_allclose(store.band_table(mine)[0], g.wavelengths_nm)
    np.testing.assert_allclose(store.band_table(mine)[1], g.fwhm_nm)
    np.testing.assert_allclose(store.band_table(first)[0], store.wavelengths_nm)
    assert "wavelengths_nm" not in store.attrs["granules"]["good"]
    assert not store.good_bands[5] and store.good_bands.sum() == get_sensor(SENSOR).good_band_mask().sum() - 1

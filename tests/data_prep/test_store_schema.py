from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec

from data_prep.store import (
    FOOTPRINT_META,
    META_FIELDS,
    NO_TIME,
    SCHEMA_VERSION,
    BandStats,
    CorruptDataError,
    MissingDataError,
    PatchStore,
    StoreError,
    StoreWriter,
    append_patches,
    chunk_layout,
    create_store,
    write_stats,
)


def _store(url, n=3, bands=40, p=64, seed=0):
    rng = np.random.default_rng(seed)
    g = create_store(url, sensor="emit", level="L2", wavelengths_nm=np.linspace(400, 2400, bands),
                     fwhm_nm=np.full(bands, 8.5), good_bands=np.ones(bands, bool), patch_size=p)
    x = rng.random((n, bands, p, p)).astype(np.float16)
    v = rng.random((n, p, p)) > 0.1
    meta = {"row": np.arange(n) * p, "col": np.zeros(n), "lat": np.full(n, 34.0), "lon": np.full(n, -118.0),
            "time": np.full(n, NO_TIME), "gsd": np.full(n, 60.0), "valid_fraction": v.mean((1, 2))}
    append_patches(g, granule_id="g0", source="/x/g0.nc", patches=x, valid=v, meta=meta)
    return g, x, v


@pytest.mark.parametrize("url", ["memory://schema-a.zarr", "local"])
def test_round_trip_and_partial_read(tmp_path, url):
    url = str(tmp_path / "s.zarr") if url == "local" else url
    _, x, v = _store(url)
    s = PatchStore(url)
    assert len(s) == 3 and s.n_bands == 40 and s.chunks == (1, 32, 32, 32)
    px, val = s.read(1, 8, 30, 32, 0, 32)
    np.testing.assert_array_equal(px, x[1, 8:30, 32:64, 0:32])
    np.testing.assert_array_equal(val, v[1, 32:64, 0:32])
    assert s.meta("granule").tolist() == [0, 0, 0]
    with pytest.raises(IndexError):
        s.read(3)


def test_stats_round_trip_and_missing_stats_error():
    g, _, _ = _store("memory://schema-b.zarr")
    with pytest.raises(StoreError, match="no statistics"):
        _ = PatchStore("memory://schema-b.zarr").stats
    st = BandStats(*(np.arange(40.0) + k for k in range(5)))
    write_stats(g, st)
    np.testing.assert_array_equal(PatchStore("memory://schema-b.zarr").stats.p99, st.p99)


def test_missing_store_and_wrong_schema(tmp_path):
    with pytest.raises(StoreError, match="no patch store"):
        PatchStore(str(tmp_path / "nope.zarr"))
    g, _, _ = _store(str(tmp_path / "old.zarr"))
    zarr.open_group(str(tmp_path / "old.zarr"), mode="r+").attrs["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(StoreError, match="schema_version"):
        PatchStore(str(tmp_path / "old.zarr"))


def test_granule_committed_once(tmp_path):
    g, x, v = _store(str(tmp_path / "s.zarr"))
    with pytest.raises(StoreError, match="already committed"):
        append_patches(g, granule_id="g0", source="", patches=x, valid=v, meta={})
    with pytest.raises(StoreError, match="already exists"):
        _store(str(tmp_path / "s.zarr"))
    assert PatchStore(str(tmp_path / "s.zarr")).locate(2)[1] == 2


def test_chunk_layout_small_patches():
    assert chunk_layout(285, 256) == ((1, 32, 32, 32), (1, 288, 256, 256))
    assert chunk_layout(8, 8) == ((1, 8, 8, 8), (1, 8, 8, 8))
    with pytest.raises(StoreError):
        chunk_layout(10, 48)


# ------------------------------------------------------------------ missing data is an error, not zeros
def _shard(url, array, i):
    return Path(url, array, "c", str(i), *(["0"] * (3 if array == "patches" else 2)))


def test_deleted_chunks_raise_missing_data_not_zeros(tmp_path):
    url = str(tmp_path / "s.zarr")
    _, x, _ = _store(url, n=4)
    _shard(url, "patches", 1).unlink()
    _shard(url, "valid", 2).unlink()
    Path(url, "meta", "gsd", "c", "0").unlink()
    s = PatchStore(url)
    np.testing.assert_array_equal(s.read(0)[0], x[0])
    with pytest.raises(MissingDataError, match=r"patch 1: 'patches' reads NaN.*verify"):
        s.read(1, 0, 10, 0, 0, 32)  # any crop of the patch
    with pytest.raises(MissingDataError, match=r"patch 2: 'valid' reads 255"):
        s.read(2)
    with pytest.raises(MissingDataError, match=r"patches 1:3: 'patches'|patch 1: 'patches'"):
        s.read_range(0, 4)
    with pytest.raises(MissingDataError, match=r"meta/gsd of patches \[0, 1, 2, 3\]"):
        s.meta("gsd")
    assert s.missing_objects() == {"patches": [1], "valid": [2]}


def test_changed_bytes_inside_a_shard_fail_the_chunk_checksum(tmp_path):
    url = str(tmp_path / "s.zarr")
    _, x, _ = _store(url, n=2)
    f = _shard(url, "patches", 1)
    b = bytearray(f.read_bytes())
    b[200:260] = bytes(60)  # inside the first chunk's compressed bytes; the shard index (at the end) intact
    f.write_bytes(bytes(b))
    with pytest.raises(CorruptDataError, match="patch 1: failed to read.*checksum"):
        PatchStore(url).read(1)


def test_writer_refuses_non_finite_pixels(tmp_path):
    w = create_store(str(tmp_path / "s.zarr"), sensor="emit", level="L2", wavelengths_nm=np.linspace(400, 900, 8),
                     fwhm_nm=np.ones(8), good_bands=np.ones(8, bool), patch_size=8)
    x = np.zeros((2, 8, 8, 8), np.float16)
    x[1, 3, 2, 2] = np.nan
    with pytest.raises(StoreError, match="patch 1 holds NaN or inf"):
        w.write(0, x, np.ones((2, 8, 8), bool))


def _write_schema1(url, x, v):
    """A store as schema 1 wrote it (fill values 0 / False, bool valid, no chunk CRC), with zarr alone."""
    n, bands, p, _ = x.shape
    g = zarr.open_group(url, mode="w-")
    blosc = BloscCodec(cname="zstd", clevel=3, shuffle="shuffle", typesize=2)
    g.create_array("patches", shape=x.shape, dtype="float16", chunks=(1, 8, 8, 8), shards=(1, bands, p, p),
                   compressors=blosc, fill_value=0.0)[:] = x
    g.create_array("valid", shape=v.shape, dtype="bool", chunks=(1, 8, 8), shards=(1, p, p), compressors=blosc,
                   fill_value=False)[:] = v
    m = g.create_group("meta")
    meta = {"granule": np.zeros(n), "row": np.arange(n) * p, "col": np.zeros(n), "lat": np.full(n, 1.0),
            "lon": np.full(n, 2.0), "time": np.full(n, NO_TIME), "gsd": np.full(n, 30.0), "valid_fraction": v.mean((1, 2))}
    for k, dt in META_FIELDS.items():
        if k in FOOTPRINT_META:  # schema 1 had no footprints (an old store reads them as unknown)
            continue
        m.create_array(k, shape=(n,), dtype=dt, chunks=(4096,))[:] = meta[k].astype(dt)
    g.attrs.update({"schema_version": 1, "sensor": "emit", "level": "L2", "patch_size": p,
                    "wavelengths_nm": np.linspace(400, 900, bands).tolist(), "fwhm_nm": [5.0] * bands,
                    "good_bands": [True] * bands, "n_patches": n,
                    "granules": {"g0": {"start": 0, "count": n, "source": "/old/g0"}},
                    "stats": BandStats(*(np.full(bands, k + 1.0) for k in range(5))).to_json()})


def test_schema1_store_reads_with_a_warning_refuses_writes_and_migrates(tmp_path, caplog):
    from data_prep.integrity import migrate

    rng = np.random.default_rng(3)
    x = rng.random((3, 8, 16, 16)).astype(np.float16)
    v = rng.random((3, 16, 16)) > 0.2
    old = str(tmp_path / "old.zarr")
    _write_schema1(old, x, v)
    with caplog.at_level("WARNING", logger="data_prep.store"):
        s = PatchStore(old)
    assert not s.detects_missing and "schema_version 1" in caplog.text and "migrate" in caplog.text
    np.testing.assert_array_equal(s.read(2)[0], x[2])
    np.testing.assert_array_equal(s.read(2)[1], v[2])
    with pytest.raises(StoreError, match=r"schema_version 1 .*python -m data_prep migrate"):
        StoreWriter.open(old)
    new = str(tmp_path / "new.zarr")
    assert migrate(old, new)["patches"] == 3
    m = PatchStore(new)
    assert m.schema_version == SCHEMA_VERSION and m.detects_missing
    px, va = m.read_range(0, 3)
    np.testing.assert_array_equal(px, x)
    np.testing.assert_array_equal(va, v)
    assert m.attrs["granules"] == s.attrs["granules"] and m.attrs["stats"] == s.attrs["stats"]
    np.testing.assert_array_equal(m.meta("row"), s.meta("row"))
    _shard(old, "patches", 1).unlink()  # a lost object of an old store: zeros there, but the listing sees it
    with pytest.raises(StoreError, match=r"without a shard object \{'patches': \[1\]\}"):
        migrate(old, str(tmp_path / "new2.zarr"))


def test_commit_records_a_granules_own_band_table_and_ands_its_good_bands(tmp_path):
    w = create_store(str(tmp_path / "s.zarr"), sensor="emit", level="L2", wavelengths_nm=np.linspace(400, 900, 8),
                     fwhm_nm=np.ones(8), good_bands=np.ones(8, bool), patch_size=8)
    x, v = np.zeros((1, 8, 8, 8), np.float16), np.ones((1, 8, 8), bool)
    meta = {"row": [0], "col": [0], "lat": [0.0], "lon": [0.0], "time": [NO_TIME], "gsd": [30.0], "valid_fraction": [1.0]}
    w.append(granule_id="a", source="a", patches=x, valid=v, meta=meta)
    start = w.begin()
    w.write(start, x, v)
    good = np.ones(8, bool)
    good[2] = False
    own = np.linspace(405, 905, 8)
    w.commit(granule_id="b", source="b", start=start, count=1, meta=meta, good_bands=good,
             entry={"wavelengths_nm": own.tolist(), "fwhm_nm": [2.0] * 8})
    s = PatchStore(w.url)
    assert s.good_bands.tolist() == good.tolist()
    np.testing.assert_array_equal(s.band_table(0)[0], np.linspace(400, 900, 8))
    np.testing.assert_array_equal(s.band_table(1)[0], own)
    with pytest.raises(TypeError):
        w.attrs["n_patches"] = 0  # the writer's view is read-only: writes go through its methods


def test_a_commit_is_one_metadata_write(tmp_path, monkeypatch):
    """The commit point: n_patches, manifest, stats and stats_slot change in ONE write of the group's zarr.json
    (zarr's attrs.update writes once per key: a kill in between would commit patches with stale statistics)."""
    from zarr.core.group import AsyncGroup

    from data_prep.stats import PartialStats

    w = create_store(str(tmp_path / "s.zarr"), sensor="emit", level="L2", wavelengths_nm=np.linspace(400, 900, 8),
                     fwhm_nm=np.ones(8), good_bands=np.ones(8, bool), patch_size=8, hist_range=(0.0, 1.0))
    x, v = np.full((1, 8, 8, 8), 0.5, np.float16), np.ones((1, 8, 8), bool)
    part = PartialStats.empty(8, 0.0, 1.0)
    part.add_patch(x[0], v[0])
    start = w.begin()
    w.write(start, x, v)
    writes = []
    orig = AsyncGroup._save_metadata

    async def counting(self, *a, **k):
        writes.append(dict(self.metadata.attributes))
        return await orig(self, *a, **k)

    monkeypatch.setattr(AsyncGroup, "_save_metadata", counting)
    meta = {"row": [0], "col": [0], "lat": [0.0], "lon": [0.0], "time": [NO_TIME], "gsd": [30.0], "valid_fraction": [1.0]}
    w.commit(granule_id="a", source="a", start=start, count=1, meta=meta, partial=part)
    assert len(writes) == 1
    assert writes[0]["n_patches"] == 1 and writes[0]["stats_slot"] == 0 and writes[0]["stats"]["count"][0] == 64

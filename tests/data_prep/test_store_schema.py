import numpy as np
import pytest
import zarr

from data_prep.store import (
    NO_TIME,
    SCHEMA_VERSION,
    BandStats,
    PatchStore,
    StoreError,
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


def test_chunk_layout_small_patches():
    assert chunk_layout(285, 256) == ((1, 32, 32, 32), (1, 288, 256, 256))
    assert chunk_layout(8, 8) == ((1, 8, 8, 8), (1, 8, 8, 8))
    with pytest.raises(StoreError):
        chunk_layout(10, 48)

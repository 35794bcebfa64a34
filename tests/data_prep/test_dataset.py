"""Archive-scale ingest: Dask (a 2-worker LocalCluster) and job-array shards give one logical dataset per sensor
and level whose patches and statistics equal a single-process ingest of the same products; the loader reads it
as one source with one normalisation."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from data_prep import store as st
from data_prep.cli import main
from data_prep.dataset import ShardedStore, dataset_url, open_store
from data_prep.ingest import ingest
from data_prep.spectral import inverse_std, normalise_into
from pretrain.data import DataConfig, SourceConfig, build_loader
from tests.data_prep.test_ingest import make_cube

N_PRODUCTS = 6


@pytest.fixture(scope="module")
def products(tmp_path_factory):
    formats = pytest.importorskip("data_prep.formats")
    d = tmp_path_factory.mktemp("archive")
    for k in range(N_PRODUCTS):
        formats.write_product(d / "in", sensor="aviris-ng", level="L1", name=f"ang2023010{k}t000000_rdn",
                              cube=make_cube(rows=32, cols=48, sensor="aviris-ng", seed=50 + k) * 10)
    single = str(d / "single")
    ingest([str(d / "in")], single, patch_size=16, progress=False)
    return d, PatchStore_of(single)


def PatchStore_of(root: str) -> st.PatchStore:  # noqa: N802
    return st.PatchStore(st.store_url(root, "aviris-ng", "L1"))


def _by_position(s) -> dict[tuple[str, int, int], tuple[np.ndarray, np.ndarray]]:
    """patch (granule id, row, col) -> (pixels, valid): the same patches, whatever order the shards hold them in."""
    ids = list(s.attrs["granules"])
    g, r, c = s.meta("granule"), s.meta("row"), s.meta("col")
    px, va = s.read_range(0, s.n_patches)
    return {(ids[int(g[i])], int(r[i]), int(c[i])): (px[i], va[i]) for i in range(s.n_patches)}


def _same_dataset(one: st.PatchStore, ds: ShardedStore) -> None:
    a, b = _by_position(one), _by_position(ds)
    assert sorted(a) == sorted(b) and len(a) == one.n_patches == ds.n_patches
    for k, (px, va) in a.items():
        np.testing.assert_array_equal(b[k][0], px)
        np.testing.assert_array_equal(b[k][1], va)
    x, y = one.stats, ds.stats
    np.testing.assert_array_equal(y.count, x.count)
    np.testing.assert_array_equal(y.p01, x.p01)  # histograms add exactly
    np.testing.assert_array_equal(y.p99, x.p99)
    np.testing.assert_allclose(y.mean, x.mean, rtol=1e-12)
    np.testing.assert_allclose(y.std, x.std, rtol=1e-10)
    np.testing.assert_array_equal(ds.partials().hist, one.partials().hist)
    assert set(ds.attrs["granules"]) == set(one.attrs["granules"])


def test_dask_local_cluster_ingest_equals_single_process(products):
    d, one = products
    environ = dict(os.environ)
    res = ingest([str(d / "in")], str(d / "dask"), patch_size=16, progress=False, executor="dask://local:2")
    assert dict(os.environ) == environ  # the cluster's nanny exports MALLOC_TRIM_THRESHOLD_; the caller keeps its own
    url = dataset_url(str(d / "dask"), "aviris-ng", "L1")
    assert res["shards"] == 2 and res["datasets"] == [url] and res["granules_added"] == N_PRODUCTS
    ds = open_store(url)
    assert isinstance(ds, ShardedStore) and len(ds.shards) == 2 and all(s.n_patches for s in ds.shards)
    _same_dataset(one, ds)


def test_job_array_shards_equal_single_process_and_the_last_one_writes_the_manifest(products, capsys):
    d, one = products
    root = str(d / "job")
    url = dataset_url(root, "aviris-ng", "L1")
    argv = ["ingest", str(d / "in"), "--out", root, "--patch-size", "16", "--no-progress", "--json"]
    assert main([*argv, "--shard", "1/2"]) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["datasets"] is None  # shard 0 has not run: no manifest yet
    with pytest.raises(st.StoreError, match="finalise"):
        open_store(url)
    assert main([*argv, "--shard", "0/2"]) == 0
    second = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert second["datasets"] == [url]
    assert first["granules_added"] + second["granules_added"] == N_PRODUCTS
    _same_dataset(one, open_store(url))
    assert main([*argv, "--shard", "1/2"]) == 0  # a rerun of a shard skips what it committed
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["granules_added"] == 0 and again["granules_skipped"] == first["granules_added"]
    # another shard count would put a product into a second shard store: refused before anything is written
    assert main([*argv, "--shard", "0/3"]) == 2
    assert "was ingested in 2 shards" in capsys.readouterr().err
    assert main(["finalise", root]) == 0  # idempotent: the same manifest again
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["datasets"] == [url]
    _same_dataset(one, open_store(url))


def test_loader_reads_a_logical_dataset_as_one_source_with_one_normalisation(products):
    d, one = products
    root = str(d / "loader")
    for k in range(2):
        ingest([str(d / "in")], root, patch_size=16, progress=False, shard=(k, 2))
    url = dataset_url(root, "aviris-ng", "L1")
    ds = open_store(url)
    cfg = DataConfig(sources=[SourceConfig(url)], batch_size=4, crop=16, band_window=32, band_stride=16, epochs=1,
                     num_workers=2, sensor_dropout=0.0)
    loader = build_loader(cfg)
    batches = list(loader)
    seen = [i for b in batches for i in b["meta"]["index"]]
    assert len(seen) == len(set(seen)) == loader.num_batches * 4 == (ds.n_patches // 4) * 4
    st_ = ds.stats
    good = np.flatnonzero(ds.good_bands)
    for b in batches[:2]:
        for j, i in enumerate(b["meta"]["index"]):
            sel = good[b["meta"]["band_start"][j]:b["meta"]["band_start"][j] + 32]
            px, va = ds.read(i)
            ref = torch.empty((sel.size, 16, 16))
            normalise_into(ref, px[sel], va, st_.p01[sel].astype(np.float32), st_.p99[sel].astype(np.float32),
                           st_.mean[sel].astype(np.float32), inverse_std(st_.std)[sel].astype(np.float32))
            assert torch.equal(b["pixels"][j], ref)
            shard, local = ds.locate(i)  # the granule id comes from the shard it lives in
            assert b["meta"]["granule"][j] == list(shard.attrs["granules"])[int(shard.meta("granule")[local])]

"""Statistics: exact streamed mean/std, histogram percentiles, merging, the stored stats and `stats` recompute."""

from __future__ import annotations

import numpy as np
import pytest

from data_prep import store as st
from data_prep.ingest import ingest_granules
from data_prep.stats import PartialStats, recompute
from data_prep.store import PatchStore
from tests.data_prep.test_ingest import make_cube, make_granule


def test_partials_match_numpy_and_merge_in_any_grouping():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0.3, 0.1, (3, 5000)), rng.normal(0.6, 0.05, (3, 3000))], axis=1)
    x = np.clip(x, -0.05, 1.5).astype(np.float16).astype(np.float64)
    whole = PartialStats.empty(3, -0.05, 1.5)
    whole.add_values(x)
    parts = [PartialStats.empty(3, -0.05, 1.5) for _ in range(3)]
    for k, cut in enumerate(np.array_split(np.arange(x.shape[1]), 3)):
        parts[k].add_values(x[:, cut])
    merged = PartialStats.empty(3, -0.05, 1.5).merge(parts[2]).merge(parts[0]).merge(parts[1])
    for p in (whole, merged):
        bs = p.band_stats()
        np.testing.assert_allclose(bs.mean, x.mean(axis=1), rtol=1e-12)
        np.testing.assert_allclose(bs.std, x.std(axis=1), rtol=1e-10)
        width = 1.55 / 4096
        np.testing.assert_allclose(bs.p01, np.quantile(x, 0.01, axis=1, method="inverted_cdf"), atol=width)
        np.testing.assert_allclose(bs.p99, np.quantile(x, 0.99, axis=1, method="inverted_cdf"), atol=width)
    np.testing.assert_array_equal(whole.hist, merged.hist)
    with pytest.raises(ValueError, match="cannot merge"):
        whole.merge(PartialStats.empty(3, -1.0, 80.0))


def test_store_stats_equal_numpy_over_committed_valid_pixels_and_recompute():
    root = "memory://stats-a"
    cubes = [make_cube(rows=64, cols=64, seed=s) for s in (1, 2)]
    cubes[1][:, :10, :] = np.nan  # some invalid pixels in kept patches (10/32 rows > 20% -> dropped top strip)
    cubes[1][:, 40:45, :] = np.nan  # 5/32 rows invalid, kept
    ingest_granules([make_granule(c, f"g{k}") for k, c in enumerate(cubes)], root, patch_size=32, progress=False)
    s = PatchStore(st.store_url(root, "enmap", "L2"))
    px, va = s.read_range(0, s.n_patches)
    px = px.astype(np.float64)
    vals = np.moveaxis(px, 1, -1)[va]  # (N valid pixels, bands)
    stats = s.stats
    assert stats.count.tolist() == [vals.shape[0]] * s.n_bands
    np.testing.assert_allclose(stats.mean, vals.mean(axis=0), rtol=1e-11)
    np.testing.assert_allclose(stats.std, vals.std(axis=0), rtol=1e-9)
    width = 1.55 / 4096
    np.testing.assert_allclose(stats.p01, np.quantile(vals, 0.01, axis=0, method="inverted_cdf"), atol=width)
    np.testing.assert_allclose(stats.p99, np.quantile(vals, 0.99, axis=0, method="inverted_cdf"), atol=width)
    again = recompute(s).band_stats()
    np.testing.assert_allclose(again.mean, stats.mean, rtol=1e-12)
    np.testing.assert_array_equal(again.p99, stats.p99)


def test_shard_stores_merge_to_the_stats_of_one_store():
    from data_prep.dataset import dataset_url, open_store

    gs = [make_granule(make_cube(rows=32, cols=64, seed=20 + k), f"g{k}") for k in range(4)]
    ingest_granules(gs, "memory://merge-all", patch_size=32, progress=False)
    res = [ingest_granules(gs, "memory://merge-sharded", patch_size=32, shard=f"{k}/2", progress=False) for k in range(2)]
    assert res[0]["datasets"] is None and res[1]["datasets"] == [dataset_url("memory://merge-sharded", "enmap", "L2")]
    merged = open_store(res[1]["datasets"][0]).stats
    one = PatchStore(st.store_url("memory://merge-all", "enmap", "L2")).stats
    np.testing.assert_allclose(merged.mean, one.mean, rtol=1e-12)
    np.testing.assert_allclose(merged.std, one.std, rtol=1e-10)
    np.testing.assert_array_equal(merged.p01, one.p01)
    np.testing.assert_array_equal(merged.count, one.count)

"""Planning rules of pretrain.data (no pixel reads): windows, mixture, subsets, dropout, shards."""

from collections import Counter

import numpy as np
import pytest

from pretrain.data import DataConfig, SourceConfig, build_plan
from pretrain.data.sampling import (
    Substitutes,
    crop_for,
    dropped,
    rank_shard,
    subset_indices,
    substitute_index,
    window_for,
)

from .data_fixtures import make_store

GOOD = np.ones(40, bool)
GOOD[15:20] = False  # 35 good bands: window 24 at stride 8 can start at 0 or 8


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    d = tmp_path_factory.mktemp("plan")
    a = make_store(str(d / "emit_L2.zarr"), n=24, good=GOOD)
    b = make_store(str(d / "enmap_L1.zarr"), sensor="enmap", level="L1", n=16, bands=20, seed=1)
    return a, b


def _cfg(stores, **kw):
    a, b = stores
    base = dict(sources=[SourceConfig(a["url"]), SourceConfig(b["url"])], batch_size=2, crop=16,
                band_window=24, band_stride=8, num_workers=0)
    base.update(kw)
    return DataConfig(**base)


def _plans(cfg, n, rank=0, world=1):
    plan, infos, _ = build_plan(cfg, rank, world)
    out = []
    for _ in range(n):
        try:
            out.append(next(plan))
        except StopIteration:
            break
    return out, infos


def test_windows_inside_good_bands_on_stride_and_whole_batch(stores):
    plans, infos = _plans(_cfg(stores), 200)
    starts = Counter()
    for tasks in plans:
        info = infos[tasks[0]["key"]]
        assert len({(t["key"], t["w0"], t["wn"]) for t in tasks}) == 1  # one window, one store per batch
        w0, wn = tasks[0]["w0"], tasks[0]["wn"]
        assert wn == min(24, info.n_good) and w0 % 8 == 0 and w0 + wn <= info.n_good
        if info.n_good > 24:
            starts[w0] += 1
        else:
            assert w0 == 0 and wn == info.n_good == 20  # fewer good bands than the window: all of them
    assert set(starts) == {0, 8}


def test_windows_differ_across_ranks_and_are_reproducible(stores):
    a, _ = stores
    cfg = DataConfig(sources=[SourceConfig(a["url"])], batch_size=2, crop=16, band_window=24, band_stride=8)
    w = {r: [p[0]["w0"] for p in _plans(cfg, 40, rank=r, world=2)[0]] for r in (0, 1)}
    assert w[0] != w[1]
    assert w[0] == [p[0]["w0"] for p in _plans(cfg, 40, rank=0, world=2)[0]]
    assert [window_for(0, 0, s, 35, 24, 8) for s in range(5)] == [window_for(0, 0, s, 35, 24, 8) for s in range(5)]
    assert window_for(0, 0, 0, 10, 24, 8) == (0, 10)


def test_mixture_proportions(stores):
    a, b = stores
    cfg = _cfg(stores, sources=[SourceConfig(a["url"], weight=3.0), SourceConfig(b["url"], weight=1.0)])
    plans, infos = _plans(cfg, 2000)
    frac = np.mean([infos[p[0]["key"]].url == a["url"] for p in plans])
    assert abs(frac - 0.75) < 0.04, frac
    # weight 0 leaves a store out entirely
    cfg0 = _cfg(stores, sources=[SourceConfig(a["url"], weight=1.0), SourceConfig(b["url"], weight=0.0)])
    plans0, infos0 = _plans(cfg0, 50)
    assert {infos0[p[0]["key"]].url for p in plans0} == {a["url"]}


def test_subset_sizes_exact_and_fixed_across_epochs(stores):
    a, b = stores
    cfg = _cfg(stores, sources=[SourceConfig(a["url"], subset=10), SourceConfig(b["url"], subset=6)], epochs=2)
    plans, infos = _plans(cfg, 10_000)
    seen = {(u, e): [] for u in (a["url"], b["url"]) for e in (0, 1)}
    for tasks in plans:
        for t in tasks:
            seen[(infos[t["key"]].url, t["epoch"])].append(t["index"])
    for url, size in ((a["url"], 10), (b["url"], 6)):
        e0, e1 = seen[(url, 0)], seen[(url, 1)]
        assert len(e0) == len(set(e0)) == size and sorted(e0) == sorted(e1)
        assert e0 != e1  # a new order each epoch
    assert len(plans) == (5 + 3) * 2


def test_dropout_rate(stores):
    plans, _ = _plans(_cfg(stores, sensor_dropout=0.1, batch_size=8), 600)
    drops = [t["drop"] for p in plans for t in p]
    assert len(drops) == 4800 and abs(np.mean(drops) - 0.1) < 0.015
    plans0, _ = _plans(_cfg(stores, sensor_dropout=0.0), 50)
    assert not any(t["drop"] for p in plans0 for t in p)


def test_rank_shards_partition_with_documented_remainder():
    base = np.arange(103)
    shards = [rank_shard(base, 5, 7, 0, r, 4) for r in range(4)]
    flat = np.concatenate(shards)
    assert all(len(s) == 25 for s in shards) and len(set(flat.tolist())) == 100
    assert not np.array_equal(rank_shard(base, 5, 7, 1, 0, 4), shards[0])  # reshuffled each epoch


def test_crops_on_chunk_grid(stores):
    plans, infos = _plans(_cfg(stores), 100)
    corners = {(t["y0"], t["x0"]) for p in plans for t in p}
    assert corners <= {(y, x) for y in (0, 8, 16) for x in (0, 8, 16)} and len(corners) > 4
    plans1, _ = _plans(_cfg(stores, crop_align=1), 100)
    assert any(t["y0"] % 8 for p in plans1 for t in p)


def test_substitutes_seeded_from_the_store_pool_avoiding_the_batch(stores):
    a, _ = stores
    cfg = DataConfig(sources=[SourceConfig(a["url"], subset=10)], batch_size=4, crop=16, band_window=24,
                     band_stride=8, sensor_dropout=0.5)
    (tasks,), infos = _plans(cfg, 1)
    info = next(iter(infos.values()))
    pool = subset_indices(24, 10, cfg.seed, info.tag)
    subs = Substitutes(infos, {info.key: pool}, seed=cfg.seed, crop=16, crop_align=0, sensor_dropout=0.5)
    batch = {t["index"] for t in tasks}
    failed = tasks[1]
    picks = [subs.task(failed, k, set(batch))["index"] for k in range(20)]
    assert set(picks) <= set(pool.tolist()) - batch  # from the store's subset, never a patch of the batch
    assert picks == [subs.task(failed, k, set(batch))["index"] for k in range(20)]  # reproducible (resume)
    assert len(set(picks)) > 1  # each try draws anew
    t = subs.task(failed, 0, set(batch))
    assert t["replaces"] == failed["index"] and (t["step"], t["j"], t["w0"], t["wn"]) == (
        failed["step"], failed["j"], failed["w0"], failed["wn"])
    # the substitute gets its own crop and dropout: what the plan gives that patch in that epoch
    assert (t["y0"], t["x0"]) == crop_for(cfg.seed, info.tag, t["epoch"], t["index"], 32, 16, 8)
    assert t["drop"] == dropped(cfg.seed, info.tag, t["epoch"], t["index"], 0.5)
    # the exact fallback when nearly the whole pool is to be avoided
    last = int(pool[7])
    assert substitute_index(0, 1, 0, 0, 0, 0, pool, set(pool.tolist()) - {last}) == last


def test_seeded_draws_are_those_of_the_list_entropy():
    """_rng passes its key to SeedSequence as a uint32 array where every int fits one word (faster): the streams
    must be exactly those of the list of ints it passed before (every crop, window and dropout of a resumed or
    re-run plan depends on them), at the word boundaries and beyond them (large seeds take the list)."""
    from pretrain.data.sampling import _rng

    for key in [(0,), (0, 14, 0, 0, 0), (7, 13, 2**32 - 1, 3, 12345), (2**32, 14, 1, 0, 5), (2**40 + 3, 0, 9)]:
        want = np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))
        got = _rng(*key)
        np.testing.assert_array_equal(got.integers(1 << 30, size=8), want.integers(1 << 30, size=8))
        assert got.random() == want.random()
    assert crop_for(3, 2**32 - 1, 2, 17, 64, 16, 8) == tuple(
        int(v) * 8 for v in np.random.default_rng(np.random.SeedSequence([3, 14, 2**32 - 1, 2, 17])).integers(7, size=2))

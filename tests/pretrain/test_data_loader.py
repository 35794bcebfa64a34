"""pretrain.data end to end on real (tiny) Zarr stores: coverage, resume, normalisation, bad input."""

import dataclasses
import io
import json
import logging
import multiprocessing
import os
import re
import shutil
import signal
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from data_prep.spectral import BandScaling
from data_prep.store import SCHEMA_VERSION, PatchStore, create_store
from pretrain.data import DataConfig, DataError, LoaderWorkerError, SourceConfig, build_loader, normalise
from pretrain.models.vocab import Vocabulary

from .data_fixtures import make_store

GOOD = np.ones(40, bool)
GOOD[15:20] = False


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    d = tmp_path_factory.mktemp("loader")
    a = make_store(str(d / "emit_L2.zarr"), n=24, good=GOOD)
    b = make_store(str(d / "enmap_L1.zarr"), sensor="enmap", level="L1", n=16, bands=20, seed=1)
    return a, b


def _cfg(stores, **kw):
    a, b = stores
    base = dict(sources=[SourceConfig(a["url"]), SourceConfig(b["url"])], batch_size=3, crop=16,
                band_window=24, band_stride=8, num_workers=2)
    base.update(kw)
    return DataConfig(**base)


def _take(loader, n):
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out


def test_disjoint_coverage_two_ranks_two_workers(stores):
    a, b = stores
    cfg = _cfg(stores, epochs=1)
    seen = []
    for rank in (0, 1):
        loader = build_loader(cfg, rank=rank, world_size=2)
        batches = list(loader)
        assert len(batches) == loader.num_batches == 4 + 2  # per rank: 12//3 of A, 8//3 of B
        for bt in batches:
            assert len(set(bt["meta"]["url"])) == 1  # one store, one band count per batch
            assert bt["pixels"].shape[1] == bt["wavelengths"].shape[1] == bt["fwhm"].shape[1]
            seen += list(zip(bt["meta"]["url"], bt["meta"]["index"]))
    assert len(seen) == len(set(seen))  # no patch twice across ranks and workers
    per = Counter(u for u, _ in seen)
    assert per[a["url"]] == 24  # 24 = 2 ranks x 12, nothing dropped
    assert per[b["url"]] == 12  # 16 -> 8 per rank -> 2 batches of 3: documented remainder of 2 per rank


def _same(b1, b2):
    for k in ("pixels", "wavelengths", "fwhm", "valid", "sensor", "level", "gsd"):
        assert torch.equal(b1[k], b2[k]), k
    assert b1["meta"] == b2["meta"]


@pytest.mark.parametrize("epochs", [None, 2])
def test_exact_resume_mid_epoch_multi_worker(stores, epochs):
    cfg = _cfg(stores, epochs=epochs, num_workers=2, prefetch=3)
    ref = build_loader(cfg)
    it = iter(ref)
    first = [next(it) for _ in range(3)]
    sd = ref.state_dict()
    json.dumps(sd)  # plain types only
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    expected = [next(it) for _ in range(14)]  # the uninterrupted run (same iterator; iter() again restarts)
    resumed = build_loader(cfg)
    resumed.load_state_dict(sd)
    got = _take(resumed, 14)
    assert len(got) == 14  # crosses the epoch boundary (13 batches per epoch)
    for e, g in zip(expected, got):
        _same(e, g)
    assert [b["meta"]["step"][0] for b in first] == [0, 1, 2]
    assert got[0]["meta"]["step"][0] == 3
    with pytest.raises(DataError, match="rank"):
        build_loader(cfg, rank=1, world_size=2).load_state_dict(sd)
    with pytest.raises(DataError, match="format"):
        build_loader(cfg).load_state_dict({k: v for k, v in sd.items() if k != "format"})


def test_process_workers_match_threads_and_dead_worker_raises(stores):
    cfg = _cfg(stores, num_workers=2, prefetch=1)
    t = _take(build_loader(cfg), 3)
    before = {p.pid for p in multiprocessing.active_children()}
    loader = build_loader(_cfg(stores, num_workers=2, prefetch=1, worker_type="process"))
    it = iter(loader)
    for x in t:
        _same(x, next(it))
    workers = [p for p in multiprocessing.active_children() if p.pid not in before]
    assert len(workers) == 2
    os.kill(workers[0].pid, signal.SIGKILL)  # as the OOM killer would; torchdata alone would wait forever
    out: dict = {}

    def consume():
        try:
            for _ in range(10_000):  # endless stream: only an error ends this
                next(it)
        except BaseException as e:  # noqa: BLE001
            out["error"] = e

    th = threading.Thread(target=consume, daemon=True)
    th.start()
    th.join(timeout=30)
    assert not th.is_alive(), "loader hung after a worker process died"
    assert isinstance(out.get("error"), LoaderWorkerError), out
    msg = str(out["error"])
    assert f"pid {workers[0].pid}" in msg and "SIGKILL" in msg


def test_normalisation_matches_numpy_and_fields(stores):
    a, b = stores
    cfg = _cfg(stores, epochs=1, sensor_dropout=0.3, seed=3)
    raws = {a["url"]: a, b["url"]: b}
    n_drop = 0
    # the batch indices are the given (model's) vocabulary's, not the registry's order
    vocab = Vocabulary(("unknown", "enmap", "zz-other", "emit"), ("unknown", "L2", "L1"))
    for bt in build_loader(cfg, vocab=vocab):
        assert bt["pixels"].dtype == torch.float32 and bt["valid"].dtype == torch.bool
        assert bt["sensor"].dtype == bt["level"].dtype == torch.int64
        for j, url in enumerate(bt["meta"]["url"]):
            r = raws[url]
            i, y0, x0, w0 = (bt["meta"][k][j] for k in ("index", "crop_y", "crop_x", "band_start"))
            assert y0 % 8 == 0 and x0 % 8 == 0
            sel = np.flatnonzero(r["good"])[w0:w0 + bt["pixels"].shape[1]]
            x = r["pixels"][i][sel][:, y0:y0 + 16, x0:x0 + 16].astype(np.float64)
            st = r["stats"]
            x = np.clip(x, st.p01[sel, None, None], st.p99[sel, None, None])
            x = (x - st.mean[sel, None, None]) / st.std[sel, None, None]
            v = r["valid"][i, y0:y0 + 16, x0:x0 + 16]
            x[:, ~v] = 0
            np.testing.assert_allclose(bt["pixels"][j].numpy(), x, atol=2e-4, rtol=1e-4)
            np.testing.assert_array_equal(bt["valid"][j].numpy(), v)
            np.testing.assert_allclose(bt["wavelengths"][j].numpy(), r["wavelengths"][sel], rtol=1e-6)
            np.testing.assert_allclose(bt["fwhm"][j].numpy(), r["fwhm"][sel], rtol=1e-6)
            sensor = "emit" if url == a["url"] else "enmap"
            assert int(bt["sensor"][j]) in (0, {"emit": 3, "enmap": 1}[sensor])
            n_drop += int(bt["sensor"][j]) == 0
            assert int(bt["level"][j]) == (1 if sensor == "emit" else 2)
            assert bt["meta"]["granule"][j] == f"{sensor}-g{0 if i < (12 if sensor == 'emit' else 8) else 1}"
            assert float(bt["gsd"][j]) == (30.0 if i < (12 if sensor == "emit" else 8) else 31.0)
    assert n_drop > 0


def _corrupt(url: str, n_garbage: int, n_truncated: int = 0) -> set[int]:
    """Overwrite the first ``n_garbage`` chunk/shard files of ``patches`` with random bytes and cut the next
    ``n_truncated`` to half their length; return the patches that no longer read."""
    files = sorted(p for p in Path(url, "patches").rglob("*") if p.is_file() and p.name != "zarr.json")
    rng = np.random.default_rng(0)
    for f in files[:n_garbage]:
        f.write_bytes(rng.integers(0, 256, f.stat().st_size, dtype=np.uint8).tobytes())
    for f in files[n_garbage:n_garbage + n_truncated]:
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    s = PatchStore(url)  # one shard per patch (c/<patch>/0/0/0): check those patches no longer read
    bad = {int(f.relative_to(Path(url, "patches", "c")).parts[0]) for f in files[:n_garbage + n_truncated]}
    for i in bad:
        with pytest.raises(Exception):  # noqa: B017 - whatever zarr/numcodecs raise for a broken shard
            s.read(i)
    return bad


@pytest.fixture()
def copied(stores, tmp_path):
    """A fresh copy of the 24-patch store (same URL before and after corrupting it: same permutations)."""
    url = str(tmp_path / "emit_L2.zarr")
    shutil.copytree(stores[0]["url"], url)
    return url


@pytest.fixture()
def corrupted(copied):
    bad = _corrupt(copied, 2, 1)
    assert len(bad) == 3
    return copied, bad


def _one(url, **kw):
    # limits off by default: which patches share a batch depends on the URL (tmp path) through the seeds
    base = dict(sources=[SourceConfig(url)], batch_size=4, crop=16, band_window=24, band_stride=8, epochs=1,
                num_workers=2, max_bad_fraction=1.0, max_bad_batch_fraction=1.0)
    base.update(kw)
    return DataConfig(**base)


def test_corrupted_chunks_substituted_batches_unchanged(copied, caplog):
    """Failed samples are replaced, so every rank yields the same number of full batches as on a clean store
    (a rank with a batch fewer would hang a distributed run); each failure is logged with store, patch, error."""
    url = copied
    cleans = [list(build_loader(_one(url), rank, 2)) for rank in (0, 1)]
    bad = _corrupt(url, 2, 1)
    assert len(bad) == 3
    counts, failed_reads = [], 0
    replaced = {}
    for rank, clean in zip((0, 1), cleans):
        loader = build_loader(_one(url), rank, 2)
        with caplog.at_level(logging.WARNING, logger="pretrain.data.loader"):
            got = list(loader)
        counts.append(len(got))
        assert len(got) == len(clean) == loader.num_batches == 3
        for c, g in zip(clean, got):
            assert g["pixels"].shape == c["pixels"].shape and g["pixels"].shape[0] == 4
            assert all(x.shape[0] == 4 for x in (g["valid"], g["sensor"], g["gsd"], g["wavelengths"]))
            assert all(len(v) == 4 for v in g["meta"].values())
            assert not set(g["meta"]["index"]) & bad
            assert len(set(g["meta"]["index"])) == 4  # a substitute is not a patch already in the batch
            for j, (ci, gi, rep) in enumerate(zip(c["meta"]["index"], g["meta"]["index"], g["meta"]["replaces"])):
                if ci in bad:
                    assert rep == ci and gi != ci
                    replaced[ci] = gi
                else:  # untouched slots are exactly the clean run's samples
                    assert rep == -1 and gi == ci
                    assert torch.equal(g["pixels"][j], c["pixels"][j])
        assert loader.samples_seen == 12
        failed_reads += loader.bad_samples
    assert counts[0] == counts[1]
    assert set(replaced) == bad  # each bad patch was in some rank's shard and was replaced
    msgs = [r.getMessage() for r in caplog.records if "failed to decode" in r.getMessage()]
    assert len(msgs) == failed_reads >= len(bad)  # one per failed read (a substitute may be a bad patch too)
    for m in msgs:
        assert m.startswith(f"{url}: patch ") and "replaced by patch" in m and "Error" in m
    for i in bad:  # the substitute that finally filled the slot is named (a chain if a substitute failed too)
        assert any((f"patch {i} (batch" in m or f"(substitute for patch {i}," in m)
                   and f"replaced by patch {replaced[i]}:" in m for m in msgs), (i, replaced[i], msgs)


def test_corrupted_chunks_exact_resume(corrupted):
    url, bad = corrupted
    cfg = _one(url, epochs=None, batch_size=3)
    ref = build_loader(cfg)
    it = iter(ref)
    first = [next(it) for _ in range(4)]
    sd = ref.state_dict()
    expected = [next(it) for _ in range(8)]
    assert ref.bad_samples > 0 and any(r != -1 for b in first + expected for r in b["meta"]["replaces"])
    resumed = build_loader(cfg)
    resumed.load_state_dict(json.loads(json.dumps(sd)))
    got = _take(resumed, 8)
    for e, g in zip(expected, got):
        _same(e, g)
    assert resumed.bad_samples == ref.bad_samples and resumed.samples_seen == ref.samples_seen == 36


def test_corrupted_chunks_past_limits_raise(corrupted):
    url, bad = corrupted
    # more of one batch failing than max_bad_batch_fraction allows: no substitutes, a clear error
    with pytest.raises(DataError, match=r"failed to decode \(more than max_bad_batch_fraction=0.2") as e:
        list(build_loader(_one(url, max_bad_batch_fraction=0.2)))
    msg = str(e.value)
    assert url in msg and "first error" in msg and "failed patches [" in msg
    assert any(str(i) in msg.split("failed patches")[1] for i in bad)
    # a store failing again and again: past max_bad_fraction of its reads
    with pytest.raises(DataError, match="max_bad_fraction=0.05") as e:
        list(build_loader(_one(url, max_bad_fraction=0.05)))
    m = re.search(r"(\d+) of \d+ reads failed", str(e.value))
    assert url in str(e.value) and m and int(m.group(1)) >= 2
    with pytest.raises(DataError, match="max_bad_fraction=0.0"):
        list(build_loader(_one(url, max_bad_fraction=0.0)))


def test_bad_inputs(stores, tmp_path):
    a, b = stores
    with pytest.raises(DataError, match="no patch store"):
        build_loader(DataConfig(sources=[SourceConfig(str(tmp_path / "missing.zarr"))]))
    old = str(tmp_path / "old.zarr")
    shutil.copytree(a["url"], old)
    g = zarr.open_group(old, mode="r+")
    g.attrs["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(DataError, match="schema_version"):
        build_loader(DataConfig(sources=[SourceConfig(old)], crop=16, band_window=24))
    empty = str(tmp_path / "empty.zarr")
    create_store(empty, sensor="emit", level="L2", wavelengths_nm=np.linspace(400, 900, 8), fwhm_nm=np.ones(8),
                 good_bands=np.ones(8, bool), patch_size=16)
    with pytest.raises(DataError, match="empty"):
        build_loader(DataConfig(sources=[SourceConfig(empty)], crop=16, band_window=4))
    with pytest.raises(DataError, match="weight"):
        SourceConfig(a["url"], weight=-1.0)
    with pytest.raises(DataError, match="sum"):
        DataConfig(sources=[SourceConfig(a["url"], weight=0.0), SourceConfig(b["url"], weight=0.0)])
    with pytest.raises(DataError, match="longer than every source"):
        build_loader(DataConfig(sources=[SourceConfig(a["url"]), SourceConfig(b["url"])], crop=16, band_window=36))
    with pytest.raises(DataError, match="subset"):
        build_loader(DataConfig(sources=[SourceConfig(a["url"], subset=25)], crop=16, band_window=24))
    with pytest.raises(DataError, match="crop"):
        build_loader(DataConfig(sources=[SourceConfig(a["url"])], crop=64, band_window=24))
    with pytest.raises(DataError, match="worker_type"):
        DataConfig(sources=[SourceConfig(a["url"])], worker_type="gpu")
    with pytest.raises(DataError, match="unknown data config"):
        DataConfig.from_dict({"sources": [{"url": a["url"]}], "batch": 3})
    cfg = DataConfig.from_dict({"sources": [{"url": a["url"], "weight": 2}], "crop": 16, "band_window": 24})
    assert cfg.sources[0].weight == 2.0 and isinstance(cfg.sources[0], SourceConfig)


def test_normalise_nan_and_invalid_become_zero():
    rng = np.random.default_rng(0)
    px = rng.uniform(0, 2, (5, 6, 6)).astype(np.float16)
    px[2, 1, 1] = np.nan
    valid = np.ones((6, 6), bool)
    valid[0, :] = False
    lo, hi = np.full(5, 0.2, np.float32), np.full(5, 1.5, np.float32)
    mean, inv = np.full(5, 0.8, np.float32), np.full(5, 2.0, np.float32)
    out = normalise(px, valid, BandScaling(lo, hi, mean, inv))[0]
    ref = (np.clip(px.astype(np.float64), 0.2, 1.5) - 0.8) * 2.0
    ref[2, 1, 1] = 0.0
    ref[:, 0, :] = 0.0
    np.testing.assert_allclose(out, ref, atol=1e-6)
    assert out.dtype == np.float32


def test_process_workers_reuse_shared_slots_without_aliasing(stores):
    """Process workers decode into a few reused shared-memory slots: batches kept by the consumer across many
    more batches than there are slots still equal the thread workers' (each was copied out before its slot was
    written again)."""
    from pretrain.data.loader import SHARED_SLOTS_PER_WORKER

    n = 4 * SHARED_SLOTS_PER_WORKER + 2
    for mode in ("workers", "device"):
        ref = _take(build_loader(_cfg(stores, num_workers=1, normalise_on=mode)), n)
        got = _take(build_loader(_cfg(stores, num_workers=1, worker_type="process", normalise_on=mode)), n)
        for x, y in zip(ref, got, strict=True):
            _same(x, y)
            assert "_release" not in y


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_close_stops_pipeline_threads_and_worker_processes(stores, kind):
    """A dropped loader's torchdata threads keep it alive and go on reading ahead; close() stops them now."""
    before = {p.pid for p in multiprocessing.active_children()}
    threads_before = set(threading.enumerate())
    loader = build_loader(_cfg(stores, num_workers=2, prefetch=2, worker_type=kind))
    it = iter(loader)
    next(it)
    # zarr's pool threads are the process's; multiprocessing's idle queue feeder ends with its queue
    mine = [t for t in threading.enumerate() if t not in threads_before
            and not t.name.startswith(("zarr", "QueueFeederThread"))]
    workers = [p for p in multiprocessing.active_children() if p.pid not in before]
    assert mine and (len(workers) == 2 if kind == "process" else not workers)
    loader.close()
    assert not [t.name for t in mine if t.is_alive()]
    assert not [p.pid for p in workers if p.is_alive()]


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_reused_batch_buffers_never_alias_a_batch_still_held(stores, kind, monkeypatch):
    """Thread workers decode, and CopyOut copies process workers' batches, into a few reused in-process buffers,
    each written again only once nothing references it: batches the consumer keeps still equal the copies taken
    when they were handed out, their memory is not handed out again while they are kept, the rest is reused, and
    every batch equals the batch of the path before the pool (a fresh tensor per batch)."""
    import pretrain.data.loader as loader_mod

    n = 3 * loader_mod.local_slots(1, 2)
    # one store: one batch shape, so no slot is replaced by one of another shape
    cfg = _cfg(stores, sources=[SourceConfig(stores[0]["url"])], num_workers=1, prefetch=2, worker_type=kind)

    def run():
        kept, copies, ptrs = {}, [], []
        for k, b in enumerate(build_loader(cfg)):
            copies.append({key: (v.clone() if isinstance(v, torch.Tensor) else v) for key, v in b.items()})
            ptrs.append((b["pixels"].data_ptr(), b["valid"].data_ptr()))
            if k in (0, 5):
                kept[k] = b
            if k == n - 1:
                break
        return kept, copies, ptrs

    kept, copies, ptrs = run()
    for k, b in kept.items():
        _same(b, copies[k])
        later = {p for pair in ptrs[k + 1:] for p in pair}
        assert not {b["pixels"].data_ptr(), b["valid"].data_ptr()} & later, k
    assert len({p for p, _ in ptrs}) <= loader_mod.local_slots(1, 2) < n  # the buffers were reused
    monkeypatch.setattr(loader_mod, "local_slots", lambda *a: 0)  # no pool: fresh tensors, the path before
    _, fresh, _ = run()
    for x, y in zip(copies, fresh, strict=True):
        _same(x, y)


def _copy_out(loader):
    from pretrain.data.loader import CopyOut

    node = loader._loader.root
    while not isinstance(node, CopyOut):
        node = node.source
    return node


def test_process_worker_batches_are_lent_without_a_copy_and_their_slots_freed_only_when_dropped(stores):
    """CopyOut lends a process worker's shared-memory slot to the consumer: the batch's tensors are the slot's own
    memory, not a copy. A batch (or just a view of it) the consumer keeps is never written again while the other
    slots cycle; once ``lend`` slots of the worker are lent, further batches are copied (never a wait, never an
    overwrite); dropping the kept batches frees their slots, and batches are lent again."""
    import gc

    from pretrain.data.loader import SHARED_SLOTS_PER_WORKER, local_slots

    lend = local_slots(0, 2)
    cfg = _cfg(stores, sources=[SourceConfig(stores[0]["url"])], num_workers=1, prefetch=2)
    n = 3 * (SHARED_SLOTS_PER_WORKER + lend)
    ref = _take(build_loader(cfg), n)  # thread workers: no shared slots
    process = dataclasses.replace(cfg, worker_type="process")

    def taker(loader):
        cp, it = _copy_out(loader), iter(loader)

        def take(k):
            b = next(it)
            _same(b, ref[k])
            held = list(cp._held)  # the slots' tensors as received from the worker
            lent = b["pixels"].data_ptr() in {t.data_ptr() for _, t, _ in held}
            assert lent == (b["valid"].data_ptr() in {v.data_ptr() for _, _, v in held})
            return b, lent
        return cp, take

    # the pool cycles while a batch and a view of another are kept
    loader = build_loader(process)
    cp, take = taker(loader)
    ptrs, lent = [], []
    for k in range(n):
        b, was_lent = take(k)
        ptrs.append(b["pixels"].data_ptr())
        lent.append(was_lent)
        if k == 0:
            kept = b
        if k == 1:
            view = b["pixels"][1:].numpy()  # a numpy view of the batch keeps its slot lent
    del b
    assert lent[0] and lent[1] and sum(lent) > n // 2  # handed out without a copy
    assert ptrs[0] not in ptrs[1:] and ptrs[1] not in ptrs[2:]  # kept slots are not handed out again
    assert len({p for p, was in zip(ptrs, lent, strict=True) if was}) < sum(lent)  # the other slots cycled
    _same(kept, ref[0])  # never overwritten
    assert np.array_equal(view, ref[1]["pixels"][1:].numpy())
    loader.close()
    del kept, view

    # everything kept: batches are lent until `lend` slots of the worker are out, then copied
    loader = build_loader(process)
    cp, take = taker(loader)
    held = [take(k) for k in range(lend + 4)]
    assert [was for _, was in held] == [True] * lend + [False] * 4
    assert cp.lent() == lend
    for k, (b, _) in enumerate(held):
        _same(b, ref[k])
    del held, b
    gc.collect()
    assert cp.lent() < lend  # dropped: their slots are free (batches read ahead since may be lent already)
    assert any(take(lend + 4 + k)[1] for k in range(6))  # and batches are lent again
    loader.close()


def test_copy_out_lends_a_slot_until_its_last_view_is_gone_and_copies_past_the_budget():
    """CopyOut on its own (no workers, so every step is deterministic): a lent batch views its slot, and the
    slot's busy flag is cleared only when the last tensor or view of both ``pixels`` and ``valid`` is gone; past
    ``lend`` lent slots of one worker a batch is copied and its slot freed at once; budgets are per worker."""
    import gc

    from pretrain.data.loader import CopyOut

    def slot(k):
        return (torch.ones(1, dtype=torch.int8), torch.full((2, 3, 4, 4), float(k)), torch.rand(2, 4, 4) > 0.5)

    slots = [slot(k) for k in range(5)]
    workers = [7, 7, 7, 8, 7]
    src = ({"pixels": px, "valid": va, "gsd": np.full(2, k, np.float32), "_release": (flag, w)}  # as received
           for k, ((flag, px, va), w) in enumerate(zip(slots, workers, strict=True)))
    cp = CopyOut(src, slots=2, lend=2)
    b = [cp.next() for _ in range(4)]
    flags = [int(f[0]) for f, _, _ in slots[:4]]
    assert flags == [1, 1, 0, 1] and cp.lent() == 3  # worker 7: two lent, the third copied; worker 8: lent
    for k, (_, px, va) in enumerate(slots[:4]):
        assert (b[k]["pixels"].data_ptr() == px.data_ptr()) == (k != 2)  # lent: the slot itself, no copy
        assert (b[k]["valid"].data_ptr() == va.data_ptr()) == (k != 2)
        assert torch.equal(b[k]["pixels"], px) and torch.equal(b[k]["valid"], va)
        assert isinstance(b[k]["gsd"], torch.Tensor) and "_release" not in b[k]
    view = b[0]["pixels"][1].numpy()  # a view of a lent batch keeps its slot busy
    valid1 = b[1]["valid"]
    del b
    gc.collect()
    assert [int(f[0]) for f, _, _ in slots[:4]] == [1, 1, 0, 0] and cp.lent() == 2
    del view
    assert int(slots[0][0][0]) == 0 and cp.lent() == 1
    del valid1
    assert int(slots[1][0][0]) == 0 and cp.lent() == 0
    b4 = cp.next()
    assert b4["pixels"].data_ptr() == slots[4][1].data_ptr() and cp.lent() == 1  # lent again
    cycle = {"batch": b4}
    cycle["self"] = cycle  # freed only by the cyclic collector, which any allocation may start, lock held or not
    del b4, cycle

    def collect_holding_the_lock():
        with cp._lock:
            gc.collect()

    t = threading.Thread(target=collect_holding_the_lock, daemon=True)
    t.start()
    t.join(30)
    assert not t.is_alive()  # no deadlock
    assert int(slots[4][0][0]) == 0 and cp.lent() == 0

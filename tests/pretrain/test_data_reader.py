"""pretrain.data reads: window segments, decoders, device-side normalisation (real tiny Zarr stores)."""

import numpy as np
import pytest
import torch
import zarr

from pretrain.data import (
    DataConfig,
    SourceConfig,
    build_loader,
    finish_batch,
    touched_elements,
    window_segments,
)
from pretrain.data.reader import open_store

from .data_fixtures import make_store

# 48 bands, band chunk 8: bands 16..31 (two whole chunks) and 36 (inside a chunk) are bad
GOOD = np.ones(48, bool)
GOOD[16:32] = False
GOOD[36] = False


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(str(tmp_path_factory.mktemp("reader") / "emit_L2.zarr"), n=12, bands=48, good=GOOD)


def test_window_segments_skip_bad_chunks_and_gather_inside_one():
    sel = np.flatnonzero(GOOD)  # 0..15, 32..35, 37..47
    segs = window_segments(sel, 8)
    assert [(o, r0, r1) for o, r0, r1, _ in segs] == [(0, 0, 16), (16, 32, 48)]
    assert segs[0][3] is None  # contiguous: decoded in place
    np.testing.assert_array_equal(segs[1][3], sel[16:] - 32)  # band 36 decoded and dropped
    # every touched chunk holds a selected band; none is touched twice
    chunks = [c for _, r0, r1, _ in segs for c in range(r0 // 8, (r1 - 1) // 8 + 1)]
    assert sorted(chunks) == sorted(set(chunks)) == sorted(set(sel // 8))
    assert touched_elements((1, 8, 8, 8), sel, 0, 0, 16) == 4 * 8 * 16 * 16  # 4 chunks of 8 bands, not 6
    assert touched_elements((1, 8, 8, 8), sel, 4, 0, 16) == 4 * 8 * 24 * 16  # off-grid crop: one more row


def _loader(url, **kw):
    base = dict(sources=[SourceConfig(url)], batch_size=3, crop=16, band_window=20, band_stride=8, epochs=1,
                num_workers=2, sensor_dropout=0.0, seed=1)  # seed 1: windows at 0 and 8
    base.update(kw)
    return build_loader(DataConfig(**base))


def _reference(st, bt, j):
    i, y0, x0, w0 = (bt["meta"][k][j] for k in ("index", "crop_y", "crop_x", "band_start"))
    sel = np.flatnonzero(st["good"])[w0:w0 + 20]
    x = st["pixels"][i][sel][:, y0:y0 + 16, x0:x0 + 16].astype(np.float64)
    s = st["stats"]
    x = (np.clip(x, s.p01[sel, None, None], s.p99[sel, None, None]) - s.mean[sel, None, None]) / s.std[sel, None, None]
    x[:, ~st["valid"][i, y0:y0 + 16, x0:x0 + 16]] = 0
    return x


@pytest.mark.parametrize("decoder", ["zarrs", "zarr"])
def test_reads_across_skipped_and_gathered_bands_match_numpy(store, decoder):
    batches = list(_loader(store["url"], decoder=decoder))
    starts = {b["meta"]["band_start"][0] for b in batches}
    assert len(batches) == 4 and starts == {0, 8}, starts  # 0: skips 2 bad chunks; 8: also drops band 36
    for bt in batches:
        for j in range(3):
            np.testing.assert_allclose(bt["pixels"][j].numpy(), _reference(store, bt, j), atol=2e-4, rtol=1e-4)


def test_decoders_give_identical_batches_and_zarrs_is_used_locally(store):
    assert type(open_store(store["url"]).patches.async_array.codec_pipeline).__name__ == "ZarrsCodecPipeline"
    assert type(open_store(store["url"], decoder="zarr").patches.async_array.codec_pipeline).__name__ \
        == "BatchedCodecPipeline"
    a, b = list(_loader(store["url"], decoder="zarrs")), list(_loader(store["url"], decoder="zarr"))
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x["pixels"], y["pixels"]) and torch.equal(x["valid"], y["valid"])


def test_chunks_of_bad_bands_only_are_never_decoded(store, monkeypatch):
    """zarr-python's pipeline (decoder='zarr') lets us count the chunk decodes: exactly the segment rule's."""
    from zarr.codecs.blosc import BloscCodec

    calls = []
    orig = BloscCodec._decode_sync

    def counting(self, data, spec):
        calls.append(tuple(spec.shape))
        return orig(self, data, spec)

    monkeypatch.setattr(BloscCodec, "_decode_sync", counting)
    loader = _loader(store["url"], decoder="zarr", num_workers=0)
    expected = 0
    chunks = tuple(zarr.open_group(store["url"], mode="r")["patches"].chunks)
    for bt in loader.batches():
        for j in range(3):
            sel = np.flatnonzero(GOOD)[bt["meta"]["band_start"][j]:][:20]
            n = touched_elements(chunks, sel, bt["meta"]["crop_y"][j], bt["meta"]["crop_x"][j], 16)
            expected += n // (chunks[1] * chunks[2] * chunks[3]) + (16 // 8) ** 2  # patches + valid chunks
    decoded = [c for c in calls if c in ((1, 8, 8, 8), (1, 8, 8))]  # patches and valid chunks (not meta)
    assert len(decoded) == expected
    whole_range = 0  # what reading each window's contiguous raw band range would have decoded
    for bt in loader.batches():
        sel = np.flatnonzero(GOOD)[bt["meta"]["band_start"][0]:][:20]
        whole_range += 3 * ((sel[-1] // 8 - sel[0] // 8 + 1) * 4 + 4)
    assert expected < whole_range


def test_device_normalisation_equals_worker_normalisation(store):
    """normalise_on='device': workers hand out the stored FP16 values + norm; finish_batch gives the same batch."""
    ref = list(_loader(store["url"], normalise_on="workers"))
    dev_loader = _loader(store["url"], normalise_on="device")
    raw = list(dev_loader.batches())
    got = list(_loader(store["url"], normalise_on="device"))  # iterating finishes on the loader's device (CPU)
    for r, w, g in zip(ref, raw, got, strict=True):
        assert "pixels" not in w and w["raw"].dtype == torch.float16 and w["norm"].shape == (3, 4, 20)
        for j in range(3):
            i, y0, x0 = (w["meta"][k][j] for k in ("index", "crop_y", "crop_x"))
            sel = np.flatnonzero(GOOD)[w["meta"]["band_start"][j]:][:20]
            np.testing.assert_array_equal(w["raw"][j].numpy(), store["pixels"][i][sel][:, y0:y0 + 16, x0:x0 + 16])
        f = finish_batch(w)
        assert set(f) == set(r) and f["pixels"].dtype == torch.float32
        torch.testing.assert_close(f["pixels"], r["pixels"], atol=1e-6, rtol=0)
        torch.testing.assert_close(g["pixels"], r["pixels"], atol=1e-6, rtol=0)
        assert r["meta"] == g["meta"]


def test_finish_batch_zeroes_nan_and_invalid():
    raw = torch.tensor([[[[0.5, float("nan")], [2.0, -1.0]]]], dtype=torch.float16)  # [1,1,2,2]
    valid = torch.tensor([[[True, True], [True, False]]])
    norm = torch.tensor([[[0.0], [1.0], [0.5], [2.0]]])  # lo, hi, mean, 1/std for the one band
    out = finish_batch({"raw": raw, "valid": valid, "norm": norm, "meta": {"x": [1]}})
    torch.testing.assert_close(out["pixels"], torch.tensor([[[[0.0, 0.0], [1.0, 0.0]]]]))
    assert out["meta"] == {"x": [1]} and "raw" not in out and "norm" not in out


def test_per_granule_band_tables_reach_the_batch_and_are_read_once_per_granule(tmp_path, monkeypatch):
    """A granule that keeps its own band table (calibration moved its centres) gives its samples that table; the
    reader asks the store for it once per granule, not once per sample (each ask opened meta/granule again)."""
    from data_prep.store import PatchStore, StoreWriter

    info = make_store(str(tmp_path / "emit_L2.zarr"), n=8, bands=48, good=GOOD, granules=1)
    w = StoreWriter.open(info["url"])
    rng = np.random.default_rng(5)
    px = (rng.standard_normal((8, 48, 32, 32)) + 2).astype(np.float16)
    start = w.begin()
    w.write(start, px, np.ones((8, 32, 32), bool))
    own_wl, own_fw = info["wavelengths"] + 7.0, info["fwhm"] + 0.5
    w.commit(granule_id="emit-shifted", source="/src/shifted", start=start, count=8,
             meta={"row": np.arange(8) * 32, "col": np.zeros(8), "lat": np.full(8, 34.0), "lon": np.full(8, -118.0),
                   "time": np.zeros(8), "gsd": np.full(8, 30.0), "valid_fraction": np.ones(8)},
             entry={"wavelengths_nm": own_wl.tolist(), "fwhm_nm": own_fw.tolist()})
    calls = []
    orig = PatchStore.band_table
    monkeypatch.setattr(PatchStore, "band_table", lambda self, i: calls.append(i) or orig(self, i))
    cfg = DataConfig(sources=[SourceConfig(info["url"])], batch_size=4, crop=16, band_window=20, band_stride=4,
                     num_workers=0, epochs=3)
    good = np.flatnonzero(GOOD)
    n = 0
    for b in build_loader(cfg):
        for j, i in enumerate(b["meta"]["index"]):
            sel = good[b["meta"]["band_start"][j]:b["meta"]["band_start"][j] + 20]
            wl, fw = (own_wl, own_fw) if i >= 8 else (info["wavelengths"], info["fwhm"])
            np.testing.assert_allclose(b["wavelengths"][j].numpy(), wl[sel].astype(np.float32))
            np.testing.assert_allclose(b["fwhm"][j].numpy(), fw[sel].astype(np.float32))
            n += 1
    assert n == 3 * 16
    assert len(calls) == 2, calls  # one per granule for 48 samples


def test_shared_batch_slots_are_reused_only_once_released():
    from pretrain.data.reader import BatchBuffers

    pool = BatchBuffers(2, shared=True)
    a_px, a_va, a_flag = pool.take((2, 3, 4, 4), torch.float16)
    b_px, _, b_flag = pool.take((2, 3, 4, 4), torch.float16)
    assert a_px.is_shared() and a_va.is_shared() and a_va.shape == (2, 4, 4) and a_va.dtype == torch.bool
    assert a_px.data_ptr() != b_px.data_ptr()
    c_px, _, c_flag = pool.take((2, 3, 4, 4), torch.float16)  # both busy: a fresh, unpooled tensor
    assert c_flag is None and not c_px.is_shared() and c_px.data_ptr() not in (a_px.data_ptr(), b_px.data_ptr())
    b_flag[0] = 0  # the training process copied slot b out
    d_px, _, d_flag = pool.take((2, 3, 4, 4), torch.float16)
    assert d_px.data_ptr() == b_px.data_ptr() and int(d_flag[0]) == 1
    a_flag[0] = 0
    e_px, _, e_flag = pool.take((2, 5, 4, 4), torch.float16)  # another shape replaces a free slot
    assert e_flag is not None and e_px.shape == (2, 5, 4, 4) and e_px.is_shared()


def test_local_batch_slots_are_reused_once_nothing_references_them():
    from pretrain.data.reader import BatchBuffers

    pool = BatchBuffers(2, shared=False)
    a_px, a_va, flag = pool.take((2, 3, 4, 4), torch.float32)
    assert flag is None and not a_px.is_shared() and a_va.shape == (2, 4, 4) and a_va.dtype == torch.bool
    ptr = a_px.data_ptr()
    view = a_px[1, :2].numpy()  # a view (here a numpy one) of the batch keeps its slot busy
    del a_px
    b_px, b_va, _ = pool.take((2, 3, 4, 4), torch.float32)
    assert b_px.data_ptr() != ptr
    c_px, _, _ = pool.take((2, 3, 4, 4), torch.float32)  # both slots busy: a fresh tensor
    assert c_px.data_ptr() not in (ptr, b_px.data_ptr())
    del view, a_va
    d_px, _, _ = pool.take((2, 3, 4, 4), torch.float32)
    assert d_px.data_ptr() == ptr
    del b_px, b_va
    e_px, _, _ = pool.take((2, 3, 4, 4), torch.float16)  # another dtype replaces the free slot
    assert e_px.dtype == torch.float16 and e_px.shape == (2, 3, 4, 4)


def test_zarrs_open_leaves_zarr_a_thread_pool_for_parallel_decodes(tmp_path):
    """Opening a store under the zarrs config (one Rust thread per read) must not make zarr's process-wide pool,
    on which every decode runs, one thread wide: N loader threads would decode one read at a time. Checked in a
    fresh interpreter (the pool is made once per process)."""
    import subprocess
    import sys

    info = make_store(str(tmp_path / "emit_L2.zarr"), n=2, bands=16)
    code = ("import zarr.core.sync as zs; from pretrain.data.reader import open_store, ZARR_EXECUTOR_THREADS; "
            f"s = open_store({info['url']!r}, decoder='zarrs'); s.patches[0, 0:8, 0:8, 0:8]; "
            "assert type(s.patches.async_array.codec_pipeline).__name__ == 'ZarrsCodecPipeline'; "
            "print(zs._executor._max_workers, ZARR_EXECUTOR_THREADS)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert int(out[0]) == int(out[1]) >= 2, out


def _task(key, i, y0, x0, w0):
    """One read task of the reader: patch ``i``, crop corner ``(y0, x0)``, a 20-band window from raw band ``w0``."""
    return {"key": key, "index": i, "epoch": 0, "step": 0, "j": 0, "y0": y0, "x0": x0, "w0": w0, "wn": 20,
            "ws": 1, "drop": False}


def test_one_lost_inner_chunk_is_found_by_the_per_chunk_probe(tmp_path):
    """The missing-chunk check looks at one element of every decoded chunk: an inner chunk lost from a shard (it
    reads as NaN in all its elements) that is neither the crop's first spatial chunk nor the window's first band
    chunk is found; a read that does not touch it is clean."""
    from data_prep.store import PatchStore
    from pretrain.data.reader import SampleReader, tables_from_store

    info = make_store(str(tmp_path / "emit_L2.zarr"), n=6, bands=48, good=GOOD)
    arr = zarr.open_array(f"{info['url']}/patches", mode="r+")
    arr[3, 8:16, 8:16, 16:24] = np.nan  # the whole inner chunk is the fill value: zarr drops it from the shard
    key = "0:emit_L2"
    reader = SampleReader({key: tables_from_store(PatchStore(info["url"]))}, 16, substitutes=None,
                          normalise_on="device")

    hit = reader([_task(key, 3, 4, 12, 2)])  # raw bands 2..15 + 32..37: band chunk 1 is its 2nd; (8, 16) its 2nd x 2nd
    assert "_fatal" in hit and "MissingDataError" in hit["_fatal"] and "patch 3" in hit["_fatal"], hit.get("_fatal")
    for t in (_task(key, 3, 16, 12, 2), _task(key, 2, 4, 12, 2), _task(key, 3, 4, 12, 16)):  # other rows / patch / bands
        ok = reader([t])
        assert "_fatal" not in ok and not ok.get("_bad") and not torch.isnan(ok["raw"]).any()


@pytest.mark.parametrize("mode", ["device", "workers"])
def test_a_sample_is_decoded_in_one_round_trip_to_zarrs_loop(store, monkeypatch, mode):
    """The band segments and the valid mask of one sample are awaited in one coroutine (one ``sync``; they were one
    ``get_basic_selection`` each, 3 here): the same batch as read by zarr's own calls, gathered band included."""
    from data_prep.store import PatchStore
    from pretrain.data import reader as rd

    key = "0:emit_L2"
    r = rd.SampleReader({key: rd.tables_from_store(PatchStore(store["url"]))}, 16, substitutes=None,
                        normalise_on=mode)
    # window at 8: raw bands 8..15 (in place) and 32..47 without 36 (decoded, then gathered); crops off the grid
    tasks = [_task(key, i, y0, x0, 8) for i, y0, x0 in ((1, 0, 0), (5, 8, 16), (11, 16, 4))]
    r.store(key)  # opened first (opening goes through zarr's loop too)
    calls = []
    real = rd.zarr_sync
    monkeypatch.setattr(rd, "zarr_sync", lambda coro: calls.append(1) or real(coro))
    got = r(tasks)
    assert len(calls) == len(tasks) and "_bad" not in got
    monkeypatch.setattr(rd, "ONE_ROUND_TRIP", False)  # zarr's calls, one per read
    ref = r(tasks)
    assert len(calls) == len(tasks)  # nothing more went through the one-trip path
    px = "raw" if mode == "device" else "pixels"
    assert torch.equal(got[px], ref[px]) and torch.equal(got["valid"], ref["valid"])
    sel = np.flatnonzero(GOOD)[8:28]
    for j, (i, y0, x0) in enumerate((t["index"], t["y0"], t["x0"]) for t in tasks):
        np.testing.assert_array_equal(got["valid"][j].numpy(), store["valid"][i, y0:y0 + 16, x0:x0 + 16])
        if mode == "device":
            np.testing.assert_array_equal(got["raw"][j].numpy(), store["pixels"][i][sel][:, y0:y0 + 16, x0:x0 + 16])


def test_a_lost_valid_chunk_is_found_and_its_fill_never_reaches_the_batch(tmp_path):
    """valid is decoded straight into the batch's bool tensor: a patch whose valid shard is lost (it reads 255,
    the fill value) is a failed read (MissingDataError) and is replaced; the batch's valid holds only 0/1, that of
    the substitute."""
    from pathlib import Path

    from data_prep.store import PatchStore
    from pretrain.data.reader import SampleReader, tables_from_store
    from pretrain.data.sampling import StoreInfo, Substitutes

    info = make_store(str(tmp_path / "emit_L2.zarr"), n=6, bands=48, good=GOOD)
    Path(info["url"], "valid", "c", "2", "0", "0").unlink()
    key = "0:emit_L2"
    st = PatchStore(info["url"])
    tab = tables_from_store(st)
    subs = Substitutes({key: StoreInfo(key=key, url=info["url"], tag=0, n_patches=6, patch_size=32,
                                       good_idx=tab.good_idx, spatial_chunk=8)},
                       {key: np.array([4])}, seed=0, crop=16, crop_align=8, sensor_dropout=0.0)
    reader = SampleReader({key: tab}, 16, substitutes=subs, normalise_on="device", max_batch_bad=0.5)
    got = reader([_task(key, 1, 0, 0, 0), _task(key, 2, 8, 8, 0), _task(key, 3, 0, 8, 0)])
    assert "_fatal" not in got and len(got["_bad"]) == 1
    assert got["_bad"][0]["index"] == 2 and "'valid' reads 255" in got["_bad"][0]["error"]
    assert got["meta"]["index"] == [1, 4, 3] and got["_bad"][0]["replaced_by"] == 4
    assert set(got["valid"].numpy().view(np.uint8).ravel().tolist()) <= {0, 1}
    y0, x0 = got["meta"]["crop_y"][1], got["meta"]["crop_x"][1]
    np.testing.assert_array_equal(got["valid"][1].numpy(), info["valid"][4, y0:y0 + 16, x0:x0 + 16])

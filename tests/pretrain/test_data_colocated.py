"""Co-located group batches (pretrain.data.colocated) and the co-located JEPA objective, on the session's
simulated products (tests/conftest.py ``colocated_root``: 3 locations x EnMAP, EMIT, Sentinel-2, PlanetScope)."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
import torch

from data_prep.store import PatchStore
from pretrain.data import DataConfig, DataError, SourceConfig, build_loader
from pretrain.models import build_model

SIDE = 480.0  # metres of the common square


def _cfg(root, **kw) -> DataConfig:
    co = {"global_sensors": ["enmap", "sentinel-2"], "local_sensors": ["emit", "enmap", "planetscope"],
          "local_views": 2, "footprint_m": SIDE}
    co.update(kw.pop("colocated", {}))
    base = dict(sources=[SourceConfig(str(root / f"{s}_L2.zarr")) for s in ("enmap", "emit", "sentinel-2",
                                                                             "planetscope")],
                batch_size=1, band_window=24, band_stride=8, num_workers=1, sensor_dropout=0.0, colocated=co)
    base.update(kw)
    return DataConfig(**base)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def test_group_views_cover_the_same_ground(colocated_root):
    root = colocated_root["stores"]
    loader = build_loader(_cfg(root, epochs=1))
    assert loader.locations == 3 and loader.num_batches == 3
    assert loader.view_sides["global"] == {"enmap": 16, "sentinel-2": 48}  # token grids differ: 2x2 and 6x6
    batches = list(loader)
    seen = sorted(int(b["location"][0]) for b in batches)
    assert seen == [0, 1, 2]
    globals_ = {}
    for b in batches:
        assert b["n_global"] == 2 and len(b["views"]) == 4
        fp = b["footprint"][0].numpy()
        for v in b["views"]:
            s = PatchStore(v["meta"]["url"][0])
            i = v["meta"]["index"][0]
            h, w = v["pixels"].shape[-2:]
            g = v["ground"][0].double().numpy()
            corners = g @ np.array([[0, w, 0, w], [0, 0, h, h], [1, 1, 1, 1]], dtype=np.float64)
            if v["role"] == "global":  # the crop covers the common square, to the pixel (rounding + misregistration)
                gsd = float(v["gsd"][0])
                assert np.allclose(corners, [[0, SIDE, 0, SIDE], [0, 0, SIDE, SIDE]], atol=1.5 * gsd)
            else:  # a local crop lies inside it
                assert corners.min() > -1.5 * float(v["gsd"][0]) and corners.max() < SIDE + 1.5 * float(v["gsd"][0])
            # checked from the store's footprints: the patch the view was cut from contains the common square
            b_ = [float(s.meta(k)[i]) for k in ("lon_min", "lat_min", "lon_max", "lat_max")]
            assert b_[0] < fp[0] < fp[2] < b_[2] and b_[1] < fp[1] < fp[3] < b_[3]
        globals_[int(b["location"][0])] = b["views"][:2]
    # and they show the same ground: EnMAP's band next to a Sentinel-2 band correlates with that band at 30 m
    same, other = [], []
    for loc, (en, _s2) in globals_.items():
        for loc2, (_, s2b) in globals_.items():
            wl_e, wl_s = en["wavelengths"][0].numpy(), s2b["wavelengths"][0].numpy()
            k = int(np.argmin(np.abs(wl_s[:, None] - wl_e[None, :]).min(1)))
            j = int(np.argmin(np.abs(wl_e - wl_s[k])))
            a = en["pixels"][0, j].numpy()
            c = s2b["pixels"][0, k].numpy().reshape(16, 3, 16, 3).mean((1, 3))
            (same if loc == loc2 else other).append(_corr(a, c))
    print("same-place correlation", np.round(same, 3), "other places", np.round(other, 3))
    assert min(same) > 0.6 and min(same) > max(other)


def _same(a: dict, b: dict) -> None:
    assert torch.equal(a["location"], b["location"]) and a["meta"] == b["meta"]
    for va, vb in zip(a["views"], b["views"]):
        for k in ("pixels", "wavelengths", "band_mask", "valid", "sensor", "ground"):
            assert torch.equal(va[k], vb[k]), k
        assert va["meta"] == vb["meta"]


def test_exact_resume_in_colocated_mode(colocated_root):
    cfg = _cfg(colocated_root["stores"], epochs=3, prefetch=2)
    ref = build_loader(cfg)
    it = iter(ref)
    for _ in range(2):
        next(it)
    buf = io.BytesIO()
    torch.save(ref.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    expected = [next(it) for _ in range(4)]  # crosses an epoch boundary (3 batches per epoch)
    resumed = build_loader(cfg)
    resumed.load_state_dict(state)
    got = [b for _, b in zip(range(4), resumed)]
    for e, g in zip(expected, got):
        _same(e, g)
    assert got[0]["meta"]["step"][0] == 2
    # local views differ between epochs (sensor per batch and slot, position per location)
    assert any(e["views"][2]["sensor_name"] != g["views"][2]["sensor_name"] or
               not torch.equal(e["views"][2]["ground"], g["views"][2]["ground"]) for e, g in zip(expected, expected[1:]))


def test_two_ranks_take_disjoint_locations(colocated_root, tmp_path):
    cfg = _cfg(colocated_root["stores"], epochs=1)
    a = [int(b["location"][0]) for b in build_loader(cfg, rank=0, world_size=2)]
    b = [int(b["location"][0]) for b in build_loader(cfg, rank=1, world_size=2)]
    assert len(a) == len(b) == 1 and not set(a) & set(b)  # 3 locations: one each, the remainder dropped
    with pytest.raises(DataError, match="cannot give one batch"):
        build_loader(_cfg(colocated_root["stores"], batch_size=2), rank=0, world_size=2)
    with pytest.raises(DataError, match="no store among data.sources"):
        build_loader(_cfg(colocated_root["stores"], colocated={"global_sensors": ["desis"]}))


def test_a_bad_read_substitutes_the_whole_location(colocated_root, tmp_path):
    import json

    root = tmp_path / "stores"
    shutil.copytree(colocated_root["stores"], root)
    # the shard of EnMAP patch 1 is lost: its location's groups are replaced by other locations
    lost = [p for p in (root / "enmap_L2.zarr" / "patches" / "c" / "1").rglob("*") if p.is_file()]
    assert lost
    for p in lost:
        p.unlink()
    idx = json.loads((root / "locations.json").read_text())
    k = next(n for n, st in enumerate(idx["stores"]) if st["name"] == "enmap_L2.zarr")
    bad_loc = next(loc["id"] for loc in idx["locations"] if [k, 1] in [m[:2] for m in loc["members"]])
    batches = list(build_loader(_cfg(root, epochs=2, max_bad_fraction=0.5, max_bad_batch_fraction=1.0)))
    assert len(batches) == 6  # the batch count never changes
    replaced = [b for b in batches if b["meta"]["replaces"][0] != -1]
    assert len(replaced) == 2 and all(b["meta"]["replaces"][0] == bad_loc for b in replaced)
    assert all(int(b["location"][0]) != bad_loc for b in batches)
    with pytest.raises(DataError, match="enmap_L2.zarr"):  # past the limit: a clear error naming the store
        list(build_loader(_cfg(root, epochs=2, max_bad_fraction=0.0, max_bad_batch_fraction=1.0)))


def test_jepa_loss_falls_on_group_batches_and_features_fuse_views(colocated_root):
    loader = build_loader(_cfg(colocated_root["stores"], batch_size=2))
    torch.manual_seed(0)
    model = build_model("debug", objective="jepa", fusion_depth=1, gsd_pos=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    it = iter(loader)
    fixed = next(it)
    losses = []
    for step in range(12):
        out = model(fixed if step % 2 == 0 else next(it))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        model.update_target(0.996)
        if step % 2 == 0:
            losses.append(float(out["loss"].detach()))
    print("co-located JEPA loss", np.round(losses, 4))
    assert losses[-1] < 0.7 * losses[0]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.fusion.parameters())
    enc = model.encoder.eval()
    with torch.no_grad():
        f = enc.features(views=fixed["views"][:2], layers=(0, -1))
        # per sample: the second location's fused tokens do not change when the first is left out
        one = enc.features(views=[{k: (v[1:] if isinstance(v, torch.Tensor) else v) for k, v in view.items()}
                                  for view in fixed["views"][:2]], layers=(0, -1))
    assert [tuple(x.shape) for x in f] == [(2, 4, 64), (2, 4, 64)]  # the first view's (EnMAP's) 2x2 grid
    torch.testing.assert_close(f[1][1:], one[1], atol=1e-5, rtol=1e-5)


def test_group_jepa_adds_the_decorrelation_term_over_the_local_views(colocated_root):
    """cond_decorrelation (issue 11) on a group batch: the term of the local views' band conditions, with its weight."""
    batch = next(iter(build_loader(_cfg(colocated_root["stores"], batch_size=2))))
    torch.manual_seed(0)
    plain = build_model("debug", objective="jepa", fusion_depth=1)
    torch.manual_seed(0)
    dec = build_model("debug", objective="jepa", fusion_depth=1, cond_decorrelation=0.5)
    dec.load_state_dict(plain.state_dict())
    a, b = plain(batch), dec(batch)
    assert "cond_decorrelation" not in a and 0.0 < float(b["cond_decorrelation"]) <= 1.0
    torch.testing.assert_close(b["loss"], a["loss"] + 0.5 * b["cond_decorrelation"], atol=1e-5, rtol=1e-5)
    b["loss"].backward()
    assert dec.encoder.meta.wl_proj.weight.grad.abs().sum() > 0
    # the trainer's instruments take a group batch (its first view's band conditions)
    from pretrain.instruments import record

    rec = record(dec, batch, b)
    assert 0.0 < rec["cond_similarity"] <= 1.0 and rec["band_map_rank"] >= 1.0

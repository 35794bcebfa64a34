"""Co-located data: simulate --colocated, footprints kept by ingest, the location index (colocate), inspect.

The products come from the session fixture ``colocated_root`` (tests/conftest.py: the three commands)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import shapely

from data_prep import colocate as co
from data_prep.cli import main
from data_prep.formats import open_product
from data_prep.simulate.colocated import METRES_PER_DEGREE
from data_prep.store import PatchStore


def _polygon(store: PatchStore, i: int):
    g = [float(store.meta(f"geo_{j}")[i]) for j in range(6)]
    p = store.patch_size
    xy = [(g[0] + g[1] * x + g[2] * y, g[3] + g[4] * x + g[5] * y) for x, y in ((0, 0), (p, 0), (p, p), (0, p))]
    return shapely.Polygon(xy)


def _loc_of(store: PatchStore, i: int) -> str:
    """The simulated location a patch came from (its granule's product path)."""
    gid = list(store.attrs["granules"])[int(store.meta("granule")[i])]
    return re.search(r"loc\d{3}", store.attrs["granules"][gid]["source"]).group(0)


def test_products_see_the_same_ground_at_their_own_gsd(colocated_root):
    man = colocated_root["manifest"]
    assert man["kind"] == "colocated" and len(man["locations"]) == 3
    for loc in man["locations"]:
        lat0, lon0 = loc["centre"]
        assert {p["sensor"] for p in loc["products"]} == set(colocated_root["sensors"])
        times = []
        for p in loc["products"]:
            g = open_product(colocated_root["raw"] / p["path"])
            assert g.shape[1:] == (p["rows"], p["cols"]) and abs(g.gsd_m - p["gsd_m"]) < 0.05 * p["gsd_m"]
            assert p["rows"] * p["gsd_m"] == pytest.approx(960, rel=0.02)
            # the written geolocation = true grid + the misregistration the manifest records (about a pixel)
            n = float(np.nanmean(g.lat)) - lat0
            e = float(np.nanmean(g.lon)) - lon0
            north, east = n * METRES_PER_DEGREE, e * METRES_PER_DEGREE * np.cos(np.deg2rad(lat0))
            want_e = p["shift_m"][0] + p["misregistration_m"][0]
            want_n = p["shift_m"][1] + p["misregistration_m"][1]
            assert abs(east - want_e) < 0.6 * p["gsd_m"] and abs(north - want_n) < 0.6 * p["gsd_m"]
            assert np.hypot(*p["misregistration_m"]) < 4 * p["gsd_m"]
            times.append(g.acquisition_time)
        span = (max(times) - min(times)).total_seconds()
        assert 0 < span < 6 * 86400  # small time offsets, distinct acquisitions


def test_ingest_keeps_footprints_that_contain_the_patch_pixels(colocated_root):
    s = PatchStore(str(colocated_root["stores"] / "sentinel-2_L2.zarr"))
    b = np.stack([s.meta(k) for k in ("lon_min", "lat_min", "lon_max", "lat_max")], 1)
    assert np.isfinite(b).all() and (b[:, 0] < b[:, 2]).all() and (b[:, 1] < b[:, 3]).all()
    # the patch's centre (meta lat/lon, from the product's own geolocation) lies in its footprint, near the middle
    lat, lon = s.meta("lat"), s.meta("lon")
    assert ((b[:, 0] < lon) & (lon < b[:, 2]) & (b[:, 1] < lat) & (lat < b[:, 3])).all()
    mid = (b[:, 0] + b[:, 2]) / 2
    assert np.abs(mid - lon).max() < 0.1 * (b[:, 2] - b[:, 0]).min()
    side = (b[:, 3] - b[:, 1]) * METRES_PER_DEGREE
    assert side == pytest.approx(np.full_like(side, 960.0), rel=0.03)  # 96 px of 10 m


def test_locations_really_overlap_on_the_ground(colocated_root):
    root = colocated_root["stores"]
    idx = co.read_index(str(root), check=True)
    assert len(idx["locations"]) == 3
    stores = [PatchStore(str(root / s["name"])) for s in idx["stores"]]
    for loc in idx["locations"]:
        assert loc["sensors"] == sorted(colocated_root["sensors"]) and loc["overlap"] >= idx["min_overlap"]
        polys = [_polygon(stores[s], p) for s, p, _ in loc["members"]]
        common = polys[0]
        for q in polys[1:]:
            common = common.intersection(q)
        smallest = min(q.area for q in polys)
        assert common.area / smallest == pytest.approx(loc["overlap"], rel=0.02)  # cos(lat) scale cancels
        cb = np.array(common.bounds)
        assert np.allclose(cb, loc["bounds"], atol=1e-7)
        # every member is the same simulated place (the truth the footprints were not told)
        assert len({_loc_of(stores[s], p) for s, p, _ in loc["members"]}) == 1


def test_rerun_writes_the_same_bytes_and_an_interrupted_run_keeps_the_previous_index(colocated_root, monkeypatch):
    root = colocated_root["stores"]
    path = root / co.INDEX_NAME
    before = path.read_bytes()
    assert main(["colocate", str(root), "--no-progress"]) == 0
    assert path.read_bytes() == before
    import os

    def killed(*a, **k):
        raise KeyboardInterrupt  # as a kill between writing the new index and putting it in place

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        co.colocate(str(root), min_overlap=0.9)  # another index would come out
    assert path.read_bytes() == before
    assert json.loads(before)["min_overlap"] == 0.5


def test_inspect_reports_locations_and_a_stale_index_is_refused(colocated_root, tmp_path, capsys):
    import shutil

    root = tmp_path / "stores"
    shutil.copytree(colocated_root["stores"], root)
    assert main(["inspect", str(root), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    loc = out["locations"]
    assert loc["locations"] == 3 and loc["sensors_per_location"] == {"5": 3} and not loc["stale"]
    assert 0.5 <= loc["overlap"]["min"] <= loc["overlap"]["max"] <= 1.0
    # a store changed since the index was built (here: removed): stale, and the loader's check refuses it
    shutil.rmtree(root / "emit_L2.zarr")
    assert main(["inspect", str(root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["locations"]["stale"]
    with pytest.raises(co.LocationIndexError, match="stale"):
        co.read_index(str(root), check=True)


def test_colocate_errors(tmp_path):
    assert main(["colocate", str(tmp_path / "nowhere")]) == 2
    with pytest.raises(co.LocationIndexError, match="no location index"):
        co.read_index(str(tmp_path))

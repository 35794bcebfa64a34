"""WebDataset export reads back with webdataset, same pixels and metadata as the store."""

from __future__ import annotations

import json

import numpy as np
import webdataset as wds

from data_prep import store as st
from data_prep.ingest import ingest_granules
from data_prep.store import PatchStore
from data_prep.wds import export_wds
from tests.data_prep.test_ingest import make_cube, make_granule


def test_export_round_trip(tmp_path):
    root = str(tmp_path / "root")
    ingest_granules([make_granule(make_cube(rows=64, cols=64), "gA")], root, patch_size=32, progress=False)
    url = st.store_url(root, "enmap", "L2")
    res = export_wds(url, tmp_path / "wds", maxcount=3, progress=False)
    assert res["samples"] == 4 and len(res["shards"]) == 2
    s = PatchStore(url)
    ds = wds.WebDataset([str(p) for p in sorted((tmp_path / "wds").glob("*.tar"))], shardshuffle=False).decode()
    samples = list(ds)
    assert len(samples) == 4
    for i, smp in enumerate(samples):
        px, valid = s.read(i)
        assert smp["pixels.npy"].dtype == np.float16
        np.testing.assert_array_equal(smp["pixels.npy"], px)
        np.testing.assert_array_equal(smp["valid.npy"], valid)
        meta = smp["json"]
        assert meta["granule"] == "gA" and meta["index"] == i and meta["row"] == int(s.meta("row")[i])
        assert meta["lat"] == float(s.meta("lat")[i])
    info = json.loads((tmp_path / "wds" / "enmap_L2-info.json").read_text())
    assert info["wavelengths_nm"] == s.attrs["wavelengths_nm"] and info["stats"] == s.attrs["stats"]

"""WebDataset export: a store's committed patches as tar shards, for pipelines that stream tars.

Each sample (key ``<sensor>_<level>_<index>``) holds ``pixels.npy`` (float16 ``(bands, P, P)``,
exactly the stored values), ``valid.npy`` (bool ``(P, P)``) and ``json`` (sensor, level, patch
index, granule id and source, row, col, lat, lon, time, gsd, valid_fraction; NaN -> null).
``info.json`` beside the shards has the store's band tables, good-band mask and statistics.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from data_prep.store import META_FIELDS, NO_TIME, PatchStore


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def export_wds(url: str, out_dir: str | Path, *, maxcount: int = 1000, maxsize: float = 1e9,
               storage_options: dict | None = None, progress: bool = True) -> dict:
    """Write ``<out_dir>/<sensor>_<level>-NNNNNN.tar`` shards; returns {"samples", "shards", "info"}."""
    import webdataset as wds

    store = PatchStore(url, storage_options)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = f"{store.sensor}_{store.level}"
    granule_ids = list(store.attrs["granules"].keys())
    sources = [store.attrs["granules"][g]["source"] for g in granule_ids]
    meta = {k: store.meta(k) for k in META_FIELDS}
    info = {k: store.attrs.get(k) for k in ("schema_version", "sensor", "level", "patch_size", "wavelengths_nm",
                                            "fwhm_nm", "good_bands", "stats", "n_patches")}
    info["source_store"] = url
    info_path = out / f"{name}-info.json"
    info_path.write_text(json.dumps(info))
    it = range(store.n_patches)
    if progress:
        from data_prep.progress import progress as bar

        it = bar(it, desc="export-wds", unit="patch", every=1000)
    shards: list[str] = []
    with wds.ShardWriter(str(out / f"{name}-%06d.tar"), maxcount=maxcount, maxsize=maxsize, verbose=0,
                         post=lambda fname: shards.append(fname)) as sink:
        for i in it:
            px, valid = store.read(i)
            gi = int(meta["granule"][i])
            t = int(meta["time"][i])
            record = {
                "sensor": store.sensor, "level": store.level, "index": i,
                "granule": granule_ids[gi], "source": sources[gi],
                "row": int(meta["row"][i]), "col": int(meta["col"][i]),
                "lat": _clean(float(meta["lat"][i])), "lon": _clean(float(meta["lon"][i])),
                "time": None if t == NO_TIME else t, "gsd": float(meta["gsd"][i]),
                "valid_fraction": float(meta["valid_fraction"][i]),
            }
            sink.write({"__key__": f"{name}_{i:08d}", "pixels.npy": np.ascontiguousarray(px),
                        "valid.npy": np.ascontiguousarray(valid), "json": record})
    return {"samples": store.n_patches, "shards": sorted(shards), "info": str(info_path)}

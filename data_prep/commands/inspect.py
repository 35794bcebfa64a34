"""``python -m data_prep inspect STORE_OR_ROOT [--json]``."""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from data_prep.store import PatchStore, StoreError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Summarise one patch store, or every <sensor>_<level>.zarr store under a root: patches per sensor "
        "and level, granules, bands and good bands, chunk and shard shapes, objects and bytes on disk, "
        "read amplification of the loader's 100-band 128 x 128 reads, and the statistics. Warns (on stderr) when "
        "the number of shard objects disagrees with the number of committed patches (lost data: run verify). "
        "For a root, also the location index (`python -m data_prep colocate ROOT`): locations, sensors per "
        "location, overlap fractions (under 'locations' in --json).")
    p.add_argument("target", metavar="STORE_OR_ROOT", help="a store, or a root holding stores (path or fsspec URL)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _fs(url: str):
    import fsspec

    return fsspec.core.url_to_fs(url)


def describe(url: str) -> dict:
    """Summary of one store (raises StoreError if it is not one)."""
    from data_prep.store import read_amplification

    s = PatchStore(url)
    fs, path = _fs(url)
    files = fs.find(path, detail=True)
    nbytes = int(sum(int(v.get("size") or 0) for v in files.values()))
    d: dict = {
        "url": url, "sensor": s.sensor, "level": s.level, "schema_version": s.attrs["schema_version"],
        "patches": s.n_patches, "granules": len(s.attrs["granules"]), "patch_size": s.patch_size,
        "bands": s.n_bands, "good_bands": int(s.good_bands.sum()),
        "wavelength_range_nm": [float(s.wavelengths_nm.min()), float(s.wavelengths_nm.max())],
        "dtype": str(s.patches.dtype), "chunks": list(s.chunks),
        "shards": list(s.patches.shards) if s.patches.shards else None,
        "objects": len(files), "bytes_on_disk": nbytes,
        "bytes_raw": int(s.n_patches * s.n_bands * s.patch_size ** 2 * 2),
        "read_amplification": round(read_amplification(s.chunks, s.good_bands, s.patch_size), 4),
        "stats": None,
    }
    d["compression_ratio"] = round(d["bytes_raw"] / nbytes, 3) if nbytes and s.n_patches else None
    # one shard object per patch in `patches` and in `valid`: a committed patch without one has lost its data
    lost = s.missing_objects()
    d["shard_objects"] = {a: s.n_patches - len(v) for a, v in lost.items()}
    d["missing_objects"] = {a: v for a, v in lost.items() if v}
    d["warnings"] = [
        f"'{a}' has {s.n_patches - len(v)} shard objects for {s.n_patches} committed patches: {len(v)} missing "
        f"(patches {v[:20]}{' ...' if len(v) > 20 else ''}); run `python -m data_prep verify {url}`"
        for a, v in lost.items() if v]
    if not s.detects_missing:
        d["warnings"].append(f"schema_version 1: a lost chunk reads as zeros, unnoticed; rewrite the store with "
                             f"`python -m data_prep migrate {url} NEW_URL`")
    if s.attrs.get("stats"):
        st = s.stats
        good = s.good_bands & (st.count > 0)
        if good.any():
            d["stats"] = {
                "valid_pixels": float(st.count[good].max()),
                "mean_min": float(np.min(st.mean[good])), "mean_max": float(np.max(st.mean[good])),
                "std_mean": float(np.mean(st.std[good])),
                "p01_min": float(np.min(st.p01[good])), "p99_max": float(np.max(st.p99[good])),
            }
    if s.n_patches:
        vf = s.meta("valid_fraction")
        d["valid_fraction_mean"] = float(vf.mean())
    return d


def summarise(target: str) -> dict:
    """{"stores": [...], "by_sensor_level": {"sensor/level": patches}, "patches", "bytes_on_disk"}."""
    target = target.rstrip("/")
    try:
        stores = [describe(target)]
    except StoreError:
        fs, path = _fs(target)
        if not fs.exists(path):
            raise StoreError(f"{target}: no such store or root") from None
        names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
        stores = []
        for n in names:
            if n.endswith(".zarr"):
                try:
                    stores.append(describe(f"{target}/{n}"))
                except StoreError:
                    continue
        if not stores:
            raise StoreError(
                f"{target}: neither a patch store nor a root holding <sensor>_<level>.zarr stores") from None
    by = {f"{d['sensor']}/{d['level']}": d["patches"] for d in stores}
    return {"target": target, "stores": stores, "by_sensor_level": by,
            "patches": sum(d["patches"] for d in stores), "bytes_on_disk": sum(d["bytes_on_disk"] for d in stores),
            "locations": _locations(target) if len(stores) > 1 or stores[0]["url"] != target else None}


def _locations(root: str) -> dict | None:
    """The location index of a root (``python -m data_prep colocate``), summarised; None when there is none."""
    from data_prep.colocate import LocationIndexError, index_url, read_index, summary

    try:
        idx = read_index(root)
    except LocationIndexError as e:
        if "no location index" in str(e):
            return None
        raise
    try:
        read_index(root, check=True)
        stale = False
    except LocationIndexError:
        stale = True
    return {"index": index_url(root), "stale": stale, **summary(idx)}


def run(args: argparse.Namespace) -> int:
    out = summarise(args.target)
    for d in out["stores"]:
        for w in d["warnings"]:
            print(f"warning: {d['url']}: {w}", file=sys.stderr)
    if args.json:
        print(json.dumps(out))
        return 0
    for d in out["stores"]:
        print(f"{d['url']}: {d['sensor']} {d['level']}, {d['patches']} patches from {d['granules']} granules, "
              f"{d['bands']} bands ({d['good_bands']} good), chunks {d['chunks']}, shards {d['shards']}, "
              f"{d['objects']} objects, {d['bytes_on_disk'] / 1e6:.1f} MB, read amplification "
              f"{d['read_amplification']}")
        if d["stats"]:
            print("  stats: " + ", ".join(f"{k}={v:.4g}" for k, v in d["stats"].items()))
    print(f"total: {out['patches']} patches, {out['bytes_on_disk'] / 1e6:.1f} MB")
    loc = out.get("locations")
    if loc:
        from data_prep.colocate import summary_lines

        head, *rest = summary_lines(loc)
        print(f"locations ({loc['index']}{', STALE: run colocate again' if loc['stale'] else ''}): {head}")
        for line in rest:
            print(line)
    return 0

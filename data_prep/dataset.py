"""Logical datasets: the shard stores of one sensor and level, read as one store with one normalisation.

An archive too large for one machine is ingested in shards, by a Dask cluster (``ingest --executor
dask://...``) or a job array (``ingest --shard k/N``). Shard ``k`` of ``N`` writes its own store (one
writer per store, as the store requires), and a manifest ties them together::

    ROOT/<sensor>_<level>.shards/shard-KKKKK-of-NNNNN.zarr   one store per shard (data_prep.store schema)
    ROOT/<sensor>_<level>.shards/manifest.json               the logical dataset (written by finalise)
    ROOT/_ingest/layout.json                                 {"shards": N}: reruns must use the same N
    ROOT/_ingest/shard-KKKKK-of-NNNNN.json                   shard k's run marker (written when its run ends)

Which products go to shard ``k``: those whose file name hashes to ``k`` mod ``N``
(:func:`data_prep.ingest.in_shard`), stable across machines and reruns, so a rerun of a shard skips
what it committed before, like any ingest.

:func:`finalise` (run by the Dask ingest when its shards are done, by the shard run that finds every
marker present, or by ``python -m data_prep finalise ROOT``) merges the shards' statistics
accumulators (exact partial sums, :mod:`data_prep.stats`), so every shard is normalised alike:
counts and histograms (so p01/p99) equal a single-process ingest's exactly, mean and std to float64
rounding. The manifest freezes each shard's committed patch count: a shard that grows later is
read up to that count until the dataset is finalised again (consistent statistics and indices for
every rank and every resume). The manifest is written whole in one object write.

:func:`open_store` opens either kind of source (a store or a logical dataset) behind one read
interface; :class:`ShardedStore` is the logical dataset's (patch ``i`` of the dataset is patch
``i - offset[k]`` of shard ``k``, shards in order).
"""

from __future__ import annotations

import json
import logging
from functools import reduce

import numpy as np

from data_prep import store as st
from data_prep.stats import BandStats, PartialStats

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
INGEST_DIR = "_ingest"


def dataset_url(root: str, sensor: str, level: str) -> str:
    """The logical dataset (folder) of ``sensor`` and ``level`` under ``root``."""
    return f"{root.rstrip('/')}/{sensor}_{level}.shards"


def shard_name(k: int, n: int) -> str:
    return f"shard-{k:05d}-of-{n:05d}"


def shard_store_url(root: str, sensor: str, level: str, shard: tuple[int, int]) -> str:
    return f"{dataset_url(root, sensor, level)}/{shard_name(*shard)}.zarr"


def _fs(url: str, storage_options: dict | None):
    import fsspec

    return fsspec.core.url_to_fs(url, **(storage_options or {}))


def _read_json(url: str, storage_options: dict | None) -> dict | None:
    fs, path = _fs(url, storage_options)
    try:
        return json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as e:
        raise st.StoreError(f"{url}: not valid JSON ({e})") from None


def _write_json(url: str, obj: dict, storage_options: dict | None) -> None:
    """Write ``obj`` as one object: on a local disk to a temporary name, then renamed over the target."""
    import os

    from fsspec.implementations.local import LocalFileSystem

    data = json.dumps(obj, indent=1).encode()
    fs, path = _fs(url, storage_options)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    if isinstance(fs, LocalFileSystem):
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)


def check_layout(root: str, n_shards: int, storage_options: dict | None = None) -> None:
    """Record ``n_shards`` for ``root`` on the first sharded run; refuse another count later."""
    url = f"{root.rstrip('/')}/{INGEST_DIR}/layout.json"
    cur = _read_json(url, storage_options)
    if cur is None:
        _write_json(url, {"shards": int(n_shards)}, storage_options)
    elif int(cur["shards"]) != int(n_shards):
        raise st.StoreError(f"{root}: was ingested in {cur['shards']} shards, this run asks for {n_shards}: a product "
                            f"would land in another shard store than before (twice in the dataset); use "
                            f"{cur['shards']} shards (--shard k/{cur['shards']}), or another --out root")


def layout(root: str, storage_options: dict | None = None) -> int | None:
    """The shard count recorded for ``root``, or None."""
    cur = _read_json(f"{root.rstrip('/')}/{INGEST_DIR}/layout.json", storage_options)
    return None if cur is None else int(cur["shards"])


def write_marker(root: str, shard: tuple[int, int], summary: dict, storage_options: dict | None = None) -> None:
    """Shard ``k``'s run is over: record which datasets it wrote (and what failed)."""
    k, n = shard
    datasets = {}
    for url, s in summary["stores"].items():
        if s.get("n_patches", 0) or s.get("n_granules", 0):
            datasets[f"{s['sensor']}_{s['level']}"] = {"store": url.rsplit("/", 1)[-1], "n_patches": s["n_patches"]}
    marker = {"shard": k, "of": n, "datasets": datasets, "failed": summary.get("failed", [])}
    _write_json(f"{root.rstrip('/')}/{INGEST_DIR}/{shard_name(k, n)}.json", marker, storage_options)


def markers(root: str, n: int, storage_options: dict | None = None) -> dict[int, dict]:
    """The run markers present under ``root`` for a layout of ``n`` shards, by shard index."""
    out = {}
    for k in range(n):
        m = _read_json(f"{root.rstrip('/')}/{INGEST_DIR}/{shard_name(k, n)}.json", storage_options)
        if m is not None:
            out[k] = m
    return out


def finalise(root: str, storage_options: dict | None = None, *, require_all: bool = True) -> list[str]:
    """Write the manifest of every logical dataset under ``root`` from its shard stores; return their URLs.

    With ``require_all`` (the default) every shard of the recorded layout must have finished
    (its marker present), else :class:`StoreError` naming the missing ones.
    """
    n = layout(root, storage_options)
    if n is None:
        raise st.StoreError(f"{root}: no sharded ingest here ({INGEST_DIR}/layout.json missing)")
    done = markers(root, n, storage_options)
    missing = [k for k in range(n) if k not in done]
    if missing and require_all:
        raise st.StoreError(f"{root}: shards {missing} of {n} have not finished (no run marker): run them "
                            f"(`ingest ... --shard k/{n}`), then finalise")
    names = sorted({d for m in done.values() for d in m["datasets"]})
    urls = []
    for name in names:
        sensor, level = name.rsplit("_", 1)
        urls.append(_write_manifest(root, sensor, level, n, storage_options))
    return urls


def _write_manifest(root: str, sensor: str, level: str, n: int, storage_options: dict | None) -> str:
    durl = dataset_url(root, sensor, level)
    shards, parts = [], []
    first: st.PatchStore | None = None
    good = None
    for k in range(n):
        url = shard_store_url(root, sensor, level, (k, n))
        try:
            s = st.PatchStore(url, storage_options)
        except st.StoreError:
            continue  # no product of this sensor and level hashed to shard k
        if first is None:
            first = s
        else:
            _check_same(first, s)
        parts.append(s.partials())
        good = s.good_bands if good is None else good & s.good_bands
        shards.append({"store": url.rsplit("/", 1)[-1], "n_patches": s.n_patches,
                       "granules": len(s.attrs["granules"])})
    if first is None:
        raise st.StoreError(f"{durl}: no shard store")
    total = reduce(PartialStats.merge, parts[1:], _copy(parts[0]))
    man = {
        "kind": "specfm-dataset", "version": MANIFEST_VERSION, "sensor": sensor, "level": level,
        "shards": shards, "n_patches": int(sum(s["n_patches"] for s in shards)),
        "patch_size": first.patch_size, "chunks": list(first.chunks),
        "wavelengths_nm": first.wavelengths_nm.tolist(), "fwhm_nm": first.fwhm_nm.tolist(),
        "good_bands": [bool(b) for b in good], "stats": total.band_stats().to_json(),
    }
    _write_json(f"{durl}/{MANIFEST}", man, storage_options)
    log.info("%s: %d shard stores, %d patches, statistics merged from their partial sums", durl, len(shards),
             man["n_patches"])
    return durl


def _copy(p: PartialStats) -> PartialStats:
    return PartialStats(p.count.copy(), p.mean.copy(), p.m2.copy(), p.hist.copy(), p.lo, p.hi)


def _check_same(a: st.PatchStore, b: st.PatchStore) -> None:
    for what, x, y in (("patch_size", a.patch_size, b.patch_size), ("chunks", a.chunks, b.chunks),
                       ("bands", a.n_bands, b.n_bands)):
        if x != y:
            raise st.StoreError(f"{b.url}: {what} {y} differs from {a.url}'s {x}: shards of one dataset must share "
                                "the store layout")


class ShardedStore(st.StoreView):
    """A logical dataset read as one store: the interface of :class:`data_prep.store.PatchStore` that
    the loader and the commands use (``read``, ``read_range``, ``meta``, ``stats``, ``band_table``,
    ``locate`` ...), statistics from the manifest (merged over the shards)."""

    def __init__(self, url: str, storage_options: dict | None = None):
        self.url = url.rstrip("/")
        if self.url.endswith(MANIFEST):
            self.url = self.url[: -len(MANIFEST)].rstrip("/")
        self.storage_options = storage_options
        man = _read_json(f"{self.url}/{MANIFEST}", storage_options)
        if man is None or man.get("kind") != "specfm-dataset":
            raise st.StoreError(f"no logical dataset at {url!r} ({MANIFEST} missing: run "
                                f"`python -m data_prep finalise ROOT` once every shard has finished)")
        if man.get("version") != MANIFEST_VERSION:
            raise st.StoreError(f"{url}: manifest version {man.get('version')!r}; this specfm reads {MANIFEST_VERSION}")
        self.manifest = man
        self.shards = [st.PatchStore(f"{self.url}/{s['store']}", storage_options) for s in man["shards"]]
        counts = [int(s["n_patches"]) for s in man["shards"]]
        for s, c in zip(self.shards, counts, strict=True):
            if s.n_patches < c:
                raise st.StoreError(f"{s.url}: holds {s.n_patches} committed patches, the manifest {c}: "
                                    "the shard store was replaced; finalise again")
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.counts = counts
        self.sensor, self.level = man["sensor"], man["level"]
        self.patch_size = int(man["patch_size"])
        self.wavelengths_nm = np.asarray(man["wavelengths_nm"], dtype=np.float64)
        self.fwhm_nm = np.asarray(man["fwhm_nm"], dtype=np.float64)
        self.good_bands = np.asarray(man["good_bands"], dtype=bool)
        self.n_patches = int(self.offsets[-1])
        self.schema_version = min(s.schema_version for s in self.shards)
        self.detects_missing = all(s.detects_missing for s in self.shards)
        granules: dict[str, dict] = {}
        self._granule_base = []
        for s, off, s_count in zip(self.shards, self.offsets[:-1], counts, strict=True):
            self._granule_base.append(len(granules))
            for gid, e in s.attrs["granules"].items():
                if gid in granules:
                    raise st.StoreError(f"{self.url}: granule {gid!r} is in two shards")
                if int(e["start"]) < int(s_count):
                    granules[gid] = {**e, "start": int(e["start"]) + int(off)}
        self.attrs = {"schema_version": self.schema_version, "sensor": self.sensor, "level": self.level,
                      "patch_size": self.patch_size, "n_patches": self.n_patches, "granules": granules,
                      "stats": man["stats"], "shards": man["shards"]}

    @property
    def chunks(self) -> tuple[int, ...]:
        return tuple(self.manifest["chunks"])

    @property
    def stats(self) -> BandStats:
        return BandStats.from_json(self.manifest["stats"])

    def partials(self) -> PartialStats:
        parts = [s.partials() for s in self.shards]
        return reduce(PartialStats.merge, parts[1:], _copy(parts[0]))

    def locate(self, i: int) -> tuple[st.PatchStore, int]:
        """(shard store, index in it) of dataset patch ``i``."""
        if not 0 <= i < self.n_patches:
            raise IndexError(f"{self.url}: patch {i} out of range 0..{self.n_patches - 1}")
        k = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return self.shards[k], int(i - self.offsets[k])

    def read(self, i: int, *args, **kw) -> tuple[np.ndarray, np.ndarray]:
        s, j = self.locate(i)
        return s.read(j, *args, **kw)

    def read_range(self, i0: int, i1: int) -> tuple[np.ndarray, np.ndarray]:
        px, va = [], []
        for k, s in enumerate(self.shards):
            lo, hi = max(i0, int(self.offsets[k])), min(i1, int(self.offsets[k + 1]))
            if lo < hi:
                p, v = s.read_range(lo - int(self.offsets[k]), hi - int(self.offsets[k]))
                px.append(p)
                va.append(v)
        if not px:
            return (np.empty((0, self.n_bands, self.patch_size, self.patch_size), np.float16),
                    np.empty((0, self.patch_size, self.patch_size), bool))
        return np.concatenate(px), np.concatenate(va)

    def iter_patches(self, batch: int = 8):
        for s, c in zip(self.shards, self.counts, strict=True):
            for i0 in range(0, c, batch):
                px, va = s.read_range(i0, min(i0 + batch, c))
                yield from zip(px, va, strict=True)

    def meta(self, name: str) -> np.ndarray:
        parts = []
        for s, c, base in zip(self.shards, self.counts, self._granule_base, strict=True):
            v = s.meta(name)[:c]
            parts.append(v + base if name == "granule" else v)
        return np.concatenate(parts)

    def band_table(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        s, j = self.locate(i)
        return s.band_table(j)


def is_dataset(url: str, storage_options: dict | None = None) -> bool:
    fs, path = _fs(url.rstrip("/"), storage_options)
    return path.endswith(MANIFEST) or fs.exists(f"{path.rstrip('/')}/{MANIFEST}")


def open_store(url: str, storage_options: dict | None = None) -> st.PatchStore | ShardedStore:
    """A store (``.zarr``) or a logical dataset (a ``.shards`` folder or its ``manifest.json``), opened for reading."""
    u = url.rstrip("/")
    if u.endswith(".shards") or u.endswith(MANIFEST):
        return ShardedStore(url, storage_options)
    return st.PatchStore(url, storage_options)


def finalise_if_complete(root: str, storage_options: dict | None = None) -> list[str] | None:
    """After a shard run: finalise when every shard of the layout has its marker (the last one to finish does it)."""
    n = layout(root, storage_options)
    if n is None or len(markers(root, n, storage_options)) < n:
        return None
    return finalise(root, storage_options)

"""The location index: which patches of which stores overlap on the ground (``python -m data_prep colocate ROOT``).

Input: every store (``<sensor>_<level>.zarr``) and logical dataset (``<sensor>_<level>.shards``) under ``ROOT``
(any fsspec URL) whose patches carry footprints (``meta/geo_*``: the pixel -> lon/lat affine ingest fits per
patch, :func:`data_prep.tiling.patch_geo`). Each patch's footprint is the quadrilateral of its four corners under
that affine (a rotated flight line's patch is a rotated square, not its bounding box).

A **location** is found for each patch in turn (the anchor; stores in name order, patches in index order): the
patch of every other store that overlaps the anchor most (a shapely ``STRtree`` query, ties to the lower index) is
added, largest overlap first, while the common intersection of all members still covers at least
``min_overlap`` of the smallest member; a location needs members of >= 2 sensors; a member set found from several
anchors is kept once. Areas are compared on a local equirectangular plane (longitudes scaled by cos(latitude)),
which is exact for ratios at patch scale.

Output ``ROOT/locations.json`` (:data:`INDEX_NAME`)::

    {"format": "specfm-locations", "version": 1, "min_overlap": f,
     "stores": [{"name", "sensor", "level", "n_patches", "fingerprint"}],
     "locations": [{"id", "bounds": [lon_min, lat_min, lon_max, lat_max], "overlap", "sensors": [...],
                    "time_span_s", "members": [[store, patch, fraction], ...]}]}

``bounds`` are those of the common intersection; ``overlap`` = its area / the smallest member's; a member's
``fraction`` = the common area / its own area. Guarantees: deterministic (a rerun over unchanged stores writes
the same bytes: no timestamps, fixed order and rounding); the index is written in ONE write (local disk: a
temporary file renamed over the old one; object stores: one PUT), so an interrupted run leaves the previous
index as it was; ``fingerprint`` (the store's committed patch count and granule ids) tells a stale index
(:func:`read_index` with ``check=True`` refuses one).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import numpy as np

from data_prep import store as st
from data_prep.dataset import _fs, _read_json, _write_json, open_store

log = logging.getLogger(__name__)

INDEX_NAME = "locations.json"
FORMAT = "specfm-locations"
VERSION = 1
DEFAULT_MIN_OVERLAP = 0.5


class LocationIndexError(st.StoreError):
    """The location index is missing, of another format, or stale (the stores changed since it was built)."""


def index_url(root: str) -> str:
    return f"{root.rstrip('/')}/{INDEX_NAME}"


def fingerprint(s) -> str:
    """A stable digest of a store's committed content (patch count and granule ids in commit order)."""
    if hasattr(s, "shards"):  # a logical dataset: its shards' digests
        parts = [fingerprint(x) for x in s.shards]
        return hashlib.sha256("|".join([str(len(s)), *parts]).encode()).hexdigest()[:16]
    granules = list(s.attrs.get("granules", {}).keys())
    return hashlib.sha256("|".join([str(len(s)), *granules]).encode()).hexdigest()[:16]


def list_stores(root: str, storage_options: dict | None = None) -> list[str]:
    """Names of the stores and logical datasets directly under ``root`` (sorted)."""
    fs, path = _fs(root.rstrip("/"), storage_options)
    if not fs.exists(path):
        raise st.StoreError(f"{root}: no such folder")
    names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
    return [n for n in names if n.endswith(".zarr") or n.endswith(".shards")]


@dataclass
class Footprints:
    """The patch footprints of one store."""

    name: str
    sensor: str
    level: str
    n_patches: int
    fingerprint: str
    index: np.ndarray
    """patch indices with a footprint"""
    corners: np.ndarray
    """(k, 4, 2) lon/lat of the patch corners (0,0), (P,0), (P,P), (0,P)"""
    time: np.ndarray


def footprints(url: str, name: str, storage_options: dict | None = None) -> Footprints:
    s = open_store(url, storage_options)
    p = float(s.patch_size)
    geo = np.stack([s.meta(f"geo_{j}") for j in range(6)], 1) if len(s) else np.zeros((0, 6))
    ok = np.flatnonzero(np.isfinite(geo).all(1))
    g = geo[ok]
    xs = np.array([0.0, p, p, 0.0])
    ys = np.array([0.0, 0.0, p, p])
    lon = g[:, 0:1] + g[:, 1:2] * xs + g[:, 2:3] * ys
    lat = g[:, 3:4] + g[:, 4:5] * xs + g[:, 5:6] * ys
    t = s.meta("time")[ok] if len(s) else np.zeros(0, np.int64)
    return Footprints(name=name, sensor=s.sensor, level=s.level, n_patches=len(s), fingerprint=fingerprint(s),
                      index=ok, corners=np.stack([lon, lat], -1), time=t)


def _polygons(corners: np.ndarray, lat0: float):
    import shapely

    xy = corners.copy()
    xy[..., 0] *= np.cos(np.deg2rad(lat0))  # local equirectangular: area ratios exact at patch scale
    return shapely.polygons(xy)


def build_index(root: str, *, min_overlap: float = DEFAULT_MIN_OVERLAP, storage_options: dict | None = None,
                progress: bool = False) -> dict:
    """The location index of the stores under ``root`` (see the module docstring); nothing is written."""
    import shapely

    if not 0.0 < min_overlap <= 1.0:
        raise st.StoreError(f"min_overlap must be in (0, 1], got {min_overlap}")
    names = list_stores(root, storage_options)
    if not names:
        raise st.StoreError(f"{root}: holds no <sensor>_<level>.zarr stores or .shards datasets")
    fps = [footprints(f"{root.rstrip('/')}/{n}", n, storage_options) for n in names]
    without = [f.name for f in fps if f.n_patches and f.index.size == 0]
    for n in without:
        log.warning("%s/%s: no patch has a footprint (ingested before footprints were kept, or products "
                    "without geolocation): re-ingest it to co-locate it", root, n)
    used = [k for k, f in enumerate(fps) if f.index.size]
    if not used:
        raise st.StoreError(f"{root}: no store has per-patch footprints ({', '.join(without) or 'none'}); "
                            f"re-ingest with this version (ingest keeps meta/geo_* per patch)")
    store_of = np.concatenate([np.full(fps[k].index.size, k) for k in used])
    patch_of = np.concatenate([fps[k].index for k in used])
    corners = np.concatenate([fps[k].corners for k in used])
    times = np.concatenate([fps[k].time for k in used]).astype(np.int64)
    sensor_of = [f.sensor for f in fps]
    lat0 = float(np.median(corners[..., 1]))
    polys = _polygons(corners, lat0)
    area = shapely.area(polys)
    tree = shapely.STRtree(polys)
    seen: set[tuple] = set()
    locations = []
    from data_prep.progress import progress as bar

    for i in bar(range(len(polys)), desc="colocate", unit="patch", enabled=progress):
        cand = tree.query(polys[i], predicate="intersects")
        cand = cand[store_of[cand] != store_of[i]]
        if cand.size == 0:
            continue
        inter = shapely.area(shapely.intersection(polys[i], polys[cand]))
        best: dict[int, tuple[float, int]] = {}
        for j, a in zip(cand.tolist(), inter.tolist()):
            s = int(store_of[j])
            if a > 0 and (s not in best or a > best[s][0] or (a == best[s][0] and j < best[s][1])):
                best[s] = (a, j)
        members = [i]
        common = polys[i]
        for _, j in sorted(best.values(), key=lambda t: (-t[0], t[1])):
            c = shapely.intersection(common, polys[j])
            smallest = min(float(area[m]) for m in [*members, j])
            if float(shapely.area(c)) >= min_overlap * smallest - 1e-18:
                members.append(j)
                common = c
        if len({sensor_of[int(store_of[m])] for m in members}) < 2:
            continue
        key = tuple(sorted(members))
        if key in seen:
            continue
        seen.add(key)
        ca = float(shapely.area(common))
        b = np.asarray(shapely.bounds(common), dtype=np.float64)
        b[[0, 2]] /= np.cos(np.deg2rad(lat0))
        mem = sorted((int(store_of[m]), int(patch_of[m]), round(ca / float(area[m]), 6)) for m in members)
        locations.append({
            "bounds": [round(float(v), 9) for v in b],
            "overlap": round(ca / min(float(area[m]) for m in members), 6),
            "sensors": sorted({sensor_of[s] for s, _, _ in mem}),
            "time_span_s": int(times[list(members)].max() - times[list(members)].min()),
            "members": [list(m) for m in mem]})
    locations.sort(key=lambda d: (d["members"][0][0], d["members"][0][1], d["members"]))
    for k, loc in enumerate(locations):
        loc["id"] = k
    return {"format": FORMAT, "version": VERSION, "min_overlap": min_overlap,
            "stores": [{"name": f.name, "sensor": f.sensor, "level": f.level, "n_patches": f.n_patches,
                        "fingerprint": f.fingerprint} for f in fps],
            "locations": [{"id": d["id"], **{k: v for k, v in d.items() if k != "id"}} for d in locations]}


def colocate(root: str, *, min_overlap: float = DEFAULT_MIN_OVERLAP, storage_options: dict | None = None,
             progress: bool = False) -> dict:
    """Build the index of ``root`` and write it to ``ROOT/locations.json`` in one write; returns the index."""
    idx = build_index(root, min_overlap=min_overlap, storage_options=storage_options, progress=progress)
    _write_json(index_url(root), idx, storage_options)
    return idx


def read_index(url: str, storage_options: dict | None = None, *, check: bool = False) -> dict:
    """The index at ``url`` (a ``locations.json`` or the root holding it). ``check``: refuse a stale index (a
    store's fingerprint changed since it was built)."""
    u = url.rstrip("/")
    if not u.endswith(".json"):
        u = index_url(u)
    idx = _read_json(u, storage_options)
    if idx is None:
        raise LocationIndexError(f"{u}: no location index; build it with `python -m data_prep colocate "
                          f"{u.rsplit('/', 1)[0]}`")
    if idx.get("format") != FORMAT or idx.get("version") != VERSION:
        raise LocationIndexError(f"{u}: format {idx.get('format')!r} version {idx.get('version')!r}, expected "
                          f"{FORMAT!r} version {VERSION}")
    if check:
        root = u.rsplit("/", 1)[0]
        for s in idx["stores"]:
            try:
                fp = fingerprint(open_store(f"{root}/{s['name']}", storage_options))
            except st.StoreError:
                fp = None
            if fp != s["fingerprint"]:
                raise LocationIndexError(f"{u}: stale: store {s['name']} changed since the index was built; run "
                                  f"`python -m data_prep colocate {root}` again")
    return idx


def summary(idx: dict) -> dict:
    """Figures ``inspect`` reports: locations, sensors per location, overlap fractions."""
    locs = idx["locations"]
    per: dict[str, int] = {}
    sets: dict[str, int] = {}
    for loc in locs:
        n = str(len(loc["sensors"]))
        per[n] = per.get(n, 0) + 1
        k = "+".join(loc["sensors"])
        sets[k] = sets.get(k, 0) + 1
    ov = np.array([loc["overlap"] for loc in locs]) if locs else np.zeros(0)
    return {"locations": len(locs), "min_overlap": idx["min_overlap"],
            "sensors_per_location": dict(sorted(per.items())), "by_sensor_set": dict(sorted(sets.items())),
            "overlap": ({"min": float(ov.min()), "mean": float(ov.mean()), "max": float(ov.max())}
                        if ov.size else None),
            "stores": [s["name"] for s in idx["stores"]]}


def summary_lines(s: dict) -> list[str]:
    """The human-readable lines of a :func:`summary` (``colocate`` and ``inspect`` print them)."""
    ov = s["overlap"]
    head = (f"{s['locations']} locations; sensors per location {s['sensors_per_location']}; overlap "
            + (f"min {ov['min']:.3f} mean {ov['mean']:.3f} max {ov['max']:.3f}" if ov else "-"))
    return [head, *(f"  {k}: {n}" for k, n in s["by_sensor_set"].items())]

"""Co-located groups: for each location, one view per sensor of the same ground (``data.colocated``).

The contract (also in ``/work/coord/COLOCATED.md``, section 3). A group batch holds B locations of the location
index (``python -m data_prep colocate ROOT``, :mod:`data_prep.colocate`):

- ``views``: list of V view dicts; ``views[:n_global]`` are the global views (one per
  ``colocated.global_sensors``, in that order), then ``colocated.local_views`` local views.
- ``n_global`` int; ``location`` int64 ``[B]`` (location ids in the index); ``footprint`` float64 ``[B, 4]`` (lon/lat
  bounds of the common ground square); ``extent_m`` float32 ``[B]`` (its side, ``footprint_m``); ``meta``: lists
  ``location``, ``epoch``, ``step``, ``replaces`` (the location a substitute stands in for, else -1).

Each view is a mixed batch (:mod:`pretrain.data.mixed`: ``pixels [B,Cmax,H,W]``, ``wavelengths``/``fwhm``,
``band_mask``, ``valid``, ``sensor``, ``level``, ``gsd``, ``meta``) of the same B locations in the same order, plus
``ground`` float32 ``[B, 2, 3]`` (pixel (col, row) corner coordinates of this crop -> metres (x east, y south) from
the NW corner of the location's common square: ``[x, y] = ground @ [col, row, 1]``), ``time`` int64 ``[B]``
(acquisition, UTC seconds), ``role`` (``"global"``/``"local"``) and ``sensor_name``.

A global view of sensor s covers the common square at s's native GSD: side ``round(footprint_m / gsd_s)`` rounded
to ``pixel_multiple`` (gsd_s: the median GSD of s's patches), so token grids differ between views. A local view
is one sensor's crop of side ``local_frac`` x that sensor's global side, at an aligned random position inside
the square; its sensor (from ``local_sensors``) and size are drawn per batch and slot, its position per location.
Which patch stands for a sensor at a location (L1 and L2, say) is drawn per (seed, location, epoch). A view's band
window is its store's window of that step (:func:`pretrain.data.sampling.window_for`).

A location qualifies when its members among ``data.sources`` (a source's ``subset`` included) have every global
and local sensor, its overlap is at least ``min_overlap``, and the square fits in a member patch of each of those
sensors (the crop's ideal corner within half a pixel of the patch). The crop is cut on the patch's own pixel
grid (no resampling): the ``ground`` affine says exactly where it lies (misregistration included, as the products
state it).

Sharding, resume, substitution: as the single-store loader (:mod:`pretrain.data.sampling`) with locations in
place of patches -- per-epoch permutation of the qualifying locations seeded by (seed, index, epoch), rank r's
contiguous slice, B per batch, the remainder dropped, equal batch counts on every rank; every draw a function of
(seed, rank, step, epoch, location), so the state is a few integers and resuming is exact. A location one of
whose views fails to decode is replaced by a seeded substitute location (seed, epoch, step, slot, attempt; up to
:data:`~pretrain.data.reader.SUBSTITUTE_TRIES`), failures counted per store against ``max_bad_fraction`` and per
batch against ``max_bad_batch_fraction``.

Pipeline (``torchdata.nodes``)::

    ShardSource(locations) --> GroupPlanNode --> ParallelMapper(GroupReader) --> Prefetcher --> Collate --> Loader
"""

from __future__ import annotations

import logging
import math
import os
import posixpath
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch
from torchdata.nodes import BaseNode, ParallelMapper, Prefetcher

from data_prep.colocate import LocationIndexError, read_index
from data_prep.store import StoreError
from pretrain.models.vocab import Vocabulary

from .config import DataConfig, DataError
from .mixed import assemble
from .reader import SUBSTITUTE_TRIES, SampleReader, StoreTables
from .sampling import PlanNode, ShardSource, StoreInfo, dropped, store_tag, substitute_index, window_for

log = logging.getLogger(__name__)

METRES_PER_DEGREE = 111_320.0
_TAG_MEMBER, _TAG_LOCAL_SENSOR, _TAG_LOCAL_POS = 21, 22, 23


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


def _norm(url: str) -> str:
    """A source URL in one spelling (local paths normalised; other URLs without a trailing slash)."""
    return url.rstrip("/") if "://" in url else os.path.normpath(url)


def _tag(name: str) -> int:
    return zlib.crc32(name.encode())


@dataclass
class Member:
    """One patch of a location, with where the location's square lies in it."""

    key: str
    """store key of the loader (``k:sensor_level``)"""
    index: int
    y0: int
    x0: int
    """top-left of the global crop in the patch (pixels)"""
    ground: np.ndarray
    """(2, 3) crop pixel (col, row) -> metres (x east, y south) from the square's NW corner"""
    time: int


@dataclass
class Location:
    id: int
    footprint: np.ndarray
    """(4,) lon_min, lat_min, lon_max, lat_max of the common square"""
    members: dict[str, list[Member]] = field(default_factory=dict)
    """sensor -> its members (one is drawn per epoch)"""


def local_frame(lon_c: float, lat_c: float, side_m: float) -> np.ndarray:
    """(2, 3) affine lon/lat -> metres (x east, y south) from the NW corner of the ``side_m`` square at the centre."""
    kx = METRES_PER_DEGREE * math.cos(math.radians(lat_c))
    ky = METRES_PER_DEGREE
    return np.array([[kx, 0.0, -kx * lon_c + side_m / 2], [0.0, -ky, ky * lat_c + side_m / 2]])


def compose(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Affine ``a o b`` for (2, 3) matrices."""
    a3 = np.vstack([a, [0, 0, 1]])
    b3 = np.vstack([b, [0, 0, 1]])
    return (a3 @ b3)[:2]


def square_footprint(lon_c: float, lat_c: float, side_m: float) -> np.ndarray:
    kx = METRES_PER_DEGREE * math.cos(math.radians(lat_c))
    h = side_m / 2
    return np.array([lon_c - h / kx, lat_c - h / METRES_PER_DEGREE, lon_c + h / kx, lat_c + h / METRES_PER_DEGREE])


def view_side(footprint_m: float, gsd: float, multiple: int) -> int:
    """Crop side (pixels) of the square at ``gsd``: ``footprint_m / gsd`` rounded to ``multiple`` (at least one)."""
    return max(multiple, int(round(footprint_m / gsd / multiple)) * multiple)


def plan_locations(cfg: DataConfig, index: dict, index_url: str, infos: dict[str, StoreInfo],
                   tables: dict[str, StoreTables], bases: dict[str, np.ndarray], geo: dict[str, np.ndarray],
                   times: dict[str, np.ndarray]) -> tuple[list[Location], dict[str, int]]:
    """The qualifying locations and each sensor's view side (pixels), from the index and the open sources."""
    cc = cfg.colocated
    root = index_url.rsplit("/", 1)[0]
    by_url = {_norm(info.url): key for key, info in infos.items()}
    key_of = {}
    for k, s in enumerate(index["stores"]):
        key = by_url.get(_norm(f"{root}/{s['name']}"))
        if key is not None:
            key_of[k] = key
    sensor_of = {key: tables[key].sensor for key in infos}
    missing = [s for s in cc.sensors if s not in sensor_of.values()]
    if missing:
        raise DataError(f"data.colocated: sensor(s) {missing} have no store among data.sources "
                        f"({sorted(set(sensor_of.values()))})")
    unindexed = sorted(set(infos) - set(key_of.values()))
    if unindexed:
        raise DataError(f"data.colocated: source(s) {[infos[k].url for k in unindexed]} are not in the location "
                        f"index {index_url}; run `python -m data_prep colocate {root}`")
    gsd = {}
    for s in cc.sensors:
        vals = np.concatenate([tables[k].gsd for k in infos if sensor_of[k] == s])
        gsd[s] = float(np.median(vals[np.isfinite(vals)])) if np.isfinite(vals).any() else float("nan")
        if not math.isfinite(gsd[s]) or gsd[s] <= 0:
            raise DataError(f"data.colocated: the stores of {s} have no GSD per patch")
    side = {s: view_side(cc.footprint_m, gsd[s], cc.pixel_multiple) for s in cc.sensors}
    allowed = {key: set(bases[key].tolist()) for key in infos}
    out: list[Location] = []
    for loc in index["locations"]:
        if loc["overlap"] < cc.min_overlap:
            continue
        b = loc["bounds"]
        lon_c, lat_c = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
        frame = local_frame(lon_c, lat_c, cc.footprint_m)
        place = Location(id=int(loc["id"]), footprint=square_footprint(lon_c, lat_c, cc.footprint_m))
        for store, patch, _frac in loc["members"]:
            key = key_of.get(int(store))
            if key is None or int(patch) not in allowed[key]:
                continue
            s = sensor_of[key]
            if s not in side:
                continue
            g = geo[key][int(patch)]
            patch_to_lonlat = np.array([[g[1], g[2], g[0]], [g[4], g[5], g[3]]])
            m = compose(frame, patch_to_lonlat)  # patch pixel -> square metres
            try:
                inv = np.linalg.inv(np.vstack([m, [0, 0, 1]]))[:2]
            except np.linalg.LinAlgError:
                continue
            cx, cy = inv @ np.array([cc.footprint_m / 2, cc.footprint_m / 2, 1.0])  # square centre in pixels
            n, p = side[s], infos[key].patch_size
            fx, fy = cx - n / 2, cy - n / 2
            if not (-0.5 <= fx <= p - n + 0.5 and -0.5 <= fy <= p - n + 0.5):
                continue  # the square does not fit in this patch
            x0, y0 = int(np.clip(round(fx), 0, p - n)), int(np.clip(round(fy), 0, p - n))
            ground = compose(m, np.array([[1.0, 0.0, x0], [0.0, 1.0, y0]]))
            place.members.setdefault(s, []).append(Member(key, int(patch), y0, x0, ground.astype(np.float32),
                                                          int(times[key][int(patch)])))
        if all(s in place.members for s in cc.sensors):
            out.append(place)
    return out, side


class GroupPlanNode(PlanNode):
    """Batches of location ids -> the batch's plan (step, epoch, locations, local view sensors, band windows).

    State: the step counter and the source's state (:class:`~pretrain.data.sampling.PlanNode`'s)."""

    def __init__(self, source: BaseNode[dict], infos: dict[str, StoreInfo], local_sensors: list[str], n_local: int,
                 *, seed: int, rank: int, band_window: int, band_stride: int):
        super().__init__(source, infos, seed=seed, rank=rank, band_window=band_window, band_stride=band_stride,
                         crop=0, crop_align=0, sensor_dropout=0.0)
        self.local_sensors, self.n_local = local_sensors, n_local

    def next(self) -> dict:
        item = next(self.source)
        step = self._step
        self._step += 1
        rng = _rng(self.seed, _TAG_LOCAL_SENSOR, self.rank, step)
        local = [self.local_sensors[int(rng.integers(len(self.local_sensors)))] for _ in range(self.n_local)]
        windows = {key: window_for(self.seed, self.rank, step, info.n_good, self.band_window, self.band_stride)
                   for key, info in self.infos.items()}
        return {"step": step, "epoch": item["epoch"], "locations": item["indices"], "local": local,
                "windows": windows}


class GroupReader:
    """Map function: a batch plan -> the group batch (see the module docstring). Picklable."""

    def __init__(self, tables: dict[str, StoreTables], locations: list[Location], side: dict[str, int], *,
                 global_sensors: list[str], local_frac: float, pixel_multiple: int, seed: int, tag: int,
                 sensor_dropout: float, infos: dict[str, StoreInfo], max_batch_bad: float,
                 storage_options: dict | None, vocab: Vocabulary | None, footprint_m: float):
        self.tables, self.side = tables, side
        self.locations = {loc.id: loc for loc in locations}
        self.pool = np.array(sorted(self.locations), dtype=np.int64)
        self.global_sensors = global_sensors
        self.local_frac, self.multiple = local_frac, pixel_multiple
        self.seed, self.tag, self.sensor_dropout = seed, tag, sensor_dropout
        self.infos, self.max_batch_bad = infos, max_batch_bad
        self.footprint_m = footprint_m
        self.vocab = vocab
        self.storage_options = storage_options
        self._readers: dict[int, SampleReader] = {}

    def reader(self, crop: int) -> SampleReader:
        r = self._readers.get(crop)
        if r is None:
            # stores are opened once per reader; the readers of one worker share nothing else
            r = self._readers[crop] = SampleReader(self.tables, crop, self.storage_options, vocab=self.vocab)
        return r

    def local_side(self, sensor: str) -> int:
        n = self.side[sensor]
        return min(n, max(self.multiple, int(round(self.local_frac * n / self.multiple)) * self.multiple))

    def member(self, loc: Location, sensor: str, epoch: int) -> Member:
        ms = loc.members[sensor]
        if len(ms) == 1:
            return ms[0]
        return ms[int(_rng(self.seed, _TAG_MEMBER, self.tag, epoch, loc.id, _tag(sensor)).integers(len(ms)))]

    def _views_of(self, loc: Location, plan: dict, slot: int) -> list[tuple[Member, int, int, int]]:
        """(member, y0, x0, side) of each view of ``loc``: globals, then locals."""
        out = []
        for s in self.global_sensors:
            m = self.member(loc, s, plan["epoch"])
            out.append((m, m.y0, m.x0, self.side[s]))
        for v, s in enumerate(plan["local"]):
            m = self.member(loc, s, plan["epoch"])
            n, k = self.side[s], self.local_side(s)
            steps = (n - k) // self.multiple + 1
            oy, ox = _rng(self.seed, _TAG_LOCAL_POS, self.tag, plan["epoch"], loc.id, v).integers(steps, size=2)
            out.append((m, m.y0 + int(oy) * self.multiple, m.x0 + int(ox) * self.multiple, k))
        return out

    def _read_location(self, loc: Location, plan: dict, slot: int, reads: dict, bad: list,
                       replaces: int | None) -> list[dict] | None:
        """Every view of ``loc`` as a 1-sample reader batch; None (and the failure in ``bad``) if one failed."""
        parts = []
        for m, y0, x0, n in self._views_of(loc, plan, slot):
            info = self.infos[m.key]
            w0, wn = plan["windows"][m.key]
            task = {"key": m.key, "index": m.index, "epoch": plan["epoch"], "step": plan["step"], "j": slot,
                    "y0": y0, "x0": x0, "w0": w0, "wn": wn,
                    "drop": dropped(self.seed, info.tag, plan["epoch"], m.index, self.sensor_dropout)}
            b = self.reader(n)([task])
            url = info.url
            reads[url] = reads.get(url, 0) + b.pop("_reads")
            if "_fatal" in b:
                for e in b.get("_bad", []):
                    bad.append({**e, "substitute_for": replaces, "location": loc.id})
                return None
            ground = m.ground.copy()
            ground[:, 2] += ground[:, 0] * (x0 - m.x0) + ground[:, 1] * (y0 - m.y0)
            b["ground"] = torch.from_numpy(ground).unsqueeze(0)
            b["time"] = torch.tensor([m.time], dtype=torch.int64)
            parts.append(b)
        return parts

    def __call__(self, plan: dict) -> dict:
        locs = [int(i) for i in plan["locations"]]
        n = len(locs)
        reads: dict[str, int] = {}
        bad: list[dict] = []
        rows: list[list[dict] | None] = [self._read_location(self.locations[i], plan, j, reads, bad, None)
                                         for j, i in enumerate(locs)]
        used, replaces = list(locs), [-1] * n
        failed = [j for j, r in enumerate(rows) if r is None]
        fatal = None
        if failed and len(failed) > self.max_batch_bad * n:
            fatal = (f"{len(failed)} of the {n} locations of batch step {plan['step']} failed to decode (more than "
                     f"max_bad_batch_fraction={self.max_batch_bad} allows)")
        else:
            avoid = set(locs)
            for j in failed:
                for attempt in range(SUBSTITUTE_TRIES):
                    sub = substitute_index(self.seed, self.tag, plan["epoch"], plan["step"], j, attempt, self.pool,
                                           avoid)
                    avoid.add(sub)
                    for e in bad:
                        if e.get("location") in (locs[j], used[j]) and e["replaced_by"] is None:
                            e["replaced_by"] = f"location {sub}"
                    rows[j] = self._read_location(self.locations[sub], plan, j, reads, bad, locs[j])
                    if rows[j] is not None:
                        used[j], replaces[j] = sub, locs[j]
                        break
                    used[j] = sub
                else:
                    fatal = (f"location {locs[j]} of batch step {plan['step']} failed to decode and so did "
                             f"{SUBSTITUTE_TRIES} substitute locations")
                    break
        if fatal is not None:
            first = bad[0]["error"] if bad else "?"
            return {"_fatal": f"{fatal}; failed patches {sorted({(e['url'], e['index']) for e in bad})}; first "
                              f"error: {first}", "_bad": bad, "_reads": reads}
        views = []
        roles = ["global"] * len(self.global_sensors) + ["local"] * len(plan["local"])
        sensors = [*self.global_sensors, *plan["local"]]
        for v in range(len(sensors)):
            parts = [([j], rows[j][v]) for j in range(n)]  # type: ignore[index]
            view = assemble(parts, n)
            view["ground"] = torch.cat([rows[j][v]["ground"] for j in range(n)])  # type: ignore[index]
            view["time"] = torch.cat([rows[j][v]["time"] for j in range(n)])  # type: ignore[index]
            view["role"], view["sensor_name"] = roles[v], sensors[v]
            views.append(view)
        batch = {
            "views": views, "n_global": len(self.global_sensors),
            "location": torch.tensor(used, dtype=torch.int64),
            "footprint": torch.from_numpy(np.stack([self.locations[i].footprint for i in used])),
            "extent_m": torch.full((n,), float(self.footprint_m), dtype=torch.float32),
            "meta": {"location": used, "epoch": [plan["epoch"]] * n, "step": [plan["step"]] * n,
                     "replaces": replaces},
            "_reads": reads,
        }
        if bad:
            batch["_bad"] = [{k: v for k, v in e.items() if k != "location"} for e in bad]
        return batch


def _open_geo(infos: dict[str, StoreInfo], storage_options: dict | None) -> tuple[dict, dict]:
    from data_prep.dataset import open_store

    geo, times = {}, {}
    for key, info in infos.items():
        s = open_store(info.url, storage_options)
        geo[key] = np.stack([s.meta(f"geo_{j}") for j in range(6)], 1)
        times[key] = s.meta("time")
    return geo, times


def build_colocated_loader(cfg: DataConfig, rank: int, world_size: int, opened: tuple,
                           vocab: Vocabulary | None = None):
    """The group pipeline of one rank (see the module docstring); DataError before any batch on bad settings."""
    from .loader import Collate, SpecLoader, WorkerWatchdog

    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is not in [0, world_size={world_size})")
    cc = cfg.colocated
    infos, tables, bases, _weights = opened
    url = cc.index or posixpath.join(posixpath.dirname(cfg.sources[0].url.rstrip("/")), "locations.json")
    try:
        index = read_index(url, cfg.storage_options, check=True)
    except (LocationIndexError, StoreError) as e:
        raise DataError(f"data.colocated: {e}") from None
    url = url if url.endswith(".json") else f"{url.rstrip('/')}/locations.json"
    geo, times = _open_geo(infos, cfg.storage_options)
    locations, side = plan_locations(cfg, index, url, infos, tables, bases, geo, times)
    tag = store_tag(url)
    loc_info = StoreInfo(key="locations", url=url, tag=tag, n_patches=len(locations), patch_size=0,
                         good_idx=np.zeros(0, np.int64), spatial_chunk=1)
    pool = np.array(sorted(loc.id for loc in locations), dtype=np.int64)
    src = ShardSource(loc_info, pool, batch_size=cfg.batch_size, seed=cfg.seed, rank=rank, world_size=world_size,
                      epochs=cfg.epochs)
    if src.batches_per_epoch == 0:
        raise DataError(f"data.colocated: {len(locations)} qualifying locations (sensors {cc.sensors}, min_overlap "
                        f"{cc.min_overlap}, footprint {cc.footprint_m:g} m) cannot give one batch of {cfg.batch_size} "
                        f"to each of {world_size} ranks ({url})")
    plan = GroupPlanNode(src, infos, cc.local, cc.local_views, seed=cfg.seed, rank=rank,
                         band_window=cfg.band_window, band_stride=cfg.band_stride)
    reader = GroupReader(tables, locations, side, global_sensors=list(cc.global_sensors), local_frac=cc.local_frac,
                         pixel_multiple=cc.pixel_multiple, seed=cfg.seed, tag=tag, sensor_dropout=cfg.sensor_dropout,
                         infos=infos, max_batch_bad=cfg.max_bad_batch_fraction, storage_options=cfg.storage_options,
                         vocab=vocab, footprint_m=cc.footprint_m)
    mapper = ParallelMapper(plan, reader, num_workers=cfg.num_workers, in_order=True, method=cfg.worker_type,
                            multiprocessing_context="spawn" if cfg.worker_type == "process" else None)
    watch = WorkerWatchdog(mapper) if cfg.worker_type == "process" and cfg.num_workers > 0 else None
    coll = Collate(Prefetcher(mapper, prefetch_factor=cfg.prefetch), cfg.max_bad_fraction, watch)
    num = src.batches_per_epoch * cfg.epochs if cfg.epochs else None
    loader = SpecLoader(cfg, rank, world_size, coll, coll, num, infos)
    loader.locations = len(locations)
    loader.view_sides = {"global": {s: side[s] for s in cc.global_sensors},
                         "local": {s: reader.local_side(s) for s in cc.local}}
    log.info("co-located loader: %d qualifying locations of %d in %s; view sides %s", len(locations),
             len(index["locations"]), url, loader.view_sides)
    return loader

"""Co-located products: the same ground seen by several sensors, each at its own GSD and bands.

``simulate_colocated(out_dir, sensors=..., locations=N, extent_m=...)`` (``python -m data_prep simulate
--colocated``) writes, for each location, one product per sensor (and level) in the sensor's real product layout
(``data_prep.formats.write_product``), a material-map sidecar beside each and ``OUT/manifest.json``.

What is shared and what is not, per location:

- **Same ground**: one scene (:mod:`data_prep.simulate.scene`: materials, regions, texture, illumination) laid
  on a square of ``SCENE_MARGIN x extent_m`` metres around the location centre; every product samples it at its
  pixels' true ground positions (:func:`~data_prep.simulate.scene.render_points`), a coarse pixel as the mean of
  ``k x k`` sub-samples (``k = round(gsd / finest gsd)``, at most :data:`MAX_SUPERSAMPLE`), so a 60 m EMIT pixel
  is the average of the ground a 3 m PlanetScope grid sees in detail.
- **Own grid**: side ``round(extent_m / gsd)`` pixels at the sensor's registry GSD, centred on the location centre
  plus a random shift of up to ``max_shift`` x ``extent_m`` per axis (so the products overlap partially, as
  different orbits do); spaceborne grids north-up, airborne (AVIRIS) ones rotated by a random flight heading.
- **Misregistration**: the geolocation a product carries is its true one moved by a random offset of about
  ``misregistration_px`` of its own pixels (normal, per product), as residual co-registration errors are; the
  manifest keeps the true offset in metres.
- **Small time offsets**: acquisitions within ``max_days`` days of each other (distinct times, so every product
  has its own mission-style name); each gets its own atmosphere (L1) and noise; the ground does not change.

The manifest lists per location its centre and per product the path, sensor, level, GSD, time, shift,
misregistration and heading. Deterministic in (seed, arguments): the same call writes the same bytes.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_prep.errors import UserError
from data_prep.registry import get_sensor
from data_prep.simulate.atmosphere import Atmosphere
from data_prep.simulate.corpus import _rng, get_writer, output_folder
from data_prep.simulate.library import load_library, select_materials
from data_prep.simulate.render import BLOCK_ROWS, RasterBlock, render_cube, sensor_model
from data_prep.simulate.scene import Scene, abundances, make_scene, render_points

log = logging.getLogger(__name__)

COLOCATED_SENSORS = ("enmap", "emit", "desis", "aviris-classic", "sentinel-2", "landsat-8-9-oli", "planetscope")
SCENE_MARGIN = 1.6
"""The scene square is this many times ``extent_m`` (room for the shifts and rotated grids)."""
MAX_SUPERSAMPLE = 4
METRES_PER_DEGREE = 111_320.0


@dataclass(frozen=True)
class ColocatedView:
    """One product of a location: its grid on the ground and what it is told about it."""

    location: str
    sensor: str
    level: str
    rows: int
    cols: int
    gsd_m: float
    heading_deg: float
    centre_m: tuple[float, float]
    """True (east, north) of the grid centre, metres from the location centre."""
    error_m: tuple[float, float]
    """(east, north) misregistration: written geolocation minus true ground position."""
    time: dt.datetime

    def ground(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """True (east, north) metres of pixel-corner coordinates (x = column, y = row)."""
        h = np.deg2rad(self.heading_deg)
        ce, cn = np.cos(h), -np.sin(h)  # column axis
        re, rn = -np.sin(h), -np.cos(h)  # row axis (south at heading 0)
        dx = (x - self.cols / 2) * self.gsd_m
        dy = (y - self.rows / 2) * self.gsd_m
        return self.centre_m[0] + dx * ce + dy * re, self.centre_m[1] + dx * cn + dy * rn


def to_latlon(east: np.ndarray, north: np.ndarray, centre: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """WGS-84 (lat, lon) of local tangent-plane metres around ``centre`` = (lat, lon)."""
    lat0, lon0 = centre
    return lat0 + north / METRES_PER_DEGREE, lon0 + east / (METRES_PER_DEGREE * np.cos(np.deg2rad(lat0)))


def plan_colocated(*, sensors: Sequence[str], levels: Sequence[str], locations: int, extent_m: float, seed: int,
                   max_shift: float, misregistration_px: float, max_days: float) -> list[tuple[dict, list]]:
    """[(location record, [ColocatedView, ...]), ...] in writing order."""
    base = dt.datetime(2023, 4, 1, tzinfo=dt.UTC)
    out = []
    for i in range(locations):
        lid = f"loc{i:03d}"
        rng = _rng(seed, "colocated", i)
        centre = (float(rng.uniform(25, 50)), float(rng.uniform(-122, -80)))
        t0 = base + dt.timedelta(days=int(rng.integers(0, 365)), hours=float(rng.uniform(15, 20)))
        views = []
        minute = 0
        for s in sensors:
            sen = get_sensor(s)
            levs = [lev for lev in levels if lev in sen.levels] or [sorted(sen.levels)[-1]]
            side = max(8, int(round(extent_m / sen.gsd_m)))
            vr = _rng(seed, "colocated-view", i, s)
            shift = tuple(float(v) for v in vr.uniform(-max_shift, max_shift, 2) * extent_m)
            err = tuple(float(v) for v in vr.normal(0.0, misregistration_px, 2) * sen.gsd_m)
            heading = float(vr.uniform(-15, 15)) if sen.platform.startswith("airborne") else 0.0
            day = dt.timedelta(days=int(vr.integers(0, int(max_days) + 1)), minutes=float(vr.uniform(-90, 90)))
            for lev in levs:
                minute += 1
                t = (t0 + day + dt.timedelta(minutes=minute)).replace(microsecond=0)
                views.append(ColocatedView(lid, s, lev, side, side, sen.gsd_m, heading, shift, err, t))
        out.append(({"id": lid, "centre": list(centre)}, views))
    return out


def _blocks(view: ColocatedView, scene: Scene, scene_m: float, n_materials: int, k: int):
    """The view's grid on the scene, ``BLOCK_ROWS`` rows at a time, each pixel the mean of k x k sub-samples."""
    sub = (np.arange(k) + 0.5) / k
    for r0 in range(0, view.rows, BLOCK_ROWS):
        r1 = min(view.rows, r0 + BLOCK_ROWS)
        yy = (np.arange(r0, r1)[:, None] + sub[None, :]).reshape(-1)
        xx = (np.arange(view.cols)[:, None] + sub[None, :]).reshape(-1)
        y, x = np.meshgrid(yy, xx, indexing="ij")
        east, north = view.ground(x, y)
        b = render_points(scene, 0.5 - north / scene_m, east / scene_m + 0.5)
        n = r1 - r0
        eff = (abundances(scene, b, n_materials) * b.illumination[None])
        eff = eff.reshape(n_materials, n, k, view.cols, k).mean(axis=(2, 4)).astype(np.float32)
        w = b.weights.reshape(scene.n_regions, n, k, view.cols, k).mean(axis=(2, 4))
        region = w.argmax(axis=0)
        labels = scene.primary[region].astype(np.int16)
        yield RasterBlock(r0, r1, eff, labels, np.ones((n, view.cols), dtype=bool), region)


def _atmosphere(seed: int, view: ColocatedView) -> Atmosphere:
    rng = _rng(seed, "colocated-atm", view.location, view.sensor, view.level)
    return Atmosphere(sza_deg=float(rng.uniform(20, 55)), vza_deg=float(rng.uniform(0, 10)),
                      water_vapour_cm=float(rng.uniform(0.5, 3.0)), aod550=float(rng.uniform(0.05, 0.3)))


def _materials(library: str | Path | None, seed: int) -> tuple[list[str], list[str], np.ndarray]:
    """(names, classes, spectra) of the library materials the locations' scenes draw from (a few per class)."""
    lib = load_library(library)
    mats = select_materials(lib, seed=seed)
    return [lib.name(i) for i in mats], [lib.classes[i] for i in mats], lib.spectra[mats]


def _check(sensors: Sequence[str], levels: Sequence[str], locations: int, extent_m: float, max_shift: float,
           misregistration_px: float) -> None:
    if len(sensors) < 2:
        raise UserError(f"--colocated needs at least two sensors, got {list(sensors)}")
    for s in sensors:
        get_sensor(s)  # RegistryError naming the unknown sensor
    if locations < 1:
        raise UserError(f"locations (--scenes) must be >= 1, got {locations}")
    coarse = max(get_sensor(s).gsd_m for s in sensors)
    if extent_m < 8 * coarse:
        raise UserError(f"extent_m {extent_m:g} gives the coarsest sensor ({coarse:g} m) fewer than 8 pixels; "
                        f"use --extent-m >= {8 * coarse:g}")
    if not 0.0 <= max_shift < 0.5:
        raise UserError(f"max_shift must be in [0, 0.5), got {max_shift}")
    if misregistration_px < 0:
        raise UserError(f"misregistration_px must be >= 0, got {misregistration_px}")


def simulate_colocated(out_dir: str | Path, *, sensors: Sequence[str] = COLOCATED_SENSORS,
                       levels: Sequence[str] = ("L2",), locations: int = 2, extent_m: float = 1920.0, seed: int = 0,
                       max_shift: float = 0.1, misregistration_px: float = 1.0, max_days: float = 5.0,
                       progress: bool = True, library: str | Path | None = None) -> Path:
    """Simulate co-located products under ``out_dir``; returns the path of ``manifest.json`` (module docstring)."""
    sensors, levels = list(dict.fromkeys(sensors)), list(levels)
    _check(sensors, levels, locations, extent_m, max_shift, misregistration_px)
    out = output_folder(out_dir)
    names, classes, spectra = _materials(library, seed)
    n_mat = len(names)
    plan = plan_colocated(sensors=sensors, levels=levels, locations=locations, extent_m=extent_m, seed=seed,
                          max_shift=max_shift, misregistration_px=misregistration_px, max_days=max_days)
    write_product, _ = get_writer()
    fine = min(get_sensor(s).gsd_m for s in sensors)
    scene_m = SCENE_MARGIN * extent_m
    records = []
    from tqdm import tqdm

    bar = tqdm(total=sum(len(v) for _, v in plan), desc="simulate co-located", unit="product",
               disable=not progress)
    for loc, views in plan:
        scene = make_scene(_rng(seed, "colocated-scene", loc["id"]), classes, height=1.0, nodata_edges=False)
        products = []
        for v in views:
            sensor = get_sensor(v.sensor)
            k = int(min(MAX_SUPERSAMPLE, max(1, round(v.gsd_m / fine))))
            model = sensor_model(sensor, v.level, spectra, _atmosphere(seed, v))
            rng = _rng(seed, "colocated-noise", v.location, v.sensor, v.level)
            cube, labels, _ = render_cube(model, _blocks(v, scene, scene_m, n_mat, k), v.rows, v.cols, rng)
            yc, xc = np.mgrid[0:v.rows, 0:v.cols].astype(np.float64) + 0.5
            east, north = v.ground(xc, yc)
            lat, lon = to_latlon(east + v.error_m[0], north + v.error_m[1], tuple(loc["centre"]))
            entry = Path(write_product(out / v.location, sensor=v.sensor, level=v.level, cube=cube, lat=lat,
                                       lon=lon, time=v.time, wavelengths_nm=sensor.wavelengths_nm,
                                       fwhm_nm=sensor.fwhm_nm, gsd_m=v.gsd_m))
            side = entry.parent / f"{entry.stem}_materials.npz"
            np.savez_compressed(side, labels=labels, names=np.array(names))
            products.append({"path": entry.relative_to(out).as_posix(), "sensor": v.sensor, "level": v.level,
                             "gsd_m": v.gsd_m, "rows": v.rows, "cols": v.cols,
                             "time": v.time.strftime("%Y-%m-%dT%H:%M:%SZ"), "heading_deg": v.heading_deg,
                             "shift_m": list(v.centre_m), "misregistration_m": list(v.error_m),
                             "supersample": k, "materials": side.relative_to(out).as_posix()})
            del cube
            bar.update(1)
        records.append({**loc, "products": products})
    bar.close()
    manifest = {"kind": "colocated", "seed": seed, "extent_m": extent_m, "scene_m": scene_m, "sensors": sensors,
                "levels": levels, "locations": records, "materials": names, "material_classes": classes}
    path = out / "manifest.json"
    part = out / ".manifest.json.part"
    part.write_text(json.dumps(manifest, indent=1))
    part.replace(path)
    return path


def patch_sizes(sensors: Sequence[str], patch_m: float, multiple: int = 8) -> dict[str, int]:
    """Patch side in pixels per sensor for patches of ``patch_m`` metres (a multiple of ``multiple``, >= 16)."""
    return {s: max(16, int(round(patch_m / get_sensor(s).gsd_m / multiple)) * multiple) for s in sensors}


def prepare_colocated(raw_dir: str | Path, store_root: str, *, sensors: Sequence[str], levels: Sequence[str],
                      locations: int, extent_m: float, patch_m: float, seed: int = 0, progress: bool = True) -> str:
    """Simulate (when ``raw_dir`` has no manifest), ingest (idempotent: committed granules are skipped) and index
    co-located products; returns the index URL. Each step is resumable, so a killed run completes on the next."""
    from data_prep.colocate import colocate, index_url
    from data_prep.ingest import ingest

    raw = Path(raw_dir)
    if not (raw / "manifest.json").exists():
        log.info("simulating co-located products into %s", raw)
        simulate_colocated(raw, sensors=sensors, levels=levels, locations=locations, extent_m=extent_m, seed=seed,
                           progress=progress)
    sizes = patch_sizes(sensors, patch_m)
    log.info("ingesting co-located products into %s (patch sides %s)", store_root, sizes)
    ingest([raw], store_root, patch_size=min(sizes.values()), patch_size_for=sizes, progress=progress)
    colocate(store_root)
    return index_url(store_root)

"""``simulate_corpus``: scenes, change pairs and fusion pairs written as each sensor's real products."""

from __future__ import annotations

import datetime as dt
import itertools
import json
import logging
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_prep.errors import UserError
from data_prep.registry import get_sensor
from data_prep.simulate.atmosphere import Atmosphere
from data_prep.simulate.library import load_library, split_materials
from data_prep.simulate.render import RasterBlock, raster_blocks, render_cube, sensor_model
from data_prep.simulate.scene import Scene, make_scene, swap_regions

log = logging.getLogger(__name__)

HYPERSPECTRAL = ("aviris-classic", "aviris-ng", "aviris-3", "emit", "enmap", "desis")
#: sensors whose products are map-projected north-up grids (the others follow the flight heading)
NORTH_UP = ("enmap", "desis", "planetscope", "sentinel-2")
#: (hyperspectral L2 sensor, multispectral partner) for the fusion pairs.
FUSION_PAIRS = (("emit", "planetscope"), ("enmap", "sentinel-2"))
CHANGE_SENSORS = ("aviris-ng", "emit")
MATERIALS_PER_SCENE = 24
"""Materials each scene draws from the library subset (its regions use only these)."""
MEMMAP_BYTES = 512 * 2**20
CACHE_BYTES = 256 * 2**20
"""A scene's rasterisation is reused across the sensors of that scene when it is smaller than this."""
"""Cubes larger than this are built in a memory-mapped temporary file, not in RAM."""


def _tag(*parts: object) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode())


def _rng(seed: int, *parts: object) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, _tag(*parts)]))


@dataclass
class Job:
    """One product to write."""

    scene_id: str
    role: str
    sensor: str
    level: str
    scene: Scene
    rows: int
    cols: int
    gsd_m: float
    time: dt.datetime
    centre: tuple[float, float]
    heading_deg: float
    pair: str | None = None
    ratio: int = 1
    """>1: render a ``ratio``-finer scene and average (fusion HS)."""
    valid_coarsen: int = 1
    """>1: nodata from the ``valid_coarsen``-times coarser partner grid (fusion MS)."""
    change: np.ndarray | None = None
    """For change_t2: indices of swapped regions."""
    extra: dict = field(default_factory=dict)


def geolocation(rows: int, cols: int, gsd_m: float, centre: tuple[float, float],
                heading_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """WGS-84 lat/lon (rows, cols) of the pixel centres of a ``gsd_m`` grid in the UTM zone of ``centre``, rotated
    by ``heading_deg`` (the flight line); affine in UTM, so UTM products (map info, GeoTIFF) describe it exactly."""
    from data_prep.formats.geo import flight_grid

    return flight_grid(rows, cols, gsd_m, centre, heading_deg).latlon(rows, cols)


def _atmosphere(seed: int, job: Job) -> Atmosphere:
    rng = _rng(seed, "atm", job.scene_id, job.sensor)
    return Atmosphere(sza_deg=float(rng.uniform(20, 55)), vza_deg=float(rng.uniform(0, 10)),
                      water_vapour_cm=float(rng.uniform(0.5, 3.0)), aod550=float(rng.uniform(0.05, 0.3)))


def job_blocks(job: Job, n_materials: int) -> Iterator[RasterBlock]:
    """The job's scene rasterised on its grid, a block of rows at a time (``n_materials``: the pool's size)."""
    return raster_blocks(job.scene, job.scene.material_count(n_materials), job.rows, job.cols, ratio=job.ratio,
                         valid_coarsen=job.valid_coarsen)


def render_job(job: Job, spectra: np.ndarray, seed: int, *, noise: bool = True,
               out: np.ndarray | None = None, blocks: Iterable[RasterBlock] | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(cube, labels, valid) of a job; deterministic in (seed, job). ``spectra``: the pool's (pool, grid);
    ``blocks``: a cached rasterisation."""
    model = sensor_model(get_sensor(job.sensor), job.level, job.scene.spectra_of(spectra), _atmosphere(seed, job))
    if blocks is None:
        blocks = job_blocks(job, spectra.shape[0])
    rng = _rng(seed, "noise", job.scene_id, job.role, job.sensor, job.level) if noise else None
    return render_cube(model, iter(blocks), job.rows, job.cols, rng, out=out)


def _fallback_writer():
    """A minimal ENVI (BIL float32) writer used only while data_prep.formats is not available."""
    import spectral.io.envi as envi

    def write(out_dir, *, sensor, level, cube, name=None, lat=None, lon=None, time=None,
              wavelengths_nm=None, fwhm_nm=None, gsd_m=None) -> Path:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = name or f"{sensor}_{level}_{time:%Y%m%dt%H%M%S}"
        hdr = out_dir / f"{stem}.hdr"
        data = np.where(np.isnan(cube), -9999.0, cube).astype(np.float32).transpose(1, 2, 0)
        meta = {"wavelength": [f"{w:.3f}" for w in wavelengths_nm], "fwhm": [f"{w:.3f}" for w in fwhm_nm],
                "data ignore value": -9999, "sensor type": sensor, "description": f"specfm simulated {level}"}
        envi.save_image(str(hdr), data, interleave="bil", dtype=np.float32, metadata=meta, force=True,
                        ext="")
        return hdr

    return write


def get_writer() -> tuple[Callable, bool]:
    """``(write_product, is_real)``: data_prep.formats' writer, or the ENVI fallback (logged)."""
    try:
        from data_prep.formats import write_product
        return write_product, True
    except ImportError:
        log.warning("data_prep.formats is not available: writing every product as plain ENVI (fallback)")
        return _fallback_writer(), False


def plan(*, sensors: Sequence[str], levels: Sequence[str], scenes: int, size: int, lines: int | None,
         seed: int, change_pairs: bool, fusion: bool, ratio: int, material_classes: list[str],
         materials_per_scene: int | None = None) -> list[Job]:
    """Every product of a corpus, in writing order."""
    rows = lines or size
    jobs: list[Job] = []
    base = dt.datetime(2019, 1, 1, tzinfo=dt.UTC)
    for i in range(scenes):
        sid = f"s{i:03d}"
        rng = _rng(seed, "scene", i)
        scene = make_scene(rng, material_classes, height=rows / size, materials_per_scene=materials_per_scene)
        day = base + dt.timedelta(days=int(rng.integers(0, 6 * 365)))
        centre = (float(rng.uniform(25, 50)), float(rng.uniform(-122, -80)))
        heading = float(rng.uniform(-30, 30))
        t0 = (day + dt.timedelta(hours=float(rng.uniform(16, 21)))).replace(microsecond=0)
        tick = itertools.count(1)

        def when(t0: dt.datetime = t0, tick: itertools.count = tick) -> dt.datetime:
            """Distinct acquisition times (7 min apart) so every product gets its own name."""
            return t0 + dt.timedelta(minutes=7 * next(tick))

        for s in sensors:
            gsd = get_sensor(s).gsd_m
            for lev in levels:
                jobs.append(Job(sid, "scene", s, lev, scene, rows, size, gsd, when(), centre, heading))
        if change_pairs:
            cs = next((s for s in CHANGE_SENSORS if s in sensors), None) or next(
                (s for s in sensors if get_sensor(s).kind == "hyperspectral"), None)
            if cs is not None:
                lev = "L2" if "L2" in levels else levels[0]
                gsd = get_sensor(cs).gsd_m
                t1, t2 = f"{sid}-chg-t1", f"{sid}-chg-t2"
                changed, swapped = swap_regions(scene, _rng(seed, "change", i), material_classes)
                later = when() + dt.timedelta(days=int(rng.integers(60, 700)))
                jobs.append(Job(t1, "change_t1", cs, lev, scene, rows, size, gsd, when(), centre, heading, pair=t2))
                jobs.append(Job(t2, "change_t2", cs, lev, changed, rows, size, gsd, later, centre, heading,
                                pair=t1, change=swapped))
        if fusion and "L2" in levels:
            for hs, ms in FUSION_PAIRS:
                if hs not in sensors:
                    continue
                fscene = make_scene(_rng(seed, "fusion", i, hs), material_classes, height=rows / size,
                                    materials_per_scene=materials_per_scene)
                gsd = get_sensor(hs).gsd_m
                a, b = f"{sid}-fus-{hs}-hs", f"{sid}-fus-{hs}-ms"
                jobs.append(Job(a, "fusion_hs", hs, "L2", fscene, rows, size, gsd, when(), centre, heading,
                                pair=b, ratio=ratio))
                jobs.append(Job(b, "fusion_ms", ms, "L2", fscene, rows * ratio, size * ratio, gsd / ratio,
                                when(), centre, heading, pair=a, valid_coarsen=ratio))
    return jobs


def _check_args(sensors, levels, scenes, size, lines, ratio) -> None:
    for s in sensors:
        sen = get_sensor(s)  # RegistryError naming the unknown sensor
        for lev in levels:
            sen.level(lev)  # RegistryError naming the missing level
    if scenes < 1:
        raise UserError(f"scenes must be >= 1, got {scenes}")
    if size < 8:
        raise UserError(f"size must be >= 8 pixels, got {size}")
    if lines is not None and lines < 8:
        raise UserError(f"lines must be >= 8, got {lines}")
    if ratio < 2:
        raise UserError(f"fusion ratio must be >= 2, got {ratio}")


def output_folder(out_dir: str | Path) -> Path:
    """``out_dir`` created; PermissionError when it is not writable."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not os.access(out, os.W_OK):
        raise PermissionError(f"{out}: output folder is not writable")
    return out


def simulate_corpus(out_dir: str | Path, *, sensors: Sequence[str] = HYPERSPECTRAL,
                    levels: Sequence[str] = ("L1", "L2"), scenes: int = 1, size: int = 64, seed: int = 0,
                    change_pairs: bool = True, fusion: bool = True, progress: bool = True,
                    lines: int | None = None, ratio: int = 3, library: str | Path | None = None,
                    materials: str = "pretrain", materials_per_scene: int | None = MATERIALS_PER_SCENE) -> Path:
    """Simulate a corpus under ``out_dir``; returns the path of its ``manifest.json``.

    Every scene is written for each sensor and level (``size`` columns, ``lines`` rows, default
    ``size``); per scene one change pair (AVIRIS-NG, else EMIT, else the first hyperspectral sensor)
    and, when L2 is asked for, the fusion pairs EMIT + PlanetScope and EnMAP + Sentinel-2 (for those
    hyperspectral sensors in ``sensors``) with the multispectral image ``ratio`` times finer.

    ``materials``: the library subset the scenes draw from (``pretrain``, ``heldout`` or ``all``; see
    :func:`data_prep.simulate.library.split_materials`); each scene draws ``materials_per_scene`` of them
    (None: regions draw from the whole subset). Sidecar labels index the manifest's ``materials`` list.
    """
    sensors, levels = list(sensors), list(levels)
    _check_args(sensors, levels, scenes, size, lines, ratio)
    out = output_folder(out_dir)
    lib = load_library(library)
    mats = split_materials(lib, materials)
    names = [lib.name(i) for i in mats]
    classes = [lib.classes[i] for i in mats]
    spectra = lib.spectra[mats]
    jobs = plan(sensors=sensors, levels=levels, scenes=scenes, size=size, lines=lines, seed=seed,
                change_pairs=change_pairs, fusion=fusion, ratio=ratio, material_classes=classes,
                materials_per_scene=materials_per_scene)
    write_product, _real = get_writer()
    entries = []
    labels_t1: dict[str, np.ndarray] = {}
    cache: dict[tuple, list[RasterBlock]] = {}
    tmp = Path(tempfile.mkdtemp(prefix=".sim-tmp-", dir=out))
    try:
        from data_prep.progress import progress as bar

        for job in bar(jobs, desc="simulate", unit="product", enabled=progress, every=10):
            sensor = get_sensor(job.sensor)
            nbytes = sensor.n_bands * job.rows * job.cols * 4
            buf = None
            if nbytes > MEMMAP_BYTES:
                buf = np.lib.format.open_memmap(tmp / "cube.npy", mode="w+", dtype=np.float32,
                                                shape=(sensor.n_bands, job.rows, job.cols))
            key = (id(job.scene), job.rows, job.cols, job.ratio, job.valid_coarsen)
            blocks = cache.get(key)
            if blocks is None and job.scene.material_count(len(mats)) * job.rows * job.cols * 8 < CACHE_BYTES:
                cache = {key: list(job_blocks(job, len(mats)))}  # keep only the current grid
                blocks = cache[key]
            cube, labels, _valid = render_job(job, spectra, seed, out=buf, blocks=blocks)
            heading = 0.0 if job.sensor in NORTH_UP else job.heading_deg
            lat, lon = geolocation(job.rows, job.cols, job.gsd_m, job.centre, heading)
            entry = Path(write_product(out / job.scene_id, sensor=job.sensor, level=job.level, cube=cube,
                                       lat=lat, lon=lon, time=job.time, wavelengths_nm=sensor.wavelengths_nm,
                                       fwhm_nm=sensor.fwhm_nm, gsd_m=job.gsd_m))
            del cube, buf
            side = out / job.scene_id / f"{entry.stem.removesuffix('-SPECTRAL_IMAGE')}_materials.npz"
            arrays = {"labels": labels, "names": np.array(names)}
            if job.role == "change_t1":
                labels_t1[job.scene_id] = labels
            if job.role == "change_t2":
                # a pixel changed where its dominant region was swapped (same layout at both dates)
                t1 = labels_t1[job.pair]
                arrays["change"] = (labels != t1) & (labels >= 0) & (t1 >= 0)
            np.savez_compressed(side, **arrays)
            rec = {"path": entry.relative_to(out).as_posix(), "sensor": job.sensor, "level": job.level,
                   "scene": job.scene_id, "role": job.role, "materials": side.relative_to(out).as_posix(),
                   "pair": job.pair}
            if job.role.startswith("fusion"):
                rec["ratio"] = ratio
            entries.append(rec)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    manifest = {"seed": seed, "size": size, "lines": lines or size, "products": entries, "materials": names,
                "material_classes": classes, "material_subset": materials}
    path = out / "manifest.json"
    part = out / ".manifest.json.part"
    part.write_text(json.dumps(manifest, indent=1))
    part.replace(path)
    return path

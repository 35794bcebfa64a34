"""Render a scene as one sensor's product cube: band resampling, radiance, noise, nodata."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from data_prep.registry import Sensor
from data_prep.simulate.atmosphere import Atmosphere
from data_prep.simulate.scene import Scene, abundances, labels_of, render_block, swath_valid
from data_prep.simulate.srf import sensor_srf

#: Signal-to-noise ratio at L_REF radiance in the VNIR (SWIR gets SWIR_SNR_FACTOR of it).
SNR: dict[str, float] = {
    "aviris-classic": 250.0, "aviris-ng": 500.0, "aviris-3": 600.0, "emit": 400.0, "enmap": 350.0,
    "desis": 200.0, "planetscope": 120.0, "sentinel-2": 180.0,
}
DEFAULT_SNR = 300.0
L_REF = 10.0
"""Reference radiance for SNR, uW cm-2 sr-1 nm-1."""
SWIR_SNR_FACTOR = 0.6
MAX_REFL_NOISE = 0.05
BLOCK_ROWS = 64
"""Rows rendered at a time (fixed, so the noise stream and thus the bytes do not depend on memory)."""


@dataclass(frozen=True)
class SensorModel:
    """A sensor's linear forward model over a fixed set of materials: cube = M @ abundances + offset."""

    sensor: Sensor
    level: str
    matrix: np.ndarray
    """(bands, K): band-resampled reflectance (L2) or radiance per unit abundance (L1)."""
    offset: np.ndarray
    """(bands,): 0 (L2) or band-resampled path radiance (L1)."""
    gain: np.ndarray
    """(bands,): band-resampled E0 cos T^2 / pi (radiance per unit reflectance)."""
    path: np.ndarray
    """(bands,): band-resampled path radiance."""
    noise_scale: np.ndarray
    """(bands,): radiance noise std at L_REF."""


def sensor_model(sensor: Sensor, level: str, spectra: np.ndarray, atmosphere: Atmosphere) -> SensorModel:
    """Forward model of ``sensor`` at ``level`` for material ``spectra`` (K, grid)."""
    sensor.level(level)  # raises for a level the sensor does not have
    srf = sensor_srf(sensor)
    gain_g, path_g = atmosphere.terms()
    refl = srf @ spectra.T
    gain = srf @ gain_g
    path = srf @ path_g
    if level == "L1":
        matrix = srf @ (spectra * gain_g[None, :]).T
        offset = path
    else:
        matrix, offset = refl, np.zeros(sensor.n_bands)
    snr = SNR.get(sensor.name, DEFAULT_SNR) * np.where(sensor.wavelengths_nm > 1000.0, SWIR_SNR_FACTOR, 1.0)
    return SensorModel(sensor, level, matrix, offset, gain, path, L_REF / snr)


@dataclass
class RasterBlock:
    """Rows r0:r1 of a scene on a grid: effective abundances (illumination applied), labels, valid."""

    r0: int
    r1: int
    eff: np.ndarray
    """(K, nrows, cols) float32."""
    labels: np.ndarray
    """(nrows, cols) int16, -1 outside the swath."""
    valid: np.ndarray
    region: np.ndarray
    """(nrows, cols) dominant region index."""


def raster_blocks(scene: Scene, n_materials: int, rows: int, cols: int, *, ratio: int = 1,
                  valid_coarsen: int = 1, block_rows: int = BLOCK_ROWS) -> Iterator[RasterBlock]:
    """The scene on a rows x cols grid, a block of rows at a time.

    ``ratio`` > 1 renders on a ``ratio``-times finer grid and averages ``ratio`` x ``ratio`` pixels
    (a low-resolution image of the same scene). ``valid_coarsen`` > 1 takes the swath mask from a grid
    that many times coarser (so a fine image shares its coarse partner's nodata exactly).
    """
    for r0 in range(0, rows, block_rows):
        r1 = min(rows, r0 + block_rows)
        if ratio == 1:
            b = render_block(scene, rows, cols, r0, r1)
            eff = abundances(scene, b, n_materials) * b.illumination[None]
            weights = b.weights
        else:
            b = render_block(scene, rows * ratio, cols * ratio, r0 * ratio, r1 * ratio)
            fine = abundances(scene, b, n_materials) * b.illumination[None]
            k = fine.shape[0]
            eff = fine.reshape(k, r1 - r0, ratio, cols, ratio).mean(axis=(2, 4))
            weights = b.weights.reshape(scene.n_regions, r1 - r0, ratio, cols, ratio).mean(axis=(2, 4))
        if valid_coarsen == 1:
            valid = swath_valid(scene, rows, cols, r0, r1)
        else:
            v = valid_coarsen
            cr0, cr1 = r0 // v, -(-r1 // v)
            coarse = swath_valid(scene, -(-rows // v), -(-cols // v), cr0, cr1)
            valid = np.repeat(np.repeat(coarse, v, axis=0), v, axis=1)[r0 - cr0 * v: r1 - cr0 * v, :cols]
        eff = eff.astype(np.float32)
        region = weights.argmax(axis=0)
        labels = scene.region_labels[region].astype(np.int16)
        labels[~valid] = -1
        yield RasterBlock(r0, r1, eff, labels, valid, region)


def render_cube(model: SensorModel, blocks: Iterator[RasterBlock], rows: int, cols: int,
                rng: np.random.Generator | None, out: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cube float32 (bands, rows, cols) in physical units (NaN outside the swath), labels, valid.

    ``rng`` None renders without noise. ``out`` may be a preallocated (e.g. memory-mapped) array.
    """
    nb = model.sensor.n_bands
    cube = np.empty((nb, rows, cols), dtype=np.float32) if out is None else out
    labels = np.empty((rows, cols), dtype=np.int16)
    valid = np.empty((rows, cols), dtype=bool)
    f32 = np.float32
    matrix = model.matrix.astype(f32)
    offset = model.offset[:, None].astype(f32)
    gain = model.gain[:, None].astype(f32)
    path = model.path[:, None].astype(f32)
    noise_scale = model.noise_scale[:, None].astype(f32)
    inv_gain = (1.0 / np.maximum(model.gain[:, None], 1e-6)).astype(f32)
    for blk in blocks:
        k, n, c = blk.eff.shape
        x = matrix @ blk.eff.reshape(k, n * c).astype(f32, copy=False)
        x += offset
        if rng is not None:
            rad = x if model.level == "L1" else gain * x + path
            sigma = np.maximum(rad, f32(0.0))
            sigma *= f32(0.9 / L_REF)
            sigma += f32(0.1)
            np.sqrt(sigma, out=sigma)
            sigma *= noise_scale
            if model.level == "L2":
                sigma *= inv_gain
                np.minimum(sigma, f32(MAX_REFL_NOISE), out=sigma)
            sigma *= rng.standard_normal(x.shape, dtype=f32)
            x += sigma
        # NaN outside the swath, by a multiplicative mask (much faster than boolean-index assignment)
        x *= np.where(blk.valid, f32(1.0), f32(np.nan)).reshape(1, n * c)
        cube[:, blk.r0:blk.r1] = x.reshape(nb, n, c)
        labels[blk.r0:blk.r1] = blk.labels
        valid[blk.r0:blk.r1] = blk.valid
    return cube, labels, valid


def labels_only(scene: Scene, rows: int, cols: int) -> np.ndarray:
    """The material map of a scene on a grid (no spectra)."""
    out = np.empty((rows, cols), dtype=np.int16)
    for r0 in range(0, rows, BLOCK_ROWS):
        r1 = min(rows, r0 + BLOCK_ROWS)
        out[r0:r1] = labels_of(scene, render_block(scene, rows, cols, r0, r1))
    return out

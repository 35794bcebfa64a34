"""Scene layout: regions with edges, within-region texture, mixtures at boundaries, illumination.

A scene lives in continuous coordinates, in units of the image width: ``x`` in [0, 1] across track,
``y`` in [0, rows/cols] along track. It is rendered on any pixel grid (a sensor's, or a ``ratio``-times
finer one for fusion) and one block of rows at a time, so flightline-length scenes never need more
than a block of abundances in memory.

Regions are a Voronoi partition of random seeds, with the coordinates warped by smooth noise so the
edges are irregular; each pixel's region weights are a softmax of minus its (warped) distance to the
seeds over ``mix_width``, which mixes materials in a thin band along every edge. Each region has a
primary material (its label) and a secondary material of the same class blended in by a smooth
texture field, and a smooth illumination field scales the reflectance (shading).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np


@dataclass(frozen=True)
class Lattice:
    """Multi-octave value noise on [0, 1] x [0, height]: zero-mean, roughly unit std."""

    octaves: tuple[np.ndarray, ...]
    cells: tuple[int, ...]

    @staticmethod
    def make(rng: np.random.Generator, height: float, cells: int = 5, n_octaves: int = 3) -> Lattice:
        octs, cs = [], []
        for o in range(n_octaves):
            c = cells * 2**o
            octs.append(rng.standard_normal((int(np.ceil(c * height)) + 3, c + 3)) * 0.5**o)
            cs.append(c)
        return Lattice(tuple(octs), tuple(cs))

    def __call__(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        out = np.zeros(np.broadcast_shapes(y.shape, x.shape))
        for lat, c in zip(self.octaves, self.cells):
            gy, gx = y * c, x * c
            iy, ix = np.floor(gy).astype(np.int64), np.floor(gx).astype(np.int64)
            fy, fx = gy - iy, gx - ix
            fy, fx = fy * fy * (3 - 2 * fy), fx * fx * (3 - 2 * fx)  # smoothstep
            iy = np.clip(iy, 0, lat.shape[0] - 2)
            ix = np.clip(ix, 0, lat.shape[1] - 2)
            a, b = lat[iy, ix], lat[iy, ix + 1]
            cc, d = lat[iy + 1, ix], lat[iy + 1, ix + 1]
            out = out + (a + (b - a) * fx) * (1 - fy) + (cc + (d - cc) * fx) * fy
        return out


@dataclass(frozen=True)
class Scene:
    """One scene's layout, independent of any pixel grid."""

    height: float
    """rows/cols of the image (the extent along track in units of the width)."""
    seeds: np.ndarray
    """(n_regions, 2) region seed positions (y, x)."""
    primary: np.ndarray
    """(n_regions,) material index (label) of each region."""
    secondary: np.ndarray
    """(n_regions,) material blended in by the texture field."""
    texture_amp: np.ndarray
    """(n_regions,) maximum fraction of the secondary material."""
    warp: tuple[Lattice, Lattice]
    texture: Lattice
    illumination: Lattice
    warp_amp: float = 0.07
    mix_width: float = 0.004
    """Softmax temperature of the region weights, in image widths (the width of the mixed edge band)."""
    illum_amp: float = 0.12
    swath: tuple[float, float, float] = (0.0, 1.0, 0.0)
    """(left, right, slope): valid where left + slope (y - h/2) <= x <= right + slope (y - h/2)."""
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def n_regions(self) -> int:
        return int(self.seeds.shape[0])


def make_scene(rng: np.random.Generator, material_classes: list[str], *, height: float = 1.0,
               regions_per_area: int = 18, texture: float = 0.3, nodata_edges: bool = True) -> Scene:
    """A random scene over materials whose classes are ``material_classes`` (index = label)."""
    n_mat = len(material_classes)
    if n_mat == 0:
        raise ValueError("no materials to build a scene from")
    n_reg = max(2, int(round(regions_per_area * height * rng.uniform(0.7, 1.3))))
    seeds = np.stack([rng.uniform(0, height, n_reg), rng.uniform(0, 1, n_reg)], axis=1)
    primary = rng.integers(0, n_mat, n_reg)
    by_class: dict[str, list[int]] = {}
    for i, c in enumerate(material_classes):
        by_class.setdefault(c, []).append(i)
    secondary = np.array([rng.choice(by_class[material_classes[p]]) for p in primary])
    tex = rng.uniform(0.3, 1.0, n_reg) * texture
    if nodata_edges:
        slope = rng.uniform(-0.15, 0.15)
        left = abs(slope) * 0.5 * height + rng.uniform(-0.03, 0.04)
        right = 1.0 - abs(slope) * 0.5 * height - rng.uniform(-0.03, 0.04)
        swath = (float(left), float(right), float(slope))
    else:
        swath = (-np.inf, np.inf, 0.0)
    return Scene(
        height=height, seeds=seeds, primary=primary, secondary=secondary, texture_amp=tex,
        warp=(Lattice.make(rng, height, 3, 3), Lattice.make(rng, height, 3, 3)),
        texture=Lattice.make(rng, height, 6, 3), illumination=Lattice.make(rng, height, 4, 3),
        swath=swath,
    )


def swap_regions(scene: Scene, rng: np.random.Generator, material_classes: list[str],
                 fraction: float = 0.3) -> tuple[Scene, np.ndarray]:
    """The scene at a second date: ``fraction`` of its regions get a material of another class.

    Returns the changed scene and the indices of the swapped regions.
    """
    n = scene.n_regions
    k = max(1, int(round(fraction * n)))
    swapped = np.sort(rng.choice(n, size=k, replace=False))
    primary, secondary = scene.primary.copy(), scene.secondary.copy()
    for r in swapped:
        others = [i for i, c in enumerate(material_classes) if c != material_classes[primary[r]]]
        if not others:  # a single-class pool: any other material
            others = [i for i in range(len(material_classes)) if i != primary[r]]
        new = int(rng.choice(others))
        primary[r] = new
        secondary[r] = new
    return replace(scene, primary=primary, secondary=secondary), swapped


@dataclass
class Block:
    """A block of rows of a scene rendered on a pixel grid."""

    weights: np.ndarray
    """(n_regions, nrows, cols) soft region weights, summing to 1."""
    texture: np.ndarray
    """(nrows, cols) secondary-material fraction scale in [0, 1]."""
    illumination: np.ndarray
    """(nrows, cols) reflectance scale."""
    valid: np.ndarray
    """(nrows, cols) inside the swath."""


def pixel_centres(rows: int, cols: int, r0: int, r1: int) -> tuple[np.ndarray, np.ndarray]:
    y = (np.arange(r0, r1, dtype=np.float64)[:, None] + 0.5) / cols
    x = (np.arange(cols, dtype=np.float64)[None, :] + 0.5) / cols
    return y, x


def swath_valid(scene: Scene, rows: int, cols: int, r0: int, r1: int) -> np.ndarray:
    """Inside-the-swath mask of rows r0:r1 of a rows x cols grid."""
    y, x = pixel_centres(rows, cols, r0, r1)
    left, right, slope = scene.swath
    shift = slope * (y - scene.height / 2)
    return (x >= left + shift) & (x <= right + shift)


def render_block(scene: Scene, rows: int, cols: int, r0: int, r1: int) -> Block:
    """Region weights, texture, illumination and swath mask of rows r0:r1 of a rows x cols grid."""
    y, x = pixel_centres(rows, cols, r0, r1)
    y, x = np.broadcast_arrays(y, x)
    wy = y + scene.warp_amp * scene.warp[0](y, x)
    wx = x + scene.warp_amp * scene.warp[1](y, x)
    d = np.sqrt((wy[None] - scene.seeds[:, 0, None, None]) ** 2 + (wx[None] - scene.seeds[:, 1, None, None]) ** 2)
    logits = -(d - d.min(axis=0, keepdims=True)) / scene.mix_width
    w = np.exp(logits)
    w /= w.sum(axis=0, keepdims=True)
    tex = np.clip(0.5 + 0.35 * scene.texture(y, x), 0.0, 1.0)
    illum = np.clip(1.0 + scene.illum_amp * scene.illumination(y, x), 0.6, 1.4)
    return Block(weights=w, texture=tex, illumination=illum, valid=swath_valid(scene, rows, cols, r0, r1))


def abundances(scene: Scene, block: Block, n_materials: int) -> np.ndarray:
    """(n_materials, nrows, cols) material fractions of a block (sum to 1 per pixel)."""
    r = scene.n_regions
    p = np.zeros((r, n_materials))
    p[np.arange(r), scene.primary] = 1.0
    q = np.zeros((r, n_materials))
    q[np.arange(r), scene.secondary] = 1.0
    t = block.texture[None] * scene.texture_amp[:, None, None]  # (r, nrows, cols)
    wt = block.weights * t
    wp = block.weights - wt
    return np.einsum("rk,rij->kij", p, wp) + np.einsum("rk,rij->kij", q, wt)


def labels_of(scene: Scene, block: Block) -> np.ndarray:
    """int16 (nrows, cols): the primary material of the dominant region; -1 outside the swath."""
    lab = scene.primary[block.weights.argmax(axis=0)].astype(np.int16)
    lab[~block.valid] = -1
    return lab


def region_of(block: Block) -> np.ndarray:
    """(nrows, cols) index of the dominant region."""
    return block.weights.argmax(axis=0)

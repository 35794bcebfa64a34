"""Scene layout: regions with edges, within-region texture, mixtures at boundaries, illumination.

A scene lives in continuous coordinates, in units of the image width: ``x`` in [0, 1] across track,
``y`` in [0, rows/cols] along track. It is rendered on any pixel grid (a sensor's, or a ``ratio``-times
finer one for fusion) and one block of rows at a time, so flightline-length scenes never need more
than a block of abundances in memory.

Regions are a Voronoi partition of random seeds, with the coordinates warped by smooth noise so the
edges are irregular; each pixel's region weights are a softmax of minus its (warped) distance to the
seeds over ``mix_width``, which mixes materials in a thin band along every edge. Each region has a
primary material (its label) and a secondary material of the same class blended in by a smooth
texture field; about a third of the regions also mix in a material of another class (sub-pixel mixing,
vegetation over soil and the like) at a fraction that varies smoothly across the region; a smooth
illumination field times a scene brightness scales the reflectance (shading).

Variety: every scene draws its own number of regions (0.4-2x ``regions_per_area``), edge sharpness,
warp, texture, mixing and illumination amplitude (:data:`VARIETY` gives the ranges). With
``materials_per_scene`` a scene draws its own few materials from a large pool (class weights from a
Dirichlet, so some scenes are mostly vegetation and others mostly soil, rock or built surfaces); its
regions then index those local materials (``Scene.materials`` maps them to the pool) and everything that
renders it works on the local set, so a pool of thousands of spectra costs no more than a few dozen.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

#: Ranges (uniform) of the per-scene draws.
VARIETY: dict[str, tuple[float, float]] = {
    "regions_factor": (0.4, 2.0),
    "mix_width": (0.002, 0.012),
    "warp_amp": (0.03, 0.12),
    "illum_amp": (0.04, 0.3),
    "brightness": (0.85, 1.15),
    "other_frac": (0.1, 0.4),
}
MIXED_REGIONS = 0.35
"""Probability that a region mixes in a material of another class."""
MAX_OTHER = 0.45
"""Cap of the other-class fraction, so the region's own class keeps the majority its label claims."""
ILLUMINATION_RANGE = (0.5, 1.5)
"""Illumination (shading x brightness) is clipped to this range."""


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
    other: np.ndarray | None = None
    """(n_regions,) material of another class mixed into the region, -1 for none."""
    other_frac: np.ndarray | None = None
    """(n_regions,) mean fraction of ``other`` (modulated by the ``mixing`` field)."""
    mixing: Lattice | None = None
    brightness: float = 1.0
    materials: np.ndarray | None = None
    """Pool index of each local material (``primary``/``secondary``/``other`` index these); None: they
    index the pool directly."""

    @property
    def n_regions(self) -> int:
        return int(self.seeds.shape[0])

    def material_count(self, n_pool: int) -> int:
        """Materials the abundances run over: the scene's local set, or the whole pool of ``n_pool``."""
        return n_pool if self.materials is None else int(self.materials.shape[0])

    def spectra_of(self, pool_spectra: np.ndarray) -> np.ndarray:
        """The rows of ``pool_spectra`` (pool, grid) this scene's abundances refer to."""
        return pool_spectra if self.materials is None else pool_spectra[self.materials]

    @property
    def region_labels(self) -> np.ndarray:
        """(n_regions,) pool index of each region's primary material (its label)."""
        return self.primary if self.materials is None else self.materials[self.primary]

    def pool_index(self, local: np.ndarray) -> np.ndarray:
        """Pool indices of local material indices (identity without local materials)."""
        return np.asarray(local) if self.materials is None else self.materials[np.asarray(local)]


def _draw_local(rng: np.random.Generator, material_classes: list[str], k: int) -> np.ndarray:
    """``k`` distinct pool indices, classes weighted by a Dirichlet draw (sorted)."""
    classes = sorted(set(material_classes))
    members = {c: [i for i, m in enumerate(material_classes) if m == c] for c in classes}
    w = rng.dirichlet(np.full(len(classes), 0.7))
    chosen: set[int] = set()
    while len(chosen) < k:
        c = classes[int(rng.choice(len(classes), p=w))]
        left = [i for i in members[c] if i not in chosen]
        if not left:
            w[classes.index(c)] = 0.0
            if w.sum() == 0:
                break
            w = w / w.sum()
            continue
        chosen.add(int(rng.choice(left)))
    return np.array(sorted(chosen), dtype=np.int64)


def make_scene(rng: np.random.Generator, material_classes: list[str], *, height: float = 1.0,
               regions_per_area: int = 18, texture: float = 0.3, nodata_edges: bool = True,
               materials_per_scene: int | None = None) -> Scene:
    """A random scene over materials whose classes are ``material_classes`` (index = pool label).

    ``materials_per_scene``: draw that many pool materials for this scene (see the module docstring);
    None: regions draw from the whole pool. ``texture`` scales the secondary-material blend (0: none)."""
    n_pool = len(material_classes)
    if n_pool == 0:
        raise ValueError("no materials to build a scene from")
    if materials_per_scene is not None and materials_per_scene < 1:
        raise ValueError(f"materials_per_scene must be >= 1 or None, got {materials_per_scene}")
    v = {k: float(rng.uniform(*r)) for k, r in VARIETY.items()}
    local = None
    classes = list(material_classes)
    if materials_per_scene is not None:
        local = _draw_local(rng, classes, min(materials_per_scene, n_pool))
        classes = [material_classes[i] for i in local]
    n_mat = len(classes)
    n_reg = max(2, int(round(regions_per_area * height * v["regions_factor"])))
    seeds = np.stack([rng.uniform(0, height, n_reg), rng.uniform(0, 1, n_reg)], axis=1)
    primary = rng.integers(0, n_mat, n_reg)
    by_class: dict[str, list[int]] = {}
    for i, c in enumerate(classes):
        by_class.setdefault(c, []).append(i)
    secondary = np.array([rng.choice(by_class[classes[p]]) for p in primary])
    tex = rng.uniform(0.3, 1.0, n_reg) * texture
    other = np.full(n_reg, -1, dtype=np.int64)
    other_frac = np.zeros(n_reg)
    for r in range(n_reg):
        rest = [i for i, c in enumerate(classes) if c != classes[primary[r]]]
        if rest and rng.random() < MIXED_REGIONS:
            other[r] = int(rng.choice(rest))
            other_frac[r] = rng.uniform(*VARIETY["other_frac"])
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
        warp_amp=v["warp_amp"], mix_width=v["mix_width"], illum_amp=v["illum_amp"], swath=swath,
        other=other, other_frac=other_frac, mixing=Lattice.make(rng, height, 4, 2), brightness=v["brightness"],
        materials=local,
    )


def swap_regions(scene: Scene, rng: np.random.Generator, material_classes: list[str],
                 fraction: float = 0.3) -> tuple[Scene, np.ndarray]:
    """The scene at a second date: ``fraction`` of its regions get a material of another class.

    ``material_classes`` are the pool's classes. Returns the changed scene and the indices of the swapped
    regions (a swapped region is pure: its secondary and any mixed-in material become the new one).
    """
    n = scene.n_regions
    k = max(1, int(round(fraction * n)))
    swapped = np.sort(rng.choice(n, size=k, replace=False))
    classes = [material_classes[int(i)] for i in scene.pool_index(np.arange(scene.material_count(len(material_classes))))]
    primary, secondary = scene.primary.copy(), scene.secondary.copy()
    other = None if scene.other is None else scene.other.copy()
    for r in swapped:
        others = [i for i, c in enumerate(classes) if c != classes[primary[r]]]
        if not others:  # a single-class pool: any other material
            others = [i for i in range(len(classes)) if i != primary[r]]
        new = int(rng.choice(others))
        primary[r] = new
        secondary[r] = new
        if other is not None:
            other[r] = -1
    return replace(scene, primary=primary, secondary=secondary, other=other), swapped


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
    mixing: np.ndarray | None = None
    """(nrows, cols) scale of each region's other-class fraction, in [0, 2]."""


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
    return render_points(scene, *np.broadcast_arrays(y, x), swath_valid(scene, rows, cols, r0, r1))


def render_points(scene: Scene, y: np.ndarray, x: np.ndarray, valid: np.ndarray | None = None) -> Block:
    """:func:`render_block` at any scene coordinates ``y``, ``x`` (2-D, same shape): another sensor's grid over
    the same ground (co-located products, :mod:`data_prep.simulate.colocated`). ``valid`` defaults to all."""
    wy = y + scene.warp_amp * scene.warp[0](y, x)
    wx = x + scene.warp_amp * scene.warp[1](y, x)
    d = np.sqrt((wy[None] - scene.seeds[:, 0, None, None]) ** 2 + (wx[None] - scene.seeds[:, 1, None, None]) ** 2)
    logits = -(d - d.min(axis=0, keepdims=True)) / scene.mix_width
    w = np.exp(logits)
    w /= w.sum(axis=0, keepdims=True)
    tex = np.clip(0.5 + 0.35 * scene.texture(y, x), 0.0, 1.0)
    illum = np.clip(scene.brightness * (1.0 + scene.illum_amp * scene.illumination(y, x)), *ILLUMINATION_RANGE)
    mix = None if scene.mixing is None else np.clip(1.0 + 0.6 * scene.mixing(y, x), 0.0, 2.0)
    return Block(weights=w, texture=tex, illumination=illum,
                 valid=np.ones(y.shape, dtype=bool) if valid is None else valid, mixing=mix)


def abundances(scene: Scene, block: Block, n_materials: int) -> np.ndarray:
    """(n_materials, nrows, cols) material fractions of a block (sum to 1 per pixel).

    ``n_materials`` must be ``scene.material_count(pool size)``: the local set when the scene has one."""
    if scene.materials is not None and n_materials != scene.materials.shape[0]:
        raise ValueError(f"scene has {scene.materials.shape[0]} local materials, abundances asked for "
                         f"{n_materials} (use scene.material_count(n_pool))")
    r = scene.n_regions
    p = np.zeros((r, n_materials))
    p[np.arange(r), scene.primary] = 1.0
    q = np.zeros((r, n_materials))
    q[np.arange(r), scene.secondary] = 1.0
    t = block.texture[None] * scene.texture_amp[:, None, None]  # (r, nrows, cols)
    wt = block.weights * t
    wp = block.weights - wt
    out = np.einsum("rk,rij->kij", p, wp) + np.einsum("rk,rij->kij", q, wt)
    if scene.other is not None and (scene.other >= 0).any() and block.mixing is not None:
        has = np.flatnonzero(scene.other >= 0)
        u = np.clip(scene.other_frac[has, None, None] * block.mixing[None], 0.0, MAX_OTHER)  # (m, nrows, cols)
        wu = block.weights[has] * u  # taken from the region's own fractions
        o = np.zeros((has.size, n_materials))
        o[np.arange(has.size), scene.other[has]] = 1.0
        own = np.einsum("rk,rij->kij", p[has], wu * (1 - t[has])) + np.einsum("rk,rij->kij", q[has], wu * t[has])
        out += np.einsum("rk,rij->kij", o, wu) - own
    return out


def labels_of(scene: Scene, block: Block) -> np.ndarray:
    """int16 (nrows, cols): the pool index of the dominant region's primary material; -1 outside the swath."""
    lab = scene.region_labels[block.weights.argmax(axis=0)].astype(np.int16)
    lab[~block.valid] = -1
    return lab


def region_of(block: Block) -> np.ndarray:
    """(nrows, cols) index of the dominant region."""
    return block.weights.argmax(axis=0)

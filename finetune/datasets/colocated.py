"""Cross-sensor tiles of co-located products (``data_prep.simulate.colocated``'s manifest.json).

SpectralEarth-FM's DESIS-CDL idea on simulated co-located products: the same places seen by two sensors, a
classifier trained on one sensor's tiles and tested on the other's. For each location, both products are cut
into tiles on a common ground grid of ``tile_m`` metres (each at its own GSD: a 240 m tile is 8 EnMAP pixels and
24 Sentinel-2 pixels), placed by the products' own geolocation (misregistration included, as a user's data would
be); a tile's class is the dominant material category of the ground under it (the simulator's material map of
that product). Tiles whose class has fewer than ``min_per_class`` tiles in either set are dropped; the two sets
hold the same tiles (tile ``i`` of ``train`` is the place of tile ``i`` of ``test``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from finetune.datasets.base import ClassificationData, DatasetError
from finetune.datasets.synthetic import _grouped, _materials, read_manifest, read_product

METRES_PER_DEGREE = 111_320.0


@dataclass
class CrossSensorData:
    """Tiles of the same places from two sensors: train on ``train``, test on ``test``."""

    train: ClassificationData
    test: ClassificationData
    name: str = ""
    locations: np.ndarray | None = None
    """(N,) the location index of each tile (both sets)."""


def load_colocated_manifest(path: str | Path) -> tuple[Path, dict]:
    p, m = read_manifest(path, "a co-located manifest.json (python -m data_prep simulate --colocated --out DIR)")
    if m.get("kind") != "colocated":
        raise DatasetError(f"{p}: not a co-located manifest (kind {m.get('kind')!r}; simulate --colocated writes one)")
    return p.parent, m


def _tiles(root: Path, entry: dict, centre: tuple[float, float], tile_m: float, n_tiles: int, band_stride: int,
           group: str):
    """(patches [n*n, C, t, t], valid, labels, spectral) of one product on the common ``n_tiles`` x ``n_tiles`` grid
    of ``tile_m`` squares centred at the location centre; None entries where a tile leaves the product."""
    cube, valid, spec = read_product(root, entry, band_stride)
    lab, names = _grouped(_materials(root, entry), group)
    from data_prep.formats import open_product

    g = open_product(root / entry["path"])
    lat0, lon0 = centre
    # metres (east, south) of each pixel centre from the square's NW corner, from the product's own geolocation
    e = (g.lon - lon0) * METRES_PER_DEGREE * np.cos(np.deg2rad(lat0)) + n_tiles * tile_m / 2
    s = (lat0 - g.lat) * METRES_PER_DEGREE + n_tiles * tile_m / 2
    t = max(1, int(round(tile_m / g.gsd_m)))
    out = []
    for i in range(n_tiles):
        for j in range(n_tiles):
            # the pixel nearest the tile's NW corner (half a pixel inside), on the product's own grid
            d = (e - j * tile_m - g.gsd_m / 2) ** 2 + (s - i * tile_m - g.gsd_m / 2) ** 2
            r, c = np.unravel_index(int(np.argmin(d)), d.shape)
            if d[r, c] > g.gsd_m ** 2 or r + t > cube.shape[1] or c + t > cube.shape[2]:
                out.append(None)
                continue
            v = valid[r:r + t, c:c + t] & (lab[r:r + t, c:c + t] >= 0)
            if v.mean() < 0.5:
                out.append(None)
                continue
            counts = np.bincount(lab[r:r + t, c:c + t][v].clip(0), minlength=len(names))
            out.append((cube[:, r:r + t, c:c + t], valid[r:r + t, c:c + t], int(counts.argmax())))
    return out, spec, names


def synthetic_cross_sensor(manifest: str | Path, *, train_sensor: str = "enmap", test_sensor: str = "sentinel-2",
                           level: str = "L2", tile_m: float = 240.0, band_stride: int = 1, min_per_class: int = 2,
                           group: str = "category") -> CrossSensorData:
    """The cross-sensor tiles of a co-located corpus (see the module docstring)."""
    root, m = load_colocated_manifest(manifest)
    n_tiles = int(m["extent_m"] // tile_m) - 1  # one tile of margin for the products' shifts
    if n_tiles < 1:
        raise DatasetError(f"tile_m {tile_m:g} leaves no tile in the {m['extent_m']:g} m products")
    a, b, locs, names = [], [], [], None
    spec_a = spec_b = None
    for k, loc in enumerate(m["locations"]):
        pa = [p for p in loc["products"] if p["sensor"] == train_sensor and p["level"] == level]
        pb = [p for p in loc["products"] if p["sensor"] == test_sensor and p["level"] == level]
        if not pa or not pb:
            raise DatasetError(f"{root}/manifest.json: location {loc['id']} has no {level} product of "
                               f"{train_sensor if not pa else test_sensor}")
        ta, spec_a, names = _tiles(root, pa[0], tuple(loc["centre"]), tile_m, n_tiles, band_stride, group)
        tb, spec_b, _ = _tiles(root, pb[0], tuple(loc["centre"]), tile_m, n_tiles, band_stride, group)
        for x, y in zip(ta, tb):
            if x is not None and y is not None:
                a.append(x)
                b.append(y)
                locs.append(k)
    if not a:
        raise DatasetError(f"{root}: no tile of {tile_m:g} m is inside both {train_sensor} and {test_sensor} products")
    la = np.array([x[2] for x in a])
    lb = np.array([y[2] for y in b])
    keep = [c for c in np.unique(la) if (la == c).sum() >= min_per_class and (lb == c).sum() >= min_per_class]
    if len(keep) < 2:
        raise DatasetError(f"{root}: fewer than two classes with >= {min_per_class} tiles in both sensors; simulate "
                           "more locations or use smaller tiles")
    sel = np.isin(la, keep) & np.isin(lb, keep)
    lut = {c: i for i, c in enumerate(keep)}
    cls = [names[c] if c < len(names) else str(c) for c in keep]

    def data(tiles, labels, spec, sensor):
        idx = np.flatnonzero(sel)
        return ClassificationData(np.stack([tiles[i][0] for i in idx]).astype(np.float32),
                                  np.asarray([lut[c] for c in labels[idx]], np.int64), cls, spec,
                                  f"colocated_{sensor}_{level}", valid=np.stack([tiles[i][1] for i in idx]))

    return CrossSensorData(data(a, la, spec_a, train_sensor), data(b, lb, spec_b, test_sensor),
                           f"cross_sensor_{train_sensor}_to_{test_sensor}", np.asarray(locs)[sel])

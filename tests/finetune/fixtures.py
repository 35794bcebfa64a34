"""Tiny copies of public datasets, written from their documented layouts with tifffile / scipy (never with our
own readers' code): each function states the source of the layout it writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.io
import tifffile

AERORIT_COLOURS = [[255, 0, 0], [0, 255, 0], [0, 0, 255], [0, 255, 255], [255, 127, 80], [153, 0, 0]]


def write_aerorit(root: Path, rows: int = 56, cols: int = 2250, seed: int = 0) -> dict:
    """AeroRIT (github.com/aneesh3108/AeroRIT): image_hsi_reflectance.tif band-first (51, rows, cols),
    image_labels.tif an RGB colour map; colours in the order of its loader (the 6th, dark red, is undefined)."""
    g = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    idx = g.integers(0, 6, (rows, cols))
    cube = (g.random((51, rows, cols)) * 40 + idx[None] * 5).astype(np.float32)
    tifffile.imwrite(root / "image_hsi_reflectance.tif", cube)  # one page per band
    rgb = np.asarray(AERORIT_COLOURS, np.uint8)[idx]
    tifffile.imwrite(root / "image_labels.tif", rgb, photometric="rgb")
    return {"root": root, "cube": cube, "index": idx}


def write_citius_change(root: Path, scene: str, shape=(9, 7), seed: int = 0) -> dict:
    """Bay Area / Santa Barbara as CiTIUS distributes them: mat/ with the two dates and the ground truth, every
    variable 'HypeRvieW' (rows, cols, 224) double / uint8 (0 unknown, 1 change, 2 no change), waves.txt beside
    mat/ (one 'Band i : centre nm' line a band)."""
    g = np.random.default_rng(seed)
    names = {"bay_area": ("Bay_Area_2013.mat", "Bay_Area_2015.mat", "bayArea_gtChanges2.mat.mat"),
             "santa_barbara": ("barbara_2013.mat", "barbara_2014.mat", "barbara_gtChanges.mat")}[scene]
    (root / "mat").mkdir(parents=True, exist_ok=True)
    t1 = g.random((*shape, 224))
    t2 = g.random((*shape, 224))
    gt = g.integers(0, 3, shape).astype(np.uint8)
    for name, arr in zip(names, (t1, t2, gt)):
        scipy.io.savemat(root / "mat" / name, {"HypeRvieW": arr})
    wl = np.linspace(365.9, 2496.2, 224)
    (root / "waves.txt").write_text("".join(f"Band {i + 1} : {w:.4f} nm\n" for i, w in enumerate(wl)))
    return {"root": root, "t1": t1, "t2": t2, "gt": gt, "wavelengths": wl}

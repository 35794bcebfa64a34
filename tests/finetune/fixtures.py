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


def _envi_header(path: Path, lines: int, samples: int, bands: int, data_type: int, extra: str = "") -> None:
    """An ENVI header as GDAL's ENVI driver writes one (BSQ, little-endian)."""
    path.write_text("ENVI\ndescription = {written by the specfm test fixtures}\n"
                    f"samples = {samples}\nlines = {lines}\nbands = {bands}\nheader offset = 0\n"
                    f"file type = ENVI Standard\ndata type = {data_type}\ninterleave = bsq\nbyte order = 0\n{extra}")


def write_qingpu(root: Path, rows: int = 40, cols: int = 48, bands: int = 6, roi: int = 8, seed: int = 0,
                 rois=((4, 2), (20, 24))) -> dict:
    """Qingpu-HSI as github.com/busbyjrj/PatchOut data/README.md lays it out: Qingpu_HSI_image.dat/.hdr and
    Qingpu_HSI_gt.dat/.hdr (ENVI BSQ; the labels uint8, 0 unlabelled, 1..20) and Qingpu_HSI_rois.txt ('index x y'
    a line; the real windows are 512 pixels, ``roi`` here). Data files written with numpy, headers as text."""
    g = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    cube = (g.random((bands, rows, cols)) * 1000).astype(np.float32)
    gt = g.integers(0, 21, (rows, cols)).astype(np.uint8)
    wl = np.linspace(400.0, 1000.0, bands)
    cube.tofile(root / "Qingpu_HSI_image.dat")
    _envi_header(root / "Qingpu_HSI_image.hdr", rows, cols, bands, 4,
                 "wavelength units = Nanometers\nwavelength = {" + ", ".join(f"{w:.2f}" for w in wl) + "}\n")
    gt.tofile(root / "Qingpu_HSI_gt.dat")
    _envi_header(root / "Qingpu_HSI_gt.hdr", rows, cols, 1, 1)
    (root / "Qingpu_HSI_rois.txt").write_text("".join(f"{i + 1} {x} {y}\n" for i, (x, y) in enumerate(rois)))
    return {"root": root, "cube": cube, "gt": gt, "wavelengths": wl, "rois": rois, "roi": roi}


def _utm_tags(pixel: float, x0: float = 500000.0, y0: float = 4200000.0) -> list[tuple]:
    """GeoTIFF tags of a north-up UTM 11N grid (EPSG:32611, the authors' projection): pixel scale, tie point, keys."""
    return [(33550, "d", 3, (pixel, pixel, 0.0), False), (33922, "d", 6, (0.0, 0.0, 0.0, x0, y0, 0.0), False),
            (34735, "H", 12, (1, 1, 0, 2, 1024, 0, 1, 1, 3072, 0, 1, 32611), False)]


def write_mshfnet(root: Path, area: str = "1_SF", split: str = "train", lr_shape=(3, 4), emit_pixel: float = 60.0,
                  planet_pixel: float = 4.0, seed: int = 0) -> dict:
    """The MSHFNet / MSAHFNet data as model_code/data_extraction.py reads it: <area>/0_basic_information/LR_head.nc
    (EMIT sensor_band_parameters: wavelengths, fwhm, good_wavelengths) and <area>/<n>_<split>ing_imagery/
    <n>_<split>_{EMIT,Planet}.tif, GeoTIFFs as GDAL writes them (pixel-interleaved float32, UTM 11N), EMIT with its
    285 bands (bad bands 0), PlanetScope's 8 bands in 0-1. Written with h5netcdf and tifffile."""
    import h5netcdf

    g = np.random.default_rng(seed)
    folder, prefix = {"train": ("1_training_imagery", "1_train"), "test": ("2_testing_imagery", "2_test"),
                      "validate": ("3_validating_imagery", "3_validate")}[split]
    base = root / area
    (base / "0_basic_information").mkdir(parents=True, exist_ok=True)
    (base / folder).mkdir(parents=True, exist_ok=True)
    wl = np.linspace(381.0, 2493.0, 285)
    good = ((wl < 1320) | (wl > 1440)) & ((wl < 1770) | (wl > 1960))
    with h5netcdf.File(base / "0_basic_information" / "LR_head.nc", "w") as f:
        f.dimensions = {"bands": 285}
        grp = f.create_group("sensor_band_parameters")
        grp.create_variable("wavelengths", ("bands",), "f4", data=wl.astype(np.float32))
        grp.create_variable("fwhm", ("bands",), "f4", data=np.full(285, 8.5, np.float32))
        grp.create_variable("good_wavelengths", ("bands",), "u1", data=good.astype(np.uint8))
    h, w = lr_shape
    emit = (g.random((h, w, 285)) * 0.5 + 0.01).astype(np.float32)
    emit[..., ~good] = 0.0
    hh, ww = int(round(h * emit_pixel / planet_pixel)), int(round(w * emit_pixel / planet_pixel))
    planet = (g.random((hh, ww, 8)) * 0.5 + 0.01).astype(np.float32)
    tifffile.imwrite(base / folder / f"{prefix}_EMIT.tif", emit, photometric="minisblack", planarconfig="contig",
                     extratags=_utm_tags(emit_pixel))
    tifffile.imwrite(base / folder / f"{prefix}_Planet.tif", planet, photometric="minisblack", planarconfig="contig",
                     extratags=_utm_tags(planet_pixel))
    return {"root": root, "emit": emit, "planet": planet, "wavelengths": wl, "good": good}

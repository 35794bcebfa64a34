"""Loaders for public benchmarks in the form they are distributed.

Field and file names follow the public releases where known; every one is a keyword argument (and
a key of the suite YAML's ``data:`` block), so a differently named copy is read by configuration.

- AeroRIT (RIT, Rangnekar et al. 2020): ``image_hsi_reflectance.tif`` (or ``image_hsi_radiance.tif``),
  51 bands 400-900 nm every 10 nm, band-first, and the RGB ``image_labels.tif``; palette, class order, crop and
  split from the dataset's repository (see :data:`AERORIT_CLASSES`).
- WHU-H2SR and Qingpu-HSI: one hyperspectral scene + label raster (.tif/.mat/ENVI); band table from
  the ENVI header or given in the config.
- Every loader drops the bands pretraining never sees (the registry's bad-band ranges of the named sensor,
  else the water-vapour ranges; ``drop_bad_bands: false`` keeps them).
- Bay Area and Santa Barbara (Lopez-Fandino et al., AVIRIS, 224 bands): three MATLAB files per scene
  (t1, t2, ground truth); ground truth 1 = change, 2 = no change, 0 = unknown. v5 files through
  scipy, v7.3 (HDF5) through h5py. Variable names auto-detected when a file holds one array.
- HRSSC scene classification: one folder per class of .tif/.mat patches; ``band_indices`` selects a
  band subset (e.g. 192 of 224).
- EMIT + PlanetScope: co-registered L2 pair read through ``data_prep.formats.open_product``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data_prep.spectral import bad_band_ranges, good_band_mask
from finetune.datasets.base import (
    ChangeData,
    ClassificationData,
    DatasetError,
    FusionData,
    SegmentationData,
    Spectral,
    clean,
    map_labels,
    read_array,
    read_cube,
    select_bands,
)


def band_table(spec, n_bands: int, path: str | Path = "", fwhm=None) -> tuple[np.ndarray, np.ndarray]:
    """Wavelengths and FWHM (nm) from a config value: a list, ``{start, step}``, or ``{sensor: name}``
    (the registry's table); FWHM from ``fwhm`` (list or scalar) or the spacing of the centres."""
    if spec is None:
        raise DatasetError(f"{path}: no band table; give `wavelengths` (list, {{start, step}} or {{sensor: name}})")
    if isinstance(spec, dict) and "sensor" in spec:
        from data_prep.registry import get_sensor

        s = get_sensor(spec["sensor"])
        wl, fw = s.wavelengths_nm.astype(np.float32), s.fwhm_nm.astype(np.float32)
    elif isinstance(spec, dict):
        wl = (float(spec["start"]) + float(spec["step"]) * np.arange(n_bands)).astype(np.float32)
        fw = None
    else:
        wl, fw = np.asarray(spec, dtype=np.float32), None
    if fwhm is not None:
        fw = np.broadcast_to(np.asarray(fwhm, dtype=np.float32), wl.shape).copy()
    if fw is None:
        fw = np.abs(np.gradient(wl)).astype(np.float32) if wl.size > 1 else np.full_like(wl, 10.0)
    if wl.size != n_bands:
        raise DatasetError(f"{path}: band table has {wl.size} wavelengths but the image has {n_bands} bands")
    return wl, fw


def remove_bad_bands(cube: np.ndarray, wl: np.ndarray, fw: np.ndarray, sensor: str | None, wavelengths=None,
                   path: str | Path = "", axis: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Drop the bands pretraining never sees (the registry's bad-band ranges of ``sensor`` or of the sensor a
    ``{sensor: name}`` band table names, else water vapour: :func:`data_prep.spectral.bad_band_ranges`)."""
    ranges = bad_band_ranges(sensor, wavelengths.get("sensor") if isinstance(wavelengths, dict) else None)
    keep = good_band_mask(wl, ranges)
    if not keep.any():
        raise DatasetError(f"{path}: every band ({wl.min():.0f}-{wl.max():.0f} nm) lies in a bad-band range "
                           f"{ranges}; set drop_bad_bands: false to keep them")
    return np.compress(keep, cube, axis=axis), wl[keep], fw[keep]


def _envi_bands(path: Path) -> tuple[np.ndarray | None, np.ndarray | None]:
    if path.suffix.lower() != ".hdr":
        return None, None
    import spectral.io.envi as envi

    meta = envi.read_envi_header(str(path))
    wl = meta.get("wavelength")
    fw = meta.get("fwhm")
    wl = np.asarray(wl, dtype=np.float32) if wl else None
    if wl is not None and wl.max() < 100:  # micrometres
        wl = wl * 1000
    fw = np.asarray(fw, dtype=np.float32) * (1000 if fw and wl is not None and float(fw[0]) < 1 else 1) if fw else None
    return wl, fw


def _palette_to_index(rgb: np.ndarray, palette: list[list[int]], path) -> np.ndarray:
    """(H, W, 3) colour labels -> index into ``palette``; unknown colours -> value len(palette)."""
    out = np.full(rgb.shape[:2], len(palette), np.int64)
    for k, colour in enumerate(palette):
        out[(rgb[..., :3] == np.asarray(colour)[None, None]).all(-1)] = k
    return out


def load_segmentation(image: str | Path, labels: str | Path, class_names: list[str] | None = None, *,
                      label_values: list[int] | None = None, ignore_values: list[int] = (),
                      palette: list[list[int]] | None = None, image_key: str | None = None,
                      label_key: str | None = None, wavelengths=None, fwhm=None, layout: str = "auto",
                      band_indices: list[int] | None = None, sensor: str | None = None, level: str | None = None,
                      train_labels: str | Path | None = None, name: str = "",
                      drop_bad_bands: bool = True) -> SegmentationData:
    """One scene + label raster. ``train_labels`` (optional second raster) marks training pixels
    (non-ignored there); without it the runner splits the scene spatially. ``drop_bad_bands`` drops the bands
    in the sensor's bad-band ranges (:func:`remove_bad_bands`), as pretraining does."""
    image, labels = Path(image), Path(labels)
    if class_names is None:
        raise DatasetError(f"{labels}: no class_names given; name the classes in label order")
    for p in (image, labels):
        if not p.exists():
            raise DatasetError(f"{p} does not exist; expected the scene image and its label raster")
    cube = read_cube(image, image_key, layout)
    hdr_wl, hdr_fw = _envi_bands(image)
    wl, fw = band_table(hdr_wl if wavelengths is None and hdr_wl is not None else wavelengths, cube.shape[0],
                        image, fwhm if fwhm is not None else hdr_fw)
    raw = read_array(labels, label_key)
    if palette is not None:
        if raw.ndim != 3:
            raise DatasetError(f"{labels}: a palette was given but the labels are not an RGB image (shape {raw.shape})")
        raw = _palette_to_index(raw, palette, labels)
        label_values, ignore_values = list(range(len(palette))), [len(palette), *ignore_values]
    raw = np.squeeze(raw)
    if raw.shape != cube.shape[1:]:
        raise DatasetError(f"{labels}: label raster is {raw.shape}, the image {image} is {cube.shape[1:]}; expected equal")
    lab = map_labels(raw, label_values, class_names, ignore_values, labels)
    train_mask = None
    if train_labels is not None:
        tr = np.squeeze(read_array(train_labels, label_key))
        train_mask = map_labels(tr, label_values, class_names, ignore_values, train_labels) >= 0
    cube = select_bands(cube, band_indices, image)
    if band_indices is not None:
        wl, fw = wl[band_indices], fw[band_indices]
    if drop_bad_bands:
        cube, wl, fw = remove_bad_bands(cube, wl, fw, sensor, wavelengths, image)
    return SegmentationData(clean(cube), lab, list(class_names), Spectral(wl, fw, sensor, level), train_mask,
                            name or image.stem)


# AeroRIT as distributed (github.com/aneesh3108/AeroRIT, README "Scene information" and the code there):
# - image_hsi_reflectance.tif / image_hsi_radiance.tif: 51 bands 400-900 nm every 10 nm, stored band-first
#   (sampling_data.py reads it and transposes [1, 2, 0]); image_labels.tif: an RGB colour map (H, W, 3).
# - the colour of each class (helpers/utils.py AeroCLoader.get_labels, index 5 "undefined" is ignored by its
#   Metrics) and the class names in that order (the mmsegmentation AeroRITDataSet's METAINFO):
AERORIT_CLASSES = ["buildings", "vegetation", "roads", "water", "cars"]
AERORIT_PALETTE = [[255, 0, 0], [0, 255, 0], [0, 0, 255], [0, 255, 255], [255, 127, 80]]
AERORIT_UNSPECIFIED = [153, 0, 0]
#: sampling_data.py crops the scene to [53:, 7:] and splits it by columns: [:1728] train ("Data-left"),
#: [1728:2240] validation ("Data-mid"), [2240:] test ("Data-right").
AERORIT_CROP = (53, 7)
AERORIT_SPLIT_COLUMNS = (1728, 2240)


def load_aerorit(root: str | Path, *, image: str = "image_hsi_reflectance.tif", labels: str = "image_labels.tif",
                 split: bool = True, **kw) -> SegmentationData:
    """AeroRIT as distributed: the band-first 51-band TIFF, the RGB label map decoded with the dataset's own
    palette (unspecified and unknown colours ignored), the border crop and, with ``split``, the published
    column split (train left, validation middle left out, test right)."""
    root = Path(root)
    kw.setdefault("wavelengths", {"start": 400.0, "step": 10.0})
    kw.setdefault("fwhm", 10.0)
    kw.setdefault("palette", AERORIT_PALETTE)
    kw.setdefault("class_names", AERORIT_CLASSES)
    d = load_segmentation(root / image, root / labels, name="aerorit", **kw)
    y0, x0 = AERORIT_CROP
    d.image, d.labels = np.ascontiguousarray(d.image[:, y0:, x0:]), np.ascontiguousarray(d.labels[y0:, x0:])
    if d.image.shape[2] <= AERORIT_SPLIT_COLUMNS[1]:
        if split:
            raise DatasetError(f"{root / image}: {d.image.shape[2]} columns after the [53:, 7:] crop; the published "
                               f"split needs more than {AERORIT_SPLIT_COLUMNS[1]} (split: false splits by train_fraction)")
    elif split:
        cols = np.arange(d.image.shape[2])[None].repeat(d.image.shape[1], 0)
        d.train_mask, d.test_mask = cols < AERORIT_SPLIT_COLUMNS[0], cols >= AERORIT_SPLIT_COLUMNS[1]
    return d


def load_scene_dir(root: str | Path, *, image: str, labels: str, class_names: list[str], name: str = "",
                   **kw) -> SegmentationData:
    """WHU-H2SR / Qingpu-HSI and other single-scene sets: files named in the config under ``root``."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root} is not a directory; expected a folder holding {image} and {labels}")
    return load_segmentation(root / image, root / labels, class_names, name=name or root.name, **kw)


def load_change_mat(t1: str | Path, t2: str | Path, gt: str | Path, *, keys: tuple = (None, None, None),
                    changed_values: list[int] = (1,), unchanged_values: list[int] = (2,),
                    wavelengths=None, fwhm=None, band_indices: list[int] | None = None, layout: str = "auto",
                    sensor: str | None = None, level: str | None = None, name: str = "",
                    drop_bad_bands: bool = True) -> ChangeData:
    """Bitemporal change detection from MATLAB files (or any :func:`read_array` format); bad bands of the
    sensor (AVIRIS-Classic by default) dropped unless ``drop_bad_bands`` is false."""
    paths = [Path(t1), Path(t2), Path(gt)]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise DatasetError(f"missing {missing}; expected the t1 image, the t2 image and the ground-truth change map")
    a = read_cube(paths[0], keys[0], layout)
    b = read_cube(paths[1], keys[1], layout)
    if a.shape != b.shape:
        raise DatasetError(f"{paths[1]}: shape {b.shape} differs from {paths[0]} {a.shape}; expected co-registered images")
    raw = np.squeeze(read_array(paths[2], keys[2])).astype(np.int64)
    if raw.shape != a.shape[1:]:
        raise DatasetError(f"{paths[2]}: change map is {raw.shape}, the images {a.shape[1:]}; expected equal")
    change = np.full(raw.shape, -1, np.int64)
    change[np.isin(raw, list(changed_values))] = 1
    change[np.isin(raw, list(unchanged_values))] = 0
    wl, fw = band_table(wavelengths if wavelengths is not None else {"sensor": "aviris-classic"}, a.shape[0],
                        paths[0], fwhm)
    if band_indices is not None:
        a, b = select_bands(a, band_indices, paths[0]), select_bands(b, band_indices, paths[1])
        wl, fw = wl[band_indices], fw[band_indices]
    if drop_bad_bands:
        ab, wl, fw = remove_bad_bands(np.stack([a, b]), wl, fw, sensor or "aviris-classic", wavelengths, paths[0],
                                      axis=1)
        a, b = ab[0], ab[1]
    return ChangeData(clean(a), clean(b), change, Spectral(wl, fw, sensor or "aviris-classic", level or "L1"),
                      name or paths[0].stem)


# Bay Area and Santa Barbara as CiTIUS distributes them (citius.usc.es "Hyperspectral change detection dataset";
# the layout as read by public code: bayArea_AVIRIS/mat/{Bay_Area_2013,Bay_Area_2015}.mat +
# bayArea_gtChanges2.mat.mat, santaBarbara_AVIRIS/mat/{barbara_2013,barbara_2014,barbara_gtChanges}.mat, a
# waves.txt beside mat/; every variable is 'HypeRvieW': (600, 500, 224) and (984, 740, 224) doubles, the ground
# truth uint8 with 0 unknown, 1 change, 2 no change). Some copies drop the doubled ".mat.mat" or the mat/ folder:
# both are looked for.


def _find(root: Path, names: tuple[str, ...]) -> Path:
    """The first of ``root/mat/<name>`` / ``root/<name>`` that exists (else the first candidate, for the error)."""
    cands = [root / sub / n for n in names for sub in ("mat", ".")]
    return next((c for c in cands if c.exists()), cands[0])


def read_waves(path: Path, n_bands: int) -> np.ndarray | None:
    """Band centres (nm) from a CiTIUS ``waves.txt`` (one band a line; the number on the line that is a wavelength,
    300-2600 nm or 0.3-2.6 um); None when the file is absent."""
    import re

    if not path.is_file():
        return None
    wl = []
    for line in path.read_text().splitlines():
        nums = [float(x) for x in re.findall(r"[-+]?\d*\.\d+|\d+", line)]
        nm = [v for v in nums if 300 <= v <= 2600] or [v * 1000 for v in nums if 0.3 <= v <= 2.6]
        if line.strip() and nm:
            wl.append(nm[-1])
    if len(wl) != n_bands:
        raise DatasetError(f"{path}: {len(wl)} band centres for {n_bands} bands; expected one wavelength a line")
    return np.asarray(wl, np.float32)


def _citius_change(root: str | Path, names: tuple[tuple[str, ...], ...], name: str, kw: dict) -> ChangeData:
    root = Path(root)
    t1, t2, gt = (_find(root, n) for n in names)
    kw.setdefault("keys", ("HypeRvieW", "HypeRvieW", "HypeRvieW"))
    if "wavelengths" not in kw and t1.exists():
        wl = read_waves(root / "waves.txt", 224)
        if wl is not None:
            kw["wavelengths"] = wl.tolist()
    kw["keys"] = tuple(kw["keys"])
    return load_change_mat(t1, t2, gt, name=name, **kw)


def load_bay_area(root: str | Path, **kw) -> ChangeData:
    """Bay Area (AVIRIS, 2013 / 2015, 600 x 500, 224 bands) as distributed (see above)."""
    return _citius_change(root, (("Bay_Area_2013.mat",), ("Bay_Area_2015.mat",),
                                 ("bayArea_gtChanges2.mat.mat", "bayArea_gtChanges2.mat")), "bay_area", kw)


def load_santa_barbara(root: str | Path, **kw) -> ChangeData:
    """Santa Barbara (AVIRIS, 2013 / 2014, 984 x 740, 224 bands) as distributed (see above)."""
    return _citius_change(root, (("barbara_2013.mat",), ("barbara_2014.mat",), ("barbara_gtChanges.mat",)),
                          "santa_barbara", kw)


def load_scene_folders(root: str | Path, *, band_indices: list[int] | None = None, wavelengths=None, fwhm=None,
                       key: str | None = None, layout: str = "auto", extensions=(".tif", ".tiff", ".mat"),
                       sensor: str | None = None, level: str | None = None, name: str = "",
                       drop_bad_bands: bool = True) -> ClassificationData:
    """HRSSC-style scene classification: ``root/<class name>/<patch>.tif|.mat``, classes sorted by name;
    bad bands (after ``band_indices``) dropped unless ``drop_bad_bands`` is false."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root} is not a directory; expected one sub-folder per class of .tif/.mat patches")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if len(classes) < 2:
        raise DatasetError(f"{root}: found {len(classes)} class folder(s); expected one sub-folder per class (>= 2)")
    patches, labels, files = [], [], []
    n_full = None
    for k, c in enumerate(classes):
        fs = sorted(f for f in (root / c).iterdir() if f.suffix.lower() in extensions)
        if not fs:
            raise DatasetError(f"{root / c}: no {'/'.join(extensions)} files in class folder {c!r}")
        for f in fs:
            cube = read_cube(f, key, layout)
            n_full = n_full or cube.shape[0]
            patches.append(select_bands(cube, band_indices, f))
            labels.append(k)
            files.append(str(f))
    shapes = {p.shape for p in patches}
    if len(shapes) != 1:
        raise DatasetError(f"{root}: patches differ in shape {sorted(shapes)[:4]}; expected one shape")
    wl, fw = band_table(wavelengths, n_full, root, fwhm)
    if band_indices is not None:
        wl, fw = wl[band_indices], fw[band_indices]
    stack = np.stack(patches)
    if drop_bad_bands:
        stack, wl, fw = remove_bad_bands(stack, wl, fw, sensor, wavelengths, root, axis=1)
    return ClassificationData(clean(stack), np.asarray(labels, np.int64), classes,
                              Spectral(wl, fw, sensor, level), name or root.name, files)


def load_fusion_pair(hs: str | Path, ms: str | Path, *, ratio: int | None = None, name: str = "") -> FusionData:
    """A co-registered LR-HS product and HR-MS product (e.g. EMIT L2 + PlanetScope) via open_product."""
    from data_prep.formats import open_product

    gh, gm = open_product(hs), open_product(ms)
    ch, vh = gh.read_rows(0, gh.n_rows)
    cm, vm = gm.read_rows(0, gm.n_rows)
    if ratio is None:
        ratio = int(round(gm.n_cols / gh.n_cols))
    if ratio < 1 or gh.n_rows * ratio > gm.n_rows or gh.n_cols * ratio > gm.n_cols:
        raise DatasetError(f"{ms}: {gm.n_rows}x{gm.n_cols} pixels cannot cover {hs} ({gh.n_rows}x{gh.n_cols}) "
                           f"at ratio {ratio}; expected a co-registered pair with the MS grid ratio x finer")
    good = np.asarray(gh.good_bands, bool)
    ch = ch[good]
    cm, vm = cm[:, :gh.n_rows * ratio, :gh.n_cols * ratio], np.asarray(vm, bool)[:gh.n_rows * ratio, :gh.n_cols * ratio]
    return FusionData(clean(ch), clean(cm),
                      Spectral(gh.wavelengths_nm[good].astype(np.float32), gh.fwhm_nm[good].astype(np.float32),
                               gh.sensor, gh.level),
                      Spectral(gm.wavelengths_nm.astype(np.float32), gm.fwhm_nm.astype(np.float32), gm.sensor, gm.level),
                      int(ratio), name or Path(hs).stem, np.asarray(vh, bool), vm)

"""Loaders for public benchmarks in the form they are distributed.

Field and file names follow the public releases where known; every one is a keyword argument (and
a key of the suite YAML's ``data:`` block), so a differently named copy is read by configuration.

- AeroRIT (RIT, Rangnekar et al. 2020): ``image_hsi_reflectance.tif`` (or ``image_hsi_radiance.tif``),
  51 bands 400-900 nm every 10 nm, band-first, and the RGB ``image_labels.tif``; palette, class order, crop and
  split from the dataset's repository (see :data:`AERORIT_CLASSES`).
- Qingpu-HSI (Ji et al. 2025, the PatchOut paper, by SpecAware's first author): ``Qingpu_HSI_image.dat/.hdr`` and
  ``Qingpu_HSI_gt.dat/.hdr`` (ENVI), 20 classes (label 0 unlabelled), the published split from
  ``Qingpu_HSI_rois.txt`` (see :func:`load_qingpu`).
- WHU-H2SR: one hyperspectral scene + label raster (.tif/.mat/ENVI) named in the config; its layout was not found in
  a source this build could read (``benchmark.py --list`` says so).
- Every loader drops the bands pretraining never sees (the registry's bad-band ranges of the named sensor,
  else the water-vapour ranges; ``drop_bad_bands: false`` keeps them).
- Bay Area and Santa Barbara (Lopez-Fandino et al., AVIRIS, 224 bands): three MATLAB files per scene
  (t1, t2, ground truth); ground truth 1 = change, 2 = no change, 0 = unknown. v5 files through
  scipy, v7.3 (HDF5) through h5py. Variable names auto-detected when a file holds one array.
- HRSSC scene classification: one folder per class of .tif/.mat patches; ``band_indices`` selects a
  band subset (e.g. 192 of 224).
- EMIT + PlanetScope: a co-registered L2 pair read through ``data_prep.formats.open_product``
  (:func:`load_fusion_pair`), or the paired data of the MSHFNet / MSAHFNet paper (Ji et al. 2026, RSE 338, 115385)
  in the layout its code reads (:func:`load_mshfnet`).
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


def load_scene_dir(root: str | Path, *, image: str | None = None, labels: str | None = None,
                   class_names: list[str] | None = None, name: str = "", **kw) -> SegmentationData:
    """WHU-H2SR and other single-scene sets: files named in the config under ``root`` (``image``, ``labels``,
    ``class_names``; ``wavelengths`` unless the image is ENVI with a band table in its header)."""
    root = Path(root)
    unset = [k for k, v in (("image", image), ("labels", labels), ("class_names", class_names)) if v is None]
    if unset:
        raise DatasetError(f"{root}: the layout of this dataset is not known to this build; name {unset} in the "
                           "suite YAML's data block (see `benchmark.py --list`)")
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


# Qingpu-HSI as distributed (github.com/busbyjrj/PatchOut, data/README.md, data/prepare_for_Qingpu_HSI.py,
# data/utils.py, dataset/dataset_for_Qingpu_HSI.py, utils/accuracy_analysis.py; the dataset from
# www.3sobs.cn/qingpu-hsi-dataset):
# - Qingpu_HSI_image.dat + .hdr and Qingpu_HSI_gt.dat + .hdr, ENVI (read there with GDAL); Qingpu_HSI_mean_std.txt
#   (one band a line) and Qingpu_HSI_rois.txt beside them;
# - 20 classes: num_classes = 20, the ground truth 1..20 with 0 unlabelled (accuracy_analysis ignores 0; the
#   training masks are gt - 1 with -1 ignored). The class names are not in those sources: classes are named by
#   their label value unless the config names them;
# - the split: 16 windows of 512 x 512 pixels whose upper-left corners (x = column, y = row) are the lines of
#   Qingpu_HSI_rois.txt (index, x, y) hold the training and validation labels; up to 5000 labelled pixels of each
#   class drawn at random over the 16 windows train (sample_labels_all, train_samples = 5000), the other window
#   pixels validate; the test labels are every labelled pixel outside the windows (create_mask_for_testing_by_roi).
QINGPU_N_CLASSES = 20
QINGPU_ROI_SIZE = 512
QINGPU_TRAIN_PER_CLASS = 5000
#: (x, y) of Qingpu_HSI_rois.txt in the PatchOut repository (used when the file is not beside the image)
QINGPU_ROIS = ((19877, 2336), (18446, 440), (16145, 942), (10194, 2428), (13766, 1083), (5055, 1759), (762, 294),
               (1295, 2125), (1637, 572), (6563, 2194), (15954, 2325), (2926, 2423), (13332, 2429), (13667, 1723),
               (2355, 1619), (4512, 47))


def read_rois(path: Path) -> tuple[tuple[int, int], ...]:
    """(x, y) window corners from a Qingpu_HSI_rois.txt (``index x y`` a line)."""
    rows = []
    for k, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        try:
            rows.append((int(float(parts[1])), int(float(parts[2]))))
        except (IndexError, ValueError):
            raise DatasetError(f"{path}:{k}: expected 'index x y', got {line!r}") from None
    if not rows:
        raise DatasetError(f"{path}: no ROI lines; expected 'index x y' per line")
    return tuple(rows)


def load_qingpu(root: str | Path, *, image: str = "Qingpu_HSI_image.hdr", labels: str = "Qingpu_HSI_gt.hdr",
                rois: str = "Qingpu_HSI_rois.txt", class_names: list[str] | None = None,
                train_per_class: int | None = QINGPU_TRAIN_PER_CLASS, roi_size: int = QINGPU_ROI_SIZE, seed: int = 0,
                **kw) -> SegmentationData:
    """Qingpu-HSI as distributed (see above): the ENVI scene (band table from its header unless ``wavelengths``
    is given) and labels, training pixels from the ROI windows (``train_per_class`` per class drawn with ``seed``;
    None: every labelled window pixel), the test region outside them (the validation pixels in neither)."""
    root = Path(root)
    if class_names is None:
        class_names = [f"class {v}" for v in range(1, QINGPU_N_CLASSES + 1)]
    kw.setdefault("label_values", list(range(1, len(class_names) + 1)))
    kw.setdefault("ignore_values", [0])
    d = load_segmentation(root / image, root / labels, class_names, name="qingpu", **kw)
    corners = read_rois(root / rois) if (root / rois).is_file() else QINGPU_ROIS
    h, w = d.labels.shape
    window = np.zeros((h, w), bool)
    for x, y in corners:
        if x >= w or y >= h:
            raise DatasetError(f"{root / image}: ROI window at x={x}, y={y} lies outside the {h} x {w} scene; expected "
                               f"the full Qingpu scene (or a matching {rois})")
        window[y:y + roi_size, x:x + roi_size] = True
    train = window & (d.labels >= 0)
    if train_per_class is not None:
        rng = np.random.default_rng(seed)
        keep = np.zeros(h * w, bool)
        flat = np.where(train, d.labels, -1).reshape(-1)
        for c in np.unique(flat[flat >= 0]):
            idx = rng.permutation(np.flatnonzero(flat == c))
            keep[idx[:train_per_class]] = True
        train = keep.reshape(h, w)
    d.train_mask, d.test_mask = train, ~window
    return d


# The EMIT + PlanetScope data of the MSHFNet / MSAHFNet paper (Ji, Yang, Townsend et al. 2026, "Robust hyperspectral
# reconstruction from satellite and airborne observations via a deep hierarchical fusion network", RSE 338, 115385;
# github.com/FujiangJi/SmallSat_hyperspectral_reconstruction; the processed pairs on Hugging Face,
# FujiangJi/hyperspectral_reconstruction_datasets), in the layout its code reads (model_code/data_extraction.py,
# data_preparation.py, 0_main.py):
# - <root>/<area>/ with area 1_SF, 2_SHIFT or 3_Kanab;
# - 0_basic_information/LR_head.nc: an EMIT L2A NetCDF whose group sensor_band_parameters holds wavelengths, fwhm
#   and good_wavelengths; 0_basic_information/HR_HSI_head.hdr: the ENVI header of the airborne reference;
# - 1_training_imagery/1_train_{EMIT,Planet,HR_HSI}.tif, 2_testing_imagery/2_test_*.tif,
#   3_validating_imagery/3_validate_*.tif: GeoTIFFs on one UTM grid (pairing_EMIT_PlanetScope.ipynb), EMIT
#   reflectance (bad bands set to 0), PlanetScope PSB.SD 8-band reflectance scaled to 0-1;
# - the PlanetScope band centres hr_wvl = [443, 490, 531, 565, 610, 665, 705, 865] nm (data_extraction.py), the
#   pass widths from the README (coastal blue 431-452, blue 465-515, green I 513-549, green 547-583, yellow 600-620,
#   red 650-680, red edge 697-713, NIR 845-885 nm);
# - the grids: resample_img warps the EMIT image to 60 m and the PlanetScope image to 4 m (5 m for 2_SHIFT;
#   0_main.py), bilinear, and crops both to a whole number of low-resolution pixels (scale ratio 15, or 12).
# Read here: the EMIT and PlanetScope images of one split, resampled to those grids when they are not on them
# (bilinear with antialiasing, standing in for gdal.Warp's bilinear), EMIT's good bands kept (good_wavelengths and
# the registry's bad-band ranges, as data_prep.formats.emit keeps them). Not read: the
# airborne HR-HSI reference -- scoring against it needs it resampled to EMIT's bands, which the paper does by
# FWHM resampling of both to 400-2400 nm every 10 nm; the fusion task here scores by Wald's protocol instead.
MSHFNET_AREAS = ("1_SF", "2_SHIFT", "3_Kanab")
MSHFNET_SPLITS = {"train": ("1_training_imagery", "1_train"), "test": ("2_testing_imagery", "2_test"),
                  "validate": ("3_validating_imagery", "3_validate")}
MSHFNET_LR_RESOLUTION = 60.0
MSHFNET_HR_RESOLUTION = {"2_SHIFT": 5.0}  # every other area 4 m
PLANET_CENTRES_NM = (443.0, 490.0, 531.0, 565.0, 610.0, 665.0, 705.0, 865.0)
PLANET_FWHM_NM = (21.0, 50.0, 36.0, 36.0, 20.0, 30.0, 16.0, 40.0)


def mshfnet_files(root: str | Path, area: str = "1_SF", split: str = "train") -> dict[str, Path]:
    """The files :func:`load_mshfnet` reads for one area and split (``bands``, ``emit``, ``planet``)."""
    if split not in MSHFNET_SPLITS:
        raise DatasetError(f"split is {split!r}; expected one of {sorted(MSHFNET_SPLITS)}")
    folder, prefix = MSHFNET_SPLITS[split]
    base = Path(root) / area
    return {"bands": base / "0_basic_information" / "LR_head.nc", "emit": base / folder / f"{prefix}_EMIT.tif",
            "planet": base / folder / f"{prefix}_Planet.tif"}


def _emit_band_table(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(centres nm, FWHM nm, good_wavelengths flags or None) of an EMIT NetCDF's sensor_band_parameters group."""
    import h5netcdf

    try:
        with h5netcdf.File(path, "r") as f:
            if "sensor_band_parameters" not in f.groups:
                raise DatasetError(f"{path}: no group 'sensor_band_parameters' (has {sorted(f.groups)}); expected the "
                                   "EMIT L2A NetCDF of the area")
            g = f.groups["sensor_band_parameters"]
            missing = [v for v in ("wavelengths", "fwhm") if v not in g.variables]
            if missing:
                raise DatasetError(f"{path}: sensor_band_parameters lacks {missing}")
            wl = np.asarray(g.variables["wavelengths"][:], np.float64)
            fw = np.asarray(g.variables["fwhm"][:], np.float64)
            flags = np.asarray(g.variables["good_wavelengths"][:]) if "good_wavelengths" in g.variables else None
    except OSError as e:
        raise DatasetError(f"{path}: not a readable NetCDF4/HDF5 file: {e}") from None
    if wl.size and wl.max() < 100:  # micrometres
        wl, fw = wl * 1000, fw * 1000
    return wl, fw, flags


def _pixel_size(path: Path) -> float:
    """The square pixel size of a GeoTIFF (ModelPixelScale or ModelTransformation), in its CRS units."""
    import tifffile

    with tifffile.TiffFile(str(path)) as tf:
        geo = tf.geotiff_metadata or {}
    if "ModelPixelScale" in geo:
        sx, sy = geo["ModelPixelScale"][:2]
    elif "ModelTransformation" in geo:
        m = np.asarray(geo["ModelTransformation"], float).reshape(4, 4)
        sx, sy = abs(m[0, 0]), abs(m[1, 1])
    else:
        raise DatasetError(f"{path}: no GeoTIFF pixel scale or transformation; expected a georeferenced GeoTIFF")
    if not np.isclose(sx, sy, rtol=1e-3):
        raise DatasetError(f"{path}: pixels are {sx} x {sy}; expected square pixels")
    return float(sx)


def _to_resolution(cube: np.ndarray, pixel: float, resolution: float) -> np.ndarray:
    """``cube (C, H, W)`` resampled from ``pixel`` to ``resolution`` (same extent; bilinear, antialiased)."""
    if np.isclose(pixel, resolution, rtol=1e-6):
        return cube
    import torch
    import torch.nn.functional as F

    c, h, w = cube.shape
    size = (max(1, int(round(h * pixel / resolution))), max(1, int(round(w * pixel / resolution))))
    t = torch.from_numpy(np.nan_to_num(cube))[None]
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False, antialias=True)[0].numpy()


def load_mshfnet(root: str | Path, *, area: str = "1_SF", split: str = "train",
                 lr_resolution: float = MSHFNET_LR_RESOLUTION, hr_resolution: float | None = None,
                 name: str = "") -> FusionData:
    """One split of one area of the MSHFNet / MSAHFNet EMIT + PlanetScope data as its code reads it (see above):
    EMIT (good bands) on the ``lr_resolution`` grid, PlanetScope on the ``hr_resolution`` grid (default 4 m, 5 m for
    2_SHIFT), cropped to a whole number of EMIT pixels."""
    from data_prep.registry import get_sensor

    files = mshfnet_files(root, area, split)
    missing = [str(p) for p in files.values() if not p.exists()]
    if missing:
        raise DatasetError(f"missing {missing}; expected the {area} {split} pair of the MSHFNet data "
                           f"(<root>/<area>/0_basic_information/LR_head.nc and the EMIT and Planet GeoTIFFs)")
    hr_res = hr_resolution if hr_resolution is not None else MSHFNET_HR_RESOLUTION.get(area, 4.0)
    ratio = lr_resolution / hr_res
    if abs(ratio - round(ratio)) > 1e-6 or ratio < 1:
        raise DatasetError(f"lr_resolution {lr_resolution} / hr_resolution {hr_res} = {ratio:g}; expected an integer "
                           "ratio >= 1")
    r = int(round(ratio))
    wl, fw, flags = _emit_band_table(files["bands"])
    hs = read_cube(files["emit"])
    ms = read_cube(files["planet"])
    if hs.shape[0] != wl.size:
        raise DatasetError(f"{files['emit']}: {hs.shape[0]} bands but {files['bands']} lists {wl.size} wavelengths")
    if ms.shape[0] != len(PLANET_CENTRES_NM):
        raise DatasetError(f"{files['planet']}: {ms.shape[0]} bands; expected the 8 PlanetScope PSB.SD bands")
    good = get_sensor("emit").good_band_mask(wl, flags)
    hs = hs[good]
    # nodata: a non-finite value, or every band 0 (the GeoTIFFs carry no nodata value; GDAL's warps fill with 0)
    hs_valid = np.isfinite(hs).all(0) & (np.nan_to_num(hs) != 0).any(0)
    ms_valid = np.isfinite(ms).all(0) & (np.nan_to_num(ms) != 0).any(0)
    hs = _to_resolution(hs, _pixel_size(files["emit"]), lr_resolution)
    ms = _to_resolution(ms, _pixel_size(files["planet"]), hr_res)
    hs_valid, ms_valid = _mask_to(hs_valid, hs.shape[1:]), _mask_to(ms_valid, ms.shape[1:])
    rows, cols = ms.shape[1] // r, ms.shape[2] // r
    if rows < 1 or cols < 1 or hs.shape[1] < rows or hs.shape[2] < cols:
        raise DatasetError(f"{files['planet']}: {ms.shape[1]} x {ms.shape[2]} pixels at {hr_res} m and the EMIT image "
                           f"{hs.shape[1]} x {hs.shape[2]} at {lr_resolution} m do not cover one another; expected "
                           "the co-registered pair of one ROI")
    return FusionData(clean(hs[:, :rows, :cols]), clean(ms[:, :rows * r, :cols * r]),
                      Spectral(wl[good].astype(np.float32), fw[good].astype(np.float32), "emit", "L2"),
                      Spectral(np.asarray(PLANET_CENTRES_NM, np.float32), np.asarray(PLANET_FWHM_NM, np.float32),
                               "planetscope", "L2"),
                      r, name or f"mshfnet_{area}_{split}", hs_valid[:rows, :cols], ms_valid[:rows * r, :cols * r])


def _mask_to(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A validity mask carried to a resampled grid: a pixel is valid when every source pixel it draws on is."""
    if mask.shape == tuple(shape):
        return mask
    import torch
    import torch.nn.functional as F

    m = F.interpolate(torch.from_numpy((~mask).astype(np.float32))[None, None], size=shape, mode="bilinear",
                      align_corners=False, antialias=True)[0, 0].numpy()
    return m < 1e-6

"""What each public-dataset loader reads, and where its files come from: ``benchmark.py --list``.

:func:`expected_files` names the files a ``data:`` block will open (the same names the loaders look for) and
:data:`SOURCES` where to get each dataset. The layouts of WHU-H2SR and HRSSC were not found in a published source
this build could read (searched: SpecAware's repository github.com/busbyjrj/SpecAware, which ships no downstream
loaders, dataset pages, issue trackers and loader code of other hyperspectral models): their file names, band tables
and class lists come from the suite YAML (``--list`` says so) instead of from guesses in the code.
"""

from __future__ import annotations

from pathlib import Path

SOURCES = {
    "aerorit": "github.com/aneesh3108/AeroRIT (README: Google Drive folder with image_hsi_reflectance.tif, "
               "image_hsi_radiance.tif, image_labels.tif, image_rgb.tif)",
    "bay_area": "citius.usc.es/investigacion/datasets/hyperspectral-change-detection-dataset (bayArea, mat/ + waves.txt)",
    "santa_barbara": "citius.usc.es/investigacion/datasets/hyperspectral-change-detection-dataset (santaBarbara, mat/)",
    "whu_h2sr": "the SpecAware authors (arXiv 2510.27219; ecnu.jirenjie@gmail.com); file names, band table and "
                "class list not published in a source read here: name image, labels, class_names, label_values and "
                "wavelengths in the suite YAML",
    "qingpu": "www.3sobs.cn/qingpu-hsi-dataset (Qingpu_HSI_image.dat/.hdr, Qingpu_HSI_gt.dat/.hdr); the split file "
              "Qingpu_HSI_rois.txt from github.com/busbyjrj/PatchOut data/ (built in if absent)",
    "hrssc": "the SpecAware authors (arXiv 2510.27219; ecnu.jirenjie@gmail.com); layout not published in a "
             "source read here: one folder per class of patches (.tif/.mat) is assumed; give band_indices and "
             "wavelengths in the suite YAML",
    "emit_planetscope": "EMIT L2A RFL (NASA Earthdata, EMIT_L2A_RFL_*.nc) + PlanetScope 8-band SR "
                        "(*_AnalyticMS_SR_8b.tif), co-registered at an integer ratio",
    "mshfnet": "huggingface.co/datasets/FujiangJi/hyperspectral_reconstruction_datasets (the paired EMIT / PlanetScope "
               "/ airborne data of MSHFNet-MSAHFNet, github.com/FujiangJi/SmallSat_hyperspectral_reconstruction): "
               "<area>/0_basic_information/LR_head.nc and <area>/<n>_<split>ing_imagery/<n>_<split>_{EMIT,Planet}.tif",
}


def expected_files(spec: dict) -> list[Path]:
    """The paths a data block (``${root}`` already substituted) will read; [] for synthetic loaders."""
    from finetune.datasets.public import _find

    name = spec.get("loader")
    root = Path(spec["root"]) if "root" in spec else None
    if name == "aerorit":
        return [root / spec.get("image", "image_hsi_reflectance.tif"), root / spec.get("labels", "image_labels.tif")]
    if name == "bay_area":
        return [_find(root, ("Bay_Area_2013.mat",)), _find(root, ("Bay_Area_2015.mat",)),
                _find(root, ("bayArea_gtChanges2.mat.mat", "bayArea_gtChanges2.mat"))]
    if name == "santa_barbara":
        return [_find(root, (n,)) for n in ("barbara_2013.mat", "barbara_2014.mat", "barbara_gtChanges.mat")]
    if name == "whu_h2sr":
        return [root / spec["image"], root / spec["labels"]]
    if name == "qingpu":
        files = [root / spec.get("image", "Qingpu_HSI_image.hdr"), root / spec.get("labels", "Qingpu_HSI_gt.hdr")]
        return [f for hdr in files for f in (hdr, hdr.with_suffix(".dat"))]
    if name == "mshfnet":
        from finetune.datasets.public import mshfnet_files

        return list(mshfnet_files(root, spec.get("area", "1_SF"), spec.get("split", "train")).values())
    if name in ("hrssc", "scene_folders"):
        return [root]
    if name == "emit_planetscope":
        return [Path(spec["hs"]), Path(spec["ms"])]
    return []


def list_suite(suite, data_root: str | None) -> tuple[list[str], bool]:
    """Lines saying, per task, which files were found and which are missing (with where to get them)."""
    from finetune.runner import substitute

    lines, complete = [], True
    for task in suite.tasks:
        if "${corpus}" in str(task.data):
            lines.append(f"{task.name}: synthetic ({task.data['loader']}), simulated at run time")
            continue
        spec = substitute(task.data, {"root": data_root or "DATA_ROOT", "corpus": "CORPUS"})
        if spec.get("loader") == "whu_h2sr" and not (spec.get("image") and spec.get("labels")):
            complete = False
            lines += [f"{task.name}: LAYOUT UNKNOWN (file names, band table and classes not published in a source "
                      f"this build read); set data.image, data.labels, data.class_names, data.wavelengths",
                      f"    get it from: {SOURCES['whu_h2sr']}"]
            continue
        files = expected_files(spec)
        missing = [f for f in files if not f.exists()]
        complete &= not missing
        state = "found" if not missing else f"MISSING {len(missing)} of {len(files)}"
        lines.append(f"{task.name}: {state}")
        lines += [f"    {'ok     ' if f.exists() else 'missing'} {f}" for f in files]
        if missing:
            lines.append(f"    get it from: {SOURCES.get(spec['loader'], 'see the suite YAML')}")
    return lines, complete

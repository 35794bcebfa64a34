"""What each public-dataset loader reads, and where its files come from: ``benchmark.py --list``.

:func:`expected_files` names the files a ``data:`` block will open (the same names the loaders look for) and
:data:`SOURCES` where to get each dataset. The layouts of WHU-H2SR, Qingpu-HSI and HRSSC were not found in a
published source this build could read: their file names, band tables and class lists come from the suite YAML
(``--list`` says so) instead of from guesses in the code.
"""

from __future__ import annotations

from pathlib import Path

SOURCES = {
    "aerorit": "github.com/aneesh3108/AeroRIT (README: Google Drive folder with image_hsi_reflectance.tif, "
               "image_hsi_radiance.tif, image_labels.tif, image_rgb.tif)",
    "bay_area": "citius.usc.es/investigacion/datasets/hyperspectral-change-detection-dataset (bayArea, mat/ + waves.txt)",
    "santa_barbara": "citius.usc.es/investigacion/datasets/hyperspectral-change-detection-dataset (santaBarbara, mat/)",
    "whu_h2sr": "from the SpecAware authors (arXiv 2510.27219); layout not published in a source read here: "
                "name image/labels/class_names/wavelengths in the suite YAML",
    "qingpu": "from the SpecAware authors (arXiv 2510.27219); layout not published in a source read here: "
              "name image/labels/class_names/wavelengths in the suite YAML",
    "hrssc": "from the SpecAware authors (arXiv 2510.27219); one folder per class of patches (.tif/.mat); give "
             "band_indices and wavelengths in the suite YAML",
    "emit_planetscope": "EMIT L2A RFL (NASA Earthdata, EMIT_L2A_RFL_*.nc) + PlanetScope 8-band SR "
                        "(*_AnalyticMS_SR_8b.tif), co-registered at an integer ratio",
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
    if name in ("whu_h2sr", "qingpu"):
        return [root / spec["image"], root / spec["labels"]]
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
        files = expected_files(spec)
        missing = [f for f in files if not f.exists()]
        complete &= not missing
        state = "found" if not missing else f"MISSING {len(missing)} of {len(files)}"
        lines.append(f"{task.name}: {state}")
        lines += [f"    {'ok     ' if f.exists() else 'missing'} {f}" for f in files]
        if missing:
            lines.append(f"    get it from: {SOURCES.get(spec['loader'], 'see the suite YAML')}")
    return lines, complete

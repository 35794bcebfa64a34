"""Synthetic tasks from a simulated corpus (``data_prep.simulate.simulate_corpus``'s manifest.json).

- segmentation: a scene product of one sensor/level and its material map (classes = materials present);
- change: the change_t1 / change_t2 pair and the ``change`` map in the t2 sidecar;
- classification: tiles of the scene products, each labelled by its dominant material;
- fusion: a fusion_hs product (EMIT / EnMAP L2) and its co-registered fusion_ms partner.

Products are read with ``data_prep.formats.open_product``; bad bands are dropped, and
``band_stride`` keeps every k-th remaining band (keeps the CPU suite fast). Each container carries the
products' ``valid`` mask, so nodata pixels stay out of the normalisation and are 0 after it, as in pretraining.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from finetune.datasets.base import (
    ChangeData,
    ClassificationData,
    DatasetError,
    FusionData,
    SegmentationData,
    Spectral,
    clean,
)


def read_manifest(path: str | Path, expected: str) -> tuple[Path, dict]:
    """(manifest.json path, its content) from the file or the folder holding it; ``expected`` names what it must be."""
    p = Path(path)
    if p.is_dir():
        p = p / "manifest.json"
    if not p.is_file():
        raise DatasetError(f"{p} does not exist; expected {expected}")
    return p, json.loads(p.read_text())


def load_manifest(path: str | Path) -> tuple[Path, dict]:
    """(corpus root, manifest) from a manifest.json path or the folder holding it."""
    p, m = read_manifest(path, "a simulated corpus's manifest.json (python -m data_prep simulate --out DIR)")
    if "products" not in m:
        raise DatasetError(f"{p}: no 'products' list; not a simulate_corpus manifest")
    return p.parent, m


def _entries(m: dict, role: str, sensor: str | None = None, level: str | None = None) -> list[dict]:
    return [e for e in m["products"] if e["role"] == role and (sensor is None or e["sensor"] == sensor)
            and (level is None or e["level"] == level)]


def _one(m: dict, root: Path, role: str, sensor, level) -> list[dict]:
    es = _entries(m, role, sensor, level)
    if not es:
        have = sorted({(e["role"], e["sensor"], e["level"]) for e in m["products"]})
        raise DatasetError(f"{root}/manifest.json: no {role!r} product of sensor={sensor} level={level}; "
                           f"the corpus has {have}")
    return es


def read_product(root: Path, entry: dict, band_stride: int = 1) -> tuple[np.ndarray, np.ndarray, Spectral]:
    """(cube (C, H, W) with bad bands dropped and NaN -> 0, valid (H, W), band table)."""
    from data_prep.formats import open_product

    g = open_product(root / entry["path"])
    cube, valid = g.read_rows(0, g.n_rows)
    keep = np.flatnonzero(np.asarray(g.good_bands, bool))[::band_stride]
    spec = Spectral(np.asarray(g.wavelengths_nm, np.float32)[keep], np.asarray(g.fwhm_nm, np.float32)[keep],
                    g.sensor, g.level)
    return clean(cube[keep]), np.asarray(valid, bool), spec


def _materials(root: Path, entry: dict) -> dict:
    if not entry.get("materials"):
        raise DatasetError(f"{entry['path']}: the manifest entry has no material map")
    with np.load(root / entry["materials"], allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _grouped(mat: dict, group: str) -> tuple[np.ndarray, list[str]]:
    """Material labels and names; ``group="category"`` merges materials by their category prefix
    (``vegetation_0243`` -> ``vegetation``)."""
    raw = mat["labels"].astype(np.int64)
    names = [str(n) for n in mat["names"]]
    if group == "material":
        return raw, names
    if group != "category":
        raise DatasetError(f"group is {group!r}; expected 'material' or 'category'")
    cats = sorted({n.split("_")[0] for n in names})
    lut = np.asarray([cats.index(n.split("_")[0]) for n in names] + [-1], np.int64)
    return np.where(raw >= 0, lut[np.clip(raw, 0, len(names))], -1), cats


def synthetic_segmentation(manifest: str | Path, *, sensor: str = "emit", level: str = "L2", scene: int = 0,
                           band_stride: int = 1, group: str = "category") -> SegmentationData:
    root, m = load_manifest(manifest)
    e = _one(m, root, "scene", sensor, level)[scene]
    cube, valid, spec = read_product(root, e, band_stride)
    raw, names = _grouped(_materials(root, e), group)
    present = np.unique(raw[valid & (raw >= 0)])
    lut = np.full(max(len(names), int(raw.max()) + 1), -1, np.int64)
    lut[present] = np.arange(present.size)
    labels = np.where(valid & (raw >= 0), lut[np.clip(raw, 0, None)], -1)
    return SegmentationData(cube, labels, [names[i] if i < len(names) else str(i) for i in present], spec,
                            None, f"synthetic_{sensor}_{level}", valid=valid)


def synthetic_change(manifest: str | Path, *, sensor: str | None = None, level: str = "L2",
                     band_stride: int = 1) -> ChangeData:
    root, m = load_manifest(manifest)
    t2s = _one(m, root, "change_t2", sensor, level)
    e2 = t2s[0]
    t1s = [e for e in _entries(m, "change_t1", e2["sensor"], e2["level"])
           if e.get("pair") in (None, e2["scene"]) or e["scene"] == e2.get("pair")]
    if not t1s:
        raise DatasetError(f"{root}/manifest.json: no change_t1 product paired with {e2['path']}")
    a, va, spec = read_product(root, t1s[0], band_stride)
    b, vb, _ = read_product(root, e2, band_stride)
    mat = _materials(root, e2)
    if "change" not in mat:
        raise DatasetError(f"{root / e2['materials']}: no 'change' array; expected it in the change_t2 sidecar")
    change = np.where(va & vb, mat["change"].astype(np.int64), -1)
    return ChangeData(a, b, change, spec, f"synthetic_change_{e2['sensor']}", valid=va & vb)


def synthetic_classification(manifest: str | Path, *, sensor: str = "emit", level: str = "L2", tile: int = 16,
                             stride: int | None = None, band_stride: int = 1, min_per_class: int = 2,
                             group: str = "category", roles: tuple[str, ...] = ("scene", "change_t1", "fusion_hs"),
                             min_valid: float = 0.5) -> ClassificationData:
    """Tiles (``stride`` apart, default tile // 2) of the sensor/level's products of the given roles; class =
    dominant material category (or material); classes with fewer than ``min_per_class`` tiles are dropped."""
    stride = stride or max(1, tile // 2)
    root, m = load_manifest(manifest)
    patches, masks, labels, spec, names = [], [], [], None, None
    entries = [e for r in roles for e in _entries(m, r, sensor, level)]
    if not entries:
        raise DatasetError(f"{root}/manifest.json: no {roles} product of sensor={sensor} level={level}")
    for e in entries:
        cube, valid, spec = read_product(root, e, band_stride)
        lab, names = _grouped(_materials(root, e), group)
        labelled = valid & (lab >= 0)
        for y in range(0, cube.shape[1] - tile + 1, stride):
            for x in range(0, cube.shape[2] - tile + 1, stride):
                v = labelled[y:y + tile, x:x + tile]
                if v.mean() < min_valid:
                    continue
                counts = np.bincount(lab[y:y + tile, x:x + tile][v].clip(0), minlength=len(names))
                patches.append(cube[:, y:y + tile, x:x + tile])
                masks.append(valid[y:y + tile, x:x + tile])
                labels.append(int(counts.argmax()))
    if not patches:
        raise DatasetError(f"{root}: no valid {tile}x{tile} tiles for sensor={sensor} level={level}")
    labels = np.asarray(labels)
    kept = [c for c in np.unique(labels) if (labels == c).sum() >= min_per_class]
    if len(kept) < 2:
        raise DatasetError(f"{root}: fewer than two dominant-material classes with >= {min_per_class} tiles; "
                           "simulate more scenes or use a smaller tile")
    sel = np.isin(labels, kept)
    lut = {c: i for i, c in enumerate(kept)}
    return ClassificationData(np.stack([p for p, s in zip(patches, sel) if s]),
                              np.asarray([lut[c] for c in labels[sel]], np.int64),
                              [names[c] if c < len(names) else str(c) for c in kept], spec,
                              f"synthetic_scenes_{sensor}_{level}",
                              valid=np.stack([v for v, s in zip(masks, sel) if s]))


def synthetic_fusion(manifest: str | Path, *, hs_sensor: str = "emit", band_stride: int = 1) -> FusionData:
    root, m = load_manifest(manifest)
    hs_e = _one(m, root, "fusion_hs", hs_sensor, None)[0]
    partners = [e for e in _entries(m, "fusion_ms") if e["scene"] == hs_e.get("pair") or e.get("pair") == hs_e["scene"]]
    if not partners:
        raise DatasetError(f"{root}/manifest.json: no fusion_ms partner of {hs_e['path']}")
    ms_e = partners[0]
    hs, hv, hs_spec = read_product(root, hs_e, band_stride)
    ms, mv, ms_spec = read_product(root, ms_e, 1)
    ratio = int(hs_e.get("ratio") or ms_e.get("ratio") or round(ms.shape[2] / hs.shape[2]))
    ms, mv = ms[:, :hs.shape[1] * ratio, :hs.shape[2] * ratio], mv[:hs.shape[1] * ratio, :hs.shape[2] * ratio]
    return FusionData(hs, ms, hs_spec, ms_spec, ratio, f"synthetic_fusion_{hs_sensor}_{ms_e['sensor']}", hv, mv)

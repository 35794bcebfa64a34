"""Containers every task reads, file readers for the formats public benchmarks ship in, and checks.

Inputs are standardised by :func:`data_prep.spectral.normalise` (re-exported here), the function pretraining's
loader applies: p01/p99 clip, z-score over valid pixels, nodata 0 after."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_prep.errors import UserError
from data_prep.spectral import BandScaling, normalise  # noqa: F401  (the one standardisation, re-exported)


class DatasetError(UserError):
    """A dataset path has the wrong layout, or its contents do not match what was expected."""


@dataclass
class Spectral:
    """Band table and metadata shared by a task's images."""

    wavelengths: np.ndarray
    fwhm: np.ndarray
    sensor: str | None = None
    level: str | None = None


@dataclass
class SegmentationData:
    image: np.ndarray
    """float32 (C, H, W)."""
    labels: np.ndarray
    """int64 (H, W); -1 = unlabelled."""
    class_names: list[str]
    spectral: Spectral
    train_mask: np.ndarray | None = None
    """bool (H, W): pixels whose labels may be used for training (None: split by the runner)."""
    name: str = ""
    valid: np.ndarray | None = None
    """bool (H, W): pixels with data (None: all); nodata pixels are left out of the normalisation."""
    test_mask: np.ndarray | None = None
    """bool (H, W): pixels scored (None: every labelled pixel outside ``train_mask``), e.g. a published test split
    that leaves a validation region out of both."""


@dataclass
class ChangeData:
    t1: np.ndarray
    t2: np.ndarray
    """float32 (C, H, W) each, co-registered."""
    change: np.ndarray
    """int64 (H, W): 1 changed, 0 unchanged, -1 unknown."""
    spectral: Spectral
    name: str = ""
    valid: np.ndarray | None = None
    """bool (H, W): pixels with data in both images (None: all)."""


@dataclass
class ClassificationData:
    patches: np.ndarray
    """float32 (N, C, h, w)."""
    labels: np.ndarray
    """int64 (N,)."""
    class_names: list[str]
    spectral: Spectral
    name: str = ""
    files: list[str] = field(default_factory=list)
    valid: np.ndarray | None = None
    """bool (N, h, w): pixels with data (None: all)."""


@dataclass
class FusionData:
    hs: np.ndarray
    """float32 (Ch, h, w) low-resolution hyperspectral."""
    ms: np.ndarray
    """float32 (Cm, h * ratio, w * ratio) high-resolution multispectral."""
    hs_spectral: Spectral
    ms_spectral: Spectral
    ratio: int
    name: str = ""
    hs_valid: np.ndarray | None = None
    """bool (h, w): hyperspectral pixels with data (None: all)."""
    ms_valid: np.ndarray | None = None
    """bool (h * ratio, w * ratio): multispectral pixels with data (None: all)."""


# ----------------------------------------------------------------------------- readers

def _mat_arrays(path: Path) -> dict[str, np.ndarray]:
    """Arrays of a MATLAB file: scipy for v4-v7.2, h5py for v7.3 (HDF5; axes reversed to MATLAB order)."""
    import scipy.io

    try:
        d = scipy.io.loadmat(str(path))
        return {k: np.asarray(v) for k, v in d.items() if not k.startswith("__") and isinstance(v, np.ndarray)}
    except (NotImplementedError, ValueError) as e:  # v7.3 (HDF5); ValueError: not a v4-v7.2 file
        import h5py

        if not h5py.is_hdf5(str(path)):
            raise DatasetError(f"{path}: not a readable MATLAB file: {e}") from e
        out = {}
        with h5py.File(path, "r") as f:
            for k, v in f.items():
                if isinstance(v, h5py.Dataset) and not k.startswith("#"):
                    out[k] = np.asarray(v[()]).transpose(tuple(range(v.ndim))[::-1])
        return out


def read_mat(path: str | Path, key: str | None = None) -> np.ndarray:
    """One variable of a .mat file: ``key`` if given and present, else the file's only (or largest) array."""
    path = Path(path)
    arrays = _mat_arrays(path)
    if not arrays:
        raise DatasetError(f"{path}: no arrays in the MATLAB file")
    if key is not None:
        if key in arrays:
            return arrays[key]
        if len(arrays) > 1:
            raise DatasetError(f"{path}: no variable {key!r}; the file has {sorted(arrays)}")
    return max(arrays.values(), key=lambda a: a.size)


def read_array(path: str | Path, key: str | None = None) -> np.ndarray:
    """An array from .tif/.tiff (tifffile), .mat, .npy, .png, or an ENVI .hdr (spectral); as stored."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{path} does not exist")
    suf = path.suffix.lower()
    if suf in (".tif", ".tiff"):
        import tifffile

        return tifffile.imread(str(path))
    if suf == ".mat":
        return read_mat(path, key)
    if suf == ".npy":
        return np.load(path, allow_pickle=False)
    if suf == ".png":
        import matplotlib.image

        a = matplotlib.image.imread(str(path))
        return np.round(a * 255).astype(np.int64) if a.dtype.kind == "f" else a
    if suf == ".hdr":
        import spectral.io.envi as envi

        return np.asarray(envi.open(str(path)).load())
    raise DatasetError(f"{path}: unsupported file type {suf!r}; expected .tif, .mat, .npy, .png or an ENVI .hdr")


def _tif_layout(path: Path) -> str:
    import tifffile

    with tifffile.TiffFile(str(path)) as tf:
        axes = tf.series[0].axes
    return "hwc" if axes.endswith("S") or axes[-1] not in "XY" else "chw"


def read_cube(path: str | Path, key: str | None = None, layout: str = "auto") -> np.ndarray:
    """An image cube as (C, H, W) float32. ``layout`` "hwc" (MATLAB, ENVI, contiguous TIFF), "chw" (multi-page
    TIFF), or "auto": the TIFF's own axes, else "hwc" as MATLAB/ENVI/NumPy distributions store it."""
    path = Path(path)
    a = read_array(path, key)
    if a.ndim == 2:
        a = a[None] if layout == "chw" else a[..., None]
    if a.ndim != 3:
        raise DatasetError(f"{path}: expected a 3-D image cube, got shape {a.shape}")
    if layout == "auto":
        layout = _tif_layout(path) if path.suffix.lower() in (".tif", ".tiff") else "hwc"
    if layout not in ("hwc", "chw"):
        raise DatasetError(f"layout is {layout!r}; expected 'auto', 'hwc' or 'chw'")
    if layout == "hwc":
        a = np.moveaxis(a, -1, 0)
    return np.ascontiguousarray(a).astype(np.float32)


def select_bands(cube: np.ndarray, indices: list[int] | None, path: str | Path = "") -> np.ndarray:
    """``cube[indices]`` with a clear error when the index list does not fit the image."""
    if indices is None:
        return cube
    idx = np.asarray(indices, dtype=np.int64)
    if idx.size > cube.shape[0]:
        raise DatasetError(f"{path}: band index list has {idx.size} entries but the image has only "
                           f"{cube.shape[0]} bands")
    if idx.size and (idx.min() < 0 or idx.max() >= cube.shape[0]):
        raise DatasetError(f"{path}: band indices must lie in 0..{cube.shape[0] - 1}, got {idx.min()}..{idx.max()}")
    return cube[idx]


def map_labels(raw: np.ndarray, values: list[int] | None, class_names: list[str], ignore: list[int] | tuple = (),
               path: str | Path = "") -> np.ndarray:
    """Raw label values -> 0..K-1 (``values[k]`` is class k; default: 0..K-1 as stored), ignore values -> -1.
    Any other value is an error naming it."""
    raw = np.asarray(raw).astype(np.int64)
    values = list(range(len(class_names))) if values is None else [int(v) for v in values]
    if len(values) != len(class_names):
        raise DatasetError(f"{path}: {len(values)} label values for {len(class_names)} class names")
    out = np.full(raw.shape, -1, np.int64)
    known = np.zeros(raw.shape, bool)
    for k, v in enumerate(values):
        out[raw == v] = k
        known |= raw == v
    for v in ignore:
        known |= raw == int(v)
    if not known.all():
        bad = sorted(set(np.unique(raw[~known]).tolist()))[:10]
        raise DatasetError(f"{path}: label values {bad} are outside the class list (expected {values} for "
                           f"{class_names}, or ignore values {list(ignore)})")
    return out


def clean(cube: np.ndarray) -> np.ndarray:
    """NaN/inf -> 0 (after normalisation 0 is the band mean)."""
    return np.nan_to_num(cube, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)

"""Containers every task reads, file readers for the formats public benchmarks ship in, and checks."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_prep.errors import UserError


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


#: Per-band percentiles each band is clipped to before standardising, as pretraining does with the store's
#: p01/p99 (``pretrain.data.reader.normalise_into``).
CLIP_PERCENTILES = (1.0, 99.0)


def band_stats(cube: np.ndarray, valid: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
    """Per-band ``(mean, std, p01, p99)`` over the finite pixels where ``valid`` (float64, std 0 -> 1).

    ``cube`` is ``(C, H, W)`` or ``(N, C, H, W)`` (stats over all samples); ``valid`` ``(H, W)`` / ``(N, H, W)``."""
    c = np.asarray(cube)
    if c.ndim == 4:
        c = c.transpose(1, 0, 2, 3)
    flat = c.reshape(c.shape[0], -1).astype(np.float64)
    keep = np.isfinite(flat)
    if valid is not None:
        keep &= np.asarray(valid, bool).reshape(1, -1)
    x = np.where(keep, flat, np.nan)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-nodata band: NaN stats, handled below
        mean = np.nan_to_num(np.nanmean(x, 1))
        std = np.nanstd(x, 1)
        lo, hi = np.nanpercentile(x, CLIP_PERCENTILES, axis=1)
    std = np.where(np.isfinite(std) & (std > 1e-12), std, 1.0)
    lo = np.where(np.isfinite(lo), lo, -np.inf)
    hi = np.where(np.isfinite(hi), hi, np.inf)
    return mean, std, lo, hi


def normalise(cube: np.ndarray, stats: tuple | None = None,
              valid: np.ndarray | None = None) -> tuple[np.ndarray, tuple]:
    """Per-band normalisation as in pretraining: clip to the band's 1st/99th percentile, ``(x - mean) / std``,
    nodata (``~valid``, NaN, inf) -> 0. Statistics are the image's own over its valid pixels (or ``stats`` =
    ``(mean, std[, p01, p99])`` given, e.g. the first date's for the second). Returns ``(cube, stats)``."""
    if stats is None:
        stats = band_stats(cube, valid)
    mean, std = stats[0], stats[1]
    cube = np.asarray(cube, dtype=np.float64)
    shape = (-1, 1, 1)
    if len(stats) >= 4:
        with np.errstate(invalid="ignore"):
            cube = np.clip(cube, stats[2].reshape(shape), stats[3].reshape(shape))
    out = (cube - mean.reshape(shape)) / std.reshape(shape)
    if valid is not None:
        v = np.asarray(valid, bool)
        out = np.where(v[:, None] if cube.ndim == 4 else v[None], out, 0.0)
    return clean(out), stats

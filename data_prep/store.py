"""The patch store: one Zarr v3 group per sensor and level, FP16, on any fsspec URL.

Schema (version :data:`SCHEMA_VERSION`), at ``<root>/<sensor>_<level>.zarr``:

``patches``  float16 ``(n, bands, P, P)``; chunks ``(1, band_chunk, spatial_chunk, spatial_chunk)``,
             one shard per patch, Blosc-zstd. All of the sensor's bands are kept; ``good_bands``
             in the attributes says which to train on. A 100-band window starting on the 32-band
             stride and a crop aligned to ``spatial_chunk`` decode at most ``ceil`` of the window to
             whole band chunks: 128 of 100 bands with the defaults, and no spatial excess.
``valid``    bool ``(n, P, P)``, chunks ``(1, spatial_chunk, spatial_chunk)``: False where the pixel
             was nodata, NaN or outside the flightline.
``meta/*``   one entry per patch: ``granule`` int32 (index into ``attrs["granules"]`` order),
             ``row``/``col`` int32 (top-left pixel in the granule), ``lat``/``lon`` float64 (patch
             centre, NaN when unknown), ``time`` int64 (UTC seconds since the epoch,
             :data:`NO_TIME` when unknown), ``gsd`` float32 (m), ``valid_fraction`` float32.

Group attributes: ``schema_version``, ``sensor``, ``level``, ``patch_size``, ``wavelengths_nm``,
``fwhm_nm``, ``good_bands``, ``n_patches`` (committed; the arrays never hold visible patches
beyond it), ``granules`` (ordered manifest: granule id -> ``{"start", "count", "source"}``), and
``stats`` (per band, over valid pixels of committed patches: ``count``, ``mean``, ``std``,
``p01``, ``p99``).

Only :class:`PatchStore` reads stores; everything that writes goes through this module too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

SCHEMA_VERSION = 1
NO_TIME = np.iinfo(np.int64).min
DEFAULT_BAND_CHUNK = 32
DEFAULT_SPATIAL_CHUNK = 32
META_FIELDS: dict[str, str] = {
    "granule": "int32",
    "row": "int32",
    "col": "int32",
    "lat": "float64",
    "lon": "float64",
    "time": "int64",
    "gsd": "float32",
    "valid_fraction": "float32",
}


class StoreError(ValueError):
    """A store is missing, of another schema version, empty where data is needed, or inconsistent."""


def store_url(root: str, sensor: str, level: str) -> str:
    """Where the store of ``sensor`` and ``level`` lives under ``root`` (a path or fsspec URL)."""
    return f"{root.rstrip('/')}/{sensor}_{level}.zarr"


def compressor(level: int = 3) -> BloscCodec:
    return BloscCodec(cname="zstd", clevel=level, shuffle="shuffle", typesize=2)


def chunk_layout(n_bands: int, patch_size: int, band_chunk: int = DEFAULT_BAND_CHUNK,
                 spatial_chunk: int = DEFAULT_SPATIAL_CHUNK) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(chunks, shards) of the ``patches`` array: one shard per patch, chunks no larger than it."""
    bc = min(band_chunk, n_bands)
    sc = min(spatial_chunk, patch_size)
    if patch_size % sc:
        raise StoreError(f"patch size {patch_size} is not a multiple of the spatial chunk {sc}")
    shard_bands = bc * math.ceil(n_bands / bc)
    return (1, bc, sc, sc), (1, shard_bands, patch_size, patch_size)


def _open_group(url: str, mode: str, storage_options: dict | None = None) -> zarr.Group:
    kw: dict[str, Any] = {"mode": mode}
    if storage_options and "://" in url:
        kw["storage_options"] = storage_options
    return zarr.open_group(url, **kw)


def create_store(url: str, *, sensor: str, level: str, wavelengths_nm, fwhm_nm, good_bands,
                 patch_size: int, band_chunk: int = DEFAULT_BAND_CHUNK,
                 spatial_chunk: int = DEFAULT_SPATIAL_CHUNK, storage_options: dict | None = None) -> zarr.Group:
    """Create an empty store (n = 0) with the schema above. Fails if one already exists at ``url``."""
    wl = np.asarray(wavelengths_nm, dtype=np.float64)
    n_bands = int(wl.shape[0])
    chunks, shards = chunk_layout(n_bands, patch_size, band_chunk, spatial_chunk)
    g = _open_group(url, "w-", storage_options)
    sc = chunks[2]
    g.create_array("patches", shape=(0, n_bands, patch_size, patch_size), dtype="float16", chunks=chunks,
                   shards=shards, compressors=compressor(), fill_value=0.0,
                   dimension_names=("patch", "band", "y", "x"))
    g.create_array("valid", shape=(0, patch_size, patch_size), dtype="bool", chunks=(1, sc, sc),
                   shards=(1, patch_size, patch_size), compressors=compressor(), fill_value=False,
                   dimension_names=("patch", "y", "x"))
    meta = g.create_group("meta")
    for name, dtype in META_FIELDS.items():
        meta.create_array(name, shape=(0,), dtype=dtype, chunks=(4096,), compressors=compressor(),
                          dimension_names=("patch",))
    g.attrs.update({
        "schema_version": SCHEMA_VERSION,
        "sensor": sensor,
        "level": level,
        "patch_size": int(patch_size),
        "wavelengths_nm": wl.tolist(),
        "fwhm_nm": np.asarray(fwhm_nm, dtype=np.float64).tolist(),
        "good_bands": [bool(b) for b in np.asarray(good_bands, dtype=bool)],
        "n_patches": 0,
        "granules": {},
        "stats": None,
    })
    return g


@dataclass(frozen=True)
class BandStats:
    """Per-band statistics over valid pixels (float64 arrays of length ``bands``)."""

    count: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    p01: np.ndarray
    p99: np.ndarray

    def to_json(self) -> dict:
        return {k: np.asarray(getattr(self, k)).tolist() for k in ("count", "mean", "std", "p01", "p99")}

    @classmethod
    def from_json(cls, d: dict) -> BandStats:
        return cls(**{k: np.asarray(d[k], dtype=np.float64) for k in ("count", "mean", "std", "p01", "p99")})


class PatchStore:
    """Read-only view of a committed store. Checks the schema on open.

    ``read(i, band_start, band_stop, y0, x0, size)`` decodes only the chunks that the band range
    and the crop touch.
    """

    def __init__(self, url: str, storage_options: dict | None = None):
        self.url = url
        try:
            self.group = _open_group(url, "r", storage_options)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError) as e:
            raise StoreError(f"no patch store at {url!r}: {e}") from None
        a = dict(self.group.attrs)
        version = a.get("schema_version")
        if version != SCHEMA_VERSION:
            raise StoreError(f"{url}: schema_version is {version!r}; this specfm reads version {SCHEMA_VERSION}")
        self.attrs = a
        self.sensor: str = a["sensor"]
        self.level: str = a["level"]
        self.patch_size: int = int(a["patch_size"])
        self.wavelengths_nm = np.asarray(a["wavelengths_nm"], dtype=np.float64)
        self.fwhm_nm = np.asarray(a["fwhm_nm"], dtype=np.float64)
        self.good_bands = np.asarray(a["good_bands"], dtype=bool)
        self.n_patches: int = int(a["n_patches"])
        self.patches = self.group["patches"]
        self.valid = self.group["valid"]
        if self.patches.shape[0] < self.n_patches:
            raise StoreError(f"{url}: n_patches={self.n_patches} but the patches array holds {self.patches.shape[0]}")

    def __len__(self) -> int:
        return self.n_patches

    @property
    def n_bands(self) -> int:
        return int(self.wavelengths_nm.shape[0])

    @property
    def chunks(self) -> tuple[int, ...]:
        return tuple(self.patches.chunks)

    @property
    def stats(self) -> BandStats:
        s = self.attrs.get("stats")
        if not s:
            raise StoreError(f"{self.url}: has no statistics yet (run `python -m data_prep stats {self.url}`)")
        return BandStats.from_json(s)

    def meta(self, name: str) -> np.ndarray:
        return self.group["meta"][name][: self.n_patches]

    def read(self, i: int, band_start: int = 0, band_stop: int | None = None, y0: int = 0, x0: int = 0,
             size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(pixels float16 ``(bands, size, size)``, valid bool ``(size, size)``) of committed patch ``i``."""
        if not 0 <= i < self.n_patches:
            raise IndexError(f"{self.url}: patch {i} out of range 0..{self.n_patches - 1}")
        size = self.patch_size if size is None else size
        band_stop = self.n_bands if band_stop is None else band_stop
        px = self.patches[i, band_start:band_stop, y0:y0 + size, x0:x0 + size]
        valid = self.valid[i, y0:y0 + size, x0:x0 + size]
        return px, valid


def append_patches(group: zarr.Group, *, granule_id: str, source: str, patches: np.ndarray,
                   valid: np.ndarray, meta: dict[str, np.ndarray]) -> tuple[int, int]:
    """Append one granule's patches and commit it in the manifest; returns (start, count).

    Data is written beyond ``n_patches`` first and becomes visible only when the attributes
    (``n_patches`` and the manifest entry) are updated last, so an interruption leaves the
    committed view as it was. Serial: one writer per store at a time.
    """
    a = dict(group.attrs)
    if granule_id in a["granules"]:
        raise StoreError(f"granule {granule_id!r} is already committed to this store")
    patches = np.asarray(patches)
    n_new = int(patches.shape[0])
    if patches.dtype != np.float16:
        raise StoreError(f"patches must be float16, got {patches.dtype}")
    start = int(a["n_patches"])
    stop = start + n_new
    pa, va = group["patches"], group["valid"]
    pa.resize((stop, *pa.shape[1:]))
    va.resize((stop, *va.shape[1:]))
    if n_new:
        pa[start:stop] = patches
        va[start:stop] = np.asarray(valid, dtype=bool)
    gidx = len(a["granules"])
    for name, dtype in META_FIELDS.items():
        arr = group["meta"][name]
        arr.resize((stop,))
        if n_new:
            values = np.full(n_new, gidx, dtype=dtype) if name == "granule" else np.asarray(meta[name], dtype=dtype)
            arr[start:stop] = values
    granules = dict(a["granules"])
    granules[granule_id] = {"start": start, "count": n_new, "source": source}
    group.attrs.update({"granules": granules, "n_patches": stop})
    return start, n_new


def write_stats(group: zarr.Group, stats: BandStats) -> None:
    group.attrs["stats"] = stats.to_json()

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

from data_prep.errors import UserError

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


class StoreError(UserError):
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


def read_amplification(chunks: tuple[int, ...], good_bands, patch_size: int, *, window: int = 100,
                       stride: int = 32, crop: int = 128, align: int | None = None) -> float:
    """Bytes decoded per byte delivered for the loader's reads, averaged over its draws.

    The loader (``pretrain.data``) takes ``window`` contiguous *good* bands starting at multiples of
    ``stride`` in good-band order, reads the raw band range that spans them (bad bands in between
    are decoded and dropped), and a ``crop`` x ``crop`` crop with corners on an ``align`` grid
    (``None``: the spatial chunk, the loader's default). Decoded = whole chunks touched; delivered =
    ``window`` bands x ``crop``^2 (fewer bands if the sensor has fewer good bands, a smaller crop if
    the patch is smaller).
    """
    _, cb, cy, cx = chunks
    gi = np.flatnonzero(np.asarray(good_bands, dtype=bool))
    if gi.size == 0:
        raise StoreError("no good bands: read amplification is undefined")
    w = min(window, gi.size)
    starts = [0] if gi.size <= window else [k * stride for k in range((gi.size - window) // stride + 1)]
    crop = min(crop, patch_size)
    align = max(1, min(cy if align is None else align, patch_size))

    def span(lo: int, hi: int, c: int) -> int:
        return (math.ceil(hi / c) - lo // c) * c

    band = float(np.mean([span(int(gi[s]), int(gi[s + w - 1]) + 1, cb) / w for s in starts]))
    pos = range(0, patch_size - crop + 1, align)
    ys = float(np.mean([min(span(p, p + crop, cy), patch_size - p // cy * cy) / crop for p in pos]))
    xs = float(np.mean([min(span(p, p + crop, cx), patch_size - p // cx * cx) / crop for p in pos]))
    return band * ys * xs


def chunks_per_read(chunks: tuple[int, ...], good_bands, patch_size: int, *, window: int = 100, stride: int = 32,
                    crop: int = 128) -> float:
    """Mean number of chunks one loader read touches (crop corners on the spatial-chunk grid)."""
    _, cb, cy, _ = chunks
    gi = np.flatnonzero(np.asarray(good_bands, dtype=bool))
    w = min(window, gi.size)
    starts = [0] if gi.size <= window else [k * stride for k in range((gi.size - window) // stride + 1)]
    nb = np.mean([math.ceil((int(gi[s + w - 1]) + 1) / cb) - int(gi[s]) // cb for s in starts])
    ns = math.ceil(min(crop, patch_size) / cy)
    return float(nb * ns * ns)


#: (band chunk, spatial chunk) pairs :func:`choose_chunks` considers. Spatial chunks stop at 64 so a
#: 128-pixel crop of a 256-pixel patch keeps at least 3 x 3 chunk-aligned positions.
CHUNK_CANDIDATES: tuple[tuple[int, int], ...] = ((8, 32), (16, 32), (32, 32), (8, 64), (16, 64), (32, 64))
#: the design's budget for bytes decoded per byte delivered
AMPLIFICATION_BUDGET = 1.5


def choose_chunks(good_bands, patch_size: int, *, budget: float = AMPLIFICATION_BUDGET,
                  **loader_kw) -> tuple[int, int, float]:
    """(band_chunk, spatial_chunk, read amplification) for a sensor's store.

    Among :data:`CHUNK_CANDIDATES` whose :func:`read_amplification` for the loader's reads is within
    ``budget``, the one whose reads touch the fewest chunks (ties: less amplification); if none is
    within budget, the least amplification. Why fewest chunks: zarr-python spends about 0.5 ms per
    chunk of a sharded array, more than decoding it, so a 100-band 128 x 128 read of 1 x 16 x 32 x 32
    chunks (112 of them) took 67 ms on this machine, of 1 x 32 x 64 x 64 chunks (16) 12 ms. With the
    registry's sensors and 256-pixel patches this gives 32 x 64 x 64 chunks (amplification 1.28-1.41)
    except AVIRIS-NG, whose 32-band chunks would decode 1.52x: 16 x 64 x 64 there (1.36). What
    remains is mostly the bad bands inside a window's raw band range, which the loader decodes and
    drops. ``loader_kw`` go to :func:`read_amplification`.
    """
    good = np.asarray(good_bands, dtype=bool)
    n_bands = int(good.shape[0])
    scored = []
    for bc, sc in CHUNK_CANDIDATES:
        bc_, sc_ = min(bc, n_bands), min(sc, patch_size)
        if patch_size % sc_:
            sc_ = patch_size  # e.g. 48 or 100: the whole patch is one spatial chunk
        ch = (1, bc_, sc_, sc_)
        amp = read_amplification(ch, good, patch_size, **loader_kw)
        nchunks = chunks_per_read(ch, good, patch_size)
        scored.append((amp > budget + 1e-9, nchunks if amp <= budget + 1e-9 else 0.0, round(amp, 6), bc_, sc_))
    if not scored:
        raise StoreError(f"patch size {patch_size}: no chunk layout fits (use a multiple of 8)")
    _, _, amp, bc_, sc_ = min(scored)
    return bc_, sc_, float(amp)


def create_store(url: str, *, sensor: str, level: str, wavelengths_nm, fwhm_nm, good_bands,
                 patch_size: int, band_chunk: int = DEFAULT_BAND_CHUNK,
                 spatial_chunk: int = DEFAULT_SPATIAL_CHUNK, storage_options: dict | None = None,
                 hist_range: tuple[float, float] | None = None, hist_bins: int = 4096) -> zarr.Group:
    """Create an empty store (n = 0) with the schema above. Fails if one already exists at ``url``.

    With ``hist_range`` (the level's clip range) the store also keeps the running statistics
    accumulator ``stats_acc/{count,mean,m2,hist}`` (two slots, used alternately so that the
    committed one is never overwritten; ``attrs["stats_slot"]`` names it), updated at each commit.
    """
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
    extra: dict[str, Any] = {}
    if hist_range is not None:
        acc = g.create_group("stats_acc")
        for name in ("count", "mean", "m2"):
            acc.create_array(name, shape=(2, n_bands), dtype="float64", chunks=(1, n_bands), fill_value=0.0)
        acc.create_array("hist", shape=(2, n_bands, hist_bins), dtype="uint64", chunks=(1, n_bands, hist_bins),
                         compressors=BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle", typesize=8),
                         fill_value=0)
        extra = {"stats_hist": {"lo": float(hist_range[0]), "hi": float(hist_range[1]), "bins": int(hist_bins)},
                 "stats_slot": -1}
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
        **extra,
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


def _resize_all(group: zarr.Group, n: int) -> None:
    for arr in (group["patches"], group["valid"], *(group["meta"][k] for k in META_FIELDS)):
        if arr.shape[0] != n:
            arr.resize((n, *arr.shape[1:]))


def begin_granule(group: zarr.Group) -> int:
    """Drop any uncommitted tail (left by an interrupted run) and return where new patches start."""
    start = int(group.attrs["n_patches"])
    _resize_all(group, start)
    return start


def write_patches(group: zarr.Group, offset: int, patches: np.ndarray, valid: np.ndarray) -> int:
    """Write patches at ``offset`` (beyond ``n_patches``: invisible until committed); returns the new end."""
    patches = np.asarray(patches)
    if patches.dtype != np.float16:
        raise StoreError(f"patches must be float16, got {patches.dtype}")
    committed = int(group.attrs["n_patches"])
    if offset < committed:
        raise StoreError(f"refusing to overwrite committed patches ({offset} < n_patches={committed})")
    n_new = int(patches.shape[0])
    stop = offset + n_new
    pa, va = group["patches"], group["valid"]
    if pa.shape[0] < stop:
        pa.resize((stop, *pa.shape[1:]))
        va.resize((stop, *va.shape[1:]))
    if n_new:
        pa[offset:stop] = patches
        va[offset:stop] = np.asarray(valid, dtype=bool)
    return stop


def rollback(group: zarr.Group) -> None:
    """Remove the uncommitted tail so the arrays end at ``n_patches`` again."""
    begin_granule(group)


def commit_granule(group: zarr.Group, *, granule_id: str, source: str, start: int, count: int,
                   meta: dict[str, np.ndarray], partial=None) -> None:
    """Make patches ``start:start+count`` (already written) visible as granule ``granule_id``.

    Writes the per-patch metadata and, when the store keeps a statistics accumulator and
    ``partial`` (a :class:`data_prep.stats.PartialStats`) is given, the merged accumulator into the
    free slot; then updates ``n_patches``, the manifest, ``stats`` and ``stats_slot`` in ONE
    attribute write, the commit point.
    """
    a = dict(group.attrs)
    if granule_id in a["granules"]:
        raise StoreError(f"granule {granule_id!r} is already committed to this store")
    if start != int(a["n_patches"]):
        raise StoreError(f"granule {granule_id!r} starts at {start}, but the store has {a['n_patches']} patches")
    stop = start + count
    if group["patches"].shape[0] < stop:
        raise StoreError(f"granule {granule_id!r}: {count} patches were not all written")
    gidx = len(a["granules"])
    for name, dtype in META_FIELDS.items():
        arr = group["meta"][name]
        if arr.shape[0] != stop:
            arr.resize((stop,))
        if count:
            values = np.full(count, gidx, dtype=dtype) if name == "granule" else np.asarray(meta[name], dtype=dtype)
            if values.shape != (count,):
                raise StoreError(f"granule {granule_id!r}: meta {name!r} has shape {values.shape}, expected ({count},)")
            arr[start:stop] = values
    update: dict[str, Any] = {}
    if partial is not None and "stats_acc" in group and a.get("stats_hist"):
        from data_prep.stats import PartialStats

        h = a["stats_hist"]
        slot = int(a.get("stats_slot", -1))
        acc_g = group["stats_acc"]
        if slot >= 0:
            total = PartialStats(count=acc_g["count"][slot], mean=acc_g["mean"][slot], m2=acc_g["m2"][slot],
                                 hist=acc_g["hist"][slot], lo=h["lo"], hi=h["hi"])
        else:
            total = PartialStats.empty(group["patches"].shape[1], h["lo"], h["hi"], h["bins"])
        total.merge(partial)
        new_slot = 1 - slot if slot >= 0 else 0
        acc_g["count"][new_slot] = total.count
        acc_g["mean"][new_slot] = total.mean
        acc_g["m2"][new_slot] = total.m2
        acc_g["hist"][new_slot] = total.hist
        update = {"stats_slot": new_slot, "stats": total.band_stats().to_json()}
    granules = dict(a["granules"])
    granules[granule_id] = {"start": start, "count": count, "source": source}
    group.attrs.update({"granules": granules, "n_patches": stop, **update})


def append_patches(group: zarr.Group, *, granule_id: str, source: str, patches: np.ndarray,
                   valid: np.ndarray, meta: dict[str, np.ndarray], partial=None) -> tuple[int, int]:
    """Append one granule's patches and commit it in the manifest; returns (start, count).

    Data is written beyond ``n_patches`` first and becomes visible only when the attributes
    (``n_patches`` and the manifest entry) are updated last, so an interruption leaves the
    committed view as it was. Serial: one writer per store at a time.
    """
    if granule_id in group.attrs["granules"]:
        raise StoreError(f"granule {granule_id!r} is already committed to this store")
    start = begin_granule(group)
    stop = write_patches(group, start, patches, valid)
    commit_granule(group, granule_id=granule_id, source=source, start=start, count=stop - start, meta=meta,
                   partial=partial)
    return start, stop - start


def write_stats(group: zarr.Group, stats: BandStats) -> None:
    group.attrs["stats"] = stats.to_json()

"""The patch store: one Zarr v3 group per sensor and level, FP16, on any fsspec URL.

Schema (version :data:`SCHEMA_VERSION`), at ``<root>/<sensor>_<level>.zarr``:

``patches``  float16 ``(n, bands, P, P)``; chunks ``(1, band_chunk, spatial_chunk, spatial_chunk)``,
             one shard per patch, Blosc-zstd then a CRC-32C per chunk. All of the sensor's bands are
             kept; ``good_bands`` in the attributes says which to train on. A 100-band window starting
             on the 32-band stride and a crop aligned to ``spatial_chunk`` decode at most ``ceil`` of
             the window to whole band chunks: 128 of 100 bands with the defaults, and no spatial excess.
``valid``    uint8 ``(n, P, P)`` holding 0/1, chunks ``(1, spatial_chunk, spatial_chunk)``, one shard
             per patch: 0 where the pixel was nodata, NaN or outside the flightline.
``meta/*``   one entry per patch: ``granule`` int32 (index into ``attrs["granules"]`` order),
             ``row``/``col`` int32 (top-left pixel in the granule), ``lat``/``lon`` float64 (patch
             centre, NaN when unknown), ``time`` int64 (UTC seconds since the epoch,
             :data:`NO_TIME` when unknown), ``gsd`` float32 (m), ``valid_fraction`` float32, and the
             ground footprint (:data:`FOOTPRINT_META`, float64, NaN when unknown): ``lon_min``,
             ``lat_min``, ``lon_max``, ``lat_max`` (WGS-84 bounds of the patch's corners) and
             ``geo_0..geo_5`` (``lon = g0 + g1 x + g2 y``, ``lat = g3 + g4 x + g5 y`` for pixel-corner
             coordinates x = column, y = row inside the patch; :func:`data_prep.tiling.patch_geo`). A store
             written before footprints were kept reads them as NaN (unknown); appending to it adds the arrays.

Group attributes: ``schema_version``, ``sensor``, ``level``, ``patch_size``, ``wavelengths_nm``,
``fwhm_nm``, ``good_bands``, ``n_patches`` (committed; the arrays never hold visible patches
beyond it), ``granules`` (ordered manifest: granule id -> ``{"start", "count", "source",
"max_invalid"}``), and ``stats`` (per band, over valid pixels of committed patches: ``count``,
``mean``, ``std``, ``p01``, ``p99``).

**Missing data is an error, not zeros.** Zarr reads a chunk that is not in storage (a deleted file,
a lost object) as the array's fill value. Every fill value of this schema is one that stored data
never holds: NaN for ``patches`` (the writer refuses non-finite pixels; tiling stores nodata as 0
with ``valid`` 0), 255 for ``valid``, -1 for ``meta/granule``, ``row``, ``col``, NaN for
``meta/gsd`` and ``valid_fraction`` and for the accumulator's sums. So every chunk the writer wrote
is in storage (Zarr skips only chunks equal to the fill value), and a missing one decodes to a
value :class:`PatchStore` rejects: :meth:`PatchStore.read` raises :class:`MissingDataError`
(the loader logs, counts and substitutes it like a corrupt chunk), :meth:`PatchStore.meta`
likewise. The check costs one bit test over the float16 crop (0.2 ms per 100 x 128 x 128 read,
about 1% of the read; ``bench/ingest.py`` measures it). A chunk whose bytes changed fails its
CRC-32C (:class:`CorruptDataError`). ``python -m data_prep verify`` reads every chunk and lists
missing, corrupt and NaN patches by index. Stores of schema 1 (fill values 0/False, no chunk CRC)
still read, without detection (a warning says so); ``python -m data_prep migrate`` rewrites one.

Only :class:`PatchStore` reads stores and only :class:`StoreWriter` writes them: nothing else opens
a store's arrays or attributes for writing. The writer's guarantees (what ingest builds on):

- **Never half-written.** Patches are written beyond ``n_patches`` (:meth:`StoreWriter.begin`,
  :meth:`StoreWriter.write`) and become visible only at :meth:`StoreWriter.commit`, whose last step
  is ONE attribute write (``n_patches``, manifest entry, ``stats``, ``stats_slot``). An interruption
  at any point leaves the committed view as it was; the next :meth:`StoreWriter.begin` truncates
  the uncommitted tail.
- **Idempotent per granule.** A granule id is committed at most once (:class:`StoreError` otherwise).
- **The statistics accumulator** (``stats_acc``: per-band count, mean, m2 and histogram, see
  :mod:`data_prep.stats`) has two slots used alternately: a commit merges the granule's partial
  sums into the committed slot's and writes the result into the other slot, so the committed slot
  is never overwritten before the attribute write that switches ``stats_slot`` to the new one.
- One writer per store at a time (the commit is a read-modify-write of the attributes).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from types import MappingProxyType
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from data_prep.errors import UserError
from data_prep.stats import DEFAULT_BINS, BandStats, PartialStats

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
#: versions :class:`PatchStore` reads (1: before missing-data detection; read without it)
READABLE_VERSIONS = (1, 2)
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
    **{k: "float64" for k in ("lon_min", "lat_min", "lon_max", "lat_max", *(f"geo_{j}" for j in range(6)))},
}
#: the footprint fields of META_FIELDS: optional (a store written before them reads them as NaN)
FOOTPRINT_META = ("lon_min", "lat_min", "lon_max", "lat_max", *(f"geo_{j}" for j in range(6)))
#: fill value of each meta field (schema 2); fields whose fill no stored value equals are checked on read
META_FILL: dict[str, Any] = {"granule": -1, "row": -1, "col": -1, "lat": float("nan"), "lon": float("nan"),
                             "time": int(NO_TIME), "gsd": float("nan"), "valid_fraction": float("nan"),
                             **{k: float("nan") for k in FOOTPRINT_META}}
META_CHECKED = ("granule", "row", "col", "gsd", "valid_fraction")
#: ``valid`` fill value (schema 2): stored values are 0 and 1
VALID_FILL = 255


class StoreError(UserError):
    """A store is missing, of another schema version, empty where data is needed, or inconsistent."""


class MissingDataError(StoreError):
    """A chunk the writer wrote is not in storage (it read as the fill value): deleted or lost."""


class CorruptDataError(StoreError):
    """A chunk failed to read or decode (checksum mismatch, truncated shard, unreadable object)."""


#: the statistics accumulator's arrays (``stats_acc/<name>``), two slots each
_ACC_FIELDS = ("count", "mean", "m2", "hist")


def store_url(root: str, sensor: str, level: str) -> str:
    """Where the store of ``sensor`` and ``level`` lives under ``root`` (a path or fsspec URL)."""
    return f"{root.rstrip('/')}/{sensor}_{level}.zarr"


def compressor(level: int = 3, typesize: int = 2) -> BloscCodec:
    return BloscCodec(cname="zstd", clevel=level, shuffle="shuffle", typesize=typesize)


def _codecs(typesize: int, shuffle: str = "shuffle") -> list:
    """Blosc-zstd then a CRC-32C of the compressed chunk (a changed byte is an error, not other data)."""
    return [BloscCodec(cname="zstd", clevel=3, shuffle=shuffle, typesize=typesize), Crc32cCodec()]


def nonfinite(x: np.ndarray) -> bool:
    """Whether float16 ``x`` holds a NaN or an infinity: a test of the exponent bits.

    0.17 ms for a 100 x 128 x 128 crop on this machine; ``np.isnan`` on float16 takes ~10 ms."""
    b = np.ascontiguousarray(x).view(np.uint16)
    return bool(np.any((b & 0x7C00) == 0x7C00))


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


def window_segments(sel: np.ndarray, band_chunk: int) -> list[tuple[int, int, int, np.ndarray | None]]:
    """How a window's raw band indices ``sel`` (ascending) are read: ``[(slot, raw_start, raw_stop, keep)]``.

    Each segment covers adjacent band chunks that each hold a selected band; the range between two segments is a
    run of whole chunks with no selected band (bad bands), which is skipped. ``slot`` is where the segment's first
    band goes in the output; ``keep`` is None when ``raw_start:raw_stop`` is exactly the selected bands (decode in
    place), else the offsets of the selected ones inside it (decode, then gather). The loader
    (``pretrain.data.reader``) reads this way; :func:`read_amplification` counts it.
    """
    sel = np.asarray(sel, dtype=np.int64)
    breaks = np.flatnonzero(np.diff(sel // band_chunk) > 1) + 1
    out = []
    for part in np.split(np.arange(sel.shape[0]), breaks):
        seg = sel[part]
        r0, r1 = int(seg[0]), int(seg[-1]) + 1
        out.append((int(part[0]), r0, r1, None if r1 - r0 == seg.shape[0] else seg - r0))
    return out


def _span(lo: int, hi: int, c: int) -> int:
    """Elements of whole chunks of size ``c`` that ``[lo, hi)`` touches."""
    return (math.ceil(hi / c) - lo // c) * c


def _window_starts(n_good: int, window: int, stride: int) -> list[int]:
    return [0] if n_good <= window else [k * stride for k in range((n_good - window) // stride + 1)]


def read_amplification(chunks: tuple[int, ...], good_bands, patch_size: int, *, window: int = 100,
                       stride: int = 32, crop: int = 128, align: int | None = None) -> float:
    """Bytes decoded per byte delivered for the loader's reads, averaged over its draws.

    The loader (``pretrain.data``) takes ``window`` contiguous *good* bands starting at multiples of
    ``stride`` in good-band order and reads them as :func:`window_segments` (band chunks holding at
    least one selected band; a chunk holding only bad bands is skipped, bad bands inside a read
    chunk are decoded and dropped), and a ``crop`` x ``crop`` crop with corners on an ``align`` grid
    (``None``: the spatial chunk, the loader's default). Decoded = whole chunks touched; delivered =
    ``window`` bands x ``crop``^2 (fewer bands if the sensor has fewer good bands, a smaller crop if
    the patch is smaller).
    """
    _, cb, cy, cx = chunks
    gi = np.flatnonzero(np.asarray(good_bands, dtype=bool))
    if gi.size == 0:
        raise StoreError("no good bands: read amplification is undefined")
    w = min(window, gi.size)
    crop = min(crop, patch_size)
    align = max(1, min(cy if align is None else align, patch_size))
    band = float(np.mean([sum(_span(r0, r1, cb) for _, r0, r1, _ in window_segments(gi[s:s + w], cb)) / w
                          for s in _window_starts(gi.size, window, stride)]))
    pos = range(0, patch_size - crop + 1, align)
    ys = float(np.mean([min(_span(p, p + crop, cy), patch_size - p // cy * cy) / crop for p in pos]))
    xs = float(np.mean([min(_span(p, p + crop, cx), patch_size - p // cx * cx) / crop for p in pos]))
    return band * ys * xs


def chunks_per_read(chunks: tuple[int, ...], good_bands, patch_size: int, *, window: int = 100, stride: int = 32,
                    crop: int = 128) -> float:
    """Mean number of chunks one loader read touches (crop corners on the spatial-chunk grid)."""
    _, cb, cy, _ = chunks
    gi = np.flatnonzero(np.asarray(good_bands, dtype=bool))
    w = min(window, gi.size)
    nb = np.mean([sum(_span(r0, r1, cb) // cb for _, r0, r1, _ in window_segments(gi[s:s + w], cb))
                  for s in _window_starts(gi.size, window, stride)])
    ns = math.ceil(min(crop, patch_size) / cy)
    return float(nb * ns * ns)


#: (band chunk, spatial chunk) pairs :func:`choose_chunks` considers. Spatial chunks stop at 64 so a
#: 128-pixel crop of a 256-pixel patch keeps at least 3 x 3 chunk-aligned positions.
CHUNK_CANDIDATES: tuple[tuple[int, int], ...] = ((4, 64), (8, 32), (16, 32), (32, 32), (8, 64), (16, 64), (32, 64))
#: the design's budget for bytes decoded per byte delivered (DESIGN.md: 1.2)
AMPLIFICATION_BUDGET = 1.2


def choose_chunks(good_bands, patch_size: int, *, budget: float = AMPLIFICATION_BUDGET,
                  **loader_kw) -> tuple[int, int, float]:
    """(band_chunk, spatial_chunk, read amplification) for a sensor's store.

    Among :data:`CHUNK_CANDIDATES` whose :func:`read_amplification` for the loader's reads is within
    ``budget``, the one whose reads touch the fewest chunks (ties: less amplification); if none is
    within budget, the least amplification. Why fewest chunks: every chunk costs a fixed overhead
    on top of its decode (zarr-python ~0.5 ms, the loader's zarrs pipeline ~0.1 ms). With the
    loader's segment reads (:func:`window_segments`: band chunks holding only bad bands are not
    read) and the registry's sensors with 256-pixel patches this gives 8 x 64 x 64 chunks for the
    AVIRIS family and EMIT (amplification 1.12-1.15; 16-band chunks would decode 1.22-1.30) and
    16 x 64 x 64 for EnMAP and DESIS (1.12). What it costs: one shard per patch as before, so the
    same file count; ~3.5x the chunks per shard (a 9 KB shard index for 285 bands), and writes at
    ~0.6x the MB/s of 32 x 64 x 64 chunks (helper perf's measurement: 54 vs 87 MB/s); the store's
    size is unchanged (+0.1%). ``loader_kw`` go to :func:`read_amplification`.
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


_WARNED_OLD: set[str] = set()


class StoreView:
    """What every readable source offers (a :class:`PatchStore`, a logical dataset's ``ShardedStore``)."""

    n_patches: int
    wavelengths_nm: np.ndarray

    def __len__(self) -> int:
        return self.n_patches

    @property
    def n_bands(self) -> int:
        return int(self.wavelengths_nm.shape[0])


class PatchStore(StoreView):
    """Read-only view of a committed store. Checks the schema on open.

    ``read(i, band_start, band_stop, y0, x0, size)`` decodes only the chunks that the band range
    and the crop touch, and raises :class:`MissingDataError` / :class:`CorruptDataError` for data
    that is not there or does not decode (schema 2; see the module docstring).
    """

    def __init__(self, url: str, storage_options: dict | None = None):
        self.url = url
        self.storage_options = storage_options
        try:
            self.group = _open_group(url, "r", storage_options)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError) as e:
            raise StoreError(f"no patch store at {url!r}: {e}") from None
        a = dict(self.group.attrs)
        version = a.get("schema_version")
        if version not in READABLE_VERSIONS:
            raise StoreError(f"{url}: schema_version is {version!r}; this specfm reads versions "
                             f"{', '.join(map(str, READABLE_VERSIONS))}")
        self.schema_version = int(version)
        self.detects_missing = self.schema_version >= 2
        """False for schema 1 stores: a lost chunk reads as zeros there and is not noticed."""
        if not self.detects_missing and url not in _WARNED_OLD:
            _WARNED_OLD.add(url)
            log.warning("%s: schema_version 1 (written before missing-data detection): a deleted or lost chunk "
                        "reads as zeros there, unnoticed; rewrite it with `python -m data_prep migrate %s NEW_URL`",
                        url, url)
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

    @property
    def chunks(self) -> tuple[int, ...]:
        return tuple(self.patches.chunks)

    def locate(self, i: int) -> tuple[PatchStore, int]:
        """(store, index in it) of patch ``i``: this store itself (a logical dataset answers with a shard)."""
        if not 0 <= i < self.n_patches:
            raise IndexError(f"{self.url}: patch {i} out of range 0..{self.n_patches - 1}")
        return self, i

    @property
    def has_accumulator(self) -> bool:
        return bool(self.attrs.get("stats_hist")) and "stats_acc" in self.group

    def partials(self) -> PartialStats:
        """The committed statistics accumulator (what ``stats`` was finalised from).

        Merging those of several stores of one sensor and level (e.g. the shard stores of a job
        array) gives the statistics of their union: ``reduce(PartialStats.merge, parts).band_stats()``.
        """
        return _read_accumulator(self.group, self.attrs, self.url, check=self.detects_missing)

    @property
    def stats(self) -> BandStats:
        s = self.attrs.get("stats")
        if not s:
            raise StoreError(f"{self.url}: has no statistics yet (run `python -m data_prep stats {self.url}`)")
        return BandStats.from_json(s)

    def band_table(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(wavelengths_nm, fwhm_nm) of committed patch ``i``: its granule's own when the manifest records them
        (they differed from the store's table by more than the ingest tolerance), else the store's."""
        if not 0 <= i < self.n_patches:
            raise IndexError(f"{self.url}: patch {i} out of range 0..{self.n_patches - 1}")
        entries = list(self.attrs["granules"].values())
        e = entries[int(self.group["meta"]["granule"][i])]
        if "wavelengths_nm" in e:
            return np.asarray(e["wavelengths_nm"], dtype=np.float64), np.asarray(e["fwhm_nm"], dtype=np.float64)
        return self.wavelengths_nm, self.fwhm_nm

    def _hint(self) -> str:
        return f"`python -m data_prep verify {self.url}` lists every damaged patch"

    def meta(self, name: str) -> np.ndarray:
        """Per-patch metadata ``name`` of the committed patches (MissingDataError if a chunk of it is lost)."""
        if name in FOOTPRINT_META and name not in self.group["meta"]:
            return np.full(self.n_patches, np.nan)  # written before footprints were kept: unknown
        try:
            v = self.group["meta"][name][: self.n_patches]
        except Exception as e:  # noqa: BLE001 - whatever the codecs raise for damaged bytes
            raise CorruptDataError(f"{self.url}: meta/{name} failed to read ({type(e).__name__}: {e}); "
                                   f"{self._hint()}") from e
        if self.detects_missing and name in META_CHECKED:
            lost = np.isnan(v) if v.dtype.kind == "f" else v < 0
            if lost.any():
                idx = np.flatnonzero(lost)
                raise MissingDataError(f"{self.url}: meta/{name} of patches {idx[:10].tolist()}"
                                       f"{' ...' if idx.size > 10 else ''} ({idx.size} in all) read as the fill "
                                       f"value: a chunk of it is missing (deleted or lost); {self._hint()}")
        return v

    def check_read(self, where: str, px: np.ndarray, va: np.ndarray) -> np.ndarray:
        """``va`` as bool after the schema-2 checks of one read (``where`` names it in errors).

        For readers that decode ``patches``/``valid`` themselves: ``px`` float16 (bit test) or float32
        (one sum) as decoded, ``va`` as decoded (uint8). Raises :class:`MissingDataError`."""
        if not self.detects_missing:
            return np.asarray(va, dtype=bool)
        if px.dtype == np.float16 and nonfinite(px) or px.dtype != np.float16 and not np.isfinite(px.sum()):
            raise MissingDataError(f"{self.url}: {where}: 'patches' reads NaN, the fill value of a chunk that is not "
                                   f"in storage (deleted or lost); {self._hint()}")
        if va.size and int(va.max()) > 1:
            raise MissingDataError(f"{self.url}: {where}: 'valid' reads {VALID_FILL}, the fill value of a chunk that is "
                                   f"not in storage (deleted or lost); {self._hint()}")
        return va.view(bool)

    def read(self, i: int, band_start: int = 0, band_stop: int | None = None, y0: int = 0, x0: int = 0,
             size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(pixels float16 ``(bands, size, size)``, valid bool ``(size, size)``) of committed patch ``i``."""
        if not 0 <= i < self.n_patches:
            raise IndexError(f"{self.url}: patch {i} out of range 0..{self.n_patches - 1}")
        size = self.patch_size if size is None else size
        band_stop = self.n_bands if band_stop is None else band_stop
        try:
            px = self.patches[i, band_start:band_stop, y0:y0 + size, x0:x0 + size]
            valid = self.valid[i, y0:y0 + size, x0:x0 + size]
        except Exception as e:  # noqa: BLE001 - whatever the codecs raise for damaged bytes
            raise CorruptDataError(f"{self.url}: patch {i}: failed to read ({type(e).__name__}: {e}); "
                                   f"{self._hint()}") from e
        return px, self.check_read(f"patch {i}", px, valid)

    def read_range(self, i0: int, i1: int) -> tuple[np.ndarray, np.ndarray]:
        """Whole committed patches ``i0:i1``: (float16 ``(k, bands, P, P)``, bool ``(k, P, P)``), checked.

        One read for the range (zarr fetches its chunks concurrently); when it fails, the patches
        are read one by one so that the error names the first damaged one."""
        if not 0 <= i0 <= i1 <= self.n_patches:
            raise IndexError(f"{self.url}: patches {i0}:{i1} out of range 0:{self.n_patches}")
        try:
            px, va = self.patches[i0:i1], self.valid[i0:i1]
            return px, self.check_read(f"patches {i0}:{i1}", px, va)
        except Exception:  # noqa: BLE001 - find which patch it was
            for i in range(i0, i1):
                self.read(i)
            raise

    def iter_patches(self, batch: int = 8) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(pixels float16 ``(bands, P, P)``, valid bool ``(P, P)``) of every committed patch, in order."""
        for i0 in range(0, self.n_patches, batch):
            px, va = self.read_range(i0, min(i0 + batch, self.n_patches))
            yield from zip(px, va, strict=True)

    def stored_patches(self, array: str = "patches") -> np.ndarray:
        """Sorted indices of the patches whose shard object of ``array`` is in storage (one listing).

        One shard per patch, keys ``<array>/c/<patch>/...`` (Zarr's default chunk key encoding), so
        a committed patch missing from this list has lost its data, in any schema version."""
        import fsspec

        fs, path = fsspec.core.url_to_fs(f"{self.url.rstrip('/')}/{array}/c", **(self.storage_options or {}))
        root = path.rstrip("/") + "/"
        try:
            keys = fs.find(path)
        except FileNotFoundError:
            keys = []
        idx = sorted({int(k[len(root):].split("/", 1)[0]) for k in keys if k.startswith(root)})
        return np.asarray(idx, dtype=np.int64)

    def missing_objects(self) -> dict[str, list[int]]:
        """Committed patches without a shard object, per array (``{"patches": [...], "valid": [...]}``)."""
        out = {}
        for array in ("patches", "valid"):
            have = self.stored_patches(array)
            out[array] = np.setdiff1d(np.arange(self.n_patches), have).tolist()
        return out


def _meta_array(g: zarr.Group, name: str):
    """``meta/<name>``; a footprint field a store written before footprints lacks is created (NaN = unknown)."""
    meta = g["meta"]
    if name not in meta and name in FOOTPRINT_META:
        dtype = META_FIELDS[name]
        n = int(meta["row"].shape[0])
        arr = meta.create_array(name, shape=(n,), dtype=dtype, chunks=(4096,),
                                compressors=_codecs(np.dtype(dtype).itemsize), fill_value=META_FILL[name],
                                dimension_names=("patch",))
        if n:
            arr[:] = np.full(n, np.nan)
        return arr
    return meta[name]


def _meta_values(meta: dict[str, np.ndarray], name: str, n: int, dtype: str) -> np.ndarray:
    """A commit's values of ``name``; footprint fields a caller does not give are NaN (unknown)."""
    if name not in meta and name in FOOTPRINT_META:
        return np.full(n, np.nan, dtype=dtype)
    return np.asarray(meta[name], dtype=dtype)


def _create_arrays(g: zarr.Group, n_bands: int, patch_size: int, chunks: tuple[int, ...],
                   shards: tuple[int, ...]) -> None:
    sc = chunks[2]
    g.create_array("patches", shape=(0, n_bands, patch_size, patch_size), dtype="float16", chunks=chunks,
                   shards=shards, compressors=_codecs(2), fill_value=float("nan"),
                   dimension_names=("patch", "band", "y", "x"))
    g.create_array("valid", shape=(0, patch_size, patch_size), dtype="uint8", chunks=(1, sc, sc),
                   shards=(1, patch_size, patch_size), compressors=_codecs(1), fill_value=VALID_FILL,
                   dimension_names=("patch", "y", "x"))
    meta = g.create_group("meta")
    for name, dtype in META_FIELDS.items():
        meta.create_array(name, shape=(0,), dtype=dtype, chunks=(4096,), compressors=_codecs(np.dtype(dtype).itemsize),
                          fill_value=META_FILL[name], dimension_names=("patch",))


def _create_accumulator(g: zarr.Group, n_bands: int, bins: int) -> None:
    acc = g.create_group("stats_acc")
    for name in ("count", "mean", "m2"):
        acc.create_array(name, shape=(2, n_bands), dtype="float64", chunks=(1, n_bands), fill_value=float("nan"),
                         compressors=_codecs(8))
    acc.create_array("hist", shape=(2, n_bands, bins), dtype="uint64", chunks=(1, n_bands, bins),
                     compressors=_codecs(8, "bitshuffle"), fill_value=np.iinfo(np.uint64).max)


def _read_accumulator(group: zarr.Group, attrs: dict, url: str, check: bool = True) -> PartialStats:
    """The committed accumulator (all zeros before the first commit); StoreError if the store keeps none."""
    h = attrs.get("stats_hist")
    if not h or "stats_acc" not in group:
        raise StoreError(f"{url}: has no statistics accumulator (not written by data_prep.ingest)")
    slot = int(attrs.get("stats_slot", -1))
    n_bands = len(attrs["wavelengths_nm"])
    if slot < 0:
        return PartialStats.empty(n_bands, h["lo"], h["hi"], h["bins"])
    a = group["stats_acc"]
    try:
        p = PartialStats(count=a["count"][slot], mean=a["mean"][slot], m2=a["m2"][slot], hist=a["hist"][slot],
                         lo=float(h["lo"]), hi=float(h["hi"]))
    except Exception as e:  # noqa: BLE001 - whatever the codecs raise for damaged bytes
        raise CorruptDataError(f"{url}: stats_acc failed to read ({type(e).__name__}: {e})") from e
    if check and (np.isnan(p.count).any() or np.isnan(p.m2).any() or (p.hist == np.iinfo(np.uint64).max).any()):
        raise MissingDataError(f"{url}: stats_acc slot {slot} reads the fill value: a chunk of it is missing; "
                               f"`python -m data_prep stats {url}` rebuilds it from the patches")
    return p


class StoreWriter:
    """The one way to write a store: create or open it, then begin / write / commit granules.

    See the module docstring for the guarantees. Get one with :meth:`create` (a new, empty store)
    or :meth:`open` (an existing one, schema checked).
    """

    def __init__(self, group: zarr.Group, url: str, storage_options: dict | None = None):
        self.group, self.url, self.storage_options = group, url, storage_options

    # ------------------------------------------------------------------ opening
    @classmethod
    def create(cls, url: str, *, sensor: str, level: str, wavelengths_nm, fwhm_nm, good_bands, patch_size: int,
               band_chunk: int = DEFAULT_BAND_CHUNK, spatial_chunk: int = DEFAULT_SPATIAL_CHUNK,
               storage_options: dict | None = None, hist_range: tuple[float, float] | None = None,
               hist_bins: int = DEFAULT_BINS, attrs: dict | None = None) -> StoreWriter:
        """Create an empty store (n = 0) with the schema above. Fails if one already exists at ``url``.

        With ``hist_range`` (the level's clip range) the store also keeps the statistics accumulator,
        updated at each commit that brings partial sums. ``attrs``: extra attributes (e.g. the
        layout's ``read_amplification``), written with the schema's in the same first write.
        """
        wl = np.asarray(wavelengths_nm, dtype=np.float64)
        n_bands = int(wl.shape[0])
        chunks, shards = chunk_layout(n_bands, patch_size, band_chunk, spatial_chunk)
        try:
            g = _open_group(url, "w-", storage_options)
        except (zarr.errors.ContainsGroupError, zarr.errors.ContainsArrayError, FileExistsError):
            raise StoreError(f"{url}: a store already exists there (choose another URL)") from None
        _create_arrays(g, n_bands, patch_size, chunks, shards)
        extra: dict[str, Any] = {}
        if hist_range is not None:
            _create_accumulator(g, n_bands, hist_bins)
            extra = {"stats_hist": {"lo": float(hist_range[0]), "hi": float(hist_range[1]), "bins": int(hist_bins)},
                     "stats_slot": -1}
        g.update_attributes({
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
            **(attrs or {}),
        })
        return cls(g, url, storage_options)

    @classmethod
    def open(cls, url: str, storage_options: dict | None = None, *, missing_ok: bool = False) -> StoreWriter | None:
        """Open an existing store for writing; None when there is none and ``missing_ok``, else StoreError.

        On a local file system, temporary ``*.partial`` files that a killed writer left (Zarr writes
        a file under a temporary name, then renames it) are removed."""
        try:
            g = _open_group(url, "r+", storage_options)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError) as e:
            if missing_ok:
                return None
            raise StoreError(f"no patch store at {url!r}: {e}") from None
        version = dict(g.attrs).get("schema_version")
        if version == 1:
            raise StoreError(f"{url}: schema_version 1 (written before missing-data detection); this specfm writes "
                             f"version {SCHEMA_VERSION}: rewrite it with `python -m data_prep migrate {url} NEW_URL`, "
                             f"or ingest into a new --out root")
        if version != SCHEMA_VERSION:
            raise StoreError(f"{url}: exists but schema_version is {version!r}, expected {SCHEMA_VERSION}")
        w = cls(g, url, storage_options)
        w._remove_partial_files()
        return w

    def _remove_partial_files(self) -> None:
        if "://" in self.url and not self.url.startswith("file://"):
            return
        root = self.url.removeprefix("file://")
        for dirpath, _, files in os.walk(root):
            for f in files:
                if f.endswith(".partial"):
                    os.unlink(os.path.join(dirpath, f))

    # ------------------------------------------------------------------ the committed view
    @property
    def attrs(self) -> MappingProxyType:
        """The attributes as they are now (read-only: writes go through the methods below)."""
        return MappingProxyType(dict(self.group.attrs))

    @property
    def n_patches(self) -> int:
        return int(self.group.attrs["n_patches"])

    @property
    def granules(self) -> dict[str, dict]:
        """The manifest: granule id -> ``{"start", "count", "source"}``, in commit order."""
        return dict(self.group.attrs["granules"])

    def has(self, granule_id: str) -> bool:
        return granule_id in self.group.attrs["granules"]

    @property
    def chunks(self) -> tuple[int, ...]:
        return tuple(self.group["patches"].chunks)

    # ------------------------------------------------------------------ writing granules
    def _arrays(self) -> list:
        g = self.group
        return [g["patches"], g["valid"], *(_meta_array(g, k) for k in META_FIELDS)]

    def begin(self) -> int:
        """Drop any uncommitted tail (left by an interrupted run) and return where new patches start."""
        start = self.n_patches
        for arr in self._arrays():
            if arr.shape[0] != start:
                arr.resize((start, *arr.shape[1:]))
        return start

    def rollback(self) -> None:
        """Remove the uncommitted tail so the arrays end at ``n_patches`` again."""
        self.begin()

    def write(self, offset: int, patches: np.ndarray, valid: np.ndarray) -> int:
        """Write patches at ``offset`` (beyond ``n_patches``: invisible until committed); returns the new end."""
        patches = np.asarray(patches)
        if patches.dtype != np.float16:
            raise StoreError(f"patches must be float16, got {patches.dtype}")
        committed = self.n_patches
        if offset < committed:
            raise StoreError(f"refusing to overwrite committed patches ({offset} < n_patches={committed})")
        n_new = int(patches.shape[0])
        stop = offset + n_new
        pa, va = self.group["patches"], self.group["valid"]
        if pa.shape[0] < stop:
            pa.resize((stop, *pa.shape[1:]))
            va.resize((stop, *va.shape[1:]))
        if n_new:
            self._put(offset, patches, valid)
        return stop

    def _put(self, offset: int, patches: np.ndarray, valid: np.ndarray) -> None:
        if nonfinite(patches):
            k = int(np.flatnonzero(~np.isfinite(patches.reshape(patches.shape[0], -1)).all(axis=1))[0])
            raise StoreError(f"{self.url}: patch {offset + k} holds NaN or inf; stored pixels must be finite "
                             "(NaN is the store's mark of missing data: store nodata as 0 with valid False)")
        stop = offset + int(patches.shape[0])
        self.group["patches"][offset:stop] = patches
        self.group["valid"][offset:stop] = np.asarray(valid, dtype=bool).astype(np.uint8)

    def _granule_range(self, granule_id: str, at: int, n: int) -> tuple[int, int]:
        e = self.granules.get(granule_id)
        if e is None:
            raise StoreError(f"{self.url}: granule {granule_id!r} is not committed here")
        start, stop = int(e["start"]) + at, int(e["start"]) + at + n
        if at < 0 or stop > int(e["start"]) + int(e["count"]):
            raise StoreError(f"{self.url}: granule {granule_id!r} holds patches {e['start']}..{e['start'] + e['count']}"
                             f", a rewrite of {start}..{stop} does not fit")
        return start, stop

    def rewrite(self, granule_id: str, at: int, patches: np.ndarray, valid: np.ndarray) -> None:
        """Repair: write committed patches ``at..`` of granule ``granule_id`` again (the same data,
        re-derived from its product). Touches nothing outside the granule's range and no attribute:
        the committed view (``n_patches``, manifest, statistics) is unchanged."""
        patches = np.asarray(patches)
        if patches.dtype != np.float16:
            raise StoreError(f"patches must be float16, got {patches.dtype}")
        start, stop = self._granule_range(granule_id, at, int(patches.shape[0]))
        if stop > start:
            self._drop_shards(range(start, stop))  # a damaged shard cannot be updated in place: Zarr reads it first
            self._put(start, patches, valid)

    def _drop_shards(self, indices) -> None:
        """Delete the shard objects of patches ``indices`` in ``patches`` and ``valid`` (absent ones are fine)."""
        import fsspec

        fs, root = fsspec.core.url_to_fs(self.url, **(self.storage_options or {}))
        paths = [f"{root.rstrip('/')}/{a}/c/{i}/" + "/".join(["0"] * (self.group[a].ndim - 1))
                 for a in ("patches", "valid") for i in indices]
        for p in paths:
            try:
                fs.rm(p)
            except FileNotFoundError:
                pass

    def rewrite_meta(self, granule_id: str, at: int, meta: dict[str, np.ndarray]) -> None:
        """Repair: write the metadata of committed patches ``at..`` of granule ``granule_id`` again."""
        n = int(np.asarray(meta["row"]).shape[0])
        start, stop = self._granule_range(granule_id, at, n)
        gidx = list(self.granules).index(granule_id)
        for name, dtype in META_FIELDS.items():
            values = np.full(n, gidx, dtype) if name == "granule" else _meta_values(meta, name, n, dtype)
            _meta_array(self.group, name)[start:stop] = values

    def commit(self, *, granule_id: str, source: str, start: int, count: int, meta: dict[str, np.ndarray],
               partial: PartialStats | None = None, entry: dict | None = None, good_bands=None) -> None:
        """Make patches ``start:start+count`` (already written) visible as granule ``granule_id``.

        ``entry``: more fields of its manifest entry (ingest records ``max_invalid``, which a repair
        needs to tile the granule again exactly, and the granule's own ``wavelengths_nm``/``fwhm_nm``
        when they differ from the store's table). ``good_bands`` (the granule's) is and-ed into the
        store's in the same attribute write, so a band nodata in one granule is not trained on.

        Writes the per-patch metadata and, when the store keeps a statistics accumulator and
        ``partial`` is given, the merged accumulator into the free slot; then updates
        ``n_patches``, the manifest, ``stats`` and ``stats_slot`` in ONE attribute write, the commit point.
        """
        g = self.group
        a = dict(g.attrs)
        if granule_id in a["granules"]:
            raise StoreError(f"granule {granule_id!r} is already committed to this store")
        if start != int(a["n_patches"]):
            raise StoreError(f"granule {granule_id!r} starts at {start}, but the store has {a['n_patches']} patches")
        stop = start + count
        if g["patches"].shape[0] < stop:
            raise StoreError(f"granule {granule_id!r}: {count} patches were not all written")
        gidx = len(a["granules"])
        for name, dtype in META_FIELDS.items():
            arr = _meta_array(g, name)
            if arr.shape[0] != stop:
                arr.resize((stop,))
            if count:
                values = (np.full(count, gidx, dtype=dtype) if name == "granule"
                          else _meta_values(meta, name, count, dtype))
                if values.shape != (count,):
                    raise StoreError(f"granule {granule_id!r}: meta {name!r} has shape {values.shape}, "
                                     f"expected ({count},)")
                arr[start:stop] = values
        update: dict[str, Any] = {}
        if partial is not None and "stats_acc" in g and a.get("stats_hist"):
            update = self._stage_statistics(_read_accumulator(g, a, self.url).merge(partial), a)
        if good_bands is not None:
            gb = np.asarray(a["good_bands"], dtype=bool) & np.asarray(good_bands, dtype=bool)
            if gb.tolist() != list(a["good_bands"]):
                update["good_bands"] = [bool(b) for b in gb]
        granules = dict(a["granules"])
        granules[granule_id] = {**(entry or {}), "start": start, "count": count, "source": source}
        # ONE metadata write (zarr's ``attrs.update`` would write once per key: a kill between them left
        # n_patches committed with the statistics of the granule before)
        g.update_attributes({"granules": granules, "n_patches": stop, **update})

    def append(self, *, granule_id: str, source: str, patches: np.ndarray, valid: np.ndarray,
               meta: dict[str, np.ndarray], partial: PartialStats | None = None) -> tuple[int, int]:
        """Write and commit one granule's patches in one call; returns (start, count)."""
        if self.has(granule_id):
            raise StoreError(f"granule {granule_id!r} is already committed to this store")
        start = self.begin()
        stop = self.write(start, patches, valid)
        self.commit(granule_id=granule_id, source=source, start=start, count=stop - start, meta=meta,
                    partial=partial)
        return start, stop - start

    # ------------------------------------------------------------------ statistics
    def _stage_statistics(self, total: PartialStats, a: dict) -> dict:
        """Write ``total`` into the free accumulator slot; return the attribute update that commits it."""
        slot = int(a.get("stats_slot", -1))
        new_slot = 1 - slot if slot >= 0 else 0
        acc = self.group["stats_acc"]
        acc["count"][new_slot] = total.count
        acc["mean"][new_slot] = total.mean
        acc["m2"][new_slot] = total.m2
        acc["hist"][new_slot] = total.hist
        return {"stats_slot": new_slot, "stats": total.band_stats().to_json()}

    def set_statistics(self, total: PartialStats) -> None:
        """Replace the statistics by ``total`` (e.g. a rescan): accumulator and ``stats`` in one attribute write.

        A store without an accumulator gets only ``stats``."""
        a = dict(self.group.attrs)
        if "stats_acc" in self.group and a.get("stats_hist"):
            self.group.update_attributes(self._stage_statistics(total, a))
        else:
            self.write_stats(total.band_stats())

    def write_stats(self, stats: BandStats) -> None:
        """Set ``stats`` alone (stores built without an accumulator, e.g. test fixtures and benchmarks)."""
        self.group.attrs["stats"] = stats.to_json()

    def set_attrs(self, **attrs: Any) -> None:
        """Set informational attributes (not schema fields) in one write."""
        reserved = {"schema_version", "n_patches", "granules", "stats", "stats_slot", "stats_hist"} & set(attrs)
        if reserved:
            raise StoreError(f"{self.url}: {sorted(reserved)} are written by commits only")
        self.group.update_attributes(attrs)

    def remove(self) -> None:
        """Delete the whole store (ingest removes a store it created when nothing was committed to it)."""
        import fsspec

        fs, path = fsspec.core.url_to_fs(self.url, **(self.storage_options or {}))
        fs.rm(path, recursive=True)


def create_store(url: str, **kw: Any) -> StoreWriter:
    """:meth:`StoreWriter.create` (the writer of a new, empty store)."""
    return StoreWriter.create(url, **kw)


def append_patches(writer: StoreWriter, **kw: Any) -> tuple[int, int]:
    """:meth:`StoreWriter.append`: write and commit one granule."""
    return writer.append(**kw)


def write_stats(writer: StoreWriter, stats: BandStats) -> None:
    """:meth:`StoreWriter.write_stats`."""
    writer.write_stats(stats)


"""ENVI rasters (``.hdr`` + raw binary), via ``spectral``: the header, the band table, map info and row reads.

Guarantees:

- Header beside the data as ``X.hdr``, ``X.HDR``, ``X.img.hdr``; data as ``X`` or ``X`` + one of
  :data:`DATA_EXTS` in either case (``.img``, ``.BSQ``, ...). The data file must be exactly
  ``header offset + samples x lines x bands x itemsize`` bytes (else: truncated or wrong band count, naming
  ``bands``).
- BSQ, BIL and BIP; any ENVI numeric data type; byte order 0 and 1 (big-endian AVIRIS-Classic int16 reads
  right: ``spectral`` maps byte order onto the memmap's dtype).
- ``band_table`` gives nm: ``wavelength units`` Micrometers (or centres under 100 with no units) are converted,
  nanometres that look like micrometres, a ``wavelength`` list whose length is not ``bands``, an ``fwhm`` list of
  another length, duplicated centres are each a ProductError naming the header and the field
  (:func:`data_prep.registry.check_band_table`).
- ``grid`` from ``map info`` (+ ``coordinate system string``) with rotation, see :mod:`data_prep.formats.geo`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import spectral.io.envi as envi

from data_prep.formats._common import band_table, perr
from data_prep.formats.geo import Grid, parse_map_info

DATA_EXTS = ("", ".img", ".dat", ".bin", ".raw", ".bil", ".bsq", ".bip")
DTYPES = {1: np.uint8, 2: np.int16, 3: np.int32, 4: np.float32, 5: np.float64, 12: np.uint16, 13: np.uint32,
          14: np.int64, 15: np.uint64}


def header_path(path: Path) -> Path | None:
    """The .hdr of an ENVI raster given the header or the data file; None if there is none."""
    path = Path(path)
    if path.suffix.lower() == ".hdr":
        return path
    for cand in (path.with_name(path.name + ".hdr"), path.with_name(path.name + ".HDR"),
                 path.with_suffix(".hdr"), path.with_suffix(".HDR")):
        if cand != path and cand.is_file():
            return cand
    return None


def data_path(hdr: Path) -> Path:
    """The binary beside a header: ``X`` or ``X.<ext>`` (either case) for ``X.hdr``."""
    stem = hdr.with_suffix("")
    for ext in DATA_EXTS:
        for e in dict.fromkeys((ext, ext.upper())):
            cand = stem.with_name(stem.name + e)
            if cand.is_file() and cand != hdr:
                return cand
    raise perr(hdr, "data file", f"no binary data file beside the header (tried {stem.name}"
                                 f"{{{','.join(DATA_EXTS)}}} in either case)")


def read_header(hdr: Path) -> dict:
    try:
        return envi.read_envi_header(str(hdr))
    except Exception as e:  # spectral raises its own FileNotAnEnviHeader / parse errors
        raise perr(hdr, "header", f"not a readable ENVI header: {e}") from None


def header_int(h: dict, key: str, hdr: Path) -> int:
    try:
        return int(str(h[key]).strip())
    except KeyError:
        raise perr(hdr, key, "missing from the header") from None
    except ValueError:
        raise perr(hdr, key, f"{h[key]!r} is not an integer") from None


def header_floats(h: dict, key: str, hdr: Path) -> np.ndarray:
    try:
        vals = h[key]
        if isinstance(vals, str):
            vals = [v for v in vals.strip("{} ").split(",") if v.strip()]
        return np.asarray([float(v) for v in vals], dtype=np.float64)
    except ValueError as e:
        raise perr(hdr, key, f"not a list of numbers: {e}") from None


class EnviRaster:
    """An ENVI raster opened lazily: header checked, ``rows(r0, r1)`` -> stored values (bands, n, cols)."""

    def __init__(self, hdr: Path, data: Path | None = None):
        self.hdr = Path(hdr)
        self.header = h = read_header(self.hdr)
        self.data = Path(data) if data is not None else data_path(self.hdr)
        samples, lines, bands = (header_int(h, k, self.hdr) for k in ("samples", "lines", "bands"))
        code = header_int(h, "data type", self.hdr)
        if code not in DTYPES:
            raise perr(self.hdr, "data type", f"{code} is not a supported ENVI data type {sorted(DTYPES)}")
        offset = int(str(h.get("header offset", "0")).strip() or 0)
        itemsize = np.dtype(DTYPES[code]).itemsize
        expected = offset + samples * lines * bands * itemsize
        actual = os.path.getsize(self.data)
        if actual != expected:
            raise perr(self.hdr, "bands", f"header says {bands} bands x {lines} lines x {samples} samples x "
                                          f"{itemsize} bytes (+{offset} offset) = {expected} bytes, but "
                                          f"{self.data.name} has {actual} bytes (truncated or wrong band count)")
        interleave = str(h.get("interleave", "bsq")).strip().lower()
        if interleave not in ("bil", "bip", "bsq"):
            raise perr(self.hdr, "interleave", f"{interleave!r}; expected bil, bip or bsq")
        self.shape: tuple[int, int, int] = (bands, lines, samples)
        self.dtype = np.dtype(DTYPES[code])
        self.interleave = interleave
        nd = h.get("data ignore value")
        try:
            self.nodata = float(str(nd).strip()) if nd is not None and str(nd).strip() else None
        except ValueError:
            raise perr(self.hdr, "data ignore value", f"{nd!r} is not a number") from None
        self.grid: Grid | None = parse_map_info(self.hdr, h)

    @property
    def bands(self) -> int:
        return self.shape[0]

    def floats(self, key: str) -> np.ndarray | None:
        """A per-band numeric list of the header (None if absent); its length must be the band count."""
        if key not in self.header:
            return None
        v = header_floats(self.header, key, self.hdr)
        if v.size != self.bands:
            raise perr(self.hdr, key, f"{v.size} values for {self.bands} bands; expected one per band")
        return v

    def band_table(self, *, required: bool = True) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(centres nm, FWHM nm or None) from ``wavelength`` / ``fwhm`` / ``wavelength units``; (None, None) when
        the header has no wavelengths and ``required`` is False."""
        h = self.header
        if "wavelength" not in h:
            if required:
                raise perr(self.hdr, "wavelength", "missing from the header; band centres are required")
            return None, None
        wl = header_floats(h, "wavelength", self.hdr)
        fw = header_floats(h, "fwhm", self.hdr) if "fwhm" in h else None
        units = h.get("wavelength units")
        return band_table(self.hdr, wl, fw, units=None if units is None else str(units), n_bands=self.bands)

    def rows(self, r0: int, r1: int) -> np.ndarray:
        """(bands, r1 - r0, cols) stored values (native byte order)."""
        if not 0 <= r0 <= r1 <= self.shape[1]:
            raise IndexError(f"{self.data}: rows {r0}:{r1} outside 0:{self.shape[1]}")
        mm = envi.open(str(self.hdr), str(self.data)).open_memmap(interleave="bsq")
        return np.asarray(mm[:, r0:r1, :]).astype(self.dtype.newbyteorder("="), copy=False)


# ------------------------------------------------------------------ writer side
def write_raw(path: Path, blocks) -> None:
    """Write byte blocks to ``path`` atomically (temp file + rename)."""
    tmp = path.with_name(f".{path.name}.part-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            for b in blocks:
                f.write(np.ascontiguousarray(b).tobytes())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_header(path: Path, meta: dict) -> None:
    """Write an ENVI header atomically."""
    tmp = path.with_name(f".{path.name}.part-{os.getpid()}")
    try:
        envi.write_envi_header(str(tmp), meta)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


_INTERLEAVE_AXES = {"bsq": (0, 1, 2), "bil": (1, 0, 2), "bip": (1, 2, 0)}
_ENVI_CODE = {np.dtype(v).newbyteorder("=").str[1:]: k for k, v in DTYPES.items()}


def write_raster(out_dir: Path, stem: str, data: np.ndarray, meta: dict, *, interleave: str = "bil",
                 byte_order: int = 0) -> Path:
    """Write ``data`` (bands, rows, cols) of its own dtype as ``out_dir/stem`` + ``stem.hdr`` with ``meta`` added
    to the layout keys; returns the header path."""
    bands, rows, cols = data.shape
    dt = np.dtype(data.dtype).newbyteorder(">" if byte_order else "<")
    axes = _INTERLEAVE_AXES[interleave]
    step = max(1, (64 << 20) // max(1, bands * cols * dt.itemsize))
    if interleave == "bsq":
        blocks = (data[b].astype(dt) for b in range(bands))
    else:
        blocks = (data[:, r:r + step, :].transpose(axes).astype(dt) for r in range(0, rows, step))
    write_raw(out_dir / stem, blocks)
    hdr = out_dir / f"{stem}.hdr"
    write_header(hdr, {"samples": cols, "lines": rows, "bands": bands, "header offset": 0,
                       "file type": "ENVI Standard", "data type": _ENVI_CODE[np.dtype(data.dtype).str[1:]],
                       "interleave": interleave, "byte order": byte_order, **meta})
    return hdr

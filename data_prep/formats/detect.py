"""Which reader a path needs, from its name and its first bytes (no flag)."""

from __future__ import annotations

import re
from pathlib import Path

from data_prep.formats._common import perr

SPECTRAL_IMAGE = re.compile(r"-SPECTRAL_IMAGE\.TIFF?$", re.I)
METADATA = re.compile(r"-METADATA\.XML$", re.I)
FORMATS = ("envi", "emit-netcdf", "enmap-geotiff", "desis-geotiff", "geotiff")


def _magic(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(8)
    except OSError:
        return b""


def _is_tiff(path: Path) -> bool:
    return _magic(path)[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _xml_folder_kind(folder: Path) -> str | None:
    """enmap-geotiff / desis-geotiff for a folder holding a SPECTRAL_IMAGE tif and a METADATA xml."""
    try:
        names = [p.name for p in folder.iterdir()]
    except OSError:
        return None
    if not any(SPECTRAL_IMAGE.search(n) for n in names) or not any(METADATA.search(n) for n in names):
        return None
    tif = next(n for n in names if SPECTRAL_IMAGE.search(n))
    if tif.upper().startswith("ENMAP"):
        return "enmap-geotiff"
    if tif.upper().startswith("DESIS"):
        return "desis-geotiff"
    xml = folder / next(n for n in names if METADATA.search(n))
    try:
        import xml.etree.ElementTree as ET

        root = next(ET.iterparse(xml, events=("start",)))[1].tag
    except Exception:
        return None
    return "desis-geotiff" if root == "hsi_doc" else "enmap-geotiff"


def detect_format(path: str | Path) -> str:
    """One of :data:`FORMATS` for a product entry (file or product folder); ProductError if none fits."""
    p = Path(path)
    if not p.exists():
        raise perr(p, "path", "does not exist")
    if p.is_dir():
        kind = _xml_folder_kind(p)
        if kind:
            return kind
        raise perr(p, "format", "unknown format: a folder that is not an EnMAP/DESIS product (SPECTRAL_IMAGE + "
                                "METADATA); give a product file or use find_products to search it")
    if SPECTRAL_IMAGE.search(p.name) or METADATA.search(p.name):
        kind = _xml_folder_kind(p.parent)
        if kind:
            return kind
    if p.suffix.lower() == ".hdr" or p.with_name(p.name + ".hdr").exists() or (
            p.suffix and p.with_suffix(".hdr").exists() and p.suffix.lower() != ".hdr"):
        return "envi"
    magic = _magic(p)
    if magic.startswith(b"\x89HDF") or (p.suffix.lower() == ".nc" and magic.startswith(b"CDF")):
        return "emit-netcdf"
    if _is_tiff(p):
        return "geotiff"
    raise perr(p, "format", "unknown format: not an ENVI header/data pair, a NetCDF4/HDF5 file, a GeoTIFF or an "
                            "EnMAP/DESIS product folder (expected one of " + ", ".join(FORMATS) + ")")

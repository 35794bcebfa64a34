"""Sensor product formats: one reader and one writer per format, chosen by detection (no flag).

- ENVI (``.hdr`` + binary; AVIRIS-Classic, AVIRIS-NG, AVIRIS-3) -- :mod:`.envi`
- EMIT L2A/L1B NetCDF4 -- :mod:`.emit`
- EnMAP L2A/L1B (SPECTRAL_IMAGE GeoTIFF + METADATA.XML) -- :mod:`.enmap`
- DESIS L2A/L1C (SPECTRAL_IMAGE GeoTIFF + METADATA.xml) -- :mod:`.desis`
- PlanetScope SuperDove / Sentinel-2 L2 GeoTIFF -- :mod:`.multispectral`

``open_product(path)`` returns a lazy :class:`data_prep.granule.Granule`; ``write_product(...)`` writes
what the matching reader expects, with mission-style names; ``find_products(paths)`` expands folders.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np

from data_prep.formats._common import perr
from data_prep.formats.desis import open_desis, write_desis
from data_prep.formats.detect import FORMATS, METADATA, SPECTRAL_IMAGE, _xml_folder_kind, detect_format
from data_prep.formats.emit import open_emit, write_emit
from data_prep.formats.enmap import open_enmap, write_enmap
from data_prep.formats.envi import header_path, is_sidecar, open_envi, write_envi
from data_prep.formats.multispectral import open_multispectral, write_multispectral
from data_prep.granule import Granule, ProductError
from data_prep.registry import get_sensor

__all__ = ["FORMATS", "ProductError", "detect_format", "find_products", "open_product", "write_product"]

READERS = {"envi": open_envi, "emit-netcdf": open_emit, "enmap-geotiff": open_enmap,
           "desis-geotiff": open_desis, "geotiff": open_multispectral}
WRITERS = {"envi": write_envi, "emit-netcdf": write_emit, "enmap-geotiff": write_enmap,
           "desis-geotiff": write_desis, "geotiff": write_multispectral}


def open_product(path: str | Path) -> Granule:
    """Open a product (headers only) with the reader its format needs; ProductError names file and field."""
    return READERS[detect_format(path)](Path(path))


def find_products(paths: list[str | Path]) -> list[Path]:
    """Product entries under ``paths`` (recursively): ENVI ``.hdr`` (not loc/obs/igm/glt sidecars), EMIT ``.nc``,
    EnMAP/DESIS product folders, multispectral ``.tif``. Files given directly are kept if they are products.
    A path that does not exist is a ProductError."""
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise perr(p, "path", "input does not exist")
        if p.is_file():
            e = _entry_of_file(p, explicit=True)
            if e is not None:
                out.append(e)
            continue
        _walk(p, out)
    seen: set[Path] = set()
    uniq = []
    for e in out:
        if e not in seen:
            seen.add(e)
            uniq.append(e)
    return uniq


def _walk(folder: Path, out: list[Path]) -> None:
    if _xml_folder_kind(folder):
        out.append(folder)
        return
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_dir():
            _walk(p, out)
        elif p.is_file():
            e = _entry_of_file(p, explicit=False)
            if e is not None:
                out.append(e)


def _entry_of_file(p: Path, *, explicit: bool) -> Path | None:
    name, suf = p.name, p.suffix.lower()
    if SPECTRAL_IMAGE.search(name) or METADATA.search(name):
        return p.parent if _xml_folder_kind(p.parent) else (p if explicit else None)
    if suf == ".hdr":
        return None if is_sidecar(p.stem) and not explicit else p
    hdr = header_path(p) if suf not in (".nc", ".tif", ".tiff", ".npz", ".json", ".xml") else None
    if hdr is not None:
        return hdr if explicit else None  # when walking, found through its .hdr
    if suf == ".nc":
        return p
    if suf in (".tif", ".tiff"):
        return p
    return p if explicit else None


def write_product(out_dir: str | Path, *, sensor: str, level: str, cube: np.ndarray, name: str | None = None,
                  lat: np.ndarray | None = None, lon: np.ndarray | None = None, time: dt.datetime | None = None,
                  wavelengths_nm: np.ndarray | None = None, fwhm_nm: np.ndarray | None = None,
                  gsd_m: float | None = None) -> Path:
    """Write ``cube`` (float32 (bands, rows, cols), physical units, NaN = nodata) in ``sensor``'s own format.

    Returns the entry path that :func:`open_product` accepts (ENVI .hdr, EMIT .nc, EnMAP/DESIS product
    folder, multispectral .tif). ``name`` replaces the mission-style stem; ``lat``/``lon`` (rows, cols)
    become the format's geolocation (ENVI ``_loc`` file, EMIT location group + GLT, GeoTIFF
    geotransform fitted to them); ``time`` (UTC) goes into the name and metadata.
    """
    s = get_sensor(sensor)
    s.level(level)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cube = np.asarray(cube, dtype=np.float32)
    if cube.ndim != 3:
        raise ValueError(f"cube must be (bands, rows, cols), got shape {cube.shape}")
    from data_prep.formats._common import check_latlon

    lat, lon = check_latlon(out, lat, lon, cube.shape[1], cube.shape[2])
    if s.format not in WRITERS:
        raise ValueError(f"sensor {sensor!r} has format {s.format!r}; writers exist for {sorted(WRITERS)}")
    return WRITERS[s.format](out, sensor=s, level=level, cube=cube, name=name, lat=lat, lon=lon, time=time,
                             wavelengths_nm=wavelengths_nm, fwhm_nm=fwhm_nm, gsd_m=gsd_m)

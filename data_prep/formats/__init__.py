"""Sensor product formats: one reader (and one writer, the simulator's) per product kind, chosen by detection.

- ENVI (``.hdr`` + binary) of AVIRIS-Classic, AVIRIS-NG and AVIRIS-3 as the JPL portals deliver them -- :mod:`.aviris`
  (ENVI rasters: :mod:`.envi`)
- AVIRIS-3 / AVIRIS-NG facility NetCDF from the ORNL DAAC -- :mod:`.aviris_nc`
- EMIT L2A RFL / L1B RAD NetCDF4 (with RFLUNCERT, MASK, OBS sidecars) -- :mod:`.emit`
- EnMAP L2A (SPECTRAL_IMAGE GeoTIFF/COG/ENVI + METADATA.XML) -- :mod:`.enmap`
- DESIS L2A/L1C (SPECTRAL_IMAGE GeoTIFF + .hdr + METADATA.xml) -- :mod:`.desis`
- PlanetScope SuperDove / Sentinel-2 L2 GeoTIFF -- :mod:`.multispectral`
- Landsat 8/9 OLI Collection 2 Level-2 (per-band SR GeoTIFFs + MTL.txt) -- :mod:`.landsat`

``open_product(path)`` returns a lazy :class:`data_prep.granule.Granule`; ``discover(paths)`` (a context: archives
unpacked while it is open) and ``find_products(paths)`` expand folders as downloaded into product entries and
sidecars (:mod:`.detect`); ``write_product(...)`` writes what the real product looks like, with mission names.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np

from data_prep.formats._common import check_latlon
from data_prep.formats.aviris import open_envi, write_envi
from data_prep.formats.aviris_nc import open_aviris_nc
from data_prep.formats.desis import open_desis, write_desis
from data_prep.formats.detect import FORMATS, Discovery, detect_format, discover, find_products
from data_prep.formats.emit import open_emit, write_emit
from data_prep.formats.enmap import open_enmap, write_enmap
from data_prep.formats.landsat import open_landsat, write_landsat
from data_prep.formats.multispectral import open_multispectral, write_multispectral
from data_prep.granule import Granule, ProductError
from data_prep.registry import get_sensor

__all__ = ["FORMATS", "Discovery", "ProductError", "detect_format", "discover", "find_products", "open_product",
           "write_product"]

READERS = {"envi": open_envi, "emit-netcdf": open_emit, "aviris-netcdf": open_aviris_nc,
           "enmap-geotiff": open_enmap, "desis-geotiff": open_desis, "geotiff": open_multispectral,
           "landsat-geotiff": open_landsat}
WRITERS = {"envi": write_envi, "emit-netcdf": write_emit, "enmap-geotiff": write_enmap,
           "desis-geotiff": write_desis, "geotiff": write_multispectral,
           "landsat-geotiff": write_landsat}


def open_product(path: str | Path, fmt: str | None = None) -> Granule:
    """Open a product (headers only) with the reader its format needs (``fmt``: as :func:`discover` found it);
    ProductError names file and field."""
    return READERS[fmt or detect_format(path)](Path(path))


def write_product(out_dir: str | Path, *, sensor: str, level: str, cube: np.ndarray, name: str | None = None,
                  lat: np.ndarray | None = None, lon: np.ndarray | None = None, time: dt.datetime | None = None,
                  wavelengths_nm: np.ndarray | None = None, fwhm_nm: np.ndarray | None = None,
                  gsd_m: float | None = None) -> Path:
    """Write ``cube`` (float32 (bands, rows, cols), physical units, NaN = nodata) as ``sensor``'s real product.

    Returns the entry :func:`open_product` accepts (ENVI .hdr, EMIT .nc, the EnMAP/DESIS SPECTRAL_IMAGE,
    multispectral .tif); sidecars are written beside it. ``name`` replaces the mission-style stem; ``lat``/``lon``
    (rows, cols) become the format's geolocation (ENVI ``loc`` file or rotated UTM ``map info``, EMIT location group
    + GLT, UTM GeoTIFF grid fitted to them); ``time`` (UTC) goes into the name and metadata.
    """
    s = get_sensor(sensor)
    s.level(level)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cube = np.asarray(cube, dtype=np.float32)
    if cube.ndim != 3:
        raise ValueError(f"cube must be (bands, rows, cols), got shape {cube.shape}")
    lat, lon = check_latlon(out, lat, lon, cube.shape[1], cube.shape[2])
    if s.format not in WRITERS:
        raise ValueError(f"sensor {sensor!r} has format {s.format!r}; writers exist for {sorted(WRITERS)}")
    return WRITERS[s.format](out, sensor=s, level=level, cube=cube, name=name, lat=lat, lon=lon, time=time,
                             wavelengths_nm=wavelengths_nm, fwhm_nm=fwhm_nm, gsd_m=gsd_m)

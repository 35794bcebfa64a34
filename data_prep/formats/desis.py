"""DESIS L2A reflectance / L1C radiance as DLR/Teledyne deliver it.

Files ``<prefix>-SPECTRAL_IMAGE.tif`` (int16, pixel-interleaved ("band interleaved by pixel") and compressed;
L2A reflectance x 10000), ``<prefix>-SPECTRAL_IMAGE.hdr`` (ENVI header of the TIFF: ``wavelength``, ``fwhm``,
``data gain values``, ``data offset values``, ``data ignore value``), ``<prefix>-METADATA.xml`` (root ``hsi_doc``,
``specific/bandCharacterisation/band/`` ``bandNumber``, ``wavelengthCenterOfBand``, ``wavelengthWidthOfBand``,
``gainOfBand``, ``offsetOfBand``), ``-HISTORY.xml``, ``-QL_IMAGE.tif``, ``-QL_QUALITY.tif``,
``-QL_QUALITY-2.tif``, with ``<prefix>`` = ``DESIS-HSI-L2A-DT1203190212_025-20191203T021128-V0210``. Several tiles
may share one folder: each is its own granule. The grid is projected (UTM). UNVERIFIED: the codec (deflate
written here), the nodata value (-32768) and whether GDAL_NODATA is set (the .hdr's ``data ignore value`` is used
when it is not).
"""

from __future__ import annotations

import datetime as dt
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from data_prep.formats._geotiff import write_geotiff
from data_prep.formats._xmltif import (
    XmlLayout,
    band_xml,
    open_product_files,
    prepare,
    quantise,
    tiny_tif,
    utm_grid,
    write_files,
    xml_bytes,
)
from data_prep.formats.envi import write_header
from data_prep.granule import Granule
from data_prep.registry import Sensor

NAME = re.compile(r"^DESIS-HSI-(?P<lev>L1B|L1C|L2A)-DT(?P<dt>\d{10})_\d{3}-(?P<time>\d{8}T\d{6})-V\d{4}")
LAYOUT = XmlLayout(sensor="desis", format="desis-geotiff", root="hsi_doc", band="specific/bandCharacterisation/band",
                   number="bandNumber", centre="wavelengthCenterOfBand", width="wavelengthWidthOfBand",
                   gain="gainOfBand", offset="offsetOfBand", detectors=1)


def open_desis(path: str | Path) -> Granule:
    return open_product_files(Path(path), LAYOUT, NAME)


def product_name(level: str, t: dt.datetime) -> str:
    lev = "L2A" if level == "L2" else "L1C"
    datatake = int(t.timestamp()) // 60 % 10**10
    return f"DESIS-HSI-{lev}-DT{datatake:010d}_001-{t:%Y%m%dT%H%M%S}-V0213"


def write_desis(out_dir: Path, *, sensor: Sensor, level: str, cube, name=None, lat=None, lon=None, time=None,
                wavelengths_nm=None, fwhm_nm=None, gsd_m=None) -> Path:
    """A tile's files written flat into ``out_dir`` (several tiles may share it): a pixel-interleaved
    deflate-compressed GeoTIFF on a UTM grid with its ENVI .hdr, the XML, HISTORY and QL files; returns the
    SPECTRAL_IMAGE."""
    cube, wl, fw, t, spec = prepare(sensor, level, cube, wavelengths_nm, fwhm_nm, time)
    nodata = int(spec.nodata)
    dn, gain, offset = quantise(cube, spec, nodata)
    grid = utm_grid(lat, lon)
    prefix = name or product_name(level, t)
    lev = "L2A" if level == "L2" else "L1C"
    root = band_xml(LAYOUT.root, LAYOUT, t=t, wl=wl, fw=fw, gain=gain, offset=offset,
                    base_fields={"format": f"DESIS_{lev}", "level": lev, "mission": "DESIS"})
    for b in root.iterfind(LAYOUT.band):
        ET.SubElement(b, "deadPixels").text = "0"
        ET.SubElement(b, "suspiciousPixel").text = "0"
    bands, rows, cols = dn.shape
    hdr = {"description": f"{prefix}-SPECTRAL_IMAGE", "samples": cols, "lines": rows, "bands": bands,
           "header offset": 0, "file type": "TIFF", "data type": 2, "interleave": "bip", "byte order": 0,
           "wavelength units": "Nanometers", "wavelength": [f"{w:.3f}" for w in wl],
           "fwhm": [f"{w:.3f}" for w in fw], "data gain values": [f"{g:.10g}" for g in gain],
           "data offset values": [f"{o:.10g}" for o in offset], "data ignore value": str(nodata)}
    valid = (dn != nodata).any(axis=0)
    ql = np.where(valid, 255, 0).astype(np.uint8)
    files = {f"{prefix}-SPECTRAL_IMAGE.tif": lambda p: write_geotiff(p, dn, nodata=None, grid=grid,
                                                                     interleave="pixel", compression="zlib",
                                                                     rowsperstrip=1),
             f"{prefix}-SPECTRAL_IMAGE.hdr": lambda p: write_header(p, hdr),
             f"{prefix}-METADATA.xml": xml_bytes(root),
             f"{prefix}-HISTORY.xml": b'<?xml version="1.0" encoding="UTF-8"?>\n<history/>\n',
             f"{prefix}-QL_IMAGE.tif": tiny_tif(np.stack([ql, ql, ql]), grid),
             f"{prefix}-QL_QUALITY.tif": tiny_tif(ql[None], grid),
             f"{prefix}-QL_QUALITY-2.tif": tiny_tif(ql[None], grid)}
    write_files(out_dir, files)
    return out_dir / f"{prefix}-SPECTRAL_IMAGE.tif"

"""EnMAP L2A reflectance (and the simulator's L1 radiance) as DLR delivers it.

A product is ``<prefix>-METADATA.XML`` plus ``<prefix>-SPECTRAL_IMAGE`` in the format the user ordered: GeoTIFF
(``.TIF``, ``.TIFF``, ``.GEOTIFF``, EOLab's ``_COG.TIF``; band- or pixel-interleaved, compressed or not) or ENVI
(``.BSQ``/``.BIL``/``.BIP`` with ``.HDR``), in a folder
``ENMAP01-____L2A-DT0000051064_20231121T023506Z_013_V010402_20240408T193411Z/`` (zipped as ``.ZIP`` by DLR);
beside it ``-QL_PIXELMASK``, ``-QL_QUALITY_*``, ``-QL_VNIR``, ``-QL_SWIR`` and ``-HISTORY.XML`` (sidecars).

XML (DLR's L2A format, as GFZ EnPT writes and EnMAP-Box reads it): root ``level_X``;
``specific/bandCharacterisation/bandID[@number]/`` ``wavelengthCenterOfBand``, ``FWHMOfBand``, ``GainOfBand``
(1e-4 for L2A), ``OffsetOfBand``; ``product/ortho/{projection,resolution}``; ``product/bandStatistics/bandID``
``{wavelength, mean, stdDeviation}``. Nodata -32768. Bands sorted by wavelength (VNIR and SWIR interleave); about
six bands in 1320-1470 nm are filled with nodata (found per granule, see :mod:`._xmltif`). UTM grid.

Simplification (documented): the L1 variant the simulator writes is one SPECTRAL_IMAGE like L2A; real L1B splits
VNIR and SWIR in sensor geometry, which :func:`._xmltif.group_files` reports as unsupported.
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
    write_folder,
    xml_bytes,
)
from data_prep.granule import Granule
from data_prep.registry import Sensor

NAME = re.compile(r"^ENMAP01-_{4}(?P<lev>L1B|L1C|L2A)-DT(?P<dt>\d{10})_(?P<time>\d{8}T\d{6})Z_\d{3}_V\d{6}_\d{8}T\d{6}Z")
LAYOUT = XmlLayout(sensor="enmap", format="enmap-geotiff", root="level_X", band="specific/bandCharacterisation/bandID",
                   number="@number", centre="wavelengthCenterOfBand", width="FWHMOfBand", gain="GainOfBand",
                   offset="OffsetOfBand", detectors=2)
#: the simulator fills the bands with centres in this window (nm) with nodata, as DLR fills about six there
NODATA_WINDOW_NM = (1325.0, 1400.0)


def open_enmap(path: str | Path) -> Granule:
    return open_product_files(Path(path), LAYOUT, NAME)


def product_name(level: str, t: dt.datetime) -> str:
    lev = "L2A" if level == "L2" else "L1B"
    datatake = int(t.timestamp()) // 60 % 10**10
    proc = t + dt.timedelta(days=1)
    return f"ENMAP01-____{lev}-DT{datatake:010d}_{t:%Y%m%dT%H%M%S}Z_001_V010402_{proc:%Y%m%dT%H%M%S}Z"


def write_enmap(out_dir: Path, *, sensor: Sensor, level: str, cube, name=None, lat=None, lon=None, time=None,
                wavelengths_nm=None, fwhm_nm=None, gsd_m=None) -> Path:
    """The product folder as unzipped from DLR: sorted bands, L2A no-data bands filled with -32768, a
    pixel-interleaved GeoTIFF on a UTM grid, QL files and HISTORY.XML; returns the SPECTRAL_IMAGE."""
    cube, wl, fw, t, spec = prepare(sensor, level, cube, wavelengths_nm, fwhm_nm, time)
    order = np.argsort(wl, kind="stable")
    cube, wl, fw = cube[order], wl[order], fw[order]
    nodata = int(spec.nodata)
    fill = np.zeros(wl.size, dtype=bool)
    if level == "L2":
        fill = (wl >= NODATA_WINDOW_NM[0]) & (wl <= NODATA_WINDOW_NM[1])
    dn, gain, offset = quantise(cube, spec, nodata)
    dn[fill] = nodata
    grid = utm_grid(lat, lon)
    prefix = name or product_name(level, t)
    lev = "L2A" if level == "L2" else "L1B"
    extra = {"base/format": f"ENMAP_{lev}", "base/level": lev,
             "product/ortho/projection": f"UTM_Zone_{grid.crs.utm_zone}" if grid is not None else "",
             "product/ortho/resolution": f"{float(gsd_m or sensor.gsd_m):g}"}
    root = band_xml(LAYOUT.root, LAYOUT, t=t, wl=wl, fw=fw, gain=gain, offset=offset,
                    base_fields={"mission": "ENMAP"}, extra=extra)
    stats = ET.SubElement(root.find("product"), "bandStatistics")
    for i in range(wl.size):
        b = ET.SubElement(stats, "bandID", {"number": str(i + 1)})
        ok = dn[i] != nodata
        phys = dn[i][ok].astype(np.float64) * gain[i] + offset[i]
        ET.SubElement(b, "wavelength").text = f"{wl[i]:.3f}"
        ET.SubElement(b, "mean").text = f"{phys.mean():.6g}" if phys.size else "-1000000"
        ET.SubElement(b, "stdDeviation").text = f"{phys.std():.6g}" if phys.size else "0"
    valid = (dn != nodata).any(axis=0)
    ql = np.where(valid, 255, 0).astype(np.uint8)[None]
    files = {f"{prefix}-SPECTRAL_IMAGE.TIF": lambda p: write_geotiff(p, dn, nodata=nodata, grid=grid,
                                                                     interleave="pixel"),
             f"{prefix}-METADATA.XML": xml_bytes(root),
             f"{prefix}-HISTORY.XML": b'<?xml version="1.0" encoding="UTF-8"?>\n<history/>\n'}
    for q in ("QL_PIXELMASK", "QL_QUALITY_CLOUD", "QL_QUALITY_CLOUDSHADOW", "QL_QUALITY_HAZE", "QL_QUALITY_SNOW",
              "QL_QUALITY_CIRRUS", "QL_QUALITY_TESTFLAGS", "QL_VNIR", "QL_SWIR"):
        files[f"{prefix}-{q}.TIF"] = tiny_tif(ql if q != "QL_PIXELMASK" else 255 - ql, grid)
    write_folder(out_dir / prefix, files)
    return out_dir / prefix / f"{prefix}-SPECTRAL_IMAGE.TIF"

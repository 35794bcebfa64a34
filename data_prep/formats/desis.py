"""DESIS L2A reflectance / L1C radiance: a product folder ``DESIS-HSI-L2A-DT0000001234_001-20230405T123456-V0213/``
holding ``<folder>-SPECTRAL_IMAGE.tif`` (int16, band-sequential GeoTIFF; L2A reflectance x 10000) and
``<folder>-METADATA.xml`` (root ``hsi_doc``, ``specific/bandCharacterisation/band/`` with ``bandNumber``,
``wavelengthCenterOfBand``, ``wavelengthWidthOfBand``, ``gainOfBand``, ``offsetOfBand``; physical = DN x gain +
offset). The GeoTIFF grid is EPSG:4326 (real products are UTM).
"""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

from data_prep.formats._common import parse_time, perr, utc
from data_prep.formats._xmltif import XmlLayout, open_xmltif, write_xmltif
from data_prep.granule import Granule
from data_prep.registry import Sensor

NAME = re.compile(r"^DESIS-HSI-(?P<lev>L1B|L1C|L2A)-DT(?P<dt>\d{10})_\d{3}-(?P<time>\d{8}T\d{6})-V\d{4}")
LAYOUT = XmlLayout(sensor="desis", format="desis-geotiff", root="hsi_doc", band="specific/bandCharacterisation/band",
                   number="bandNumber", centre="wavelengthCenterOfBand", width="wavelengthWidthOfBand",
                   gain="gainOfBand", offset="offsetOfBand")


def find_files(entry: Path) -> tuple[Path, Path, Path]:
    entry = Path(entry)
    folder = entry if entry.is_dir() else entry.parent
    tifs = sorted(p for p in folder.iterdir() if re.search(r"-SPECTRAL_IMAGE\.TIF{1,2}$", p.name, re.I))
    if entry.is_file() and entry in tifs:
        tifs = [entry]
    if not tifs:
        raise perr(folder, "SPECTRAL_IMAGE", "no ...-SPECTRAL_IMAGE.tif in the product folder")
    prefix = tifs[0].name.rsplit("-SPECTRAL_IMAGE", 1)[0]
    xmls = sorted(p for p in folder.iterdir() if p.name.upper() == f"{prefix}-METADATA.XML".upper())
    xmls = xmls or sorted(p for p in folder.iterdir() if re.search(r"-METADATA\.XML$", p.name, re.I))
    if not xmls:
        raise perr(folder, "METADATA", f"no {prefix}-METADATA.xml beside the image")
    return folder, tifs[0], xmls[0]


def open_desis(path: str | Path) -> Granule:
    folder, tif, xml = find_files(Path(path))
    prefix = tif.name.rsplit("-SPECTRAL_IMAGE", 1)[0]
    m = NAME.match(prefix)
    if m:
        level = "L2" if m["lev"] == "L2A" else "L1"
        t = parse_time(m["time"])
    else:
        import xml.etree.ElementTree as ET

        lev = (ET.parse(xml).getroot().findtext("base/level") or "").strip().upper()
        if lev[:2] not in ("L1", "L2"):
            raise perr(xml, "base/level", f"{lev!r}; expected L1C or L2A (and the name says nothing)")
        level, t = lev[:2], None
    return open_xmltif(tif, xml, level, LAYOUT, granule_id=prefix, entry=folder if Path(path).is_dir() else tif,
                       t_name=t)


def product_name(level: str, t: dt.datetime) -> str:
    lev = "L2A" if level == "L2" else "L1C"
    datatake = int(t.timestamp()) // 60 % 10**10
    return f"DESIS-HSI-{lev}-DT{datatake:010d}_001-{t:%Y%m%dT%H%M%S}-V0213"


def write_desis(out_dir: Path, *, sensor: Sensor, level: str, cube, name=None, lat=None, lon=None, time=None,
                wavelengths_nm=None, fwhm_nm=None, gsd_m=None) -> Path:
    t = utc(time)
    prefix = name or product_name(level, t)
    lev = "L2A" if level == "L2" else "L1C"
    return write_xmltif(out_dir, prefix, f"{prefix}-SPECTRAL_IMAGE.tif", f"{prefix}-METADATA.xml", LAYOUT,
                        sensor=sensor, level=level, cube=cube, lat=lat, lon=lon, time=t,
                        wavelengths_nm=wavelengths_nm, fwhm_nm=fwhm_nm, gsd_m=gsd_m,
                        base_fields={"format": f"DESIS_{lev}", "level": lev, "mission": "DESIS"})

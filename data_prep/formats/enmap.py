"""EnMAP L2A reflectance / L1B radiance: a product folder
``ENMAP01-____L2A-DT0000001234_20230405T123456Z_001_V010303_20230406T000000Z/`` holding
``<folder>-SPECTRAL_IMAGE.TIF`` (int16, band-sequential GeoTIFF; L2A reflectance x 10000) and
``<folder>-METADATA.XML`` with ``specific/bandCharacterisation/bandID[@number]/`` ``wavelengthCenterOfBand``,
``FWHMOfBand``, ``GainOfBand``, ``OffsetOfBand`` (physical = DN x gain + offset).

Simplifications (documented): the L1B variant is written as one SPECTRAL_IMAGE (real L1B splits VNIR
and SWIR), and the GeoTIFF grid is EPSG:4326 (real products are UTM).
"""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

from data_prep.formats._common import parse_time, perr, utc
from data_prep.formats._xmltif import XmlLayout, open_xmltif, write_xmltif
from data_prep.granule import Granule
from data_prep.registry import Sensor

NAME = re.compile(r"^ENMAP01-_{4}(?P<lev>L1B|L1C|L2A)-DT(?P<dt>\d{10})_(?P<time>\d{8}T\d{6})Z_\d{3}_V\d{6}_\d{8}T\d{6}Z")
LAYOUT = XmlLayout(sensor="enmap", format="enmap-geotiff", root="level_X", band="specific/bandCharacterisation/bandID",
                   number="@number", centre="wavelengthCenterOfBand", width="FWHMOfBand", gain="GainOfBand",
                   offset="OffsetOfBand")


def find_files(entry: Path) -> tuple[Path, Path, Path]:
    """(folder, image, metadata) of an EnMAP product given the folder, the image or the metadata file."""
    entry = Path(entry)
    folder = entry if entry.is_dir() else entry.parent
    tifs = sorted(p for p in folder.iterdir() if re.search(r"-SPECTRAL_IMAGE\.TIF{1,2}$", p.name, re.I))
    xmls = sorted(p for p in folder.iterdir() if re.search(r"-METADATA\.XML$", p.name, re.I))
    if entry.is_file() and entry in tifs:
        tifs = [entry]
    if not tifs:
        raise perr(folder, "SPECTRAL_IMAGE", "no ...-SPECTRAL_IMAGE.TIF in the product folder")
    if not xmls:
        raise perr(folder, "METADATA", "no ...-METADATA.XML in the product folder")
    return folder, tifs[0], xmls[0]


def open_enmap(path: str | Path) -> Granule:
    folder, tif, xml = find_files(Path(path))
    m = NAME.match(tif.name) or NAME.match(folder.name)
    if m:
        level = "L2" if m["lev"] == "L2A" else "L1"
        t = parse_time(m["time"])
    else:
        import xml.etree.ElementTree as ET

        lev = (ET.parse(xml).getroot().findtext("base/level") or "").strip().upper()
        if lev[:2] not in ("L1", "L2"):
            raise perr(xml, "base/level", f"{lev!r}; expected L1B or L2A (and the name says nothing)")
        level, t = lev[:2], None
    gid = folder.name if m and NAME.match(folder.name) else tif.name.rsplit("-SPECTRAL_IMAGE", 1)[0]
    return open_xmltif(tif, xml, level, LAYOUT, granule_id=gid, entry=folder if Path(path).is_dir() else tif,
                       t_name=t)


def product_name(level: str, t: dt.datetime) -> str:
    lev = "L2A" if level == "L2" else "L1B"
    datatake = int(t.timestamp()) // 60 % 10**10
    proc = t + dt.timedelta(days=1)
    return f"ENMAP01-____{lev}-DT{datatake:010d}_{t:%Y%m%dT%H%M%S}Z_001_V010303_{proc:%Y%m%dT%H%M%S}Z"


def write_enmap(out_dir: Path, *, sensor: Sensor, level: str, cube, name=None, lat=None, lon=None, time=None,
                wavelengths_nm=None, fwhm_nm=None, gsd_m=None) -> Path:
    t = utc(time)
    prefix = name or product_name(level, t)
    lev = "L2A" if level == "L2" else "L1B"
    return write_xmltif(out_dir, prefix, f"{prefix}-SPECTRAL_IMAGE.TIF", f"{prefix}-METADATA.XML", LAYOUT,
                        sensor=sensor, level=level, cube=cube, lat=lat, lon=lon, time=t,
                        wavelengths_nm=wavelengths_nm, fwhm_nm=fwhm_nm, gsd_m=gsd_m,
                        base_fields={"format": f"ENMAP_{lev}", "level": lev, "mission": "ENMAP"})

"""What EnMAP and DESIS share: a band-sequential integer SPECTRAL_IMAGE GeoTIFF plus a METADATA XML whose
band characterisation gives each band's centre, width, gain and offset (physical = DN x gain + offset)."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_prep.formats._common import (
    affine_from_latlon,
    check_band_table,
    check_increasing,
    latlon_from_affine,
    level_spec_or_error,
    parse_time,
    perr,
    prepare_cube,
    sensor_or_error,
    utc,
    valid_mask,
)
from data_prep.formats._geotiff import GeoTiff, write_geotiff
from data_prep.granule import Granule
from data_prep.registry import Sensor

INT16_MAX = 32767


@dataclass(frozen=True)
class XmlLayout:
    """Element names of one mission's METADATA XML."""

    sensor: str
    format: str
    root: str
    band: str  # path below the root to the band elements
    number: str  # "@number" (attribute) or a child element name
    centre: str
    width: str
    gain: str
    offset: str
    start_time: str = "base/temporalCoverage/startTime"


def _text(el: ET.Element, child: str, xml: Path, where: str) -> float:
    c = el.find(child)
    if c is None or c.text is None or not c.text.strip():
        raise perr(xml, f"{where}/{child}", "missing")
    try:
        return float(c.text)
    except ValueError:
        raise perr(xml, f"{where}/{child}", f"{c.text!r} is not a number") from None


def read_band_table(xml: Path, lay: XmlLayout) -> tuple[ET.Element, np.ndarray]:
    """(root, table (n, 4) of centre, width, gain, offset ordered by band number)."""
    try:
        root = ET.parse(xml).getroot()
    except (ET.ParseError, OSError) as e:
        raise perr(xml, "xml", f"not readable XML: {e}") from None
    bands = root.findall(lay.band)
    if not bands:
        raise perr(xml, lay.band, f"no band elements (expected one {lay.band} per band)")
    rows = []
    for i, b in enumerate(bands):
        num_s = b.get(lay.number[1:]) if lay.number.startswith("@") else (b.findtext(lay.number) or None)
        where = f"{lay.band}[{i + 1}]"
        try:
            num = int(str(num_s).strip())
        except ValueError:
            raise perr(xml, f"{where}/{lay.number}", f"{num_s!r} is not a band number") from None
        where = f"{lay.band}[{lay.number}={num}]"
        rows.append((num, _text(b, lay.centre, xml, where), _text(b, lay.width, xml, where),
                     _text(b, lay.gain, xml, where), _text(b, lay.offset, xml, where)))
    rows.sort()
    nums = [r[0] for r in rows]
    if nums != list(range(1, len(rows) + 1)):
        raise perr(xml, f"{lay.band}/{lay.number}", f"band numbers {nums[:5]}...; expected 1..{len(rows)} once each")
    return root, np.asarray([r[1:] for r in rows], dtype=np.float64)


def open_xmltif(tif: Path, xml: Path, level: str, lay: XmlLayout, *, granule_id: str, entry: Path,
                t_name: dt.datetime | None) -> Granule:
    root, table = read_band_table(xml, lay)
    img = GeoTiff(tif)
    bands, rows, cols = img.shape
    if table.shape[0] != bands:
        raise perr(xml, lay.band, f"{table.shape[0]} bands described but {tif.name} has {bands}")
    wl, fw = check_band_table(xml, table[:, 0], table[:, 1], field=f"{lay.band}/{lay.centre}",
                              fwhm_field=f"{lay.band}/{lay.width}")
    gain = table[:, 2].astype(np.float32)[:, None, None]
    offset = table[:, 3].astype(np.float32)[:, None, None]
    if not (np.isfinite(gain).all() and np.isfinite(offset).all()):
        raise perr(xml, f"{lay.band}/{lay.gain}", "gain/offset must be finite")
    sensor: Sensor = sensor_or_error(xml, lay.sensor)
    check_increasing(xml, wl, sensor, f"{lay.band}/{lay.centre}")
    spec = level_spec_or_error(xml, sensor, level)
    nodata = img.nodata if img.nodata is not None else spec.nodata
    t = parse_time(root.findtext(lay.start_time) or "") or t_name
    gsd = sensor.gsd_m
    g = root.findtext("specific/groundSampleDistance")
    if g:
        try:
            gsd = float(g)
        except ValueError:
            raise perr(xml, "specific/groundSampleDistance", f"{g!r} is not a number") from None
    lat = lon = None
    if img.geotransform is not None:
        lat, lon = latlon_from_affine(img.geotransform, rows, cols)
    good = sensor.good_band_mask(wl)

    def read_rows(r0: int, r1: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= r0 <= r1 <= rows:
            raise IndexError(f"{tif}: rows {r0}:{r1} outside 0:{rows}")
        raw = img.rows(r0, r1)
        cube = raw.astype(np.float32) * gain + offset
        cube[raw == nodata] = np.nan
        return cube, valid_mask(cube, good)

    return Granule(path=str(entry), granule_id=granule_id, sensor=sensor.name, level=level,
                   shape=(bands, rows, cols), wavelengths_nm=wl, fwhm_nm=fw, good_bands=good, read_rows=read_rows,
                   gsd_m=gsd, acquisition_time=t, lat=lat, lon=lon,
                   extra={"format": lay.format, "image": str(tif), "metadata": str(xml), "nodata": nodata})


def _sub(parent: ET.Element, tag: str, text=None, **attrs) -> ET.Element:
    el = ET.SubElement(parent, tag, {k: str(v) for k, v in attrs.items()})
    if text is not None:
        el.text = str(text)
    return el


def write_xmltif(out_dir: Path, prefix: str, tif_name: str, xml_name: str, lay: XmlLayout, *, sensor: Sensor,
                 level: str, cube, lat, lon, time, wavelengths_nm, fwhm_nm, gsd_m, base_fields: dict) -> Path:
    """Write the product folder ``out_dir/prefix/`` atomically; returns the folder."""
    spec = sensor.level(level)
    cube, wl, fw = prepare_cube(cube, sensor, wavelengths_nm, fwhm_nm)
    t = utc(time)
    nodata = int(spec.nodata)
    if spec.scale_factor != 1.0:  # reflectance x 10000
        gain = np.full(cube.shape[0], spec.scale_factor)
    else:  # radiance: a per-band gain so that the band's maximum uses most of int16
        with np.errstate(all="ignore"):
            peak = np.nanmax(np.abs(np.where(np.isfinite(cube), cube, np.nan)), axis=(1, 2))
        peak = np.where(np.isfinite(peak) & (peak > 0), peak, 1.0)
        gain = np.round(peak / 30000.0, 10)
    offset = np.zeros(cube.shape[0])
    dn = np.empty(cube.shape, dtype=np.int16)
    for b in range(cube.shape[0]):
        x = cube[b]
        q = np.clip(np.round((np.where(np.isnan(x), 0, x) - offset[b]) / gain[b]), -INT16_MAX, INT16_MAX)
        dn[b] = np.where(np.isnan(x), nodata, q).astype(np.int16)
    gt = affine_from_latlon(lat, lon) if lat is not None else None

    root = ET.Element(lay.root)
    base = _sub(root, "base")
    for k, v in base_fields.items():
        _sub(base, k, v)
    tc = _sub(base, "temporalCoverage")
    _sub(tc, "startTime", t.strftime("%Y-%m-%dT%H:%M:%S.000000Z"))
    _sub(tc, "stopTime", (t + dt.timedelta(seconds=4)).strftime("%Y-%m-%dT%H:%M:%S.000000Z"))
    specific = _sub(root, "specific")
    _sub(specific, "numberOfBands", cube.shape[0])
    _sub(specific, "groundSampleDistance", f"{float(gsd_m or sensor.gsd_m):g}")
    _sub(specific, "quantity", spec.quantity)
    bc = _sub(specific, "bandCharacterisation")
    tag = lay.band.split("/")[-1]
    for i in range(cube.shape[0]):
        b = _sub(bc, tag, number=i + 1) if lay.number.startswith("@") else _sub(bc, tag)
        if not lay.number.startswith("@"):
            _sub(b, lay.number, i + 1)
        _sub(b, lay.centre, f"{wl[i]:.3f}")
        _sub(b, lay.width, f"{fw[i]:.3f}")
        _sub(b, lay.gain, f"{gain[i]:.10g}")
        _sub(b, lay.offset, f"{offset[i]:.10g}")
    ET.indent(root)

    final = out_dir / prefix
    tmp = out_dir / f".{prefix}.part-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir(parents=True)
        write_geotiff(tmp / tif_name, dn, nodata=nodata, geotransform=gt)
        ET.ElementTree(root).write(tmp / xml_name, encoding="UTF-8", xml_declaration=True)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final

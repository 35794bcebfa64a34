"""What EnMAP and DESIS share: an integer SPECTRAL_IMAGE (GeoTIFF of either interleave, or ENVI) plus a METADATA
XML whose band characterisation gives each band's centre, width, gain and offset (physical = DN x gain + offset).

Guarantees:

- Bands in ascending wavelength: a table that is ascending per detector (at most ``detectors`` runs, each step
  back under 100 nm: EnMAP's VNIR then SWIR order) is sorted, and the image bands with it; any other disorder or a
  duplicated centre is a ProductError naming the XML field.
- No-data bands per granule, never by the registry: a band is bad for the granule when the XML band statistics say
  it is empty (``stdDeviation`` 0 or ``mean`` -1000000, the EnMAP-Box rule) or when it is nodata at every covered
  pixel of rows sampled across the image (:data:`SAMPLE_ROWS` rows; a filled band is filled everywhere). Such a
  band is not a good band and never invalidates a pixel, so a product with its water-vapour bands filled keeps
  its pixels.
- Geolocation: the image grid in its CRS (UTM for real products) projected to WGS-84 with pyproj; GSD from the
  grid (metres), else from the XML (``product/ortho/resolution``, any ``pixelSize``), else the registry.
- L2 reflectance whose gains would give values above 10 is refused (a gain of 1 on x10000 DNs).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import shutil
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_prep.formats._common import (
    band_table,
    level_spec_or_error,
    nodata_bands,
    parse_time,
    perr,
    prepare_cube,
    sensor_or_error,
    utc,
    valid_mask,
)
from data_prep.formats._geotiff import GeoTiff, write_geotiff
from data_prep.formats.envi import EnviRaster, header_path, read_header
from data_prep.formats.geo import Grid, fit_transform, from_latlon, utm_crs
from data_prep.granule import Granule
from data_prep.registry import MAX_OVERLAP_NM, Sensor

log = logging.getLogger(__name__)
INT16_MAX = 32767
#: rows read at open (evenly spaced) to find bands that are nodata everywhere
SAMPLE_ROWS = 8
EMPTY_BAND_MEAN = -1000000.0


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
    detectors: int = 1
    start_time: str = "base/temporalCoverage/startTime"
    stats: str = "product/bandStatistics/bandID"
    gsd_paths: tuple[str, ...] = ("product/ortho/resolution", ".//pixelSize")


def _text(el: ET.Element, child: str, xml: Path, where: str) -> float:
    c = el.find(child)
    if c is None or c.text is None or not c.text.strip():
        raise perr(xml, f"{where}/{child}", "missing")
    try:
        return float(c.text)
    except ValueError:
        raise perr(xml, f"{where}/{child}", f"{c.text!r} is not a number") from None


def _number(el: ET.Element, spec: str) -> str | None:
    return el.get(spec[1:]) if spec.startswith("@") else el.findtext(spec)


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
        num_s = _number(b, lay.number)
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


def _empty_bands(root: ET.Element, lay: XmlLayout, n: int) -> np.ndarray:
    """Bands the XML band statistics mark empty (stdDeviation 0 or mean -1000000)."""
    out = np.zeros(n, dtype=bool)
    for b in root.findall(lay.stats):
        try:
            k = int(str(_number(b, lay.number) or b.get("number")).strip()) - 1
            std = float(b.findtext("stdDeviation") or "nan")
            mean = float(b.findtext("mean") or "nan")
        except ValueError:
            continue
        if 0 <= k < n and (std == 0.0 or mean == EMPTY_BAND_MEAN):
            out[k] = True
    return out


def sort_order(xml: Path, wl: np.ndarray, lay: XmlLayout) -> np.ndarray:
    """The permutation that sorts the centres; allowed only for a per-detector ascending table."""
    d = np.diff(wl)
    back = np.flatnonzero(d <= 0)
    if back.size and (back.size > lay.detectors - 1 or (d[back] <= -MAX_OVERLAP_NM).any() or (d[back] == 0).any()):
        i = int(back[0])
        raise perr(xml, f"{lay.band}/{lay.centre}", f"centres not ascending at band {i + 2} ({wl[i]:.3f} -> "
                                                    f"{wl[i + 1]:.3f} nm), and not {lay.detectors} ascending "
                                                    "detector runs either; expected ascending band centres")
    return np.argsort(wl, kind="stable")


def open_image(path: Path):
    """A GeoTiff, or an EnviRaster for ENVI delivery (``.BSQ/.BIL/.BIP`` with a ``.HDR``)."""
    if path.suffix.lower() in (".bsq", ".bil", ".bip", ".hdr", ".img"):
        hdr = header_path(path)
        if hdr is None:
            raise perr(path, "header", "ENVI delivery without its .HDR beside the image")
        data = path if path.suffix.lower() != ".hdr" else None
        return EnviRaster(hdr, data)
    return GeoTiff(path)


def open_xmltif(image_path: Path, xml: Path, level: str, lay: XmlLayout, *, granule_id: str, entry: Path,
                t_name: dt.datetime | None, header: Path | None = None) -> Granule:
    """``header``: an ENVI header beside a TIFF (DESIS), a source of nodata and band table checks."""
    root, table = read_band_table(xml, lay)
    img = open_image(image_path)
    bands, rows, cols = img.shape
    if table.shape[0] != bands:
        raise perr(xml, lay.band, f"{table.shape[0]} bands described but {image_path.name} has {bands}")
    wl, fw = band_table(xml, table[:, 0], table[:, 1], field=f"{lay.band}/{lay.centre}",
                        fwhm_field=f"{lay.band}/{lay.width}", n_bands=bands)
    order = sort_order(xml, wl, lay)
    wl, fw = wl[order], fw[order]
    gain, offset = table[order, 2], table[order, 3]
    if not (np.isfinite(gain).all() and np.isfinite(offset).all()):
        raise perr(xml, f"{lay.band}/{lay.gain}", "gain/offset must be finite")
    side = read_header(header) if header is not None else {}
    if (gain == 0).all() and "data gain values" in side:
        gain = np.asarray([float(v) for v in side["data gain values"]])[order]
    sensor: Sensor = sensor_or_error(xml, lay.sensor)
    spec = level_spec_or_error(xml, sensor, level)
    if (gain == 0).all():
        log.warning("%s: every %s is 0; using the registry scale %g", xml, lay.gain, spec.scale_factor)
        gain = np.full(bands, spec.scale_factor)
    if level == "L2":
        top = np.abs(gain) * INT16_MAX + offset
        if np.median(top) > 10.0:
            raise perr(xml, f"{lay.band}/{lay.gain}", f"gains up to {gain.max():g} would make reflectance up to "
                                                      f"{np.median(top):g}; expected about 1e-4 (DN = reflectance x "
                                                      "10000)")
    nodata = img.nodata
    if nodata is None and "data ignore value" in side:
        nodata = float(side["data ignore value"])
    nodata = spec.nodata if nodata is None else nodata
    t = parse_time(root.findtext(lay.start_time) or "") or t_name
    lat = lon = None
    gsd = None
    grid: Grid | None = img.grid
    if grid is not None:
        lat, lon = grid.latlon(rows, cols)
        gsd = grid.gsd_m(rows, cols)
    if gsd is None:
        for p in lay.gsd_paths:
            g = root.findtext(p)
            if g and g.strip():
                try:
                    gsd = float(g.split()[0])
                    break
                except ValueError:
                    raise perr(xml, p, f"{g!r} is not a number") from None
    gsd = gsd or sensor.gsd_m
    g32, o32 = gain.astype(np.float32)[:, None, None], offset.astype(np.float32)[:, None, None]
    identity = bool((order == np.arange(bands)).all())

    def physical(raw: np.ndarray) -> np.ndarray:
        raw = raw if identity else raw[order]
        cube = raw.astype(np.float32) * g32 + o32
        cube[raw == nodata] = np.nan
        return cube

    empty = _empty_bands(root, lay, bands)[order]
    sample = sorted({int(r) for r in np.linspace(0, rows - 1, min(rows, SAMPLE_ROWS))})
    filled = nodata_bands(np.concatenate([physical(img.rows(r, r + 1)) for r in sample], axis=1))
    nod = empty | filled
    good = sensor.good_band_mask(wl) & ~nod
    if nod.any():
        log.info("%s: %d no-data band(s) at %s nm", entry, int(nod.sum()),
                 ", ".join(f"{w:.1f}" for w in wl[nod]))

    def read_rows(r0: int, r1: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= r0 <= r1 <= rows:
            raise IndexError(f"{image_path}: rows {r0}:{r1} outside 0:{rows}")
        cube = physical(img.rows(r0, r1))
        return cube, valid_mask(cube, good)

    return Granule(path=str(entry), granule_id=granule_id, sensor=sensor.name, level=level,
                   shape=(bands, rows, cols), wavelengths_nm=wl, fwhm_nm=fw, good_bands=good, read_rows=read_rows,
                   gsd_m=float(gsd), acquisition_time=t, lat=lat, lon=lon,
                   extra={"format": lay.format, "image": str(image_path), "metadata": str(xml), "nodata": nodata,
                          "nodata_bands": np.flatnonzero(nod).tolist(), "sorted": not identity})


# ------------------------------------------------------------------ product files in a folder
PART = re.compile(r"^(?P<prefix>.+?)-(?P<part>SPECTRAL_IMAGE(?P<det>_VNIR|_SWIR)?(?P<cog>_COG)?\.(?P<ext>TIFF?|GEOTIFF|"
                  r"BSQ|BIL|BIP|IMG|HDR|JP2)|METADATA\.XML|HISTORY\.XML|(?P<ql>QL_[A-Z0-9_\-]+)\.[A-Z0-9]+)$", re.I)
TIFF_EXTS = ("tif", "tiff", "geotiff")
ENVI_EXTS = ("bsq", "bil", "bip", "img")


@dataclass
class XmlProduct:
    """The files of one EnMAP/DESIS product (one ``<prefix>-`` in a folder)."""

    prefix: str
    mission: str | None
    xml: Path | None = None
    image: Path | None = None
    header: Path | None = None
    unsupported: str | None = None
    sidecars: dict[Path, str] = field(default_factory=dict)


def xml_mission(prefix: str, xml: Path | None) -> str | None:
    """enmap / desis from the name, else from the XML root element (level_X / hsi_doc)."""
    up = prefix.upper()
    if up.startswith("ENMAP"):
        return "enmap"
    if up.startswith("DESIS"):
        return "desis"
    if xml is None:
        return None
    try:
        tag = next(ET.iterparse(xml, events=("start",)))[1].tag
    except (ET.ParseError, OSError, StopIteration):
        return None
    return {"level_X": "enmap", "hsi_doc": "desis"}.get(tag)


def group_files(files) -> dict[str, XmlProduct]:
    """Group a folder's files into EnMAP/DESIS products by their ``<prefix>-PART`` names."""
    groups: dict[str, dict] = {}
    for p in files:
        m = PART.match(p.name)
        if m:
            groups.setdefault(m["prefix"], {})[p] = m
    out = {}
    for prefix, parts in groups.items():
        xml = next((p for p, m in parts.items() if m["part"].upper() == "METADATA.XML"), None)
        if xml is None:
            continue
        mission = xml_mission(prefix, xml)
        if mission is None:
            continue
        prod = XmlProduct(prefix, mission, xml=xml)
        label = "EnMAP" if mission == "enmap" else "DESIS"
        imgs = {p: m for p, m in parts.items() if m["ext"] and not m["det"]}
        tif = next((p for p, m in sorted(imgs.items()) if m["ext"].lower() in TIFF_EXTS), None)
        envi = next((p for p, m in sorted(imgs.items()) if m["ext"].lower() in ENVI_EXTS), None)
        hdr = next((p for p, m in imgs.items() if m["ext"].lower() == "hdr"), None)
        prod.image = tif or envi
        prod.header = hdr
        if prod.image is None:
            if any(m["det"] for m in parts.values()):
                prod.unsupported = f"{label} L1B (SPECTRAL_IMAGE_VNIR/_SWIR in sensor geometry): not supported"
            elif any((m["ext"] or "").lower() == "jp2" for m in parts.values()):
                prod.unsupported = f"{label} JPEG2000 delivery: not supported (order GeoTIFF or ENVI)"
            else:
                prod.unsupported = f"{label} METADATA without its SPECTRAL_IMAGE"
        for p, m in parts.items():
            if p in (xml, prod.image, prod.header):
                continue
            if m["ql"]:
                prod.sidecars[p] = f"{label} quicklook and quality layers (QL_*)"
            elif m["part"].upper() == "HISTORY.XML":
                prod.sidecars[p] = f"{label} processing history (HISTORY.XML)"
            else:
                prod.sidecars[p] = f"{label} other SPECTRAL_IMAGE file"
        out[prefix] = prod
    return out


def product_of(path: Path) -> XmlProduct:
    """The EnMAP/DESIS product an entry names: a folder holding exactly one, its image, or its metadata file."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    try:
        groups = group_files([p for p in folder.iterdir() if p.is_file()])
    except OSError as e:
        raise perr(folder, "path", f"cannot list the product folder: {e}") from None
    if path.is_dir():
        if len(groups) != 1:
            raise perr(path, "SPECTRAL_IMAGE", f"{len(groups)} EnMAP/DESIS products in this folder; expected one "
                                               "(give the SPECTRAL_IMAGE file of the one you mean)")
        prod = next(iter(groups.values()))
    else:
        m = PART.match(path.name)
        prod = groups.get(m["prefix"]) if m else None
        if prod is None:
            raise perr(path, "METADATA", "no <prefix>-METADATA.XML beside this SPECTRAL_IMAGE")
    if prod.unsupported:
        raise perr(prod.xml, "SPECTRAL_IMAGE", prod.unsupported)
    return prod


def open_product_files(path: Path, lay: XmlLayout, name: re.Pattern) -> Granule:
    """Open the EnMAP/DESIS product an entry names; level and time from its name (``lev``: L1B/L1C/L2A, ``time``),
    else the level from the XML's ``base/level``."""
    prod = product_of(Path(path))
    m = name.match(prod.prefix)
    if m:
        level, t = ("L2" if m["lev"] == "L2A" else "L1"), parse_time(m["time"])
    else:
        lev = (ET.parse(prod.xml).getroot().findtext("base/level") or "").strip().upper()
        if lev[:2] not in ("L1", "L2"):
            raise perr(prod.xml, "base/level", f"{lev!r}; expected L1B, L1C or L2A (and the name says nothing)")
        level, t = lev[:2], None
    return open_xmltif(prod.image, prod.xml, level, lay, granule_id=prod.prefix, entry=prod.image, t_name=t,
                       header=prod.header)


# ------------------------------------------------------------------ writer side
def _sub(parent: ET.Element, tag: str, text=None, **attrs) -> ET.Element:
    el = ET.SubElement(parent, tag, {k: str(v) for k, v in attrs.items()})
    if text is not None:
        el.text = str(text)
    return el


def quantise(cube: np.ndarray, spec, nodata: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(int16 DN, gain, offset): reflectance x 10000; radiance with a per-band gain using most of int16."""
    if spec.scale_factor != 1.0:
        gain = np.full(cube.shape[0], spec.scale_factor)
    else:
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
    return dn, gain, offset


def utm_grid(lat, lon) -> Grid | None:
    """The UTM grid (zone of the centre) fitted to pixel-centre lat/lon (the writers' side)."""
    if lat is None:
        return None
    crs = utm_crs(float(np.mean(lat)), float(np.mean(lon)))
    x, y = from_latlon(crs, lat, lon)
    return Grid(fit_transform(x, y), crs)


def band_xml(root_tag: str, lay: XmlLayout, *, t: dt.datetime, wl, fw, gain, offset, base_fields: dict,
             extra: dict[str, str] | None = None) -> ET.Element:
    """A METADATA XML: ``base`` (fields, temporal coverage), the band characterisation, ``extra`` paths -> text."""
    root = ET.Element(root_tag)
    base = _sub(root, "base")
    for k, v in base_fields.items():
        _sub(base, k, v)
    tc = _sub(base, "temporalCoverage")
    _sub(tc, "startTime", t.strftime("%Y-%m-%dT%H:%M:%S.000000Z"))
    _sub(tc, "stopTime", (t + dt.timedelta(seconds=4)).strftime("%Y-%m-%dT%H:%M:%S.000000Z"))
    specific = _sub(root, "specific")
    bc = _sub(specific, "bandCharacterisation")
    tag = lay.band.split("/")[-1]
    for i in range(len(wl)):
        b = _sub(bc, tag, number=i + 1) if lay.number.startswith("@") else _sub(bc, tag)
        if not lay.number.startswith("@"):
            _sub(b, lay.number, i + 1)
        _sub(b, lay.centre, f"{wl[i]:.3f}")
        _sub(b, lay.width, f"{fw[i]:.3f}")
        _sub(b, lay.gain, f"{gain[i]:.10g}")
        _sub(b, lay.offset, f"{offset[i]:.10g}")
    for path, text in (extra or {}).items():
        parent = root
        for part in path.split("/"):
            nxt = parent.find(part)
            parent = nxt if nxt is not None else _sub(parent, part)
        parent.text = text
    return root


def write_folder(final: Path, files: dict[str, object]) -> None:
    """Write ``files`` (name -> callable(path) or bytes/str) into ``final/`` atomically (temp folder + rename)."""
    tmp = final.with_name(f".{final.name}.part-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir(parents=True)
        for name, w in files.items():
            if callable(w):
                w(tmp / name)
            else:
                (tmp / name).write_bytes(w if isinstance(w, bytes) else str(w).encode())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_files(folder: Path, files: dict[str, object]) -> None:
    """Write ``files`` flat into ``folder`` (each one atomically)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, w in files.items():
        tmp = folder / f".{name}.part-{os.getpid()}"
        try:
            if callable(w):
                w(tmp)
            else:
                tmp.write_bytes(w if isinstance(w, bytes) else str(w).encode())
            os.replace(tmp, folder / name)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def xml_bytes(root: ET.Element) -> bytes:
    ET.indent(root)
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="utf-8")


def tiny_tif(data: np.ndarray, grid: Grid | None):
    """A writer of a small uint8 quicklook/QA GeoTIFF."""
    return lambda p: write_geotiff(p, data, nodata=None, grid=grid)


def prepare(sensor: Sensor, level: str, cube, wavelengths_nm, fwhm_nm, time):
    cube, wl, fw = prepare_cube(cube, sensor, wavelengths_nm, fwhm_nm)
    return cube, wl, fw, utc(time), sensor.level(level)

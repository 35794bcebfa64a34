"""Landsat 8/9 OLI Collection 2 Level-2 surface reflectance, as USGS EarthExplorer / M2M deliver it.

Layout (USGS LSDS-1328, *Landsat 8-9 OLI/TIRS Collection 2 Level 2 Data Format Control Book*): one folder per
scene named by its product id ``LC09_L2SP_PPPRRR_YYYYMMDD_yyyymmdd_02_T1`` (sensor LC = OLI/TIRS, O = OLI only;
satellite 08/09; path/row; acquisition and processing dates; collection 02; tier T1/T2/RT), holding one
single-band GeoTIFF per band ``<id>_SR_B1.TIF`` ... ``_SR_B7.TIF`` (uint16, UTM grid, fill 0), the pixel quality
band ``<id>_QA_PIXEL.TIF`` (bit 0: fill), and the ODL metadata ``<id>_MTL.txt`` (groups ``PRODUCT_CONTENTS`` with
``FILE_NAME_BAND_k``, ``IMAGE_ATTRIBUTES`` with ``DATE_ACQUIRED`` / ``SCENE_CENTER_TIME``,
``LEVEL2_SURFACE_REFLECTANCE_PARAMETERS`` with ``REFLECTANCE_MULT_BAND_k`` = 2.75e-05 and
``REFLECTANCE_ADD_BAND_k`` = -0.2). Thermal (``ST_*``) and other QA bands of a real delivery are sidecars here.

The reader takes the ``_MTL.txt`` as the product entry: band files from ``FILE_NAME_BAND_1..7``, reflectance =
DN x mult + add per band (from the MTL, never assumed), DN 0 = fill (nodata), the grid from the first band's
GeoTIFF keys (pyproj to WGS-84 lat/lon), GSD from the grid, time from date + scene centre time. Band centres
and widths come from the registry (``configs/sensors/landsat-8-9-oli.yaml``; a GeoTIFF carries none).
"""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

import numpy as np

from data_prep.formats._common import (
    level_spec_or_error,
    perr,
    prepare_cube,
    sensor_or_error,
    utc,
    valid_mask,
)
from data_prep.formats._geotiff import GeoTiff, write_geotiff
from data_prep.formats._xmltif import utm_grid, write_folder
from data_prep.granule import Granule
from data_prep.registry import Sensor

SENSOR = "landsat-8-9-oli"
PRODUCT = re.compile(r"^(?P<id>L(?P<kind>[CO])0(?P<sat>[89])_L2SP_(?P<path>\d{3})(?P<row>\d{3})_(?P<date>\d{8})_"
                     r"\d{8}_02_(?:T1|T2|RT))_(?P<part>[A-Z0-9_]+)\.(?P<ext>TIF|txt|xml|json)$", re.I)
MULT, ADD = 2.75e-05, -0.2
"""Collection 2 Level-2 surface reflectance scaling (LSDS-1328): reflectance = DN x MULT + ADD."""
N_BANDS = 7
QA_FILL = 1
QA_CLEAR = 21824
"""QA_PIXEL of a clear land pixel (bits 6, 8, 10, 12, 14 set: clear, low cloud/shadow/snow/cirrus confidence)."""


def classify(name: str) -> tuple[str, str] | None:
    """``("product", id)`` for the MTL.txt, ``("part", kind)`` / ``("sidecar", kind)`` for the other files of a
    Landsat C2 L2 delivery, None for any other name."""
    m = PRODUCT.match(name)
    if m is None:
        return None
    part, ext = m["part"].upper(), m["ext"].lower()
    if part == "MTL" and ext == "txt":
        return "product", m["id"]
    if re.fullmatch(r"SR_B[1-7]", part):
        return "part", "Landsat surface reflectance band"
    if part == "MTL":
        return "sidecar", "Landsat metadata (MTL.xml / MTL.json)"
    if part.startswith("ST_"):
        return "sidecar", "Landsat surface temperature band (not used)"
    if part.startswith("QA") or part.startswith("SR_QA"):
        return "sidecar", "Landsat quality band (QA_*)"
    return "sidecar", "Landsat ancillary file (ANG, ...)"


def parse_odl(text: str, path: Path) -> dict[str, dict[str, str]]:
    """``GROUP = X ... END_GROUP = X`` blocks of ``KEY = VALUE`` lines -> {group: {key: value}} (quotes removed)."""
    out: dict[str, dict[str, str]] = {}
    stack: list[str] = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line == "END":
            continue
        key, eq, value = line.partition("=")
        if not eq:
            raise perr(path, f"line {n}", f"not KEY = VALUE: {raw!r}")
        key, value = key.strip(), value.strip().strip('"')
        if key == "GROUP":
            stack.append(value)
            out.setdefault(value, {})
        elif key == "END_GROUP":
            if not stack or stack[-1] != value:
                raise perr(path, f"line {n}", f"END_GROUP = {value} closes {stack[-1] if stack else 'nothing'}")
            stack.pop()
        else:
            out.setdefault(stack[-1] if stack else "", {})[key] = value
    if stack:
        raise perr(path, "GROUP", f"group {stack[-1]} is never closed")
    return out


def _field(md: dict, path: Path, group: str, key: str) -> str:
    try:
        return md[group][key]
    except KeyError:
        raise perr(path, f"{group}/{key}", "missing from the MTL") from None


def open_landsat(path: str | Path) -> Granule:
    """A Landsat C2 L2 scene from its ``_MTL.txt`` (see the module docstring)."""
    path = Path(path)
    c = classify(path.name)
    if c is None or c[0] != "product":
        raise perr(path, "name", "not a Landsat Collection 2 Level-2 MTL.txt (LC0[89]_L2SP_..._02_T1_MTL.txt)")
    try:
        md = parse_odl(path.read_text(), path)
    except (OSError, UnicodeDecodeError) as e:
        raise perr(path, "MTL", f"cannot read: {e}") from None
    sensor: Sensor = sensor_or_error(path, SENSOR)
    spec = level_spec_or_error(path, sensor, "L2")
    files, mult, add = [], [], []
    for k in range(1, N_BANDS + 1):
        f = path.parent / _field(md, path, "PRODUCT_CONTENTS", f"FILE_NAME_BAND_{k}")
        if not f.exists():
            raise perr(path, f"FILE_NAME_BAND_{k}", f"{f.name} is not beside the MTL")
        files.append(GeoTiff(f))
        g = "LEVEL2_SURFACE_REFLECTANCE_PARAMETERS"
        try:
            mult.append(float(_field(md, path, g, f"REFLECTANCE_MULT_BAND_{k}")))
            add.append(float(_field(md, path, g, f"REFLECTANCE_ADD_BAND_{k}")))
        except ValueError:
            raise perr(path, f"{g}/REFLECTANCE_*_BAND_{k}", "not a number") from None
    shape = files[0].shape
    for f in files:
        if f.shape != shape or f.shape[0] != 1:
            raise perr(f.path, "shape", f"{f.shape}; every SR band is one band of {shape[1:]} pixels")
    _, rows, cols = shape
    date = _field(md, path, "IMAGE_ATTRIBUTES", "DATE_ACQUIRED")
    clock = md.get("IMAGE_ATTRIBUTES", {}).get("SCENE_CENTER_TIME", "00:00:00Z").rstrip("Z")[:8]
    try:
        t = dt.datetime.fromisoformat(f"{date}T{clock}").replace(tzinfo=dt.UTC)
    except ValueError:
        raise perr(path, "IMAGE_ATTRIBUTES/DATE_ACQUIRED", f"{date!r} {clock!r} is not a date and time") from None
    grid = files[0].grid
    lat = lon = None
    gsd = sensor.gsd_m
    if grid is not None:
        lat, lon = grid.latlon(rows, cols)
        gsd = grid.gsd_m(rows, cols) or gsd
    wl, fw = sensor.wavelengths_nm.copy(), sensor.fwhm_nm.copy()
    good = sensor.good_band_mask(wl)
    m = np.asarray(mult, np.float32)[:, None, None]
    a = np.asarray(add, np.float32)[:, None, None]
    nodata = int(spec.nodata)

    def read_rows(r0: int, r1: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= r0 <= r1 <= rows:
            raise IndexError(f"{path}: rows {r0}:{r1} outside 0:{rows}")
        dn = np.concatenate([f.rows(r0, r1) for f in files], 0)
        cube = dn.astype(np.float32) * m + a
        cube[dn == nodata] = np.nan
        return cube, valid_mask(cube, good)

    return Granule(path=str(path), granule_id=PRODUCT.match(path.name)["id"], sensor=SENSOR, level="L2",
                   shape=(N_BANDS, rows, cols), wavelengths_nm=wl, fwhm_nm=fw, good_bands=good, read_rows=read_rows,
                   gsd_m=float(gsd), acquisition_time=t, lat=lat, lon=lon,
                   extra={"format": "landsat-geotiff", "nodata": nodata})


def wrs_path_row(lat: float, lon: float) -> tuple[int, int]:
    """A WRS-2-like (path, row) of a scene centre (233 paths westward, 248 rows from the north; not the exact
    WRS-2 grid: the simulator's products only need distinct, plausible ids)."""
    path = int((-lon + 180.0) / 360.0 * 233) % 233 + 1
    row = min(248, max(1, int((90.0 - lat) / 180.0 * 248) + 1))
    return path, row


def product_id(t: dt.datetime, satellite: int = 9, path_row: tuple[int, int] = (44, 34)) -> str:
    proc = t + dt.timedelta(days=2)
    return f"LC{satellite:02d}_L2SP_{path_row[0]:03d}{path_row[1]:03d}_{t:%Y%m%d}_{proc:%Y%m%d}_02_T1"


def mtl_text(pid: str, t: dt.datetime, rows: int, cols: int, gsd: float, utm_zone: str | None) -> str:
    """The ``_MTL.txt`` of a scene: the groups and fields the reader (and most tools) use."""
    def group(name: str, items: list[tuple[str, str]]) -> list[str]:
        return [f"  GROUP = {name}", *(f"    {k} = {v}" for k, v in items), f"  END_GROUP = {name}"]

    files = [(f"FILE_NAME_BAND_{k}", f'"{pid}_SR_B{k}.TIF"') for k in range(1, N_BANDS + 1)]
    files += [("FILE_NAME_QUALITY_L1_PIXEL", f'"{pid}_QA_PIXEL.TIF"'), ("FILE_NAME_METADATA_ODL", f'"{pid}_MTL.txt"')]
    sr = []
    for k in range(1, N_BANDS + 1):
        sr += [(f"REFLECTANCE_MAXIMUM_BAND_{k}", f"{65535 * MULT + ADD:.6f}"),
               (f"REFLECTANCE_MINIMUM_BAND_{k}", f"{1 * MULT + ADD:.6f}")]
    for k in range(1, N_BANDS + 1):
        sr += [(f"REFLECTANCE_MULT_BAND_{k}", f"{MULT:.4e}"), (f"REFLECTANCE_ADD_BAND_{k}", f"{ADD:.6f}")]
    lines = ["GROUP = LANDSAT_METADATA_FILE"]
    lines += group("PRODUCT_CONTENTS", [("ORIGIN", '"Image courtesy of the U.S. Geological Survey"'),
                                        ("LANDSAT_PRODUCT_ID", f'"{pid}"'), ("PROCESSING_LEVEL", '"L2SP"'),
                                        ("COLLECTION_NUMBER", "02"), ("COLLECTION_CATEGORY", '"T1"'),
                                        ("OUTPUT_FORMAT", '"GEOTIFF"'), *files])
    lines += group("IMAGE_ATTRIBUTES", [("SPACECRAFT_ID", f'"LANDSAT_{int(pid[2:4])}"'), ("SENSOR_ID", '"OLI_TIRS"'),
                                        ("WRS_PATH", str(int(pid[10:13]))), ("WRS_ROW", str(int(pid[13:16]))),
                                        ("DATE_ACQUIRED", f"{t:%Y-%m-%d}"),
                                        ("SCENE_CENTER_TIME", f'"{t:%H:%M:%S}.0000000Z"')])
    proj = [("MAP_PROJECTION", '"UTM"'), ("DATUM", '"WGS84"'), ("ELLIPSOID", '"WGS84"')]
    if utm_zone:
        proj.append(("UTM_ZONE", utm_zone.rstrip("NS")))
    proj += [("GRID_CELL_SIZE_REFLECTIVE", f"{gsd:.2f}"), ("REFLECTIVE_LINES", str(rows)),
             ("REFLECTIVE_SAMPLES", str(cols)), ("ORIENTATION", '"NORTH_UP"')]
    lines += group("PROJECTION_ATTRIBUTES", proj)
    lines += group("LEVEL2_SURFACE_REFLECTANCE_PARAMETERS", sr)
    lines += ["END_GROUP = LANDSAT_METADATA_FILE", "END", ""]
    return "\n".join(lines)


def write_landsat(out_dir: Path, *, sensor: Sensor, level: str, cube, name=None, lat=None, lon=None, time=None,
                  wavelengths_nm=None, fwhm_nm=None, gsd_m=None) -> Path:
    """The scene folder as delivered (module docstring): SR_B1..B7 + QA_PIXEL GeoTIFFs on a UTM grid and the
    MTL.txt; returns the MTL.txt."""
    if level != "L2":
        raise ValueError(f"{sensor.name}: only Collection 2 Level-2 surface reflectance is written, not {level}")
    cube, _, _ = prepare_cube(cube, sensor, wavelengths_nm, fwhm_nm)
    if cube.shape[0] != N_BANDS:
        raise ValueError(f"{sensor.name}: {cube.shape[0]} bands; Collection 2 L2 SR has bands 1-{N_BANDS}")
    t = utc(time)
    pr = wrs_path_row(float(np.nanmean(lat)), float(np.nanmean(lon))) if lat is not None else (44, 34)
    pid = name or product_id(t, path_row=pr)
    nan = np.isnan(cube)
    dn = np.clip(np.round((np.where(nan, 0.0, cube) - ADD) / MULT), 1, 65535).astype(np.uint16)
    dn[nan] = 0
    qa = np.where(nan.any(0), QA_FILL, QA_CLEAR).astype(np.uint16)[None]
    grid = utm_grid(lat, lon)
    _, rows, cols = cube.shape
    gsd = float(gsd_m or sensor.gsd_m)
    zone = grid.crs.utm_zone if grid is not None else None
    files: dict[str, object] = {}
    for k in range(N_BANDS):
        files[f"{pid}_SR_B{k + 1}.TIF"] = (lambda p, b=dn[k:k + 1]: write_geotiff(p, b, nodata=0, grid=grid))
    files[f"{pid}_QA_PIXEL.TIF"] = lambda p: write_geotiff(p, qa, nodata=QA_FILL, grid=grid)
    files[f"{pid}_MTL.txt"] = mtl_text(pid, t, rows, cols, gsd, zone)
    write_folder(out_dir / pid, files)
    return out_dir / pid / f"{pid}_MTL.txt"

"""AVIRIS-Classic, AVIRIS-NG and AVIRIS-3 ENVI products as the JPL portals deliver them, with their sidecars.

Product names (the sensor, level and time come from them; see ``../shared/REAL_FORMATS.md`` sections 4-6):

- Facility SDS (AVIRIS-3, and AVIRIS-NG from 2023): ``AV320230821t173024_L1B_RDN_main_d71e8b07_RDN_ORT``,
  ``AV320231008t173943_L2A_OE_main_98b13fff_RFL_ORT``, ``ang20231109t092617_027_L2A_OE_main_27577724_RFL_ORT``
  (the ORNL DAAC form without the ``main`` tag too; raw-geometry ``..._RDN``). Sidecars: ``_UNC_ORT``,
  ``_ATM_ORT``, ``..._L1B_ORT_..._GLT`` / ``_IGM`` / ``_LOC_ORT`` / ``_OBS_ORT``, any ``_LOC`` / ``_OBS``.
- AVIRIS-NG v1/v2: ``ang20170323t202244_rdn_7000-7010``, ``ang20191027t204454_rdn_v2x1_img`` (L1),
  ``..._corr_v2x1_img`` / ``_rfl_`` (L2). Sidecars: ``_loc``, ``_obs``, ``_obs_ort``, ``_igm``, ``_glt``,
  ``_ort_glt``, ``_ort_igm``, ``_h2o``.
- AVIRIS-Classic: ``f180820t01p00r09rdn_e_sc01_ort_img`` (L1: int16 big-endian BIP DN; radiance = DN / gain of the
  ``f180820t01p00r09rdn_e.gain`` file, column 1; off-swath pixels, -50 in every band, are nodata when the header
  has no ``data ignore value``), ``f..._rfl`` / ``_corr`` / ``_refl`` (L2, UNVERIFIED layout). Sidecars: ``.gain``,
  ``.spc`` (band centres and FWHM when the header has none), ``_ort_glt``, ``_ort_igm``, ``_obs_ort``.

Guarantees: band centres from the header (or ``.spc``) win over the registry table (AVIRIS calibrations change by
flight); geolocation and GSD from ``map info`` (rotated UTM, via pyproj) for orthorectified cubes, else from the
``loc`` file (raw geometry); a name that matches none of these falls back to the band table (matched against the
registry) and the header's ``processing level`` or description; a sidecar opened as a product is a ProductError.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_prep.formats._common import (
    band_table,
    check_order,
    level_spec_or_error,
    match_sensor,
    parse_time,
    perr,
    prepare_cube,
    sensor_or_error,
    utc,
    valid_mask,
)
from data_prep.formats.envi import (
    EnviRaster,
    header_int,
    header_path,
    read_header,
    write_header,
    write_raster,
)
from data_prep.formats.geo import Grid, fit_transform, from_latlon, gsd_from_latlon, map_info_fields, utm_crs
from data_prep.granule import Granule
from data_prep.registry import Sensor

log = logging.getLogger(__name__)

#: sidecar token -> the kind reported by ``ingest``
SIDECAR_KINDS = {
    "loc": "geolocation (loc)", "igm": "input geometry (igm)", "glt": "geometry lookup table (glt)",
    "obs": "observation geometry (obs)", "h2o": "water vapour retrieval (h2o)", "unc": "uncertainty (UNC)",
    "atm": "atmospheric state (ATM)", "mask": "mask", "ql": "quicklook", "state": "atmospheric state (state)",
}
PRODUCT_LEVEL = {"rdn": "L1", "rfl": "L2", "corr": "L2", "refl": "L2"}
FACILITY = re.compile(r"^(?P<pfx>AV3|ang)(?P<date>\d{8})t(?P<time>\d{6})(?:_(?P<seg>\d{3}))?"
                      r"_(?P<lev>L[0-4][A-Z])_(?P<rest>[A-Za-z0-9_]+)$")
NG = re.compile(r"^ang(?P<date>\d{8})t(?P<time>\d{6})_(?P<rest>.+)$")
CLASSIC = re.compile(r"^(?P<flight>f(?P<date>\d{6})t\d{2}p\d{2}r\d{2})(?P<rest>[a-z_].*)$")
HASH = re.compile(r"^[0-9a-f]{8}$")


@dataclass(frozen=True)
class Name:
    """What a JPL file name says."""

    sensor: str
    level: str | None
    time: dt.datetime | None
    sidecar: str | None
    """The sidecar kind (a key of :data:`SIDECAR_KINDS`) when the file is not a product."""
    style: str
    """facility, ng or classic."""
    tokens: tuple[str, ...] = ()


def _classic_date(d: str) -> dt.datetime:
    t = dt.datetime.strptime(d, "%y%m%d")
    if t.year > 2030:  # AVIRIS flew from 1987: 87..99 are the 1900s
        t = t.replace(year=t.year - 100)
    return t.replace(tzinfo=dt.UTC)


def _side(tokens) -> str | None:
    for t in tokens:
        t = t.lower()
        if t in SIDECAR_KINDS:
            return t
        if t.startswith("unc"):
            return "unc"
    return None


def parse_name(stem: str) -> Name | None:
    """The sensor, level, time and sidecar kind a JPL AVIRIS name gives; None for other names."""
    m = FACILITY.match(stem)
    if m:
        toks = m["rest"].split("_")
        h = next((i for i, t in enumerate(toks) if HASH.match(t)), None)
        tail = toks[h + 1:] if h is not None else toks[-2:] if len(toks) > 1 and toks[-1] == "ORT" else toks[-1:]
        pge = toks[0]
        sensor = "aviris-3" if m["pfx"] == "AV3" else "aviris-ng"
        t = parse_time(f"{m['date']}t{m['time']}")
        side = _side(tail) or (None if pge != "ORT" else "glt")
        if side is None and tail and tail[0] in ("RDN", "RFL") and all(x == "ORT" for x in tail[1:]):
            return Name(sensor, PRODUCT_LEVEL[tail[0].lower()], t, None, "facility", tuple(toks))
        return Name(sensor, None, t, side or "other", "facility", tuple(toks))
    m = NG.match(stem)
    if m:
        toks = m["rest"].split("_")
        t = parse_time(f"{m['date']}t{m['time']}")
        side = _side(toks)
        if side is None and toks[0] in PRODUCT_LEVEL:
            return Name("aviris-ng", PRODUCT_LEVEL[toks[0]], t, None, "ng", tuple(toks))
        return Name("aviris-ng", None, t, side or "other", "ng", tuple(toks))
    m = CLASSIC.match(stem)
    if m:
        toks = [x for x in m["rest"].split("_") if x]
        t = _classic_date(m["date"])
        side = _side(toks)
        if side is None and toks and toks[0] in PRODUCT_LEVEL:
            return Name("aviris-classic", PRODUCT_LEVEL[toks[0]], t, None, "classic", tuple(toks))
        return Name("aviris-classic", None, t, side or "other", "classic", tuple(toks))
    return None


def loc_candidates(stem: str, name: Name | None) -> list[str]:
    """Names of the geolocation (lon, lat, elev) file of a raw-geometry product stem."""
    out = []
    if stem.endswith("_img"):
        out.append(stem[:-4] + "_loc")
    if name is not None and name.style == "ng":
        pre = stem[: stem.index("_") + 1]
        out.append(pre + "loc" + stem[len(pre) + len(name.tokens[0]):])
    if name is not None and name.style == "facility":
        for tok in ("RDN", "RFL"):
            if stem.endswith("_" + tok):
                out.append(stem[: -len(tok)] + "LOC")
                out.append(stem.replace(f"_L1B_{tok}_", "_L1B_ORT_")[: -len(tok)] + "LOC")
    out.append(stem + "_loc")
    return list(dict.fromkeys(out))


def classic_calibration(data: Path, suffix: str) -> Path | None:
    """The ``.gain`` / ``.spc`` file of an AVIRIS-Classic product: ``<flight>rdn[_x]<suffix>`` beside it whose
    stem starts the product's name (the longest such), else the only one in the folder."""
    m = CLASSIC.match(data.name)
    if not m:
        return None
    cands = sorted(p for p in data.parent.iterdir() if p.suffix.lower() == suffix and p.name.startswith(m["flight"]))
    pref = [p for p in cands if data.name.startswith(p.stem)]
    if pref:
        return max(pref, key=lambda p: len(p.stem))
    return cands[0] if len(cands) == 1 else None


def read_columns(path: Path, bands: int, field: str) -> np.ndarray:
    """Numeric columns of a ``.gain`` / ``.spc`` text file, one row per band."""
    try:
        a = np.loadtxt(path, ndmin=2, comments=("#", ";"))
    except ValueError as e:
        raise perr(path, field, f"not a table of numbers: {e}") from None
    if a.shape[0] != bands:
        raise perr(path, field, f"{a.shape[0]} rows for {bands} bands; expected one row per band")
    return a


def classic_gain(path: Path, bands: int) -> np.ndarray:
    """Per-band gains (radiance = DN / gain): column 1; a column that is just the band numbers is skipped."""
    a = read_columns(path, bands, "gain")
    cols = [c for c in range(a.shape[1]) if not np.array_equal(a[:, c], np.arange(1, bands + 1))]
    g = a[:, cols[0] if cols else 0]
    if not (np.isfinite(g).all() and (g > 0).all()):
        raise perr(path, "gain", "gains must be positive numbers (radiance = DN / gain)")
    return g


def _level_from_header(h: dict) -> str | None:
    lev = str(h.get("processing level", "")).strip().upper()
    if lev in ("L1", "L1B", "L2", "L2A"):
        return lev[:2]
    desc = str(h.get("description", "")).lower()
    if "reflectance" in desc:
        return "L2"
    if "radiance" in desc:
        return "L1"
    return None


def open_envi(path: str | Path) -> Granule:
    hdr = header_path(Path(path))
    if hdr is None:
        raise perr(path, "header", "no ENVI .hdr beside this file")
    r = EnviRaster(hdr)
    h, (bands, lines, samples) = r.header, r.shape
    stem = r.data.name
    name = parse_name(stem)
    if name is not None and name.sidecar is not None:
        raise perr(hdr, "file name", f"{stem} is an AVIRIS {SIDECAR_KINDS.get(name.sidecar, name.sidecar)} sidecar, "
                                     "not a radiance or reflectance product")
    wl, fwhm = r.band_table(required=name is None or name.style != "classic")
    if wl is None:  # AVIRIS-Classic: band centres from the .spc file
        spc = classic_calibration(r.data, ".spc")
        if spc is None:
            raise perr(hdr, "wavelength", "missing from the header and no .spc file beside it")
        a = read_columns(spc, bands, "spc")
        wl, fwhm = band_table(spc, a[:, 0], a[:, 1] if a.shape[1] > 1 else None, field="spc column 1",
                              fwhm_field="spc column 2", n_bands=bands)
    sensor: Sensor = sensor_or_error(hdr, name.sensor) if name else match_sensor(hdr, wl, {"envi"})
    check_order(hdr, wl, sensor)
    level = name.level if name else None
    if level is None:
        level = _level_from_header(h)
        if level is None:
            raise perr(hdr, "level", "neither the file name (rdn/rfl/corr, RDN/RFL) nor the header ('processing "
                                     "level' or description) says whether this is L1 radiance or L2 reflectance")
    spec = level_spec_or_error(hdr, sensor, level)
    if fwhm is None:
        if sensor.n_bands != wl.size:
            raise perr(hdr, "fwhm", f"missing, and the registry's {sensor.name} table has {sensor.n_bands} bands")
        fwhm = sensor.fwhm_nm.copy()
    flags = r.floats("bbl")
    good = sensor.good_band_mask(wl, None if flags is None else flags != 0)
    classic_l1 = sensor.name == "aviris-classic" and level == "L1"
    nodata = r.nodata if r.nodata is not None else spec.nodata
    # AVIRIS-Classic without a data ignore value: off-swath pixels are -50 in every band; a single -50 DN in a pixel
    # with data is a measurement (low SWIR signal), not nodata
    whole_pixel = classic_l1 and r.nodata is None
    scale = np.full(bands, spec.scale_factor, dtype=np.float64)
    offset = np.zeros(bands, dtype=np.float64)
    extra: dict = {}
    if classic_l1 and np.issubdtype(r.dtype, np.integer):
        gfile = classic_calibration(r.data, ".gain")
        if gfile is None:
            raise perr(hdr, "gain", f"AVIRIS-Classic radiance {stem} is stored as integers (radiance = DN / gain) "
                                    "but no <flight>rdn_?.gain file is beside it")
        scale = 1.0 / classic_gain(gfile, bands)
        extra["gain_file"] = str(gfile)
    gains, offs = r.floats("data gain values"), r.floats("data offset values")
    if gains is not None:
        scale = gains
    if offs is not None:
        offset = offs
    if "reflectance scale factor" in h:
        try:
            scale = scale / float(h["reflectance scale factor"])
        except (ValueError, ZeroDivisionError):
            raise perr(hdr, "reflectance scale factor", f"{h['reflectance scale factor']!r}; expected a number") from None
    t = parse_time(str(h["acquisition time"])) if "acquisition time" in h else None
    t = t or (name.time if name else None)
    lat = lon = None
    gsd = None
    loc_file = None
    if r.grid is not None:
        lat, lon = r.grid.latlon(lines, samples)
        gsd = r.grid.gsd_m(lines, samples)
    else:
        lat, lon, loc_file = _read_loc(hdr, stem, name, lines, samples)
        gsd = gsd_from_latlon(lat, lon)
    if gsd is None and "pixel size" in h:
        ps = h["pixel size"]
        try:
            gsd = float((ps if isinstance(ps, list) else str(ps).strip("{} ").split(","))[0])
        except (ValueError, IndexError):
            raise perr(hdr, "pixel size", f"{ps!r}; expected {{x, y, units=Meters}}") from None
    gsd = gsd or sensor.gsd_m
    sc = scale.astype(np.float32)[:, None, None]
    of = offset.astype(np.float32)[:, None, None]
    unit_scale = bool(np.all(scale == 1.0) and np.all(offset == 0.0))

    def read_rows(r0: int, r1: int) -> tuple[np.ndarray, np.ndarray]:
        raw = r.rows(r0, r1)
        cube = raw.astype(np.float32)
        bad = raw == nodata
        if whole_pixel:
            bad = np.broadcast_to(bad.all(axis=0), bad.shape)
        if np.issubdtype(raw.dtype, np.floating):
            bad = bad | np.isnan(raw)
        if not unit_scale:
            cube *= sc
            cube += of
        cube[bad] = np.nan
        return cube, valid_mask(cube, good)

    return Granule(path=str(hdr), granule_id=stem, sensor=sensor.name, level=level, shape=(bands, lines, samples),
                   wavelengths_nm=wl, fwhm_nm=fwhm, good_bands=good, read_rows=read_rows, gsd_m=float(gsd),
                   acquisition_time=t, lat=lat, lon=lon,
                   extra={"format": "envi", "data_file": str(r.data), "loc_file": loc_file, "nodata": nodata,
                          **extra})


def _read_loc(hdr: Path, stem: str, name: Name | None, lines: int, samples: int):
    for cand in loc_candidates(stem, name):
        lhdr = header_path(hdr.with_name(cand))
        if lhdr is None:
            continue
        loc = EnviRaster(lhdr)
        lb, ll, ls = loc.shape
        if (ll, ls) != (lines, samples) or lb < 2:
            raise perr(lhdr, "samples/lines", f"geolocation is {ll} x {ls} with {lb} bands; expected {lines} x "
                                              f"{samples} with bands lon, lat[, elev]")
        mm = loc.rows(0, ll)
        lon = np.array(mm[0], dtype=np.float64)
        lat = np.array(mm[1], dtype=np.float64)
        fill = loc.nodata if loc.nodata is not None else -9999.0
        lat[lat == fill], lon[lon == fill] = np.nan, np.nan
        if np.nanmax(np.abs(lat), initial=0) > 90 or np.nanmax(np.abs(lon), initial=0) > 360:
            raise perr(lhdr, "band names", "band 1 must be longitude and band 2 latitude (WGS-84 degrees)")
        return lat, lon, str(loc.data)
    return None, None, None


# ------------------------------------------------------------------ writer (the simulator's products)
#: AVIRIS-Classic gains by band (1-based inclusive ranges), as a third-party reader gives them (UNVERIFIED split)
CLASSIC_GAINS = ((1, 110, 300.0), (111, 160, 600.0), (161, 224, 1200.0))
CLASSIC_OFF_SWATH = -50


def product_stem(sensor: str, level: str, t: dt.datetime) -> str:
    h = f"{zlib.crc32(f'{sensor}{level}{t:%Y%m%dT%H%M%S}'.encode()):08x}"
    if sensor == "aviris-ng":
        return f"ang{t:%Y%m%d}t{t:%H%M%S}_{'rdn' if level == 'L1' else 'corr'}_v2p9_img"
    if sensor == "aviris-3":
        return (f"AV3{t:%Y%m%d}t{t:%H%M%S}_L1B_RDN_main_{h}_RDN_ORT" if level == "L1"
                else f"AV3{t:%Y%m%d}t{t:%H%M%S}_L2A_OE_main_{h}_RFL_ORT")
    if sensor == "aviris-classic":
        run = f"f{t:%y%m%d}t{t:%H}p{t:%M}r{t:%S}"
        return f"{run}rdn_e_sc01_ort_img" if level == "L1" else f"{run}_rfl_sc01_ort_img"
    return f"{sensor}_{t:%Y%m%dt%H%M%S}_{'rdn' if level == 'L1' else 'rfl'}"


def _ortho_grid(lat, lon) -> Grid:
    crs = utm_crs(float(np.mean(lat)), float(np.mean(lon)))
    x, y = from_latlon(crs, lat, lon)
    return Grid(fit_transform(x, y), crs)


def write_envi(out_dir: Path, *, sensor: Sensor, level: str, cube, name=None, lat=None, lon=None, time=None,
               wavelengths_nm=None, fwhm_nm=None, gsd_m=None) -> Path:
    """Write the product as the JPL portal delivers it; returns its header.

    AVIRIS-NG L1: raw geometry float32 BIL + ``_loc`` (lon, lat, elev) + ``_obs``; AVIRIS-NG L2 ``_corr`` and
    AVIRIS-3 ``_ORT`` cubes: orthorectified, rotated UTM ``map info`` fitted to lat/lon, with their ``_h2o`` /
    ``_UNC_ORT`` / ``_GLT`` sidecars; AVIRIS-Classic L1: int16 big-endian BIP DN = radiance x gain with the
    ``.gain`` and ``.spc`` files, -50 off-swath, no ``data ignore value``. No ``processing level`` or
    ``acquisition time`` keys (real headers have none): the name says both. Without lat/lon, no geolocation.
    """
    spec = sensor.level(level)
    cube, wl, fw = prepare_cube(cube, sensor, wavelengths_nm, fwhm_nm)
    bands, rows, cols = cube.shape
    t = utc(time)
    stem = name or product_stem(sensor.name, level, t)
    parsed = parse_name(stem)
    style = parsed.style if parsed else "other"
    ortho = lat is not None and not (style == "ng" and level == "L1")
    meta: dict = {"description": f"{stem}", "wavelength units": "Nanometers",
                  "wavelength": [f"{w:.3f}" for w in wl], "fwhm": [f"{w:.3f}" for w in fw]}
    if ortho:
        grid = _ortho_grid(lat, lon)
        meta.update(map_info_fields(grid))
    if parsed is None:  # a plain name: the header must say the level
        meta["processing level"] = level
        meta["description"] = f"{sensor.display_name} {'radiance' if level == 'L1' else 'reflectance'} {stem}"
    if style == "classic" and level == "L1":
        gain = np.empty(bands)
        for a, b, g in CLASSIC_GAINS:
            gain[a - 1:b] = g
        gain = gain[:bands] if bands <= gain.size else np.full(bands, 300.0)
        dn = np.round(np.nan_to_num(cube, nan=0.0) * gain[:, None, None].astype(np.float32))
        dn = np.clip(dn, -32767, 32767).astype(np.int16)
        dn[np.isnan(cube)] = CLASSIC_OFF_SWATH
        hdr = write_raster(out_dir, stem, dn, meta, interleave="bip", byte_order=1)
        run = stem[: stem.index("_sc")] if "_sc" in stem else stem
        (out_dir / f"{run}.gain").write_text("".join(f"{g:10.3f} {i + 1:5d}\n" for i, g in enumerate(gain)))
        (out_dir / f"{run}.spc").write_text("".join(f"{w:10.4f} {f:8.4f} {0.0:6.3f} {0.0:6.3f} {i + 1:5d}\n"
                                                    for i, (w, f) in enumerate(zip(wl, fw, strict=True))))
        write_raster(out_dir, stem.replace("_ort_img", "_ort_glt"), np.zeros((2, rows, cols), np.int32), {},
                     interleave="bil")
        return hdr
    meta["data ignore value"] = f"{spec.nodata:g}"
    data = np.where(np.isnan(cube), np.float32(spec.nodata), cube).astype(np.float32)
    hdr = write_raster(out_dir, stem, data, meta, interleave="bil", byte_order=0)
    zeros = np.zeros((3, rows, cols), np.float32)
    if style == "ng" and level == "L1":
        if lat is None:
            return hdr
        loc = np.stack([lon, lat, np.zeros_like(lat)]).astype(np.float64)  # BIL like the real loc files
        write_raster(out_dir, loc_candidates(stem, parsed)[0], loc, {
            "description": f"{stem} geolocation", "band names": ["Longitude (WGS-84)", "Latitude (WGS-84)",
                                                                  "Elevation (m)"]})
        write_raster(out_dir, stem[:-4] + "_obs" if stem.endswith("_img") else stem + "_obs",
                     np.zeros((11, rows, cols), np.float64), {"description": f"{stem} observation geometry"})
    elif style == "ng" and "_corr_" in stem:
        write_raster(out_dir, stem.replace("_corr_", "_h2o_"), zeros, {**_grid_meta(meta), "band names": [
            "H2O (g cm-2)", "Liquid water (cm)", "Ice (cm)"]})
    elif style == "facility" and stem.endswith("_RDN_ORT"):
        ort = stem.replace("_L1B_RDN_", "_L1B_ORT_").rsplit("_RDN_ORT", 1)[0]
        write_raster(out_dir, f"{ort}_GLT", np.zeros((2, rows, cols), np.int32), _grid_meta(meta))
        write_raster(out_dir, f"{ort}_OBS_ORT", np.zeros((11, rows, cols), np.float32), _grid_meta(meta))
    elif style == "facility" and stem.endswith("_RFL_ORT"):
        write_raster(out_dir, stem.replace("_RFL_ORT", "_UNC_ORT"), np.full(cube.shape, 0.01, np.float32),
                     {**_grid_meta(meta), "wavelength": meta["wavelength"], "wavelength units": "Nanometers"})
    return hdr


def _grid_meta(meta: dict) -> dict:
    return {k: meta[k] for k in ("map info",) if k in meta}


def header_band_count(hdr: Path) -> int:
    """The ``bands`` of an ENVI header (discovery's cheap check)."""
    return header_int(read_header(hdr), "bands", hdr)


__all__ = ["SIDECAR_KINDS", "Name", "classic_calibration", "header_band_count", "loc_candidates", "open_envi",
           "parse_name", "write_envi", "write_header"]

"""ENVI (.hdr + raw binary) products of AVIRIS-Classic, AVIRIS-NG and AVIRIS-3, via ``spectral``.

Names (the sensor, level and time are read from them, as JPL names its products):

- AVIRIS-NG ``ang20230405t123456_rdn_v2p9`` (L1), ``..._rfl_v2p9`` / ``_corr_`` (L2); geolocation in
  ``ang20230405t123456_loc_v2p9`` (bands lon, lat, elev; float64 BIL) beside it.
- AVIRIS-3 ``AV320230405t123456_001_L1B_RDN`` (L1), ``..._L2A_RFL`` (L2); geolocation ``..._LOC``.
- AVIRIS-Classic ``f230405t12p34r56_rdn`` / ``_rfl`` / ``_corr`` (flight, part, run); the name has the
  date only, so the writer also puts ``acquisition time`` in the header; geolocation ``..._loc``.

A name that matches none of these falls back to the header: band count and centres matched against
the registry, level from ``processing level`` or the description.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from pathlib import Path

import numpy as np
import spectral.io.envi as envi

from data_prep.formats._common import (
    check_band_table,
    check_increasing,
    level_spec_or_error,
    match_sensor,
    parse_time,
    perr,
    prepare_cube,
    sensor_or_error,
    utc,
    valid_mask,
)
from data_prep.granule import Granule
from data_prep.registry import Sensor

NAME_PATTERNS: tuple[tuple[str, re.Pattern], ...] = (
    ("aviris-ng", re.compile(r"^ang(?P<date>\d{8})t(?P<time>\d{6})_(?P<tok>rdn|rfl|corr)(?=_|$)")),
    ("aviris-3", re.compile(r"^AV3(?P<date>\d{8})t(?P<time>\d{6})_.*?(?P<tok>RDN|RFL)(?=_|$)")),
    ("aviris-classic", re.compile(r"^f(?P<date>\d{6})t\d{2}p\d{2}r\d{2}_(?P<tok>rdn|rfl|corr)(?=_|$)")),
)
LEVEL_OF_TOKEN = {"rdn": "L1", "rfl": "L2", "corr": "L2"}
#: stems of sidecars that are not products (geolocation, geometry, GLT, IGM)
SIDECAR = re.compile(r"(^|_)(loc|obs|igm|glt|obs_ort|LOC|OBS|IGM|GLT)(_|$)")
DATA_EXTS = ("", ".img", ".dat", ".bin", ".raw", ".bil", ".bsq", ".bip")
DTYPES = {1: np.uint8, 2: np.int16, 3: np.int32, 4: np.float32, 5: np.float64, 12: np.uint16, 13: np.uint32,
          14: np.int64, 15: np.uint64}


def is_sidecar(stem: str) -> bool:
    return bool(SIDECAR.search(stem))


def header_path(path: Path) -> Path | None:
    """The .hdr of an ENVI product given the header or the data file; None if there is none."""
    path = Path(path)
    if path.suffix.lower() == ".hdr":
        return path
    for cand in (path.with_name(path.name + ".hdr"), path.with_suffix(".hdr")):
        if cand.exists():
            return cand
    return None


def data_path(hdr: Path) -> Path:
    stem = hdr.with_suffix("")
    for ext in DATA_EXTS:
        cand = stem.with_name(stem.name + ext)
        if cand.is_file() and cand != hdr:
            return cand
    raise perr(hdr, "data file", f"no binary data file beside the header (tried {stem.name}{{{','.join(DATA_EXTS)}}})")


def _read_header(hdr: Path) -> dict:
    try:
        return envi.read_envi_header(str(hdr))
    except Exception as e:  # spectral raises its own FileNotAnEnviHeader / parse errors
        raise perr(hdr, "header", f"not a readable ENVI header: {e}") from None


def _int(h: dict, key: str, hdr: Path) -> int:
    try:
        return int(str(h[key]).strip())
    except KeyError:
        raise perr(hdr, key, "missing from the header") from None
    except ValueError:
        raise perr(hdr, key, f"{h[key]!r} is not an integer") from None


def _floats(h: dict, key: str, hdr: Path) -> np.ndarray:
    try:
        vals = h[key]
        if isinstance(vals, str):
            vals = [v for v in vals.strip("{} ").split(",") if v.strip()]
        return np.asarray([float(v) for v in vals], dtype=np.float64)
    except ValueError as e:
        raise perr(hdr, key, f"not a list of numbers: {e}") from None


def parse_name(stem: str) -> tuple[str | None, str | None, dt.datetime | None, re.Match | None]:
    """(sensor, level, time, match) from a JPL product name; Nones where the name says nothing."""
    for sensor, pat in NAME_PATTERNS:
        m = pat.match(stem)
        if m:
            level = LEVEL_OF_TOKEN[m["tok"].lower()]
            date = m["date"]
            if len(date) == 6:
                t = dt.datetime.strptime(date, "%y%m%d").replace(tzinfo=dt.UTC)
            else:
                t = parse_time(f"{date}t{m['time']}")
            return sensor, level, t, m
    return None, None, None, None


def loc_candidates(stem: str, m: re.Match | None) -> list[str]:
    """Names of the geolocation file that goes with a product stem."""
    out = []
    if m is not None:
        tok = m["tok"]
        loc = "LOC" if tok.isupper() else "loc"
        a, b = m.span("tok")
        out.append(stem[:a] + loc + stem[b:])
        last = stem.rfind(f"_{tok}")  # JPL's AV3 names end in the product token: ..._L1B_RDN_<hash>_RDN -> _LOC
        if last >= 0 and last + 1 != a:
            out.append(stem[:last + 1] + loc + stem[last + 1 + len(tok):])
    if stem.endswith("_img"):
        out.append(stem[:-4] + "_loc")
    out.append(stem + "_loc")
    return out


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
    h = _read_header(hdr)
    data = data_path(hdr)
    samples, lines, bands = (_int(h, k, hdr) for k in ("samples", "lines", "bands"))
    dtype_code = _int(h, "data type", hdr)
    if dtype_code not in DTYPES:
        raise perr(hdr, "data type", f"{dtype_code} is not a supported ENVI data type {sorted(DTYPES)}")
    offset = int(str(h.get("header offset", "0")).strip() or 0)
    itemsize = np.dtype(DTYPES[dtype_code]).itemsize
    expected = offset + samples * lines * bands * itemsize
    actual = os.path.getsize(data)
    if actual != expected:
        raise perr(hdr, "bands", f"header says {bands} bands x {lines} lines x {samples} samples x {itemsize} bytes "
                                 f"(+{offset} offset) = {expected} bytes, but {data.name} has {actual} bytes "
                                 "(truncated or wrong band count)")
    interleave = str(h.get("interleave", "bsq")).strip().lower()
    if interleave not in ("bil", "bip", "bsq"):
        raise perr(hdr, "interleave", f"{interleave!r}; expected bil, bip or bsq")
    if "wavelength" not in h:
        raise perr(hdr, "wavelength", "missing from the header; band centres are required")
    wl = _floats(h, "wavelength", hdr)
    if wl.size != bands:
        raise perr(hdr, "wavelength", f"{wl.size} centres for {bands} bands")
    units = str(h.get("wavelength units", "")).strip().lower()
    units = "" if units == "unknown" else units
    if units in ("micrometers", "micrometer", "microns", "micron", "um") or (not units and np.nanmax(wl) < 100):
        wl = wl * 1000.0
    fwhm = _floats(h, "fwhm", hdr) if "fwhm" in h else None
    if fwhm is not None and (units in ("micrometers", "micrometer", "microns", "micron", "um")
                             or (not units and np.nanmax(fwhm) < 1)):
        fwhm = fwhm * 1000.0
    wl, fwhm = check_band_table(hdr, wl, fwhm)

    stem = data.name
    sensor_name, level, t_name, m = parse_name(stem)
    sensor: Sensor = sensor_or_error(hdr, sensor_name) if sensor_name else match_sensor(hdr, wl, {"envi"})
    check_increasing(hdr, wl, sensor)
    if level is None:
        level = _level_from_header(h)
        if level is None:
            raise perr(hdr, "level", "neither the file name (rdn/rfl/corr) nor the header ('processing level' or "
                                     "description) says whether this is L1 radiance or L2 reflectance")
    spec = level_spec_or_error(hdr, sensor, level)
    if fwhm is None:
        if sensor.n_bands != wl.size:
            raise perr(hdr, "fwhm", f"missing, and the registry's {sensor.name} table has {sensor.n_bands} bands")
        fwhm = sensor.fwhm_nm.copy()
    nodata = float(h["data ignore value"]) if "data ignore value" in h else spec.nodata
    t = parse_time(str(h["acquisition time"])) if "acquisition time" in h else None
    t = t or t_name
    gsd = sensor.gsd_m
    if "pixel size" in h:
        ps = h["pixel size"]
        try:
            gsd = float((ps if isinstance(ps, list) else str(ps).strip("{} ").split(","))[0])
        except (ValueError, IndexError):
            raise perr(hdr, "pixel size", f"{ps!r}; expected {{x, y, units=Meters}}") from None
    lat, lon, loc_file = _read_loc(hdr, stem, m, lines, samples)
    good = sensor.good_band_mask(wl)
    scale = spec.scale_factor
    img_hdr = str(hdr)
    img_data = str(data)

    def read_rows(r0: int, r1: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= r0 <= r1 <= lines:
            raise IndexError(f"{img_data}: rows {r0}:{r1} outside 0:{lines}")
        mm = envi.open(img_hdr, img_data).open_memmap(interleave="bsq")
        raw = np.asarray(mm[:, r0:r1, :])
        cube = raw.astype(np.float32)
        cube[(raw == nodata) | np.isnan(raw)] = np.nan
        if scale != 1.0:
            cube *= np.float32(scale)
        return cube, valid_mask(cube, good)

    return Granule(path=str(hdr), granule_id=stem, sensor=sensor.name, level=level, shape=(bands, lines, samples),
                   wavelengths_nm=wl, fwhm_nm=fwhm, good_bands=good, read_rows=read_rows, gsd_m=gsd,
                   acquisition_time=t, lat=lat, lon=lon,
                   extra={"format": "envi", "data_file": str(data), "loc_file": loc_file, "nodata": nodata})


def _read_loc(hdr: Path, stem: str, m, lines: int, samples: int):
    for name in loc_candidates(stem, m):
        lhdr = hdr.with_name(name + ".hdr")
        if not lhdr.exists():
            continue
        h = _read_header(lhdr)
        ldata = data_path(lhdr)
        ls, ll, lb = (_int(h, k, lhdr) for k in ("samples", "lines", "bands"))
        if (ll, ls) != (lines, samples) or lb < 2:
            raise perr(lhdr, "samples/lines", f"geolocation is {ll} x {ls} with {lb} bands; expected {lines} x "
                                              f"{samples} with bands lon, lat[, elev]")
        dtc = _int(h, "data type", lhdr)
        expected = int(h.get("header offset", 0)) + ls * ll * lb * np.dtype(DTYPES.get(dtc, np.float64)).itemsize
        if os.path.getsize(ldata) != expected:
            raise perr(lhdr, "bands", f"geolocation file {ldata.name} has {os.path.getsize(ldata)} bytes; "
                                      f"the header implies {expected}")
        mm = envi.open(str(lhdr), str(ldata)).open_memmap(interleave="bsq")
        lon = np.asarray(mm[0], dtype=np.float64)
        lat = np.asarray(mm[1], dtype=np.float64)
        if np.nanmax(np.abs(lat)) > 90 or np.nanmax(np.abs(lon)) > 360:
            raise perr(lhdr, "band names", "band 1 must be longitude and band 2 latitude (WGS-84 degrees)")
        return lat, lon, str(ldata)
    return None, None, None


# ------------------------------------------------------------------ writer
def product_stem(sensor: str, level: str, t: dt.datetime) -> str:
    if sensor == "aviris-ng":
        return f"ang{t:%Y%m%d}t{t:%H%M%S}_{'rdn' if level == 'L1' else 'rfl'}_v2p9"
    if sensor == "aviris-3":
        return f"AV3{t:%Y%m%d}t{t:%H%M%S}_001_{'L1B_RDN' if level == 'L1' else 'L2A_RFL'}"
    if sensor == "aviris-classic":
        return f"f{t:%y%m%d}t{t:%H}p{t:%M}r{t:%S}_{'rdn' if level == 'L1' else 'rfl'}"
    return f"{sensor}_{t:%Y%m%dt%H%M%S}_{'rdn' if level == 'L1' else 'rfl'}"


def _write_raw(path: Path, blocks) -> None:
    tmp = path.with_name(f".{path.name}.part-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            for b in blocks:
                f.write(np.ascontiguousarray(b).tobytes())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_header(path: Path, meta: dict) -> None:
    tmp = path.with_name(f".{path.name}.part-{os.getpid()}")
    try:
        envi.write_envi_header(str(tmp), meta)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_envi(out_dir: Path, *, sensor: Sensor, level: str, cube, name=None, lat=None, lon=None, time=None,
               wavelengths_nm=None, fwhm_nm=None, gsd_m=None) -> Path:
    """BIL float32 little-endian, NaN written as -9999 (``data ignore value``); returns the .hdr."""
    spec = sensor.level(level)
    cube, wl, fw = prepare_cube(cube, sensor, wavelengths_nm, fwhm_nm)
    bands, rows, cols = cube.shape
    t = utc(time)
    stem = name or product_stem(sensor.name, level, t)
    data = out_dir / stem
    hdr = out_dir / f"{stem}.hdr"
    fill = np.float32(spec.nodata)
    step = max(1, (64 << 20) // max(1, bands * cols * 4))

    def blocks():
        for r in range(0, rows, step):
            b = cube[:, r:r + step, :].transpose(1, 0, 2)
            yield np.where(np.isnan(b), fill, b).astype("<f4")

    _write_raw(data, blocks())
    if lat is not None:
        _, _, _, m = parse_name(stem)
        lstem = loc_candidates(stem, m)[0]
        loc = np.stack([lon, lat, np.zeros_like(lat)], axis=1).astype("<f8")  # (rows, 3, cols) = BIL
        _write_raw(out_dir / lstem, [loc])
        _write_header(out_dir / f"{lstem}.hdr", {
            "description": f"{stem} geolocation", "samples": cols, "lines": rows, "bands": 3, "header offset": 0,
            "file type": "ENVI Standard", "data type": 5, "interleave": "bil", "byte order": 0,
            "band names": ["Longitude (WGS-84)", "Latitude (WGS-84)", "Elevation (m)"]})
    meta = {
        "description": f"{sensor.display_name} {'L1 radiance' if level == 'L1' else 'L2 reflectance'} {stem}",
        "samples": cols, "lines": rows, "bands": bands, "header offset": 0, "file type": "ENVI Standard",
        "data type": 4, "interleave": "bil", "byte order": 0, "sensor type": sensor.display_name,
        "processing level": level, "acquisition time": t.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "wavelength units": "Nanometers", "data ignore value": f"{spec.nodata:g}",
        "wavelength": [f"{w:.3f}" for w in wl], "fwhm": [f"{w:.3f}" for w in fw],
    }
    if gsd_m is not None:
        meta["pixel size"] = [f"{gsd_m:g}", f"{gsd_m:g}", "units=Meters"]
    _write_header(hdr, meta)
    return hdr

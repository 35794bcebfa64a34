"""Map geometry of products: CRS (pyproj), affine pixel grids, ENVI ``map info``, GeoTIFF GeoKeys, and the WGS-84
latitude/longitude of every pixel centre.

Guarantees:

- A product grid is a :class:`Grid`: a GDAL-style affine transform of pixel *corners* (``x = x0 + a*col + b*row``,
  ``y = y0 + d*col + e*row``) and the CRS it is in. ``Grid.latlon`` projects the pixel centres to WGS-84 degrees
  with pyproj, so UTM metres never reach the patch metadata as if they were degrees; a grid without a known CRS
  gives no lat/lon (None), never a guess.
- ENVI ``map info`` follows ENVI/GDAL: reference pixel 1-based with (1, 1) the upper-left corner of the first
  pixel, ``rotation=`` degrees (``a = sx cos r, b = sy sin r, d = sx sin r, e = -sy cos r``, as GDAL reads AVIRIS
  rotated grids); the CRS from ``coordinate system string`` (WKT) when present, else from the UTM zone and
  hemisphere (WGS-84, NAD83, NAD27) or ``Geographic Lat/Lon``.
- GeoTIFF grids from ModelTransformation or ModelPixelScale + ModelTiepoint (PixelIsPoint shifted by half a pixel,
  as GDAL does) and the EPSG code of ProjectedCSTypeGeoKey / GeographicTypeGeoKey (or the citation of a
  user-defined one), read through tifffile's GeoTIFF parser.
- ``gsd_m`` of a grid is its pixel side in metres: the area-equivalent side ``sqrt(|a e - b d|)`` for a metric
  CRS, the geodesic spacing of neighbouring pixel centres for a geographic one.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import numpy as np
import pyproj

from data_prep.granule import ProductError

log = logging.getLogger(__name__)
WGS84 = pyproj.CRS.from_epsg(4326)
_GEOD = pyproj.Geod(ellps="WGS84")
#: ENVI datum names -> (EPSG of UTM zone 1 North, of zone 1 South or None)
_UTM_BASE = {"wgs-84": (32601, 32701), "wgs84": (32601, 32701), "north america 1983": (26901, None),
             "nad83": (26901, None), "north america 1927": (26701, None), "nad27": (26701, None)}


def _err(path, field: str, msg: str) -> ProductError:
    return ProductError(f"{path}: field {field}: {msg}")


@functools.lru_cache(maxsize=64)
def _to_wgs84(crs_wkt: str) -> pyproj.Transformer:
    return pyproj.Transformer.from_crs(pyproj.CRS.from_wkt(crs_wkt), WGS84, always_xy=True)


@functools.lru_cache(maxsize=64)
def _from_wgs84(crs_wkt: str) -> pyproj.Transformer:
    return pyproj.Transformer.from_crs(WGS84, pyproj.CRS.from_wkt(crs_wkt), always_xy=True)


def to_latlon(crs: pyproj.CRS, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(lat, lon) WGS-84 degrees of map coordinates ``x``/``y`` (easting/northing or lon/lat) in ``crs``."""
    lon, lat = _to_wgs84(crs.to_wkt()).transform(np.asarray(x, np.float64), np.asarray(y, np.float64))
    return np.asarray(lat, np.float64), np.asarray(lon, np.float64)


def from_latlon(crs: pyproj.CRS, lat: np.ndarray, lon: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) in ``crs`` of WGS-84 ``lat``/``lon`` (the writers' side)."""
    x, y = _from_wgs84(crs.to_wkt()).transform(np.asarray(lon, np.float64), np.asarray(lat, np.float64))
    return np.asarray(x, np.float64), np.asarray(y, np.float64)


def utm_crs(lat: float, lon: float) -> pyproj.CRS:
    """The WGS-84 UTM zone CRS of a point (EPSG 326zz north, 327zz south)."""
    zone = int(np.clip(np.floor((lon + 180.0) / 6.0) + 1, 1, 60))
    return pyproj.CRS.from_epsg((32600 if lat >= 0 else 32700) + zone)


def crs_from(path, field: str, value) -> pyproj.CRS:
    """A CRS from an EPSG code, WKT, PROJ string or CF grid-mapping attributes; ProductError naming the field."""
    try:
        if isinstance(value, dict):
            return pyproj.CRS.from_cf(value)
        return pyproj.CRS.from_user_input(int(value) if isinstance(value, (int, np.integer)) else value)
    except (pyproj.exceptions.CRSError, TypeError, ValueError) as e:
        raise _err(path, field, f"not a coordinate reference system pyproj understands: {e}") from None


@dataclass(frozen=True)
class Grid:
    """An affine pixel grid (GDAL geotransform of pixel corners) in a CRS (None: unknown)."""

    transform: tuple[float, float, float, float, float, float]
    crs: pyproj.CRS | None

    def xy(self, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
        """Map coordinates (x, y), float64 (rows, cols), of the pixel centres."""
        x0, a, b, y0, d, e = self.transform
        rr, cc = np.meshgrid(np.arange(rows) + 0.5, np.arange(cols) + 0.5, indexing="ij")
        return x0 + a * cc + b * rr, y0 + d * cc + e * rr

    def latlon(self, rows: int, cols: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        """WGS-84 (lat, lon) degrees, float64 (rows, cols), of the pixel centres; (None, None) without a CRS."""
        if self.crs is None:
            return None, None
        x, y = self.xy(rows, cols)
        if self.crs.is_geographic and self.crs.equals(WGS84, ignore_axis_order=True):
            return y, x
        return to_latlon(self.crs, x, y)

    def gsd_m(self, rows: int, cols: int) -> float | None:
        """Pixel side in metres (area-equivalent), or None when the CRS is unknown."""
        x0, a, b, y0, d, e = self.transform
        if self.crs is None:
            return None
        if self.crs.is_projected:
            unit = self.crs.axis_info[0].unit_conversion_factor if self.crs.axis_info else 1.0
            return float(np.sqrt(abs(a * e - b * d)) * unit)
        lat, lon = Grid(self.transform, self.crs).latlon(min(rows, 3), min(cols, 3))
        return gsd_from_latlon(lat, lon)


def flight_grid(rows: int, cols: int, gsd_m: float, centre: tuple[float, float], heading_deg: float = 0.0) -> Grid:
    """A grid of ``gsd_m`` pixels in the UTM zone of ``centre`` (lat, lon), centred on it, its rows running along
    ``heading_deg`` (clockwise from north; 0 = north-up, row 0 at the north edge): the writers' and the simulator's
    flight-line geometry, affine in UTM so the UTM products describe it exactly."""
    crs = utm_crs(*centre)
    x0, y0 = (float(v) for v in from_latlon(crs, np.array(centre[0]), np.array(centre[1])))
    h = np.deg2rad(heading_deg)
    a, d = gsd_m * np.cos(h), -gsd_m * np.sin(h)  # one column: east and north
    b, e = -gsd_m * np.sin(h), -gsd_m * np.cos(h)  # one row
    return Grid((x0 - a * cols / 2 - b * rows / 2, a, b, y0 - d * cols / 2 - e * rows / 2, d, e), crs)


def gsd_from_latlon(lat: np.ndarray | None, lon: np.ndarray | None) -> float | None:
    """Area-equivalent pixel side (m) from per-pixel WGS-84 centres: sqrt(median along-row x median along-column
    geodesic spacing) over at most a 64 x 64 subsample; None if there are fewer than 2 x 2 finite pixels."""
    if lat is None or lon is None:
        return None
    lat, lon = np.asarray(lat, np.float64), np.asarray(lon, np.float64)
    if lat.ndim != 2 or min(lat.shape) < 2:
        return None
    sr, sc = max(1, lat.shape[0] // 64), max(1, lat.shape[1] // 64)
    la, lo = lat[::sr, ::sc], lon[::sr, ::sc]
    steps = []
    for (a0, o0, a1, o1), k in (((la[:, :-1], lo[:, :-1], la[:, 1:], lo[:, 1:]), sc),
                                ((la[:-1], lo[:-1], la[1:], lo[1:]), sr)):
        ok = np.isfinite(a0) & np.isfinite(a1) & np.isfinite(o0) & np.isfinite(o1)
        if not ok.any():
            return None
        _, _, dist = _GEOD.inv(o0[ok], a0[ok], o1[ok], a1[ok])
        steps.append(float(np.median(dist)) / k)
    g = float(np.sqrt(steps[0] * steps[1]))
    return g if np.isfinite(g) and g > 0 else None


def fit_transform(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float, float, float, float]:
    """The affine transform (pixel corners) whose pixel centres best fit map coordinates ``x``/``y`` (rows, cols);
    exact for an affine grid (the writers' side)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    rows, cols = x.shape
    rr, cc = np.meshgrid(np.arange(rows) + 0.5, np.arange(cols) + 0.5, indexing="ij")
    m = np.stack([np.ones(rr.size), cc.ravel(), rr.ravel()], axis=1)
    if rows * cols < 3:
        m = m[:, :1]
    px, *_ = np.linalg.lstsq(m, x.ravel(), rcond=None)
    py, *_ = np.linalg.lstsq(m, y.ravel(), rcond=None)
    px, py = np.pad(px, (0, 3 - px.size)), np.pad(py, (0, 3 - py.size))
    return (float(px[0]), float(px[1]), float(px[2]), float(py[0]), float(py[1]), float(py[2]))


# ------------------------------------------------------------------ ENVI map info
def _map_info_items(value) -> list[str]:
    if isinstance(value, str):
        value = value.strip().strip("{}").split(",")
    return [str(v).strip() for v in value if str(v).strip()]


def parse_map_info(path, header: dict) -> Grid | None:
    """The grid of an ENVI header's ``map info`` (None if absent); ProductError naming the field if malformed."""
    if "map info" not in header:
        return None
    raw = header["map info"]
    items = _map_info_items(raw)
    keyed = {k.strip().lower(): v.strip() for k, v in (i.split("=", 1) for i in items if "=" in i)}
    pos = [i for i in items if "=" not in i]
    try:
        name = pos[0]
        refx, refy, east, north, sx, sy = (float(v) for v in pos[1:7])
    except (IndexError, ValueError):
        raise _err(path, "map info", f"{raw!r}; expected {{projection, ref x, ref y, easting, northing, "
                                     "pixel x, pixel y, ...}") from None
    if not (sx > 0 and sy > 0):
        raise _err(path, "map info", f"pixel size {sx} x {sy}; expected positive sizes")
    rot = np.deg2rad(float(keyed.get("rotation", 0.0) or 0.0))
    c, s = float(np.cos(rot)), float(np.sin(rot))
    a, b, d, e = sx * c, sy * s, sx * s, -sy * c
    x0 = east - (refx - 1.0) * a - (refy - 1.0) * b
    y0 = north - (refx - 1.0) * d - (refy - 1.0) * e
    crs = None
    wkt = header.get("coordinate system string")
    if wkt:
        wkt = wkt if isinstance(wkt, str) else ",".join(wkt)
        crs = crs_from(path, "coordinate system string", wkt.strip().strip("{}"))
    elif name.lower() == "utm":
        try:
            zone, hemi, datum = int(pos[7]), pos[8].lower(), pos[9].lower()
        except (IndexError, ValueError):
            raise _err(path, "map info", f"{raw!r}; a UTM map info needs zone, North/South and datum") from None
        base = _UTM_BASE.get(datum)
        if base is None or not 1 <= zone <= 60 or (hemi.startswith("s") and base[1] is None):
            raise _err(path, "map info", f"UTM zone {zone} {hemi} on datum {pos[9]!r}: not a zone pyproj can "
                                         "project (expected WGS-84, NAD83 or NAD27; or add a coordinate system "
                                         "string)")
        crs = pyproj.CRS.from_epsg((base[1] if hemi.startswith("s") else base[0]) + zone - 1)
    elif name.lower().startswith("geographic"):
        crs = WGS84
    else:
        log.warning("%s: map info projection %r without a coordinate system string: no lat/lon", path, name)
    units = keyed.get("units", "").lower()
    if crs is not None and crs.is_projected and units and units not in ("meters", "metres", "m"):
        raise _err(path, "map info", f"units={keyed['units']}; expected Meters for projection {name}")
    return Grid((x0, a, b, y0, d, e), crs)


def map_info_fields(grid: Grid) -> dict[str, object]:
    """The ``map info`` header entry of a grid (the writers' side): the UTM zone form when the CRS is a WGS-84 UTM
    zone (geographic for EPSG:4326), with ``rotation=`` when the grid is rotated."""
    x0, a, b, y0, d, e = grid.transform
    sx, sy = float(np.hypot(a, d)), float(np.hypot(b, e))
    rot = float(np.rad2deg(np.arctan2(d, a)))
    epsg = grid.crs.to_epsg() if grid.crs is not None else None
    tail = [f"rotation={rot:.10g}"] if abs(rot) > 1e-9 else []
    if epsg and (32601 <= epsg <= 32660 or 32701 <= epsg <= 32760):
        zone, hemi = epsg % 100, "North" if epsg < 32700 else "South"
        info = ["UTM", "1", "1", f"{x0:.6f}", f"{y0:.6f}", f"{sx:.10g}", f"{sy:.10g}", str(zone), hemi, "WGS-84",
                "units=Meters", *tail]
    elif epsg == 4326:
        info = ["Geographic Lat/Lon", "1", "1", f"{x0:.10f}", f"{y0:.10f}", f"{sx:.10g}", f"{sy:.10g}", "WGS-84",
                "units=Degrees", *tail]
    else:
        raise ValueError(f"map info: only WGS-84 UTM or geographic grids are written, not {grid.crs}")
    out: dict[str, object] = {"map info": info}
    return out


# ------------------------------------------------------------------ GeoTIFF
def grid_from_geotiff(path, geokeys: dict | None) -> Grid | None:
    """The grid of a GeoTIFF from tifffile's ``geotiff_metadata`` (None when it has no georeferencing)."""
    if not geokeys:
        return None
    if "ModelTransformation" in geokeys:
        m = np.asarray(geokeys["ModelTransformation"], dtype=np.float64).reshape(4, 4)
        t = (m[0, 3], m[0, 0], m[0, 1], m[1, 3], m[1, 0], m[1, 1])
    elif "ModelPixelScale" in geokeys and "ModelTiepoint" in geokeys:
        sx, sy = (float(v) for v in np.ravel(geokeys["ModelPixelScale"])[:2])
        i, j, _, x, y, _ = (float(v) for v in np.ravel(geokeys["ModelTiepoint"])[:6])
        t = (x - i * sx, sx, 0.0, y + j * sy, 0.0, -sy)
    else:
        return None
    if int(geokeys.get("GTRasterTypeGeoKey", 1)) == 2:  # PixelIsPoint: the tie point is a pixel centre
        x0, a, b, y0, d, e = t
        t = (x0 - 0.5 * (a + b), a, b, y0 - 0.5 * (d + e), d, e)
    crs = None
    model = int(geokeys.get("GTModelTypeGeoKey", 0))
    code = geokeys.get("ProjectedCSTypeGeoKey") if model != 2 else None
    code = code if code is not None else geokeys.get("GeographicTypeGeoKey")
    if code is not None and 1024 <= int(code) < 32767:
        crs = crs_from(path, "GeoKeys", int(code))
    else:
        cite = geokeys.get("PCSCitationGeoKey") or geokeys.get("GTCitationGeoKey")
        try:
            crs = pyproj.CRS.from_user_input(str(cite)) if cite else None
        except pyproj.exceptions.CRSError:
            crs = None
        if crs is None:
            log.warning("%s: GeoTIFF without an EPSG code pyproj knows (%r): no lat/lon", path, code)
    return Grid(tuple(float(v) for v in t), crs)


def geokeys_for(crs: pyproj.CRS) -> tuple[int, ...]:
    """GeoKeyDirectory (tag 34735) values for an EPSG CRS: model type, PixelIsArea, and the CRS code."""
    epsg = crs.to_epsg()
    if epsg is None:
        raise ValueError(f"GeoTIFF writer: CRS without an EPSG code: {crs}")
    if crs.is_projected:
        return (1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, epsg)
    return (1, 1, 0, 3, 1024, 0, 1, 2, 1025, 0, 1, 1, 2048, 0, 1, epsg)

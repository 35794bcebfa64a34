"""Band-sequential GeoTIFF read/write with tifffile: geotransform tags (EPSG:4326), GDAL nodata, lazy row reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile

from data_prep.formats._common import perr

TAG_PIXEL_SCALE = 33550
TAG_TIEPOINT = 33922
TAG_TRANSFORMATION = 34264
TAG_GEOKEYS = 34735
TAG_GDAL_METADATA = 42112
TAG_GDAL_NODATA = 42113
#: GTModelType = geographic, RasterPixelIsArea, GeographicType = EPSG:4326 (WGS-84)
GEOKEYS_4326 = (1, 1, 0, 3, 1024, 0, 1, 2, 1025, 0, 1, 1, 2048, 0, 1, 4326)


def geotiff_tags(geotransform: tuple[float, ...] | None, *, nodata: float | None = None,
                 metadata: dict[str, str] | None = None,
                 tiepoints: list[tuple[float, float, float, float]] | None = None) -> list[tuple]:
    """tifffile ``extratags``: the geotransform (EPSG:4326) or, without one, ground control points
    ``(col, row, lon, lat)`` as several model tiepoints (how GDAL stores GCPs), GDAL nodata and metadata."""
    tags = []
    if geotransform is not None:
        x0, dxc, dxr, y0, dyc, dyr = geotransform
        if abs(dxr) < 1e-15 and abs(dyc) < 1e-15:
            tags.append((TAG_PIXEL_SCALE, "d", 3, (dxc, -dyr, 0.0), False))
            tags.append((TAG_TIEPOINT, "d", 6, (0.0, 0.0, 0.0, x0, y0, 0.0), False))
        else:
            m = (dxc, dxr, 0.0, x0, dyc, dyr, 0.0, y0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0)
            tags.append((TAG_TRANSFORMATION, "d", 16, m, False))
    elif tiepoints:
        flat = tuple(v for c, r, lon, lat in tiepoints for v in (c, r, 0.0, lon, lat, 0.0))
        tags.append((TAG_TIEPOINT, "d", len(flat), flat, False))
    if geotransform is not None or tiepoints:
        tags.append((TAG_GEOKEYS, "H", len(GEOKEYS_4326), GEOKEYS_4326, False))
    if nodata is not None:
        tags.append((TAG_GDAL_NODATA, "s", 0, f"{nodata:g}", False))
    if metadata:
        from xml.sax.saxutils import escape, quoteattr

        items = "".join(f'<Item name={quoteattr(k)}>{escape(str(v))}</Item>' for k, v in metadata.items())
        tags.append((TAG_GDAL_METADATA, "s", 0, f"<GDALMetadata>{items}</GDALMetadata>", False))
    return tags


def write_geotiff(path: Path, data: np.ndarray, *, nodata: float | None, geotransform: tuple[float, ...] | None,
                  description: str | None = None, metadata: dict[str, str] | None = None) -> None:
    """Write ``data`` (bands, rows, cols) band-sequential (PlanarConfiguration = separate), uncompressed."""
    tags = geotiff_tags(geotransform, nodata=nodata, metadata=metadata)
    tifffile.imwrite(path, data, photometric="minisblack", planarconfig="separate", metadata=None,
                     description=description, extratags=tags)


class GeoTiff:
    """Header of a band-sequential GeoTIFF; ``rows(r0, r1)`` reads lines r0:r1 of every band (memory-mapped)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            with tifffile.TiffFile(self.path) as tif:
                page = tif.pages[0]
                series = tif.series[0]
                shape = tuple(series.shape)
                self.dtype = np.dtype(series.dtype)
                tags = {t.code: t.value for t in page.tags.values()}
                self.planar_separate = page.planarconfig == tifffile.PLANARCONFIG.SEPARATE
        except (tifffile.TiffFileError, OSError, IndexError) as e:
            raise perr(self.path, "tiff", f"not a readable TIFF: {e}") from None
        if len(shape) == 2:
            shape = (1, *shape)
        if len(shape) != 3:
            raise perr(self.path, "tiff", f"image shape {shape}; expected (bands, rows, cols)")
        if not self.planar_separate and shape[0] > 1:
            raise perr(self.path, "tiff", "pixel-interleaved TIFF; expected band-sequential (planar separate)")
        self.shape: tuple[int, int, int] = shape
        nd = tags.get(TAG_GDAL_NODATA)
        self.nodata = float(str(nd).strip("\x00 ")) if nd is not None else None
        self.geotransform = self._geotransform(tags)
        self.metadata: dict[str, str] = {}
        md = tags.get(TAG_GDAL_METADATA)
        if md:
            import xml.etree.ElementTree as ET

            try:
                for item in ET.fromstring(str(md).strip("\x00 ")).iter("Item"):
                    if item.get("name") and item.get("sample") is None:
                        self.metadata[item.get("name")] = item.text or ""
            except ET.ParseError:
                pass

    @staticmethod
    def _geotransform(tags: dict) -> tuple[float, ...] | None:
        if TAG_TRANSFORMATION in tags:
            m = tags[TAG_TRANSFORMATION]
            return (m[3], m[0], m[1], m[7], m[4], m[5])
        if TAG_PIXEL_SCALE in tags and TAG_TIEPOINT in tags:
            sx, sy = tags[TAG_PIXEL_SCALE][:2]
            i, j, _, x, y, _ = tags[TAG_TIEPOINT][:6]
            return (x - i * sx, sx, 0.0, y + j * sy, 0.0, -sy)
        return None

    def rows(self, r0: int, r1: int) -> np.ndarray:
        """(bands, r1 - r0, cols) stored values."""
        try:
            mm = tifffile.memmap(self.path, mode="r")
            if mm.ndim == 2:
                mm = mm[None]
            return np.array(mm[:, r0:r1, :])
        except ValueError:  # compressed or not contiguous: decode whole image (small products only)
            data = tifffile.imread(self.path)
            return np.asarray(data if data.ndim == 3 else data[None])[:, r0:r1, :]

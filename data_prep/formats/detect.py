"""Which products a folder holds, which reader each one needs, and what is a sidecar: from names and first bytes,
never a flag.

Guarantees:

- A folder as downloaded yields every product in it and nothing else: each file is claimed once, as (part of) a
  product or as a sidecar of a named kind (EMIT RFLUNCERT/MASK/OBS, EnMAP/DESIS QL and HISTORY files, AVIRIS
  loc/obs/igm/glt/h2o/UNC/ATM, Classic .gain/.spc, quicklooks, the simulator's material maps, ...), listed in
  :attr:`Discovery.skipped` by kind. Several DESIS tiles (or EnMAP products) in one folder are one entry each.
- Files named by a product pattern are products; an ENVI image without a JPL name is one when its band table
  matches a registry sensor (checked from the header alone); a NetCDF without a known name is one when its root
  attributes name EMIT or it holds a ``reflectance``/``radiance`` cube; other TIFFs are products only when given
  explicitly. A file given explicitly that is a sidecar is skipped (and listed) too.
- Archives (``.zip``, ``.tar``, ``.tar.gz``, ``.tgz``) are opened with fsspec and their members unpacked into a
  temporary folder (removed when the :func:`discover` context closes); products inside report their path as
  ``<archive>/<member>``. Without a context (:func:`find_products`) archives are listed as skipped.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from data_prep.formats._common import perr
from data_prep.formats._xmltif import PART, group_files
from data_prep.formats.envi import data_path, header_path

FORMATS = ("envi", "emit-netcdf", "aviris-netcdf", "enmap-geotiff", "desis-geotiff", "geotiff", "landsat-geotiff")
ARCHIVE = re.compile(r"\.(zip|tar|tar\.gz|tgz|tar\.bz2|tbz2)$", re.I)
NETCDF_EXTS = (".nc", ".nc4", ".h5", ".he5")
TIFF_EXTS = (".tif", ".tiff")


@dataclass
class Discovery:
    """What :func:`discover` found: product entries (in order, with their format) and skipped files by kind."""

    products: list[Path] = field(default_factory=list)
    formats: dict[Path, str] = field(default_factory=dict)
    skipped: dict[str, list[Path]] = field(default_factory=dict)
    archives: dict[Path, Path] = field(default_factory=dict)
    """unpack folder -> the archive it came from"""

    def add(self, entry: Path, fmt: str) -> None:
        if entry not in self.formats:
            self.products.append(entry)
            self.formats[entry] = fmt

    def skip(self, path: Path, kind: str) -> None:
        self.skipped.setdefault(kind, []).append(path)

    def origin(self, path: str | Path) -> str:
        """The path a user recognises: ``<archive>/<member>`` for a file unpacked from an archive."""
        p = Path(path)
        for root, arc in self.archives.items():
            try:
                return f"{arc}/{p.relative_to(root).as_posix()}"
            except ValueError:
                continue
        return str(p)

    def summary_lines(self, shown: int = 3) -> list[str]:
        """One line per skipped kind: ``skipped N <kind> file(s): a, b, c, ... (+M more)``."""
        out = []
        for kind in sorted(self.skipped):
            files = self.skipped[kind]
            names = ", ".join(Path(self.origin(p)).name for p in files[:shown])
            more = f" (+{len(files) - shown} more)" if len(files) > shown else ""
            out.append(f"skipped {len(files)} {kind} file(s): {names}{more}")
        return out


def _magic(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(8)
    except OSError:
        return b""


def _is_tiff(path: Path) -> bool:
    return _magic(path)[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _is_hdf(path: Path) -> bool:
    m = _magic(path)
    return m.startswith(b"\x89HDF") or m.startswith(b"CDF")


def _envi_kind(hdr: Path, explicit: bool) -> tuple[str, str]:
    """("product", "envi") or ("sidecar", kind) for an ENVI header (its data file beside it)."""
    from data_prep.formats.aviris import SIDECAR_KINDS, parse_name

    try:
        stem = data_path(hdr).name
    except Exception:
        return ("product", "envi") if explicit else ("sidecar", "ENVI header without its data file")
    n = parse_name(stem)
    if n is not None:
        if n.sidecar is not None:
            return "sidecar", f"AVIRIS {SIDECAR_KINDS.get(n.sidecar, n.sidecar + ' file')}"
        return "product", "envi"
    if explicit:
        return "product", "envi"
    from data_prep.formats._common import match_sensor
    from data_prep.formats.envi import EnviRaster

    try:
        r = EnviRaster(hdr)
        if "spectral library" in str(r.header.get("file type", "")).lower():
            return "sidecar", "ENVI spectral library"
        wl, _ = r.band_table(required=True)
        match_sensor(hdr, wl, {"envi"})
    except Exception:  # noqa: BLE001 - an unreadable or unknown ENVI file is simply not a product when walking
        return "sidecar", "ENVI image of no known sensor (neither its name nor its band table matches)"
    return "product", "envi"


def _netcdf_kind(path: Path, explicit: bool) -> tuple[str, str]:
    from data_prep.formats import aviris_nc, emit

    for mod, fmt in ((emit, "emit-netcdf"), (aviris_nc, "aviris-netcdf")):
        c = mod.classify(path.name)
        if c is not None:
            return ("product", fmt) if c[0] == "product" else ("sidecar", c[1])
    try:
        import h5netcdf

        with h5netcdf.File(path, "r") as f:
            if emit.is_emit(path, dict(f.attrs)):
                return "product", "emit-netcdf"
            if aviris_nc.looks_like(f):
                return "product", "aviris-netcdf"
    except Exception:  # noqa: BLE001
        if explicit:
            return "product", "emit-netcdf"  # the reader names the problem
        return "sidecar", "unreadable NetCDF/HDF5"
    return "sidecar", ("NetCDF of no known product (neither EMIT_... nor an EMIT instrument attribute, nor an "
                       "AVIRIS-3/NG facility name or attribute)")


def _tiff_kind(path: Path, explicit: bool) -> tuple[str, str]:
    from data_prep.formats.aviris import parse_name
    from data_prep.formats.multispectral import parse_name as ms_name

    if ms_name(path.name)[0] is not None:
        return "product", "geotiff"
    stem = path.stem
    if re.search(r"_QL$", stem, re.I) or (parse_name(stem) is not None):
        return "sidecar", "AVIRIS quicklook (QL)"
    return ("product", "geotiff") if explicit else ("sidecar", "TIFF of no known product")


def classify_files(files: list[Path], out: Discovery, *, explicit: bool = False) -> None:
    """Claim every file of one folder as a product entry or a sidecar kind (into ``out``)."""
    claimed: set[Path] = set()
    for prod in group_files(files).values():
        parts = [p for p in files if (m := PART.match(p.name)) and m["prefix"] == prod.prefix]
        claimed.update(parts)
        if prod.unsupported:
            for p in parts:
                out.skip(p, prod.unsupported)
            continue
        out.add(prod.image, f"{prod.mission}-geotiff")
        if prod.image.suffix.lower() in (".bsq", ".bil", ".bip", ".img"):
            claimed.add(prod.image)
        for p, kind in prod.sidecars.items():
            out.skip(p, kind)
    from data_prep.formats.landsat import classify as landsat_kind

    for p in files:  # Landsat C2 L2: the MTL.txt is the product, its SR bands parts, the rest sidecars
        c = landsat_kind(p.name)
        if c is None:
            continue
        claimed.add(p)
        if c[0] == "product":
            out.add(p, "landsat-geotiff")
        elif c[0] == "part" and explicit:  # a band given alone: its scene, when its MTL is beside it
            mtl = [q for q in p.parent.iterdir() if (k := landsat_kind(q.name)) is not None and k[0] == "product"
                   and q.name.split("_MTL")[0] == p.name.rsplit("_SR_", 1)[0]]
            (out.add(mtl[0], "landsat-geotiff") if mtl else out.skip(p, "Landsat band without its MTL.txt"))
        elif c[0] == "sidecar":
            out.skip(p, c[1])
    rest = [p for p in files if p not in claimed]
    for p in rest:  # ENVI headers first: they claim their data files
        if p.suffix.lower() != ".hdr":
            continue
        claimed.add(p)
        with contextlib.suppress(Exception):
            claimed.add(data_path(p))
        kind, what = _envi_kind(p, explicit)
        if kind == "product":
            out.add(p, what)
        else:
            out.skip(p, what)
    for p in rest:
        if p in claimed:
            continue
        name, low = p.name, p.name.lower()
        if header_path(p) is not None:  # an ENVI data file given directly: its header decides
            hdr = header_path(p)
            if hdr not in claimed:
                kind, what = _envi_kind(hdr, explicit)
                (out.add(hdr, what) if kind == "product" else out.skip(p, what))
        elif low.endswith(NETCDF_EXTS):
            kind, what = _netcdf_kind(p, explicit)
            (out.add(p, what) if kind == "product" else out.skip(p, what))
        elif low.endswith(TIFF_EXTS):
            kind, what = _tiff_kind(p, explicit)
            (out.add(p, what) if kind == "product" else out.skip(p, what))
        elif low.endswith((".gain", ".spc")):
            out.skip(p, "AVIRIS-Classic calibration (.gain/.spc)")
        elif low.endswith("_materials.npz"):
            out.skip(p, "simulator material map (_materials.npz)")
        elif name == "manifest.json":
            out.skip(p, "simulator manifest (manifest.json)")
        elif low.endswith(".aux.xml"):
            out.skip(p, "GDAL auxiliary (.aux.xml)")
        elif ARCHIVE.search(name):
            out.skip(p, "archive (not unpacked)")
        elif explicit and _is_tiff(p):
            out.add(p, "geotiff")
        elif explicit and _is_hdf(p):
            kind, what = _netcdf_kind(p, True)
            out.add(p, what)
        else:
            out.skip(p, "other (not a product)")
        claimed.add(p)


def _walk(folder: Path, out: Discovery, unpack) -> None:
    try:
        entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    except OSError as e:
        raise perr(folder, "path", f"cannot list the folder: {e}") from None
    files = [p for p in entries if p.is_file()]
    if unpack is not None:
        for a in [p for p in files if ARCHIVE.search(p.name)]:
            files.remove(a)
            _walk(unpack(a), out, unpack)
    classify_files(files, out)
    for d in entries:
        if d.is_dir():
            _walk(d, out, unpack)


def _discover(paths, unpack) -> Discovery:
    out = Discovery()
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise perr(p, "path", "input does not exist")
        if p.is_dir():
            _walk(p, out, unpack)
        elif unpack is not None and ARCHIVE.search(p.name):
            _walk(unpack(p), out, unpack)
        elif PART.match(p.name):  # an EnMAP/DESIS file: its product, found among its siblings
            siblings = [q for q in p.parent.iterdir() if q.is_file()]
            grp = group_files(siblings).get(PART.match(p.name)["prefix"])
            if grp is None or grp.unsupported:
                classify_files([p], out, explicit=True)
            elif p in grp.sidecars:
                out.skip(p, grp.sidecars[p])
            else:
                out.add(grp.image, f"{grp.mission}-geotiff")
        else:
            classify_files([p], out, explicit=True)
    return out


def find_products(paths: list[str | Path]) -> list[Path]:
    """Product entries under ``paths`` (recursively); sidecars and other files left out (archives too: they are
    unpacked only inside :func:`discover`). A path that does not exist is a ProductError."""
    return _discover(paths, None).products


def _unpacker(tmp: Path, archives: dict[Path, Path]):
    import fsspec

    def unpack(archive: Path) -> Path:
        dest = Path(tempfile.mkdtemp(prefix="unpack-", dir=tmp))
        proto = "zip" if archive.name.lower().endswith(".zip") else "tar"
        try:
            fs = fsspec.filesystem(proto, fo=str(archive))
            members = [m for m in fs.find("") if not fs.isdir(m)]
            for m in members:
                target = (dest / m.lstrip("/")).resolve()
                if dest.resolve() not in target.parents:
                    raise perr(archive, "archive", f"member {m!r} points outside the archive folder")
                target.parent.mkdir(parents=True, exist_ok=True)
                with fs.open(m, "rb") as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, 16 << 20)
        except (OSError, ValueError, RuntimeError) as e:
            raise perr(archive, "archive", f"cannot unpack: {e}") from None
        archives[dest] = archive
        return dest

    return unpack


@contextlib.contextmanager
def discover(paths: list[str | Path]) -> Iterator[Discovery]:
    """Products and skipped files under ``paths``, archives unpacked into a temporary folder that lives as long as
    the context (the products' paths are valid inside it)."""
    tmp = Path(tempfile.mkdtemp(prefix="specfm-unpack-"))
    try:
        archives: dict[Path, Path] = {}
        res = _discover(paths, _unpacker(tmp, archives))
        res.archives = archives
        yield res
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def xml_folder_kind(folder: str | Path) -> str | None:
    """``enmap-geotiff`` / ``desis-geotiff`` when ``folder`` holds one EnMAP/DESIS product (its SPECTRAL_IMAGE and
    METADATA), else None."""
    p = Path(folder)
    try:
        groups = group_files([q for q in p.iterdir() if q.is_file()])
    except OSError:
        return None
    good = [g for g in groups.values() if not g.unsupported]
    return f"{good[0].mission}-geotiff" if len(good) == 1 else None


def detect_format(path: str | Path) -> str:
    """One of :data:`FORMATS` for a product entry (file or product folder); ProductError if none fits."""
    p = Path(path)
    if not p.exists():
        raise perr(p, "path", "does not exist")
    if p.is_dir():
        kind = xml_folder_kind(p)
        if kind:
            return kind
        raise perr(p, "format", "unknown format: a folder that is not one EnMAP/DESIS product (SPECTRAL_IMAGE + "
                                "METADATA); give a product file or use find_products to search it")
    found = _discover([p], None)
    if found.products:
        return found.formats[found.products[0]]
    kind = next(iter(found.skipped), "")
    if kind and not kind.startswith("other"):
        raise perr(p, "format", f"not a product: {kind}")
    raise perr(p, "format", "unknown format: not an ENVI header/data pair, a NetCDF4/HDF5 file, a GeoTIFF or an "
                            "EnMAP/DESIS product (expected one of " + ", ".join(FORMATS) + ")")

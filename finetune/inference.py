"""Whole-scene inference: embeddings or class maps of a whole product (or patch store) in bounded memory.

``embed(encoder, source, out)`` (and ``python launch/embed.py``) tiles a product opened by
:func:`data_prep.formats.open_product` (any reader format), or every patch of a patch store, runs the
encoder (or a fine-tuned segmentation head, :func:`load_head`) on batches of tiles and writes a Zarr
group at ``out`` (any fsspec URL).

Preprocessing is pretraining's: rows go through the ingest's :func:`data_prep.tiling.prepare_block`
(the level's clip range, float16, nodata and non-finite values to 0), bad bands are dropped by the
granule's good-band mask, and each band is clipped to p01/p99 and standardised with
:func:`data_prep.spectral.normalise_into` (nodata 0 after; the one standardisation pretraining and the
downstream tasks share, with :class:`~data_prep.spectral.BandScaling`). The statistics (``stats=``) are a patch
store's (``stats=URL``, e.g. the store the model was trained on; a store input uses its own), the
export's training statistics for the product's sensor and level when it carries them, or the scene's
own, accumulated in a first pass with :class:`data_prep.stats.PartialStats` over the level's clip range
(what an ingest of this one product would give its store). The statistics used are recorded in the output.

Tiling and blending (product input): the grid and weights of :mod:`finetune.windows` (the ones the
downstream tasks' whole-scene predictions use). Tiles of ``tile`` pixels start every ``stride = tile - overlap``
pixels along each axis (the last ones stick out of the scene and are padded with nodata, as ingest pads
edge patches); both are multiples of the encoder's patch size so every tile's token grid lies on the
scene's. Each tile's output is weighted by a separable ramp over the ``overlap`` (``(k + 0.5) / o`` on the
side facing a neighbour, 1 elsewhere and on the scene's borders), so the weights of the tiles covering a
cell sum to exactly 1: a cell covered by one tile holds that tile's output; in an overlap, the linear
cross-fade of the two (four at corners). Class maps blend softmax probabilities, then take the argmax.

Output group (``attrs["format"] == "specfm-embeddings"``): ``embeddings`` ``(D, rows, cols)`` (per token:
rows = ceil(H / patch); per pixel: H) or ``classes`` int16 ``(H, W)`` (-1 = nodata), ``valid`` (per token
the fraction of valid pixels, per pixel bool), ``lat``/``lon`` float64 of each cell (the mean over its
pixels) when the product has geolocation, ``done`` (one flag per tile cell), and attributes: source,
sensor, level, grid, the statistics, ``geotransform`` (EPSG:4326, fitted to the geolocation when it is
affine within 0.1 pixel) and ``complete``. Class maps also go to a tiled GeoTIFF (tifffile) with that
geotransform, or ground control points where the geometry is not affine. Store input: ``embeddings``
``(n, D, g, g)`` / ``classes`` ``(n, P, P)`` per patch, ``valid`` and the store's ``meta/*``.

Bounded memory: the product is read by row windows; one strip of tiles (``tile`` rows, plus the
``overlap`` rows kept from the strip before), one batch, and the accumulators of two rows of tile cells
are held, all independent of the scene's length (``bench/embed.py`` measures it: peak RSS for a 512- and
a 4096-line AVIRIS-NG flightline). Output is written as soon as a row of cells is final.

Resumable by tile: the output's chunks are the tile cells (``stride`` pixels), each written whole
(atomically by the Zarr store) before its ``done`` flag; a rerun with the same settings skips the tiles
whose cells are all done, and ``complete`` is set last, so an interrupted run leaves no cell that claims to
be done and is not. A rerun with other settings, another source or other encoder weights is refused
(:class:`EmbedError`) unless ``overwrite``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import zarr
from torch import nn

from data_prep.errors import UserError
from data_prep.spectral import BandScaling, normalise_into
from finetune.windows import Axis

FORMAT = "specfm-embeddings"
VERSION = 1
HEAD_FORMAT = "specfm-head"
HEAD_WEIGHTS = "head.safetensors"
HEAD_ARGS = "head.json"
OUTPUTS = ("tokens", "pixels")
#: a fitted geotransform is used when it reproduces the geolocation to this fraction of a pixel
AFFINE_TOLERANCE_PX = 0.1
#: geolocation points sampled along each axis to fit the geotransform / place GeoTIFF control points
GEO_SAMPLES = 64
_CHUNK_BYTES = 8 << 20


class EmbedError(UserError):
    """Bad inference input or settings: a source, tile geometry, head, or an output written otherwise."""


# --------------------------------------------------------------------------------------------- geometry

def check_geometry(tile: int, overlap: int, patch: int) -> None:
    if tile < patch or tile % patch:
        raise EmbedError(f"tile {tile} must be a positive multiple of the encoder's patch size {patch}")
    if overlap < 0 or overlap % patch or 2 * overlap > tile:
        raise EmbedError(f"overlap {overlap} must be a multiple of the patch size {patch} between 0 and tile / 2 "
                         f"({tile // 2})")


# --------------------------------------------------------------------------------------------- heads

def save_head(model: nn.Module, out_dir: str | os.PathLike, class_names: list[str] | None = None) -> Path:
    """Write a segmentation head (``finetune.heads.UperNet``) as ``head.safetensors`` + ``head.json``.

    The encoder is not part of the head's weights; when it is not frozen (full fine-tuning) it is written
    beside as an encoder export in ``out_dir/encoder``, which :func:`load_head` then uses."""
    from safetensors.torch import save_file

    from finetune.heads import SiameseUperNet, UperNet

    if not isinstance(model, UperNet) or isinstance(model, SiameseUperNet):
        raise EmbedError(f"save_head writes UperNet segmentation heads, got {type(model).__name__}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if not k.startswith("encoder.")}
    k = int(model.classifier.out_channels)
    names = list(class_names) if class_names is not None else [str(i) for i in range(k)]
    if len(names) != k:
        raise EmbedError(f"{len(names)} class names for a head of {k} classes")
    enc = model.encoder
    meta = {"format": HEAD_FORMAT, "version": 1, "kind": "segmentation", "n_classes": k,
            "layers": list(model.layers), "channels": int(model.classifier.in_channels), "class_names": names,
            "pixel_skip": bool(getattr(model, "pixel_skip", False)),
            "encoder_fingerprint": fingerprint(enc)}
    if not getattr(enc, "frozen", False):
        from pretrain.models.export import save_encoder

        save_encoder(getattr(enc, "inner", enc), out / "encoder")
    fd, tmp = tempfile.mkstemp(dir=out, suffix=".tmp")
    os.close(fd)
    save_file(sd, tmp, metadata={"format": HEAD_FORMAT})
    os.replace(tmp, out / HEAD_WEIGHTS)
    (out / HEAD_ARGS).write_text(json.dumps(meta, indent=2))
    return out


def load_head(path: str | os.PathLike, encoder: nn.Module | None = None) -> tuple[nn.Module, dict]:
    """(UperNet in eval mode, head.json) from a :func:`save_head` folder; its own ``encoder/`` export if it
    has one, else ``encoder``."""
    from safetensors.torch import load_file

    import finetune
    from finetune.heads import UperNet

    p = Path(path)
    for f in (HEAD_ARGS, HEAD_WEIGHTS):
        if not (p / f).is_file():
            raise EmbedError(f"head {p} lacks {f}; expected {HEAD_ARGS} and {HEAD_WEIGHTS} (written by "
                             "finetune.inference.save_head)")
    try:
        meta = json.loads((p / HEAD_ARGS).read_text())
    except json.JSONDecodeError as e:
        raise EmbedError(f"{p / HEAD_ARGS}: not valid JSON: {e}") from e
    if meta.get("format") != HEAD_FORMAT or meta.get("kind") != "segmentation":
        raise EmbedError(f"{p / HEAD_ARGS}: format {meta.get('format')!r} kind {meta.get('kind')!r}; expected "
                         f"{HEAD_FORMAT!r} 'segmentation'")
    if (p / "encoder").is_dir():
        encoder = finetune.load_encoder(p / "encoder")
    if encoder is None:
        raise EmbedError(f"head {p} has no encoder/ of its own; give the encoder it was trained on")
    model = UperNet(finetune.wrap_encoder(encoder), int(meta["n_classes"]), layers=meta["layers"],
                    channels=int(meta["channels"]), pixel_skip=bool(meta.get("pixel_skip", False)))
    sd = load_file(str(p / HEAD_WEIGHTS))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.startswith("encoder.")]
    if missing or unexpected:
        raise EmbedError(f"{p / HEAD_WEIGHTS}: weights do not match {HEAD_ARGS}: missing {missing[:5]}, "
                         f"unexpected {list(unexpected)[:5]}")
    model.class_names = list(meta.get("class_names") or [])
    return model.eval(), meta


def fingerprint(module: nn.Module) -> str:
    """sha256 (16 hex digits) over a module's state (names, shapes, bytes): tells two sets of weights apart."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        t = v.detach().cpu().contiguous()
        h.update(f"{k}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------- statistics

@dataclass
class Norm:
    """The per-band standardisation of the good bands (:class:`data_prep.spectral.BandScaling`) and where
    its statistics came from."""

    scaling: BandScaling
    source: str

    @classmethod
    def from_band_stats(cls, st, good: np.ndarray, source: str) -> Norm:
        return cls(BandScaling.from_stats(st).select(np.flatnonzero(good)), source)

    def into(self, out: torch.Tensor, px: np.ndarray, valid: np.ndarray) -> None:
        s = self.scaling
        normalise_into(out, np.ascontiguousarray(px), valid, s.lo, s.hi, s.mean, s.inv_std)

    def to_json(self) -> dict:
        return {"source": self.source, **{k: np.asarray(getattr(self.scaling, k), dtype=np.float64).tolist()
                                           for k in ("lo", "hi", "mean", "inv_std")}}

    @classmethod
    def from_json(cls, d: dict) -> Norm:
        return cls(BandScaling(*(np.asarray(d[k], dtype=np.float32) for k in ("lo", "hi", "mean", "inv_std"))),
                   d["source"])


def training_stats(encoder: nn.Module, sensor: str, level: str, n_bands: int):
    """The training statistics (a ``data_prep.store.BandStats``) of ``sensor``/``level`` recorded in the
    release folder (``config.json`` "normalisation", see ``pretrain/release.py``) the encoder was loaded from
    or that sits in its export folder (``hf/``); None when there are none for them (or another band count)."""
    from data_prep.store import BandStats

    args = getattr(encoder, "args", {}) or {}
    table = args.get("normalisation")
    src = getattr(encoder, "source", "") or ""
    if not table and src and (Path(src) / "hf" / "config.json").is_file():  # an export with its release folder beside
        try:
            table = json.loads((Path(src) / "hf" / "config.json").read_text()).get("normalisation")
        except json.JSONDecodeError:
            table = None
    table = table or {}
    entry = table.get(f"{sensor}_{level}")
    if not entry or len(entry.get("mean", [])) != n_bands:
        return None
    return BandStats.from_json(entry)


def scene_stats(granule, clip: tuple[float, float], row_block: int = 64, progress: bool | None = None):
    """``BandStats`` of a granule's valid pixels (all bands), streamed by row blocks with the ingest's
    accumulator over the level's clip range."""
    from data_prep.progress import progress as bar
    from data_prep.stats import PartialStats
    from data_prep.tiling import prepare_block

    acc = PartialStats.empty(granule.n_bands, clip[0], clip[1])
    good = np.asarray(granule.good_bands, bool)
    for r0 in bar(range(0, granule.n_rows, row_block), desc="scene statistics", unit="block",
                  enabled=progress is not False, every=100):
        cube, valid = granule.read_rows(r0, min(r0 + row_block, granule.n_rows))
        c16, v = prepare_block(np.array(cube, dtype=np.float32), np.asarray(valid), good, clip,
                               path=granule.path, row0=r0)
        acc.add_patch(c16, v)
    return acc.band_stats()


def _store_stats(url: str, sensor: str, level: str, n_bands: int, storage_options: dict | None):
    from data_prep.store import PatchStore

    s = PatchStore(url, storage_options)
    if (s.sensor, s.level) != (sensor, level) or s.n_bands != n_bands:
        raise EmbedError(f"stats store {url} is {s.sensor} {s.level} with {s.n_bands} bands; the input is "
                         f"{sensor} {level} with {n_bands} bands")
    return s.stats


# --------------------------------------------------------------------------------------------- running

class _Runner:
    """Batches tiles through the encoder (or head); returns float32 ``[B, D_out, h, w]`` per batch."""

    def __init__(self, encoder, head, output: str, layer: int | None, device: torch.device, precision: str):
        self.encoder, self.head, self.output, self.layer = encoder, head, output, layer
        self.device = device
        self.autocast = precision == "bf16"
        if head is not None:
            self.dim = int(head.classifier.out_channels)
        else:
            self.dim = encoder.embed_dim

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor, valid: torch.Tensor, wl: torch.Tensor, fw: torch.Tensor, sensor, level,
                 gsd) -> torch.Tensor:
        b, _, h, w = x.shape
        x, valid = x.to(self.device, non_blocking=True), valid.to(self.device, non_blocking=True)
        wl, fw = wl.to(self.device), fw.to(self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            if self.head is not None:
                out = self.head(x, wl, fw, sensor=sensor, level=level).float().softmax(1)
            else:
                enc = self.encoder
                if self.layer is None:
                    tok = enc(x, wl, fw, sensor=sensor, level=level, valid=valid, gsd=gsd)
                else:
                    tok = enc.features(x, wl, fw, sensor=sensor, level=level, layers=[self.layer], valid=valid,
                                       gsd=gsd)[0]
                gh, gw = enc.grid(h, w)
                out = tok.float().transpose(1, 2).reshape(b, -1, gh, gw)
                if self.output == "pixels":
                    out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False)
        return out.float().cpu()


def _open_out(out: str, storage_options: dict | None, settings: dict, overwrite: bool) -> tuple[zarr.Group, bool]:
    """(group, resumed). A group written with other settings is refused unless ``overwrite``."""
    kw: dict[str, Any] = {}
    if storage_options and "://" in out:
        kw["storage_options"] = storage_options
    if not overwrite:
        try:
            g = zarr.open_group(out, mode="r+", **kw)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError):
            g = None
        if g is not None:
            a = dict(g.attrs)
            if a.get("format") != FORMAT:
                raise EmbedError(f"{out} exists and is not a specfm embeddings output (attrs format "
                                 f"{a.get('format')!r}); choose another --out or pass --overwrite")
            old = a.get("settings", {})
            diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            if diff:
                what = ", ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in diff[:4])
                raise EmbedError(f"{out} was written with other settings ({what}); pass --overwrite to start "
                                 "again or choose another --out")
            return g, True
    g = zarr.open_group(out, mode="w", **kw)
    g.attrs.update({"format": FORMAT, "version": VERSION, "settings": settings, "complete": False})
    return g, False


def _feature_chunk(d: int, cells: int, itemsize: int) -> int:
    return max(1, min(d, _CHUNK_BYTES // max(1, cells * cells * itemsize)))


def embed(encoder: nn.Module | None, source: str | os.PathLike, out: str | os.PathLike, *,
          head: nn.Module | None = None, output: str = "tokens", layer: int | None = None, tile: int = 128,
          overlap: int = 32, batch_size: int = 8, stats: str = "auto", device: str = "cpu",
          precision: str = "fp32", dtype: str = "float16", row_block: int = 64, geotiff: str | None = None,
          overwrite: bool = False, progress: bool | None = None, storage_options: dict | None = None,
          on_batch: Callable[[int], None] | None = None) -> dict:
    """Embed (or classify with ``head``) a whole product or patch store into the Zarr group ``out``.

    ``source``: a product path (any reader format) or a patch store URL. ``output``: per ``tokens`` or
    ``pixels`` (embeddings bilinearly upsampled within each tile); a head always gives a per-pixel class
    map. ``layer``: a block index (``Encoder.features``) instead of the final output. ``stats``: ``auto``
    (the export's training statistics for this sensor and level, else the scene's), ``scene``, or a patch
    store URL. ``geotiff``: where the class map's GeoTIFF goes (default ``out`` with ``.tif`` for a local
    ``out``). ``on_batch(n)`` is called after each batch (n = batches so far). Returns a summary dict."""
    import finetune

    if head is not None:
        encoder = head.encoder
    if encoder is None:
        raise EmbedError("embed needs an encoder (or a head)")
    encoder = finetune.wrap_encoder(encoder).eval()
    if output not in OUTPUTS:
        raise EmbedError(f"output {output!r}; expected one of {OUTPUTS}")
    if dtype not in ("float16", "float32"):
        raise EmbedError(f"dtype {dtype!r}; expected float16 or float32")
    if precision not in ("fp32", "bf16"):
        raise EmbedError(f"precision {precision!r}; expected fp32 or bf16")
    if batch_size < 1:
        raise EmbedError(f"batch_size must be >= 1, got {batch_size}")
    if layer is not None and not -encoder.depth <= layer < encoder.depth:
        raise EmbedError(f"layer {layer} is out of range for an encoder of depth {encoder.depth}")
    dev = torch.device(device)
    if head is not None:
        head.to(dev).eval()
    else:
        encoder.to(dev)
    runner = _Runner(encoder, head, output, layer, dev, precision)
    src = str(source)
    out = str(out)
    common = {"output": "classes" if head is not None else output, "layer": layer, "dtype": dtype,
              "weights": fingerprint(head if head is not None else encoder), "stats": stats}
    t0 = time.perf_counter()
    if _is_store(src, storage_options):
        summary = _embed_store(runner, encoder, src, out, common, batch_size=batch_size, stats=stats,
                               overwrite=overwrite, progress=progress, storage_options=storage_options,
                               on_batch=on_batch)
    else:
        summary = _embed_product(runner, encoder, src, out, common, tile=tile, overlap=overlap,
                                 batch_size=batch_size, stats=stats, row_block=row_block, geotiff=geotiff,
                                 overwrite=overwrite, progress=progress, storage_options=storage_options,
                                 on_batch=on_batch)
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    return summary


def _is_store(src: str, storage_options: dict | None) -> bool:
    if "://" not in src:
        p = Path(src)
        return p.is_dir() and (p / "zarr.json").is_file() and not _is_product_dir(p)
    try:
        g = zarr.open_group(src, mode="r", **({"storage_options": storage_options} if storage_options else {}))
    except Exception:  # noqa: BLE001 - not a Zarr group: a product URL (readers report what is wrong)
        return False
    return "schema_version" in g.attrs


def _is_product_dir(p: Path) -> bool:
    from data_prep.formats.detect import xml_folder_kind

    return bool(xml_folder_kind(p))


# --------------------------------------------------------------------------------------------- products

def _embed_product(runner: _Runner, encoder, src: str, out: str, common: dict, *, tile: int, overlap: int,
                   batch_size: int, stats: str, row_block: int, geotiff: str | None, overwrite: bool,
                   progress: bool | None, storage_options: dict | None, on_batch) -> dict:
    from data_prep.formats import open_product
    from data_prep.registry import get_sensor
    from data_prep.tiling import prepare_block

    g = open_product(src)
    good = np.asarray(g.good_bands, bool)
    if not good.any():
        raise EmbedError(f"{g.path}: no good bands to embed")
    p = encoder.patch_size
    check_geometry(tile, overlap, p)
    classes = runner.head is not None
    unit = p if (common["output"] == "tokens") else 1
    ay = Axis(g.n_rows, tile, tile - overlap, unit)
    ax = Axis(g.n_cols, tile, tile - overlap, unit)
    clip = get_sensor(g.sensor).level(g.level).clip
    settings = {**common, "source": os.path.abspath(src) if "://" not in src else src, "granule": g.granule_id,
                "shape": list(g.shape), "tile": tile, "overlap": overlap}
    grp, resumed = _open_out(out, storage_options, settings, overwrite)
    if resumed and grp.attrs.get("complete"):
        return {"out": out, "complete": True, "tiles": ay.n * ax.n, "computed": 0, "skipped": ay.n * ax.n}
    if resumed:
        norm = Norm.from_json(grp.attrs["normalisation"])
    else:
        norm = _resolve_norm(stats, encoder, g, clip, row_block, progress, storage_options)
    d = runner.dim
    wpad = ax.padded
    gt = _geotransform(g.lat, g.lon)
    if not resumed:
        cc = (ay.cell_chunk, ax.cell_chunk)
        if classes:
            grp.create_array("classes", shape=(ay.cells, ax.cells), dtype="int16", chunks=cc, fill_value=-1,
                             dimension_names=("y", "x"))
        else:
            item = np.dtype(common["dtype"]).itemsize
            grp.create_array("embeddings", shape=(d, ay.cells, ax.cells), dtype=common["dtype"],
                             chunks=(_feature_chunk(d, ay.cell_chunk, item), *cc), fill_value=0,
                             dimension_names=("feature", "y", "x"))
        grp.create_array("valid", shape=(ay.cells, ax.cells), dtype="float32" if unit > 1 else "bool", chunks=cc,
                         fill_value=0, dimension_names=("y", "x"))
        if g.lat is not None and g.lon is not None:
            for k in ("lat", "lon"):
                grp.create_array(k, shape=(ay.cells, ax.cells), dtype="float64", chunks=cc, fill_value=np.nan,
                                 dimension_names=("y", "x"))
        grp.create_array("done", shape=(ay.n, ax.n), dtype="uint8", chunks=(1, ax.n), fill_value=0,
                         dimension_names=("tile_y", "tile_x"))
        cell_gt = None if gt is None else (gt[0], gt[1] * unit, gt[2] * unit, gt[3], gt[4] * unit, gt[5] * unit)
        grp.attrs.update({
            "source": settings["source"], "granule_id": g.granule_id, "sensor": g.sensor, "level": g.level,
            "scene_shape": [g.n_rows, g.n_cols], "cell_pixels": unit, "patch_size": p, "tile": tile,
            "overlap": overlap, "stride": tile - overlap, "tiles": [ay.n, ax.n],
            "wavelengths_nm": np.asarray(g.wavelengths_nm)[good].tolist(),
            "fwhm_nm": np.asarray(g.fwhm_nm)[good].tolist(), "gsd_m": float(g.gsd_m),
            "acquisition_time": g.acquisition_time.isoformat() if g.acquisition_time else None,
            "normalisation": norm.to_json(), "crs": "EPSG:4326", "geotransform": cell_gt,
            "encoder": {"source": getattr(encoder, "source", ""), "name": encoder.args.get("name"),
                        "embed_dim": encoder.embed_dim, "patch_size": p},
            **({"class_names": getattr(runner.head, "class_names", None)} if classes else {}),
        })
    done = np.array(_read_done(grp), dtype=bool)
    target = grp["classes"] if classes else grp["embeddings"]

    def needed(i: int, j: int) -> bool:
        return not done[i:i + 2, j:j + 2].all()

    need = [[needed(i, j) for j in range(ax.n)] for i in range(ay.n)]
    n_need = sum(map(sum, need))
    wl = torch.from_numpy(np.asarray(g.wavelengths_nm, np.float32)[good])
    fw = torch.from_numpy(np.asarray(g.fwhm_nm, np.float32)[good])
    cg = int(good.sum())
    m = tile // unit
    wy = [ay.weights(i) for i in range(ay.n)]
    wx = [ax.weights(j) for j in range(ax.n)]
    acc: dict[int, np.ndarray] = {}
    cell_valid: dict[int, np.ndarray] = {}
    prev: tuple[int, np.ndarray, np.ndarray] | None = None

    def read_strip(i: int) -> tuple[np.ndarray, np.ndarray]:
        """Normalised float32 (cg, tile, wpad) and valid (tile, wpad) of strip ``i`` (0 / False outside)."""
        nonlocal prev
        r0 = i * ay.stride
        buf = np.zeros((cg, tile, wpad), np.float32)
        vb = np.zeros((tile, wpad), bool)
        start = 0
        if prev is not None and prev[0] == i - 1 and overlap:
            buf[:, :overlap] = prev[1][:, ay.stride:]
            vb[:overlap] = prev[2][ay.stride:]
            start = overlap
        for b0 in range(r0 + start, min(r0 + tile, g.n_rows), row_block):
            b1 = min(b0 + row_block, r0 + tile, g.n_rows)
            cube, valid = g.read_rows(b0, b1)
            c16, v = prepare_block(np.array(cube, dtype=np.float32), np.asarray(valid), good, clip, path=g.path,
                                   row0=b0)
            del cube
            t = torch.empty((cg, b1 - b0, g.n_cols), dtype=torch.float32)
            norm.into(t, c16[good], v)
            buf[:, b0 - r0:b1 - r0, :g.n_cols] = t.numpy()
            vb[b0 - r0:b1 - r0, :g.n_cols] = v
        prev = (i, buf, vb)
        return buf, vb

    def tiles() -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
        for i in range(ay.n):
            if not any(need[i]):
                continue
            buf, vb = read_strip(i)
            cell_valid[i] = _cell_rows(vb, ay, ax, i, unit)
            for j in range(ax.n):
                if need[i][j]:
                    c0 = j * ax.stride
                    yield i, j, torch.from_numpy(buf[:, :, c0:c0 + tile]), torch.from_numpy(vb[:, c0:c0 + tile])

    def add(i: int, j: int, y: np.ndarray) -> None:
        y = y * (wy[i][:, None] * wx[j][None, :])
        ya, _ = ay.tile_span(i)
        xa, _ = ax.tile_span(j)
        xb = min(xa + m, ax.cells)
        for k in (i, i + 1):
            if k >= ay.n or done[k].all():
                continue
            ca, cb = ay.core(k)
            lo_, hi_ = max(ca, ya), min(cb, ya + m)
            if lo_ >= hi_:
                continue
            if k not in acc:
                acc[k] = np.zeros((y.shape[0], cb - ca, ax.cells), np.float32)
            acc[k][:, lo_ - ca:hi_ - ca, xa:xb] += y[:, lo_ - ya:hi_ - ya, :xb - xa]

    def flush(k: int) -> None:
        """Write the not-done cells of cell row ``k`` (final), then their done flags."""
        ca, cb = ay.core(k)
        a = acc.pop(k, None)
        v = cell_valid.pop(k)
        lat = lon = None
        if "lat" in grp:
            lat, lon = (_cell_mean(arr, ca, cb, unit, ax.cells, g.n_rows) for arr in (g.lat, g.lon))
        for j in range(ax.n):
            if done[k, j]:
                continue
            xa, xb = ax.core(j)
            vv = v[:, xa:xb]
            if classes:
                cls = a[:, :, xa:xb].argmax(0).astype(np.int16)
                cls[~vv] = -1
                target[ca:cb, xa:xb] = cls
            else:
                target[:, ca:cb, xa:xb] = a[:, :, xa:xb].astype(common["dtype"])
            grp["valid"][ca:cb, xa:xb] = vv
            if lat is not None:
                grp["lat"][ca:cb, xa:xb] = lat[:, xa:xb]
                grp["lon"][ca:cb, xa:xb] = lon[:, xa:xb]
            done[k, j] = True
        grp["done"][k:k + 1] = done[k:k + 1].astype(np.uint8)

    remaining = [sum(r) for r in need]
    flushed = -1

    def advance() -> None:
        nonlocal flushed
        while flushed + 1 < ay.n and remaining[flushed + 1] == 0:
            k = flushed + 1
            if not done[k].all():
                flush(k)
            else:
                acc.pop(k, None)
                cell_valid.pop(k, None)
            flushed = k

    from data_prep.progress import progress as progress_bar

    bar = progress_bar(total=n_need, desc="embed", unit="tile", enabled=progress is not False, every=100)
    batch: list[tuple[int, int, torch.Tensor, torch.Tensor]] = []
    n_batches = 0
    gsd = torch.full((1,), float(g.gsd_m))

    def run_batch() -> None:
        nonlocal n_batches
        x = torch.stack([t[2] for t in batch])
        v = torch.stack([t[3] for t in batch])
        y = runner(x, v, wl, fw, g.sensor, g.level, gsd).numpy()
        for (i, j, _, _), yy in zip(batch, y):
            add(i, j, yy)
            remaining[i] -= 1
        bar.update(len(batch))
        batch.clear()
        advance()
        n_batches += 1
        if on_batch is not None:
            on_batch(n_batches)

    try:
        advance()
        for item in tiles():
            batch.append(item)
            if len(batch) == batch_size:
                run_batch()
        if batch:
            run_batch()
        advance()
    finally:
        bar.close()
    summary = {"out": out, "tiles": ay.n * ax.n, "computed": n_need, "skipped": ay.n * ax.n - n_need,
               "cells": [ay.cells, ax.cells], "normalisation": norm.source}
    if classes:
        tif = geotiff if geotiff is not None else (_default_tif(out) if "://" not in out else None)
        if tif:
            write_class_geotiff(grp, tif, g.lat, g.lon, gt)
            summary["geotiff"] = tif
    grp.attrs["complete"] = True
    summary["complete"] = True
    return summary


def _resolve_norm(stats: str, encoder, g, clip, row_block, progress, storage_options) -> Norm:
    good = np.asarray(g.good_bands, bool)
    if stats not in ("auto", "scene"):
        return Norm.from_band_stats(_store_stats(stats, g.sensor, g.level, g.n_bands, storage_options), good,
                                    f"store {stats}")
    if stats == "auto":
        st = training_stats(encoder, g.sensor, g.level, g.n_bands)
        if st is not None:
            return Norm.from_band_stats(st, good, f"export {g.sensor}_{g.level}")
    return Norm.from_band_stats(scene_stats(g, clip, row_block, progress), good, "scene")


def _read_done(grp: zarr.Group) -> np.ndarray:
    """The done flags; a row whose chunk cannot be decoded counts as not done."""
    arr = grp["done"]
    out = np.zeros(arr.shape, np.uint8)
    for k in range(arr.shape[0]):
        try:
            out[k] = arr[k]
        except Exception:  # noqa: BLE001 - an unreadable flag row is redone, never trusted
            out[k] = 0
    return out


def _cell_rows(vb: np.ndarray, ay: Axis, ax: Axis, i: int, unit: int) -> np.ndarray:
    """Valid of cell row ``i`` from its strip buffer: fraction per token, or the pixels' flags."""
    ca, cb = ay.core(i)
    r0 = i * ay.stride
    rows = vb[(ca * unit - r0):(cb * unit - r0), : ax.cells * unit]
    if unit == 1:
        return rows.copy()
    h = rows.shape[0] // unit
    return rows[: h * unit].reshape(h, unit, ax.cells, unit).mean(axis=(1, 3)).astype(np.float32)


def _cell_mean(arr: np.ndarray, ca: int, cb: int, unit: int, cells: int, n_rows: int) -> np.ndarray:
    """Mean over each cell's pixels inside the scene of a (rows, cols) array, for cell rows ca:cb."""
    block = np.asarray(arr[ca * unit:min(cb * unit, n_rows)], dtype=np.float64)
    if unit == 1:
        return block
    rows, cols = (cb - ca) * unit, cells * unit
    pad = np.full((rows, cols), np.nan)
    pad[: block.shape[0], : block.shape[1]] = block
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # cells wholly outside the scene: NaN
        return np.nanmean(pad.reshape(cb - ca, unit, cells, unit), axis=(1, 3))


def _default_tif(out: str) -> str:
    p = Path(out)
    return str(p.with_suffix(".tif") if p.suffix == ".zarr" else p.with_name(p.name + ".tif"))


# --------------------------------------------------------------------------------------------- geolocation

def _sample_idx(n: int) -> np.ndarray:
    return np.unique(np.linspace(0, n - 1, min(n, GEO_SAMPLES)).round().astype(np.int64))


def _geotransform(lat, lon) -> tuple[float, ...] | None:
    """GDAL geotransform (pixel corners, EPSG:4326) fitted to a sample of the geolocation, when it
    reproduces the sample within :data:`AFFINE_TOLERANCE_PX` pixel; else None."""
    from data_prep.formats._common import affine_from_latlon

    if lat is None or lon is None:
        return None
    ri, ci = _sample_idx(lat.shape[0]), _sample_idx(lat.shape[1])
    la = np.asarray(lat[np.ix_(ri, ci)], dtype=np.float64)
    lo = np.asarray(lon[np.ix_(ri, ci)], dtype=np.float64)
    if not (np.isfinite(la).all() and np.isfinite(lo).all()):
        return None
    # fit on the sample as its own grid, then map the sample's unit steps back to pixel steps
    if la.size < 4 or len(ri) < 2 or len(ci) < 2:
        return None
    sy, sx = float(ri[1] - ri[0]), float(ci[1] - ci[0])
    if not (np.allclose(np.diff(ri), sy) and np.allclose(np.diff(ci), sx)):
        # uneven sample (rounded linspace): fit on an even stride instead
        ri = np.arange(0, lat.shape[0], max(1, lat.shape[0] // GEO_SAMPLES))
        ci = np.arange(0, lat.shape[1], max(1, lat.shape[1] // GEO_SAMPLES))
        la = np.asarray(lat[np.ix_(ri, ci)], dtype=np.float64)
        lo = np.asarray(lon[np.ix_(ri, ci)], dtype=np.float64)
        if not (np.isfinite(la).all() and np.isfinite(lo).all()) or len(ri) < 2 or len(ci) < 2:
            return None
        sy, sx = float(ri[1] - ri[0]), float(ci[1] - ci[0])
    x0, a, b, y0, c, e = affine_from_latlon(la, lo)
    # sample index s is pixel ri[0] + s * step; affine_from_latlon uses centres s + 0.5
    a, b, c, e = a / sx, b / sy, c / sx, e / sy
    x0 = x0 + a * (sx * 0.5 - 0.5 - ci[0]) + b * (sy * 0.5 - 0.5 - ri[0])
    y0 = y0 + c * (sx * 0.5 - 0.5 - ci[0]) + e * (sy * 0.5 - 0.5 - ri[0])
    gt = (float(x0), float(a), float(b), float(y0), float(c), float(e))
    rr, cc = np.meshgrid(ri + 0.5, ci + 0.5, indexing="ij")
    err_x = np.abs(gt[0] + gt[1] * cc + gt[2] * rr - lo)
    err_y = np.abs(gt[3] + gt[4] * cc + gt[5] * rr - la)
    px = min(math.hypot(a, c), math.hypot(b, e))
    if px <= 0 or max(err_x.max(), err_y.max()) > AFFINE_TOLERANCE_PX * px:
        return None
    return gt


def write_class_geotiff(grp: zarr.Group, path: str, lat, lon, gt: tuple[float, ...] | None,
                        tile: int = 256) -> None:
    """The ``classes`` array as a tiled, compressed GeoTIFF at ``path`` (EPSG:4326; the geotransform, or
    ground control points sampled from the geolocation; nodata -1), written tile by tile, atomically."""
    import tifffile

    from data_prep.formats._geotiff import geotiff_tags

    arr = grp["classes"]
    h, w = arr.shape
    tiepoints = None
    if gt is None and lat is not None and lon is not None:
        ri, ci = _sample_idx(h), _sample_idx(w)
        tiepoints = [(float(c) + 0.5, float(r) + 0.5, float(lon[r, c]), float(lat[r, c]))
                     for r in ri for c in ci if np.isfinite(lat[r, c]) and np.isfinite(lon[r, c])]
    names = grp.attrs.get("class_names")
    tags = geotiff_tags(gt, nodata=-1, metadata={"class_names": json.dumps(names)} if names else None,
                        tiepoints=tiepoints)

    def tiles() -> Iterator[np.ndarray]:
        for y in range(0, h, tile):
            band = arr[y:y + tile]
            for x in range(0, w, tile):
                yield np.ascontiguousarray(band[:, x:x + tile])

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".tif.tmp")
    os.close(fd)
    try:
        tifffile.imwrite(tmp, tiles(), shape=(h, w), dtype=np.int16, tile=(tile, tile), compression="zlib",
                         photometric="minisblack", metadata=None, extratags=tags)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# --------------------------------------------------------------------------------------------- stores

def _embed_store(runner: _Runner, encoder, src: str, out: str, common: dict, *, batch_size: int, stats: str,
                 overwrite: bool, progress: bool | None, storage_options: dict | None, on_batch) -> dict:
    from data_prep.store import META_FIELDS, PatchStore

    store = PatchStore(src, storage_options)
    n, ps, p = store.n_patches, store.patch_size, encoder.patch_size
    if ps % p:
        raise EmbedError(f"{src}: patches of {ps} pixels are not a multiple of the encoder's patch size {p}")
    good = store.good_bands
    if not good.any():
        raise EmbedError(f"{src}: no good bands to embed")
    classes = runner.head is not None
    unit = p if common["output"] == "tokens" else 1
    cells = ps // unit
    settings = {**common, "source": src if "://" in src else os.path.abspath(src), "n_patches": n}
    grp, resumed = _open_out(out, storage_options, settings, overwrite)
    if resumed and grp.attrs.get("complete"):
        return {"out": out, "complete": True, "tiles": n, "computed": 0, "skipped": n}
    if resumed:
        norm = Norm.from_json(grp.attrs["normalisation"])
    elif stats in ("auto", "scene"):
        norm = Norm.from_band_stats(store.stats, good, f"store {src}")
    else:
        norm = Norm.from_band_stats(_store_stats(stats, store.sensor, store.level, store.n_bands, storage_options),
                                    good, f"store {stats}")
    d = runner.dim
    if not resumed:
        if classes:
            grp.create_array("classes", shape=(n, ps, ps), dtype="int16", chunks=(1, ps, ps), fill_value=-1,
                             dimension_names=("patch", "y", "x"))
        else:
            item = np.dtype(common["dtype"]).itemsize
            grp.create_array("embeddings", shape=(n, d, cells, cells), dtype=common["dtype"],
                             chunks=(1, _feature_chunk(d, cells, item), cells, cells), fill_value=0,
                             dimension_names=("patch", "feature", "y", "x"))
        grp.create_array("valid", shape=(n, cells, cells), dtype="float32" if unit > 1 else "bool",
                         chunks=(1, cells, cells), fill_value=0, dimension_names=("patch", "y", "x"))
        meta = grp.create_group("meta")
        for name, dt in META_FIELDS.items():
            meta.create_array(name, shape=(n,), dtype=dt, chunks=(max(1, min(n, 4096)),), dimension_names=("patch",))
            if n:
                meta[name][:] = store.meta(name)
        grp.create_array("done", shape=(n,), dtype="uint8", chunks=(max(1, min(n, 4096)),), fill_value=0,
                         dimension_names=("patch",))
        grp.attrs.update({"source": settings["source"], "sensor": store.sensor, "level": store.level,
                          "patch_size_px": ps, "cell_pixels": unit, "patch_size": p,
                          "granules": store.attrs.get("granules", {}),
                          "wavelengths_nm": store.wavelengths_nm[good].tolist(),
                          "fwhm_nm": store.fwhm_nm[good].tolist(), "normalisation": norm.to_json(),
                          "encoder": {"source": getattr(encoder, "source", ""), "name": encoder.args.get("name"),
                                      "embed_dim": encoder.embed_dim, "patch_size": p}})
    done = grp["done"][:].astype(bool) if n else np.zeros(0, bool)
    todo = np.flatnonzero(~done)
    wl = torch.from_numpy(store.wavelengths_nm[good].astype(np.float32))
    fw = torch.from_numpy(store.fwhm_nm[good].astype(np.float32))
    gsd_all = store.meta("gsd").astype(np.float32) if n else np.zeros(0, np.float32)
    gi = np.flatnonzero(good)
    b0, b1 = int(gi[0]), int(gi[-1]) + 1
    target = grp["classes"] if classes else grp["embeddings"]
    from data_prep.progress import progress as progress_bar

    n_batches = 0
    with progress_bar(total=todo.size, desc="embed", unit="patch", enabled=progress is not False, every=1000) as bar:
        for s in range(0, todo.size, batch_size):
            idx = todo[s:s + batch_size]
            x = torch.empty((idx.size, gi.size, ps, ps), dtype=torch.float32)
            v = torch.empty((idx.size, ps, ps), dtype=torch.bool)
            for q, i in enumerate(idx):
                px, va = store.read(int(i), b0, b1)
                norm.into(x[q], px[gi - b0], va)
                v[q] = torch.from_numpy(np.asarray(va, bool))
            y = runner(x, v, wl, fw, store.sensor, store.level, torch.from_numpy(gsd_all[idx])).numpy()
            for q, i in enumerate(idx):
                vv = v[q].numpy()
                if unit > 1:
                    vv = vv.reshape(cells, unit, cells, unit).mean(axis=(1, 3)).astype(np.float32)
                if classes:
                    cls = y[q].argmax(0).astype(np.int16)
                    cls[~v[q].numpy()] = -1
                    target[int(i)] = cls
                else:
                    target[int(i)] = y[q].astype(common["dtype"])
                grp["valid"][int(i)] = vv
            done[idx] = True
            grp["done"][int(idx[0]):int(idx[-1]) + 1] = done[int(idx[0]):int(idx[-1]) + 1].astype(np.uint8)
            bar.update(idx.size)
            n_batches += 1
            if on_batch is not None:
                on_batch(n_batches)
    grp.attrs["complete"] = True
    return {"out": out, "complete": True, "tiles": n, "computed": int(todo.size), "skipped": int(n - todo.size),
            "cells": [n, cells, cells], "normalisation": norm.source}


def open_embeddings(url: str, storage_options: dict | None = None) -> zarr.Group:
    """The output group of :func:`embed`; an :class:`EmbedError` when it is not one or is incomplete."""
    kw = {"storage_options": storage_options} if storage_options and "://" in url else {}
    try:
        g = zarr.open_group(url, mode="r", **kw)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError) as e:
        raise EmbedError(f"no embeddings output at {url}: {e}") from None
    if g.attrs.get("format") != FORMAT:
        raise EmbedError(f"{url}: attrs format is {g.attrs.get('format')!r}; expected {FORMAT!r}")
    if not g.attrs.get("complete"):
        raise EmbedError(f"{url}: incomplete (an interrupted run); rerun the same command to finish it")
    return g

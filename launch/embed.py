"""Embed a whole product or patch store with an encoder export (or classify it with a fine-tuned head).

    python launch/embed.py --checkpoint EXPORT PRODUCT_OR_STORE --out OUT.zarr
        [--output tokens|pixels] [--layer N] [--head HEAD_DIR] [--tile 128] [--overlap 32] [--batch-size 8]
        [--stats auto|scene|STORE] [--device cpu|cuda] [--precision fp32|bf16] [--dtype float16|float32]

PRODUCT_OR_STORE is any product the readers open (ENVI .hdr, EMIT .nc, an EnMAP/DESIS folder, a GeoTIFF) or
a patch store (<sensor>_<level>.zarr, any fsspec URL). The product is read by row windows and tiled with
overlap; tiles go through the encoder in batches; overlaps are cross-faded; OUT.zarr gets per-token (or
per-pixel) embeddings, or with --head a per-pixel class map (and OUT.tif, a GeoTIFF), with the product's
geolocation, in memory bounded by the tile strip whatever the scene's length. Inputs are normalised as in
pretraining (bad bands dropped, level clip, p01/p99 clip and z-score with --stats). Rerunning the same
command resumes: written tiles are skipped; an interrupted run leaves done flags only on finished tiles.
Details: finetune/inference.py. Exit codes: 0 done, 2 bad input or settings.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# this file's folder must not shadow the packages (launch/finetune.py would hide ``finetune``)
sys.path[:] = [str(REPO), *(p for p in sys.path if Path(p or ".").resolve() not in (REPO, REPO / "launch"))]

from data_prep.errors import run_main  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", help="product (any reader format) or patch store URL")
    ap.add_argument("--checkpoint", required=False, default=None,
                    help="encoder export folder (encoder.safetensors + model_args.json); optional with a --head "
                         "that holds its own encoder")
    ap.add_argument("--out", required=True, help="output Zarr group (path or fsspec URL), e.g. OUT.zarr")
    ap.add_argument("--output", choices=("tokens", "pixels"), default="tokens",
                    help="embeddings per token (patch) or per pixel (bilinear within each tile) (default: tokens)")
    ap.add_argument("--layer", type=int, default=None,
                    help="take this transformer block's output (0-based, negative from the end) instead of the "
                         "final one")
    ap.add_argument("--head", default=None, help="fine-tuned segmentation head folder (finetune.inference.save_head): "
                                                 "writes a class map instead of embeddings")
    ap.add_argument("--tile", type=int, default=128, help="tile side in pixels, a multiple of the patch size")
    ap.add_argument("--overlap", type=int, default=32,
                    help="overlap of neighbouring tiles in pixels (multiple of the patch size, <= tile / 2)")
    ap.add_argument("--batch-size", type=int, default=8, help="tiles per forward pass")
    ap.add_argument("--stats", default="auto",
                    help="normalisation statistics: auto (the export's training statistics of this sensor and "
                         "level, else the scene's), scene (a first pass over the product), or a patch store URL")
    ap.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1)")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16 autocast (GPUs)")
    ap.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="stored embedding type")
    ap.add_argument("--geotiff", default=None, help="class-map GeoTIFF path (default: OUT with .tif)")
    ap.add_argument("--overwrite", action="store_true", help="start again when OUT holds another run")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar (there is none off a terminal)")
    ap.add_argument("--json", action="store_true", help="print the summary (with peak memory) as one JSON line")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    return run_main(lambda: run(args))


def run(args: argparse.Namespace) -> int:
    import finetune
    from finetune.inference import EmbedError, embed, load_head
    from pretrain.engine import bound_cpu_allocator
    from pretrain.logging_utils import memory_figures

    # large per-batch tensors go back to the OS when freed (glibc would otherwise keep them in its heap
    # arenas: +7% peak RSS from a 512- to a 4096-line flightline, against +2% with it; bench/embed.py)
    bound_cpu_allocator()
    encoder = finetune.load_encoder(args.checkpoint) if args.checkpoint else None
    head = None
    if args.head:
        head, _ = load_head(args.head, encoder)
    elif encoder is None:
        raise EmbedError("--checkpoint is required (only a --head with its own encoder/ can do without)")
    summary = embed(encoder, args.source, args.out, head=head, output=args.output, layer=args.layer,
                    tile=args.tile, overlap=args.overlap, batch_size=args.batch_size, stats=args.stats,
                    device=args.device, precision=args.precision, dtype=args.dtype, geotiff=args.geotiff,
                    overwrite=args.overwrite, progress=False if args.no_progress else None)
    summary.update(memory_figures())
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{summary['out']}: {summary['computed']} tiles computed, {summary['skipped']} skipped, "
              f"normalisation {summary.get('normalisation', 'as before')}, {summary.get('seconds', 0):.1f} s, "
              f"peak RSS {summary['peak_rss_mb']:.0f} MiB" + (f"; GeoTIFF {summary['geotiff']}"
                                                                if "geotiff" in summary else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

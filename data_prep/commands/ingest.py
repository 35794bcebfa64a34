"""``python -m data_prep ingest INPUT... --out ROOT``."""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Read sensor products (files or folders, searched recursively; the format is detected), cut them "
        "into non-overlapping patches, drop patches over --max-invalid nodata, clip to the registry's "
        "thresholds, and commit them as float16 to one Zarr store per sensor and level under ROOT "
        "(ROOT/<sensor>_<level>.zarr; a path or any fsspec URL). Re-running skips granules already "
        "committed; an interrupted granule leaves nothing visible. Never run two ingests into the same "
        "ROOT at once: give each --shard its own ROOT.")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="product files or folders")
    p.add_argument("--out", required=True, metavar="ROOT", help="root folder or fsspec URL of the stores")
    p.add_argument("--patch-size", type=int, default=256, help="patch side in pixels (8 or more)")
    p.add_argument("--max-invalid", type=float, default=0.2,
                   help="drop a patch when more than this fraction of its pixels is invalid")
    p.add_argument("--workers", type=int, default=1, help="worker processes that read and tile")
    p.add_argument("--shard", default=None, metavar="k/N",
                   help="only the products whose file name hashes to k of N (0 <= k < N), for job arrays")
    p.add_argument("--keep-going", action="store_true",
                   help="skip a product that fails (reported, exit status 1) instead of stopping")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from data_prep.ingest import ingest

    summary = ingest(args.inputs, args.out, patch_size=args.patch_size, max_invalid=args.max_invalid,
                     workers=args.workers, shard=args.shard, progress=not args.no_progress and sys.stderr.isatty(),
                     keep_going=args.keep_going)
    if args.json:
        print(json.dumps(summary))
    else:
        for url, s in summary["stores"].items():
            print(f"{url}: +{s['patches_added']} patches from {len(s['granules_added'])} granule(s), "
                  f"{len(s['granules_skipped'])} already there; {s['n_patches']} patches in total")
        print(f"{summary['bytes_read'] / 1e6:.1f} MB read in {summary['seconds']:.1f} s "
              f"({summary['mb_per_s']:.1f} MB/s)")
    for f in summary["failed"]:
        print(f"error: {f['error']}", file=sys.stderr)
    return 1 if summary["failed"] else 0

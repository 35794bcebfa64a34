"""``python -m data_prep export-wds STORE --out DIR``."""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Write the committed patches of STORE as WebDataset tar shards in DIR: per sample pixels.npy "
        "(float16 bands x P x P), valid.npy (bool P x P) and a json of its metadata; "
        "DIR/<sensor>_<level>-info.json holds the band tables and statistics.")
    p.add_argument("store", metavar="STORE", help="store path or fsspec URL")
    p.add_argument("--out", required=True, metavar="DIR", help="local output folder")
    p.add_argument("--maxcount", type=int, default=1000, help="samples per shard at most")
    p.add_argument("--maxsize", type=float, default=1e9, help="bytes per shard at most")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from data_prep.wds import export_wds

    res = export_wds(args.store, args.out, maxcount=args.maxcount, maxsize=args.maxsize,
                     progress=not args.no_progress and sys.stderr.isatty())
    print(json.dumps(res))
    return 0

"""``python -m data_prep migrate OLD NEW``: rewrite a store of an older schema in the current one."""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Copy the store OLD (an older schema, e.g. 1: written before missing-data detection) into a new store NEW "
        "of the current schema, granule by granule: same patches, metadata, manifest and statistics. OLD is only "
        "read. A store with lost shard objects is refused (repair it first with `verify --repair`).")
    p.add_argument("src", metavar="OLD", help="the store to copy (path or fsspec URL)")
    p.add_argument("dst", metavar="NEW", help="where to write the new store (must not exist)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from data_prep.integrity import migrate

    res = migrate(args.src, args.dst, progress=not args.no_progress and sys.stderr.isatty())
    print(json.dumps(res))
    return 0

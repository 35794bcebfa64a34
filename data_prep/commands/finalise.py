"""``python -m data_prep finalise ROOT``: write the manifests of the logical datasets of a sharded ingest."""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "After a sharded ingest (--shard k/N job arrays, or --executor dask://...): merge the statistics of every "
        "sensor and level's shard stores under ROOT from their partial sums and write ROOT/<sensor>_<level>.shards/"
        "manifest.json, the logical dataset the loader reads as one source. The last shard to finish does this "
        "itself; run it by hand after re-running a shard, or with --partial to use the shards finished so far.")
    p.add_argument("root", metavar="ROOT", help="the --out root of the sharded ingest (path or fsspec URL)")
    p.add_argument("--partial", action="store_true",
                   help="finalise with the shards that have finished (default: refuse while any is missing)")


def run(args: argparse.Namespace) -> int:
    from data_prep.dataset import finalise

    urls = finalise(args.root.rstrip("/"), require_all=not args.partial)
    print(json.dumps({"root": args.root, "datasets": urls}))
    return 0

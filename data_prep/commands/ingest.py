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
        "store at once. At archive scale: --executor dask://HOST:PORT (a Dask scheduler) or dask://local:N "
        "(a local cluster of N processes), or a job array with --shard k/N per job: each shard writes its own "
        "stores under ROOT/<sensor>_<level>.shards/, and when every shard is done a manifest there makes them "
        "one logical dataset (statistics merged from the shards' partial sums) that the loader takes as one "
        "source (data.sources: [{url: ROOT/<sensor>_<level>.shards}]).")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="product files or folders")
    p.add_argument("--out", required=True, metavar="ROOT", help="root folder or fsspec URL of the stores")
    p.add_argument("--patch-size", type=int, default=256, help="patch side in pixels (8 or more)")
    p.add_argument("--patch-size-for", nargs="+", default=None, metavar="SENSOR=PX",
                   help="another patch side for some sensors, e.g. planetscope=640 sentinel-2=192 (co-located stores "
                        "cover the same ground: a finer sensor needs more pixels per patch)")
    p.add_argument("--max-invalid", type=float, default=0.2,
                   help="drop a patch when more than this fraction of its pixels is invalid")
    p.add_argument("--workers", type=int, default=1, help="worker processes that read and tile")
    p.add_argument("--shard", default=None, metavar="k/N",
                   help="job arrays: this job is shard k of N (0 <= k < N): the products whose file name hashes "
                        "to k, into shard k's stores; the job that finishes last writes the manifests")
    p.add_argument("--executor", default="local", metavar="EXECUTOR",
                   help="'local' (this machine, --workers processes), 'dask://HOST:PORT' (a running Dask "
                        "scheduler; products must be reachable from its workers under the same paths) or "
                        "'dask://local:N' (a Dask LocalCluster of N worker processes)")
    p.add_argument("--shards", type=int, default=None, metavar="N",
                   help="with a dask executor: shards to split the products into (default: the count recorded "
                        "under ROOT, else the cluster's worker threads); reruns must keep it")
    p.add_argument("--keep-going", action="store_true",
                   help="skip a product that fails (reported, exit status 1) instead of stopping")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def parse_sizes(items: list[str] | None) -> dict[str, int] | None:
    """``["planetscope=640", ...]`` -> ``{"planetscope": 640}`` (UserError naming a malformed item)."""
    if not items:
        return None
    from data_prep.errors import UserError

    out = {}
    for it in items:
        name, _, px = it.partition("=")
        if not name or not px.strip().isdigit():
            raise UserError(f"--patch-size-for {it!r}: expected SENSOR=PIXELS, e.g. planetscope=640")
        out[name.strip()] = int(px)
    return out


def run(args: argparse.Namespace) -> int:
    from data_prep.ingest import ingest

    summary = ingest(args.inputs, args.out, patch_size=args.patch_size,
                     patch_size_for=parse_sizes(args.patch_size_for), max_invalid=args.max_invalid,
                     workers=args.workers, shard=args.shard, progress=not args.no_progress and sys.stderr.isatty(),
                     keep_going=args.keep_going, executor=args.executor, shards=args.shards)
    if args.json:
        print(json.dumps(summary))
    else:
        for line in summary.get("skipped", []):
            print(line)
        for url, s in summary["stores"].items():
            print(f"{url}: +{s['patches_added']} patches from {len(s['granules_added'])} granule(s), "
                  f"{len(s['granules_skipped'])} already there; {s['n_patches']} patches in total")
        print(f"{summary['bytes_read'] / 1e6:.1f} MB read in {summary['seconds']:.1f} s "
              f"({summary['mb_per_s']:.1f} MB/s)")
        if "datasets" in summary:
            if summary["datasets"]:
                for url in summary["datasets"]:
                    print(f"logical dataset {url}: manifest written (statistics merged over its shards)")
            else:
                print("shard done; the manifests are written by the last shard to finish "
                      "(or `python -m data_prep finalise ROOT`)")
    for f in summary["failed"]:
        print(f"error: {f['error']}", file=sys.stderr)
    return 1 if summary["failed"] else 0

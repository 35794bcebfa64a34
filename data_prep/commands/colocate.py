"""``python -m data_prep colocate ROOT [--min-overlap F]``: build the location index of the stores under ROOT."""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Find which patches of which stores under ROOT overlap on the ground (from the per-patch footprints ingest "
        "keeps; a shapely STRtree) and write ROOT/locations.json: per location its common footprint (lon/lat "
        "bounds), overlap fraction, sensors and member patches. One write (an interrupted run leaves the previous "
        "index intact); a rerun over unchanged stores writes the same bytes. ROOT may be any fsspec URL. "
        "The co-located loader (data.colocated) reads it; `inspect ROOT` reports it.")
    p.add_argument("root", metavar="ROOT", help="folder (path or fsspec URL) holding <sensor>_<level>.zarr stores")
    p.add_argument("--min-overlap", type=float, default=0.5,
                   help="a location's common footprint must cover at least this fraction of its smallest patch")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from data_prep.colocate import colocate, index_url, summary, summary_lines

    idx = colocate(args.root, min_overlap=args.min_overlap, progress=not args.no_progress)
    s = summary(idx)
    if args.json:
        print(json.dumps({"index": index_url(args.root), **s}))
        return 0
    head, *rest = summary_lines(s)
    print(f"{index_url(args.root)} ({len(s['stores'])} stores): {head}")
    for line in rest:
        print(line)
    return 0

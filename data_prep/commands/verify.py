"""``python -m data_prep verify STORE [--repair INPUT...]``: read every chunk; list missing, corrupt and NaN patches."""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Read every chunk of STORE (patches, valid mask, per-patch metadata, statistics accumulator) and list "
        "the patches that are missing (their object is not in storage, or reads as the fill value), corrupt "
        "(a checksum or decode failure) or NaN (part of them reads as the fill value), with their indices and "
        "granules. Exit status 0 when the store is whole, 1 when anything was found, 2 for bad input. "
        "--repair INPUT... re-ingests the damaged granules from their products (files or folders) and "
        "rewrites those patches in place, then verifies again.")
    p.add_argument("store", metavar="STORE", help="store path or fsspec URL (ROOT/<sensor>_<level>.zarr)")
    p.add_argument("--repair", nargs="+", metavar="INPUT", default=None,
                   help="product files or folders holding the damaged granules' products")
    p.add_argument("--batch", type=int, default=8, help="patches read at once")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object (last line)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _print(rep: dict) -> None:
    state = "whole" if rep["whole"] else "DAMAGED"
    print(f"{rep['url']}: {rep['patches']} patches, schema {rep['schema_version']}: {state}")
    for k in ("missing", "corrupt", "nan"):
        if rep[k]:
            print(f"  {k}: {len(rep[k])} patch(es): {rep[k][:50]}{' ...' if len(rep[k]) > 50 else ''}")
    for p in rep["problems"][:20]:
        print(f"    patch {p['index']} (granule {p['granule']}): {p['kind']}: {p['detail']}")
    for m in rep["meta"]:
        print(f"  {m['field']}: {m['kind']}: {m['detail']}")
    if rep.get("note"):
        print(f"  note: {rep['note']}")


def run(args: argparse.Namespace) -> int:
    from data_prep.integrity import repair, verify

    rep = verify(args.store, progress=not args.no_progress and sys.stderr.isatty(), batch=args.batch)
    if args.repair is not None and not rep["whole"]:
        fixed = repair(args.store, args.repair, rep)
        if any(m["field"] == "stats_acc" for m in rep["meta"]):
            from data_prep.stats import recompute
            from data_prep.store import PatchStore, StoreWriter

            StoreWriter.open(args.store).set_statistics(recompute(PatchStore(args.store)))
        before = rep
        rep = verify(args.store, batch=args.batch)
        rep["repair"] = {**fixed, "before": {k: before[k] for k in ("missing", "corrupt", "nan")}}
    if args.json:
        print(json.dumps(rep))
    else:
        if "repair" in rep:
            r = rep["repair"]
            print(f"repaired granules {r['repaired']}" + (f"; products not given for {r['not_given']}"
                                                          if r["not_given"] else ""))
        _print(rep)
    return 0 if rep["whole"] else 1

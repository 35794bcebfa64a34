"""``python -m data_prep stats STORE``: recompute a store's statistics from its committed patches."""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Rescan every committed patch of STORE (valid pixels only) and rewrite its per-band statistics "
        "(count, exact mean and std, 1st and 99th percentiles from histograms over the clip range) "
        "and its running accumulator. Prints how far the stored statistics were from the rescan. "
        "--from-accumulator instead finalises them from the partial sums merged at each granule's commit.")
    p.add_argument("store", metavar="STORE", help="store path or fsspec URL (ROOT/<sensor>_<level>.zarr)")
    p.add_argument("--from-accumulator", action="store_true",
                   help="no rescan: finalise the statistics from the store's merged per-granule partial sums")
    p.add_argument("--dry-run", action="store_true", help="compare only; write nothing")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from data_prep.stats import recompute
    from data_prep.store import PatchStore, StoreWriter

    store = PatchStore(args.store)
    if args.from_accumulator:
        acc = store.partials()
    else:
        acc = recompute(store, progress=not args.no_progress and sys.stderr.isatty())
    new = acc.band_stats()
    old = store.attrs.get("stats")
    diff = None
    if old:
        diff = {k: float(np.nanmax(np.abs(np.asarray(old[k], dtype=np.float64) - getattr(new, k)), initial=0.0))
                for k in ("count", "mean", "std", "p01", "p99")}
    if not args.dry_run:
        StoreWriter.open(args.store).set_statistics(acc)
    good = store.good_bands & (new.count > 0)
    out = {"store": args.store, "patches": store.n_patches, "valid_pixels": float(new.count.max(initial=0)),
           "max_abs_change": diff, "written": not args.dry_run,
           "mean_good_bands": float(np.mean(new.mean[good])) if good.any() else None,
           "std_good_bands": float(np.mean(new.std[good])) if good.any() else None}
    print(json.dumps(out) if args.json else "\n".join(f"{k}: {v}" for k, v in out.items()))
    return 0

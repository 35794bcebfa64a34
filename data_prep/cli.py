"""``python -m data_prep <command>``: simulate, ingest, inspect, stats, export-wds, verify, migrate, finalise,
colocate."""

from __future__ import annotations

import argparse
import importlib
import logging

from data_prep.errors import run_main

#: subcommand -> (module under data_prep.commands, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "simulate": ("simulate", "write realistic simulated products of each sensor in its own file format"),
    "ingest": ("ingest", "read products, tile them into patches and commit them to Zarr patch stores"),
    "inspect": ("inspect", "summarise a patch store (patches, bands, chunking, bytes, statistics)"),
    "stats": ("stats", "recompute a store's per-band statistics (a rescan, or --from-accumulator: from the saved partial sums)"),
    "export-wds": ("export_wds", "write a store's patches as WebDataset tar shards"),
    "verify": ("verify", "read every chunk of a store; list missing, corrupt and NaN patches (--repair re-ingests them)"),
    "migrate": ("migrate", "rewrite a store of an older schema in the current one"),
    "finalise": ("finalise", "write the manifests of a sharded ingest's logical datasets (statistics merged)"),
    "colocate": ("colocate", "index which patches of which stores overlap on the ground (ROOT/locations.json)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep",
        description="specfm data preparation: from sensor products to chunked FP16 Zarr patch stores.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        try:
            mod = importlib.import_module(f"data_prep.commands.{module}")
        except ModuleNotFoundError as e:  # a command not built in this checkout
            if e.name != f"data_prep.commands.{module}":
                raise
            continue
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Exit codes (``data_prep.errors.run_main``): 0 done, 2 bad input (one line), 143 SIGTERM, 1 a bug."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_main(lambda: args._run(args))

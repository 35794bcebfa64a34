"""Run a benchmark suite on an encoder export and write report.md / report.json / report.csv + figures.

    python launch/benchmark.py --suite configs/benchmarks/synthetic.yaml --checkpoint runs/demo/export/stage3_all --out runs/bench
    python launch/benchmark.py --suite configs/benchmarks/paper.yaml --checkpoint EXPORT --out DIR --data-root /data/hsi
    python launch/benchmark.py --suite configs/benchmarks/paper.yaml --data-root /data/hsi --list   # what is there
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# this file's folder must not shadow the packages (launch/finetune.py would hide ``finetune``)
sys.path[:] = [str(REPO), *(p for p in sys.path if Path(p or ".").resolve() not in (REPO, REPO / "launch"))]

from data_prep.errors import run_main  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", required=True, help="suite YAML (configs/benchmarks/<name>.yaml)")
    ap.add_argument("--checkpoint", help="encoder export folder (encoder.safetensors + model_args.json)")
    ap.add_argument("--out", help="output folder for the reports and figures/")
    ap.add_argument("--list", action="store_true", help="list the datasets the suite needs under --data-root: found, "
                                                         "missing files and where to get them; runs nothing")
    ap.add_argument("--data", default=None, help="manifest.json of an existing simulated corpus (replaces ${corpus}; "
                                                 "skips the suite's own simulation)")
    ap.add_argument("--data-root", default=None, help="folder of the public datasets (replaces ${root})")
    ap.add_argument("--steps", type=int, default=None, help="run every task for this many steps (train.steps; "
                                                              "also clears train.epochs where a task sets it)")
    ap.add_argument("--each", action="append", default=[], metavar="KEY=VALUE",
                    help="override applied to every task, e.g. --each data.band_stride=8 --each eval.test_max=200")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("overrides", nargs="*", help="suite-level key=value overrides (e.g. simulate.size=32)")
    return ap.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    return run_main(lambda: run(args))


def run(args: argparse.Namespace) -> int:
    from finetune.config import load_suite
    from finetune.encoder_api import load_encoder
    from finetune.runner import run_suite

    steps = [f"train.steps={args.steps}", "train.epochs=null"] if args.steps is not None else []
    suite = load_suite(args.suite, args.overrides, [*args.each, *steps])
    if args.list:
        from finetune.datasets.catalog import list_suite

        lines, _ = list_suite(suite, args.data_root)
        print("\n".join(lines))
        return 0
    if not args.checkpoint or not args.out:
        from data_prep.errors import UserError

        raise UserError("--checkpoint and --out are required (unless --list)")
    encoder = load_encoder(args.checkpoint)
    report = run_suite(suite, encoder, args.out, checkpoint=args.checkpoint, data=args.data,
                       data_root=args.data_root, progress=not args.no_progress)
    for name, t in report["tasks"].items():
        print(f"{name:28s} {t['headline']} = {t['metrics'][t['headline']]:.4f}")
    print(f"reports in {args.out}: report.md, report.json, report.csv, figures/")
    return 0


if __name__ == "__main__":
    sys.exit(main())

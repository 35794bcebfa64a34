"""Fine-tune / linear-probe one task from a configs/finetune YAML and write its report and figure.

    python launch/finetune.py --config configs/finetune/synthetic_segmentation.yaml --checkpoint EXPORT \\
        --out runs/ft/seg [--data MANIFEST] [--data-root DIR] [train.steps=50 train.mode=linear_probe ...]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from finetune.config import ConfigError, SuiteConfig, load_task  # noqa: E402
from finetune.datasets import DatasetError  # noqa: E402
from finetune.encoder_api import ExportError, load_encoder  # noqa: E402
from finetune.runner import run_suite  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="task YAML (configs/finetune/<name>.yaml)")
    ap.add_argument("--checkpoint", required=True, help="encoder export folder")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--data", default=None, help="manifest.json of a simulated corpus (replaces ${corpus})")
    ap.add_argument("--data-root", default=None, help="folder of public datasets (replaces ${root})")
    ap.add_argument("--simulate-size", type=int, default=48,
                    help="when the config needs ${corpus} and --data is not given: simulate EMIT scenes of this size")
    ap.add_argument("overrides", nargs="*", help="task key=value overrides, e.g. train.steps=50 train.mode=linear_probe")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        task = load_task(args.config, args.overrides)
        simulate = None
        if args.data is None and "${corpus}" in str(task.data):
            simulate = {"sensors": ["emit"], "levels": ["L2"], "scenes": 2, "size": args.simulate_size, "seed": 0}
        suite = SuiteConfig(name=task.name, tasks=[task], simulate=simulate)
        report = run_suite(suite, load_encoder(args.checkpoint), args.out, checkpoint=args.checkpoint,
                           data=args.data, data_root=args.data_root)
    except (ConfigError, DatasetError, ExportError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t = report["tasks"][task.name]
    print(" ".join(f"{k}={v:.4f}" for k, v in t["metrics"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

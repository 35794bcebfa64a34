"""Fine-tune / linear-probe one task from a configs/finetune YAML and write its report and figure.

    python launch/finetune.py --config configs/finetune/synthetic_segmentation.yaml --checkpoint EXPORT \\
        --out runs/ft/seg [--data MANIFEST] [--data-root DIR] [--save-head DIR] [train.steps=50 ...]

``--save-head DIR`` (segmentation tasks) writes the trained head with ``finetune.inference.save_head``
(head.safetensors + head.json, and encoder/ when the encoder was fine-tuned), for
``python launch/embed.py --head DIR PRODUCT --out OUT.zarr``.
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="task YAML (configs/finetune/<name>.yaml)")
    ap.add_argument("--checkpoint", required=True, help="encoder export folder")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--data", default=None, help="manifest.json of a simulated corpus (replaces ${corpus})")
    ap.add_argument("--data-root", default=None, help="folder of public datasets (replaces ${root})")
    ap.add_argument("--simulate-size", type=int, default=48,
                    help="when the config needs ${corpus} and --data is not given: simulate EMIT scenes of this size")
    ap.add_argument("--save-head", default=None, metavar="DIR",
                    help="segmentation tasks: write the trained head (and the encoder when it was fine-tuned) to DIR, "
                         "for launch/embed.py --head DIR")
    ap.add_argument("overrides", nargs="*", help="task key=value overrides, e.g. train.steps=50 train.mode=linear_probe")
    args = ap.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    return run_main(lambda: run(args))


def run(args: argparse.Namespace) -> int:
    from finetune.config import ConfigError, SuiteConfig, load_task
    from finetune.encoder_api import load_encoder
    from finetune.runner import run_suite

    task = load_task(args.config, args.overrides)
    on_task = None
    if args.save_head:
        if task.kind != "segmentation":
            raise ConfigError(f"--save-head writes segmentation heads; task {task.name!r} in {args.config} is "
                              f"kind {task.kind!r}")
        from finetune.inference import save_head

        def on_task(_, res) -> None:
            save_head(res.model, args.save_head, res.arrays.get("class_names"))
    simulate = None
    if args.data is None and "${corpus}" in str(task.data):
        simulate = {"sensors": ["emit"], "levels": ["L2"], "scenes": 2, "size": args.simulate_size, "seed": 0}
    suite = SuiteConfig(name=task.name, tasks=[task], simulate=simulate)
    report = run_suite(suite, load_encoder(args.checkpoint), args.out, checkpoint=args.checkpoint,
                       data=args.data, data_root=args.data_root, on_task=on_task)
    t = report["tasks"][task.name]
    print(" ".join(f"{k}={v:.4f}" for k, v in t["metrics"].items()))
    if args.save_head:
        print(f"head written to {args.save_head}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Pretrain (progressive stages, DeepSpeed) from a YAML config and ``key=value`` overrides.

    torchrun --nproc_per_node=2 launch/pretrain.py --config configs/pretrain/demo.yaml [optim.lr=1e-4 ...]

Re-running the same command resumes from the newest complete checkpoint. SIGTERM saves, then exits 143.
Exit codes: 0 done (or max_steps reached), 2 bad config or input, 143 stopped by SIGTERM.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# this file's folder must not shadow the ``pretrain`` package (it does when sys.path[0] is launch/)
sys.path[:] = [str(REPO), *(p for p in sys.path if Path(p or ".").resolve() not in (REPO, REPO / "launch"))]

import argparse  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402

from data_prep.errors import run_main  # noqa: E402

log = logging.getLogger("specfm.pretrain")

LINGER_S = 3.0  # under torchrun the first rank to exit stops the others: let each print its own error


def git_sha() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        return sha.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="YAML file under configs/pretrain/")
    ap.add_argument("overrides", nargs="*", help="key=value overrides with dotted paths, e.g. stages.0.steps=10")
    return ap.parse_intermixed_args(argv)


def train(args: argparse.Namespace) -> int:
    """One rank: load and check the config, join the process group, make missing demo data, train."""
    from pretrain.config import dump_config, load_config
    from pretrain.plan import make_plan, preflight

    cfg = load_config(args.config, args.overrides)  # a bad key, value or model override fails here
    plan = make_plan(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    if not cfg.prepare.enabled:  # fail on bad input before DeepSpeed is even imported
        preflight(plan)

    import torch.distributed as dist

    from pretrain import engine
    from pretrain.logging_utils import setup_console
    from pretrain.prepare import prepare_data
    from pretrain.trainer import Trainer

    rank, world, _ = engine.init_distributed()
    setup_console(rank)
    try:
        if world != plan.world_size:
            plan = make_plan(cfg, world)
        prepare_data(plan, rank)
        preflight(plan)
        lay = plan.layout
        if rank == 0:
            lay.write_provenance(dump_config(cfg), git_sha())
        dist.barrier()
        code = Trainer(plan, rank).run()
        last = plan.stages[-1].name
        if rank == 0 and code == 0 and lay.stage_done(last) is not None:
            print(f"run: {lay.root.resolve()}\nfigures: {lay.figures_root.resolve()}\n"
                  f"export: {lay.export(last).resolve()}", flush=True)
        return code
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rank = os.environ.get("RANK", "0")
    linger = LINGER_S if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0.0
    return run_main(lambda: train(args), prefix=f"error (rank {rank})", linger=linger)


if __name__ == "__main__":
    sys.exit(main())

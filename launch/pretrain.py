"""Pretrain (progressive stages, DeepSpeed) from a YAML config and ``key=value`` overrides.

    torchrun --nproc_per_node=2 launch/pretrain.py --config configs/pretrain/demo.yaml [optim.lr=1e-4 ...]

Re-running the same command resumes from the newest complete checkpoint. SIGTERM saves, then exits 143.
Exit codes: 0 done (or max_steps reached), 2 bad config or input, 143 stopped by SIGTERM.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from pretrain.checkpoint import CheckpointError  # noqa: E402
from pretrain.config import ConfigError, dump_config, load_config  # noqa: E402

log = logging.getLogger("specfm.pretrain")


def git_sha() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        return sha.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def fail(rank: int | str, err: Exception) -> int:
    """Report bad input on this rank and return exit code 2.

    Under torchrun the first rank to exit makes the agent stop the others, so a rank waits a moment
    before exiting: every rank runs the same checks and gets to print its own error.
    """
    print(f"error (rank {rank}): {err}", file=sys.stderr, flush=True)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        time.sleep(3.0)
    return 2


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="YAML file under configs/pretrain/")
    ap.add_argument("overrides", nargs="*", help="key=value overrides with dotted paths, e.g. stages.0.steps=10")
    args = ap.parse_args(argv)

    rank_env = os.environ.get("RANK", "0")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        return fail(rank_env, e)

    from pretrain.data import DataError, LoaderWorkerError
    from pretrain.trainer import Trainer, preflight, prepare_data

    if not cfg.prepare.enabled:  # fail on bad input before DeepSpeed is even imported
        try:
            preflight(cfg, int(os.environ.get("WORLD_SIZE", "1")))
        except (ConfigError, DataError) as e:
            return fail(rank_env, e)

    import torch.distributed as dist

    from pretrain import engine
    from pretrain.logging_utils import setup_console

    rank, world, _ = engine.init_distributed()
    setup_console(rank)
    try:
        prepare_data(cfg, rank)
        preflight(cfg, world)
        run_dir = Path(cfg.run_dir)
        if rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(dump_config(cfg))
            (run_dir / "git_sha.txt").write_text(git_sha() + "\n")
        dist.barrier()
        code = Trainer(cfg, rank, world).run()
        if rank == 0 and code == 0 and (run_dir / "export" / cfg.stages[-1].name / "stage_done.json").exists():
            print(f"run: {run_dir.resolve()}\nfigures: {(run_dir / 'figures').resolve()}\n"
                  f"export: {(run_dir / 'export' / cfg.stages[-1].name).resolve()}", flush=True)
        return code
    except (ConfigError, CheckpointError, DataError, LoaderWorkerError) as e:
        return fail(rank, e)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())

"""Pretrain (progressive stages, DeepSpeed) from a YAML config and ``key=value`` overrides.

    torchrun --nproc_per_node=2 launch/pretrain.py --config configs/pretrain/demo.yaml [optim.lr=1e-4 ...]
    python launch/pretrain.py --nproc_per_node=2 --config configs/pretrain/demo.yaml [optim.lr=1e-4 ...]

Re-running the same command resumes from the newest complete checkpoint. SIGTERM saves, then exits 143.
Exit codes: 0 done (or max_steps reached), 2 bad config or input, 143 stopped by SIGTERM.

Under ``torchrun`` these are the codes of each rank (each prints its error); torchrun itself exits 1
whenever a rank fails. Given ``--nproc_per_node`` (and torchrun's other options), this launcher starts
the ranks itself through torch's elastic launch API and exits with the run's code: 2 when a rank had bad
input, 143 when stopped by SIGTERM (the ranks save first), 128+N when a rank was killed by signal N,
1 when a rank failed otherwise (its traceback is above). Bad config fails there before any rank starts.
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
import signal  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

from data_prep.errors import EXIT_BAD_INPUT, EXIT_BUG, EXIT_SIGTERM, Terminated, UserError, run_main  # noqa: E402

log = logging.getLogger("specfm.pretrain")

LINGER_S = 3.0  # under torchrun the first rank to exit stops the others: let each print its own error
PEER_WAIT_S = 2.0  # after a failed collective: how long to wait for the launcher's SIGTERM (a peer has left)

#: torchrun's options, taken when this launcher starts the ranks itself: (flags, type, help)
LAUNCHER_OPTIONS: list[tuple[tuple[str, ...], type, str]] = [
    (("--nproc_per_node", "--nproc-per-node"), int,
     "start this many ranks on this node (as torchrun) and exit with the run's documented code"),
    (("--nnodes",), str, "number of nodes, N or MIN:MAX (as torchrun)"),
    (("--node_rank", "--node-rank"), int, "rank of this node (as torchrun)"),
    (("--rdzv_endpoint", "--rdzv-endpoint"), str, "HOST:PORT of the rendezvous (as torchrun)"),
    (("--rdzv_backend", "--rdzv-backend"), str, "rendezvous backend: static or c10d (as torchrun)"),
    (("--rdzv_id", "--rdzv-id"), str, "job id shared by the nodes (as torchrun)"),
    (("--master_addr", "--master-addr"), str, "address of node 0, static rendezvous (as torchrun)"),
    (("--master_port", "--master-port"), int, "port on node 0, static rendezvous (as torchrun)"),
    (("--max_restarts", "--max-restarts"), int, "restarts of the ranks after a failure (default 0)"),
    (("--shutdown_timeout", "--shutdown-timeout"), int,
     "seconds the ranks get to save their checkpoint after SIGTERM before they are killed (default 120)"),
]
DEFAULT_SHUTDOWN_S = 120


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
    g = ap.add_argument_group("starting the ranks without torchrun (given --nproc_per_node)")
    for flags, tp, help_text in LAUNCHER_OPTIONS:
        g.add_argument(*flags, type=tp, default=None, help=help_text, dest=flags[0].lstrip("-"))
    return ap.parse_intermixed_args(argv)


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or "RANK" in os.environ


# ----------------------------------------------------------------------------- one rank

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
        trainer = Trainer(plan, rank)
        try:
            code = trainer.run()
        except Exception as e:
            if not isinstance(e, UserError) and world > 1 and _stopped_by_launcher(trainer):
                # a collective failed because another rank left, and the launcher is stopping this one
                raise Terminated(f"another rank failed: {type(e).__name__} in a collective") from e
            raise
        last = plan.stages[-1].name
        if rank == 0 and code == 0 and lay.stage_done(last) is not None:
            print(f"run: {lay.root.resolve()}\nfigures: {lay.figures_root.resolve()}\n"
                  f"export: {lay.export(last).resolve()}", flush=True)
        return code
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _stopped_by_launcher(trainer) -> bool:
    deadline = time.monotonic() + PEER_WAIT_S
    while not trainer.stop_requested and time.monotonic() < deadline:
        time.sleep(0.05)
    return trainer.stop_requested


# ----------------------------------------------------------------------------- starting the ranks

def launcher_argv(args: argparse.Namespace) -> list[str]:
    out = []
    for flags, _, _ in LAUNCHER_OPTIONS:
        value = getattr(args, flags[0].lstrip("-"))
        if flags[0] == "--shutdown_timeout" and value is None:
            value = DEFAULT_SHUTDOWN_S
        if value is not None:
            out.append(f"{flags[0]}={value}")
    return out


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return {EXIT_BAD_INPUT: "exit 2 (bad input)", EXIT_SIGTERM: "exit 143 (stopped by SIGTERM)"}.get(code, f"exit {code}")


def run_outcome(codes: dict[int, int]) -> int:
    """The exit code of a launch whose failed ranks returned ``codes`` (negative: killed by that signal).

    2 when any rank had bad input; else 128+N when a rank was killed by signal N other than SIGTERM; else 1
    when a rank failed (a bug: its traceback is above); else 143 (every failed rank stopped by SIGTERM).
    """
    values = list(codes.values())
    if EXIT_BAD_INPUT in values:
        return EXIT_BAD_INPUT
    killed = [-c for c in values if c < 0 and -c != signal.SIGTERM]
    if killed:
        return 128 + killed[0]
    if any(c not in (EXIT_SIGTERM, -signal.SIGTERM) for c in values):
        return EXIT_BUG
    return EXIT_SIGTERM


def start_ranks(args: argparse.Namespace) -> int:
    """Check the config here, then start the ranks through torch's elastic launch API and map their codes."""
    if under_torchrun():
        raise UserError("--nproc_per_node starts the ranks itself; under torchrun leave it out")
    if args.nproc_per_node < 1:
        raise UserError(f"--nproc_per_node must be >= 1, got {args.nproc_per_node}")
    from pretrain.config import load_config
    from pretrain.engine import check_build_locks
    from pretrain.plan import make_plan, preflight

    cfg = load_config(args.config, args.overrides)
    nnodes = str(args.nnodes or "1")
    if nnodes.isdigit():  # a fixed world size: the batch layout is checked before any rank starts
        plan = make_plan(cfg, args.nproc_per_node * int(nnodes))
        if not cfg.prepare.enabled:
            preflight(plan)
    check_build_locks()

    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    targs = torchrun.parse_args([*launcher_argv(args), str(Path(__file__).resolve()), "--config", args.config,
                                 *args.overrides])
    try:
        torchrun.run(targs)
        return 0
    except ChildFailedError as e:
        codes = {int(r): int(f.exitcode) for r, f in e.failures.items()}
        code = run_outcome(codes)
        ranks = ", ".join(f"rank {r}: {_describe(c)}" for r, c in sorted(codes.items()))
        print(f"error: the run failed ({ranks}); exit {code}", file=sys.stderr, flush=True)
        return code
    except SignalException as e:
        print(f"stopped by {signal.Signals(e.sigval).name}: the ranks were told to save and stop", file=sys.stderr,
              flush=True)
        return 128 + int(e.sigval)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.nproc_per_node is not None:
        return run_main(lambda: start_ranks(args))
    rank = os.environ.get("RANK", "0")
    linger = LINGER_S if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0.0
    return run_main(lambda: train(args), prefix=f"error (rank {rank})", linger=linger)


if __name__ == "__main__":
    code = main()
    # Everything of value is on disk (checkpoints, metrics, exports; wandb finished). Skip the interpreter's
    # teardown of torch/gloo/DeepSpeed native state: measured ~6 s per process on a loaded 2-core box, time in
    # which a failed rank has not yet left and the other ranks are not yet stopped.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

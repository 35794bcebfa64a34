"""Starting ranks in tests: one CPU DeepSpeed environment and race-free rendezvous, for every test that launches.

- :func:`torchrun_cmd`: ``torchrun --standalone`` — a c10d rendezvous on a port the agent binds and keeps
  itself. (Picking a free port in the test, closing it and handing it to ``--master_port`` is a race: another
  process on a busy box can take the port first, and torchrun fails with EADDRINUSE.)
- :func:`pretrain_cmd`: ``launch/pretrain.py --nproc_per_node=N`` — the launcher starts the ranks the same way
  (no rendezvous option given: c10d on a port of its own) and exits with the documented code.

Run the commands with :mod:`tests.watch`, which detects a hang by progress instead of a wall-clock budget.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: the JIT extension cache of this checkout's test launches (DeepSpeed's CPU comm op, built once, ~40 s): its own,
#: so that another checkout's or virtual environment's launches (which rebuild the op for their interpreter and
#: hold its build lock meanwhile) never share a build folder and its lock with this suite
EXTENSIONS_DIR = os.environ.get("SPECFM_TEST_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))

#: DeepSpeed on CPU ranks (gloo), one thread each, nothing from the network, the suite's extension cache
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
       "WANDB_MODE": "offline", "TORCH_EXTENSIONS_DIR": EXTENSIONS_DIR}


def torchrun_cmd(script: str | Path, *args: str, nproc: int = 2) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc_per_node=N script args...``."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script),
            *map(str, args)]


def pretrain_cmd(config: str | Path, *overrides: str, nproc: int = 2) -> list[str]:
    """``python launch/pretrain.py --nproc_per_node=N --config CONFIG overrides...``."""
    return [sys.executable, str(REPO / "launch/pretrain.py"), f"--nproc_per_node={nproc}", "--config", str(config),
            *overrides]

"""Named fault-injection points, for the fault tests (``tests/test_faults.py``) to kill a process exactly there.

``SPECFM_FAILPOINT=<name>`` or ``<name>@<detail>`` in the environment makes :func:`failpoint` kill the
calling process with SIGKILL (no cleanup, no ``finally``: what a power cut or the OOM killer does) when it
reaches the point of that name (and detail). Unset, a point costs one dictionary lookup. Points:

- ``checkpoint.before_marker@step_NNNNNNNN``: rank 0, after every rank has written its part of that
  checkpoint and before the ``complete`` marker (pretrain/checkpoint.py).
"""

from __future__ import annotations

import os
import signal

ENV = "SPECFM_FAILPOINT"


def failpoint(name: str, detail: str = "") -> None:
    """SIGKILL this process when ``SPECFM_FAILPOINT`` names this point (see the module docstring)."""
    spec = os.environ.get(ENV)
    if spec and spec in (name, f"{name}@{detail}"):
        os.kill(os.getpid(), signal.SIGKILL)

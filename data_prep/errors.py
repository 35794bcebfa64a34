"""One home for the errors specfm raises on purpose, and the one mapping of outcomes to exit codes.

- :class:`SpecfmError`: base of every error this project raises deliberately.
- :class:`UserError`: bad input the user can fix (a config key or value, a file, a header field, a store,
  a checkpoint that does not fit). Its message names the file, field or value and what was expected.
- :class:`Terminated`: the process got SIGTERM (raised by the handler :func:`run_main` installs).

:func:`run_main` is the mapping every command uses (``python -m data_prep ...``, ``launch/pretrain.py`` on
every rank, ``launch/finetune.py``, ``launch/benchmark.py``):

==========================================  ====================================================  ====
outcome                                     what is printed (stderr)                              exit
==========================================  ====================================================  ====
the command returns ``n`` (None = 0)        whatever the command printed                          n
:class:`UserError`                          one line ``<prefix>: <message>``                      2
the OS refuses a path (``OSError`` naming   one line ``<prefix>: <strerror>: <file>``             2
a file: missing, permission, disk full)
SIGTERM (:class:`Terminated`)               one line ``<prefix>: stopped by SIGTERM``             143
Ctrl-C                                      ``interrupted``                                       130
anything else                               a bug: the traceback, unchanged                       1
==========================================  ====================================================  ====

``data_prep`` is the bottom layer (``pretrain`` and ``finetune`` import it, never the reverse), so the
error base and the mapping live here and every package derives its errors from it.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

EXIT_OK = 0
EXIT_BUG = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
EXIT_SIGTERM = 143


class SpecfmError(Exception):
    """Base of every error specfm raises on purpose."""


class UserError(SpecfmError, ValueError):
    """Bad input: the message names the file, field or value and what was expected (exit 2).

    Subclasses ``ValueError`` too, so callers that caught ``ValueError`` before keep working."""


class Terminated(SpecfmError):
    """SIGTERM arrived while a command ran (exit 143); raised by the handler :func:`run_main` installs."""


def _is_path_error(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and getattr(exc, "filename", None) is not None


def exit_code(exc: BaseException) -> int:
    """The exit code :func:`run_main` returns for ``exc``: 2 bad input, 143 SIGTERM, 130 Ctrl-C, 1 a bug."""
    if isinstance(exc, UserError) or _is_path_error(exc):
        return EXIT_BAD_INPUT
    if isinstance(exc, Terminated):
        return EXIT_SIGTERM
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(exc, SystemExit):
        return int(exc.code or 0) if isinstance(exc.code, int) else EXIT_BUG
    return EXIT_BUG


def message(exc: BaseException) -> str:
    """The one line printed for a mapped error."""
    if isinstance(exc, Terminated):
        return "stopped by SIGTERM" + (f" ({exc})" if str(exc) else "")
    if _is_path_error(exc) and not isinstance(exc, UserError):
        return f"{exc.strerror or exc}: {exc.filename}"
    return str(exc)


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


def raise_on_sigterm() -> Any:
    """From now on SIGTERM raises :class:`Terminated` in the main thread (so ``finally`` blocks run).

    Returns the handler it replaced (None when not called from the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_terminated)


def run_main(main: Callable[[], int | None], prefix: str = "error", linger: float = 0.0) -> int:
    """Run a command's body and return its exit code by the table in the module docstring.

    ``linger``: seconds to wait after printing a mapped error before returning; used on the ranks of a
    multi-process launch, where the first rank to exit makes the launcher stop the others, so that every
    rank running the same checks prints its own line.
    """
    previous = raise_on_sigterm()
    try:
        return int(main() or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except (UserError, Terminated, OSError) as e:
        if isinstance(e, OSError) and not _is_path_error(e):
            raise
        print(f"{prefix}: {message(e)}", file=sys.stderr, flush=True)
        if linger > 0 and not isinstance(e, Terminated):
            try:
                time.sleep(linger)
            except Terminated:  # the launcher stops this rank because another one already left: the same end
                pass
        return exit_code(e)
    finally:
        if previous is not None and signal.getsignal(signal.SIGTERM) is _raise_terminated:
            signal.signal(signal.SIGTERM, previous)  # a command run in-process leaves the caller's handler

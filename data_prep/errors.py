"""One home for the errors specfm raises on purpose, and the exit codes every command maps them to.

- :class:`SpecfmError`: base of every error this project raises deliberately.
- :class:`UserError`: bad input the user can fix (a config key or value, a file, a header field, a store,
  a checkpoint that does not fit). Its message names the file, field or value and what was expected.
  Every command prints it as one line and exits with :data:`EXIT_BAD_INPUT`, on every rank.
- Anything else that escapes a command is a bug: it keeps its traceback (exit 1).

``data_prep`` is the bottom layer (``pretrain`` and ``finetune`` import it, never the reverse), so the
error base lives here and every package derives its errors from it.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_SIGTERM = 143


class SpecfmError(Exception):
    """Base of every error specfm raises on purpose."""


class UserError(SpecfmError, ValueError):
    """Bad input: the message names the file, field or value and what was expected (exit 2).

    Subclasses ``ValueError`` too, so callers that caught ``ValueError`` before keep working."""


def exit_code(exc: BaseException) -> int:
    """The exit code a command returns for ``exc``: 2 for bad input, 143 for SIGTERM, 1 otherwise."""
    if isinstance(exc, UserError):
        return EXIT_BAD_INPUT
    if isinstance(exc, SystemExit):
        return int(exc.code or 0) if isinstance(exc.code, int) else 1
    return 1

"""Progress of long work: a tqdm bar on a terminal, a plain line every ``every`` steps in a log.

:func:`progress` is tqdm with ``disable=None`` (tqdm's own check: a bar only when its stream is a terminal).
Where tqdm turned the bar off, and ``every`` is given, the same tqdm counts on and prints its status as one
plain line (no carriage returns, no bar) every ``every`` steps and at the end: tqdm's ``miniters`` decides
when, ``format_meter`` what (``ingest: 40/100 strip [00:10<00:15, 4.00strip/s]``). ``enabled=False`` (a
command's ``--no-progress``) shows neither. Every command that reports progress uses this: ``data_prep``
ingest/simulate/stats/export-wds/verify/migrate, the trainer (whose log records are its plain lines), the
benchmark runner, ``launch/embed.py``.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Iterable
from typing import Any

from tqdm import tqdm

#: the plain line: tqdm's meter without the bar
LINE_FORMAT = "{desc}: {n_fmt}/{total_fmt} {unit} [{elapsed}<{remaining}, {rate_fmt}]{postfix}"


class _Lines(io.TextIOBase):
    """A stream for tqdm that writes each status it is given as one line (tqdm prefixes them with ``\\r``)."""

    def __init__(self, stream) -> None:
        super().__init__()
        self.stream = stream
        self.last = ""

    def write(self, s: str) -> int:
        text = s.replace("\r", "").strip()
        if text and text != self.last:  # tqdm redraws the same status on close
            self.stream.write(text + "\n")
            self.stream.flush()
            self.last = text
        return len(s)

    def flush(self) -> None:
        self.stream.flush()


def progress(iterable: Iterable | None = None, *, desc: str, total: int | float | None = None, unit: str = "it",
             every: int | None = None, enabled: bool = True, file=None, **kw: Any) -> tqdm:
    """A tqdm bar (see the module docstring); ``every``: steps between plain lines off a terminal (None:
    none, for callers that log their own lines -- check ``bar.disable``)."""
    stream = file if file is not None else sys.stderr
    bar = tqdm(iterable, desc=desc, total=total, unit=unit, disable=None if enabled else True, file=stream,
               dynamic_ncols=True, **kw)
    if not enabled or not bar.disable or not every:
        return bar
    bar.close()
    return tqdm(iterable, desc=desc, total=total, unit=unit, file=_Lines(stream), bar_format=LINE_FORMAT,
                miniters=max(1, int(every)), mininterval=0, maxinterval=float("inf"), **kw)

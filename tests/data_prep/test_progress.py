"""Progress: a tqdm bar only on a terminal, a plain line every N steps in a log (data_prep.progress)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

from data_prep.progress import progress

REPO = Path(__file__).resolve().parents[2]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_plain_lines_every_n_steps_and_no_carriage_returns():
    log = io.StringIO()
    for _ in progress(range(25), desc="ingest", unit="strip", every=10, file=log):
        pass
    text = log.getvalue()
    assert "\r" not in text and "|" not in text  # no bar frames
    lines = text.splitlines()
    assert [ln.split()[1] for ln in lines] == ["0/25", "10/25", "20/25", "25/25"]
    assert lines[-1].startswith("ingest: 25/25 strip [")


def test_a_terminal_gets_the_bar_and_no_progress_means_nothing():
    term = _Terminal()
    for _ in progress(range(5), desc="stats", every=1, file=term):
        pass
    assert "\r" in term.getvalue() and "5/5" in term.getvalue()
    quiet = io.StringIO()
    for _ in progress(range(5), desc="stats", every=1, file=quiet, enabled=False):
        pass
    assert quiet.getvalue() == ""
    silent = io.StringIO()  # every=None: the caller logs its own lines (the trainer)
    assert progress(total=3, desc="stage", file=silent).disable and silent.getvalue() == ""


def test_simulate_writes_plain_progress_lines_to_a_log(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "data_prep", "simulate", "--out", str(tmp_path / "raw"), "--sensors",
                        "emit", "--levels", "L2", "--size", "16", "--no-change-pairs", "--no-fusion"],
                       cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stderr and "simulate: 1/1 product" in r.stderr

"""Run a command and detect a hang by the lack of progress, not by a wall-clock timeout.

A loaded 2-core box can make a healthy multi-process run arbitrarily slow (DeepSpeed compiling its CPU
op into an empty extension cache takes minutes and prints nothing), so tests never give a subprocess a
fixed time budget. A run counts as making progress while it prints or while its process tree (ranks,
compilers, reader workers) uses CPU. It is declared hung, killed with its whole tree and the test failed
with its output, only after ``IDLE_S`` seconds with neither; ``CAP_S`` is a last resort against a run
that spins forever.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

IDLE_S = float(os.environ.get("SPECFM_TEST_IDLE_S", 600))
CAP_S = float(os.environ.get("SPECFM_TEST_CAP_S", 4 * 3600))


class Watched:
    """A subprocess (in its own session) whose output is collected and whose progress is watched."""

    def __init__(self, cmd: list[str], *, cwd: str | Path, env: dict[str, str]):
        self.cmd = cmd
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, start_new_session=True)
        self._out: list[str] = []
        self._err: list[str] = []
        self._chunks: list[str] = []  # both streams, in arrival order
        self._readers = [threading.Thread(target=self._read, args=(s, d), daemon=True)
                         for s, d in ((self.proc.stdout, self._out), (self.proc.stderr, self._err))]
        for t in self._readers:
            t.start()
        self.started = time.monotonic()

    def _read(self, stream, dest: list[str]) -> None:
        for line in stream:
            dest.append(line)
            self._chunks.append(line)

    @property
    def stdout(self) -> str:
        return "".join(self._out)

    @property
    def stderr(self) -> str:
        return "".join(self._err)

    @property
    def output(self) -> str:
        """stdout and stderr interleaved as they arrived."""
        return "".join(self._chunks)

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def tree(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def _cpu(self) -> float:
        total = 0.0
        for p in self.tree():
            try:
                t = p.cpu_times()
                total += t.user + t.system + t.children_user + t.children_system
            except psutil.Error:
                continue
        return total

    def kill_tree(self, sig: int = signal.SIGKILL) -> None:
        for p in reversed(self.tree()):
            try:
                p.send_signal(sig)
            except psutil.Error:
                pass

    def wait(self, until: Callable[[], bool] | None = None, idle_s: float = IDLE_S, cap_s: float = CAP_S,
             poll_s: float = 0.2) -> Watched:
        """Until ``until()`` holds (or, without it, the process ends); fail the test if it stops progressing."""
        last, last_change = (len(self._chunks), self._cpu()), time.monotonic()
        while True:
            if until is not None and until():
                return self
            if self.proc.poll() is not None:
                for t in self._readers:
                    t.join(timeout=30)
                if until is None:
                    return self
                pytest.fail(f"{self.describe()} ended (exit {self.proc.returncode}) before the awaited "
                            f"condition held:\n{self.output[-4000:]}")
            now = time.monotonic()
            cur = (len(self._chunks), self._cpu())
            if cur[0] != last[0] or cur[1] > last[1] + 0.05:
                last, last_change = cur, now
            stuck = now - last_change > idle_s
            if stuck or now - self.started > cap_s:
                self.kill_tree()
                self.proc.wait()
                why = f"no output and no CPU use for {idle_s:.0f} s" if stuck else f"still running after {cap_s:.0f} s"
                pytest.fail(f"{self.describe()}: hung ({why}); killed. Output:\n{self.output[-4000:]}")
            time.sleep(poll_s)

    def describe(self) -> str:
        return " ".join(str(c) for c in self.cmd[:6]) + (" ..." if len(self.cmd) > 6 else "")


def run(cmd: list[str], *, cwd: str | Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Like ``subprocess.run(..., capture_output=True, text=True)``, with hangs detected by :class:`Watched`."""
    w = Watched(cmd, cwd=cwd, env=env).wait()
    return subprocess.CompletedProcess(cmd, w.proc.returncode, w.stdout, w.stderr)

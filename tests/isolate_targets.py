"""Targets that tests run through `selfplay.runtime.isolate.call`, importable by the child process (`tests.isolate_targets`)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path


def echo(value, *, log, progress=None):
    """Return what it was given and where it ran; log at two levels and report progress twice."""
    log.info("echo got %d rows", len(value))
    log.warning("a warning from the child")
    print("plain stdout line", flush=True)
    if progress:
        progress(1, 2)
        progress(2, 2)
    return {"value": value, "pid": os.getpid()}


def fail(*, log, progress=None):
    log.info("about to fail")
    raise ValueError("boom: the target failed")


def die(*, log, progress=None):
    log.info("about to be killed")
    os.kill(os.getpid(), signal.SIGKILL)


def hang_with_grandchild(pid_file: str, *, log, progress=None):
    """Start a grandchild that would outlive us, record its pid, report progress, then hang."""
    sleeper = subprocess.Popen(["sleep", "300"])
    Path(pid_file).write_text(str(sleeper.pid))
    progress(1, 1)
    time.sleep(300)


def hang(pid_file: str, *, log, progress=None):
    """Record our pid, then hang: stands in for a long training step."""
    Path(pid_file).write_text(str(os.getpid()))
    time.sleep(300)

"""Turns on this machine's GPUs (or its CPU) that a dead holder cannot keep: one kernel file lock per device.

    with device_turn("nightly round 3 train", log=log):
        ...                                    # no other selfplay stage on these devices until this block ends

The lock is `flock(2)` on a file per device under $SELFPLAY_LOCK_DIR (default /tmp/selfplay-locks, one directory
per machine). The kernel releases it when the holder's process ends, however it ends (SIGKILL, the OOM killer,
a lost worker): nothing has to expire, and no server has to remember anything.

Which devices: the visible CUDA devices (each index or UUID in CUDA_VISIBLE_DEVICES, or every GPU nvidia-smi lists
when it is unset), or `cpu` on a machine without one. Locks are taken one device at a time in sorted order, so two
runs on overlapping device sets (0,1 and 1,2) wait for each other and never deadlock, and runs on disjoint sets
(0 and 1) run side by side. A holder writes who it is into its lock file (pid, what, since); a waiter logs that
every 30 s, so a stage that waits says on whom.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

WAIT_LOG_EVERY_S = float(os.environ.get("SELFPLAY_LOCK_WAIT_LOG_S") or 30.0)
POLL_S = 0.2


def lock_dir() -> Path:
    return Path(os.environ.get("SELFPLAY_LOCK_DIR") or "/tmp/selfplay-locks")


def visible_devices() -> list[str]:
    """This process's device set: CUDA device ids as visible to it, or ['cpu']."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        ids = [d.strip() for d in env.split(",") if d.strip()]
        # CUDA stops at the first invalid entry; '-1' or '' hides every GPU
        ids = ids[: next((i for i, d in enumerate(ids) if d.startswith("-")), len(ids))]
        return [f"cuda-{re.sub(r'[^A-Za-z0-9_.-]', '_', d)}" for d in ids] or ["cpu"]
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=30)
            ids = [line.strip() for line in out.stdout.splitlines() if line.strip().isdigit()]
            if out.returncode == 0 and ids:
                return [f"cuda-{i}" for i in ids]
        except (OSError, subprocess.TimeoutExpired):
            pass
    return ["cpu"]


def holder(path: Path) -> dict | None:
    """Who holds the lock file at `path`, as its holder wrote it (None when nobody wrote or it is unreadable)."""
    try:
        return json.loads(path.read_text() or "null")
    except (OSError, ValueError):
        return None


def describe(info: dict | None) -> str:
    if not info:
        return "a process that has not said who it is"
    since = time.strftime("%H:%M:%S", time.localtime(info.get("since", 0)))
    return f"pid {info.get('pid')} ({info.get('what') or 'unnamed'}) since {since}, {time.time() - info.get('since', time.time()):.0f} s ago"


@contextlib.contextmanager
def _one(path: Path, what: str, log: logging.Logger | logging.LoggerAdapter) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # not inherited by children: they cannot keep it after us
    try:
        started = last_said = time.monotonic()
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                now = time.monotonic()
                if now - last_said >= WAIT_LOG_EVERY_S:
                    last_said = now
                    log.info("%s: waiting %.0f s for %s, held by %s", what, now - started, path.stem, describe(holder(path)))
                time.sleep(POLL_S)
        if time.monotonic() - started > 1:
            log.info("%s: got %s after %.0f s", what, path.stem, time.monotonic() - started)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "what": what, "since": time.time()}).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextlib.contextmanager
def device_turn(what: str, log: logging.Logger | logging.LoggerAdapter | None = None,
                devices: list[str] | None = None) -> Iterator[list[str]]:
    """Hold every device in `devices` (default: `visible_devices()`) for the block; yield their names.

    `what` says who holds them in the lock files and in other waiters' logs ("<run> round <k> <stage>").
    """
    log = log or logging.getLogger(__name__)
    names = sorted(set(devices or visible_devices()))
    directory = lock_dir()
    directory.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):
        directory.chmod(0o1777)  # shared by every user of the machine, like /tmp
    with contextlib.ExitStack() as stack:
        for name in names:
            stack.enter_context(_one(directory / f"{name}.lock", what, log))
        yield names

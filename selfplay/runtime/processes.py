"""Child processes that never outlive their owner: stage processes, model servers, the temporary Prefect server.

    proc = processes.spawn(argv, stdout=log)        # its own process group; SIGTERM from the kernel if we die
    ...
    processes.kill_group(proc, grace=10)            # SIGTERM the group, SIGKILL what outlives the grace
    processes.log_tail(log_path, lines=40)          # the last lines it logged, for the error that says it failed

- `spawn` starts the command in a new session (its own process group, so a group signal aimed at us does not
  reach it before we have shut down in order) and, on Linux, asks the kernel for SIGTERM when its owner dies,
  even by SIGKILL (PR_SET_PDEATHSIG).
- The kernel sends that signal when the *thread* that forked the child ends, not the process: a child that must
  outlive the Prefect task thread that started it (a model server) is forked from one long-lived thread
  (`long_lived=True`).
- Every child spawned here is tracked until it is reaped, so `kill_all` can end them when a run is stopped in a
  hurry (`selfplay.runtime.shutdown`), where neither `finally` blocks nor `atexit` hooks run.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

_PR_SET_PDEATHSIG = 1
_live: set[subprocess.Popen] = set()
_live_lock = threading.Lock()
_spawner: ThreadPoolExecutor | None = None
_spawner_lock = threading.Lock()


def _pdeathsig_preexec():
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def preexec() -> None:  # runs in the child between fork and exec: keep it to one syscall
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)

    return preexec


def spawn(argv: list[str], *, long_lived: bool = False, **popen: Any) -> subprocess.Popen:
    """Start `argv` in a new session that dies with this process; `popen` goes to `subprocess.Popen`."""
    global _spawner
    popen.setdefault("start_new_session", True)
    preexec = _pdeathsig_preexec()
    if preexec is not None:
        popen["preexec_fn"] = preexec
    if long_lived and preexec is not None:
        with _spawner_lock:
            if _spawner is None:
                _spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="selfplay-spawner")
        proc = _spawner.submit(subprocess.Popen, argv, **popen).result()
    else:
        proc = subprocess.Popen(argv, **popen)
    with _live_lock:
        _live.add(proc)
    return proc


def forget(proc: subprocess.Popen) -> None:
    with _live_lock:
        _live.discard(proc)


def signal_group(pgid: int, sig: int) -> bool:
    """Send `sig` to process group `pgid`; False when nobody is left in it."""
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def kill_group(proc: subprocess.Popen, grace: float = 10.0) -> int | None:
    """SIGTERM the child's process group, SIGKILL whatever of it (the leader or a member: a server's workers, a
    launcher's ranks) outlives `grace` seconds; reap the leader and return its exit status (None if it will not
    die). Quick when the group is already gone."""
    pgid = proc.pid  # start_new_session: the leader's pid is the group's id
    deadline = time.monotonic() + grace
    try:
        if not signal_group(pgid, signal.SIGTERM):
            return proc.poll()
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            signal_group(pgid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5.0)
        # The leader is gone; the rest of its group gets what is left of the grace, then SIGKILL.
        while signal_group(pgid, 0):
            if time.monotonic() >= deadline:
                signal_group(pgid, signal.SIGKILL)
                killed_by = time.monotonic() + 5.0  # SIGKILL is delivered asynchronously
                while signal_group(pgid, 0) and time.monotonic() < killed_by:
                    time.sleep(0.05)
                break
            time.sleep(0.05)
        return proc.poll()
    finally:
        if proc.poll() is not None:
            forget(proc)


def log_tail(path: str | os.PathLike, lines: int = 40, start: int = 0, noise: re.Pattern[str] | None = None) -> str:
    """The last `lines` lines of the log at `path` (only what was written after byte `start`; at most its last
    64 KiB are read, 1 MiB with a `noise` filter), for an error message; says so when there is nothing, or the log cannot be read. Lines that
    `noise` matches (a dying interpreter's leak reports, say) are left out, so that the cause stays in view."""
    try:
        with open(path, "rb") as f:
            end = f.seek(0, os.SEEK_END)
            f.seek(max(start, end - (64 if noise is None else 1024) * 1024))  # noise filtered: look further back
            text = f.read().decode("utf-8", errors="replace")
    except OSError as exc:
        return f"(cannot read {path}: {exc})"
    kept = [line for line in text.splitlines() if noise is None or not noise.search(line)]
    return "\n".join(kept[-lines:]) or "(nothing was logged)"


def kill_all(grace: float = 3.0) -> None:
    """End every live child's process group: SIGTERM all at once, then SIGKILL after `grace` seconds."""
    with _live_lock:
        procs = [p for p in _live if p.poll() is None]
    for proc in procs:
        signal_group(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        time.sleep(0.05)
    for proc in procs:
        signal_group(proc.pid, signal.SIGKILL)


def free_port(host: str = "127.0.0.1") -> int:
    """A port on `host` that nobody listens on now."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_is_free(host: str, port: int) -> bool:
    """Nobody accepts connections on host:port and a server could bind it (SO_REUSEADDR, as servers do)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.settimeout(1.0)
        try:
            s.connect((host, port))
            return False  # someone is listening
        except OSError:
            pass
    with socket.socket(family) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True

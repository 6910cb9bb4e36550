"""Prompt, clean shutdown on SIGTERM and SIGINT: a stopped run is gone within seconds and can be resumed.

SIGTERM comes from `timeout`, `docker stop`, job schedulers, and Prefect workers cancelling a flow run; SIGINT from
Ctrl-C. On either, `guard` does two things:

- it lets the run unwind in order: the signal becomes an exception in the main thread (Prefect's engine turns
  SIGTERM into `TerminationSignal` inside a flow run and reports the run Crashed or Cancelled, which takes a
  moment when its server is up); `finally` blocks stop stage processes and model servers, and locks are let go;
- it starts a watchdog that ends the process after `grace` seconds whatever it is doing: a run whose Prefect server
  is gone would otherwise spend minutes retrying it. The watchdog, with nothing else left to trust, ends every
  child process group this process started (`selfplay.runtime.processes`), prints how to resume, and exits. When the
  server is already unreachable at the signal, the grace is short: there is nobody to tell.

Either way the kernel frees the run's locks (they are `flock`s), and completed stages are on disk: rerunning the
same command resumes at the first incomplete stage.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from selfplay.runtime import processes

GRACE_S = float(os.environ.get("SELFPLAY_SHUTDOWN_GRACE_S") or 10.0)
UNREACHABLE_GRACE_S = 2.0
_state: dict = {"message": "", "fired": False}


class Stopped(KeyboardInterrupt):
    """The run was stopped by a signal (a KeyboardInterrupt, so generic `except Exception` blocks do not eat it)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def exit_code(signum: int) -> int:
    return 128 + signum


def _watchdog(signum: int, grace: float) -> None:
    time.sleep(grace)
    processes.kill_all(grace=2.0)
    sys.stderr.write(f"\nselfplay: stopped by {signal.Signals(signum).name}. {_state['message']}\n")
    sys.stderr.flush()
    os._exit(exit_code(signum))


def _fire(signum: int) -> None:
    if _state["fired"]:
        return
    _state["fired"] = True
    from prefect.settings import PREFECT_API_URL

    from selfplay.runtime.tempserver import api_alive

    url = PREFECT_API_URL.value()  # the run's server, temporary or not
    grace = GRACE_S if url and api_alive(url, timeout=0.5) else UNREACHABLE_GRACE_S
    threading.Thread(target=_watchdog, args=(signum, grace), name="selfplay-shutdown", daemon=True).start()


def _wrap(previous: Callable | int | None) -> Callable:
    def handler(signum: int, frame) -> None:
        _fire(signum)
        if callable(previous):
            previous(signum, frame)  # Prefect's bridge inside a flow run: raises TerminationSignal
        raise Stopped(signum)

    handler.selfplay_shutdown = True  # type: ignore[attr-defined]
    return handler


def arm(message: str | None = None) -> None:
    """Put the watchdog in front of the current SIGTERM and SIGINT handlers (idempotent; main thread only).

    Each flow calls it as it starts: Prefect's engine installs its own SIGTERM handler for every flow run (a
    subflow's included), and this goes in front of it. `message`, if given and none is set, is what the watchdog
    prints.
    """
    if message and not _state["message"]:
        _state["message"] = message
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGINT):
        current = signal.getsignal(sig)
        if getattr(current, "selfplay_shutdown", False):
            continue
        # the default SIGINT handler raises KeyboardInterrupt itself; Stopped is one, carrying the signal
        signal.signal(sig, _wrap(None if current in (signal.SIG_DFL, signal.SIG_IGN, signal.default_int_handler) else current))


@contextmanager
def guard(message: str) -> Iterator[None]:
    """Arm the shutdown for the block; `message` is what the watchdog prints (how to resume)."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    _state.update(message=message, fired=False)
    arm()
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)

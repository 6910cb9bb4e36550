"""Fault hooks for tests: stop a run at a chosen point and hold it there, so a test can kill it exactly inside a
stage; and trace GPU turns. Loaded by `selfplay.runtime.hooks` when SELFPLAY_HOOKS names this file:

    SELFPLAY_HOOKS=tools/faults.py SELFPLAY_HOLD="gpu:round 1 train" SELFPLAY_HOLD_FILE=/tmp/held selfplay run ...

When a point whose description ends with the text after the colon is reached (`gpu`: a GPU stage has just taken
its turn on the device; `stage`: a stage has just created its temporary output directory), the run writes its
pid and the point to $SELFPLAY_HOLD_FILE and sleeps, up to 10 minutes, for the test's signal.

SELFPLAY_TRACE_TURNS=<file> appends one line per GPU turn taken and given back (`take|give <what> <time>`), so a
test can check that two runs took turns.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

HOOKS = str(Path(__file__).resolve())  # the value of SELFPLAY_HOOKS that loads this file


def reached(point: str, what: str) -> None:
    """`selfplay.runtime.hooks`' entry point."""
    if point in ("gpu-take", "gpu-give"):
        trace_turn(point.removeprefix("gpu-"), what)
    if point == "gpu-take":
        hold("gpu", what)
    elif point == "stage":
        hold("stage", what)


def hold(kind: str, what: str) -> None:
    wanted = os.environ.get("SELFPLAY_HOLD")
    if not wanted:
        return
    want_kind, _, want_what = wanted.partition(":")
    if want_kind != kind or not what.endswith(want_what):
        return
    path = os.environ.get("SELFPLAY_HOLD_FILE")
    if path:
        with open(path, "w") as fh:
            json.dump({"pid": os.getpid(), "point": f"{kind}:{what}", "at": time.time()}, fh)
    time.sleep(600)


def trace_turn(event: str, what: str) -> None:
    path = os.environ.get("SELFPLAY_TRACE_TURNS")
    if path:
        with open(path, "a") as fh:
            fh.write(f"{event}|{what}|{time.time():.6f}\n")

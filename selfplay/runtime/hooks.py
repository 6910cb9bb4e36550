"""Named points a run passes, where a developer's tool may step in. Nothing here acts on its own.

    SELFPLAY_HOOKS=tools/faults.py selfplay run ...

With SELFPLAY_HOOKS naming a Python file, that file is loaded once per process and its `reached(point, what)` is
called at every point: `stage` (a stage has just created its temporary output directory; `what` is "round <k>
<stage>"), `gpu-take` (a GPU stage has just taken its turn on the devices; `what` names the holder) and `gpu-give`
(it gives the turn back). The fault hooks in tools/faults.py hold a run at a chosen point, so a test can kill it
exactly there, and trace GPU turns. Unset, `reached` costs one environment lookup.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path

POINTS = ("stage", "gpu-take", "gpu-give")
_loaded: dict[str, Callable[[str, str], None]] = {}


def reached(point: str, what: str) -> None:
    """Tell the hook file named by SELFPLAY_HOOKS, if any, that this process reached `point` (one of `POINTS`)."""
    path = os.environ.get("SELFPLAY_HOOKS")
    if not path:
        return
    assert point in POINTS, point
    if path not in _loaded:
        spec = importlib.util.spec_from_file_location("selfplay_hooks", Path(path).resolve())
        if spec is None or spec.loader is None:
            raise RuntimeError(f"SELFPLAY_HOOKS={path!r} is not a Python file")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _loaded[path] = module.reached
    _loaded[path](point, what)

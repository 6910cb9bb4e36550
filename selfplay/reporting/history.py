"""Run history for `selfplay runs`: the run directories, and the Prefect API where a server is set."""

from __future__ import annotations

import datetime as dt
import fcntl
from pathlib import Path
from typing import Any

from selfplay.runtime.rundir import RunDir, read_json


def run_status(run: RunDir, target: int) -> str:
    """running (its lock is held), complete, or incomplete (failed or stopped: rerun to resume)."""
    lock = run.root / ".lock"
    if lock.exists():
        with open(lock) as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(fh, fcntl.LOCK_UN)
            except BlockingIOError:
                return "running"
    return "complete" if len(run.completed_rounds()) >= target else "incomplete"


def run_rows(output_dir: Path) -> list[dict[str, Any]]:
    rows = []
    for record in sorted(Path(output_dir).glob("*/run.json")):
        run = RunDir(record.parent)
        target = read_json(record)["config"]["rounds"]
        done = run.completed_rounds()
        last = run.round_manifest(done[-1]) if done else {}
        updated = dt.datetime.fromtimestamp(last["finished_at"]).isoformat(timespec="seconds") if last.get("finished_at") else ""
        rows.append({"run": run.root.name, "status": run_status(run, target), "rounds_done": len(done), "rounds_target": target,
                     "kept": last.get("kept"), "win_rate": None if last.get("win_rate") is None else round(last["win_rate"], 3),
                     "accuracy": None if last.get("accuracy") is None else round(last["accuracy"], 3),
                     "updated": updated})
    return rows


def flow_run_rows(limit: int = 20) -> list[dict[str, Any]]:
    """Recent runs of the `self-play` flow on the configured Prefect server."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["self-play"])), sort=FlowRunSort.START_TIME_DESC, limit=limit)
    keep = ("recipe", "lineage", "rounds", "model", "name")
    return [{"name": r.name, "state": r.state.name if r.state else "?", "start": r.start_time.isoformat(timespec="seconds") if r.start_time else None,
             "parameters": {k: v for k, v in (r.parameters or {}).items() if k in keep and v is not None}} for r in runs]

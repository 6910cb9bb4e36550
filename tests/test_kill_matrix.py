"""Kill it and run it again: a real `selfplay run` on the tiny model is killed inside each of the five stages, then
the same command is run again.

Two paths, five stages each, SIGKILL and SIGTERM alternating (and swapped between the paths):

- the default path a new user takes: no PREFECT_API_URL, so the run starts its own temporary Prefect server, on a
  fresh, empty PREFECT_HOME (the first case's server creates the database);
- a real, long-lived Prefect server (`prefect server start`, the `prefect_server` fixture).

The run is held at the point to kill (`tools.faults`: inside the stage's GPU turn, or, for the filter stage,
once its output directory exists), so each case kills where it says. SIGKILL goes to the run's process alone, as
the out-of-memory killer would; SIGTERM to its process group on the default path (as `timeout` and Ctrl-C do) and
to the process alone on the server path (as a Prefect worker cancelling a flow run does).

Each case asserts:
- a SIGTERM'd run is gone within 15 s, exits 143, and its last line says how to resume; on the server path the
  server was told the flow run crashed;
- nothing the killed run started outlives it (stage processes, its temporary server): no process carries its
  marker a few seconds later;
- the rerun completes without waiting on anything the dead run left behind (no wait for a GPU turn, no lock);
- every stage completed before the kill keeps its files (same sha256) and is not run again;
- the final tables equal those of an uninterrupted run with the same seed, and so do the checkpoint's weights.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest
import yaml

from selfplay.runtime.rundir import STAGES, RunDir, sha256_file
from tests.conftest import tiny_config
from tools import faults

pytestmark = pytest.mark.stage


SELFPLAY = str(Path(sys.executable).parent / "selfplay")
NAME = "matrix"
# where each stage is held: inside its GPU turn, or (filter: no GPU) once its output directory exists
POINTS = {"sample": "gpu:round 1 sample", "judge": "gpu:round 1 judge", "filter": "stage:round 1 filter",
          "train": "gpu:round 1 train", "evaluate": "gpu:round 1 eval generation"}
KILL, TERM = signal.SIGKILL, signal.SIGTERM
CASES = [("default", stage, sig) for stage, sig in zip(STAGES, (KILL, TERM, KILL, TERM, KILL))] + \
        [("server", stage, sig) for stage, sig in zip(STAGES, (TERM, KILL, TERM, KILL, TERM))]


@pytest.fixture(scope="module")
def matrix(tmp_path_factory, tiny_model):
    """Shared by the cases: the recipe maker, one lock directory, one fresh PREFECT_HOME for the default path."""
    root = tmp_path_factory.mktemp("kill-matrix")
    home = root / "prefect-home"  # empty: the default path's first run creates its database
    return {"root": root, "tiny": tiny_model, "locks": root / "locks", "prefect_home": home}


def recipe(m: dict, where: Path) -> Path:
    cfg = tiny_config(m["tiny"], where / "runs", name=NAME, rounds=1)
    path = where / "recipe.yaml"
    where.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def env_for(m: dict, path: str, api_url: str | None, **extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "SELFPLAY_LOCK_DIR": str(m["locks"]), "SELFPLAY_HOOKS": faults.HOOKS, **extra}
    env.pop("PREFECT_API_URL", None)
    if path == "default":
        env["PREFECT_HOME"] = str(m["prefect_home"])
        env["SELFPLAY_CACHE"] = str(m["root"] / "cache")  # no migrated database kept from an earlier run: it migrates one
    else:
        env["PREFECT_API_URL"] = api_url
    return env


def start(recipe_path: Path, env: dict, log: Path) -> subprocess.Popen:
    out = open(log, "w")
    return subprocess.Popen([SELFPLAY, "run", "--config", str(recipe_path)], stdout=out, stderr=subprocess.STDOUT,
                            env=env, start_new_session=True)


def marked(marker: str) -> list[int]:
    """Pids of live processes whose environment carries `marker` (the killed run and all it started)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker.encode() in (entry / "environ").read_bytes():
                stat = (entry / "stat").read_text()
                if stat.rsplit(")", 1)[1].split()[0] != "Z":
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


def tables(run: RunDir) -> dict[str, pd.DataFrame]:
    return {str(p.relative_to(run.root)): pd.read_parquet(p) for p in sorted(run.root.glob("round_1/*/*.parquet"))}


def comparable(df: pd.DataFrame) -> pd.DataFrame:
    """A table without what legitimately differs between two runs: timings, and the run's own paths."""
    drop = [c for c in df.columns if any(word in c for word in ("seconds", "latency", "elapsed", "time"))]
    return df.drop(columns=drop).reset_index(drop=True)


def checkpoint_weights(run: RunDir) -> dict:
    from safetensors.torch import load_file

    weights = {}
    for f in sorted(run.checkpoint(1).glob("*.safetensors")):
        weights.update(load_file(f))
    return weights


@pytest.fixture(scope="module")
def reference(matrix, prefect_server):
    """One uninterrupted run with the same seed."""
    where = matrix["root"] / "reference"
    path = recipe(matrix, where)
    proc = start(path, env_for(matrix, "server", prefect_server), where / "out.log")
    assert proc.wait(timeout=600) == 0, (where / "out.log").read_text()[-3000:]
    run = RunDir(where / "runs" / NAME)
    return {"tables": tables(run), "weights": checkpoint_weights(run)}


def flow_run_states(api_url: str, recipe_path: Path) -> list[str]:
    """The states of the server's `self-play` flow runs of this recipe."""
    import httpx

    reply = httpx.post(f"{api_url}/flow_runs/filter", json={"limit": 200, "sort": "EXPECTED_START_TIME_DESC"}, timeout=10)
    reply.raise_for_status()
    return [r["state"]["type"] for r in reply.json() if (r.get("parameters") or {}).get("recipe") == str(recipe_path)]


@pytest.mark.parametrize("path,stage,sig", CASES, ids=[f"{p}-{s}-{signal.Signals(g).name}" for p, s, g in CASES])
def test_kill_inside_a_stage_then_rerun(matrix, reference, prefect_server, path, stage, sig):
    where = matrix["root"] / f"{path}-{stage}"
    recipe_path = recipe(matrix, where)
    run = RunDir(where / "runs" / NAME)
    held_file = where / "held.json"
    marker = f"SELFPLAY_TEST_CASE={uuid.uuid4().hex}"
    env = env_for(matrix, path, prefect_server, SELFPLAY_HOLD=POINTS[stage], SELFPLAY_HOLD_FILE=str(held_file),
                  SELFPLAY_TEST_CASE=marker.split("=")[1])
    log1 = where / "killed.log"
    proc = start(recipe_path, env, log1)
    deadline = time.time() + 420  # the default path's first case also creates the database
    while not held_file.exists():
        assert proc.poll() is None, f"the run ended before it reached {POINTS[stage]}:\n{log1.read_text()[-3000:]}"
        assert time.time() < deadline, log1.read_text()[-3000:]
        time.sleep(0.2)
    assert json.loads(held_file.read_text())["point"].endswith(POINTS[stage].split(":", 1)[1])

    done_before = [s for s in STAGES if run.is_done(1, s)]
    assert done_before == list(STAGES[: STAGES.index(stage)])
    before = {str(p): sha256_file(p) for s in done_before for p in run.stage_dir(1, s).rglob("*") if p.is_file()}
    assert before or stage == "sample"

    sent = time.monotonic()
    if sig == TERM and path == "default":
        os.killpg(proc.pid, sig)  # the whole group, as `timeout` does
    else:
        os.kill(proc.pid, sig)
    code = proc.wait(timeout=60)
    stopped_in = time.monotonic() - sent
    text = log1.read_text()
    if sig == TERM:
        assert stopped_in <= 15, f"SIGTERM took {stopped_in:.1f} s:\n{text[-2000:]}"
        assert code == 128 + signal.SIGTERM, text[-2000:]
        assert "to resume, rerun: selfplay run --config" in text.strip().splitlines()[-1], text[-2000:]
        if path == "server":
            assert flow_run_states(prefect_server, recipe_path) in (["CRASHED"], ["CANCELLED"])
    else:
        assert code == -signal.SIGKILL
    deadline = time.time() + 15
    while (left := marked(marker)) and time.time() < deadline:
        time.sleep(0.2)
    assert not left, f"processes of the killed run are still alive: {left}"

    rerun_env = {k: v for k, v in env.items() if not k.startswith("SELFPLAY_HOLD")}
    log2 = where / "rerun.log"
    rerun = start(recipe_path, rerun_env, log2)
    assert rerun.wait(timeout=600) == 0, log2.read_text()[-3000:]
    out = log2.read_text()
    assert "waiting" not in out and "in use by another process" not in out, out[-3000:]
    for s in done_before:
        assert f"{s} already complete" in out
    assert {p: sha256_file(Path(p)) for p in before} == before
    assert run.round_done(1) and not list(run.round_dir(1).glob("*.tmp-*"))

    got = tables(run)
    assert sorted(got) == sorted(reference["tables"])
    for name, table in got.items():
        pd.testing.assert_frame_equal(comparable(table), comparable(reference["tables"][name]), obj=name)
    weights = checkpoint_weights(run)
    assert sorted(weights) == sorted(reference["weights"])
    for key, tensor in weights.items():
        assert (tensor - reference["weights"][key]).abs().max() <= 1e-5, key


def test_sigterm_after_the_temporary_server_died_does_not_wait_on_it(matrix, tmp_path):
    """The run's temporary Prefect server is gone (killed) when SIGTERM comes: the run does not spend minutes
    retrying a dead API; it stops within 15 s, says how to resume, and a rerun completes."""
    where = tmp_path / "dead-server"
    recipe_path = recipe(matrix, where)
    held_file = where / "held.json"
    marker = uuid.uuid4().hex
    env = env_for(matrix, "default", None, SELFPLAY_HOLD=POINTS["train"], SELFPLAY_HOLD_FILE=str(held_file),
                  SELFPLAY_TEST_CASE=marker)
    log = where / "killed.log"
    proc = start(recipe_path, env, log)
    deadline = time.time() + 300
    while not held_file.exists():
        assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)
    servers = [pid for pid in marked(f"SELFPLAY_TEST_CASE={marker}") if b"uvicorn" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert len(servers) == 1, servers
    os.kill(servers[0], signal.SIGKILL)
    time.sleep(1)
    sent = time.monotonic()
    os.kill(proc.pid, signal.SIGTERM)
    code = proc.wait(timeout=60)
    assert time.monotonic() - sent <= 15, log.read_text()[-2000:]
    assert code == 128 + signal.SIGTERM
    assert "to resume, rerun: selfplay run --config" in log.read_text().strip().splitlines()[-1]
    rerun = start(recipe_path, {k: v for k, v in env.items() if not k.startswith("SELFPLAY_HOLD")}, where / "rerun.log")
    assert rerun.wait(timeout=600) == 0, (where / "rerun.log").read_text()[-3000:]
    assert RunDir(where / "runs" / NAME).round_done(1)

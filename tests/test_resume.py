"""Crash and resume: SIGKILL a real `selfplay run` while it trains, then rerun it.

The sampled and judged tables must not be rewritten (same bytes, same inode, same mtime), the half-written train
stage must leave nothing published, and the rerun must complete the run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from selfplay.runtime.rundir import RunDir, sha256_file
from tests.conftest import tiny_config
from tools import faults

pytestmark = pytest.mark.stage

SELFPLAY = str(Path(sys.executable).parent / "selfplay")


def fingerprint(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return sha256_file(path), st.st_ino, st.st_mtime_ns


def start_run(recipe: Path, api_url: str) -> subprocess.Popen:
    env = {**os.environ, "PREFECT_API_URL": api_url, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [SELFPLAY, "run", "--config", str(recipe)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, env=env, start_new_session=True,
    )


def test_sigkill_during_training_then_resume(prefect_server, tiny_model, tmp_path):
    # Enough epochs (about 180 tiny steps) that training lasts a few seconds: long enough to be killed mid-way.
    cfg = tiny_config(tiny_model, tmp_path / "runs", name="crashy", rounds=1,
                      train={"dpo": {"num_train_epochs": 20, "per_device_train_batch_size": 2}})
    recipe = tmp_path / "crashy.yaml"
    recipe.write_text(yaml.safe_dump(cfg))
    run = RunDir(tmp_path / "runs" / "crashy")

    proc = start_run(recipe, prefect_server)
    seen = []
    deadline = time.time() + 300
    for line in proc.stdout:
        seen.append(line)
        if "train step" in line:
            break
        assert time.time() < deadline, "".join(seen[-30:])
    else:
        pytest.fail("run ended before training started:\n" + "".join(seen[-30:]))
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    for stage in ("sample", "judge", "filter"):
        assert run.is_done(1, stage)
    assert not run.is_done(1, "train") and not run.round_done(1)
    assert list(run.round_dir(1).glob("train.tmp-*")), "the killed train stage should have left only a temporary dir"
    protected = [run.stage_dir(1, "sample") / "samples.parquet", run.stage_dir(1, "judge") / "judgments.parquet"]
    before = [fingerprint(p) for p in protected]
    sample_manifest = run.manifest(1, "sample")

    # A resume that changes a setting a completed stage read is refused before anything starts, naming the stage
    # (training settings may still change: the train stage did not complete).
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump({**cfg, "sample": {**cfg["sample"], "temperature": 0.5}}))
    refused = subprocess.run([SELFPLAY, "run", "--config", str(changed)], capture_output=True, text=True,
                             env={**os.environ, "PREFECT_API_URL": prefect_server}, timeout=300)
    assert refused.returncode == 2
    assert "sample.temperature: 1.0 -> 0.5: round 1's sample stage used the old value (completed)" in refused.stderr

    resumed = start_run(recipe, prefect_server)
    out, _ = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, out[-3000:]
    assert "sample already complete" in out and "judge already complete" in out
    assert [fingerprint(p) for p in protected] == before
    assert run.manifest(1, "sample") == sample_manifest
    assert run.round_done(1) and run.is_done(1, "train")
    assert not list(run.round_dir(1).glob("*.tmp-*"))
    assert "win rate" in out and str(run.root.resolve()) in out


def test_second_process_on_same_run_is_refused(prefect_server, tiny_model, tmp_path):
    from selfplay.runtime.rundir import locked

    cfg = tiny_config(tiny_model, tmp_path / "runs", name="busy", rounds=1)
    recipe = tmp_path / "busy.yaml"
    recipe.write_text(yaml.safe_dump(cfg))
    with locked(tmp_path / "runs" / "busy"):
        refused = subprocess.run([SELFPLAY, "run", "--config", str(recipe)], capture_output=True, text=True,
                                 env={**os.environ, "PREFECT_API_URL": prefect_server}, timeout=300)
    assert refused.returncode == 2
    assert f"in use by another process (pid {os.getpid()})" in refused.stderr
    assert "resume" not in refused.stderr
    assert not (tmp_path / "runs" / "busy" / "round_1").exists()


def test_a_second_run_of_a_busy_run_exits_2_at_once_naming_the_holder(tiny_model, tmp_path):
    """The CLI takes the run lock before anything starts and holds it to the end: a second `selfplay run` of the
    same run, while the first is mid-way (held inside its judge stage), is refused before it starts anything."""
    cfg = tiny_config(tiny_model, tmp_path / "runs", name="twice", rounds=1)
    recipe = tmp_path / "twice.yaml"
    recipe.write_text(yaml.safe_dump(cfg))
    held = tmp_path / "held.json"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "SELFPLAY_LOCK_DIR": str(tmp_path / "locks")}
    env.pop("PREFECT_API_URL", None)
    first = subprocess.Popen([SELFPLAY, "run", "--config", str(recipe)], env={**env, "SELFPLAY_HOOKS": faults.HOOKS, "SELFPLAY_HOLD": "gpu:round 1 judge",
                             "SELFPLAY_HOLD_FILE": str(held)}, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300
        while not held.exists():
            assert first.poll() is None and time.time() < deadline
            time.sleep(0.2)
        second = subprocess.run([SELFPLAY, "run", "--config", str(recipe)], env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2
        assert f"in use by another process (pid {first.pid})" in second.stderr
        assert "resume" not in second.stderr and "Traceback" not in second.stderr
        assert "temporary Prefect server" not in second.stderr  # refused before anything started
        assert first.poll() is None  # the holder is untouched
    finally:
        first.kill()
        first.wait()

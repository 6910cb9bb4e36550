"""GPU turns that a dead holder cannot keep (`selfplay.runtime.devicelock`, `selfplay.runtime.stages.gpu_slot`).

Real processes hold the lock and are killed with SIGKILL; a real Prefect server holds the optional cluster-wide
limit; two real `selfplay run`s on one machine take turns.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml

from selfplay.runtime import devicelock
from tests.conftest import tiny_config
from tools import faults

pytestmark = pytest.mark.unit

SELFPLAY = str(Path(sys.executable).parent / "selfplay")


def hold_in_child(lock_dir: Path, what: str, ready: Path, devices: list[str] | None = None, cluster: str | None = None,
                  env: dict | None = None) -> subprocess.Popen:
    """A process that takes a GPU turn (devices, or gpu_slot with an optional cluster limit), says so, and sleeps."""
    code = textwrap.dedent(f"""
        import pathlib, time
        from selfplay.runtime import devicelock, stages
        stages.use_cluster_limit({cluster!r})
        turn = devicelock.device_turn({what!r}, devices={devices!r}) if {devices!r} else stages.gpu_slot({what!r})
        with turn:
            pathlib.Path({str(ready)!r}).write_text("held")
            time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "SELFPLAY_LOCK_DIR": str(lock_dir), **(env or {})})
    deadline = time.time() + 60
    while not ready.exists():
        assert proc.poll() is None and time.time() < deadline, "the holder never took its turn"
        time.sleep(0.05)
    return proc


def test_visible_devices_follow_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,0")
    assert devicelock.visible_devices() == ["cuda-1", "cuda-0"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-8a6e/x,2,-1,3")
    assert devicelock.visible_devices() == ["cuda-GPU-8a6e_x", "cuda-2"]  # CUDA stops at the first invalid id
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert devicelock.visible_devices() == ["cpu"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setenv("PATH", "/nonexistent")  # no nvidia-smi: a CPU machine
    assert devicelock.visible_devices() == ["cpu"]


def test_a_waiter_says_who_holds_the_turn_and_gets_it_when_the_holder_is_killed(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("SELFPLAY_LOCK_DIR", str(tmp_path))
    monkeypatch.setattr(devicelock, "WAIT_LOG_EVERY_S", 0.5)
    holder = hold_in_child(tmp_path, "night round 3 train", tmp_path / "ready", devices=["cuda-0"])
    info = devicelock.holder(tmp_path / "cuda-0.lock")
    assert info["pid"] == holder.pid and info["what"] == "night round 3 train"

    got = threading.Event()

    def wait_turn():
        with devicelock.device_turn("day round 1 sample", log=logging.getLogger("turns"), devices=["cuda-0"]):
            got.set()

    caplog.set_level(logging.INFO, logger="turns")
    waiter = threading.Thread(target=wait_turn)
    waiter.start()
    time.sleep(1.5)
    assert not got.is_set(), "the turn was given while its holder lived"
    waits = [r.getMessage() for r in caplog.records if "waiting" in r.getMessage()]
    assert waits and f"pid {holder.pid} (night round 3 train)" in waits[0] and "day round 1 sample" in waits[0]

    killed = time.monotonic()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    waiter.join(timeout=10)
    assert got.is_set() and time.monotonic() - killed < 2, "a dead holder kept the turn"


def test_disjoint_device_sets_run_side_by_side_and_overlapping_ones_take_turns(tmp_path, monkeypatch):
    monkeypatch.setenv("SELFPLAY_LOCK_DIR", str(tmp_path))
    holder = hold_in_child(tmp_path, "a", tmp_path / "ready", devices=["cuda-0", "cuda-1"])
    try:
        with devicelock.device_turn("b", devices=["cuda-2"]) as names:  # disjoint: no wait
            assert names == ["cuda-2"]
        blocked = threading.Event()
        done = threading.Event()

        def overlapping():
            blocked.set()
            with devicelock.device_turn("c", devices=["cuda-1", "cuda-2"]):
                done.set()

        t = threading.Thread(target=overlapping, daemon=True)
        t.start()
        blocked.wait()
        time.sleep(1)
        assert not done.is_set()
    finally:
        holder.kill()
        holder.wait()
    t.join(timeout=10)
    assert done.is_set()


def test_the_lock_is_released_and_cleared_after_a_normal_turn(tmp_path, monkeypatch):
    monkeypatch.setenv("SELFPLAY_LOCK_DIR", str(tmp_path))
    with devicelock.device_turn("x", devices=["cpu"]):
        assert devicelock.holder(tmp_path / "cpu.lock")["pid"] == os.getpid()
    assert devicelock.holder(tmp_path / "cpu.lock") is None
    with devicelock.device_turn("y", devices=["cpu"]):  # free again at once
        pass


@pytest.mark.stage
def test_cluster_limit_frees_a_sigkilled_holders_slot_within_its_lease(prefect_server, tmp_path, monkeypatch):
    """The optional Prefect limit caps GPU stages across machines (two lock directories stand for two machines);
    a holder killed with SIGKILL gives its slot back when its lease runs out, and the next stage proceeds."""
    from prefect.concurrency.sync import concurrency

    from selfplay.runtime import stages

    name = f"gpu-{uuid.uuid4().hex[:8]}"
    stages.ensure_gpu_limit(name=name)
    holder = hold_in_child(tmp_path / "machine-a", "a round 1 train", tmp_path / "ready", cluster=name,
                           env={"PREFECT_API_URL": prefect_server})
    with pytest.raises(TimeoutError):  # the slot is really held
        with concurrency(name, occupy=1, strict=True, timeout_seconds=2):
            pass
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    killed = time.monotonic()
    monkeypatch.setenv("SELFPLAY_LOCK_DIR", str(tmp_path / "machine-b"))
    monkeypatch.setattr(stages, "_cluster_limit", name)
    with stages.gpu_slot("b round 1 sample"):
        waited = time.monotonic() - killed
    lease = stages.GPU_LEASE_S
    assert waited <= lease + 10, f"waited {waited:.0f} s for a dead holder's slot (lease {lease:.0f} s)"


@pytest.mark.stage
def test_two_runs_on_one_machine_take_turns_and_both_finish(tiny_model, tmp_path):
    """Two `selfplay run`s with different names at once, on the default path (each its own temporary server over
    one PREFECT_HOME): their GPU stages never overlap, and both complete."""
    trace = tmp_path / "turns.log"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "SELFPLAY_LOCK_DIR": str(tmp_path / "locks"),
           "SELFPLAY_HOOKS": faults.HOOKS, "SELFPLAY_TRACE_TURNS": str(trace), "PYTHONUNBUFFERED": "1",
           "SELFPLAY_CACHE": str(tmp_path / "cache")}  # no migrated database to copy: both servers would create one
    env.pop("PREFECT_API_URL", None)
    procs = []
    for name in ("left", "right"):
        cfg = tiny_config(tiny_model, tmp_path / "runs", name=name, rounds=1)
        recipe = tmp_path / f"{name}.yaml"
        recipe.write_text(yaml.safe_dump(cfg))
        procs.append(subprocess.Popen([SELFPLAY, "run", "--config", str(recipe)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=900)[0] for p in procs]
    for proc, out in zip(procs, outs):
        assert proc.returncode == 0, out[-3000:]
    for name in ("left", "right"):
        assert (tmp_path / "runs" / name / "round_1" / "manifest.json").is_file()

    events = [line.split("|") for line in trace.read_text().splitlines()]
    holding = None
    for event, what, _ in events:  # appended in time order by the holders themselves
        if event == "take":
            assert holding is None, f"{what} took a turn while {holding} held it"
            holding = what
        else:
            assert holding == what
            holding = None
    runs = {what.split()[0] for _, what, _ in events}
    assert runs == {"left", "right"} and len(events) >= 2 * 2 * 4  # sample, judge, train, eval generation each

"""The production path on the real vLLM: `selfplay run` with deployments/recipes/cpu-vllm.yaml (vLLM's CPU build,
adapter checkpoints, one server kept for the run) on the bundled model, three rounds made small, against a real Prefect
server. It is killed with SIGKILL once round 1's samples are in (the out-of-memory killer's way: the run's process
alone), and run again:

- the killed run's vLLM (API server, engine, worker) does not outlive it, and its port is free;
- the rerun keeps round 1's samples (same bytes), starts vLLM once for all three rounds, loads each round's adapter
  into it, and leaves no process behind.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest
import yaml

from selfplay.runtime.processes import port_is_free
from selfplay.runtime.rundir import RunDir, sha256_file
from tests.conftest import REPO
from tests.test_kill_matrix import marked
from tests.vllm_real import CPU_RECIPE, require_vllm

pytestmark = pytest.mark.stage

SELFPLAY = str(Path(sys.executable).parent / "selfplay")


def recipe(tmp_path: Path) -> Path:
    cfg = yaml.safe_load(CPU_RECIPE.read_text())
    cfg.update(name="kept-vllm", output_dir=str(tmp_path / "runs"), rounds=3)
    cfg["prompts"].update(per_round=6, eval_size=4, accuracy_size=6)
    cfg["sample"].update(num_samples=3, max_new_tokens=16)
    cfg["sample"]["server"]["command"][0] = str(REPO / cfg["sample"]["server"]["command"][0])
    cfg["judge"]["margin"] = 0.0
    cfg["filter"] = {"drop_truncated": False, "max_similarity": 0.99}  # 16 tokens cut most answers: keep them
    cfg["train"].update(min_pairs=2)
    cfg["train"]["dpo"].update(per_device_train_batch_size=4, max_length=128)
    cfg["evaluate"].update(max_new_tokens=16)
    cfg["gate"] = {"enabled": False}  # three rounds, whatever they do: this is about the server
    path = tmp_path / "kept-vllm.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_a_three_round_adapter_run_starts_vllm_once_and_a_killed_run_leaves_no_server(prefect_server, tmp_path):
    require_vllm()
    path = recipe(tmp_path)
    run = RunDir(tmp_path / "runs" / "kept-vllm")
    marker = f"SELFPLAY_KEPT_TEST={uuid.uuid4().hex}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PREFECT_API_URL": prefect_server, marker.split("=")[0]: marker.split("=")[1],
           "SELFPLAY_LOCK_DIR": str(tmp_path / "locks")}

    with open(tmp_path / "first.log", "w") as out:
        first = subprocess.Popen([SELFPLAY, "run", "--config", str(path)], stdout=out, stderr=subprocess.STDOUT, env=env,
                                 start_new_session=True)
    deadline = time.monotonic() + 600
    while not run.is_done(1, "sample"):
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "round 1's sampling did not finish in 10 minutes"
        time.sleep(0.5)
    samples = sha256_file(run.stage_dir(1, "sample") / "samples.parquet")
    server_log = run.root / "policy-server.log"
    port = int(re.search(r"starting on http://127\.0\.0\.1:(\d+)", server_log.read_text()).group(1))
    first.send_signal(signal.SIGKILL)
    first.wait(30)
    deadline = time.monotonic() + 60
    while marked(marker) or not port_is_free("127.0.0.1", port):
        assert time.monotonic() < deadline, f"the killed run's processes outlived it: {marked(marker)}, port {port} free: " \
                                            f"{port_is_free('127.0.0.1', port)}"
        time.sleep(0.5)

    rerun = subprocess.run([SELFPLAY, "run", "--config", str(path)], capture_output=True, text=True, env=env, timeout=1800)
    assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-4000:]
    output = rerun.stdout + rerun.stderr
    assert [k for k in (1, 2, 3) if run.round_done(k)] == [1, 2, 3]
    assert sha256_file(run.stage_dir(1, "sample") / "samples.parquet") == samples  # finished work kept, not redone
    starts = re.findall(r"vLLM server for the policy started on .* \(start (\d+) of this run", output)
    assert starts == ["1"], output[-4000:]  # one start for three rounds of sampling and evaluation
    assert server_log.read_text().count("starting on http://") == 2  # the killed run's, and the rerun's
    for k in (1, 2, 3):  # each round's adapter loaded at runtime into the one server
        assert f"loaded into the kept policy server as 'kept-vllm-round_{k}'" in output
        samples_k = pd.read_parquet(run.stage_dir(k, "sample") / "samples.parquet")
        assert len(samples_k) == 6 * 3 and (samples_k["response"].str.len() > 0).mean() > 0.9
    assert not list(run.root.glob("round_*/*server*.log"))  # no server per stage
    time.sleep(2)
    assert marked(marker) == []  # the rerun's server stopped with it

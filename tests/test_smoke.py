"""The GPU smoke script's figures, on whatever device there is (here a CPU), with the tiny model."""

from __future__ import annotations

import re

import pytest
import yaml

from tests.conftest import tiny_config

pytestmark = pytest.mark.stage


def test_smoke_prints_seconds_throughput_and_memory_per_stage(prefect_server, tiny_model, tmp_path, capsys):
    from tools.smoke import STAGES, main

    recipe = tmp_path / "smoke.yaml"
    recipe.write_text(yaml.safe_dump(tiny_config(tiny_model, tmp_path / "runs", rounds=1)))
    assert main(["--recipe", str(recipe), "--name", "smoke"]) == 0
    out = capsys.readouterr().out
    assert "smoke round on cpu" in out
    rows = {m.group(1): m.groups()[1:] for m in re.finditer(r"^(\w+)\s+([\d.]+)\s+(\S+)\s+(\S+)$", out, re.M)}
    assert set(rows) == set(STAGES)
    assert all(float(seconds) >= 0 for seconds, _, _ in rows.values())
    assert all(float(rows[stage][0]) > 0 for stage in ("sample", "judge", "train", "evaluate")), out
    assert float(rows["sample"][1]) > 0 and float(rows["train"][1]) > 0  # tokens per second
    assert all(peak == "-" for _, _, peak in rows.values())  # no GPU here
    assert "vLLM round: skipped, no GPU (vLLM is CUDA-only)" in out


def test_smoke_runs_a_vllm_round_where_a_vllm_is_found(prefect_server, tiny_model, tmp_path, capsys, monkeypatch):
    """The vLLM round's path, with the FAKE vLLM (tests/vllm_stub.py) as the executable and CUDA reported present:
    the round samples and answers the evaluation through the server, and its figures are printed."""
    import sys

    import torch

    from tests.conftest import REPO
    from tools.smoke import main

    fake = tmp_path / "bin" / "vllm"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\ncd {REPO} && exec {sys.executable} -m tests.vllm_stub \"$@\"\n")
    fake.chmod(0o755)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "FAKE GPU")
    recipe = tmp_path / "smoke.yaml"
    recipe.write_text(yaml.safe_dump(tiny_config(tiny_model, tmp_path / "runs", rounds=1)))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the stages themselves stay on the CPU
    assert main(["--recipe", str(recipe), "--name", "smoke", "--vllm", str(fake)]) == 0
    out = capsys.readouterr().out
    assert f"vLLM round ({fake}) on FAKE GPU" in out
    vllm_part = out.split("vLLM round (", 1)[1]
    rows = {m.group(1): m.groups()[1:] for m in re.finditer(r"^(\w+)\s+([\d.]+)\s+(\S+)\s+(\S+)$", vllm_part, re.M)}
    assert float(rows["sample"][0]) > 0 and float(rows["sample"][1]) > 0  # seconds and tokens/s through the server
    # one server kept for the run (sample.server_scope: run). On a GPU (FAKE: the real vLLM's CPU build cannot show
    # GPU memory) it sleeps through training, wakes for the evaluation, and takes the new merged weights in place.
    log = (tmp_path / "runs" / "smoke-vllm" / "policy-server.log").read_text()
    assert log.count("vllm-stub: FAKE vLLM server") == 1 and "--enable-sleep-mode" in log
    order = [log.index(f"vllm-stub: POST {path} ") for path in ("/sleep?level=1", "/wake_up", "/collective_rpc")]
    assert order == sorted(order)
    assert not list((tmp_path / "runs" / "smoke-vllm" / "round_1").glob("*server*.log"))

"""Sampling through a server, a round at a time: the `vllm` backend starts a server process on the round's policy
and stops it before training; the `endpoint` backend samples from a running server. vLLM cannot run here, so a
FAKE `vllm serve` (`tests/vllm_stub.py`: vLLM's HTTP behaviour as its sources have it) stands in for it, through
the same process lifecycle, the same argv and the real `openai` client."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import pandas as pd
import psutil
import pytest

from selfplay.runtime.rundir import RunDir
from tests.conftest import REPO, assume_probed, run_self_play, tiny_config
from tests.openai_stub import Reply, ScriptedOpenAI, chat_completion
from tests.vllm_stub import Vllm

pytestmark = pytest.mark.stage

# The default ServerSpec (vLLM's argv) with the FAKE vLLM as its command.
# The FAKE vLLM, a server per stage (server_scope: stage): the tiny random model's rounds take seconds, and what
# they check is selfplay's process handling per stage. The real vLLM runs the kept server's rounds on the bundled
# model in tests/test_flow_vllm_real.py.
STUB_AS_VLLM = {"command": [sys.executable, "-m", "tests.vllm_stub", "serve"], "cwd": str(REPO), "startup_timeout": 60}


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_vllm_backend_runs_a_server_per_round_and_stops_it(prefect_server, tiny_model, tmp_path):
    cfg = tiny_config(tiny_model, tmp_path / "runs", name="vllm-sampler", rounds=2,
                      sample={"backend": "vllm", "server": STUB_AS_VLLM, "server_scope": "stage"})
    summaries = run_self_play(cfg, tmp_path / "vllm.yaml")
    run = RunDir(Path(cfg["output_dir"]) / "vllm-sampler")
    assert [s["round"] for s in summaries] == [1, 2]
    for k, policy in ((1, str(Path(tiny_model).resolve())), (2, str(run.checkpoint(1)))):
        samples = pd.read_parquet(run.stage_dir(k, "sample") / "samples.parquet")
        k_samples = cfg["sample"]["num_samples"]
        assert len(samples) == cfg["prompts"]["per_round"] * k_samples
        assert samples.groupby("prompt_id")["sample_idx"].nunique().eq(k_samples).all()
        assert samples["response"].str.startswith("answer ").all() and (samples["prompt_tokens"] > 0).all()
        log = (run.round_dir(k) / "sample-server.log").read_text()
        assert policy in log  # the round's own policy was served
        port = int(log.split("--port", 1)[1].split()[0])
        assert port_free(port)
        # the held-out answers came from vLLM too: one server per full model still to answer (round 1: the new
        # checkpoint and round 0's; round 2: only the new one, round 1's answers are reused), greedy for accuracy
        servers = sorted(run.round_dir(k).glob("eval-server-*.log"))
        assert len(servers) == (2 if k == 1 else 1)
        eval_log = servers[0].read_text()
        assert f"serve {run.checkpoint(k)} " in eval_log
        requests = [line for line in eval_log.splitlines() if line.startswith("vllm-stub: request")]
        assert requests and all("'n': 1" in line and "-> 200" in line for line in requests)
        assert any("'temperature': 0.0" in line for line in requests)  # the accuracy answers: greedy
        gens = pd.read_parquet(run.stage_dir(k, "evaluate") / "generations.parquet")
        assert gens["response"].str.startswith("answer 0 to: ").all()
    assert not [p for p in psutil.process_iter(["cmdline"]) if "tests.vllm_stub" in " ".join(p.info["cmdline"] or [])]
    record = json.loads((run.root / "run.json").read_text())
    assert record["provenance"]["vllm"] == Vllm.version and "resumed_under" not in record  # the servers' own report


def test_endpoint_backend_samples_from_a_running_server(prefect_server, tiny_model, tmp_path):
    def answer(body: dict, n: int) -> Reply:
        k = body.get("n", 1)
        return Reply(json=chat_completion("", contents=[f"reply {i} (seed {body.get('seed')})" for i in range(k)], n=k, completion_tokens=3 * k))

    with ScriptedOpenAI(answer, model="policy") as server:
        assume_probed(server.base_url, "policy")
        cfg = tiny_config(tiny_model, tmp_path / "runs", name="endpoint-sampler", rounds=1,
                          sample={"backend": "endpoint", "endpoint": {"base_url": server.base_url, "model": "policy", "api_key_env": None}})
        run_self_play(cfg, tmp_path / "endpoint.yaml")
        requests = server.chat_requests
    run = RunDir(Path(cfg["output_dir"]) / "endpoint-sampler")
    samples = pd.read_parquet(run.stage_dir(1, "sample") / "samples.parquet")
    assert len(requests) == cfg["prompts"]["per_round"]  # one request per prompt, n completions each
    assert {r["json"]["n"] for r in requests} == {cfg["sample"]["num_samples"]}
    assert len({r["json"]["seed"] for r in requests}) == len(requests)  # seeded, a different seed per prompt
    assert samples["response"].str.startswith("reply ").all() and run.round_done(1)


def test_endpoint_backend_loads_each_rounds_adapter_and_samples_from_it(prefect_server, tiny_model, tmp_path):
    """train.merge false: round 2's policy is round 1's adapter over the base, loaded into the running server."""
    def answer(body: dict, n: int) -> Reply:
        k = body.get("n", 1)
        return Reply(json=chat_completion("", contents=[f"{body['model']} reply {i}" for i in range(k)], n=k, completion_tokens=3 * k))

    with ScriptedOpenAI(answer, model="policy", vllm=Vllm(model="policy", runtime_lora=True)) as server:
        assume_probed(server.base_url, "policy")
        cfg = tiny_config(tiny_model, tmp_path / "runs", name="endpoint-lora", rounds=2, train={"merge": False},
                          sample={"backend": "endpoint", "endpoint": {"base_url": server.base_url, "model": "policy", "api_key_env": None}})
        run_self_play(cfg, tmp_path / "endpoint-lora.yaml")
        requests = server.requests
    run = RunDir(Path(cfg["output_dir"]) / "endpoint-lora")
    def trio(k: int) -> list:
        name = f"endpoint-lora-round_{k}"
        return [("/v1/unload_lora_adapter", {"lora_name": name}),
                ("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(run.checkpoint(k).resolve())}),
                ("/v1/unload_lora_adapter", {"lora_name": name})]

    lora = [(r["path"], r["json"]) for r in requests if "lora_adapter" in r["path"]]
    # Each adapter: an unload first (a crash after an earlier load may have left it loaded), the load, and the unload
    # after use: round 1's for round 1's evaluation answers and round 2's samples, round 2's for its evaluation.
    assert lora == trio(1) + trio(1) + trio(2)
    chats = [r for r in requests if r["path"] == "/v1/chat/completions"]
    per_round, k_samples = cfg["prompts"]["per_round"], cfg["sample"]["num_samples"]
    sampled = [r["json"]["model"] for r in chats if r["json"]["n"] == k_samples]
    assert sampled == ["policy"] * per_round + ["endpoint-lora-round_1"] * per_round
    # Round 2 sampled between its adapter's load and unload.
    index = {id(r): i for i, r in enumerate(requests)}
    loads = [i for i, r in enumerate(requests) if r["path"] == "/v1/load_lora_adapter"]
    unloads = [i for i, r in enumerate(requests) if r["path"] == "/v1/unload_lora_adapter"]
    round2 = [index[id(r)] for r in chats if r["json"]["n"] == k_samples and r["json"]["model"] == "endpoint-lora-round_1"]
    assert loads[1] < min(round2) and max(round2) < unloads[3]
    # The evaluation answered from the endpoint too: one answer a request, round 0's model as the endpoint's own.
    evaluated = {r["json"]["model"] for r in chats if r["json"]["n"] == 1}
    assert evaluated == {"policy", "endpoint-lora-round_1", "endpoint-lora-round_2"}
    gens = pd.read_parquet(run.stage_dir(2, "evaluate") / "generations.parquet")
    assert gens["response"].str.startswith("endpoint-lora-round_2 reply").all()
    samples = pd.read_parquet(run.stage_dir(2, "sample") / "samples.parquet")
    assert samples["response"].str.startswith("endpoint-lora-round_1 reply").all()


def test_vllm_backend_serves_an_adapter_policy_over_its_base(prefect_server, tiny_model, tmp_path):
    cfg = tiny_config(tiny_model, tmp_path / "runs", name="vllm-lora", rounds=2, train={"merge": False},
                      sample={"backend": "vllm", "server": STUB_AS_VLLM, "server_scope": "stage"})
    run_self_play(cfg, tmp_path / "vllm-lora.yaml")
    run = RunDir(Path(cfg["output_dir"]) / "vllm-lora")
    log = (run.round_dir(2) / "sample-server.log").read_text()
    base = str(Path(tiny_model).resolve())
    assert f"serve {base} " in log  # the base model, not the adapter directory
    assert f"vllm-stub: LoRA module vllm-lora-round_1 at {run.checkpoint(1).resolve()} (max rank 8)" in log
    # Round 1's evaluation: the base (round 0) and round 1's adapter answered from one server start.
    [eval_log] = [p.read_text() for p in run.round_dir(1).glob("eval-server-*.log")]
    assert f"serve {base} " in eval_log and "vllm-lora-round_1 at" in eval_log
    models = {line.split("model=")[1].split()[0] for line in eval_log.splitlines() if line.startswith("vllm-stub: request")}
    assert models == {"policy", "vllm-lora-round_1"}
    assert len(pd.read_parquet(run.stage_dir(2, "sample") / "samples.parquet")) == cfg["prompts"]["per_round"] * cfg["sample"]["num_samples"]


def test_vllm_judge_is_started_for_each_judging_step_and_stopped(prefect_server, tiny_model, tmp_path):
    """judge.backend vllm: a server on the judge model (here the reference) for the judge stage and again for the
    evaluation's judging, each stopped before the next GPU stage: the judge takes turns with the policy."""
    judge_server = {**STUB_AS_VLLM, "extra_args": ["--varied-logprobs"]}
    cfg = tiny_config(tiny_model, tmp_path / "runs", name="vllm-judge", rounds=1,
                      judge={"backend": "vllm", "mode": "logprobs", "margin": 0.05, "server": judge_server,
                             "server_scope": "stage"})
    [summary] = run_self_play(cfg, tmp_path / "vllm-judge.yaml")
    run = RunDir(Path(cfg["output_dir"]) / "vllm-judge")
    base = str(Path(tiny_model).resolve())
    for name in ("judge-server.log", "eval-judge-server.log"):
        log = (run.round_dir(1) / name).read_text()
        assert f"serve {base} " in log and "--varied-logprobs" in log  # the reference, served as the judge
        port = int(log.split("--port", 1)[1].split()[0])
        assert port_free(port)
    calls = pd.read_parquet(run.stage_dir(1, "judge") / "calls.parquet")
    assert (calls["mode"] == "logprobs").all() and calls["error"].isna().all()
    judged = pd.read_parquet(run.stage_dir(1, "judge") / "judgments.parquet")
    judged = judged[(judged["verdict"] != "not_judged") & (judged["source"] == "llm")]
    assert judged["p_a_order1"].between(0.05, 0.95).all() and judged["p_a_order1"].nunique() > 1
    assert summary["kept"] >= cfg["train"]["min_pairs"]
    assert run.manifest(1, "evaluate")["metrics"]["wins"] + run.manifest(1, "evaluate")["metrics"]["losses"] > 0
    assert not [p for p in psutil.process_iter(["cmdline"]) if "tests.vllm_stub" in " ".join(p.info["cmdline"] or [])]

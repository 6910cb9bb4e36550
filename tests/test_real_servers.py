"""The `endpoint` sampler and judge against real OpenAI-compatible servers that are not vLLM (tests/real_servers.py):
`transformers serve` and llama.cpp's server, each on the bundled model. The probe's findings are asserted as the
servers really behave; a whole round runs against `transformers serve` through the CLI, killed with SIGKILL during
judging and run again.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from selfplay.config.backends import EndpointConfig
from selfplay.inputs.models import bundled_gguf, resolve_model
from selfplay.judging.calls import JudgeCall
from selfplay.judging.endpoint import OpenAIJudge
from selfplay.judging.prompt import default_template, load_rubric, render_judge_prompt
from selfplay.judging.replies import MARKER_TOKENS
from selfplay.runtime.rundir import RunDir, sha256_file
from selfplay.serving.openai_client import EndpointError, sample_chat
from selfplay.serving.probe import SAMPLE_BODIES, probe_endpoint
from tests.conftest import REPO
from tests.real_servers import llama_cpp_server, transformers_serve

pytestmark = pytest.mark.stage

SELFPLAY = str(Path(sys.executable).parent / "selfplay")
PROMPTS = ["Write one sentence about the sea.", "Name a colour and say why you like it.", "What is 3 * 4?"]
PAIRS = [("What is 2+3?", "2+3 equals 5.", "The answer is 6."), ("Capital of France?", "Paris is the capital of France.", "London."),
         ("Say hello.", "Hello!", "Goodbye forever.")]


@pytest.fixture(scope="module")
def tserve(tmp_path_factory):
    with transformers_serve(resolve_model("bundled"), tmp_path_factory.mktemp("tserve") / "server.log") as server:
        yield server


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    with llama_cpp_server(bundled_gguf(), tmp_path_factory.mktemp("llama") / "server.log") as server:
        yield server


def endpoint(server, **kw) -> EndpointConfig:
    return EndpointConfig(base_url=server.base_url, model=server.model, **{"max_concurrency": 8, "timeout": 120, **kw})


def judge_calls() -> list[JudgeCall]:
    template, rubric = default_template(), load_rubric(None)
    return [JudgeCall(system="You are a careful, impartial judge of AI assistant responses.", user=render_judge_prompt(template, q, x, y, rubric))
            for q, a, b in PAIRS for x, y in ((a, b), (b, a))]


def test_transformers_serve_is_probed_as_it_behaves(tserve):
    caps = probe_endpoint(endpoint(tserve), "EMPTY", sampling=True, judging=True)
    assert caps.choices is False  # n ignored: one choice back
    assert caps.samples is True and caps.sample_body == SAMPLE_BODIES[0]  # greedy at any temperature without do_sample
    assert caps.seeds is True
    assert caps.logprobs is False and caps.structured is False and caps.serial is True
    assert caps.judge_modes("auto") == ["text"]
    with pytest.raises(EndpointError, match="judge.mode 'logprobs'.*does not honour per-token logprobs"):
        caps.judge_modes("logprobs")
    line = caps.line("judge", "text", 16)
    assert "one choice per request (n ignored)" in line and "no logprobs, no structured output" in line
    assert line.endswith(f"-> judge mode text; 2 requests in flight, not 16 (probed in {caps.seconds:.1f} s)")


def test_transformers_serve_samples_one_choice_per_request_reproducibly(tserve):
    caps = probe_endpoint(endpoint(tserve), "EMPTY", sampling=True)
    kw = dict(n=3, temperature=1.0, top_p=1.0, max_tokens=12, seed=7, choices_per_request=False, extra_body=caps.sample_body,
              max_concurrency=2, timeout=120)
    seen = []
    first = sample_chat(tserve.base_url, tserve.model, PROMPTS, progress=lambda d, t: seen.append((d, t)), every_s=0.5, **kw)
    assert [len(c) for c in first] == [3, 3, 3]
    assert all(len({c["response"] for c in choices}) > 1 for choices in first)  # draws differ within a prompt
    assert all(0 < c["n_tokens"] <= 12 for choices in first for c in choices)  # from each single request's usage
    assert sample_chat(tserve.base_url, tserve.model, PROMPTS, **kw) == first  # seeded: a rerun draws the same
    assert seen[-1] == (3, 3) and len(seen) >= 2  # progress while requests were in flight, and at the end
    greedy = sample_chat(tserve.base_url, tserve.model, PROMPTS[:1], **{**kw, "extra_body": None})
    assert len({c["response"] for c in greedy[0]}) == 1  # without the body: the same text three times (why it is probed)


def test_transformers_serve_judges_in_text_mode_with_the_marker_budget(tserve):
    caps = probe_endpoint(endpoint(tserve), "EMPTY", judging=True)
    judge = OpenAIJudge(endpoint(tserve), mode="auto", api_key="EMPTY", caps=caps)
    assert judge.modes == ["text"]
    results = judge.judge(judge_calls())
    assert {r.mode for r in results} == {"text"} and not [r for r in results if r.error]
    assert all(0 < r.tokens_out <= MARKER_TOKENS for r in results)  # the marker alone, not 512 tokens of text
    assert {r.label for r in results} <= {"A", "B", "tie", "invalid"}
    reasoned = OpenAIJudge(endpoint(tserve), mode="auto", api_key="EMPTY", caps=caps, reasoning_tokens=48).judge(judge_calls()[:2])
    assert all(r.mode == "text" and r.tokens_out <= 48 for r in reasoned) and max(r.tokens_out for r in reasoned) > MARKER_TOKENS


def test_llama_cpp_server_is_probed_and_judges_with_logprobs(llama):
    caps = probe_endpoint(endpoint(llama), "EMPTY", sampling=True, judging=True)
    assert caps.choices is False and caps.samples is True and caps.sample_body == {} and caps.seeds is True
    assert caps.logprobs is True and caps.top_logprobs is True
    assert caps.structured is False and any("response_format" in note for note in caps.notes)  # json_schema refused with a 500
    assert caps.judge_modes("auto") == ["logprobs", "text"]
    results = OpenAIJudge(endpoint(llama), mode="auto", api_key="EMPTY", caps=caps).judge(judge_calls())
    assert {r.mode for r in results} == {"logprobs"} and all(r.error is None for r in results)
    assert all(0.0 <= r.p_a <= 1.0 and r.label_mass > 0 for r in results)
    out = sample_chat(llama.base_url, llama.model, PROMPTS[:2], n=3, temperature=1.0, top_p=1.0, max_tokens=12, seed=3,
                      choices_per_request=False, exact_tokens=True, max_concurrency=2, timeout=120)
    assert [len(c) for c in out] == [3, 3] and all(len({c["response"] for c in choices}) > 1 for choices in out)
    assert all(0 < c["n_tokens"] <= 12 for choices in out for c in choices)  # counted from the per-token logprobs


def test_a_plain_http_server_is_refused_by_the_probe(tmp_path):
    """Not OpenAI-compatible: Python's own http.server answers 404/501 to the API's routes."""
    from tests.conftest import free_port, stop, wait_http

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{port}/", 30, proc)
        e = EndpointConfig(base_url=f"http://127.0.0.1:{port}/v1", model="judge", max_retries=0)
        with pytest.raises(EndpointError, match=r"does not answer a chat completion for model 'judge'.*it must be an OpenAI-compatible server"):
            probe_endpoint(e, "EMPTY", judging=True)
    finally:
        stop(proc)


# Sums the bundled model gets right in some draws and wrong in others (the verifier decides those pairs, which
# the round trains on), and open prompts the LLM judge decides.
ROUND_PROMPTS = [("What is 2 + 2? Reply with only the number.", "4"), ("What is 3 + 5? Reply with only the number.", "8"),
                 ("What is 6 + 6? Reply with only the number.", "12"), ("What is 7 + 2? Reply with only the number.", "9"),
                 ("Name a colour.", None), ("Write one sentence about the sea.", None)]


def round_recipe(tmp_path: Path, server) -> Path:
    cfg = yaml.safe_load((REPO / "tests/recipes/bundled-smoke.yaml").read_text())
    api = {"base_url": server.base_url, "model": server.model, "max_concurrency": 8, "timeout": 120}
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": q, "answer": a}) + "\n" for i, (q, a) in enumerate(ROUND_PROMPTS)))
    cfg.update(name="tserve", output_dir=str(tmp_path / "runs"))
    cfg["prompts"].update(train=str(prompts), per_round=6, eval_size=4, accuracy_size=4)
    cfg["sample"] = {"backend": "endpoint", "endpoint": api, "num_samples": 4, "max_new_tokens": 24}
    # The bundled model judging itself names the first position in both orders (every verdict inconsistent, dropped)
    # and often answers no marker: this test is about the path, so unreadable verdicts do not fail the stage.
    cfg["judge"] = {"backend": "endpoint", "endpoint": api, "mode": "auto", "margin": 0.0, "cache": False, "max_error_rate": 1.0}
    cfg["filter"] = {"drop_truncated": False, "max_similarity": 0.99}
    cfg["train"].update(min_pairs=1)
    cfg["evaluate"].update(max_new_tokens=16)
    cfg["gate"] = {"enabled": False}
    path = tmp_path / "tserve.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_a_round_samples_and_judges_through_transformers_serve_killed_and_rerun(tserve, prefect_server, tmp_path):
    path = round_recipe(tmp_path, tserve)
    run = RunDir(tmp_path / "runs" / "tserve")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PREFECT_API_URL": prefect_server, "SELFPLAY_LOCK_DIR": str(tmp_path / "locks")}
    with open(tmp_path / "first.log", "w") as out:
        first = subprocess.Popen([SELFPLAY, "run", "--config", str(path)], stdout=out, stderr=subprocess.STDOUT, env=env,
                                 start_new_session=True)
    deadline = time.monotonic() + 600
    while not run.is_done(1, "sample"):
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "sampling through transformers serve did not finish in 10 minutes"
        time.sleep(0.5)
    time.sleep(3)  # into the judge stage
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(30)
    killed = (tmp_path / "first.log").read_text()
    probes = re.findall(r"(\w[\w ]*) endpoint \S+ \(model .*\): (.*) \(probed in", killed)
    assert [role for role, _ in probes] == ["sampling and judge"], killed[-3000:]  # one server for both: probed once, before the work
    found = probes[0][1]
    assert found.startswith("one choice per request (n ignored), samples (with {\"generation_config\"")
    assert found.endswith("-> judge mode text; 2 requests in flight, not 8")
    assert re.search(r"round 1: sampled \d/6 prompts x 4 \([\d.]+ prompts/s", killed)
    samples = sha256_file(run.stage_dir(1, "sample") / "samples.parquet")

    rerun = subprocess.run([SELFPLAY, "run", "--config", str(path)], capture_output=True, text=True, env=env, timeout=1500)
    output = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, output[-4000:]
    assert run.round_done(1) and sha256_file(run.stage_dir(1, "sample") / "samples.parquet") == samples  # kept, not redone
    table = pd.read_parquet(run.stage_dir(1, "sample") / "samples.parquet")
    assert len(table) == 24 and (table.groupby("prompt_id")["response"].nunique() > 1).mean() >= 0.5  # it sampled
    assert run.manifest(1, "sample")["metrics"]["endpoint"]["choices"] is False
    calls = pd.read_parquet(run.stage_dir(1, "judge") / "calls.parquet")
    assert len(calls) > 0 and set(calls["mode"]) == {"text"} and calls["tokens_out"].max() <= MARKER_TOKENS
    judge_metrics = run.manifest(1, "judge")["metrics"]
    assert judge_metrics["endpoint"]["structured"] is False and judge_metrics["endpoint"]["serial"] is True
    assert set(judge_metrics["per_mode"]) == {"text"} and judge_metrics["per_mode"]["text"]["tokens_out_per_call"] <= MARKER_TOKENS
    assert re.search(r"round 1: judge calls \d+/\d+ \([\d.]+ calls/s", output)
    assert re.search(r"text: \d+ calls, \d+ tokens \(\d+ out\) and [\d.]+ s per call", output)

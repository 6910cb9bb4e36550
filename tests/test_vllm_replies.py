"""The project's parsers read vLLM's own replies: fixtures (tests/fixtures/vllm/*.json) recorded from the real vLLM
(its CPU build, on the bundled model) by tools/record_vllm_replies.py, served over real HTTP on loopback and read
through the same code the runs use. tests/test_vllm_real.py records them again from a running vLLM and checks that
they still hold; these tests need no server, so they run in the unit tier.

And the FAKE vLLM (tests/vllm_stub.py) is checked against the same fixtures: its replies have their shape.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import httpx
import pytest

from selfplay.config.backends import EndpointConfig
from selfplay.judging.calls import JudgeCall
from selfplay.judging.endpoint import OpenAIJudge
from selfplay.serving.lora import LoraAdapterError, load_lora_adapter, lora_args
from selfplay.serving.openai_client import EndpointError, SamplingError, check_endpoint, sample_chat
from tests.openai_stub import Reply, ScriptedOpenAI
from tests.vllm_stub import Vllm, _LoraModules

pytestmark = pytest.mark.unit

FIXTURES = Path(__file__).parent / "fixtures" / "vllm"


def fixture(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def served(name: str) -> ScriptedOpenAI:
    """A server on loopback answering the fixture's request path (chat completions when it names none) with it."""
    f = fixture(name)
    reply = Reply(status=f["status"], json=f["body"])
    path = f["request"].get("path", "/v1/chat/completions")
    fixed = {"/v1/models": reply} if f["status"] == 401 else {}  # vLLM's key check guards every /v1 path
    if path != "/v1/chat/completions":
        fixed[path] = reply
    return ScriptedOpenAI(reply, fixed=fixed)


def test_sampling_reads_choices_token_counts_and_truncation_from_a_vllm_reply():
    f = fixture("chat_n3_logprobs")
    req = f["request"]
    with served("chat_n3_logprobs") as server:
        [choices] = sample_chat(server.base_url, req["model"], [req["messages"][0]["content"]], n=req["n"], temperature=req["temperature"],
                                top_p=req["top_p"], max_tokens=req["max_tokens"], seed=req["seed"], exact_tokens=True)
        sent = server.chat_requests[0]["json"]
    assert {k: sent[k] for k in req if k != "messages"} == {k: v for k, v in req.items() if k != "messages"}
    body = f["body"]["choices"]
    assert [c["response"] for c in choices] == [c["message"]["content"] for c in body]
    assert [c["n_tokens"] for c in choices] == [len(c["logprobs"]["content"]) for c in body]  # per-token entries
    assert sum(c["n_tokens"] for c in choices) == f["body"]["usage"]["completion_tokens"]
    assert [c["truncated"] for c in choices] == [c["finish_reason"] == "length" for c in body]


def test_the_logprobs_judge_reads_the_label_masses_from_vllms_top_logprobs():
    with served("judge_logprobs") as server:
        judge = OpenAIJudge(EndpointConfig(base_url=server.base_url, model="judge", max_retries=0), mode="logprobs", api_key="k")
        [result] = judge.judge([JudgeCall(system="s", user="u")])
        sent = server.chat_requests[0]["json"]
    assert sent["top_logprobs"] <= 20 and sent["logprobs"] is True and sent["max_tokens"] == 1  # within vLLM's max_logprobs
    tops = fixture("judge_logprobs")["body"]["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
    mass_a = sum(math.exp(t["logprob"]) for t in tops if t["token"].strip() == "A")
    mass_b = sum(math.exp(t["logprob"]) for t in tops if t["token"].strip() == "B")
    assert mass_a > 0 and mass_b > 0  # the bundled model's first token is seldom a label: both are among the top 20
    assert result.error is None and result.mode == "logprobs"
    assert result.p_a == pytest.approx(mass_a / (mass_a + mass_b), rel=1e-6)


def test_the_choice_judge_reads_vllms_json_schema_reply():
    with served("judge_json_schema") as server:
        judge = OpenAIJudge(EndpointConfig(base_url=server.base_url, model="judge", max_retries=0), mode="choice", api_key="k")
        [result] = judge.judge([JudgeCall(system="s", user="u")])
        sent = server.chat_requests[0]["json"]
    assert sent["response_format"]["type"] == "json_schema" and "schema" in sent["response_format"]["json_schema"]
    body = fixture("judge_json_schema")["body"]
    label = json.loads(body["choices"][0]["message"]["content"])["verdict"]
    assert (result.error, result.label, result.p_a, result.tokens_out) == (None, label, {"A": 1.0, "B": 0.0, "tie": 0.5}[label],
                                                                           body["usage"]["completion_tokens"])


@pytest.mark.parametrize("name, says, hint", [
    ("lora_already_loaded", "answered 400: The lora adapter 'nightly-round_3' has already been loaded. If you want to load the "
                            "adapter in place, set 'load_inplace' to True.", None),
    ("lora_not_found", "answered 404: Loading lora nightly-round_3 failed: No adapter found for /runs/nightly/round_3/train/checkpoint",
     "the path must be one the server sees"),
    ("lora_routes_off", "answered 404: Not Found", "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"),
])
def test_lora_errors_say_what_vllm_said_and_what_to_fix(name, says, hint):
    with served(name) as server:
        with pytest.raises(LoraAdapterError) as info:
            load_lora_adapter(server.base_url, "nightly-round_3", "/runs/nightly/round_3/train/checkpoint")
    message = str(info.value)
    assert says in message
    if hint:
        assert hint in message
    else:
        assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in message and "the path must" not in message


def test_an_unauthorized_reply_says_the_key_is_wrong():
    with served("unauthorized") as server:
        with pytest.raises(SamplingError, match=r"\(401\).*\(Unauthorized\); it wants another API key"):
            sample_chat(server.base_url, "policy", ["q"], n=2, temperature=1.0, top_p=1.0, max_tokens=4, seed=0, max_retries=0)
        with pytest.raises(EndpointError, match="rejected the API key \\(401\\)"):
            check_endpoint(EndpointConfig(base_url=server.base_url, model="policy"), "wrong")


def test_the_endpoint_check_sees_vllms_models_and_adapters():
    with served("models_with_lora") as server:
        check_endpoint(EndpointConfig(base_url=server.base_url, model="policy"), "EMPTY")
        check_endpoint(EndpointConfig(base_url=server.base_url, model="nightly-round_3"), "EMPTY")
        with pytest.raises(EndpointError, match="does not serve model 'other' \\(it serves: policy, nightly-round_3\\)"):
            check_endpoint(EndpointConfig(base_url=server.base_url, model="other"), "EMPTY")


def _same_shape(ours, theirs, path="body") -> None:
    """Every key vLLM's reply has, the fake's has too, with a value of the same JSON type (recursively)."""
    if isinstance(theirs, dict):
        assert isinstance(ours, dict), path
        missing = set(theirs) - set(ours)
        assert not missing, f"{path} lacks {sorted(missing)}"
        for key in theirs:
            if theirs[key] is not None and ours[key] is not None:
                _same_shape(ours[key], theirs[key], f"{path}.{key}")
    elif isinstance(theirs, list):
        assert isinstance(ours, list), path
        if theirs and ours:
            _same_shape(ours[0], theirs[0], f"{path}[0]")
    else:
        assert type(ours) is type(theirs) or {type(ours), type(theirs)} <= {int, float}, f"{path}: {ours!r} vs {theirs!r}"


@pytest.mark.parametrize("name", ["chat_n3_logprobs", "judge_logprobs", "judge_json_schema"])
def test_the_fake_vllm_answers_in_the_shape_of_the_recorded_replies(name):
    request = {**fixture(name)["request"], "model": "m"}
    with ScriptedOpenAI(None, vllm=Vllm(model="m")) as server:
        reply = httpx.post(f"{server.base_url}/chat/completions", json=request).json()
        models = httpx.get(f"{server.base_url}/models").json()
    _same_shape(reply, fixture(name)["body"])
    _same_shape(models, {**fixture("models_with_lora")["body"], "data": fixture("models_with_lora")["body"]["data"][:1]})


def test_lora_modules_in_json_form_survive_names_and_paths_that_break_the_name_path_form():
    """vLLM's --lora-modules parser (LoRAParserAction, reproduced in the fake): `name=path` is split on "=" and read as
    JSON when it holds a ","; the JSON form selfplay passes carries any name and path."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--lora-modules", nargs="+", action=_LoraModules, default=[])
    name, path = "run=a,b-round_1", "/runs/x=1,y/round_1/train/checkpoint"
    argv = lora_args(name, path, 8)
    assert parser.parse_args(argv[argv.index("--lora-modules"):]).lora_modules == [{"name": name, "path": path}]
    with pytest.raises(ValueError):  # two "=": vLLM's split raises
        parser.parse_args(["--lora-modules", "run=a-round_1=/runs/x"])
    with pytest.raises(SystemExit):  # a ",": read as JSON, and the server exits
        parser.parse_args(["--lora-modules", f"{name}={path}"])


@pytest.mark.parametrize("change, status, message", [
    ({"logprobs": True, "top_logprobs": 21}, 400, "Requested sample logprobs of 21, which is greater than max allowed: 20"),
    ({"top_logprobs": 5}, 400, "when using `top_logprobs`, `logprobs` must be set to true"),
    ({"n": 2, "temperature": 0.0}, 400, "n must be 1 when using greedy sampling, got 2."),
    ({"model": "other"}, 404, "The model `other` does not exist."),
])
def test_the_fake_vllm_refuses_what_vllm_refuses(change, status, message):
    """The limits the project's requests must stay within (the judge asks for 20 top logprobs, samplers never send
    a greedy n > 1), with vLLM's status codes and messages."""
    request = {"model": "m", "messages": [{"role": "user", "content": "q"}], "max_tokens": 4, **change}
    with ScriptedOpenAI(None, vllm=Vllm(model="m")) as server:
        reply = httpx.post(f"{server.base_url}/chat/completions", json=request)
    assert reply.status_code == status and reply.json()["error"]["code"] == status
    assert message in reply.json()["error"]["message"]

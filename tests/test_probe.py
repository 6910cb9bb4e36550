"""The endpoint probe (selfplay.serving.probe) and what the sampler and judge do with its findings, against test doubles
built for each behaviour: a server that ignores `n`, one that never samples, one that ignores seeds, one that answers
one request at a time, one that answers slowly. FAKE servers (tests/openai_stub.py, tests/vllm_stub.py): these are
behaviours to inject on demand; the probe against real servers is in tests/test_real_servers.py and
tests/test_vllm_real.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random

import pytest

from selfplay.config.backends import EndpointConfig
from selfplay.config.run import ConfigError, build_config
from selfplay.judging.calls import JudgeCall
from selfplay.judging.endpoint import OpenAIJudge
from selfplay.judging.replies import MARKER_TOKENS, MODE_INSTRUCTIONS, parse_text_verdict
from selfplay.orchestration.preflight import check_sampling_endpoint
from selfplay.serving import probe
from selfplay.serving.openai_client import EndpointError, SamplingError, asample_chat, request_seed, sample_chat
from tests.openai_stub import Reply, ScriptedOpenAI, chat_completion
from tests.vllm_stub import Vllm

pytestmark = pytest.mark.unit


def user_text(body: dict) -> str:
    return body["messages"][-1]["content"]


def one_choice(text_of):
    """A server that ignores `n` (one choice back), answering `text_of(body)`; usage counts the words."""
    def handle(body: dict, n: int) -> Reply:
        text = text_of(body)
        return Reply(json=chat_completion(text, completion_tokens=len(text.split())))
    return handle


def seeded(body: dict) -> str:
    return f"draw {body.get('seed')} for {user_text(body)[:20]}"


def endpoint(server, **kw) -> EndpointConfig:
    return EndpointConfig(base_url=server.base_url, model="m", **{"max_retries": 0, **kw})


def test_the_fake_vllm_is_probed_as_honouring_everything():
    with ScriptedOpenAI(None, vllm=Vllm(model="m"), latency=0.2) as server:
        caps = probe.probe_endpoint(endpoint(server), "k", sampling=True, judging=True)
    assert (caps.choices, caps.samples, caps.sample_body, caps.seeds) == (True, True, {}, True)
    assert (caps.logprobs, caps.top_logprobs, caps.structured, caps.serial) == (True, True, True, False)
    assert caps.judge_modes() == ["logprobs", "choice", "text"] and caps.in_flight(16) == 16


def test_a_server_without_n_is_sampled_one_seeded_choice_per_request():
    with ScriptedOpenAI(one_choice(seeded)) as server:
        caps = probe.probe_endpoint(endpoint(server), "k", sampling=True)
        assert caps.choices is False and caps.samples is True and caps.seeds is True
        start = len(server.chat_requests)
        out = sample_chat(server.base_url, "m", ["first", "second"], n=3, temperature=1.0, top_p=1.0, max_tokens=8, seed=5,
                          choices_per_request=caps.choices, max_concurrency=4)
        bodies = [r["json"] for r in server.chat_requests[start:]]
    assert sorted((b["n"], b["seed"]) for b in bodies) == [(1, request_seed(5, i, 3) + j) for i in range(2) for j in range(3)]
    assert [[c["response"] for c in choices] for choices in out] == [
        [f"draw {request_seed(5, i, 3) + j} for {p}" for j in range(3)] for i, p in enumerate(["first", "second"])]
    assert all(c["n_tokens"] == 4 for choices in out for c in choices)  # each single request's own usage: exact


def test_a_server_that_never_samples_is_refused_before_any_work(tmp_path):
    with ScriptedOpenAI(one_choice(lambda body: "the same every time"), model="m") as server:
        caps = probe.probe_endpoint(endpoint(server), "k", sampling=True)
        assert caps.samples is False and caps.seeds is None and "does not sample" in caps.summary()
        probe.forget()
        cfg = build_config({"name": "x", "output_dir": str(tmp_path), "rounds": 1,
                            "sample": {"backend": "endpoint", "num_samples": 4, "endpoint": {"base_url": server.base_url, "model": "m"}}})
        with pytest.raises(ConfigError, match=r"returns the same text for different seeds at temperature 1 .* each prompt's 4 completions "
                                              r"would be identical"):
            check_sampling_endpoint(cfg)
        # the body that makes transformers serve sample was tried too, and changed nothing
        assert any(r["json"].get("generation_config") == json.dumps({"do_sample": True}) for r in server.chat_requests)


def test_a_server_that_samples_only_when_asked_to_gets_the_body_it_needs():
    """transformers serve's behaviour: greedy unless its `generation_config` field says do_sample."""
    def handle(body):
        sampling = json.loads(body.get("generation_config") or "{}").get("do_sample")
        return seeded(body) if sampling else "greedy text"

    with ScriptedOpenAI(one_choice(handle)) as server:
        caps = probe.probe_endpoint(endpoint(server), "k", sampling=True)
        assert caps.samples is True and caps.sample_body == probe.SAMPLE_BODIES[0]
        out = sample_chat(server.base_url, "m", ["q"], n=2, temperature=1.0, top_p=1.0, max_tokens=8, seed=0, choices_per_request=False,
                          extra_body=caps.sample_body)
    assert len({c["response"] for c in out[0]}) == 2


def test_a_server_that_ignores_seeds_is_a_warning_not_a_failure(tmp_path, caplog):
    rng = random.Random(0)
    with ScriptedOpenAI(one_choice(lambda body: f"draw {rng.random()}"), model="m") as server:
        cfg = build_config({"name": "x", "output_dir": str(tmp_path), "rounds": 1,
                            "sample": {"backend": "endpoint", "endpoint": {"base_url": server.base_url, "model": "m"}}})
        with caplog.at_level(logging.INFO):
            check_sampling_endpoint(cfg)
    assert "ignores seeds: its samples are not reproducible" in caplog.text
    assert "sampling endpoint" in caplog.text and "seeds ignored" in caplog.text


def test_a_serial_server_gets_two_requests_in_flight():
    lock = asyncio.Lock()

    async def serial(body: dict, n: int) -> Reply:
        async with lock:
            await asyncio.sleep(0.4)
            return Reply(json=chat_completion("x"))

    with ScriptedOpenAI(serial) as server:
        caps = probe.probe_endpoint(endpoint(server), "k")
    assert caps.serial is True and caps.in_flight(16) == probe.SERIAL_IN_FLIGHT and caps.in_flight(1) == 1
    with ScriptedOpenAI(Reply(json=chat_completion("x")), latency=0.4) as server:
        assert probe.probe_endpoint(endpoint(server), "k").serial is False


def test_the_probe_is_remembered_and_asks_again_only_for_what_it_did_not_ask():
    with ScriptedOpenAI(None, vllm=Vllm(model="m")) as server:
        e = endpoint(server)
        caps, probed = probe.capabilities(e, "k", judging=True, mode="auto")
        asked = server.count
        assert probed and caps.structured is True and caps.samples is None
        assert probe.capabilities(e, "k", judging=True) == (caps, False) and server.count == asked
        again, probed = probe.capabilities(e, "k", sampling=True)
        assert probed and again.samples is True and again.structured is True and server.count > asked
        assert probe.remembered(e)["samples"] is True


def test_a_configured_mode_the_endpoint_cannot_serve_is_refused():
    caps = probe.Capabilities("http://x/v1", "m", logprobs=False, structured=False)
    assert caps.judge_modes("auto") == ["text"] and caps.judge_modes("text") == ["text"]
    with pytest.raises(EndpointError, match=r"judge.mode 'choice': http://x/v1 does not honour structured output"):
        caps.judge_modes("choice")


def test_a_server_that_is_not_openai_compatible_is_refused():
    with ScriptedOpenAI(Reply(status=404, text="Not Found")) as server:
        with pytest.raises(EndpointError, match=r"does not answer a chat completion for model 'm': NotFoundError 404"):
            probe.probe_endpoint(endpoint(server), "k", judging=True)


def test_a_text_only_judge_asks_for_the_marker_alone_from_the_first_call():
    caps = probe.Capabilities("unused", "m", logprobs=False, structured=False)
    replies = ["A", "**B**", "[[tie]]", "A is better.", "The answer is A", "A\n\nbecause it is right"]
    with ScriptedOpenAI([Reply(json=chat_completion(r, completion_tokens=3)) for r in replies]) as server:
        judge = OpenAIJudge(endpoint(server), mode="auto", api_key="k", caps=caps)
        results = judge.judge([JudgeCall("s", f"u{i}") for i in range(len(replies))])
        bodies = [r["json"] for r in server.chat_requests]
    assert len(bodies) == len(replies)  # no logprobs or structured request tried first
    assert all(b["max_tokens"] == MARKER_TOKENS and b["messages"][-1]["content"].endswith(MODE_INSTRUCTIONS["text"]) for b in bodies)
    assert all("logprobs" not in b and "response_format" not in b for b in bodies)
    assert [r.label for r in results] == ["A", "B", "tie", "invalid", "invalid", "A"]


def test_reasoning_asks_for_a_marker_at_the_end_within_its_budget():
    caps = probe.Capabilities("unused", "m", logprobs=False, structured=False)
    with ScriptedOpenAI([Reply(json=chat_completion("A is terse, B is right. [[B]]")), Reply(json=chat_completion("A is better."))]) as server:
        results = OpenAIJudge(endpoint(server, max_concurrency=1), mode="auto", api_key="k", caps=caps, reasoning_tokens=200).judge(
            [JudgeCall("s", "u1"), JudgeCall("s", "u2")])
        bodies = [r["json"] for r in server.chat_requests]
    assert all(b["max_tokens"] == 200 and b["messages"][-1]["content"].endswith(MODE_INSTRUCTIONS["reasoning"]) for b in bodies)
    assert [r.label for r in results] == ["B", "invalid"]  # with reasoning, only a marker counts


@pytest.mark.parametrize("reply, bare, label", [
    ("A", True, "A"), ("b.", True, "invalid"), ("B.", True, "B"), ("tie", True, "tie"), ("`A`", True, "A"),
    ("A good answer", True, "invalid"), ("A\n\nbecause", True, "A"), ("A", False, "invalid"), ("x [[A]] then [[B]]", False, "B"), ("", True, "invalid"),
])
def test_text_verdicts(reply, bare, label):
    assert parse_text_verdict(reply, bare=bare) == label


def test_progress_is_reported_while_slow_requests_are_in_flight():
    seen: list[tuple[int, int]] = []
    with ScriptedOpenAI(Reply(json=chat_completion("x", n=2, completion_tokens=2)), latency=2.0) as server:
        sample_chat(server.base_url, "m", ["a", "b"], n=2, temperature=1.0, top_p=1.0, max_tokens=4, seed=0, progress=lambda d, t: seen.append((d, t)),
                    every_s=0.25)
    assert seen.count((0, 2)) >= 3 and seen[-1] == (2, 2)  # every 0.25 s before any request ended, and at the end
    calls = [JudgeCall("s", "u")] * 2
    judged: list[tuple[int, int]] = []
    with ScriptedOpenAI(Reply(json=chat_completion("[[A]]")), latency=2.0) as server:
        OpenAIJudge(endpoint(server), mode="text", api_key="k").judge(calls, progress=lambda d, t: judged.append((d, t)), every_s=0.25)
    assert judged.count((0, 2)) >= 3 and judged[-1] == (2, 2)


def test_a_request_that_times_out_says_after_how_long():
    with ScriptedOpenAI(Reply(json=chat_completion("x", n=2)), latency=1.0) as server:
        with pytest.raises(SamplingError, match=r"failed after 2 attempts: APITimeoutError.*last attempt timed out after 0.3 s .* raise the timeout or lower "
                                                r"max_concurrency"):
            sample_chat(server.base_url, "m", ["a"], n=2, temperature=1.0, top_p=1.0, max_tokens=4, seed=0, timeout=0.3, max_retries=1)


def test_a_server_whose_choices_share_one_seed_is_sampled_one_choice_per_request():
    """Some servers give every choice of a seeded request the request's seed: K identical completions."""
    def handle(body: dict, n: int) -> Reply:
        k = body.get("n", 1)
        return Reply(json=chat_completion("", contents=[seeded(body)] * k, n=k))

    with ScriptedOpenAI(handle) as server:
        caps = probe.probe_endpoint(endpoint(server), "k", sampling=True)
    assert caps.samples is True and caps.choices is False and "same text" in caps.notes[-1]


def test_refusals_of_n_and_of_the_sampling_body_are_findings_not_failures():
    """A 422 for n > 1 (FastAPI-style validation) and a 400 for the unknown `generation_config` field (an API that
    rejects fields it does not know): one choice per request, and no sampling, said in the notes."""
    def handle(body: dict, n: int) -> Reply:
        if body.get("n", 1) > 1:
            return Reply(status=422, json={"error": {"message": "n must be 1"}})
        if "generation_config" in body:
            return Reply(status=400, json={"error": {"message": "unknown field generation_config"}})
        return Reply(json=chat_completion("greedy"))

    with ScriptedOpenAI(handle) as server:
        caps = probe.probe_endpoint(endpoint(server), "k", sampling=True)
    assert caps.choices is False and caps.samples is False and caps.draws == ["greedy"] * 3
    assert any(note.startswith("n=2 refused: UnprocessableEntityError 422") for note in caps.notes)
    assert any("generation_config" in note and "refused" in note for note in caps.notes)


def test_a_reasoning_models_reasoning_counts_as_its_draw_and_empty_replies_leave_sampling_unknown():
    def reasoning(body: dict, n: int) -> Reply:
        reply = chat_completion("")
        reply["choices"][0]["message"]["reasoning_content"] = seeded(body)
        return Reply(json=reply)

    with ScriptedOpenAI(reasoning) as server:
        assert probe.probe_endpoint(endpoint(server), "k", sampling=True).samples is True
    with ScriptedOpenAI(Reply(json=chat_completion(""))) as server:
        caps = probe.probe_endpoint(endpoint(server), "k", sampling=True)
    assert caps.samples is None and "whether it samples is unknown" in caps.notes[-1]


def test_credentials_in_the_url_and_the_key_stay_out_of_what_the_probe_reports():
    key = "sk-probe-0123456789SECRET"
    with ScriptedOpenAI(Reply(status=400, json={"error": {"message": f"bad request from {key}"}})) as server:
        url = server.base_url.replace("http://", "http://user:pw@")
        with pytest.raises(EndpointError) as info:
            probe.probe_endpoint(EndpointConfig(base_url=url, model="m", max_retries=0), key)
    message = str(info.value)
    assert key not in message and "[api key]" in message and "pw@" not in message
    assert probe.public_url("https://u:p@host/v1?key=1") == "https://host/v1"


def test_one_failed_choice_request_stops_its_siblings():
    """A server without n: prompt 0's second single-choice request is refused; the others of that prompt are
    cancelled, not left running past the error."""
    async def handle(body: dict, n: int) -> Reply:
        if body.get("seed") == 1:
            return Reply(status=400, json={"error": {"message": "refused"}})
        await asyncio.sleep(3.0)
        return Reply(json=chat_completion("x"))

    async def run(base_url: str) -> list:
        with pytest.raises(SamplingError, match=r"prompt 0: the server refused the request \(400\)"):
            await asample_chat(base_url, "m", ["a"], n=3, temperature=1.0, top_p=1.0, max_tokens=4, seed=0, choices_per_request=False)
        return [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()]

    with ScriptedOpenAI(handle) as server:
        assert asyncio.run(run(server.base_url)) == []  # nothing of the failed prompt still running

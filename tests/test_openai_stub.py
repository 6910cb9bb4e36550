"""Tests for the FAKE OpenAI-compatible server in tests/openai_stub.py, through the real `openai` client."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `tests` is importable when pytest runs from the repo root; elsewhere too
    sys.path.insert(0, str(REPO))

from tests.openai_stub import Reply, ScriptedOpenAI, api_error, chat_completion  # noqa: E402

pytestmark = pytest.mark.unit

MSG = [{"role": "user", "content": "Which is better, A or B?"}]


@pytest.fixture(autouse=True)
def no_leaked_stub_threads():
    yield
    left = [t.name for t in threading.enumerate() if t.name.startswith("openai-stub-")]
    assert not left, f"stub server threads left running: {left}"


def client(server: ScriptedOpenAI, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="test", max_retries=kw.pop("max_retries", 0), **kw)


def test_canned_reply_with_logprobs_round_trips():
    reply = Reply(json=chat_completion("A", logprobs={"A": -0.1, "B": -2.5}, prompt_tokens=7))
    t0 = time.monotonic()
    with ScriptedOpenAI(reply) as server:
        assert time.monotonic() - t0 < 2
        assert server.base_url.startswith("http://127.0.0.1:") and server.base_url.endswith("/v1")
        resp = client(server).chat.completions.create(
            model="judge", messages=MSG, logprobs=True, top_logprobs=2, max_tokens=1
        )
        assert resp.choices[0].message.content == "A"
        assert resp.choices[0].finish_reason == "stop"
        assert resp.usage.prompt_tokens == 7 and resp.usage.total_tokens == 8
        first = resp.choices[0].logprobs.content[0]
        assert first.token == "A" and first.logprob == pytest.approx(-0.1)
        assert [(t.token, t.logprob) for t in first.top_logprobs] == [("A", -0.1), ("B", -2.5)]
        assert first.top_logprobs[1].bytes == [66]

        assert server.count == 1
        (req,) = server.requests
        assert req["path"] == "/v1/chat/completions"
        assert req["headers"]["authorization"] == "Bearer test"
        assert req["json"]["messages"] == MSG and req["json"]["top_logprobs"] == 2
    t0 = time.monotonic()
    # leaving the block stopped the server: the port no longer answers
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/health", timeout=1)
    assert time.monotonic() - t0 < 1


def test_no_logprobs_and_n_contents():
    body = chat_completion("x", contents=["one", "two", "three"])
    assert [c["logprobs"] for c in body["choices"]] == [None] * 3
    with ScriptedOpenAI(Reply(json=body)) as server:
        resp = client(server).chat.completions.create(model="judge", messages=MSG, n=3)
        assert [c.message.content for c in resp.choices] == ["one", "two", "three"]
        assert [c.index for c in resp.choices] == [0, 1, 2]
        assert resp.choices[0].logprobs is None


def test_rate_limit_and_server_error_reach_the_client():
    replies = [
        api_error(429, "slow down", headers={"Retry-After": "1"}),
        Reply(status=500, json={"error": {"message": "boom", "type": "server_error"}}),
    ]
    with ScriptedOpenAI(replies) as server:
        c = client(server, max_retries=0)
        with pytest.raises(openai.RateLimitError) as rl:
            c.chat.completions.create(model="judge", messages=MSG)
        assert rl.value.status_code == 429
        assert rl.value.response.headers["retry-after"] == "1"
        assert "slow down" in str(rl.value)
        with pytest.raises(openai.InternalServerError) as ise:
            c.chat.completions.create(model="judge", messages=MSG)
        assert ise.value.status_code == 500
        assert server.count == 2


def test_malformed_json_body_raises_in_client():
    with ScriptedOpenAI(Reply(text='{"id": "chatcmpl-1", "choices": [')) as server:
        with pytest.raises(ValueError) as err:  # the openai client lets json.JSONDecodeError through
            client(server).chat.completions.create(model="judge", messages=MSG)
        assert type(err.value).__name__ == "JSONDecodeError"


def test_list_of_replies_in_order_last_repeated_and_client_retries():
    ok = chat_completion("fine")
    replies = [
        api_error(429, headers={"retry-after-ms": "10"}),
        Reply(json=chat_completion("first")),
        Reply(json=ok),
    ]
    with ScriptedOpenAI(replies) as server:
        c = client(server, max_retries=2)
        # the 429 is retried by the client after retry-after-ms, then "first" is served
        assert c.chat.completions.create(model="judge", messages=MSG).choices[0].message.content == "first"
        assert server.count == 2
        got = [c.chat.completions.create(model="judge", messages=MSG).choices[0].message.content for _ in range(3)]
        assert got == ["fine"] * 3
        assert server.count == 5


def test_callable_handlers_sync_and_async_see_body_and_index():
    seen = []

    def sync_handler(body, n):
        seen.append((n, body["messages"][-1]["content"]))
        return Reply(json=chat_completion(f"reply {n}"))

    with ScriptedOpenAI(sync_handler) as server:
        c = client(server)
        out = [c.chat.completions.create(model="m", messages=[{"role": "user", "content": f"q{i}"}]) for i in range(2)]
        assert [o.choices[0].message.content for o in out] == ["reply 0", "reply 1"]
        assert seen == [(0, "q0"), (1, "q1")]

    async def async_handler(body, n):
        await asyncio.sleep(0)
        return Reply(json=chat_completion("async", model=body["model"]))

    with ScriptedOpenAI(async_handler) as server:
        resp = client(server).chat.completions.create(model="other", messages=MSG)
        assert resp.choices[0].message.content == "async" and resp.model == "other"

    def broken(body, n):
        raise KeyError("oops")

    with ScriptedOpenAI(broken) as server:
        with pytest.raises(openai.InternalServerError):
            client(server).chat.completions.create(model="m", messages=MSG)
        assert isinstance(server.errors[0], KeyError)


def test_latency_and_concurrency_async_client():
    async def go(server):
        c = openai.AsyncOpenAI(base_url=server.base_url, api_key="test", max_retries=0)
        try:
            t0 = time.monotonic()
            out = await asyncio.gather(
                *[c.chat.completions.create(model="judge", messages=MSG) for _ in range(8)]
            )
            return time.monotonic() - t0, out
        finally:
            await c.close()

    with ScriptedOpenAI(Reply(json=chat_completion("A")), latency=0.3) as server:
        elapsed, out = asyncio.run(go(server))
        assert len(out) == 8 and all(o.choices[0].message.content == "A" for o in out)
        assert 0.3 <= elapsed < 0.8, elapsed
        assert server.max_in_flight == 8
        assert server.in_flight == 0 and server.count == 8


def test_reply_delay_adds_to_latency():
    with ScriptedOpenAI([Reply(json=chat_completion("slow"), delay=0.2), Reply(json=chat_completion("fast"))]) as server:
        c = client(server)
        t0 = time.monotonic()
        c.chat.completions.create(model="judge", messages=MSG)
        t1 = time.monotonic()
        c.chat.completions.create(model="judge", messages=MSG)
        t2 = time.monotonic()
        assert t1 - t0 >= 0.2 and t2 - t1 < 0.2


def test_models_health_and_lora_endpoints():
    with ScriptedOpenAI(Reply(json=chat_completion("A")), model="policy") as server:
        assert [m.id for m in client(server).models.list()] == ["policy"]
        h = httpx.get(f"{server.url}/health")
        assert h.status_code == 200 and h.text == "ok"
        r = httpx.post(f"{server.base_url}/load_lora_adapter", json={"lora_name": "r1", "lora_path": "/x"})
        assert r.status_code == 200 and r.text == "ok"
        assert [q["path"] for q in server.requests] == ["/v1/models", "/v1/load_lora_adapter"]
        assert server.requests[-1]["json"] == {"lora_name": "r1", "lora_path": "/x"}
        assert server.count == 0


# --- CLI mode: a stand-in for a `vllm serve` subprocess ------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_cli(*args: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.openai_stub", "--port", str(port), *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    return proc, port


def wait_listening(port: int, proc: subprocess.Popen, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[0]
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.05)
    raise TimeoutError(f"stub CLI on port {port} did not listen")


def stop_cli(proc: subprocess.Popen) -> str:
    proc.terminate()
    out, _ = proc.communicate(timeout=10)
    return out


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", port)) == 0:
            return False
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as a real server would
        s.bind(("127.0.0.1", port))
        s.listen(1)
    return True


def test_cli_serves_default_answers_and_frees_port_on_sigterm():
    proc, port = start_cli("--model", "policy", "--startup-delay", "1.0")
    try:
        wait_listening(port, proc)
        first = httpx.get(f"http://127.0.0.1:{port}/health").status_code
        deadline = time.monotonic() + 5
        while httpx.get(f"http://127.0.0.1:{port}/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        assert [m.id for m in c.models.list()] == ["policy"]
        resp = c.chat.completions.create(model="policy", messages=MSG, n=3, logprobs=True, top_logprobs=2, seed=7)
        assert [ch.message.content for ch in resp.choices] == [
            f"answer {i} to: {MSG[0]['content'][:40]} [seed 7]" for i in range(3)
        ]
        assert {t.token: t.logprob for t in resp.choices[0].logprobs.content[0].top_logprobs} == {"A": -0.2, "B": -1.8}
        assert resp.usage.prompt_tokens > 0 and resp.usage.completion_tokens > 0
        again = c.chat.completions.create(model="policy", messages=MSG, n=3, seed=7)
        assert [ch.message.content for ch in again.choices] == [ch.message.content for ch in resp.choices]
        assert again.choices[0].logprobs is None
    finally:
        out = stop_cli(proc)
    assert first == 503
    assert f"stub: serving policy on http://127.0.0.1:{port}" in out
    # uvicorn shuts down gracefully, then re-raises the SIGTERM it caught, as a real server would
    assert "Finished server process" in out, out
    assert proc.returncode in (0, -signal.SIGTERM), out
    assert port_is_free(port)


def test_cli_fail_start_exits_1_with_error_line():
    proc, port = start_cli("--fail-start")
    out, _ = proc.communicate(timeout=10)
    assert proc.returncode == 1
    assert "ERROR: simulated startup failure" in out
    assert port_is_free(port)


def test_cli_never_healthy_answers_503():
    proc, port = start_cli("--never-healthy")
    try:
        wait_listening(port, proc)
        for _ in range(3):
            assert httpx.get(f"http://127.0.0.1:{port}/health").status_code == 503
            time.sleep(0.05)
        assert proc.poll() is None
    finally:
        stop_cli(proc)
    assert port_is_free(port)

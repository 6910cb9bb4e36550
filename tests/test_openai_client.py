"""selfplay.serving.openai_client: the one way the judge and the sampler talk to an OpenAI-compatible server.

Against the scripted FAKE server (`tests.openai_stub`) through the real `openai` client: what the client retries
and what `chat` retries share one budget of attempts; and the sync bridge raises, inside a running event loop too,
the exception the async code raised (not a KeyError, not a thread's traceback on stderr).
"""

from __future__ import annotations

import asyncio

import openai._base_client
import pytest

import selfplay.serving.openai_client as openai_client
from selfplay.config.backends import EndpointConfig
from selfplay.judging.calls import JudgeCall
from selfplay.judging.endpoint import OpenAIJudge
from selfplay.serving.openai_client import RequestFailed, SamplingError, async_client, chat, run_sync, sample_chat
from tests.openai_stub import Reply, ScriptedOpenAI, api_error, chat_completion

pytestmark = pytest.mark.unit

NO_CHOICES = Reply(json={"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "m", "choices": []})
ASK = dict(model="m", messages=[{"role": "user", "content": "hi"}])


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    monkeypatch.setattr(openai._base_client, "INITIAL_RETRY_DELAY", 0.01)
    monkeypatch.setattr(openai_client, "MALFORMED_RETRY_DELAY_S", 0.01)


def ask(server, max_retries: int):
    async def go():
        async with async_client(server.base_url, "k", timeout=10, max_retries=max_retries) as client:
            return await chat(client, max_retries=max_retries, **ASK)
    return asyncio.run(go())


class Boom(Exception):
    pass


async def explode():
    await asyncio.sleep(0)
    raise Boom("the real error")


def test_run_sync_raises_the_real_exception_outside_and_inside_a_running_loop():
    with pytest.raises(Boom, match="the real error"):
        run_sync(explode())

    async def flow():
        return run_sync(explode())

    with pytest.raises(Boom, match="the real error"):
        asyncio.run(flow())

    async def value():
        return run_sync(asyncio.sleep(0, result=7))

    assert asyncio.run(value()) == 7


def test_a_judge_inside_a_running_loop_raises_what_went_wrong():
    class BrokenCache:
        def get(self, key):
            raise Boom("cache unreadable")

    with ScriptedOpenAI(Reply(json=chat_completion("A"))) as server:
        judge = OpenAIJudge(EndpointConfig(base_url=server.base_url, model="m"), mode="text", cache=BrokenCache(), api_key="k")

        async def flow():
            return judge.judge([JudgeCall("sys", "user")])

        with pytest.raises(Boom, match="cache unreadable"):
            asyncio.run(flow())


def test_sampling_inside_a_running_loop_raises_the_sampling_error():
    with ScriptedOpenAI(api_error(400, "bad request: n too large")) as server:
        async def flow():
            return sample_chat(server.base_url, "m", ["a"], n=2, temperature=1, top_p=1, max_tokens=4, seed=0)

        with pytest.raises(SamplingError, match=r"prompt 0: the server refused the request \(400\).*n too large"):
            asyncio.run(flow())
        assert server.count == 1


def test_malformed_replies_and_server_errors_share_one_budget():
    with ScriptedOpenAI([NO_CHOICES, api_error(500, "boom")]) as server:
        with pytest.raises(RequestFailed) as info:
            ask(server, max_retries=3)
        assert server.count == 4  # 1 malformed (retried by chat) + 3 answered 500 (retried by the client)
    failed = info.value
    assert failed.attempts == 4 and not failed.refused
    assert str(failed).startswith("InternalServerError 500") and str(failed).endswith("(gave up after 4 attempts)")


def test_only_malformed_replies_give_up_after_the_budget():
    with ScriptedOpenAI(NO_CHOICES) as server:
        with pytest.raises(RequestFailed) as info:
            ask(server, max_retries=2)
        assert server.count == 3
    assert "a 200 reply without choices" in str(info.value) and info.value.attempts == 3


def test_a_status_the_client_does_not_retry_is_refused_at_once():
    with ScriptedOpenAI([NO_CHOICES, api_error(401, "bad key")]) as server:
        with pytest.raises(RequestFailed) as info:
            ask(server, max_retries=5)
        assert server.count == 2
    assert info.value.refused and info.value.attempts == 2 and "AuthenticationError 401" in str(info.value)


def test_501_not_implemented_is_refused_at_once_and_503_is_retried():
    """A server without the route (a plain HTTP server answers 501 to POST) is not asked again; a busy one is."""
    with ScriptedOpenAI([api_error(501, "Unsupported method ('POST')")] * 3) as server:
        with pytest.raises(RequestFailed) as info:
            ask(server, max_retries=5)
        assert server.count == 1
    assert info.value.refused and info.value.attempts == 1 and "501" in str(info.value)
    with ScriptedOpenAI([api_error(503)] * 3) as server:
        with pytest.raises(RequestFailed):
            ask(server, max_retries=2)
        assert server.count == 3


def test_a_good_reply_after_retries_is_returned():
    good = Reply(json=chat_completion("fine"))
    with ScriptedOpenAI([api_error(503), NO_CHOICES, api_error(429, headers={"Retry-After": "0"}), good]) as server:
        reply = ask(server, max_retries=3)
        assert server.count == 4
    assert reply.choices[0].message.content == "fine"

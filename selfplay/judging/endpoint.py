"""The judge over any OpenAI-compatible endpoint (OpenAI, `vllm serve`, SGLang, TGI, llama.cpp server, ...).

Async `openai` client (`selfplay.serving.openai_client`), at most `max_concurrency` requests in flight; both orders of a
pair go out concurrently. 429, 5xx, timeouts, connection errors and malformed replies are retried (the client's
own backoff, waiting what `Retry-After` asks). A call still failing after that becomes a result with `error` set
(the judge stage records it as `judge_error`): never a dropped pair, never a label.

Verdict modes, in the order `mode: auto` tries them (see `replies.py`): `logprobs`, `choice`, `text`. Given what
the endpoint was probed to honour (`selfplay.serving.probe`, before any work starts), `auto` uses only the modes
that work there, best first: a server without logprobs or structured output is asked in text mode from the first
call, for the verdict marker alone (`MARKER_TOKENS`), or for reasoning ending in one when `reasoning_tokens` is
set. Without a probe, when the endpoint does not give what a mode needs (no logprobs; a 400 for the
structured-output request), the judge moves to the next mode for this and every later call; when one reply has no
label in its logprobs or breaks the schema, only that call tries the next mode. Each result records the mode that produced it; a reply read as `invalid`
keeps its raw text in `extra["reply"]`, so the judge stage can quote what the endpoint said.

The API key is read once (`openai_client.resolve_api_key`: an environment variable or a Prefect Secret block),
handed to the client, and never logged or stored.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import openai

from selfplay.config.backends import EndpointConfig
from selfplay.judging.cache import JudgeCache, call_key
from selfplay.judging.calls import JudgeCall, JudgeResult
from selfplay.judging.replies import CHOICE_SCHEMA, MARKER_TOKENS, MODE_INSTRUCTIONS, MODES, P_OF_LABEL, label_probabilities, parse_choice, parse_text_verdict
from selfplay.serving.openai_client import RequestFailed, async_client, chat, describe, resolve_api_key, run_sync, ticking, watched
from selfplay.serving.probe import CHOICE_TOKENS, TOP_LOGPROBS, Capabilities

PROGRESS_EVERY_S = 5.0  # a streaming judge reports progress this often, however slow each call is


class _ModeUnsupported(Exception):
    """The endpoint does not give what this mode needs: use the next mode from now on."""


class _NoVerdictInReply(Exception):
    """This one reply carries no usable verdict in this mode: try the next mode for this call only."""

    def __init__(self, message: str, spent: dict | None = None, reply: str = ""):
        super().__init__(message)
        self.spent = spent or {}
        self.reply = reply


# Words by which a 400 says a mode's feature is unsupported, rather than this one request being bad.
_MODE_FEATURES = {"logprobs": ("logprob",), "choice": ("response_format", "json_schema", "schema", "structured", "guided")}


def _about_mode(exc: Exception, mode: str) -> bool:
    message = str(exc).lower()
    return any(word in message for word in _MODE_FEATURES.get(mode, ()))


class OpenAIJudge:
    def __init__(self, endpoint: EndpointConfig, mode: str = "auto", cache: JudgeCache | None = None, api_key: str | None = None,
                 watch: Callable[[], str | None] | None = None, caps: Capabilities | None = None, reasoning_tokens: int = 0):
        """`watch`: for a server this process started (`ModelServer.problem`), asked every second whether it is still
        alive; when it is not, judging stops at once with `ServerDied` naming the cause (see `openai_client.watched`).
        `caps`: what the endpoint was probed to honour (the modes `auto` uses, the requests kept in flight).
        `reasoning_tokens`: 0 asks text mode for the verdict marker alone; more asks for reasoning ending in one, in
        that budget."""
        self.endpoint = endpoint
        self._watch = watch
        self.configured_mode = mode
        self.reasoning_tokens = reasoning_tokens
        self._modes = caps.judge_modes(mode) if caps is not None else list(MODES) if mode == "auto" else [mode]
        self._in_flight = caps.in_flight(endpoint.max_concurrency) if caps is not None else endpoint.max_concurrency
        self._cache = cache
        self._api_key = api_key if api_key is not None else resolve_api_key(endpoint)

    def __repr__(self) -> str:  # no key in reprs, logs or tracebacks
        return f"OpenAIJudge(base_url={self.endpoint.base_url!r}, model={self.endpoint.model!r}, mode={self.configured_mode!r})"

    @property
    def modes(self) -> list[str]:
        """The modes this judge uses, best first (the first is the one every call starts with)."""
        return list(self._modes)

    # ---------------------------------------------------------------- public

    streams = True  # judging.judge_comparisons hands it every call at once

    def judge(self, calls: list[JudgeCall], progress: Callable[[int, int], None] | None = None,
              every_s: float = PROGRESS_EVERY_S) -> list[JudgeResult]:
        """All calls through one pool of `max_concurrency` requests in flight, each slot refilled as its call ends
        (no barrier between batches); one result per call, in order. `progress(done, total)` every `every_s`
        seconds and once at the end."""
        return run_sync(self._judge_all(calls, progress, every_s))

    def close(self) -> None:
        if self._cache is not None:
            self._cache.close()

    # ---------------------------------------------------------------- internals

    async def _judge_all(self, calls: list[JudgeCall], progress=None, every_s: float = PROGRESS_EVERY_S) -> list[JudgeResult]:
        limit = asyncio.Semaphore(self._in_flight)
        done = 0

        async def tracked(client, call: JudgeCall) -> JudgeResult:
            nonlocal done
            result = await self._one(client, limit, call)
            done += 1
            return result

        report = (lambda: progress(done, len(calls))) if progress is not None else None
        async with async_client(self.endpoint.base_url, self._api_key, timeout=self.endpoint.timeout,
                                max_retries=self.endpoint.max_retries) as client:
            results = list(await watched(ticking(asyncio.gather(*(tracked(client, call) for call in calls)), report, every_s), self._watch))
        if progress is not None:
            progress(len(calls), len(calls))
        return results

    async def _one(self, client, limit: asyncio.Semaphore, call: JudgeCall) -> JudgeResult:
        # keyed by the mode every call starts with (what `auto` means depends on the server), and text's budget
        mode = self._modes[0] + (f"+reasoning{self.reasoning_tokens}" if self._modes[0] == "text" and self.reasoning_tokens else "")
        key = call_key(self.endpoint.model, mode, call.system, call.user, self.endpoint.base_url)
        if self._cache is not None and (hit := self._cache.get(key)) is not None:
            return JudgeResult(**{**hit, "cached": True, "cost": 0.0, "latency_s": 0.0})
        tried, spent, reply = [], {"tokens_in": 0, "tokens_out": 0, "cost": 0.0}, ""
        for mode in list(self._modes):
            if mode not in self._modes and tried:
                continue  # demoted by another call meanwhile
            try:
                result = await self._ask(client, limit, call, mode)
            except _ModeUnsupported as exc:
                tried.append(f"{mode}: {exc}")
                if mode in self._modes and len(self._modes) > 1:
                    self._modes.remove(mode)
                continue
            except _NoVerdictInReply as exc:
                tried.append(f"{mode}: {exc}")
                for field, value in exc.spent.items():  # that reply was paid for too
                    spent[field] += value
                reply = exc.reply
                continue
            except _GaveUp as exc:
                return JudgeResult(None, mode, error=str(exc), tokens_in=exc.tokens_in, latency_s=exc.latency)
            result.tokens_in += spent["tokens_in"]
            result.tokens_out += spent["tokens_out"]
            result.cost += spent["cost"]
            if self._cache is not None:
                self._cache.put(key, {k: v for k, v in result.__dict__.items() if k not in ("cached", "extra")})
            return result
        if tried and all("no verdict" in t for t in tried):
            last_mode = tried[-1].split(":", 1)[0]
            return JudgeResult(0.5, last_mode, label="invalid", extra={"tried": tried, "reply": reply}, **spent)
        return JudgeResult(None, self._modes[-1], error="no verdict mode works with this endpoint: " + "; ".join(tried))

    def _request(self, call: JudgeCall, mode: str) -> dict[str, Any]:
        asked = "reasoning" if mode == "text" and self.reasoning_tokens else mode
        messages = [{"role": "system", "content": call.system}, {"role": "user", "content": call.user + MODE_INSTRUCTIONS[asked]}]
        params: dict[str, Any] = {"model": self.endpoint.model, "messages": messages, "temperature": 0.0}
        if mode == "logprobs":
            params.update(max_tokens=1, logprobs=True, top_logprobs=TOP_LOGPROBS)
        elif mode == "choice":
            params.update(max_tokens=CHOICE_TOKENS, response_format=CHOICE_SCHEMA)
        else:
            params.update(max_tokens=self.reasoning_tokens or MARKER_TOKENS)
        return params

    async def _ask(self, client, limit: asyncio.Semaphore, call: JudgeCall, mode: str) -> JudgeResult:
        started = time.perf_counter()
        try:
            async with limit:
                reply = await chat(client, max_retries=self.endpoint.max_retries, **self._request(call, mode))
        except RequestFailed as failed:
            exc, spent = failed.error, time.perf_counter() - started
            if isinstance(exc, openai.BadRequestError):
                if _about_mode(exc, mode):
                    raise _ModeUnsupported(describe(exc)) from None
                raise _GaveUp(f"{describe(exc)} (the endpoint refused this request)", 0, spent) from None
            raise _GaveUp(str(failed), 0, spent) from None
        return self._read(reply, mode, time.perf_counter() - started)

    def _read(self, reply, mode: str, latency: float) -> JudgeResult:
        usage = getattr(reply, "usage", None)
        tokens_in = int(getattr(usage, "prompt_tokens", 0) or 0)
        tokens_out = int(getattr(usage, "completion_tokens", 0) or 0)
        cost = (tokens_in * self.endpoint.price_input_per_mtok + tokens_out * self.endpoint.price_output_per_mtok) / 1e6
        spent = dict(tokens_in=tokens_in, tokens_out=tokens_out, cost=cost)
        common = dict(spent, latency_s=latency)
        choice = reply.choices[0]
        content = choice.message.content if choice.message else None
        raw = self._redact(content or "")
        if mode == "logprobs":
            lp = getattr(choice, "logprobs", None)
            if lp is None or not lp.content:
                raise _ModeUnsupported("the endpoint returned no logprobs")
            top = [(t.token, t.logprob) for t in (lp.content[0].top_logprobs or [])] or [(lp.content[0].token, lp.content[0].logprob)]
            mass_a, mass_b = label_probabilities(top)
            if mass_a + mass_b <= 0:
                raise _NoVerdictInReply(f"no verdict: no A/B label among the top logprobs (first token {lp.content[0].token!r})", spent,
                                        raw or self._redact(lp.content[0].token))
            return JudgeResult(mass_a / (mass_a + mass_b), "logprobs", label_mass=mass_a + mass_b, **common)
        if mode == "choice":
            label = parse_choice(content)
            if label is None:
                raise _NoVerdictInReply(f"no verdict: reply is not the structured choice ({raw[:60]!r})", spent, raw)
            return JudgeResult(P_OF_LABEL[label], "choice", label=label, **common)
        label = parse_text_verdict(content, bare=not self.reasoning_tokens)
        return JudgeResult(P_OF_LABEL.get(label, 0.5), "text", label=label, extra={"reply": raw} if label == "invalid" else {}, **common)

    def _redact(self, text: str) -> str:
        """A reply may echo anything, even the key it was asked with: never let it carry the key into a message."""
        return text.replace(self._api_key, "[api key]") if len(self._api_key) >= 8 else text


class _GaveUp(Exception):
    def __init__(self, message: str, tokens_in: int, latency: float):
        super().__init__(message)
        self.tokens_in, self.latency = tokens_in, latency


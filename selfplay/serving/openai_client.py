"""One way to talk to an OpenAI-compatible server (OpenAI, `vllm serve`, SGLang, TGI, llama.cpp server, ...), for
the judge and the sampler alike: the API key, the client and its retries, and a bridge from sync code.

- The key (`resolve_api_key`) comes from a Prefect Secret block or an environment variable; it is handed to the
  client and never logged, stored, or put in a message.
- Retries are the `openai` client's own (`max_retries`): 408, 409, 429, 5xx, timeouts and connection errors, with
  exponential backoff and jitter, waiting what `Retry-After` asks (a wish beyond two minutes is not retried). The
  one thing the client does not retry, a 200 reply that is not a usable completion (a body that is not JSON, no
  choices, fewer choices than asked for), `chat` retries itself, from the same budget: `max_retries + 1`
  attempts in all, then `RequestFailed`, which says how many were made.
- `run_sync` runs a coroutine from sync code, also inside a running event loop (an async flow, where it runs in a
  thread of its own), and raises what the coroutine raised.

    client = async_client(base_url, api_key, timeout=60.0, max_retries=6)
    reply = await chat(client, max_retries=6, model="judge", messages=[{"role": "user", "content": "Hi"}])

    samples = sample_chat(base_url, "policy", prompts, n=4, temperature=0.9, top_p=0.95, max_tokens=256, seed=1)
    # samples[i][j] == {"response": str, "n_tokens": int, "truncated": bool}
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
from collections.abc import Callable, Coroutine
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, TypeVar

from selfplay.errors import SelfplayError

if TYPE_CHECKING:
    import openai

    from selfplay.config.backends import EndpointConfig

__all__ = ["EndpointError", "RequestFailed", "SamplingError", "ServerDied", "watched", "resolve_api_key", "check_endpoint", "async_client", "chat",
           "describe", "run_sync", "request_seed", "asample_chat", "sample_chat"]

T = TypeVar("T")

# One INFO line per HTTP request ("HTTP Request: POST ... 200 OK") is thousands a judge stage: keep the clients'
# request logs out of the run log (their warnings and errors still reach it).
for _name in ("httpx", "httpx2", "httpcore", "openai"):  # openai 2 sends through its own fork, httpx2
    logging.getLogger(_name).setLevel(max(logging.getLogger(_name).level, logging.WARNING))
# Pause before asking again after a 200 reply that was not a usable completion (the client's backoff covers the rest).
MALFORMED_RETRY_DELAY_S = 0.5


class EndpointError(SelfplayError, RuntimeError):
    """The endpoint cannot be used at all (unreachable, key rejected): said before any work starts."""


# ---------------------------------------------------------------- key

def resolve_api_key(endpoint: EndpointConfig) -> str:
    """The API key from a Prefect Secret block or an environment variable; 'EMPTY' for local servers without one."""
    if endpoint.api_key_secret:
        from prefect.blocks.system import Secret

        try:
            return Secret.load(endpoint.api_key_secret).get()
        except ValueError as exc:
            raise EndpointError(f"judge.endpoint.api_key_secret: cannot load Prefect Secret block {endpoint.api_key_secret!r}: {exc}") from None
    openai_api = "api.openai.com" in endpoint.base_url
    # OPENAI_API_KEY goes to OpenAI only: another host gets a key only when api_key_env names one.
    variable = endpoint.api_key_env or ("OPENAI_API_KEY" if openai_api else None)
    if variable and os.environ.get(variable):
        return os.environ[variable]
    if openai_api:
        raise EndpointError(f"no API key for {endpoint.base_url}: set the environment variable {variable} or endpoint.api_key_secret")
    return "EMPTY"  # vLLM and most local servers accept any key


def check_endpoint(endpoint: EndpointConfig, api_key: str) -> None:
    """Fail fast, with what to fix, when the endpoint is unreachable or refuses the key."""
    import httpx

    url = endpoint.base_url.rstrip("/") + "/models"
    try:
        reply = httpx.get(url, headers={"Authorization": f"Bearer {api_key}"}, timeout=min(endpoint.timeout, 10.0))
    except httpx.HTTPError as exc:
        raise EndpointError(f"judge endpoint {endpoint.base_url} is unreachable ({exc.__class__.__name__}: {exc}); start the server or "
                            f"fix judge.endpoint.base_url") from None
    if reply.status_code == 200:
        try:
            served = [m.get("id") for m in reply.json().get("data", [])]
        except (ValueError, AttributeError):
            served = []
        if served and endpoint.model not in served:
            raise EndpointError(f"{endpoint.base_url} does not serve model {endpoint.model!r} (it serves: {', '.join(map(str, served[:10]))}); "
                                f"fix the endpoint's model")
    if reply.status_code in (401, 403):
        source = (f"Prefect Secret {endpoint.api_key_secret!r}" if endpoint.api_key_secret
                  else f"${endpoint.api_key_env}" if endpoint.api_key_env else "judge.endpoint.api_key_env / api_key_secret (none is set)")
        raise EndpointError(f"judge endpoint {endpoint.base_url} rejected the API key ({reply.status_code}); check {source}")


# ---------------------------------------------------------------- requests

# HTTP attempts of the `chat` call running in this task: the client's request hook counts them.
_attempts: ContextVar[list[int] | None] = ContextVar("selfplay_openai_attempts", default=None)


async def _count_attempt(request: Any) -> None:
    counter = _attempts.get()
    if counter is not None:
        counter[0] += 1


NEVER_RETRIED = (501, 505)  # 5xx answers no retry changes: 501 Not Implemented (a server without the route), 505


def async_client(base_url: str, api_key: str, *, timeout: float, max_retries: int) -> openai.AsyncOpenAI:
    """An `openai.AsyncOpenAI` that retries as the client does (but never a NEVER_RETRIED status), up to
    `max_retries` times, and lets `chat` count its attempts. Use it as `async with`: that closes its connections."""
    import openai

    class Client(openai.AsyncOpenAI):
        def _should_retry(self, response) -> bool:
            return response.status_code not in NEVER_RETRIED and super()._should_retry(response)

    return Client(base_url=base_url, api_key=api_key, timeout=timeout, max_retries=max_retries,
                  http_client=openai.DefaultAsyncHttpxClient(event_hooks={"request": [_count_attempt]}))


def describe(exc: BaseException) -> str:
    """'RateLimitError 429: <the message, cut at 200 characters>'."""
    status = getattr(exc, "status_code", None)
    return f"{exc.__class__.__name__}{f' {status}' if status else ''}: {str(exc)[:200]}"


class MalformedReply(Exception):
    """A 200 reply that is not a usable chat completion."""


class RequestFailed(Exception):
    """No attempt gave a usable reply. `error`: the last attempt's exception; `attempts`: how many were made; `refused`: the server
    answered with a status never retried (a 4xx other than 408/409/429: the request is wrong; NEVER_RETRIED) before the budget was spent."""

    def __init__(self, error: BaseException, attempts: int, refused: bool, timeout: float | None = None):
        import openai

        timed_out = isinstance(error, openai.APITimeoutError) and timeout is not None
        per = f"; the last attempt timed out after {timeout:g} s, which counts the time a request waits in the server's queue" if timed_out else ""
        super().__init__(describe(error) + ("" if refused else f" (gave up after {attempts} attempts{per})"))
        self.error, self.attempts, self.refused, self.timed_out = error, attempts, refused, timed_out


def _seconds(timeout: Any) -> float | None:
    """A client's time-out in seconds (a float, or an httpx.Timeout's read time-out)."""
    return float(timeout) if isinstance(timeout, (int, float)) else getattr(timeout, "read", None)


def _has_choices(reply: Any) -> str | None:
    return None if getattr(reply, "choices", None) else f"a 200 reply without choices: {str(reply)[:120]}"


async def chat(client: openai.AsyncOpenAI, *, max_retries: int, check: Callable[[Any], str | None] = _has_choices,
               **request: Any) -> Any:
    """One chat completion (`request` as for `client.chat.completions.create`), at most `max_retries + 1` attempts.

    `check(reply)` says what is wrong with a 200 reply (None: nothing); such a reply, and a body that is not JSON,
    is asked for again. Raises `RequestFailed` when no attempt succeeded.
    """
    import openai

    counter = [0]
    token = _attempts.set(counter)
    try:
        rounds = 0
        while True:
            rounds += 1
            try:
                remaining = max(0, max_retries - max(counter[0], rounds - 1))
                this = client if remaining == client.max_retries else client.with_options(max_retries=remaining)
                reply = await this.chat.completions.create(**request)
                problem: BaseException | None = None if (why := check(reply)) is None else MalformedReply(why)
            except (openai.APIResponseValidationError, json.JSONDecodeError) as exc:
                problem = exc
            except openai.APIError as exc:
                made = max(counter[0], rounds)
                status = getattr(exc, "status_code", None) if isinstance(exc, openai.APIStatusError) else None
                refused = status is not None and status not in (408, 409, 429) and (status < 500 or status in NEVER_RETRIED)  # never retried
                raise RequestFailed(exc, made, refused, _seconds(client.timeout)) from exc
            if problem is None:
                return reply
            made = max(counter[0], rounds)  # without the counting hook (another client), one per round
            if made >= max_retries + 1:
                raise RequestFailed(problem, made, refused=False, timeout=_seconds(client.timeout)) from problem
            await asyncio.sleep(MALFORMED_RETRY_DELAY_S)
    finally:
        _attempts.reset(token)


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` to completion from sync code and return its value, or raise the exception it raised.

    Inside a running event loop (an async Prefect flow) `asyncio.run` is not allowed, so it runs in a loop of its
    own in a separate thread, and its exception, whatever it is, is raised again here.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["out"] = asyncio.run(coro)
        except BaseException as exc:  # noqa: BLE001 - raised again in the caller's thread
            box["err"] = exc

    thread = threading.Thread(target=run, name="selfplay-openai-sync")
    thread.start()
    thread.join()
    if "err" in box:
        raise box["err"]
    return box["out"]


class ServerDied(SelfplayError, RuntimeError):
    """The server being asked died (its process exited, or its engine is dead) while requests were in flight."""


async def watched(work: Coroutine[Any, Any, T], watch: Callable[[], str | None] | None, every_s: float = 1.0) -> T:
    """Await `work`, asking `watch()` every `every_s` seconds meanwhile whether the server behind it is still alive
    (None: it is; else why not). When it is not, `work` is cancelled at once and `ServerDied` raised with that reason:
    a dead engine fails the stage at once with its cause, not "Connection error" after every retry of every request."""
    if watch is None:
        return await work
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=every_s)
            if done:
                return task.result()
            why = await asyncio.to_thread(watch)
            if why is not None:
                raise ServerDied(why)
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def ticking(work: Coroutine[Any, Any, T], report: Callable[[], None] | None, every_s: float) -> T:
    """Await `work`, calling `report()` every `every_s` seconds meanwhile: progress shows however slow each request
    is (a server that answers one request at a time, a long generation), not only when one ends."""
    if report is None:
        return await work
    return await watched(work, lambda: report(), every_s)  # a watch that never says the server died: a ticker


# ---------------------------------------------------------------- sampling


class SamplingError(SelfplayError, RuntimeError):
    """A prompt's request failed after its retries, or was refused (4xx other than 408/409/429)."""


def request_seed(seed: int, index: int, n: int) -> int:
    """The seed of prompt `index`'s request for `n` choices: `seed + index * n`. vLLM gives choice j of a request
    seeded s the seed s + j (its parallel sampling), so prompt i's choices draw seeds seed + i*n ... seed + i*n + n-1:
    no two (prompt, choice) pairs share one. (`seed + index` would give prompt i's choice j and prompt i+1's choice
    j-1 the same stream.)

    >>> sorted(request_seed(7, i, 3) + j for i in range(3) for j in range(3)) == list(range(7, 16))
    True
    """
    return seed + index * n


def _split_tokens(total: int | None, texts: list[str]) -> list[int]:
    """Per-choice token counts: the reported total split in proportion to word counts (largest remainder).

    With one choice this is exact; without a reported total it is the word count itself.
    """
    words = [len(t.split()) for t in texts]
    if total is None or total < 0:
        return words
    weights = words if sum(words) > 0 else [1] * len(texts)
    shares = [total * w / sum(weights) for w in weights]
    counts = [int(s) for s in shares]
    for i in sorted(range(len(texts)), key=lambda i: shares[i] - counts[i], reverse=True)[: total - sum(counts)]:
        counts[i] += 1
    return counts


async def asample_chat(
    base_url: str,
    model: str,
    prompts: list[str],
    *,
    n: int,
    temperature: float,
    top_p: float,
    max_tokens: int,
    seed: int | None,
    max_concurrency: int = 64,
    api_key: str = "EMPTY",
    timeout: float = 600.0,
    system: str | None = None,
    max_retries: int = 5,
    exact_tokens: bool = False,
    extra_body: dict | None = None,
    watch: Callable[[], str | None] | None = None,
    choices_per_request: bool = True,
    progress: Callable[[int, int], None] | None = None,
    every_s: float = 5.0,
) -> list[list[dict]]:
    """The async form of `sample_chat` (same arguments, same result)."""
    if n < 1 or max_concurrency < 1:
        raise ValueError("n and max_concurrency must be at least 1")
    limit = asyncio.Semaphore(max_concurrency)
    finished = [0]

    async def ask(client: openai.AsyncOpenAI, index: int, prompt: str, choices: int, request_seed_: int | None) -> list[dict]:
        def n_choices(reply: Any) -> str | None:
            got = len(reply.choices or [])
            return None if got == choices else f"asked for {choices} choices, got {got}"

        messages = ([{"role": "system", "content": system}] if system is not None else []) + [{"role": "user", "content": prompt}]
        request: dict[str, Any] = dict(model=model, messages=messages, n=choices, temperature=temperature, top_p=top_p,
                                       max_tokens=max_tokens)
        if request_seed_ is not None:
            request["seed"] = request_seed_
        if exact_tokens:
            request["logprobs"] = True
        if extra_body:
            request["extra_body"] = extra_body
        try:
            async with limit:
                reply = await chat(client, max_retries=max_retries, check=n_choices, **request)
        except RequestFailed as failed:
            exc = failed.error
            if failed.refused:
                body = getattr(exc, "body", None)
                said = body if isinstance(body, str) and body not in str(exc) else ""  # vLLM's 401 body: {"error": "Unauthorized"}
                hint = ("; it wants another API key (the server's --api-key or VLLM_API_KEY; the endpoint's api_key_env or "
                        "api_key_secret)") if exc.status_code in (401, 403) else ""
                raise SamplingError(f"prompt {index}: the server refused the request ({exc.status_code}): "
                                    f"{str(exc)[:300]}{f' ({said})' if said else ''}{hint}") from exc
            slow = (f" The last attempt timed out after {timeout:g} s (the endpoint's timeout), which counts the time a request waits "
                    f"in the server's queue: for a slow server, raise the timeout or lower max_concurrency.") if failed.timed_out else ""
            raise SamplingError(f"prompt {index}: failed after {failed.attempts} attempts: "
                                f"{type(exc).__name__}: {str(exc)[:300]}{slow}") from exc
        choices = sorted(reply.choices, key=lambda c: c.index)
        texts = [(c.message.content or "").strip() if c.message else "" for c in choices]
        total = getattr(reply.usage, "completion_tokens", None) if reply.usage else None
        counts = _split_tokens(total, texts)
        if exact_tokens:
            counts = [len(c.logprobs.content) if c.logprobs and c.logprobs.content is not None else k
                      for c, k in zip(choices, counts)]
        return [{"response": t, "n_tokens": int(k), "truncated": c.finish_reason == "length"}
                for t, k, c in zip(texts, counts, choices)]

    async def one(client: openai.AsyncOpenAI, index: int, prompt: str) -> list[dict]:
        first = None if seed is None else request_seed(seed, index, n)
        if choices_per_request:
            out = await ask(client, index, prompt, n, first)
        else:  # a server that ignores n: n single-choice requests, choice j seeded as vLLM seeds choice j of one request
            parts = [asyncio.ensure_future(ask(client, index, prompt, 1, None if first is None else first + j)) for j in range(n)]
            try:
                out = [choice for part in await asyncio.gather(*parts) for choice in part]
            except BaseException:  # one failed (or all were cancelled): none of its siblings outlives it
                for part in parts:
                    part.cancel()
                await asyncio.gather(*parts, return_exceptions=True)
                raise
        finished[0] += 1
        return out

    async def every(client: openai.AsyncOpenAI) -> list[list[dict]]:
        tasks = [asyncio.ensure_future(one(client, i, p)) for i, p in enumerate(prompts)]
        if not tasks:
            return []
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for task in tasks:
                task.cancel()  # a no-op on finished ones; after a failure, or the watchdog's cancellation, the rest stop
            await asyncio.gather(*tasks, return_exceptions=True)
        failures = [task.exception() for task in tasks if task in done]  # retrieves every one: no stray warnings
        for exc in failures:  # the first failure in prompt order
            if exc is not None:
                raise exc
        return [task.result() for task in tasks]

    report = (lambda: progress(finished[0], len(prompts))) if progress is not None else None
    async with async_client(base_url, api_key, timeout=timeout, max_retries=max_retries) as client:
        out = await watched(ticking(every(client), report, every_s), watch)
    if progress is not None:
        progress(len(prompts), len(prompts))
    return out


def sample_chat(
    base_url: str,
    model: str,
    prompts: list[str],
    *,
    n: int,
    temperature: float,
    top_p: float,
    max_tokens: int,
    seed: int | None,
    max_concurrency: int = 64,
    api_key: str = "EMPTY",
    timeout: float = 600.0,
    system: str | None = None,
    max_retries: int = 5,
    exact_tokens: bool = False,
    extra_body: dict | None = None,
    watch: Callable[[], str | None] | None = None,
    choices_per_request: bool = True,
    progress: Callable[[int, int], None] | None = None,
    every_s: float = 5.0,
) -> list[list[dict]]:
    """`n` sampled chat completions per prompt from an OpenAI-compatible server; callable from sync code.

    One request per prompt (`messages` = [system?, user], `n=n`, `seed=seed + index * n`, see `request_seed`: no two
    choices of any two prompts share a random stream, and a rerun asks for exactly the same thing), at most `max_concurrency` in flight. What the
    client retries (429, 5xx, timeouts, connection errors) and replies without `n` choices are retried up to
    `max_retries` times; a prompt still failing, or a 4xx, raises `SamplingError`. `extra_body` carries
    server-specific sampling options (vLLM: top_k, min_p, ...).

    Returns, per prompt in order, `n` dicts in choice order: `response` (the text, stripped), `truncated`
    (finish_reason == "length") and `n_tokens`. OpenAI-compatible servers report only the total completion tokens
    of a request, so `n_tokens` is exact when n == 1 and otherwise that total split across the choices in
    proportion to their word counts (an estimate on the token scale, summing to the reported total); a server
    reporting no usage gives the word count `len(text.split())`. With `exact_tokens=True` each choice's token
    count is read from per-token logprobs requested for it (exact, at the cost of a larger reply).

    `watch`, where the caller owns the server (`ModelServer.problem`), is asked every second whether the server is
    still alive: when it is not, every request is cancelled and `ServerDied` says why (see `watched`).

    `choices_per_request=False`, for a server that ignores `n` (`selfplay.serving.probe`): `n` requests of one
    choice per prompt, choice j seeded `seed + index * n + j` (the seed vLLM gives choice j of the one request), each
    one's token count exact from its usage. `progress(prompts done, prompts)` every `every_s` seconds while requests
    are in flight, however slow each one is, and once at the end.

    Callable inside a running event loop too (see `run_sync`); async code may await `asample_chat` instead.
    """
    return run_sync(asample_chat(
        base_url, model, prompts, n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed,
        max_concurrency=max_concurrency, api_key=api_key, timeout=timeout, system=system, max_retries=max_retries,
        exact_tokens=exact_tokens, extra_body=extra_body, watch=watch, choices_per_request=choices_per_request, progress=progress, every_s=every_s))

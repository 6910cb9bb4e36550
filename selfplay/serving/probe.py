"""What an OpenAI-compatible server honours, found out before any work starts by asking it a few tiny requests.

Servers that speak the OpenAI chat API differ in what they do with its fields, and many ignore what they do not
support without a word (`transformers serve` ignores `n`, `logprobs`, `top_logprobs` and `response_format`, and
samples greedily at any temperature unless asked through its own `generation_config` field). A sampler or judge that
finds this out call by call pays for it on every call, or fails after minutes. `probe_endpoint` asks once:

    several choices per request   n=2: two choices back?
    sampling                      draws at temperature 1 with three seeds differ; if they do not, the same again with
                                  transformers' `generation_config: {"do_sample": true}` (`SAMPLE_BODIES`); then the
                                  two choices of one seeded request differ (else: one choice per request)
    seeds                         the same seed twice gives the same draw
    logprobs                      per-token logprobs, with top alternatives
    structured output             a JSON schema whose only allowed value no model would write unasked is obeyed
    concurrency                   four requests at once take about as long as one, or about four times as long
                                  (a server that answers one request at a time: `serial`)

    caps, probed = capabilities(endpoint, api_key, judging=True, logger=log, role="judge", mode="auto")  # then remembered
    caps.line("judge", "text")   # "judge endpoint ...: one choice per request (n ignored), ... -> judge mode text"
    caps.judge_modes("auto")   # ['text']: the modes that work for every call, best first

Each probe request asks for at most 16 tokens (48 for the structured one); a probe costs a few seconds on a CPU server (10 to 16 requests).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from selfplay.serving.openai_client import EndpointError, describe

# Room for a constrained JSON object: vLLM's grammar lets a small model spend tokens on whitespace and newlines
# ('{\n    "word"\n\n:\n\n"zq"' is 16 tokens and not yet closed); the grammar stops it at the closing brace.
CHOICE_TOKENS = 48

if TYPE_CHECKING:
    from selfplay.config.backends import EndpointConfig

log = logging.getLogger(__name__)

PROMPT = "Write one sentence about the sea."
SEED = 1234
# What a server may need in the body before it samples at all: transformers serve reads `do_sample` from the
# model's generation_config (greedy for most models) and takes overrides in a `generation_config` JSON string.
SAMPLE_BODIES = ({"generation_config": json.dumps({"do_sample": True})},)
# A schema whose only allowed value no model writes unasked: a reply that matches it was constrained.
STRUCTURED_PROBE = {
    "type": "json_schema",
    "json_schema": {"name": "probe", "strict": True, "schema": {
        "type": "object", "properties": {"word": {"type": "string", "enum": ["zq"]}}, "required": ["word"],
        "additionalProperties": False}},
}
# Four requests at once, the second done after SERIAL_SECOND and the last after SERIAL_RATIO times one request's
# time: the server answers them one by one (in turn they end at 1, 2, 3 and 4 times).
SERIAL_SECOND = 1.6
SERIAL_RATIO = 3.0
TOP_LOGPROBS = 20  # OpenAI's maximum, what the judge's logprobs mode asks for
SERIAL_IN_FLIGHT = 2  # requests kept in flight to a serial server: one served, one queued behind it
REMEMBER_S = 3600.0


@dataclass
class Capabilities:
    """What one endpoint (base_url, model) honours; None: not asked (only what the sampler or judge needs is)."""

    base_url: str
    model: str
    server: str = "unknown"  # who answers, as /v1/models' owned_by says (vllm, llamacpp, openai, ...)
    choices: bool | None = None  # several choices per request (n)
    samples: bool | None = None  # draws at temperature 1 with different seeds differ
    sample_body: dict = field(default_factory=dict)  # what the body needs for that (empty: nothing)
    seeds: bool | None = None  # the same seed gives the same draw
    logprobs: bool | None = None  # per-token logprobs
    top_logprobs: bool | None = None  # ... with alternatives
    structured: bool | None = None  # response_format json_schema is obeyed
    serial: bool | None = None  # answers one request at a time
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)  # why a feature counts as missing, where a reply said
    draws: list[str] = field(default_factory=list)  # the same text at three seeds, when it does not sample
    asked: list[str] = field(default_factory=list)  # what the probe asked about: "sampling", "judging"

    def judge_modes(self, configured: str = "auto") -> list[str]:
        """The verdict modes that work with this endpoint for every call, best first (`auto`), or the configured one;
        raises EndpointError when the configured mode cannot work here."""
        works = {"logprobs": bool(self.logprobs), "choice": bool(self.structured), "text": True}
        if configured != "auto":
            if not works[configured]:
                need = "per-token logprobs" if configured == "logprobs" else "structured output (response_format json_schema)"
                raise EndpointError(f"judge.mode {configured!r}: {self.base_url} does not honour {need} (probed: {self.summary()}); "
                                    f"use judge.mode auto or text")
            return [configured]
        order = ("logprobs", "choice", "text") if self.top_logprobs else ("choice", "logprobs", "text")  # one token's logprob alone is
        return [mode for mode in order if works[mode]]                                               # a hard 0/1

    def in_flight(self, configured: int) -> int:
        """Requests to keep in flight: at most `SERIAL_IN_FLIGHT` to a server that answers one at a time (more only wait
        in its queue, where each one's time-out is running)."""
        return min(configured, SERIAL_IN_FLIGHT) if self.serial else configured

    def summary(self) -> str:
        def said(flag: bool | None, yes: str, no: str) -> str | None:
            return None if flag is None else yes if flag else no

        parts = [
            said(self.choices, "several choices per request", "one choice per request (n ignored)"),
            said(self.samples, "samples" + (f" (with {json.dumps(self.sample_body)})" if self.sample_body else ""),
                 "does not sample (the same text at any seed)"),
            said(self.seeds, "seeded", "seeds ignored") if self.samples else None,
            said(self.logprobs, "logprobs" + ("" if self.top_logprobs else " (without alternatives)"), "no logprobs"),
            said(self.structured, "structured output", "no structured output"),
            said(self.serial, "one request at a time", "concurrent requests"),
        ]
        return ", ".join(p for p in parts if p)

    def line(self, role: str, mode: str | None = None, max_concurrency: int | None = None) -> str:
        """One line for the log: what was found, and what the sampler or judge does about it."""
        what = f"{role} endpoint {self.base_url} (model {self.model!r}, server {self.server}): {self.summary()}"
        acts = []
        if mode is not None:
            acts.append(f"judge mode {mode}")
        if max_concurrency is not None and self.in_flight(max_concurrency) < max_concurrency:
            acts.append(f"{self.in_flight(max_concurrency)} requests in flight, not {max_concurrency}")
        return what + (f" -> {'; '.join(acts)}" if acts else "") + f" (probed in {self.seconds:.1f} s)"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


_remembered: dict[tuple[str, str], tuple[Capabilities, float]] = {}
_lock = threading.Lock()


def capabilities(endpoint: EndpointConfig, api_key: str, *, sampling: bool = False, judging: bool = False,
                 logger: logging.Logger | None = None, role: str = "endpoint", mode: str | None = None) -> tuple[Capabilities, bool]:
    """`probe_endpoint`, remembered in this process for an hour per (base_url, model): the run's preflight probes, its
    stages reuse the answer (a remembered probe that did not ask what is asked now is asked again). Returns
    (capabilities, whether it was probed now); a fresh probe is logged in one line on `logger`."""
    key = (public_url(endpoint.base_url), endpoint.model)
    with _lock:
        hit = _remembered.get(key)
    if hit is not None:
        caps = hit[0]
        if time.monotonic() - hit[1] < REMEMBER_S and (not sampling or "sampling" in caps.asked) and (not judging or "judging" in caps.asked):
            return caps, False
        # asked again: for everything asked before too, so that a stage and the next do not take turns at it
        sampling, judging = sampling or "sampling" in caps.asked, judging or "judging" in caps.asked
    caps = probe_endpoint(endpoint, api_key, sampling=sampling, judging=judging)
    remember(caps)
    chosen = caps.judge_modes(mode)[0] if judging and mode is not None else None
    (logger or log).info("%s", caps.line(role, chosen, endpoint.max_concurrency))
    return caps, True


def remember(caps: Capabilities) -> None:
    """Take `caps` as what its endpoint honours, without asking it (a test double that stands for a known server)."""
    with _lock:
        _remembered[(caps.base_url, caps.model)] = caps, time.monotonic()


def remembered(endpoint: EndpointConfig) -> dict[str, Any] | None:
    """What this process last probed of `endpoint`, as a dict for a stage's metrics; None when it was not probed here."""
    with _lock:
        hit = _remembered.get((public_url(endpoint.base_url), endpoint.model))
    return hit[0].as_dict() if hit else None


def forget() -> None:
    """Drop every remembered probe (tests; a server that was restarted with other settings)."""
    with _lock:
        _remembered.clear()


def probe_endpoint(endpoint: EndpointConfig, api_key: str, *, sampling: bool = False, judging: bool = False) -> Capabilities:
    """Ask the endpoint what it honours (see the module's docstring): for `sampling`, choices per request, sampling,
    seeds, logprobs and concurrency; for `judging`, logprobs, structured output and concurrency. Raises EndpointError
    when it does not answer a plain chat completion."""
    import openai

    started = time.perf_counter()
    url = public_url(endpoint.base_url)
    caps = Capabilities(url, endpoint.model, server=_server_name(endpoint, api_key),
                        asked=[what for what, on in (("sampling", sampling), ("judging", judging)) if on])
    client = openai.OpenAI(base_url=endpoint.base_url, api_key=api_key, timeout=endpoint.timeout, max_retries=2)

    def ask(**kw: Any):
        return client.chat.completions.create(model=endpoint.model, messages=[{"role": "user", "content": kw.pop("prompt", PROMPT)}], **kw)

    def redacted(text: str) -> str:
        return text.replace(api_key, "[api key]") if len(api_key) >= 8 else text

    try:
        first = ask(max_tokens=8, temperature=0.0)
    except openai.APIError as exc:
        raise EndpointError(redacted(f"{url} does not answer a chat completion for model {endpoint.model!r}: {describe(exc)}; it must be "
                                     f"an OpenAI-compatible server (POST {url.rstrip('/')}/chat/completions)")) from None
    if not getattr(first, "choices", None):
        raise EndpointError(redacted(f"{url} answered a chat completion without choices ({str(first)[:120]}): it is not an OpenAI-compatible "
                                     f"chat server"))
    try:
        if sampling:
            _probe_sampling(caps, ask)
        caps.logprobs, caps.top_logprobs = _probe_logprobs(caps, ask)
        if judging:
            caps.structured = _probe_structured(caps, ask)
        caps.serial = _probe_serial(client.with_options(max_retries=0), endpoint.model)
    except openai.APIError as exc:
        raise EndpointError(redacted(f"{url}: a probe request failed: {describe(exc)}")) from None
    finally:
        client.close()
    caps.notes = [redacted(note) for note in caps.notes]
    caps.seconds = time.perf_counter() - started
    return caps


def public_url(url: str) -> str:
    """The URL without credentials or a query (a token may ride in either): what logs and metrics may show."""
    parts = urlsplit(url)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2], query="", fragment="").geturl()


def _server_name(endpoint: EndpointConfig, api_key: str) -> str:
    import httpx

    try:
        reply = httpx.get(endpoint.base_url.rstrip("/") + "/models", headers={"Authorization": f"Bearer {api_key}"},
                          timeout=min(endpoint.timeout, 10.0))
        owners = {str(m.get("owned_by")) for m in reply.json().get("data") or [] if m.get("owned_by")}
    except (httpx.HTTPError, ValueError, AttributeError, TypeError):
        return "unknown"
    return ", ".join(sorted(owners)) or "unknown"


def _texts(reply) -> list[str]:
    """Each choice's text; a reasoning model's `reasoning_content` counts (its `content` may be empty until it is done)."""
    out = []
    for choice in reply.choices or []:
        message = choice.message
        extra = getattr(message, "model_extra", None) or {}
        out.append((message.content or "") + str(extra.get("reasoning_content") or extra.get("reasoning") or "") if message else "")
    return out


def _text(reply) -> str:
    texts = _texts(reply)
    return texts[0] if texts else ""


def _refused(exc: Exception) -> bool:
    """A 4xx other than 408/409/429: the server will not take this request as it is."""
    status = getattr(exc, "status_code", None)
    return status is not None and 400 <= status < 500 and status not in (408, 409, 429)


def _probe_sampling(caps: Capabilities, ask) -> None:
    """Choices per request, then (with single-choice requests, as the sampler then sends them) sampling and seeds;
    last, whether the choices of one seeded request differ (a server may give them all the request's seed)."""
    import openai

    try:
        both = ask(n=2, temperature=1.0, top_p=1.0, max_tokens=16, seed=SEED)
        caps.choices = len(both.choices or []) == 2
    except openai.APIStatusError as exc:  # a server that refuses n > 1 (or n with a seed) outright
        if not _refused(exc):
            raise
        both, caps.choices = None, False
        caps.notes.append(f"n=2 refused: {describe(exc)}")
    for body in ({}, *SAMPLE_BODIES):
        try:
            draws = [_text(ask(temperature=1.0, top_p=1.0, max_tokens=16, seed=seed, extra_body=body or None))
                     for seed in (SEED, SEED, SEED + 1, SEED + 2)]
        except openai.APIStatusError as exc:  # a server that refuses the fields it does not know
            if not body or not _refused(exc):
                raise
            caps.notes.append(f"{json.dumps(body)} refused: {describe(exc)}")
            break
        if not any(draws):
            caps.notes.append("empty replies at temperature 1: whether it samples is unknown")
            return
        if len(set(draws[1:])) > 1 or draws[0] != draws[1]:
            caps.samples, caps.sample_body, caps.seeds = True, dict(body), draws[0] == draws[1]
            break
        caps.draws = draws[1:]
    if caps.samples is None:
        caps.samples = False
    if caps.samples and caps.choices and both is not None and len(set(_texts(both))) < 2:
        again = _texts(ask(n=2, temperature=1.0, top_p=1.0, max_tokens=16, seed=SEED + 3, extra_body=caps.sample_body or None))
        if len(set(again)) < 2:
            caps.choices = False
            caps.notes.append("the choices of one seeded request are the same text: one choice per request")


def _probe_logprobs(caps: Capabilities, ask) -> tuple[bool, bool]:
    import openai

    try:
        reply = ask(max_tokens=1, temperature=0.0, logprobs=True, top_logprobs=TOP_LOGPROBS)
    except openai.APIStatusError as exc:
        caps.notes.append(f"logprobs with top_logprobs={TOP_LOGPROBS} refused: {describe(exc)}")
        return False, False
    lp = getattr(reply.choices[0], "logprobs", None) if reply.choices else None
    content = getattr(lp, "content", None) or []
    if not content:
        return False, False
    return True, len(content[0].top_logprobs or []) > 1


def _probe_structured(caps: Capabilities, ask) -> bool:
    import openai

    try:
        reply = ask(prompt="Say hello.", max_tokens=CHOICE_TOKENS, temperature=0.0, response_format=STRUCTURED_PROBE)
    except openai.APIStatusError as exc:  # 400, or llama-cpp-python's 500 for a response_format type it does not know
        caps.notes.append(f"response_format refused: {describe(exc)}")
        return False
    try:
        return json.loads(_text(reply)) == {"word": "zq"}
    except ValueError:
        return False


def _probe_serial(client, model: str) -> bool:
    """Four identical requests at once against one alone (the faster of two), on connections opened beforehand. A
    server that serves them in turn finishes them at about 1, 2, 3 and 4 times one request's time; one that batches
    them, or serves them in parallel, all at about once (a slow straggler of a remote API moves only the last): serial
    when the second finishes after `SERIAL_SECOND` and the last after `SERIAL_RATIO` times one alone."""
    def timed(tokens: int = 8) -> float:
        started = time.perf_counter()
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}], max_tokens=tokens, temperature=0.0)
        return time.perf_counter() - started

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: timed(1), range(4)))  # four connections open, as many as the timed round needs
        alone = max(min(timed(), timed()), 0.02)
        ends = sorted(pool.map(lambda _: timed(), range(4)))
    return ends[1] > SERIAL_SECOND * alone and ends[3] > SERIAL_RATIO * alone

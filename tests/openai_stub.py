"""A FAKE OpenAI-compatible HTTP server for tests. It is not OpenAI and not vLLM.

It stands in for things that cannot run in the test environment: OpenAI's paid API and a real
`vllm serve` process. Every answer it gives is scripted by the test (or, in CLI mode, produced by a
trivial deterministic default); no model runs behind it. What *is* real: it is an actual HTTP server
(uvicorn + starlette) on loopback, so project code talks to it through the real `openai` client,
real sockets, real status codes, headers and retries.

In-process use::

    from tests.openai_stub import ScriptedOpenAI, Reply, chat_completion

    def handler(body: dict, n: int) -> Reply:      # n = 0-based index of this chat request
        return Reply(json=chat_completion("A", logprobs={"A": -0.1, "B": -2.5}))

    with ScriptedOpenAI(handler, latency=0.0) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="test")
        ...
        server.requests       # [{"path", "headers", "json"}, ...] in arrival order (not /health)
        server.count          # POST /v1/chat/completions received
        server.max_in_flight  # most chat requests handled at the same moment

``handler`` may be a callable ``(body, n) -> Reply`` (sync or async), a single ``Reply`` (served for
every request) or a list of ``Reply`` (served in order, the last one repeated). Sync handlers run on
the server's event loop, so they must not block; use ``Reply.delay`` or ``latency`` for slowness.

CLI use, as a stand-in for a ``vllm serve`` subprocess::

    python -m tests.openai_stub --port PORT [--host 127.0.0.1] [--model NAME]
        [--startup-delay S] [--fail-start] [--never-healthy] [--latency S]

Endpoints: POST /v1/chat/completions, GET /v1/models, GET /health, GET /version (404 unless it plays vLLM),
POST /v1/load_lora_adapter and POST /v1/unload_lora_adapter (recorded, answer 200 "ok").
``fixed={path: Reply}`` makes /v1/models or a LoRA route answer a recorded reply.

This server answers as any OpenAI-compatible server might. vLLM's own behaviour (its status codes, messages, LoRA
routes, per-token logprobs, limits) is the personality in `tests/vllm_stub.py`: ``ScriptedOpenAI(handler,
vllm=Vllm(...))`` in process, ``python -m tests.vllm_stub serve MODEL ...`` in place of ``vllm serve``. Every
vLLM-backend test runs against that personality.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json as jsonlib
import socket
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Reply",
    "ScriptedOpenAI",
    "chat_completion",
    "api_error",
    "default_handler",
    "build_app",
    "main",
]


@dataclass
class Reply:
    """One scripted HTTP answer.

    ``text`` (a raw body, sent as is, e.g. malformed JSON) wins over ``json``. ``delay`` is added to
    the server-wide ``latency`` and is slept with ``asyncio.sleep``, so concurrent requests overlap.
    """

    status: int = 200
    json: dict | None = None
    text: str | None = None
    headers: dict = field(default_factory=dict)
    delay: float = 0.0


Handler = Reply | list | Callable[[dict, int], Reply | Awaitable[Reply]]


def _token_entry(token: str, logprob: float) -> dict:
    return {"token": token, "logprob": float(logprob), "bytes": list(token.encode("utf-8"))}


def _logprobs_block(content: str, logprobs: dict[str, float]) -> dict:
    chosen = logprobs.get(content, max(logprobs.values()) if logprobs else 0.0)
    entry = _token_entry(content, chosen)
    entry["top_logprobs"] = [_token_entry(t, lp) for t, lp in logprobs.items()]
    return {"content": [entry], "refusal": None}


def chat_completion(
    content: str,
    logprobs: dict[str, float] | None = None,
    prompt_tokens: int = 100,
    completion_tokens: int = 1,
    model: str = "judge",
    n: int = 1,
    contents: list[str] | None = None,
) -> dict:
    """A valid OpenAI ``chat.completion`` response body.

    ``contents`` gives one choice per string (overrides ``content`` and ``n``); otherwise ``n`` copies of
    ``content``. With ``logprobs`` every choice carries one logprobs token (the choice's whole content,
    with its logprob from the dict or else the dict's max) whose ``top_logprobs`` are the dict's items.
    """
    texts = list(contents) if contents is not None else [content] * n
    choices = []
    for i, text in enumerate(texts):
        choices.append(
            {
                "index": i,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
                "logprobs": _logprobs_block(text, logprobs) if logprobs is not None else None,
            }
        )
    return {
        "id": f"chatcmpl-stub-{uuid.uuid4().hex[:12]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens * len(texts),
            "total_tokens": prompt_tokens + completion_tokens * len(texts),
        },
    }


def api_error(status: int, message: str = "scripted error", type: str = "stub_error", headers: dict | None = None) -> Reply:
    """A Reply with an OpenAI-style error body, e.g. ``api_error(429, headers={"Retry-After": "1"})``."""
    return Reply(
        status=status,
        json={"error": {"message": message, "type": type, "param": None, "code": None}},
        headers=dict(headers or {}),
    )


def _message_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def _varied_logprobs(messages: list) -> dict[str, float]:
    import hashlib
    import math

    x = int(hashlib.sha256(jsonlib.dumps(messages, sort_keys=True).encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    p_a = 0.05 + 0.9 * x
    return {"A": math.log(p_a), "B": math.log(1 - p_a)}


def default_handler(model: str = "stub", varied: bool = False) -> Callable[[dict, int], Reply]:
    """The CLI mode handler: deterministic short answers derived from the request.

    ``n`` choices "answer {i} to: {last user message[:40]}" (plus " [seed S]" when the request has a
    seed); logprobs {"A": -0.2, "B": -1.8} when the request asks for logprobs (`varied`: a preference between A and
    B derived from a hash of the whole request, so a judge's swapped orders disagree as a real judge's may); word-count usage.
    """

    def handle(body: dict, n: int) -> Reply:
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            return api_error(400, "request needs a 'messages' list", type="invalid_request_error")
        messages = body["messages"]
        users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        last = _message_text(users[-1].get("content")) if users else ""
        k = int(body.get("n") or 1)
        seed = body.get("seed")
        suffix = f" [seed {seed}]" if seed is not None else ""
        texts = [f"answer {i} to: {last[:40]}{suffix}" for i in range(k)]
        prompt_tokens = sum(len(_message_text(m.get("content")).split()) for m in messages if isinstance(m, dict))
        completion_tokens = max(len(t.split()) for t in texts)
        resp = chat_completion(
            texts[0],
            logprobs=(_varied_logprobs(messages) if varied else {"A": -0.2, "B": -1.8}) if body.get("logprobs") else None,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            model=str(body.get("model") or model),
            contents=texts,
        )
        return Reply(json=resp)

    return handle


class _State:
    """Counters shared between the app and its owner (thread-safe)."""

    def __init__(self, handler: Handler | None, latency: float, model: str, startup_delay: float, never_healthy: bool,
                 vllm: Any = None, log_requests: bool = False):
        self.handler = handler
        self.vllm = vllm  # a tests.vllm_stub.Vllm: vLLM's behaviour in front of the handler (None: plain OpenAI-compatible)
        self.fixed: dict[str, Reply] = {}  # path -> the reply every request to it gets (recorded replies)
        self.log_requests = log_requests
        self.latency = latency
        self.model = model
        self.startup_delay = startup_delay
        self.never_healthy = never_healthy
        self.started_at = time.monotonic()
        self.lock = threading.Lock()
        self.requests: list[dict] = []
        self.count = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.errors: list[BaseException] = []

    def record(self, path: str, headers: dict, body: Any) -> None:
        with self.lock:
            self.requests.append({"path": path, "headers": headers, "json": body})

    async def reply_for(self, body: Any, n: int) -> Reply:
        h = self.handler
        if h is None:
            return self.vllm.answer(body, n)
        if isinstance(h, Reply):
            return h
        if isinstance(h, (list, tuple)):
            if not h:
                raise ValueError("empty list of replies")
            return h[min(n, len(h) - 1)]
        out = h(body, n)
        if inspect.isawaitable(out):
            out = await out
        if not isinstance(out, Reply):
            raise TypeError(f"handler returned {type(out).__name__}, expected Reply")
        return out


def _respond(reply: Reply):
    from starlette.responses import JSONResponse, Response

    if reply.text is not None:
        headers = {k: v for k, v in reply.headers.items() if k.lower() != "content-type"}
        media = next((v for k, v in reply.headers.items() if k.lower() == "content-type"), "application/json")
        return Response(reply.text, status_code=reply.status, headers=headers, media_type=media)
    if reply.json is not None:
        return JSONResponse(reply.json, status_code=reply.status, headers=reply.headers)
    return Response(b"", status_code=reply.status, headers=reply.headers)


def build_app(state: _State):
    """The starlette app behind both modes."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, PlainTextResponse, Response
    from starlette.routing import Route

    async def read(request) -> Any:
        raw = await request.body()
        try:
            body = jsonlib.loads(raw) if raw else None
        except ValueError:
            body = None
        state.record(request.url.path, {k.lower(): v for k, v in request.headers.items()}, body)
        return body

    def guard(request) -> Reply | None:
        if state.vllm is None:
            return None
        return state.vllm.unauthorized(request.url.path, {k.lower(): v for k, v in request.headers.items()})

    async def preempted(request) -> Reply | None:
        """The reply a request gets before its route's own work: a recorded reply for its path, or vLLM's 401."""
        if request.url.path in state.fixed:
            await read(request)
            return state.fixed[request.url.path]
        return guard(request)

    async def chat(request):
        refused = guard(request)
        if refused is not None:
            return _respond(refused)
        with state.lock:
            state.in_flight += 1
            state.max_in_flight = max(state.max_in_flight, state.in_flight)
            n = state.count
            state.count += 1
        try:
            body = await read(request)
            if state.vllm is not None:
                refusal = state.vllm.refuse(body)
                if state.log_requests:
                    print(f"vllm-stub: request model={body.get('model') if isinstance(body, dict) else None} "
                          f"sampling={state.vllm.sampling(body) if isinstance(body, dict) else None} "
                          f"-> {refusal.status if refusal else 200}", flush=True)
                if refusal is not None:
                    return _respond(refusal)
            try:
                reply = await state.reply_for(body, n)
            except Exception as exc:  # a broken script is a test bug: surface it as a 500 and keep it
                state.errors.append(exc)
                reply = api_error(500, f"stub handler raised {type(exc).__name__}: {exc}")
            wait = state.latency + reply.delay
            if wait > 0:
                await asyncio.sleep(wait)
            return _respond(reply)
        finally:
            with state.lock:
                state.in_flight -= 1

    async def models(request):
        if (early := await preempted(request)) is not None:
            return _respond(early)
        state.record(request.url.path, {k.lower(): v for k, v in request.headers.items()}, None)
        if state.vllm is not None:
            return JSONResponse(state.vllm.models())
        return JSONResponse(
            {"object": "list", "data": [{"id": state.model, "object": "model", "created": 0, "owned_by": "stub"}]}
        )

    async def health(request):
        if state.vllm is not None:
            return Response(b"", status_code=200)
        if state.never_healthy or time.monotonic() - state.started_at < state.startup_delay:
            return PlainTextResponse("starting", status_code=503)
        return PlainTextResponse("ok")

    async def version(request):
        if state.vllm is None:  # not every OpenAI-compatible server has the route
            return JSONResponse({"detail": "Not Found"}, status_code=404)
        return JSONResponse({"version": state.vllm.version})

    async def lora(request):
        if (early := await preempted(request)) is not None:
            return _respond(early)
        body = await read(request)
        if state.vllm is None:
            return PlainTextResponse("ok")
        if not state.vllm.runtime_lora:  # the routes are not registered: FastAPI's own 404
            return JSONResponse({"detail": "Not Found"}, status_code=404)
        loading = request.url.path.endswith("/load_lora_adapter")
        with state.lock:
            return _respond(state.vllm.load_lora(body) if loading else state.vllm.unload_lora(body))

    async def dev(request):
        body = await read(request) if request.method == "POST" else None
        if state.vllm is None:
            return JSONResponse({"detail": "Not Found"}, status_code=404)
        state.record(request.url.path, {k.lower(): v for k, v in request.headers.items()}, body)
        with state.lock:
            reply = state.vllm.dev(request.url.path, dict(request.query_params), body)
        if state.log_requests:
            query = f"?{request.url.query}" if request.url.query else ""
            print(f"vllm-stub: {request.method} {request.url.path}{query} {jsonlib.dumps(body)} -> {reply.status}", flush=True)
        return _respond(reply)

    return Starlette(
        routes=[
            *(Route(path, dev, methods=["POST"]) for path in ("/collective_rpc", "/reset_prefix_cache", "/sleep", "/wake_up")),
            Route("/is_sleeping", dev, methods=["GET"]),
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/version", version, methods=["GET"]),
            Route("/v1/load_lora_adapter", lora, methods=["POST"]),
            Route("/v1/unload_lora_adapter", lora, methods=["POST"]),
        ]
    )


def _uvicorn_config(app, host: str, port: int, log_level: str = "warning"):
    import uvicorn

    return uvicorn.Config(
        app,
        host=host,
        port=port,
        lifespan="off",
        log_level=log_level,
        access_log=False,
        timeout_graceful_shutdown=1,
    )


class ScriptedOpenAI:
    """A FAKE OpenAI-compatible server on loopback, run by uvicorn in a daemon thread.

    Use as a context manager (or call ``start()`` / ``stop()``). See the module docstring.
    """

    def __init__(
        self,
        handler: Handler,
        latency: float = 0.0,
        model: str = "judge",
        host: str = "127.0.0.1",
        port: int | None = None,
        startup_timeout: float = 10.0,
        vllm: Any = None,
        fixed: dict[str, Reply] | None = None,
    ):
        self._state = _State(handler, latency, model, startup_delay=0.0, never_healthy=False, vllm=vllm)
        self._state.fixed = dict(fixed or {})  # e.g. {"/v1/models": Reply(json=...)}: what those paths answer
        self.host = host
        self.port = port or 0
        self.startup_timeout = startup_timeout
        self._server = None
        self._thread: threading.Thread | None = None

    # --- what tests read -------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    @property
    def requests(self) -> list[dict]:
        """Every request except /health: {"path", "headers" (lower-cased), "json" (body or None)}."""
        with self._state.lock:
            return list(self._state.requests)

    @property
    def chat_requests(self) -> list[dict]:
        return [r for r in self.requests if r["path"] == "/v1/chat/completions"]

    @property
    def count(self) -> int:
        return self._state.count

    @property
    def max_in_flight(self) -> int:
        return self._state.max_in_flight

    @property
    def in_flight(self) -> int:
        return self._state.in_flight

    @property
    def errors(self) -> list[BaseException]:
        """Exceptions raised by the handler (each was answered with a 500)."""
        return list(self._state.errors)

    @property
    def vllm(self):
        """The vLLM personality (tests.vllm_stub.Vllm) in front of the handler, or None."""
        return self._state.vllm

    @property
    def handler(self) -> Handler:
        return self._state.handler

    @handler.setter
    def handler(self, value: Handler) -> None:
        self._state.handler = value

    @property
    def latency(self) -> float:
        return self._state.latency

    @latency.setter
    def latency(self, value: float) -> None:
        self._state.latency = value

    # --- lifecycle -------------------------------------------------------------------------------
    def start(self) -> ScriptedOpenAI:
        import httpx
        import uvicorn

        if self._thread is not None:
            raise RuntimeError("already started")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        sock.listen(128)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        self._server = uvicorn.Server(_uvicorn_config(build_app(self._state), self.host, self.port))
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name=f"openai-stub-{self.port}", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if not self._thread.is_alive():
                self._thread = None
                raise RuntimeError("stub server thread died during startup")
            if self._server.started:
                try:
                    if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"stub server on {self.url} did not start within {self.startup_timeout} s")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(timeout=5)
        if self._thread.is_alive():  # in-flight requests outlived the graceful timeout
            self._server.force_exit = True
            self._thread.join(timeout=5)
        self._thread = None

    def __enter__(self) -> ScriptedOpenAI:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# --- CLI: a stand-in for `vllm serve` ------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.openai_stub", description="FAKE OpenAI-compatible server (tests only).")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--model", default="stub")
    p.add_argument("--startup-delay", type=float, default=0.0, help="/health answers 503 for this many seconds")
    p.add_argument("--fail-start", action="store_true", help="log an error and exit 1 before binding")
    p.add_argument("--never-healthy", action="store_true", help="serve, but /health always answers 503")
    p.add_argument("--latency", type=float, default=0.0, help="seconds added to every chat completion")
    p.add_argument("--varied-logprobs", action="store_true", help="A/B logprobs from a hash of the request, not fixed")
    # vLLM's LoRA flags, accepted and logged so that tests can assert what a server was started with.
    p.add_argument("--enable-lora", action="store_true")
    p.add_argument("--max-lora-rank", type=int)
    p.add_argument("--lora-modules", nargs="*", default=[])
    args = p.parse_args(argv)

    print(f"stub: FAKE OpenAI-compatible server (tests only), model {args.model}", flush=True)
    for module in args.lora_modules:
        print(f"stub: LoRA module {module} (max rank {args.max_lora_rank}, enabled {args.enable_lora})", flush=True)
    if args.fail_start:
        print("stub: loading model ...", flush=True)
        print("ERROR: simulated startup failure", flush=True)
        print("stub: exiting", flush=True)
        return 1

    import uvicorn

    state = _State(default_handler(args.model, args.varied_logprobs), args.latency, args.model, args.startup_delay, args.never_healthy)
    print(f"stub: serving {args.model} on http://{args.host}:{args.port}", flush=True)
    server = uvicorn.Server(_uvicorn_config(build_app(state), args.host, args.port, log_level="info"))
    # Main thread: uvicorn catches SIGTERM/SIGINT, shuts down gracefully ("Finished server process"),
    # then re-raises the signal, so the exit status is -15 / -2 as for a real server killed that way.
    server.run()
    if not server.started:  # e.g. the port was taken
        print(f"ERROR: could not serve on {args.host}:{args.port}", flush=True)
        return 1
    print("stub: stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

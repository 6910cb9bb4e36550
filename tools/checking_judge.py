"""A checking judge behind an OpenAI-compatible API: a judge that is right on questions with a numeric reference.

It reads the judge prompt selfplay renders with the reference-guided template (`<reference_answer>`,
`<response_A>`, `<response_B>`), scores both responses with the `number` verifier (`selfplay.judging.verifiers`: correct 1,
a wrong number closer to the reference higher than a farther one, no number 0) and answers in whichever verdict
mode was asked: label logprobs (`logprobs`/`top_logprobs`, one token), a `json_schema` choice, or a `[[A]]` marker.
Equal scores are a tie (equal label probabilities). No model runs; an answer takes about a millisecond, so a
benchmark that judges through it measures selfplay's own cost per call (`python -m tools.bench speed`).

    with CheckingJudge() as judge:                  # real HTTP on loopback, uvicorn in a thread
        run(..., judge.endpoint.base_url=judge.base_url, judge.endpoint.model="checker")
        judge.calls                                   # chat completions answered

It is a real judge for this kind of workload (the generated checkable prompts), not a stand-in for vLLM.
"""

from __future__ import annotations

import json
import math
import re
import socket
import threading
import time
import uuid
from pathlib import Path

from selfplay.judging.verifiers import number_score

__all__ = ["CheckingJudge", "verdict_for"]

_TAGS = {name: re.compile(rf"<{name}>\n(.*?)\n</{name}>", re.S) for name in ("reference_answer", "response_A", "response_B")}


def verdict_for(user: str) -> tuple[float, float] | None:
    """(score of A, score of B) for a rendered reference-guided judge prompt, or None when it holds no numeric
    reference.

    >>> prompt = "<reference_answer>\\n12\\n</reference_answer>\\n<response_A>\\n11\\n</response_A>\\n<response_B>\\n12\\n</response_B>"
    >>> a, b = verdict_for(prompt); b == 1.0 and a < 1.0
    True
    """
    found = {name: pattern.search(user) for name, pattern in _TAGS.items()}
    if not all(found.values()):
        return None
    reference = found["reference_answer"].group(1).strip()
    try:
        return number_score(found["response_A"].group(1), reference), number_score(found["response_B"].group(1), reference)
    except Exception:  # noqa: BLE001 - a reference that is not a number: this judge cannot tell
        return None


def _reply(body: dict) -> dict:
    messages = body.get("messages") or []
    user = next((m.get("content") for m in reversed(messages) if isinstance(m, dict) and m.get("role") == "user"), "") or ""
    scores = verdict_for(user if isinstance(user, str) else "")
    a, b = scores if scores is not None else (0.0, 0.0)
    p_a = 0.5 if a == b else (0.95 if a > b else 0.05)
    label = "tie" if a == b else ("A" if a > b else "B")
    logprobs = None
    if body.get("logprobs"):
        top = sorted([("A", math.log(p_a)), ("B", math.log(1 - p_a))], key=lambda t: -t[1])[: max(1, int(body.get("top_logprobs") or 1))]
        token = top[0][0]
        logprobs = {"content": [{"token": token, "logprob": top[0][1], "bytes": list(token.encode()),
                                 "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in top]}]}
        content = token
    elif (body.get("response_format") or {}).get("type") == "json_schema":
        content = json.dumps({"verdict": label})
    else:
        content = f"[[{label}]]"
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model", "checker"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "logprobs": logprobs,
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": len(user.split()), "completion_tokens": 1, "total_tokens": len(user.split()) + 1}}


class CheckingJudge:
    """The checking judge served on 127.0.0.1 (a free port); a context manager. In a process of its own by default
    (`process=True`), as a real judge server would be, so that its work does not share the caller's interpreter;
    from a daemon thread of this process otherwise (then `calls` counts the requests)."""

    def __init__(self, model: str = "checker", host: str = "127.0.0.1", process: bool = True):
        self.model, self.host, self.port = model, host, 0
        self.process = process
        self.calls = 0
        self._server = None
        self._thread: threading.Thread | None = None
        self._proc = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def _app(self):
        from starlette.applications import Starlette
        from starlette.responses import JSONResponse, Response
        from starlette.routing import Route

        async def chat(request):
            self.calls += 1
            return JSONResponse(_reply(json.loads(await request.body())))

        async def models(request):
            return JSONResponse({"object": "list", "data": [{"id": self.model, "object": "model", "owned_by": "selfplay"}]})

        async def health(request):
            return Response(b"", status_code=200)

        return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]), Route("/v1/models", models),
                                 Route("/health", health)])

    def __enter__(self) -> CheckingJudge:
        import uvicorn

        if self.process:
            return self._start_process()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, 0))
        sock.listen(1024)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self._app(), host=self.host, port=self.port, log_level="warning", access_log=False, lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, name="checking-judge", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the checking judge did not start")
            time.sleep(0.01)
        return self

    def _start_process(self) -> CheckingJudge:
        import subprocess
        import sys

        import httpx

        with socket.socket() as probe:
            probe.bind((self.host, 0))
            self.port = probe.getsockname()[1]
        self._proc = subprocess.Popen([sys.executable, "-m", "tools.checking_judge", "--host", self.host, "--port", str(self.port),
                                       "--model", self.model], stdin=subprocess.DEVNULL, cwd=Path(__file__).resolve().parents[1])
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://{self.host}:{self.port}/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self._proc.kill()
                raise RuntimeError("the checking judge did not start")
            time.sleep(0.05)

    def __exit__(self, *exc) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except Exception:  # noqa: BLE001
                self._proc.kill()
        if self._server is not None:
            self._server.should_exit = True
            self._thread.join(timeout=5)


def main(argv: list[str] | None = None) -> int:
    import argparse

    import uvicorn

    p = argparse.ArgumentParser(prog="python -m tools.checking_judge", description="The checking judge as a server.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--model", default="checker")
    args = p.parse_args(argv)
    judge = CheckingJudge(args.model, args.host, process=False)
    uvicorn.run(judge._app(), host=args.host, port=args.port, log_level="warning", access_log=False, lifespan="off")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

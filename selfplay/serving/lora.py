"""Serving LoRA adapters with vLLM: the flags that serve one over its base model, and the runtime API that loads
and unloads one in a running server.

A round's policy trained with `train.merge: false` is an adapter directory, not a model. A server selfplay starts
gets it at start (`serving_plan`: `--enable-lora --lora-modules '{"name": <name>, "path": <adapter>}'` over the base model); a running
endpoint is asked to load it (`load_lora_adapter`, vLLM's POST /v1/load_lora_adapter, which needs
VLLM_ALLOW_RUNTIME_LORA_UPDATING=True on the server) and to unload it afterwards. Requests then name the adapter
as their model.

    spec, model, name = serving_plan(cfg.sample.server, policy, adapter_name(cfg.name, policy))
    load_lora_adapter("http://127.0.0.1:8000/v1", "nightly-round_3", "/runs/nightly/round_3/train/checkpoint")
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from selfplay.config.server import ServerSpec
from selfplay.errors import SelfplayError

__all__ = ["LoraAdapterError", "adapter_name", "adapter_rank", "lora_args", "lora_modules_args", "serving_plan", "load_lora_adapter", "unload_lora_adapter"]


class LoraAdapterError(SelfplayError, RuntimeError):
    """The server refused to load or unload a LoRA adapter."""


def _lora_call(action: str, base_url: str, body: dict, api_key: str, timeout: float) -> None:
    import httpx

    root = base_url.rstrip("/")
    root = root[: -len("/v1")] if root.endswith("/v1") else root
    url = f"{root}/v1/{action}"
    try:
        reply = httpx.post(url, json=body, headers={"Authorization": f"Bearer {api_key}"}, timeout=timeout)
    except httpx.HTTPError as exc:
        raise LoraAdapterError(f"POST {url} failed: {type(exc).__name__}: {exc}") from None
    if reply.status_code == 200:
        return
    try:
        payload = reply.json()
    except ValueError:
        payload = None
    error = payload.get("error") if isinstance(payload, dict) else None
    message = (error.get("message") if isinstance(error, dict) else error) or (payload or {}).get("detail") or reply.text
    raise LoraAdapterError(f"POST {url} answered {reply.status_code}: {str(message)[:1000]}{_hint(reply.status_code, payload, body)}")


def _hint(status: int, payload, body: dict) -> str:
    """What to fix, read from vLLM's answer (vllm/entrypoints/openai/serving_models.py): no such route means the
    runtime LoRA API is off; vLLM's own 404 NotFoundError means a missing adapter path or name."""
    route_missing = status == 405 or (status == 404 and isinstance(payload, dict) and payload.get("detail") == "Not Found")
    if route_missing or (status == 404 and not isinstance(payload, dict)):
        return ("; the server has no runtime LoRA API: start vLLM with --enable-lora and the environment variable "
                "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True")
    if status == 404 and "lora_path" in body:
        return (f"; the server cannot read an adapter at {body['lora_path']}: the path must be one the server sees "
                "(for a server in a container, mount the run directory at the same path)")
    if status == 401:
        return "; the server wants another API key (VLLM_API_KEY, or the endpoint's api_key_env / api_key_secret)"
    return ""


VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def adapter_name(run_name: str, adapter: str | os.PathLike) -> str:
    """The name a round's adapter is served under: the run and the round directory, e.g. 'nightly-round_3'.

    >>> adapter_name("nightly", "/runs/nightly/round_3/train/checkpoint")
    'nightly-round_3'
    """
    return f"{run_name}-{Path(adapter).parent.parent.name}"


def lora_args(name: str, adapter: str | os.PathLike, rank: int) -> list[str]:
    """`vllm serve` flags that serve the adapter at `adapter` as model `name` over the base model (pure).

    The module is given in vLLM's JSON form, `{"name": ..., "path": ...}`: its other form, `name=path`, is split on
    "=" (a name or path holding one breaks the server's argument parser) and is read as JSON when it holds a ","
    (the server exits). See vLLM's `LoRAParserAction` (vllm/entrypoints/openai/cli_args.py).

    >>> lora_args("run-round_1", "/runs/run/round_1/train/checkpoint", 12)  # doctest: +NORMALIZE_WHITESPACE
    ['--enable-lora', '--max-lora-rank', '16', '--lora-modules',
     '{"name": "run-round_1", "path": "/runs/run/round_1/train/checkpoint"}']
    """
    return lora_modules_args([(name, adapter, rank)])


def lora_modules_args(modules: list[tuple[str, str | os.PathLike, int]]) -> list[str]:
    """The flags for several adapters (name, path, rank) over one base: one `--lora-modules` with every module (vLLM
    keeps only the last of repeated `--lora-modules` flags), a rank that fits all, and `--max-loras` for more than one.

    >>> lora_modules_args([("a", "/x", 8), ("b", "/y", 32)])  # doctest: +NORMALIZE_WHITESPACE
    ['--enable-lora', '--max-lora-rank', '32', '--max-loras', '2', '--lora-modules', '{"name": "a", "path": "/x"}',
     '{"name": "b", "path": "/y"}']
    """
    rank = max(r for _, _, r in modules)
    max_rank = next((r for r in VLLM_LORA_RANKS if r >= rank), rank)
    many = ["--max-loras", str(len(modules))] if len(modules) > 1 else []
    return ["--enable-lora", "--max-lora-rank", str(max_rank), *many, "--lora-modules",
            *(json.dumps({"name": name, "path": str(path)}) for name, path, _ in modules)]


def adapter_rank(adapter: str | os.PathLike) -> int:
    return json.loads((Path(adapter) / "adapter_config.json").read_text())["r"]


def serving_plan(spec: ServerSpec, model: str | os.PathLike, lora_name: str) -> tuple[ServerSpec, str, str | None]:
    """How to serve a checkpoint: (the server spec, the model to start it on, the model name to request or None
    for the served name). A LoRA adapter directory is served over its base model, as `lora_name`."""
    from selfplay.inputs.models import adapter_base, is_adapter

    if not is_adapter(model):
        return spec, str(model), None
    adapter = Path(model).resolve()
    return spec.model_copy(update={"extra_args": [*spec.extra_args, *lora_args(lora_name, adapter, adapter_rank(adapter))]}), adapter_base(adapter), lora_name


def load_lora_adapter(base_url: str, name: str, path: str | os.PathLike, api_key: str = "EMPTY", timeout: float = 300.0) -> None:
    """Load the LoRA adapter at `path` (as the server sees it) under `name`; requests may then use model=`name`.

    POSTs {"lora_name", "lora_path"} to `<root>/v1/load_lora_adapter` (`base_url` with or without the /v1);
    raises `LoraAdapterError` with the server's message on any answer but 200.
    """
    _lora_call("load_lora_adapter", base_url, {"lora_name": name, "lora_path": str(path)}, api_key, timeout)


def unload_lora_adapter(base_url: str, name: str, api_key: str = "EMPTY", timeout: float = 60.0) -> None:
    """Unload the adapter loaded under `name` (POST `<root>/v1/unload_lora_adapter`)."""
    _lora_call("unload_lora_adapter", base_url, {"lora_name": name}, api_key, timeout)

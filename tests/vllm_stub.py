"""A FAKE `vllm serve` for tests: the HTTP behaviour of vLLM's OpenAI-compatible server, with no model behind it.

vLLM cannot run on any machine here, so the vLLM paths are tested against this. Where `tests/openai_stub.py` answers
like any OpenAI-compatible server, this personality answers as vLLM's own sources say vLLM does (read in
vllm-project/vllm; "v0.11" is the single-file layout `vllm/entrypoints/openai/{api_server,protocol,serving_chat,
serving_models}.py`, "newest" the split layout of the 0.1x/0.3x line). Each behaviour and where it comes from:

- **Error bodies**: `{"error": {"message", "type", "param", "code"}}` with the HTTP status equal to `code`
  (`ErrorResponse`/`ErrorInfo`, vllm/entrypoints/openai/protocol.py; nested since v0.10.1), mapped from the
  exception as `create_error_response` does: ValueError -> 400 BadRequestError, not found -> 404 NotFoundError.
- **API key** (`--api-key`, or VLLM_API_KEY): `AuthenticationMiddleware` (vllm/entrypoints/openai/api_server.py)
  guards paths under /v1 only and answers 401 with the flat body `{"error": "Unauthorized"}`; /health is open.
- **/version**: `{"version": ...}` (api_server.py `show_version`, vLLM's `__version__`); open, like /health.
- **/health**: 200 with an empty body (api_server.py `health`). Before the engine is ready the socket accepts no
  connection: `run_server` binds, builds the engine (model load, KV cache), and only then serves (the CLI's
  `--startup-delay` sleeps before listening, as a model load would).
- **/v1/models**: a `ModelCard` per served name (`root` the model, `parent` null, `max_model_len`) and one per
  LoRA adapter after them, in load order (`root` its path, `parent` the base's served name, `max_model_len` null),
  each with a `permission` list (serving_models.py `show_available_models`).
- **A request for a model not served**: 404 NotFoundError, param "model", "The model `{name}` does not exist."
  (`OpenAIServingModels`/`_check_model`).
- **Chat logprobs**: one `content` entry per generated token (`{token, logprob, bytes, top_logprobs}`), null
  without `logprobs: true`; `top_logprobs` defaults to 0, so `logprobs: true` alone gives empty lists
  (serving_chat.py `_create_chat_logprobs`, protocol.py `ChatCompletionLogProbsContent`).
- **The top-logprobs cap**: more than `--max-logprobs` (default 20, `ModelConfig.max_logprobs`) is a 400
  "Requested sample logprobs of {n}, which is greater than max allowed: {max}" (vllm/v1/engine/processor.py
  `_validate_logprobs`); `top_logprobs` > 0 without `logprobs: true` is a 400 from `ChatCompletionRequest.check_logprobs`.
- **Greedy with n > 1**: 400 "n must be 1 when using greedy sampling, got {n}." (vllm/sampling_params.py
  `SamplingParams._verify_greedy_sampling`; temperature < 1e-5 is greedy).
- **Seeds with n > 1**: choice j of a request seeded s draws with seed s + j (vllm/v1/engine/parallel_sampling.py
  `ParentRequest._get_child_sampling_params`). This fake's default answer names the seed each choice used.
- **The model's generation_config.json**: its temperature, top_p, top_k, min_p, repetition_penalty and
  max_new_tokens (as max_tokens) are the defaults of a request that does not set them, unless
  `--generation-config vllm` (`ModelConfig.get_diff_sampling_param`, vllm/config/model.py; serving_chat.py
  `default_sampling_params`); values equal to transformers' own defaults are dropped (`to_diff_dict`).
- **Runtime LoRA routes** (`POST /v1/load_lora_adapter`, `/v1/unload_lora_adapter`): registered only when
  VLLM_ALLOW_RUNTIME_LORA_UPDATING is 1/true, otherwise FastAPI's 404 `{"detail": "Not Found"}` (api_server.py;
  newest vllm/entrypoints/serve/lora/api_router.py). A load answers 200 with the plain text "Success: LoRA adapter
  '{name}' added successfully."; a name already loaded 400 InvalidUserInput "The lora adapter '{name}' has already
  been loaded."; a path with no adapter 404 NotFoundError "Loading lora {name} failed: No adapter found for {path}";
  an unload of a name not loaded 404 NotFoundError "The lora adapter '{name}' cannot be found." (serving_models.py
  `load_lora_adapter`, `_check_load_lora_adapter_request`, `_check_unload_lora_adapter_request`;
  vllm/lora/worker_manager.py `_load_adapter`).
- **`--lora-modules`**: vLLM's `LoRAParserAction` (vllm/entrypoints/openai/cli_args.py): an item with "=" and no
  "," is `name=path`, split on "=" (two "=" raise ValueError, a traceback); anything else must be JSON
  `{"name", "path", "base_model_name"?}` (else argparse's "Invalid JSON format for --lora-modules", exit 2). A
  static module whose path holds no adapter fails the start (`init_static_loras`).
- **Development routes** (VLLM_SERVER_DEV_MODE=1): weight reload through /collective_rpc, /reset_prefix_cache, /sleep and
  /wake_up (`Vllm.dev`; the real CPU build answers the same, tests/test_vllm_real.py).
- **GPU memory at start**: with `--gpu-memory-utilization u`, free memory below u x total on a visible GPU ends the
  start with vLLM's "Free memory on device ... on startup is less than desired GPU memory utilization (...)"
  (vllm/v1/worker/gpu_worker.py `init_device`); memory is read from `nvidia-smi` (in tests a fake one) when it exists.

The default answers: choice j of a chat request is "answer {j} to: {the last user message[:40]} [seed {seed + j}]",
cut at max_tokens (finish_reason "length"), its tokens the text's whitespace-led words; a request with
`top_logprobs` gets the one-token judge answer "A" with A/B top logprobs (`--varied-logprobs`: from a hash of the
request); a `json_schema` response format gets the object the schema allows, each property its first allowed value
(`{"verdict": "A"}` for the judge's schema): vLLM constrains the reply to the schema.

CLI, in place of `vllm serve` (the argv selfplay builds for vLLM runs unchanged)::

    python -m tests.vllm_stub serve MODEL --host H --port P [--served-model-name N ...] [--api-key K]
        [--gpu-memory-utilization U] [--tensor-parallel-size T] [--max-model-len L] [--max-logprobs 20]
        [--enable-lora --max-lora-rank R --lora-modules M ...] [--generation-config auto|vllm]
        [--startup-delay S] [--fail-start] [--latency S] [--varied-logprobs]

In-process: `ScriptedOpenAI(handler, vllm=Vllm(...))` puts this personality in front of a scripted handler (None:
the default answers above).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.openai_stub import Reply

__all__ = ["Vllm", "vllm_error", "token_split", "main"]

MAX_LOGPROBS = 20  # vLLM's ModelConfig.max_logprobs default
GREEDY_EPS = 1e-5  # vllm/sampling_params.py _SAMPLING_EPS
GENERATION_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 50, "min_p": 0.0, "repetition_penalty": 1.0}


def vllm_error(status: int, message: str, type: str, param: str | None = None) -> Reply:
    """vLLM's error body: `{"error": {"message", "type", "param", "code"}}`, the status equal to `code`."""
    return Reply(status=status, json={"error": {"message": message, "type": type, "param": param, "code": status}})


def token_split(text: str) -> list[str]:
    """This fake's tokens: each word with the spaces before it ("a bc" -> ["a", " bc"])."""
    return re.findall(r"\s*\S+", text) or ([text] if text else [])


def _fill_schema(schema: dict) -> dict:
    """The object a JSON schema of flat properties allows, each property its first `enum` value (else "x")."""
    return {name: (prop.get("enum") or ["x"])[0] for name, prop in schema.get("properties", {}).items()}


def _entry(token: str, logprob: float, top: list[tuple[str, float]]) -> dict:
    as_bytes = lambda t: list(t.encode("utf-8", errors="replace"))  # noqa: E731
    return {"token": token, "logprob": max(logprob, -9999.0), "bytes": as_bytes(token),
            "top_logprobs": [{"token": t, "logprob": lp, "bytes": as_bytes(t)} for t, lp in top]}


def generation_defaults(model: str) -> dict[str, Any]:
    """What vLLM takes from `<model>/generation_config.json` as request defaults (`get_diff_sampling_param`)."""
    path = Path(model) / "generation_config.json"
    if not path.is_file():
        return {}
    raw = json.loads(path.read_text())
    out = {k: raw[k] for k in GENERATION_DEFAULTS if k in raw and raw[k] != GENERATION_DEFAULTS[k]}
    if raw.get("max_new_tokens") is not None:
        out["max_tokens"] = raw["max_new_tokens"]
    return out


@dataclass
class Vllm:
    """vLLM's behaviour in front of a (scripted or default) handler; see the module docstring for the sources."""

    model: str = "model"
    served_names: list[str] = field(default_factory=list)
    api_keys: list[str] = field(default_factory=list)
    runtime_lora: bool = False  # VLLM_ALLOW_RUNTIME_LORA_UPDATING
    max_logprobs: int = MAX_LOGPROBS
    max_model_len: int = 2048
    defaults: dict[str, Any] = field(default_factory=dict)  # from generation_config.json
    varied_logprobs: bool = False
    version: str = "0.32.0+fake"  # what GET /version reports: the pinned vLLM's number, marked as this fake's
    adapters: dict[str, dict[str, str]] = field(default_factory=dict)  # name -> {"path", "base"}, in load order
    dev_mode: bool = False  # VLLM_SERVER_DEV_MODE: /collective_rpc, /reset_prefix_cache, /sleep, /wake_up, /is_sleeping
    sleep_mode: bool = False  # --enable-sleep-mode
    sleeping: bool = False
    weights: str = ""  # what the engine holds: the model, or the last weights_path reloaded

    def __post_init__(self) -> None:
        self.served_names = self.served_names or [self.model]
        self.weights = self.weights or self.model

    # --------------------------------------------------------------- development routes (VLLM_SERVER_DEV_MODE=1)
    def dev(self, path: str, query: dict[str, str], body: Any) -> Reply:
        """vllm/entrypoints/serve/dev/: POST /collective_rpc {"method": "reload_weights", "kwargs": {"weights_path"}}
        -> {"results": [null]} (the worker's `reload_weights`, which also resets the LoRA state); /reset_prefix_cache ->
        {"success": true}; /sleep?level=N (needs --enable-sleep-mode: CUDA's allocator) and /wake_up -> {"status": ...};
        GET /is_sleeping. Without dev mode the routes are not registered: FastAPI's 404."""
        if not self.dev_mode:
            return Reply(status=404, json={"detail": "Not Found"})
        if path == "/collective_rpc":
            if not isinstance(body, dict) or body.get("method") != "reload_weights":
                return vllm_error(400, f"the FAKE knows only reload_weights, not {body!r}", "BadRequestError")
            weights = (body.get("kwargs") or {}).get("weights_path")
            if not weights or not Path(weights).is_dir():
                return vllm_error(500, f"FileNotFoundError: no weights at {weights}", "InternalServerError")
            self.weights, self.adapters = weights, {}
            return Reply(json={"results": [None]})
        if path == "/reset_prefix_cache":
            return Reply(json={"success": True})
        if path == "/sleep":
            if not self.sleep_mode:
                return vllm_error(500, "Sleep mode is not enabled: start with --enable-sleep-mode", "InternalServerError")
            self.sleeping = True
            return Reply(json={"status": "sleeping", "level": int(query.get("level", 1))})
        if path == "/wake_up":
            self.sleeping = False
            return Reply(json={"status": "awake", "tags": None})
        if path == "/is_sleeping":
            return Reply(json={"is_sleeping": self.sleeping})
        return Reply(status=404, json={"detail": "Not Found"})

    # --------------------------------------------------------------- auth, models
    def unauthorized(self, path: str, headers: dict[str, str]) -> Reply | None:
        if not self.api_keys or not path.startswith("/v1"):
            return None
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and token in self.api_keys:
            return None
        return Reply(status=401, json={"error": "Unauthorized"})

    def models(self) -> dict:
        now = int(time.time())

        def card(id_: str, root: str, parent: str | None, max_len: int | None) -> dict:
            permission = {"id": f"modelperm-{uuid.uuid4().hex}", "object": "model_permission", "created": now,
                          "allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True,
                          "allow_search_indices": False, "allow_view": True, "allow_fine_tuning": False,
                          "organization": "*", "group": None, "is_blocking": False}
            return {"id": id_, "object": "model", "created": now, "owned_by": "vllm", "root": root, "parent": parent,
                    "max_model_len": max_len, "permission": [permission]}

        cards = [card(name, self.model, None, self.max_model_len) for name in self.served_names]
        cards += [card(name, a["path"], a["base"], None) for name, a in self.adapters.items()]
        return {"object": "list", "data": cards}

    # --------------------------------------------------------------- LoRA
    def add_adapter(self, name: str, path: str, base: str | None = None) -> Reply:
        if not name or not path:
            return vllm_error(400, "Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput")
        if name in self.adapters:
            return vllm_error(400, f"The lora adapter '{name}' has already been loaded. If you want to load the adapter in place, "
                                   "set 'load_inplace' to True.", "InvalidUserInput")
        if not (Path(path) / "adapter_config.json").is_file():
            return vllm_error(404, f"Loading lora {name} failed: No adapter found for {path}", "NotFoundError")
        self.adapters[name] = {"path": path, "base": base or self.served_names[0]}
        return Reply(text=f"Success: LoRA adapter '{name}' added successfully.", headers={"content-type": "text/plain"})

    def load_lora(self, body: Any) -> Reply:
        if not isinstance(body, dict) or not isinstance(body.get("lora_name"), str) or not isinstance(body.get("lora_path"), str):
            return vllm_error(400, "1 validation error: lora_name and lora_path are required strings", "Bad Request")
        return self.add_adapter(body["lora_name"], body["lora_path"])

    def unload_lora(self, body: Any) -> Reply:
        name = body.get("lora_name") if isinstance(body, dict) else None
        if not name:
            return vllm_error(400, "'lora_name' needs to be provided to unload a LoRA adapter.", "InvalidUserInput")
        if name not in self.adapters:
            return vllm_error(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError")
        del self.adapters[name]
        return Reply(text=f"Success: LoRA adapter '{name}' removed successfully.", headers={"content-type": "text/plain"})

    # --------------------------------------------------------------- chat
    def sampling(self, body: dict) -> dict[str, Any]:
        """The request's sampling parameters after the model's defaults, as `to_sampling_params` fills them."""
        out = {k: body.get(k) for k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_tokens")}
        for k, v in self.defaults.items():
            if out.get(k) is None:
                out[k] = v
        fallback = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0, "max_tokens": self.max_model_len}
        out = {k: fallback[k] if v is None else v for k, v in out.items()}
        out["n"] = int(body.get("n") or 1)
        out["seed"] = body.get("seed")
        return out

    def refuse(self, body: Any) -> Reply | None:
        """vLLM's 4xx for a chat request, or None when it would serve it."""
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            return vllm_error(400, "1 validation error: field 'messages' required", "Bad Request")
        model = body.get("model")
        if model not in self.served_names and model not in self.adapters:
            return vllm_error(404, f"The model `{model}` does not exist.", "NotFoundError", "model")
        top = body.get("top_logprobs")
        if top is not None and (top > 0 or top == -1) and not body.get("logprobs"):
            return vllm_error(400, "1 validation error for ChatCompletionRequest\n  Value error, when using `top_logprobs`, "
                              "`logprobs` must be set to true.", "Bad Request")
        if top is not None and top > self.max_logprobs:
            return vllm_error(400, f"Requested sample logprobs of {top}, which is greater than max allowed: {self.max_logprobs}",
                              "BadRequestError")
        s = self.sampling(body)
        if s["temperature"] < GREEDY_EPS and s["n"] > 1:
            return vllm_error(400, f"n must be 1 when using greedy sampling, got {s['n']}.", "BadRequestError")
        return None

    def answer(self, body: dict, n: int) -> Reply:
        """The default answer (no scripted handler)."""
        s = self.sampling(body)
        users = [m for m in body["messages"] if isinstance(m, dict) and m.get("role") == "user"]
        last = users[-1].get("content") if users else ""
        last = last if isinstance(last, str) else " ".join(p.get("text", "") for p in last or [] if isinstance(p, dict))
        top = int(body.get("top_logprobs") or 0)
        choices, completion = [], 0
        for j in range(s["n"]):
            if top > 0:  # greedy: the token is the first of its top logprobs
                labels = self._label_logprobs(body)[:top]
                tokens, tops = [labels[0][0]], [labels]
            elif (body.get("response_format") or {}).get("type") == "json_schema":
                tokens, tops = token_split(json.dumps(_fill_schema(body["response_format"]["json_schema"]["schema"]))), None
            else:
                seed = f" [seed {s['seed'] + j}]" if s["seed"] is not None else ""
                tokens, tops = token_split(f"answer {j} to: {last[:40]}{seed}"), None
            cut = len(tokens) > s["max_tokens"]
            tokens = tokens[: s["max_tokens"]]
            completion += len(tokens)
            logprobs = None
            if body.get("logprobs"):
                logprobs = {"content": [_entry(t, -0.1 if tops is None else tops[i][0][1], [] if tops is None else tops[i])
                                        for i, t in enumerate(tokens)]}
            choices.append({"index": j, "message": {"role": "assistant", "content": "".join(tokens), "refusal": None,
                                                    "annotations": None, "audio": None, "function_call": None,
                                                    "reasoning": None},
                            "logprobs": logprobs, "finish_reason": "length" if cut else "stop", "stop_reason": None,
                            "token_ids": None, "routed_experts": None})
        prompt = sum(len(token_split(m.get("content") or "")) for m in body["messages"] if isinstance(m.get("content"), str))
        return Reply(json={"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                           "model": body["model"], "choices": choices, "service_tier": None, "system_fingerprint": None,
                           "usage": {"prompt_tokens": prompt, "total_tokens": prompt + completion,
                                     "completion_tokens": completion, "prompt_tokens_details": None,
                                     "completion_tokens_details": None},
                           "prompt_logprobs": None, "prompt_token_ids": None, "prompt_text": None, "kv_transfer_params": None,
                           "ec_transfer_params": None, "metrics": None})

    def _label_logprobs(self, body: dict) -> list[tuple[str, float]]:
        p_a = 0.8
        if self.varied_logprobs:
            x = int(hashlib.sha256(json.dumps(body["messages"], sort_keys=True).encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
            p_a = 0.05 + 0.9 * x
        pairs = [("A", math.log(p_a)), ("B", math.log(1 - p_a))]
        return sorted(pairs, key=lambda t: -t[1]) + [(f" x{i}", -12.0 - i) for i in range(MAX_LOGPROBS)]


# ------------------------------------------------------------------------------------------------- CLI


class _LoraModules(argparse.Action):
    """vLLM's LoRAParserAction, as vllm/entrypoints/openai/cli_args.py has it."""

    def __call__(self, parser, namespace, values, option_string=None):
        modules = []
        for item in values:
            if item in (None, ""):
                continue
            if "=" in item and "," not in item:  # the old form, name=path
                name, path = item.split("=")  # a second "=" raises ValueError, as in vLLM
                modules.append({"name": name, "path": path})
            else:
                try:
                    module = json.loads(item)
                except json.JSONDecodeError:
                    parser.error(f"Invalid JSON format for --lora-modules: {item}")
                if not isinstance(module, dict) or not {"name", "path"} <= set(module) or set(module) - {"name", "path", "base_model_name"}:
                    parser.error(f"Invalid fields for --lora-modules: {item} - LoRAModulePath needs name and path")
                modules.append(module)
        setattr(namespace, self.dest, modules)


def _free_memory_refusal(utilization: float) -> str | None:
    """vLLM's start-up check of free GPU memory, read from `nvidia-smi` (a fake one in tests) when it exists."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,memory.used,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.strip().splitlines():
        try:
            index, used, total = (int(x) for x in line.split(","))
        except ValueError:
            continue
        free, want = (total - used) / 1024, math.ceil(total * utilization) / 1024
        if free < want:
            return (f"ValueError: Free memory on device cuda:{index} ({free:.2f}/{total / 1024:.2f} GiB) on startup is less "
                    f"than desired GPU memory utilization ({utilization}, {want:.2f} GiB). Decrease GPU memory utilization "
                    f"or reduce GPU memory used by other processes.")
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.vllm_stub", description="FAKE `vllm serve` (tests only).")
    p.add_argument("subcommand", choices=["serve"])
    p.add_argument("model_tag", nargs="?")
    p.add_argument("--model")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", nargs="+", default=[])
    p.add_argument("--api-key", nargs="+", default=[])
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--max-logprobs", type=int, default=MAX_LOGPROBS)
    p.add_argument("--generation-config", default="auto")
    p.add_argument("--enable-lora", action="store_true")
    p.add_argument("--max-lora-rank", type=int, default=16)
    p.add_argument("--max-loras", type=int, default=1)
    p.add_argument("--lora-modules", nargs="+", action=_LoraModules, default=[])
    p.add_argument("--enable-sleep-mode", action="store_true")
    # the fake's own knobs
    p.add_argument("--startup-delay", type=float, default=0.0, help="seconds of 'model loading' before it listens")
    p.add_argument("--fail-start", action="store_true", help="log an engine error and exit 1 without listening")
    p.add_argument("--latency", type=float, default=0.0)
    p.add_argument("--varied-logprobs", action="store_true")
    args = p.parse_args(argv)
    model = args.model_tag or args.model
    if not model:
        p.error("a model is required (vllm serve MODEL, or --model)")
    print(f"vllm-stub: FAKE vLLM server (tests only), model {model}", flush=True)
    if args.fail_start:
        print("ERROR: RuntimeError: Engine core initialization failed. See root cause above.", flush=True)
        return 1
    refusal = _free_memory_refusal(args.gpu_memory_utilization)
    if refusal:
        print(refusal, flush=True)
        print("RuntimeError: Engine core initialization failed. See root cause above.", flush=True)
        return 1
    ranks = []
    for module in args.lora_modules:
        config = Path(module["path"]) / "adapter_config.json"
        if config.is_file():
            ranks.append(json.loads(config.read_text()).get("r", 0))
    if ranks and max(ranks) > args.max_lora_rank:  # vLLM: the adapter's rank must fit --max-lora-rank
        print(f"ValueError: LoRA rank {max(ranks)} is greater than max_lora_rank {args.max_lora_rank}.", flush=True)
        return 1
    if args.lora_modules and not args.enable_lora:
        print("ValueError: --lora-modules needs --enable-lora", flush=True)
        return 1
    keys = [k for k in (args.api_key or [os.environ.get("VLLM_API_KEY", "")]) if k]
    runtime = os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "0").strip().lower() in ("1", "true")
    vllm = Vllm(model=model, served_names=args.served_model_name, api_keys=keys, runtime_lora=runtime,
                max_logprobs=args.max_logprobs, max_model_len=args.max_model_len,
                defaults={} if args.generation_config == "vllm" else generation_defaults(model),
                varied_logprobs=args.varied_logprobs, sleep_mode=args.enable_sleep_mode,
                dev_mode=os.environ.get("VLLM_SERVER_DEV_MODE", "0").strip().lower() in ("1", "true"))
    if vllm.defaults:
        print(f"vllm-stub: default sampling parameters from the model's generation config: {vllm.defaults}", flush=True)
    for module in args.lora_modules:
        print(f"vllm-stub: LoRA module {module['name']} at {module['path']} (max rank {args.max_lora_rank})", flush=True)
        reply = vllm.add_adapter(module["name"], module["path"], module.get("base_model_name"))
        if reply.status != 200:
            print(f"ValueError: {reply.json['error']['message']}", flush=True)
            return 1
    if runtime:
        print("vllm-stub: LoRA dynamic loading & unloading is enabled in the API server.", flush=True)
    time.sleep(args.startup_delay)  # "loading the model": nothing listens yet

    import uvicorn

    from tests.openai_stub import _State, _uvicorn_config, build_app

    state = _State(None, args.latency, model, startup_delay=0.0, never_healthy=False, vllm=vllm, log_requests=True)
    print(f"vllm-stub: serving on http://{args.host}:{args.port}", flush=True)
    server = uvicorn.Server(_uvicorn_config(build_app(state), args.host, args.port, log_level="info"))
    server.run()
    if not server.started:
        print(f"ERROR: could not serve on {args.host}:{args.port}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

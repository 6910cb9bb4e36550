"""Serve a model with `vllm serve` in a process of its own, and sample from it over the OpenAI-compatible API.

Why a separate process: vLLM pins torch, transformers and friends to versions that cannot share an environment
with Prefect 3.8.8, so it is never imported here. It runs as its own executable (a virtualenv of its own, or the
`vllm/vllm-openai` container) and this module talks to it over HTTP with the `openai` client. Nothing here needs
vLLM, a GPU or Prefect; the tests run the same code against a scripted stand-in server (`tests/openai_stub.py`).

Use::

    from selfplay.serving import ModelServer, ServerSpec, sample_chat

    spec = ServerSpec(command=["/opt/vllm-venv/bin/vllm", "serve"], max_model_len=4096)
    with ModelServer(spec, "/runs/x/round-1/model", log_path=Path("/runs/x/round-1/vllm.log")) as server:
        samples = sample_chat(server.base_url, server.served_name, prompts,
                              n=4, temperature=0.9, top_p=0.95, max_tokens=256, seed=1)
    server.wait_gpu_free(120)   # before training on the same GPU in this process

    # samples[i][j] == {"response": str, "n_tokens": int, "truncated": bool}

The container instead (it listens on 8000 inside; the host port is substituted for "{port}")::

    ServerSpec(command=["docker", "run", "--rm", "--gpus", "all", "-p", "{port}:8000",
                        "-v", "/runs:/runs", "vllm/vllm-openai"],
               model_arg_style="flag", container_port=8000)

How the process is handled (`ModelServer`):

- `start()` refuses a port that is already taken (naming it), starts the command in a new session (its own
  process group) with stdout and stderr appended to `log_path` after a header line holding the command (values of
  key/token/secret flags redacted; the environment is never written), and polls `GET /health` until it answers
  200. If the process exits first, or `startup_timeout` passes, the process group is stopped and
  `ServerStartError` says why, with the exit code and the last lines the server logged in this start.
- `stop()` sends SIGTERM to the whole process group, SIGKILL when it outlives the timeout, and then waits until
  the port is free again, raising `ServerStopError` when it is not. It is idempotent; `__exit__` calls it.
- No server outlives its owner: a failed start stops what it started; servers still running when the
  interpreter exits are stopped by an `atexit` hook; and on Linux the server's leader process gets SIGTERM from
  the kernel (PR_SET_PDEATHSIG) when the owning process dies, even by SIGKILL. (A program that moves its own
  children into new sessions escapes the group signal; `vllm serve` does not. For `docker run`, SIGTERM reaches
  the container through docker's signal proxy; a `docker run` killed by SIGKILL leaves its container running, and
  the port check in `stop()` then fails loudly rather than silently.)

`ServerSpec` maps each vLLM option to a flag, and a `None` value leaves that flag out, so the same spec serves
`vllm serve`, the container, or any OpenAI-compatible server with fewer options (the tests' stub takes only
`--model`, `--host` and `--port`: `model_arg_style="flag"`, `served_name_flag=None`,
`gpu_memory_utilization=None`, `tensor_parallel_size=None`).
"""

from __future__ import annotations

import asyncio
import atexit
import errno
import json
import os
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from selfplay import processes
from selfplay.errors import SelfplayError
from selfplay.retry import backoff_seconds, retry_after_seconds, transient_errors

__all__ = [
    "ServerSpec",
    "ModelServer",
    "ServerStartError",
    "PortInUseError",
    "ServerStopError",
    "SamplingError",
    "LoraAdapterError",
    "build_command",
    "sample_chat",
    "asample_chat",
    "load_lora_adapter",
    "unload_lora_adapter",
    "port_is_free",
    "redact",
]


# --------------------------------------------------------------------------------------------------- spec


OPERATIONAL = {"affects_results": False}  # how and where the server runs, not what it answers


class ServerSpec(BaseModel):
    """How to start an OpenAI-compatible model server; `None` on an option leaves its flag out. Fields marked
    OPERATIONAL change no result (selfplay.backends.operational): a resume may change them."""

    model_config = ConfigDict(extra="forbid")

    command: list[str] = Field(
        default_factory=lambda: ["vllm", "serve"], min_length=1,
        json_schema_extra=OPERATIONAL, description="Executable and subcommand, e.g. ['/opt/vllm-venv/bin/vllm', 'serve'] or ['docker', 'run', '--rm', "
        "'--gpus', 'all', '-p', '{port}:8000', 'vllm/vllm-openai']; '{port}' in any item becomes the chosen port.")
    host: str = Field("127.0.0.1", json_schema_extra=OPERATIONAL, description="Address the server listens on and this process connects to.")
    port: int | None = Field(None, ge=1, le=65535, json_schema_extra=OPERATIONAL, description="Port on `host`; None picks a free one at start.")
    container_port: int | None = Field(
        None, ge=1, le=65535,
        json_schema_extra=OPERATIONAL, description="For a server in a container publishing '{port}:<container_port>': it is told to listen on "
        "0.0.0.0:<container_port> and is reached at host:port. None: it listens on host:port itself.")
    model_arg_style: Literal["positional", "flag"] = Field(
        "positional", description="How the model is passed: positionally (`vllm serve MODEL`) or as `--model MODEL` "
        "(the vllm/vllm-openai image).")
    served_name_flag: str | None = Field(
        "--served-model-name", description="Flag naming the model in the API; None leaves it out (the server then "
        "uses its own default name, for vLLM the model path).")
    gpu_memory_utilization: float | None = Field(
        0.85, gt=0, le=1, json_schema_extra=OPERATIONAL, description="--gpu-memory-utilization: fraction of GPU memory vLLM may take; None leaves it out.")
    tensor_parallel_size: int | None = Field(1, ge=1, description="--tensor-parallel-size; None leaves it out.")
    max_model_len: int | None = Field(None, ge=1, description="--max-model-len; None leaves it out (the model's own limit).")
    extra_args: list[str] = Field(
        default_factory=list, description="Appended as given, e.g. ['--enable-lora', '--max-lora-rank', '64']; "
        "'{port}' is substituted here too.")
    env: dict[str, str] = Field(
        default_factory=dict, json_schema_extra=OPERATIONAL, description="Variables added to the server's environment (never logged; keep secrets "
        "in the inherited environment, e.g. VLLM_API_KEY, rather than in a recipe).")
    cwd: str | None = Field(None, json_schema_extra=OPERATIONAL, description="Working directory of the server process; None: the current one.")
    startup_timeout: float = Field(600.0, gt=0, json_schema_extra=OPERATIONAL, description="Seconds to wait for GET /health to answer 200.")
    stop_timeout: float = Field(30.0, gt=0, json_schema_extra=OPERATIONAL, description="Seconds `stop()` (and leaving the `with` block) waits after "
                                "SIGTERM before SIGKILL, and again for the port to be free.")


def build_command(spec: ServerSpec, model_path: str, port: int, served_name: str | None) -> list[str]:
    """The server's argv (pure): `spec.command`, the model, the listen address, the options that are set, extras.

    >>> build_command(ServerSpec(), "/m", 8001, "policy")  # doctest: +NORMALIZE_WHITESPACE
    ['vllm', 'serve', '/m', '--host', '127.0.0.1', '--port', '8001', '--served-model-name', 'policy',
     '--gpu-memory-utilization', '0.85', '--tensor-parallel-size', '1']
    """
    def sub(item: str) -> str:
        return item.replace("{port}", str(port))

    argv = [sub(item) for item in spec.command]
    argv += [str(model_path)] if spec.model_arg_style == "positional" else ["--model", str(model_path)]
    if spec.container_port is not None:
        argv += ["--host", "0.0.0.0", "--port", str(spec.container_port)]
    else:
        argv += ["--host", spec.host, "--port", str(port)]
    if spec.served_name_flag and served_name:
        argv += [spec.served_name_flag, served_name]
    if spec.gpu_memory_utilization is not None:
        argv += ["--gpu-memory-utilization", str(spec.gpu_memory_utilization)]
    if spec.tensor_parallel_size is not None:
        argv += ["--tensor-parallel-size", str(spec.tensor_parallel_size)]
    if spec.max_model_len is not None:
        argv += ["--max-model-len", str(spec.max_model_len)]
    argv += [sub(item) for item in spec.extra_args]
    return argv


_SECRET_FLAG = re.compile(r"^--?[\w-]*(api[-_]?key|secret|password|passwd|hf[-_]token|auth[-_]?token)[\w-]*$", re.I)


def redact(argv: list[str]) -> list[str]:
    """argv with the values of key/token/secret/password flags replaced by REDACTED (for logs and errors)."""
    out, hide_next = [], False
    for item in argv:
        if hide_next:
            out.append("REDACTED")
            hide_next = False
            continue
        flag, eq, _ = item.partition("=")
        if _SECRET_FLAG.match(flag):
            if eq:
                out.append(f"{flag}=REDACTED")
            else:
                out.append(item)
                hide_next = True
        else:
            out.append(item)
    return out


# --------------------------------------------------------------------------------------------------- server


class ServerStartError(SelfplayError, RuntimeError):
    """The server did not come up: the port was taken, it exited, or it was not healthy in time."""


class PortInUseError(ServerStartError):
    """The port was already taken before anything was started."""


class ServerStopError(SelfplayError, RuntimeError):
    """The server was stopped but its port did not become free in time (something else still holds it)."""


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_is_free(host: str, port: int) -> bool:
    """Nobody accepts connections on host:port and a server could bind it (SO_REUSEADDR, as servers do)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.settimeout(1.0)
        try:
            s.connect((host, port))
            return False  # someone is listening
        except OSError:
            pass
    with socket.socket(family) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


_live: "set[ModelServer]" = set()  # started and not yet stopped
_live_lock = threading.Lock()


@atexit.register
def _stop_live_servers() -> None:
    with _live_lock:
        servers = list(_live)
    for server in servers:
        try:
            server.stop(timeout=10)
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


class ModelServer:
    """A `vllm serve` (or compatible) process, from `start()` until `stop()`; a context manager.

    Attributes after `start()`: `port`, `pid`, `command` (argv as run), and after `stop()`: `returncode`.
    """

    def __init__(self, spec: ServerSpec, model_path: str | os.PathLike, log_path: str | os.PathLike, served_name: str = "policy"):
        self.spec = spec
        self.model_path = str(model_path)
        self.log_path = Path(log_path)
        self.served_name = served_name
        self.port: int | None = spec.port
        self.command: list[str] | None = None
        self.pid: int | None = None
        self.returncode: int | None = None
        self._proc: subprocess.Popen | None = None
        self._log_offset = 0
        self._gpu_before: dict[int, tuple[int, int]] | None = None

    def __repr__(self) -> str:
        return f"ModelServer(model={self.model_path!r}, url={self.url if self.port else None!r}, pid={self.pid})"

    # ------------------------------------------------------------------------------------------- addresses

    @property
    def url(self) -> str:
        """http://host:port (the server's root: /health lives here)."""
        if self.port is None:
            raise RuntimeError("the server has no port yet: call start() first")
        return f"http://{_url_host(self.spec.host)}:{self.port}"

    @property
    def base_url(self) -> str:
        """http://host:port/v1, for the `openai` client and `sample_chat`."""
        return f"{self.url}/v1"

    @property
    def api_model(self) -> str:
        """The model name requests must use: the served name when the command sets one, else the model path (what
        vLLM calls a model it was given no name for)."""
        return self.served_name if self.spec.served_name_flag else self.model_path

    @property
    def api_key(self) -> str:
        """The key the started server expects: vLLM reads VLLM_API_KEY from the environment it inherits (or from
        `spec.env`); 'EMPTY' when neither sets one."""
        return self.spec.env.get("VLLM_API_KEY") or os.environ.get("VLLM_API_KEY") or "EMPTY"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # ------------------------------------------------------------------------------------------- lifecycle

    def start(self) -> "ModelServer":
        """Start the server and wait until it is healthy; raise `ServerStartError` (nothing left running) if not."""
        if self._proc is not None:
            raise RuntimeError(f"{self!r} is already started")
        spec = self.spec
        self.port = spec.port if spec.port is not None else _free_port(spec.host)
        if not port_is_free(spec.host, self.port):
            raise PortInUseError(f"port {self.port} on {spec.host} is already in use; stop what holds it or choose "
                                 f"another port (ServerSpec.port, or None for a free one)")
        self.command = build_command(spec, self.model_path, self.port, self.served_name)
        self.returncode = None
        self._gpu_before = gpu_memory_mib()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            log.write(f"[selfplay.serving {stamp}] starting on {self.url}: {shlex.join(redact(self.command))}\n".encode())
            log.flush()
            self._log_offset = log.tell()
            env = {**os.environ, "PYTHONUNBUFFERED": "1", **spec.env}
            try:
                # forked from one long-lived thread: the kernel's parent-death signal follows the forking thread, and a
                # Prefect task thread may end long before the server should
                self._proc = processes.spawn(self.command, long_lived=True, stdin=subprocess.DEVNULL, stdout=log,
                                             stderr=subprocess.STDOUT, cwd=spec.cwd, env=env)
            except OSError as exc:
                raise ServerStartError(f"cannot run {shlex.join(redact(self.command))}: {exc}") from None
        self.pid = self._proc.pid
        with _live_lock:
            _live.add(self)
        try:
            failure = self._wait_healthy(spec.startup_timeout)
        except BaseException:
            self._stop_quietly()
            raise
        if failure is not None:
            self._stop_quietly()  # first, so that the tail holds the server's last words
            raise ServerStartError(f"{failure}; last lines of {self.log_path}:\n{self.log_tail()}")
        return self

    def _stop_quietly(self) -> None:
        try:
            self.stop()
        except ServerStopError:
            pass  # the start error says more; the port check is best effort here

    def _wait_healthy(self, timeout: float) -> str | None:
        """None once GET /health answers 200; otherwise why not (the process exited, or the time ran out)."""
        import httpx

        deadline = time.monotonic() + timeout
        proc = self._proc
        with httpx.Client(timeout=5.0, trust_env=False) as client:
            while True:
                code = proc.poll()
                if code is not None:
                    return f"the server exited with code {code} before it was healthy"
                try:
                    if client.get(f"{self.url}/health").status_code == 200:
                        return None
                except httpx.HTTPError:
                    pass
                if time.monotonic() >= deadline:
                    return f"the server did not become healthy within {timeout:g} s (GET {self.url}/health)"
                time.sleep(min(0.25, max(0.0, deadline - time.monotonic())))

    def log_tail(self, lines: int = 40) -> str:
        """The last `lines` lines the server logged since this start."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                end = f.tell()
                start = max(self._log_offset, end - 64 * 1024)
                f.seek(start)
                text = f.read().decode("utf-8", errors="replace")
        except OSError as exc:
            return f"(cannot read the log: {exc})"
        tail = text.splitlines()[-lines:]
        return "\n".join(tail) if tail else "(the server logged nothing)"

    def _terminate(self, timeout: float) -> None:
        """SIGTERM the process group, SIGKILL what outlives `timeout`; reap the leader."""
        proc = self._proc
        if proc is None:
            return
        pgid = proc.pid  # start_new_session: the leader's pid is the group id
        deadline = time.monotonic() + timeout

        def signal_group(sig: int) -> bool:
            return processes.signal_group(pgid, sig)

        signal_group(signal.SIGTERM)
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            signal_group(signal.SIGKILL)
            proc.wait()
        # The leader is gone; members of its group (workers) get the rest of the time, then SIGKILL.
        while signal_group(0):
            if time.monotonic() >= deadline:
                signal_group(signal.SIGKILL)
                killed_by = time.monotonic() + 5.0  # SIGKILL is delivered asynchronously
                while signal_group(0) and time.monotonic() < killed_by:
                    time.sleep(0.05)
                break
            time.sleep(0.05)
        self.returncode = proc.returncode
        processes.forget(proc)

    def stop(self, timeout: float | None = None) -> None:
        """Stop the server's process group and wait for its port to be free; a no-op when not running."""
        proc = self._proc
        if proc is None:
            return
        timeout = self.spec.stop_timeout if timeout is None else timeout
        try:
            self._terminate(timeout)
        finally:
            self._proc = None
            with _live_lock:
                _live.discard(self)
            try:
                with open(self.log_path, "ab") as log:
                    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
                    log.write(f"[selfplay.serving {stamp}] stopped, exit code {self.returncode}\n".encode())
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        while not port_is_free(self.spec.host, self.port):
            if time.monotonic() >= deadline:
                raise ServerStopError(
                    f"the server (pid {self.pid}) was stopped but port {self.port} on {self.spec.host} is still in use "
                    f"after {timeout:g} s; something else holds it (for docker run: a container left running?)")
            time.sleep(0.1)

    def wait_gpu_free(self, timeout: float = 120.0, tolerance: float = 0.02) -> bool:
        """Wait until every visible GPU's used memory is back to what it was before `start()` (within `tolerance` of
        its total), so another server, a resident judge or a stage before this one does not count against it.

        A stopped vLLM's memory returns to the driver a moment after its processes exit; call this before the GPU is
        used again (training). Reads NVIDIA's management library through `nvidia-smi`, which creates no CUDA context
        in this process. Returns True once recovered, False when `timeout` passed first; True at once where there
        is no `nvidia-smi` (no NVIDIA GPU) or nothing was recorded at start.
        """
        before = self._gpu_before
        if before is None:
            return True
        deadline = time.monotonic() + timeout
        while True:
            now = gpu_memory_mib()
            if now is None or all(used <= before.get(gpu, (0, total))[0] + tolerance * total for gpu, (used, total) in now.items()):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.5)

    def __enter__(self) -> "ModelServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------------- sampling


class SamplingError(SelfplayError, RuntimeError):
    """A prompt's request failed after its retries, or was refused (4xx other than 429)."""


class _MalformedReply(Exception):
    """A 200 reply without the expected choices: retried."""


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
) -> list[list[dict]]:
    """The async form of `sample_chat` (same arguments, same result)."""
    import openai

    if n < 1 or max_concurrency < 1:
        raise ValueError("n and max_concurrency must be at least 1")
    retryable = transient_errors(_MalformedReply)
    limit = asyncio.Semaphore(max_concurrency)
    rng = random.Random(seed)

    async def one(client: openai.AsyncOpenAI, index: int, prompt: str) -> list[dict]:
        messages = ([{"role": "system", "content": system}] if system is not None else []) + [{"role": "user", "content": prompt}]
        request: dict[str, Any] = dict(model=model, messages=messages, n=n, temperature=temperature, top_p=top_p,
                                       max_tokens=max_tokens)
        if seed is not None:
            request["seed"] = seed + index
        if exact_tokens:
            request["logprobs"] = True
        if extra_body:
            request["extra_body"] = extra_body
        for attempt in range(max_retries + 1):
            try:
                async with limit:
                    reply = await client.chat.completions.create(**request)
                choices = sorted(reply.choices or [], key=lambda c: c.index)
                if len(choices) != n:
                    raise _MalformedReply(f"asked for {n} choices, got {len(choices)}")
                break
            except retryable as exc:
                if attempt == max_retries:
                    raise SamplingError(f"prompt {index}: failed after {max_retries + 1} attempts: "
                                        f"{type(exc).__name__}: {str(exc)[:300]}") from exc
                await asyncio.sleep(backoff_seconds(attempt, retry_after_seconds(exc), rng))
            except openai.APIStatusError as exc:  # 4xx other than 429: the request itself is wrong
                raise SamplingError(f"prompt {index}: the server refused the request ({exc.status_code}): "
                                    f"{str(exc)[:300]}") from exc
        texts = [(c.message.content or "").strip() if c.message else "" for c in choices]
        total = getattr(reply.usage, "completion_tokens", None) if reply.usage else None
        counts = _split_tokens(total, texts)
        if exact_tokens:
            counts = [len(c.logprobs.content) if c.logprobs and c.logprobs.content is not None else k
                      for c, k in zip(choices, counts)]
        return [{"response": t, "n_tokens": int(k), "truncated": c.finish_reason == "length"}
                for t, k, c in zip(texts, counts, choices)]

    async with openai.AsyncOpenAI(base_url=base_url, api_key=api_key, timeout=timeout, max_retries=0) as client:
        tasks = [asyncio.ensure_future(one(client, i, p)) for i, p in enumerate(prompts)]
        if not tasks:
            return []
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        failures = [task.exception() for task in tasks if task in done]  # retrieves every one: no stray warnings
        for exc in failures:  # the first failure in prompt order
            if exc is not None:
                raise exc
        return [task.result() for task in tasks]


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
) -> list[list[dict]]:
    """`n` sampled chat completions per prompt from an OpenAI-compatible server; callable from sync code.

    One request per prompt (`messages` = [system?, user], `n=n`, `seed=seed + index`: different prompts get
    different seeds, and a rerun asks for exactly the same thing), at most `max_concurrency` in flight. 429, 5xx,
    timeouts, connection errors and replies without `n` choices are retried up to `max_retries` times with
    exponential backoff and full jitter (at least what Retry-After asks); a prompt still failing, or a 4xx, raises
    `SamplingError`. `extra_body` carries server-specific sampling options (vLLM: top_k, min_p, ...).

    Returns, per prompt in order, `n` dicts in choice order: `response` (the text, stripped), `truncated`
    (finish_reason == "length") and `n_tokens`. OpenAI-compatible servers report only the total completion tokens
    of a request, so `n_tokens` is exact when n == 1 and otherwise that total split across the choices in
    proportion to their word counts (an estimate on the token scale, summing to the reported total); a server
    reporting no usage gives the word count `len(text.split())`. With `exact_tokens=True` each choice's token
    count is read from per-token logprobs requested for it (exact, at the cost of a larger reply).

    Called inside a running event loop (an async Prefect flow) it runs its own loop in a separate thread; async
    code may await `asample_chat` instead.
    """
    coro = asample_chat(
        base_url, model, prompts, n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed,
        max_concurrency=max_concurrency, api_key=api_key, timeout=timeout, system=system, max_retries=max_retries,
        exact_tokens=exact_tokens, extra_body=extra_body)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["out"] = asyncio.run(coro)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            box["err"] = exc

    thread = threading.Thread(target=run, name="selfplay-sample-chat")
    thread.start()
    thread.join()
    if "err" in box:
        raise box["err"]
    return box["out"]


# --------------------------------------------------------------------------------------------------- GPU memory


def gpu_memory_mib() -> dict[int, tuple[int, int]] | None:
    """{GPU index: (used MiB, total MiB)} for the GPUs CUDA_VISIBLE_DEVICES lets us use, from `nvidia-smi` (NVML:
    no CUDA context is created); None where there is no `nvidia-smi` or it fails."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,memory.used,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        rows = {int(i): (int(u), int(t)) for i, u, t in (line.split(",") for line in out.strip().splitlines())}
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and all(part.strip().isdigit() for part in visible.split(",") if part.strip()):
        keep = {int(part) for part in visible.split(",") if part.strip()}
        rows = {i: row for i, row in rows.items() if i in keep}
    return rows


# --------------------------------------------------------------------------------------------------- LoRA


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
        message = (payload.get("error") or {}).get("message") if isinstance(payload.get("error"), dict) else None
        message = message or payload.get("message") or payload.get("detail") or reply.text
    except ValueError:
        message = reply.text
    hint = ""
    if reply.status_code in (404, 405):
        hint = ("; start vLLM with --enable-lora and the environment variable VLLM_ALLOW_RUNTIME_LORA_UPDATING=True "
                "to load adapters at runtime")
    raise LoraAdapterError(f"POST {url} answered {reply.status_code}: {str(message)[:1000]}{hint}")


VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def adapter_name(run_name: str, adapter: str | os.PathLike) -> str:
    """The name a round's adapter is served under: the run and the round directory, e.g. 'nightly-round_3'.

    >>> adapter_name("nightly", "/runs/nightly/round_3/train/checkpoint")
    'nightly-round_3'
    """
    return f"{run_name}-{Path(adapter).parent.parent.name}"


def lora_args(name: str, adapter: str | os.PathLike, rank: int) -> list[str]:
    """`vllm serve` flags that serve the adapter at `adapter` as model `name` over the base model (pure).

    >>> lora_args("run-round_1", "/runs/run/round_1/train/checkpoint", 12)
    ['--enable-lora', '--max-lora-rank', '16', '--lora-modules', 'run-round_1=/runs/run/round_1/train/checkpoint']
    """
    max_rank = next((r for r in VLLM_LORA_RANKS if r >= rank), rank)
    return ["--enable-lora", "--max-lora-rank", str(max_rank), "--lora-modules", f"{name}={adapter}"]


def serving_plan(spec: ServerSpec, model: str | os.PathLike, lora_name: str) -> tuple[ServerSpec, str, str | None]:
    """How to serve a checkpoint: (the server spec, the model to start it on, the model name to request or None
    for the served name). A LoRA adapter directory is served over its base model, as `lora_name`."""
    from selfplay.models import adapter_base, is_adapter

    if not is_adapter(model):
        return spec, str(model), None
    adapter = Path(model).resolve()
    rank = json.loads((adapter / "adapter_config.json").read_text())["r"]
    return spec.model_copy(update={"extra_args": [*spec.extra_args, *lora_args(lora_name, adapter, rank)]}), adapter_base(adapter), lora_name


def load_lora_adapter(base_url: str, name: str, path: str | os.PathLike, api_key: str = "EMPTY", timeout: float = 300.0) -> None:
    """Load the LoRA adapter at `path` (as the server sees it) under `name`; requests may then use model=`name`.

    POSTs {"lora_name", "lora_path"} to `<root>/v1/load_lora_adapter` (`base_url` with or without the /v1);
    raises `LoraAdapterError` with the server's message on any answer but 200.
    """
    _lora_call("load_lora_adapter", base_url, {"lora_name": name, "lora_path": str(path)}, api_key, timeout)


def unload_lora_adapter(base_url: str, name: str, api_key: str = "EMPTY", timeout: float = 60.0) -> None:
    """Unload the adapter loaded under `name` (POST `<root>/v1/unload_lora_adapter`)."""
    _lora_call("unload_lora_adapter", base_url, {"lora_name": name}, api_key, timeout)

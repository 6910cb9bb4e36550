"""A model server (`vllm serve` or any OpenAI-compatible server) in a process of its own, from start to stop.

Why a separate process: vLLM pins torch, transformers and friends to versions that cannot share an environment
with Prefect, so it is never imported here. It runs as its own executable (a virtualenv of its own, or the
`vllm/vllm-openai` container) and is talked to over HTTP (`selfplay.serving.openai_client`). Nothing here needs vLLM, a
GPU or Prefect; the tests run the same code against a scripted stand-in server (`tests/openai_stub.py`).

    spec = ServerSpec(command=["/opt/vllm-venv/bin/vllm", "serve"], max_model_len=4096)
    with ModelServer(spec, "/runs/x/round-1/model", log_path=Path("/runs/x/round-1/vllm.log")) as server:
        samples = sample_chat(server.base_url, server.api_model, prompts, api_key=server.api_key,
                              n=4, temperature=0.9, top_p=0.95, max_tokens=256, seed=1)
    server.wait_gpu_free()   # before training on the same GPU (up to spec.gpu_free_timeout seconds)

How the process is handled:

- `start()` refuses a port that is already taken (naming it), waits up to `gpu_free_timeout` for the free GPU
  memory vLLM needs to start (`gpu_memory_utilization` x total on each visible GPU) and otherwise fails naming
  the processes that hold it (`selfplay.serving.gpu.wait_memory_for`), starts the command in a new session (its own
  process group, `selfplay.runtime.processes`) with stdout and stderr appended to `log_path` after a header line holding
  the command (values of key/token/secret flags redacted; the environment is never written), and polls
  `GET /health` until it answers 200. If the process exits first, or `startup_timeout` passes, the process group
  is stopped and `ServerStartError` says why, with the exit code and the last lines the server logged in this start.
- `stop()` sends SIGTERM to the whole process group, SIGKILL when it outlives the timeout, and then waits until
  the port is free again, raising `ServerStopError` when it is not. It is idempotent; `__exit__` calls it.
- No server outlives its owner: a failed start stops what it started; servers still running when the
  interpreter exits are stopped by an `atexit` hook; and on Linux the server's leader process gets SIGTERM from
  the kernel (PR_SET_PDEATHSIG) when the owning process dies, even by SIGKILL. (A program that moves its own
  children into new sessions escapes the group signal; `vllm serve` does not. For `docker run`, SIGTERM reaches
  the container through docker's signal proxy; a `docker run` killed by SIGKILL leaves its container running, and
  the port check in `stop()` then fails loudly rather than silently.)
"""

from __future__ import annotations

import atexit
import os
import re
import shlex
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from selfplay.config.server import ServerSpec, build_command, redact
from selfplay.errors import SelfplayError
from selfplay.runtime import processes
from selfplay.runtime.processes import free_port, port_is_free
from selfplay.serving import gpu

__all__ = ["ModelServer", "ServerStartError", "PortInUseError", "ServerStopError", "port_is_free"]


class ServerStartError(SelfplayError, RuntimeError):
    """The server did not come up: the port was taken, it exited, or it was not healthy in time."""


class PortInUseError(ServerStartError):
    """The port was already taken before anything was started."""


class ServerStopError(SelfplayError, RuntimeError):
    """The server was stopped but its port did not become free in time (something else still holds it)."""


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


# What buries a dying vLLM's real last words: nanobind's leak report (Triton's bindings), the resource tracker's leak
# warning, and uvicorn's access log (one line per request: a dead engine answers each request in flight with a 500).
_LOG_NOISE = re.compile(r"^(nanobind: | - leaked | {1,2}- \.\.\. skipped|See https://nanobind)|resource_tracker|^\s+warnings\.warn\("
                        r"|^(\(APIServer pid=\d+\) )?INFO: +[\w.:\[\]-]+:\d+ - \"")

_live: set[ModelServer] = set()  # started and not yet stopped
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
        self.version: str | None = None  # what GET /version reports once started (vLLM does; other servers may not)
        self.startup_s: float | None = None  # seconds from the process's start to a healthy /health

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

    def start(self) -> ModelServer:
        """Start the server and wait until it is healthy; raise `ServerStartError` (nothing left running) if not."""
        if self._proc is not None:
            raise RuntimeError(f"{self!r} is already started")
        spec = self.spec
        self.port = spec.port if spec.port is not None else free_port(spec.host)
        if not port_is_free(spec.host, self.port):
            raise PortInUseError(f"port {self.port} on {spec.host} is already in use; stop what holds it or choose "
                                 f"another port (ServerSpec.port, or None for a free one)")
        self.command = build_command(spec, self.model_path, self.port, self.served_name)
        self.returncode = None
        if spec.gpu_memory_utilization is not None:
            # vLLM refuses to start below this with an error naming no cause: wait for it, then name the holders
            short = gpu.wait_memory_for(spec.gpu_memory_utilization, spec.gpu_free_timeout)
            if short is not None:
                raise ServerStartError(f"not starting {shlex.join(redact(self.command[:3]))} ...: {short}")
        self._gpu_before = gpu.gpu_memory_mib()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            log.write(f"[{__name__} {stamp}] starting on {self.url}: {shlex.join(redact(self.command))}\n".encode())
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
        began = time.monotonic()
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
        self.version = self._reported_version()
        self.startup_s = time.monotonic() - began
        try:
            with open(self.log_path, "ab") as log:
                log.write(f"[{__name__} {time.strftime('%Y-%m-%d %H:%M:%S')}] healthy after {self.startup_s:.1f} s\n".encode())
        except OSError:
            pass
        return self

    def _reported_version(self) -> str | None:
        """The version GET /version reports (vLLM's `{"version": ...}`), or None where there is no such route."""
        import httpx

        try:
            reply = httpx.get(f"{self.url}/version", timeout=5.0, trust_env=False)
            version = reply.json().get("version") if reply.status_code == 200 else None
        except (httpx.HTTPError, ValueError, AttributeError):
            return None
        return str(version) if version else None

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

    def problem(self) -> str | None:
        """None while the server is alive; else what is wrong, with the last lines it logged: its process exited, or
        GET /health answers but not 200 (vLLM answers 503 once its engine process is dead while the API process lives
        on). A /health that does not answer in time is not counted: a busy server on a small machine is slow, not dead.
        Passed as `watch` to `sample_chat` and `OpenAIJudge`, so that requests in flight fail at once with the cause."""
        import httpx

        proc = self._proc
        if proc is None:
            return f"the server on {self.model_path} is not running (stopped, or never started)"
        if proc.poll() is None:
            try:
                status: int | None = httpx.get(f"{self.url}/health", timeout=5.0, trust_env=False).status_code
            except httpx.TimeoutException:
                return None
            except httpx.HTTPError:
                status = None  # refused: it no longer listens
            if status == 200:
                return None
            time.sleep(1.0)  # a process on its way out: let it go, so that its exit code is the message
            if proc.poll() is None:
                said = f"GET /health answered {status}" if status is not None else f"it no longer accepts connections on {self.url}"
                return f"the server (pid {self.pid}) is running but its engine is not ({said}); last lines of {self.log_path}:\n{self.log_tail()}"
        return f"the server (pid {self.pid}) exited with code {proc.poll()}; last lines of {self.log_path}:\n{self.log_tail()}"

    def log_tail(self, lines: int = 40) -> str:
        """The last `lines` lines the server logged since this start, less the leak reports its dying interpreters
        print (vLLM's CPU build: hundreds of "nanobind: leaked ..." lines after the traceback that says why) and the
        access log's lines."""
        return processes.log_tail(self.log_path, lines, start=self._log_offset, noise=_LOG_NOISE)

    def stop(self, timeout: float | None = None) -> None:
        """Stop the server's process group and wait for its port to be free; a no-op when not running."""
        proc = self._proc
        if proc is None:
            return
        timeout = self.spec.stop_timeout if timeout is None else timeout
        try:
            self.returncode = processes.kill_group(proc, grace=timeout)
        finally:
            self._proc = None
            with _live_lock:
                _live.discard(self)
            try:
                with open(self.log_path, "ab") as log:
                    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
                    log.write(f"[{__name__} {stamp}] stopped, exit code {self.returncode}\n".encode())
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        while not port_is_free(self.spec.host, self.port):
            if time.monotonic() >= deadline:
                raise ServerStopError(
                    f"the server (pid {self.pid}) was stopped but port {self.port} on {self.spec.host} is still in use "
                    f"after {timeout:g} s; something else holds it (for docker run: a container left running?)")
            time.sleep(0.1)

    def wait_gpu_free(self, timeout: float | None = None, tolerance: float = 0.02) -> bool:
        """Wait until every visible GPU's used memory is back to what it was before `start()` (within `tolerance` of
        its total), up to `timeout` seconds (default `spec.gpu_free_timeout`); call it before the GPU is used again.
        False when the time ran out; True at once without `nvidia-smi` (see `selfplay.serving.gpu.wait_gpu_free`)."""
        timeout = self.spec.gpu_free_timeout if timeout is None else timeout
        return gpu.wait_gpu_free(self._gpu_before, timeout, tolerance)

    def __enter__(self) -> ModelServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

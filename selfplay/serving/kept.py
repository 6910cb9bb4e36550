"""One vLLM server kept for a whole run, instead of one per stage (`sample.server_scope` / `judge.server_scope: run`).

A round used to start a server to sample, and one or two more for the evaluation's answers; each start costs 40-90 s
on a CPU and minutes for a large model on a GPU. Like TRL, OpenRLHF and verl, a run now keeps one engine and changes
what it serves:

- **Adapter checkpoints** (`train.merge: false`): the server runs on the base model with `--enable-lora` (a rank that
  fits `train.lora.r`) and `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`; each round's adapter is loaded at runtime
  (POST /v1/load_lora_adapter) under `<run>-round_<k>` and requested by that name; adapters no longer asked for are
  unloaded, the last two kept (the evaluation compares the new round with the one before). One start per run.
- **Merged checkpoints:** the new weights are loaded into the running engine (vLLM's development API: POST
  /collective_rpc {"method": "reload_weights", "kwargs": {"weights_path": ...}}, then POST /reset_prefix_cache so no
  cached prefix of the old weights is reused). The server is started with `VLLM_SERVER_DEV_MODE=1` for this; where the
  route is missing or the reload fails, the server is restarted on the new checkpoint, with a warning saying why.
- **On a GPU** (`gpu_memory_utilization` set) the server must give the memory back for training: `release()` (called by
  the train stage) puts it to sleep (POST /sleep?level=1: weights offloaded to CPU memory, KV cache freed; it needs
  `--enable-sleep-mode`, added here) and the next request wakes it (POST /wake_up). Where sleeping fails it is stopped,
  and started again when next needed. On a CPU it simply stays up: idle, vLLM takes no CPU time (measured).
- **A server that dies** (its process exits, or its engine: `ModelServer.problem`) is restarted once per run with a
  warning naming the cause, and the work in flight is asked again; a second death fails the stage with the cause.
  A run killed outright takes its server with it (the kernel's parent-death signal, `ModelServer`), so a rerun finds
  the port free and starts a new one.

`kept_servers(cfg)` opens the run's registry (flows/self_play.py's `run_rounds`); stages call `kept_server(cfg, role)`,
None when the registry is not open (a stage run on its own) or the scope is `stage`, and then start a server of their own.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from selfplay.config.server import ServerSpec
from selfplay.errors import SelfplayError

__all__ = ["KeptServer", "kept_servers", "kept_server", "release_gpu", "reload_weights", "WeightReloadError"]

T = TypeVar("T")

_registry: dict[str, KeptServer] | None = None
_registry_lock = threading.Lock()


class WeightReloadError(SelfplayError, RuntimeError):
    """The running server could not load new weights in place."""


def _post(server, path: str, *, json: dict | None = None, timeout: float = 600.0):
    import httpx

    return httpx.post(f"{server.url}{path}", json=json, headers={"Authorization": f"Bearer {server.api_key}"}, timeout=timeout,
                      trust_env=False)


def reload_weights(server, weights_path: str) -> None:
    """Load the checkpoint at `weights_path` into the running vLLM `server` in place (same architecture and shapes),
    and drop its prefix cache. Needs VLLM_SERVER_DEV_MODE=1 on the server; raises `WeightReloadError` with vLLM's
    answer otherwise."""
    import httpx

    try:
        reply = _post(server, "/collective_rpc", json={"method": "reload_weights", "kwargs": {"weights_path": str(weights_path)}})
        if reply.status_code == 200:
            reply = _post(server, "/reset_prefix_cache", timeout=60.0)
    except httpx.HTTPError as exc:
        raise WeightReloadError(f"reloading weights from {weights_path}: {type(exc).__name__}: {exc}") from None
    if reply.status_code != 200:
        hint = " (the route is missing: the server needs VLLM_SERVER_DEV_MODE=1)" if reply.status_code == 404 else ""
        raise WeightReloadError(f"reloading weights from {weights_path}: {reply.request.url.path} answered {reply.status_code}: "
                                f"{reply.text[:500]}{hint}")


class KeptServer:
    """One role's server (`policy` or `judge`) kept across a run's stages: see the module's docstring.

    `run(model, work)` calls `work(server, request_name)` with a server that serves `model` (a full checkpoint or a LoRA
    adapter directory), starting, reloading or loading into it as needed, and asks again once after a restart if the
    server dies meanwhile. Thread-safe: one caller at a time.
    """

    def __init__(self, role: str, spec: ServerSpec, log_path: Path, run_name: str, lora_rank: int | None, log=None,
                 run_dir: Path | None = None):
        self.role, self.run_name, self.log_path, self.run_dir = role, run_name, Path(log_path), run_dir
        self.log = log or logging.getLogger(__name__)
        self.adapters = lora_rank is not None
        self.spec = self._spec(spec, lora_rank)
        self.server = None
        self.weights: str | None = None  # the full model the engine holds now
        self.loaded: dict[str, str] = {}  # adapter name -> path, oldest first
        self.starts = 0
        self.restarts_left = 1
        self.asleep = False
        self._lock = threading.RLock()

    @staticmethod
    def _spec(spec: ServerSpec, lora_rank: int | None) -> ServerSpec:
        from selfplay.serving.lora import VLLM_LORA_RANKS

        extra, env = list(spec.extra_args), {**spec.env, "VLLM_SERVER_DEV_MODE": "1"}
        if lora_rank is not None:
            rank = next((r for r in VLLM_LORA_RANKS if r >= lora_rank), lora_rank)
            if "--enable-lora" not in extra:
                extra.append("--enable-lora")
            if "--max-lora-rank" not in extra:
                extra += ["--max-lora-rank", str(rank)]
            if "--max-loras" not in extra:
                extra += ["--max-loras", "2"]
            env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
        if spec.gpu_memory_utilization is not None and "--enable-sleep-mode" not in extra:
            extra.append("--enable-sleep-mode")
        return spec.model_copy(update={"extra_args": extra, "env": env})

    # ------------------------------------------------------------------------------------------- serving

    def run(self, model: str, work: Callable[[Any, str], T], what: str) -> T:
        """`work(server, request_name)` against a server serving `model`; `what` names the work in messages."""
        from selfplay.serving.openai_client import ServerDied

        release_gpu(but=self)  # a policy and a judge server kept on one GPU take turns: the other sleeps
        with self._lock:
            while True:
                server, name = self._serve(model, what)
                try:
                    return work(server, name)
                except ServerDied as died:
                    self._died(str(died), what)

    def _died(self, why: str, what: str) -> None:
        from selfplay.serving.openai_client import ServerDied

        self._stop()
        if self.restarts_left <= 0:
            raise ServerDied(f"the {self.role} server died again during {what}, after its restart: {why}") from None
        self.restarts_left -= 1
        self.log.warning("the %s server died during %s; starting it again (once per run) and asking again. Cause: %s", self.role, what, why)

    def _serve(self, model: str, what: str) -> tuple[Any, str]:
        from selfplay.inputs.models import adapter_base, is_adapter
        from selfplay.serving.lora import adapter_name

        adapter = str(Path(model).resolve()) if is_adapter(model) else None
        weights = str(Path(adapter_base(adapter)).resolve()) if adapter else str(Path(model).resolve()) if Path(model).exists() else model
        if adapter and not self.adapters:
            raise ValueError(f"the kept {self.role} server was started without LoRA and cannot serve the adapter {adapter}")
        if self.server is not None and (why := self.server.problem()) is not None:
            self._died(why, f"the wait before {what}")
        if self.server is None:
            self._start(weights, what)
        elif self.asleep:
            self._wake()
        if self.weights != weights:
            self._reload(weights, what)
        if adapter is None:
            return self.server, self.server.api_model
        name = adapter_name(self.run_name, adapter)
        self._load(name, adapter)
        return self.server, name

    def _start(self, weights: str, what: str) -> None:
        from selfplay.runtime.rundir import note_server_version
        from selfplay.serving.model_server import ModelServer

        self.server = ModelServer(self.spec, weights, self.log_path, served_name=self.role).start()
        self.starts += 1
        self.weights, self.loaded, self.asleep = weights, {}, False
        self.log.info("vLLM server for the %s started on %s at %s, kept for the run (start %d of this run, for %s; log %s)",
                      self.role, weights, self.server.url, self.starts, what, self.log_path)
        if self.run_dir is not None:
            note_server_version(self.run_dir, self.server.version, self.log)

    def _reload(self, weights: str, what: str) -> None:
        try:
            reload_weights(self.server, weights)
        except WeightReloadError as exc:
            self.log.warning("the kept %s server could not load %s in place (%s); restarting it on that checkpoint", self.role, weights, exc)
            self._stop()
            self._start(weights, what)
            return
        self.weights, self.loaded = weights, {}  # vLLM resets its LoRA state with the weights
        self.log.info("the kept %s server now holds %s (weights reloaded in place)", self.role, weights)

    def _load(self, name: str, adapter: str) -> None:
        from selfplay.serving.lora import LoraAdapterError, load_lora_adapter, unload_lora_adapter

        server = self.server
        if self.loaded.get(name) == adapter:
            self.loaded[name] = self.loaded.pop(name)  # most recently used last
            return
        if name in self.loaded:  # the same name for another directory: replace it
            with contextlib.suppress(LoraAdapterError):
                unload_lora_adapter(server.base_url, name, api_key=server.api_key)
            del self.loaded[name]
        while len(self.loaded) >= 2:
            old = next(iter(self.loaded))
            try:
                unload_lora_adapter(server.base_url, old, api_key=server.api_key)
            except LoraAdapterError as exc:
                self.log.warning("could not unload adapter %r from the kept %s server: %s", old, self.role, exc)
            del self.loaded[old]
        load_lora_adapter(server.base_url, name, adapter, api_key=server.api_key)
        self.loaded[name] = adapter
        self.log.info("adapter %s loaded into the kept %s server as %r", adapter, self.role, name)

    # ------------------------------------------------------------------------------------------- GPU turns

    def release(self) -> None:
        """Give the GPU memory back before training: sleep (level 1), else stop. A no-op on a CPU server."""
        with self._lock:
            if self.server is None or self.spec.gpu_memory_utilization is None or self.asleep:
                return
            try:
                reply = _post(self.server, "/sleep?level=1", timeout=300.0)
                ok = reply.status_code == 200
                why = f"POST /sleep answered {reply.status_code}: {reply.text[:300]}"
            except Exception as exc:  # noqa: BLE001 - any failure: stop it instead
                ok, why = False, f"{type(exc).__name__}: {exc}"
            if ok:
                self.asleep = True
                self.log.info("the kept %s server is asleep (its GPU memory given back for training)", self.role)
                return
            self.log.warning("the kept %s server could not sleep (%s); stopping it for training, it starts again when needed", self.role, why)
            server = self.server
            self._stop()
            if not server.wait_gpu_free():
                from selfplay.serving import gpu

                self.log.warning("GPU memory was not all given back after the %s server stopped; held by %s", self.role, gpu.holders())

    def _wake(self) -> None:
        try:
            reply = _post(self.server, "/wake_up", timeout=600.0)
            why = None if reply.status_code == 200 else f"POST /wake_up answered {reply.status_code}"
        except Exception as exc:  # noqa: BLE001 - any failure: restart it instead
            why = f"{type(exc).__name__}: {exc}"
        if why is not None:
            self.log.warning("the kept %s server did not wake (%s); restarting it", self.role, why)
            weights = self.weights
            self._stop()
            self._start(weights, "waking")
            return
        self.asleep = False

    # ------------------------------------------------------------------------------------------- stop

    def _stop(self) -> None:
        if self.server is not None:
            try:
                self.server.stop()
            finally:
                self.server, self.weights, self.loaded, self.asleep = None, None, {}, False

    def close(self) -> None:
        with self._lock:
            self._stop()


@contextlib.contextmanager
def kept_servers(cfg) -> Iterator[dict[str, KeptServer]]:
    """The run's kept servers, opened for `run_rounds` and stopped when it ends, however it ends."""
    global _registry
    with _registry_lock:
        outer, _registry = _registry, {}
        mine = _registry
    try:
        yield mine
    finally:
        for kept in list(mine.values()):
            try:
                kept.close()
            except Exception as exc:  # noqa: BLE001 - the run's own outcome matters more
                logging.getLogger(__name__).warning("stopping the kept %s server: %s", kept.role, exc)
        with _registry_lock:
            _registry = outer


def kept_server(cfg, role: str, log=None) -> KeptServer | None:
    """The run's kept server for `role` ('policy': sample.server; 'judge': judge.server), created on first use; None
    when no registry is open or the section's `server_scope` is `stage`."""
    section = cfg.sample if role == "policy" else cfg.judge
    if section.backend != "vllm" or section.server_scope != "run":
        return None
    with _registry_lock:
        if _registry is None:
            return None
        if role not in _registry:
            adapters = not cfg.train.merge and (role == "policy" or getattr(cfg.judge, "model", None) == "reference")
            _registry[role] = KeptServer(role, section.server, Path(cfg.run_dir) / f"{role}-server.log", cfg.name,
                                         int(cfg.train.lora["r"]) if adapters else None, log=log, run_dir=Path(cfg.run_dir))
        kept = _registry[role]
        if log is not None:
            kept.log = log
        return kept


def release_gpu(but: KeptServer | None = None) -> None:
    """Before a GPU stage that is not served by a kept server (training, a local judge), and before one kept server
    serves: every other kept GPU server gives its memory back (sleeps, or stops). A no-op on CPU servers."""
    with _registry_lock:
        servers = [kept for kept in (_registry or {}).values() if kept is not but]
    for kept in servers:
        kept.release()

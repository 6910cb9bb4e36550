"""Real OpenAI-compatible servers that no one here wrote, started on the bundled model for the tests:

- `transformers serve` (transformers 5.25, in the project's own environment): ignores `n`, `logprobs`,
  `top_logprobs` and `response_format`, samples greedily at any temperature unless asked through its own
  `generation_config` field, and answers one request at a time.
- llama.cpp's server through llama-cpp-python (`make llama-setup`: `.llama-venv`), on the bundled model's own GGUF
  file: ignores `n`, honours seeds and logprobs with alternatives, refuses `response_format: json_schema` (500).

    with transformers_serve(model_dir) as server:      # server.base_url, server.model
        ...
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import REPO, free_port, stop, wait_http

LLAMA_PYTHON = REPO / ".llama-venv" / "bin" / "python"


@dataclass
class Running:
    base_url: str
    model: str
    log: Path
    proc: subprocess.Popen


@contextlib.contextmanager
def _serve(command: list[str], port: int, model: str, log: Path, timeout: float = 180) -> Iterator[Running]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        try:
            wait_http(f"http://127.0.0.1:{port}/v1/models", timeout, proc)
        except (RuntimeError, TimeoutError) as exc:
            raise RuntimeError(f"{exc}; its log {log}:\n{log.read_text()[-3000:]}") from None
        yield Running(f"http://127.0.0.1:{port}/v1", model, log, proc)
    finally:
        stop(proc)


def transformers_serve(model_dir: Path, log: Path) -> contextlib.AbstractContextManager[Running]:
    """`transformers serve MODEL_DIR` on a free loopback port; requests name the model by its directory."""
    port = free_port()
    command = [str(Path(sys.executable).parent / "transformers"), "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
               "--device", "cpu", "--log-level", "warning"]
    return _serve(command, port, str(model_dir), log)


def llama_cpp_server(gguf: Path, log: Path, alias: str = "bundled") -> contextlib.AbstractContextManager[Running]:
    """llama-cpp-python's server on `gguf` on a free loopback port, the model named `alias`. Fails (not skips) without
    `make llama-setup`."""
    if not LLAMA_PYTHON.exists():
        raise RuntimeError(f"{LLAMA_PYTHON} does not exist: run `make llama-setup` (make test does) to build llama.cpp's server")
    port = free_port()
    command = [str(LLAMA_PYTHON), "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", alias, "--host", "127.0.0.1",
               "--port", str(port), "--n_ctx", "4096", "--verbose", "false"]
    return _serve(command, port, alias, log)

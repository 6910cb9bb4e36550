"""How to start an OpenAI-compatible model server (`vllm serve`, its container, or a compatible stand-in): the
`ServerSpec` a recipe holds, and the argv it becomes (pure; `selfplay.serving.model_server` runs it).

`ServerSpec` maps each vLLM option to a flag, and a `None` value leaves that flag out, so the same spec serves
`vllm serve`, the container, or any OpenAI-compatible server with fewer options (the tests' stub takes only
`--model`, `--host` and `--port`: `model_arg_style="flag"`, `served_name_flag=None`,
`gpu_memory_utilization=None`, `tensor_parallel_size=None`).

vLLM in its own virtualenv::

    ServerSpec(command=["/opt/vllm-venv/bin/vllm", "serve"], max_model_len=4096)

The container instead (it listens on 8000 inside; the host port is substituted for "{port}"; `--ipc=host` gives
vLLM's tensor parallelism the shared memory it needs; the models, the run directory and the Hugging Face cache are
mounted at the same paths inside, since checkpoints and adapters are passed by their paths)::

    ServerSpec(command=["docker", "run", "--rm", "--gpus", "all", "--ipc=host", "-p", "{port}:8000",
                        "-v", "/models:/models", "-v", "/work/runs:/work/runs", f"vllm/vllm-openai:v{VLLM_VERSION}"],
               model_arg_style="flag", container_port=8000)
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["VLLM_VERSION", "VLLM_IMAGE", "ServerSpec", "build_command", "redact"]

# The vLLM this project is written against: the compose file's image, the README and the recipes name it (a test
# keeps them in step). vLLM runs from its own virtualenv or this image, never in selfplay's environment.
VLLM_VERSION = "0.32.0"
VLLM_IMAGE = f"vllm/vllm-openai:v{VLLM_VERSION}"


OPERATIONAL = {"affects_results": False}  # how and where the server runs, not what it answers


class ServerSpec(BaseModel):
    """How to start an OpenAI-compatible model server; `None` on an option leaves its flag out. Fields marked
    OPERATIONAL change no result (selfplay.config.backends.operational): a resume may change them."""

    model_config = ConfigDict(extra="forbid")

    command: list[str] = Field(
        default_factory=lambda: ["vllm", "serve"], min_length=1,
        json_schema_extra=OPERATIONAL, description="Executable and subcommand, e.g. ['/opt/vllm-venv/bin/vllm', 'serve'] or ['docker', 'run', '--rm', "
        "'--gpus', 'all', '--ipc=host', '-p', '{port}:8000', '-v', '/models:/models', '-v', '/work/runs:/work/runs', "
        "'vllm/vllm-openai:v0.32.0'] (mount models and runs at the same paths inside); '{port}' in any item becomes the chosen port.")
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
    gpu_free_timeout: float = Field(
        120.0, gt=0, json_schema_extra=OPERATIONAL, description="Seconds to wait for GPU memory: after the server stopped, for what it took to be given "
        "back before the next GPU stage (a warning naming the holders when it is not); before a server starts, for "
        "gpu_memory_utilization x total to be free (vLLM's own start condition; the start fails naming the holders).")


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

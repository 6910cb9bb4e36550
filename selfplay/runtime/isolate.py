"""Run a GPU stage's work in its own process, so every byte of GPU memory it took is given back when it exits.

A CUDA context, the allocator's cache, a leaked reference cycle holding a model: none of them survive the process.
The next stage (or a vLLM server, or another run's stage waiting on the `gpu` limit) starts on an empty GPU.

    value, peak_gb = isolate.call("selfplay.training.dpo:train_dpo", cfg, k, ..., isolated=True, log=log, progress=bar.update)

The parent pickles the call to `spec.pkl` in a scratch directory and starts `python -m selfplay.runtime.isolate spec.pkl`
(or a launcher in front of it: `accelerate launch ... -m selfplay.runtime.isolate spec.pkl` for multi-GPU training). The
child imports the target, calls it with `log=` (a logger whose lines the parent relays to the Prefect run log) and
`progress=` (whose calls the parent turns into progress-artifact updates), and rank 0 pickles the return value.
A child that fails, or is killed, raises `StageProcessError` in the parent with the exit status and its last lines.
With `isolated=False` the same target runs in this process: what CPU runs and the tests' tiny models use.
"""

from __future__ import annotations

import importlib
import logging
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from selfplay.errors import SelfplayError
from selfplay.runtime import processes

PROGRESS = "[selfplay-progress]"
LOG = "[selfplay-log]"
TAIL_LINES = 40
PROGRESS_EVERY_S = 2.0
# An interrupted stage's process gets this long to exit after SIGTERM (a run must stop within 15 s).
STOP_GRACE_S = 5.0
# Unbuffered, so an out-of-memory kill loses no line of the tail; no progress bars (each redraw would be a log line).
CHILD_ENV = {"PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}


class StageProcessError(SelfplayError, RuntimeError):
    """A stage's child process failed: its exit status and the last lines it printed."""


def resolve(target: str) -> Callable[..., Any]:
    """'package.module:function' -> the function."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def isolated(mode: str) -> bool:
    """`isolation` 'auto' means a process per GPU stage where there is a GPU, and inline on the CPU."""
    if mode == "auto":
        import torch

        return torch.cuda.is_available()
    return mode == "process"


def accelerate_command(config_file: str | None, num_processes: int | None, args: Sequence[str] = ()) -> list[str]:
    """`accelerate launch` from this environment, one process per GPU unless `num_processes` says otherwise."""
    if num_processes is None:
        import torch

        num_processes = max(1, torch.cuda.device_count())
    command = [sys.executable, "-m", "accelerate.commands.launch"]
    if config_file:
        command += ["--config_file", str(config_file)]
    return [*command, "--num_processes", str(num_processes), *args]


def exit_reason(code: int) -> str:
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else f"signal {-code}"
        hint = " (SIGKILL: the kernel's out-of-memory killer is the usual cause; check host memory)" if -code == signal.SIGKILL else ""
        return f"was killed by {name}{hint}"
    return f"exited with status {code}"


def call(
    target: str,
    *args: Any,
    isolated: bool,
    log: logging.Logger | logging.LoggerAdapter,
    progress: Callable[[int, int], None] | None = None,
    launcher: Sequence[str] | None = None,
    scratch: Path | None = None,
    label: str = "stage",
    **kwargs: Any,
) -> tuple[Any, float | None]:
    """Call `target(*args, log=..., progress=..., **kwargs)`; return (its value, peak GPU GiB or None).

    isolated: run it in a child process (`launcher` + `-m selfplay.runtime.isolate`, default `python -m selfplay.runtime.isolate`);
    scratch: where the spec and result files go (a temporary directory under it, removed afterwards).
    """
    from selfplay.inputs.models import peak_memory_gb, reset_peak_memory

    if not isolated:
        reset_peak_memory()
        value = resolve(target)(*args, log=log, progress=progress, **kwargs)
        return value, peak_memory_gb()

    if scratch is not None:
        scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{label.replace(' ', '-')}-proc-", dir=scratch) as tmp:
        spec, result = Path(tmp) / "spec.pkl", Path(tmp) / "result.pkl"
        spec.write_bytes(pickle.dumps({"target": target, "args": args, "kwargs": kwargs}))
        command = [*(launcher or [sys.executable]), "-m", "selfplay.runtime.isolate", str(spec)]
        log.info("%s: starting its own process: %s", label, " ".join(command))
        started = time.time()
        child_env = {**os.environ, **CHILD_ENV, "SELFPLAY_RESULT": str(result)}
        code, tail = _run(command, child_env, log, progress, label)
        failure = pickle.loads(result.read_bytes()).get("error") if result.exists() else None
        if code != 0 or failure:
            what = f"{failure}. The process" if failure else "the stage's process"
            raise StageProcessError(
                f"{label}: {what} {exit_reason(code)} after {time.time() - started:.0f} s. Its last lines:\n" + "\n".join(tail))
        if not result.exists():
            raise StageProcessError(f"{label}: the stage's process exited cleanly but wrote no result. Its last lines:\n" + "\n".join(tail))
        out = pickle.loads(result.read_bytes())
    log.info("%s: process %d finished in %.0f s (peak GPU memory %s)", label, out["pid"], time.time() - started,
             "-" if out["peak_gpu_gb"] is None else f"{out['peak_gpu_gb']:.2f} GiB")
    return out["value"], out["peak_gpu_gb"]


def _run(command: list[str], env: dict[str, str], log, progress, label: str) -> tuple[int, list[str]]:
    """Start `command` in its own process group, relay its output, and return (exit status, last lines).

    If this process is interrupted (a cancelled flow run, Ctrl-C), the whole group is killed; if it dies outright,
    the child gets SIGTERM from the kernel (and `accelerate launch` passes it on to its ranks): no child keeps a GPU.
    """
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    proc = processes.spawn(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    last_progress = 0.0
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:  # bytes, split on \n only: a carriage return does not end a line
            line = raw.decode(errors="replace").rstrip("\n").rsplit("\r", 1)[-1]
            if line.startswith(PROGRESS):
                done, total = _numbers(line[len(PROGRESS):])
                if progress is not None and total and (done >= total or time.monotonic() - last_progress >= PROGRESS_EVERY_S):
                    last_progress = time.monotonic()
                    _relay_progress(progress, done, total, log)
                continue
            tail.append(line)
            if line.startswith(LOG):
                level, _, message = line[len(LOG):].strip().partition(" ")
                number = logging.getLevelName(level)
                log.log(number if isinstance(number, int) else logging.INFO, "%s", message)
            elif line.strip():
                log.info("[%s] %s", label, line)
        return proc.wait(), list(tail)
    finally:
        processes.kill_group(proc, grace=STOP_GRACE_S)


def _numbers(text: str) -> tuple[int, int]:
    try:
        done, total = text.split()
        return int(done), int(total)
    except ValueError:
        return 0, 0


def _relay_progress(progress, done: int, total: int, log) -> None:
    try:
        progress(done, total)
    except Exception as exc:  # reporting must never stop the work
        log.debug("progress not reported: %s", exc)


# ---------------------------------------------------------------- child side

def rank() -> int:
    """This process's global rank under `accelerate launch`/torchrun; 0 when launched alone."""
    return int(os.environ.get("RANK", "0"))


class _LineHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        message = self.format(record).replace("\n", "\n" + LOG + " " + record.levelname + " ")
        print(f"{LOG} {record.levelname} {message}", flush=True)


def _progress(done: int, total: int) -> None:
    if rank() == 0:
        print(f"{PROGRESS} {int(done)} {int(total)}", flush=True)


def main(argv: list[str] | None = None) -> int:
    from selfplay.inputs.models import peak_memory_gb, reset_peak_memory

    argv = sys.argv[1:] if argv is None else argv
    spec = pickle.loads(Path(argv[0]).read_bytes())
    log = logging.getLogger("selfplay.stage")
    log.propagate = False
    handler = _LineHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO if rank() == 0 else logging.WARNING)  # one rank speaks for a multi-process stage
    reset_peak_memory()
    try:
        value = resolve(spec["target"])(*spec["args"], log=log, progress=_progress, **spec["kwargs"])
    except Exception as exc:
        # The parent leads its error with this line (a ModelError's advice, say); the traceback goes to the tail.
        if rank() == 0:
            _write_result({"error": f"{type(exc).__name__}: {exc}"})
        raise
    if rank() == 0:
        _write_result({"value": value, "peak_gpu_gb": peak_memory_gb(), "pid": os.getpid()})
    return 0


def _write_result(out: dict[str, Any]) -> None:
    path = Path(os.environ["SELFPLAY_RESULT"])
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(pickle.dumps(out))
    tmp.rename(path)


if __name__ == "__main__":
    raise SystemExit(main())

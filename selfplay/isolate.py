"""Run a GPU stage's work in its own process, so every byte of GPU memory it took is given back when it exits.

A CUDA context, the allocator's cache, a leaked reference cycle holding a model: none of them survive the process.
The next stage (or a vLLM server, or another run's stage waiting on the `gpu` limit) starts on an empty GPU.

    value, peak_gb = isolate.call("tasks.train:train_dpo", cfg, k, ..., isolated=True, log=log, progress=bar.update)

The parent pickles the call to `spec.pkl` in a scratch directory and starts `python -m selfplay.isolate spec.pkl`
(or a launcher in front of it: `accelerate launch ... -m selfplay.isolate spec.pkl` for multi-GPU training). The
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

PROGRESS = "[selfplay-progress]"
LOG = "[selfplay-log]"
TAIL_LINES = 40


class StageProcessError(RuntimeError):
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
    env: dict[str, str] | None = None,
    **kwargs: Any,
) -> tuple[Any, float | None]:
    """Call `target(*args, log=..., progress=..., **kwargs)`; return (its value, peak GPU GiB or None).

    isolated: run it in a child process (`launcher` + `-m selfplay.isolate`, default `python -m selfplay.isolate`);
    scratch: where the spec and result files go (a temporary directory under it, removed afterwards).
    """
    from selfplay.models import peak_memory_gb, reset_peak_memory

    if not isolated:
        reset_peak_memory()
        value = resolve(target)(*args, log=log, progress=progress, **kwargs)
        return value, peak_memory_gb()

    if scratch is not None:
        scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{label}-proc-", dir=scratch) as tmp:
        spec, result = Path(tmp) / "spec.pkl", Path(tmp) / "result.pkl"
        spec.write_bytes(pickle.dumps({"target": target, "args": args, "kwargs": kwargs}))
        command = [*(launcher or [sys.executable]), "-m", "selfplay.isolate", str(spec)]
        log.info("%s: starting its own process: %s", label, " ".join(command))
        started = time.time()
        code, tail = _run(command, {**os.environ, **(env or {}), "SELFPLAY_RESULT": str(result)}, log, progress, label)
        if code != 0:
            raise StageProcessError(
                f"{label}: the stage's process {exit_reason(code)} after {time.time() - started:.0f} s. "
                f"Its last lines:\n" + "\n".join(tail))
        if not result.exists():
            raise StageProcessError(f"{label}: the stage's process exited cleanly but wrote no result. Its last lines:\n" + "\n".join(tail))
        out = pickle.loads(result.read_bytes())
    log.info("%s: process %d finished in %.0f s (peak GPU memory %s)", label, out["pid"], time.time() - started,
             "-" if out["peak_gpu_gb"] is None else f"{out['peak_gpu_gb']:.2f} GiB")
    return out["value"], out["peak_gpu_gb"]


def _run(command: list[str], env: dict[str, str], log, progress, label: str) -> tuple[int, list[str]]:
    """Start `command` in its own process group, relay its output, and return (exit status, last lines).

    If this process is interrupted (a cancelled flow run, Ctrl-C), the whole group is killed: no child keeps a GPU.
    """
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=env, text=True, errors="replace", bufsize=1, start_new_session=True)
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip("\n")
            if line.startswith(PROGRESS):
                if progress is not None:
                    done, total = line[len(PROGRESS):].split()
                    progress(int(done), int(total))
                continue
            tail.append(line)
            if line.startswith(LOG):
                level, _, message = line[len(LOG):].strip().partition(" ")
                log.log(logging.getLevelName(level) if isinstance(logging.getLevelName(level), int) else logging.INFO, "%s", message)
            elif line.strip():
                log.info("[%s] %s", label, line)
        return proc.wait(), list(tail)
    finally:
        if proc.poll() is None:
            _kill_group(proc)


def _kill_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


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
    from selfplay.models import peak_memory_gb, reset_peak_memory

    argv = sys.argv[1:] if argv is None else argv
    spec = pickle.loads(Path(argv[0]).read_bytes())
    log = logging.getLogger("selfplay.stage")
    log.propagate = False
    handler = _LineHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO if rank() == 0 else logging.WARNING)  # one rank speaks for a multi-process stage
    reset_peak_memory()
    value = resolve(spec["target"])(*spec["args"], log=log, progress=_progress, **spec["kwargs"])
    if rank() == 0:
        out = {"value": value, "peak_gpu_gb": peak_memory_gb(), "pid": os.getpid()}
        path = Path(os.environ["SELFPLAY_RESULT"])
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(pickle.dumps(out))
        tmp.rename(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""GPU memory as the driver sees it, read through `nvidia-smi`: is what a stopped model server took given back?

A stopped vLLM's memory returns to the driver a moment after its processes exit, so a GPU stage that follows it
(training) waits for that first. `nvidia-smi` reads NVIDIA's management library (NVML), so no CUDA context is
created in this process, and torch is never imported.

    before = gpu_memory_mib()                 # before the server starts
    ...                                       # the server runs and is stopped
    if not wait_gpu_free(before, timeout=120):
        log.warning("GPU memory was not all given back; held by %s", holders())
    failure = wait_memory_for(0.85, timeout=120)   # before a vLLM server starts: None, or why it would not
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time


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


def wait_gpu_free(before: dict[int, tuple[int, int]] | None, timeout: float, tolerance: float = 0.02) -> bool:
    """Wait until every visible GPU's used memory is back to what `before` recorded (within `tolerance` of its
    total), so memory held by others at that time (another server, a resident judge) does not count.

    Returns True once recovered, False when `timeout` seconds passed first; True at once where there is no
    `nvidia-smi` (no NVIDIA GPU) or `before` is None (nothing was recorded).
    """
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


def gpu_processes() -> list[dict] | None:
    """The processes holding GPU memory, from `nvidia-smi --query-compute-apps` (pid, name, MiB); None where there
    is no `nvidia-smi` or it fails."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,process_name,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        rows = []
        for line in out.strip().splitlines():
            if line.count(",") < 2:
                continue
            pid, name, used = (part.strip() for part in line.rsplit(",", 2))  # a process name may hold a comma
            rows.append({"pid": int(pid), "name": name, "mib": int(used) if used.isdigit() else None})
        return rows
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def holders() -> str:
    """'pid 4242 (/opt/vllm/bin/python, 61000 MiB), ...' for the processes holding GPU memory, or why none is named."""
    procs = gpu_processes()
    if procs is None:
        return "unknown processes (nvidia-smi --query-compute-apps did not answer)"
    if not procs:
        return "no process nvidia-smi lists (a container's processes are listed from the host only)"
    def one(p: dict) -> str:
        memory = f", {p['mib']} MiB" if p["mib"] is not None else ""
        return f"pid {p['pid']} ({p['name']}{memory})"

    return ", ".join(one(p) for p in procs)


def wait_memory_for(utilization: float, timeout: float) -> str | None:
    """Wait up to `timeout` seconds until every visible GPU has at least `utilization` x its total memory free, the
    condition vLLM checks at start (it refuses to start below it: `--gpu-memory-utilization`). None once it holds
    (at once without `nvidia-smi`); otherwise what is short and which processes hold the memory."""
    deadline = time.monotonic() + timeout
    while True:
        now = gpu_memory_mib()
        if now is None:
            return None
        short = {gpu: (used, total) for gpu, (used, total) in now.items() if total - used < utilization * total}
        if not short:
            return None
        if time.monotonic() >= deadline:
            gpus = "; ".join(f"GPU {gpu} has {total - used} MiB free of {total}, and needs {utilization:g} x {total} = "
                             f"{utilization * total:.0f} MiB" for gpu, (used, total) in short.items())
            return (f"the GPU memory was not free after {timeout:g} s: {gpus}. Held by {holders()}. Stop what holds it, "
                    f"or lower gpu_memory_utilization (vLLM refuses to start with less free)")
        time.sleep(0.5)

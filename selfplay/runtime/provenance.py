"""What produced a run: the code (its git commit, and whether the tree had changes), Python and the libraries that
decide results, the device, and the vLLM a started server reports. `open_run` records it in run.json when a run
starts and compares it when the run resumes (a difference is a warning, not a refusal); `selfplay show` prints it.

    >>> differences({"python": "3.11.7", "libraries": {"torch": "2.13.0"}}, {"python": "3.11.7", "libraries": {"torch": "2.14.1"}})
    ['torch 2.13.0 -> 2.14.1']
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

LIBRARIES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "prefect")


def version_of(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def code_version(where: Path | None = None) -> dict[str, Any]:
    """The commit of the checkout the selfplay package runs from, and whether its tree differs from that commit
    (changed or untracked files, ignored ones aside); None for both when it is not a git checkout."""
    where = where or Path(__file__).resolve().parents[2]
    try:
        top = subprocess.run(["git", "-C", str(where), "rev-parse", "--show-toplevel"], capture_output=True, text=True, timeout=10)
        if top.returncode != 0 or Path(top.stdout.strip()).resolve() != where.resolve():  # e.g. site-packages in a checkout's venv
            return {"commit": None, "dirty": None}
        commit = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return {"commit": None, "dirty": None}
        status = subprocess.run(["git", "-C", str(where), "status", "--porcelain"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return {"commit": None, "dirty": None}
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip()) if status.returncode == 0 else None}


def device() -> str:
    """The accelerators torch sees (name, count, CUDA version), or the CPU's model and core count."""
    import torch  # already imported by the time a run records this
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        counted = ", ".join(f"{names.count(n)} x {n}" for n in dict.fromkeys(names))
        return f"{counted} (CUDA {torch.version.cuda})"
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU: {model}, {os.cpu_count()} cores"


@functools.cache
def collect() -> dict[str, Any]:
    """This process's provenance, as run.json records it. Read once per process: the CLI's early check and the flow
    both ask, and a long-lived `selfplay serve` keeps running the code it imported, whatever the checkout becomes."""
    return {
        "selfplay": version_of("selfplay"),
        **code_version(),
        "python": platform.python_version(),
        "libraries": {name: version_of(name) for name in LIBRARIES},
        "device": device(),
    }


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What changed between two provenance records, one 'what old -> new' each; a field either lacks is no change
    (a run recorded before that field existed). A tree with changes is marked `+changes`."""

    def code(p: dict[str, Any]) -> str | None:
        return None if not p.get("commit") else p["commit"][:12] + ("+changes" if p.get("dirty") else "")

    pairs = [("commit", code(old), code(new)), ("Python", old.get("python"), new.get("python")),
             *((name, (old.get("libraries") or {}).get(name), (new.get("libraries") or {}).get(name))
               for name in sorted(set(old.get("libraries") or {}) | set(new.get("libraries") or {}))),
             ("vLLM", old.get("vllm"), new.get("vllm")), ("device", old.get("device"), new.get("device"))]
    return [f"{what} {a} -> {b}" for what, a, b in pairs if a is not None and b is not None and a != b]


def describe(p: dict[str, Any]) -> str:
    """One line for `selfplay show`.

    >>> describe({"commit": "0123456789abcdef", "dirty": True, "python": "3.11.7", "libraries": {"torch": "2.13.0", "trl": None},
    ...           "device": "CPU: x, 2 cores"})
    'commit 0123456789ab (with uncommitted changes), Python 3.11.7, torch 2.13.0; device CPU: x, 2 cores'
    """
    code = (f"commit {p['commit'][:12]}" + (" (with uncommitted changes)" if p.get("dirty") else "")) if p.get("commit") else "not a git checkout"
    libraries = ", ".join(f"{name} {v}" for name, v in (p.get("libraries") or {}).items() if v)
    vllm = f", vLLM {p['vllm']} (a server's report)" if p.get("vllm") else ""
    return f"{code}, Python {p.get('python')}, {libraries}{vllm}; device {p.get('device')}"

"""Run untrusted Python (a sampled program and the prompt's tests) where it can harm nothing: the `code` verifier's
runner.

What it guards against is what a sampled program does by accident or by imitation: an infinite loop, a memory
blow-up, `rm -rf`, a network call, a fork bomb, a huge file. Each run gets

  - a fresh temporary directory as its working directory and home, removed afterwards;
  - `python -I -S` (no user site, no PYTHON* variables, no current directory on sys.path) and an environment of
    only PATH, HOME, TMPDIR and LANG, so no API key or proxy setting reaches it;
  - rlimits: CPU seconds, address space (`memory_mb`), file size, open files and processes;
  - a wall-clock limit that kills its whole process group;
  - no network: its own network namespace (unshare(2) as root, `unshare --net --map-root-user` otherwise), and
    an audit hook that refuses every socket, for where the kernel refuses namespaces;
  - an audit hook (PEP 578) that refuses writing, removing or renaming anything outside the temporary directory,
    starting processes, and loading native code through ctypes;
  - when selfplay runs as root, the unprivileged user `nobody`, so even a bypass of the hook cannot touch root's
    files.

It is not a boundary against a program written to escape (CPython's audit hooks are not a security boundary):
for that, run the judge stage in a container. No library on the package registries does this job without a
container runtime (RestrictedPython restricts a language subset; epicbox needs Docker), so it is done here with
the kernel's own mechanisms.

    >>> run_python("print(6 * 7)").stdout
    '42\\n'
    >>> run_python("while True: pass", timeout_s=0.5).status
    'timeout'
"""

from __future__ import annotations

import functools
import os
import pwd
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# Runs first in the child (python -c), then executes the program file with the hook in place.
_GUARD = r"""
import os, sys
root = os.path.realpath(sys.argv[1])
def inside(path):
    try:
        p = os.path.realpath(os.fsdecode(path) if not isinstance(path, int) else root)
    except Exception:
        return False
    return p == root or p.startswith(root + os.sep)
WRITE = ("w", "a", "x", "+")
def hook(event, args):
    if event == "open":
        path, mode = args[0], args[1] or "r"
        flags = args[2] if len(args) > 2 else 0
        if (any(c in str(mode) for c in WRITE) or (isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))) and not inside(path):
            raise PermissionError(f"sandbox: writing outside the working directory is refused: {path}")
    elif event in ("os.remove", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.truncate", "os.utime", "shutil.rmtree", "os.symlink", "os.link"):
        if not inside(args[0]):
            raise PermissionError(f"sandbox: {event} outside the working directory is refused: {args[0]}")
    elif event in ("os.rename", "shutil.move", "shutil.copyfile"):
        if not (inside(args[0]) and inside(args[1])):
            raise PermissionError(f"sandbox: {event} outside the working directory is refused")
    elif event.startswith(("socket.", "subprocess.", "os.exec", "os.posix_spawn", "os.spawn", "ctypes.")) or event in (
            "os.system", "os.fork", "os.forkpty", "pty.spawn", "os.kill", "os.killpg"):
        raise PermissionError(f"sandbox: {event} is refused")
program = sys.argv[2]
code = compile(open(program).read(), "program.py", "exec")
sys.argv = ["program.py"]
sys.addaudithook(hook)
exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
"""

MAX_OUTPUT = 20_000  # characters of stdout/stderr kept


@dataclass(frozen=True)
class SandboxResult:
    status: str  # "ok" (exit 0), "error" (non-zero exit), "timeout", "killed" (a limit, e.g. memory)
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float


CLONE_NEWNET = 0x40000000


@functools.cache
def _libc():
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


@functools.cache
def _net_prefix() -> tuple[str, ...]:
    """Without root: the command prefix that gives a child its own empty network namespace (a user namespace
    mapped to this user), or () where the kernel refuses unprivileged namespaces."""
    unshare = shutil.which("unshare")
    if not unshare:
        return ()
    prefix = (unshare, "--net", "--map-root-user")
    try:
        return prefix if subprocess.run([*prefix, "true"], capture_output=True, timeout=10).returncode == 0 else ()
    except (OSError, subprocess.TimeoutExpired):
        return ()


def _limits(timeout_s: float, memory_mb: int, drop_to: tuple[int, int] | None, libc):
    def apply() -> None:
        os.setsid()
        if libc is not None:
            libc.unshare(CLONE_NEWNET)  # as root; where a container forbids it, the audit hook still refuses sockets
        cpu = max(1, int(timeout_s) + 1)
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
        resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if drop_to is not None:
            os.setgroups([])
            os.setgid(drop_to[1])
            os.setuid(drop_to[0])
        resource.setrlimit(resource.RLIMIT_NPROC, (64, 64))  # after the uid change: it counts that user's processes
    return apply


@functools.cache
def _runner() -> tuple[str, tuple[int, int] | None]:
    """The interpreter that runs programs, and the (uid, gid) to run them as: `nobody` when selfplay runs as root
    and some Python (this one, its base, or the system's) is executable by that user; else this user."""
    if os.geteuid() != 0:
        return sys.executable, None
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        return sys.executable, None
    drop_to = (nobody.pw_uid, nobody.pw_gid)

    def as_nobody() -> None:
        os.setgroups([])
        os.setgid(drop_to[1])
        os.setuid(drop_to[0])

    for python in dict.fromkeys([sys.executable, getattr(sys, "_base_executable", ""), shutil.which("python3") or "",
                                  "/usr/local/bin/python3", "/usr/bin/python3"]):
        if not python:
            continue
        try:
            probe = subprocess.run([python, "-I", "-S", "-c", "pass"], capture_output=True, timeout=30, preexec_fn=as_nobody, cwd="/")
        except (OSError, subprocess.SubprocessError):
            continue
        if probe.returncode == 0:
            return python, drop_to
    return sys.executable, None


def run_python(source: str, timeout_s: float = 5.0, memory_mb: int = 512) -> SandboxResult:
    """Run `source` as a Python program in the sandbox; never raises for what the program does."""
    python, drop_to = _runner()
    workdir = Path(tempfile.mkdtemp(prefix="selfplay-sandbox-"))
    try:
        if drop_to is not None:
            os.chown(workdir, *drop_to)
        program = workdir / "program.py"
        program.write_text(source)
        env = {"PATH": "/usr/bin:/bin", "HOME": str(workdir), "TMPDIR": str(workdir), "LANG": "C.UTF-8"}
        libc = _libc() if drop_to is not None else None
        command = [*(() if drop_to is not None else _net_prefix()), python, "-I", "-S", "-c", _GUARD, str(workdir), str(program)]
        started = time.monotonic()
        proc = subprocess.Popen(command, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, preexec_fn=_limits(timeout_s, memory_mb, drop_to, libc))
        try:
            out, err = proc.communicate(timeout=timeout_s)
            status = "ok" if proc.returncode == 0 else "killed" if proc.returncode < 0 else "error"
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            out, err = proc.communicate()
            status = "timeout"
        text = lambda b: b.decode("utf-8", "replace")[:MAX_OUTPUT]  # noqa: E731
        return SandboxResult(status, proc.returncode, text(out), text(err), time.monotonic() - started)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

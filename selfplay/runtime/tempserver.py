"""The temporary Prefect API server of a `selfplay run` without PREFECT_API_URL, started and ended by selfplay.

Prefect would start one itself (its "ephemeral" server), but on its terms: it gives the server 20 s to come up,
and the first start on an empty PREFECT_HOME creates and migrates the database, which takes longer than that
on 2 cores (the first run on a fresh machine failed); and the server outlives a run killed by SIGKILL. This is
the same server (uvicorn on Prefect's app, UI and services off, on the same database) started as a child that:

- gets `SELFPLAY_SERVER_STARTUP_TIMEOUT` seconds to come up (default 300; Prefect's own
  PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS is honoured when set), saying why it waits when it is slow;
- runs in its own session, so a signal sent to the run's process group (`timeout`, Ctrl-C in a terminal) reaches
  the run first: the run can still tell the server it stopped, then stops the server;
- dies with the run however the run ends (the kernel's parent-death signal);
- on a new PREFECT_HOME, starts from a copy of the database a first start on this machine created and migrated
  (kept in the selfplay cache, per Prefect version), instead of migrating one again (20-30 s on 2 cores).

Its log is `server.log` in the directory given.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from selfplay.errors import SelfplayError
from selfplay.runtime import processes
from selfplay.runtime.processes import free_port

log = logging.getLogger(__name__)


class ServerStartError(SelfplayError):
    """The temporary Prefect server did not come up."""


def startup_timeout() -> float:
    for name in ("SELFPLAY_SERVER_STARTUP_TIMEOUT", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"):
        if os.environ.get(name):
            return float(os.environ[name])
    return 300.0


def command(port: int) -> list[str]:
    import prefect

    return [sys.executable, "-m", "uvicorn", "--app-dir", str(Path(prefect.__file__).resolve().parents[1]), "--factory",
            "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port), "--log-level", "error",
            "--lifespan", "on"]


def api_alive(url: str, timeout: float = 1.0) -> bool:
    """Whether the Prefect API at `url` answers its health check within `timeout` seconds."""
    import httpx

    try:
        return httpx.get(f"{url.rstrip('/')}/health", timeout=timeout, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False


class Starting:
    """A temporary server spawned and not yet waited for (`spawn`): the run does its preflight meanwhile, and
    `temporary_server(log_dir, starting)` waits for it. Holds the first-start lock until then; `stop()` if the run
    ends before (a preflight error)."""

    def __init__(self, log_dir: Path):
        log_dir.mkdir(parents=True, exist_ok=True)
        self.url = f"http://127.0.0.1:{free_port()}/api"
        self.log_path = log_dir / "server.log"
        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
        env.pop("PREFECT_API_URL", None)
        self._lock = contextlib.ExitStack()
        home = self._lock.enter_context(_first_start_lock())
        self.database = database_file(home)
        self.creating_database = self.database is not None and not self.database.exists()
        self.template: Path | None = None  # where to keep the database once the server has created it
        if self.creating_database:
            if seed_database(self.database):
                self.creating_database = False
            else:
                self.template = template_path()
        try:
            with open(self.log_path, "ab") as out:
                self.proc = processes.spawn(command(int(self.url.rsplit(":", 1)[1].split("/")[0])), long_lived=True,
                                            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env)
        except BaseException:
            self._lock.close()
            raise
        self.started = time.monotonic()

    def wait(self) -> None:
        """Return once it answers (then release the first-start lock); stop it and raise if it does not."""
        try:
            _wait_healthy(self.proc, self.url, self.log_path, self.creating_database, self.started)
        except BaseException:
            self.stop()
            raise
        if self.template is not None:  # keep the database it just created, before the run writes to it
            copy_database(self.database, self.template)
        self._lock.close()

    def stop(self) -> None:
        processes.kill_group(self.proc, grace=5.0)
        self._lock.close()


def spawn(log_dir: Path) -> Starting:
    """Start the temporary server's process without waiting for it: its start (5 s on a warm PREFECT_HOME, 20-30 s
    the first time) overlaps the run's preflight."""
    return Starting(log_dir)


@contextlib.contextmanager
def temporary_server(log_dir: Path, starting: Starting | None = None) -> Iterator[str]:
    """Start the server (or take the one `spawn` started), point this process's Prefect settings at it, yield its API
    URL; stop it afterwards."""
    from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    starting = starting or spawn(log_dir)
    starting.wait()
    url, proc = starting.url, starting.proc
    try:
        os.environ["PREFECT_API_URL"] = url  # for child processes; this one reads the settings below
        # No flow-run heartbeats: they tell a long-lived server's automations that a run crashed, and this server
        # runs no services and dies with the run; each flow run's end would wait up to a second for its heartbeat
        # thread.
        with temporary_settings(updates={PREFECT_API_URL: url, PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            try:
                yield url
            finally:
                _drain_logs()
    finally:
        os.environ.pop("PREFECT_API_URL", None)
        processes.kill_group(proc, grace=5.0)


def database_file(home: Path) -> Path | None:
    """The server's database file: Prefect's default SQLite file in PREFECT_HOME, or None where the settings name
    another database."""
    from prefect.settings import get_current_settings

    url = get_current_settings().server.database.connection_url
    default = home / "prefect.db"
    if url is None or url.get_secret_value() == f"sqlite+aiosqlite:///{default}":
        return default
    return None


def template_path() -> Path:
    """Where this machine keeps a database as the server leaves it after creating and migrating one (no runs in it
    yet), for this Prefect version."""
    import prefect

    from selfplay.inputs.models import cache_root

    return cache_root() / "prefect" / f"empty-{prefect.__version__}.db"


def copy_database(source: Path, target: Path) -> bool:
    """A consistent copy of the SQLite database `source` at `target`, written whole or not at all (SQLite's backup
    API: safe while a server writes `source`). False, with a log line, where it could not be made."""
    import sqlite3

    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        src, dst = sqlite3.connect(f"file:{source}?mode=ro", uri=True), sqlite3.connect(partial)
        try:
            src.backup(dst)
        finally:
            src.close()
            dst.close()
        os.replace(partial, target)
        return True
    except (OSError, sqlite3.Error) as e:
        partial.unlink(missing_ok=True)
        log.info("could not copy the Prefect database %s to %s (%s)", source, target, e)
        return False


def seed_database(database: Path) -> bool:
    """Copy the machine's migrated empty database to `database` (a new PREFECT_HOME), so that the server starts as on a
    warm one instead of migrating for 20-30 s. False (and nothing written) where there is none yet."""
    template = template_path()
    if not template.is_file() or not copy_database(template, database):
        return False
    log.info("temporary Prefect server: a new database, copied from %s (migrated once on this machine)", template)
    return True


@contextlib.contextmanager
def _first_start_lock() -> Iterator[Path]:
    """One server starting at a time per PREFECT_HOME: a server's start migrates the database, and two runs
    started at once on a fresh machine would both create it (sqlite: "index ... already exists")."""
    from prefect.settings import get_current_settings

    home = Path(get_current_settings().home).expanduser()
    home.mkdir(parents=True, exist_ok=True)
    with open(home / ".selfplay-server-start.lock", "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another run is starting its temporary Prefect server on %s; waiting for it", home)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield home
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _wait_healthy(proc: subprocess.Popen, url: str, log_path: Path, creating_database: bool, started: float | None = None) -> None:
    """Return once the server answers; raise ServerStartError (the caller stops it) if it exits or times out."""
    limit = startup_timeout()
    started = time.monotonic() if started is None else started
    said = False
    while True:
        if proc.poll() is not None:
            raise ServerStartError(f"the temporary Prefect server exited with code {proc.returncode} while starting. "
                                   f"Its log ({log_path}) ends:\n{processes.log_tail(log_path, lines=20)}")
        if api_alive(url):
            log.info("temporary Prefect server up at %s after %.0f s", url.removesuffix("/api"), time.monotonic() - started)
            return
        waited = time.monotonic() - started
        if waited > limit:
            raise ServerStartError(
                f"the temporary Prefect server did not answer within {limit:g} s. Its log ({log_path}) ends:\n"
                f"{processes.log_tail(log_path, lines=20)}\nGive it longer with SELFPLAY_SERVER_STARTUP_TIMEOUT=<seconds>, or run a server "
                f"(`selfplay server`) and set PREFECT_API_URL=http://127.0.0.1:4200/api.")
        if waited > 5 and not said:
            said = True
            why = "it is creating its database, about 30 s on 2 cores the first time" if creating_database else "it is slow"
            log.info("waiting for the temporary Prefect server (%s; up to %g s)", why, limit)
        time.sleep(0.25)


def _drain_logs() -> None:
    """Send the run's buffered log lines before the server goes away."""
    with contextlib.suppress(Exception):
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=5)

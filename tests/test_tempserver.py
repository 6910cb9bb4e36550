"""The temporary Prefect server's database on a new PREFECT_HOME: the first start on a machine creates and migrates
it and keeps a copy in the selfplay cache; a later new PREFECT_HOME starts from that copy instead of migrating."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.stage

START = """
import logging, sys, httpx
from pathlib import Path
logging.basicConfig(level=logging.INFO)
from prefect.settings import get_current_settings
from selfplay.runtime.tempserver import spawn, temporary_server
s = spawn(Path(sys.argv[1]))
with temporary_server(Path(sys.argv[1]), s) as url:
    made = httpx.post(url + "/flows/", json={"name": sys.argv[2]}, trust_env=False).status_code
    names = [f["name"] for f in httpx.post(url + "/flows/filter", json={}, trust_env=False).json()]
    beat = get_current_settings().flows.heartbeat_frequency
print(s.creating_database, made, ",".join(names), beat, s.proc.poll() is not None)
"""


def start_once(tmp_path: Path, home: str, flow: str) -> tuple[str, str]:
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / home), "SELFPLAY_CACHE": str(tmp_path / "cache")}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.run([sys.executable, "-c", START, str(tmp_path / f"{home}-log"), flow], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1], proc.stderr


def flows_in(db: Path) -> list[str]:
    with sqlite3.connect(db) as conn:
        return [name for (name,) in conn.execute("select name from flow")]


def test_a_new_prefect_home_starts_from_the_database_the_first_start_migrated(tmp_path):
    import prefect

    first, _ = start_once(tmp_path, "home-a", "first")
    # it created the database, the server works, no flow-run heartbeats (nothing on this server reads them), stopped
    assert first == "True 201 first None True"
    template = tmp_path / "cache" / "prefect" / f"empty-{prefect.__version__}.db"
    assert template.is_file() and flows_in(template) == []  # kept before the run wrote anything
    second, log = start_once(tmp_path, "home-b", "second")
    assert second == "False 201 second None True"  # no migration, a working server, and nothing of home-a's in it
    assert "copied from" in log and str(template) in log
    assert flows_in(tmp_path / "home-a" / "prefect.db") == ["first"]
    again, _ = start_once(tmp_path, "home-b", "third")  # a warm PREFECT_HOME is left as it is
    assert again.split()[0] == "False" and sorted(again.split()[2].split(",")) == ["second", "third"]

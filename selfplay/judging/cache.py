"""An on-disk cache of judge calls: reruns and resumes pay for nothing twice.

One SQLite file ($SELFPLAY_CACHE/judge-cache.sqlite) shared by all runs. The key hashes exactly what decides a
call's answer: the endpoint (its URL and model name), the verdict mode, the system prompt and the rendered user message (which holds
the template, the rubric, the prompt, both responses and their order). Only answers are stored (`holds_verdict`).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path
from typing import Any

from selfplay.config.run import fingerprint


def call_key(model: str, mode: str, system: str, user: str, base_url: str = "") -> str:
    return fingerprint({"base_url": base_url.rstrip("/"), "model": model, "mode": mode, "system": system, "user": user})


def holds_verdict(result: dict[str, Any]) -> bool:
    """Whether a call's result is an answer worth keeping. A reply without a verdict (an error, `invalid`, no
    probability) says more about the endpoint at that moment than about the pair: cached, it would be served to
    every later run, even after the endpoint is healthy again."""
    return result.get("error") is None and result.get("p_a") is not None and result.get("label") != "invalid"


class JudgeCache:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS calls (key TEXT PRIMARY KEY, result TEXT NOT NULL)")
        self._lock = threading.Lock()

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT result FROM calls WHERE key = ?", (key,)).fetchone()
        hit = json.loads(row[0]) if row else None
        # Older versions stored `invalid` replies: such a row is a miss, and the next answer replaces it.
        return hit if hit is not None and holds_verdict(hit) else None

    def put(self, key: str, result: dict[str, Any]) -> None:
        """Store an answer; a result without a verdict is not stored, so the call is asked again next time."""
        if not holds_verdict(result):
            return
        with self._lock, self._db:
            self._db.execute("INSERT OR REPLACE INTO calls (key, result) VALUES (?, ?)", (key, json.dumps(result)))

    def close(self) -> None:
        self._db.close()

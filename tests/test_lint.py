"""Unit tier: the code passes the ruff configuration in pyproject.toml (pycodestyle, pyflakes, import order,
bugbear, pyupgrade; the line length the code is written to)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]


def test_ruff_passes():
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "selfplay", "tasks", "flows", "tools", "tests"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]

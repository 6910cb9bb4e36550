"""Unit tier: the command line's own logic: where `setup` and `serve` find the deployments they need."""

from __future__ import annotations

from pathlib import Path

import pytest

from selfplay.cli import main, project_root

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]


def test_the_checkout_is_found_from_any_folder_inside_it():
    assert project_root(REPO) == REPO
    assert project_root(REPO / "selfplay" / "runtime") == REPO


def test_setup_and_serve_outside_a_checkout_say_where_to_run_them(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for command in ("setup", "serve"):
        assert main([command]) == 2
        err = capsys.readouterr().err
        assert f"no selfplay checkout at or above {tmp_path.resolve()}" in err and "prefect.yaml" in err

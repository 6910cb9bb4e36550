"""Fast tier: the layers only point down. flows/ wires tasks/; a task imports selfplay/ and no other task (nor a
flow); selfplay/ never imports tasks/. Read from the modules' import statements (ast), lazy imports included, so an
import inside a function counts as much as one at the top. (The entry points `selfplay.cli` and `selfplay.smoke`
start the self-play flow, so they import flows/: they sit above it.) And no module under selfplay/ is over 450
lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("selfplay", "tasks", "flows")
MAX_LINES = 450


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> set[str]:
    """Every module `path` imports (absolute names; relative imports resolved against its package)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from tasks import judge`
    return names


def arrows() -> list[tuple[str, str]]:
    """(importer, imported) for every import between modules of the three layers."""
    found = []
    for layer in LAYERS:
        for path in sorted((REPO / layer).rglob("*.py")):
            for target in sorted(imported(path)):
                if target.split(".")[0] in LAYERS:
                    found.append((module_name(path), target))
    return found


def forbidden(importer: str, target: str) -> str | None:
    """Why the arrow importer -> target breaks the layering, or None when it points down."""
    source_layer, target_layer = importer.split(".")[0], target.split(".")[0]
    if source_layer == "selfplay" and target_layer == "tasks":
        return "selfplay/ imports a stage"
    if source_layer == "tasks" and target_layer == "flows":
        return "a task imports a flow"
    if source_layer == "tasks" and target_layer == "tasks" and target not in ("tasks", importer):
        return "a task imports another task"
    return None


def test_the_walk_sees_imports_at_every_depth():
    assert ("flows.dpo_round", "tasks.judge") in arrows()
    assert ("selfplay.preflight", "selfplay.judging") in arrows()  # a lazy import, inside a function


@pytest.mark.parametrize("importer, target, broken", [
    ("selfplay.preflight", "tasks.judge", True),
    ("selfplay.cli", "flows.self_play", False),
    ("tasks.evaluate", "tasks.judge", True),
    ("tasks.evaluate", "flows.dpo_round", True),
    ("flows.dpo_round", "tasks.judge", False),
    ("tasks.judge", "selfplay.judging", False),
])
def test_the_rule_itself(importer, target, broken):
    assert (forbidden(importer, target) is not None) == broken


def test_no_arrow_points_up_or_sideways():
    bad = [f"{a} -> {b}: {why}" for a, b in arrows() if (why := forbidden(a, b))]
    assert not bad, "\n".join(bad)


def test_no_selfplay_module_is_over_450_lines():
    lines = {str(p.relative_to(REPO)): len(p.read_text().splitlines()) for p in (REPO / "selfplay").rglob("*.py")}
    assert len(lines) > 20 and max(lines.values()) > 100  # the walk found the package
    long = {path: n for path, n in lines.items() if n > MAX_LINES}
    assert not long, long

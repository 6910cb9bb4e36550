"""Unit tier: the layout is the architecture, read from the modules' import statements (ast), lazy imports included,
so an import inside a function counts as much as one at the top.

- No import circle among the project's modules, and none among selfplay/'s folders: each folder only uses the ones
  below it (`selfplay.config` and `selfplay.inputs` at the bottom, `selfplay.orchestration` at the top).
- The layers only point down: tools/ (developer tools) and flows/ above tasks/, tasks/ above selfplay/. A task
  imports no other task nor a flow; selfplay/ imports no task, no tool, no test, and no flow except from the
  command-line entry point (`selfplay.cli` starts the self-play flow).
- A folder's `__init__.py` is its docstring only: a package that re-exports its modules is how a circle hides.
- No module under selfplay/ is over 450 lines; tools/ is not in what `pip install` ships; and
  docs/architecture.md's table names exactly the folders and modules there are.
"""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("selfplay", "tasks", "flows", "tools")
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


def modules() -> dict[str, Path]:
    return {module_name(p): p for layer in LAYERS for p in sorted((REPO / layer).rglob("*.py"))}


def arrows() -> list[tuple[str, str]]:
    """(importer, imported) for every import between the project's modules, each imported name resolved to the
    module that defines it (`from selfplay.runtime import isolate` -> selfplay.runtime.isolate; `from x.y import f`
    -> x.y)."""
    known = modules()
    found = set()
    for name, path in known.items():
        for target in imported(path):
            if target.split(".")[0] not in LAYERS:
                continue
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add((name, target))
    return sorted(found)


def circles(edges: list[tuple[str, str]]) -> list[list[str]]:
    """The strongly connected components with more than one member (Tarjan), each sorted: the import circles."""
    graph: dict[str, list[str]] = {}
    for a, b in edges:
        graph.setdefault(a, []).append(b)
        graph.setdefault(b, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def folder(module: str) -> str:
    """The selfplay/ folder a module sits in (`selfplay.judging.runner` -> `selfplay.judging`); top-level modules
    (`selfplay.cli`) and other layers are their own."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "selfplay" and len(parts) > 2 else module


def forbidden(importer: str, target: str) -> str | None:
    """Why the arrow importer -> target breaks the layering, or None when it points down."""
    source_layer, target_layer = importer.split(".")[0], target.split(".")[0]
    if source_layer == "selfplay" and target_layer in ("tasks", "tools", "tests"):
        return f"selfplay/ imports {target_layer}/"
    if source_layer == "selfplay" and target_layer == "flows" and importer != "selfplay.cli":
        return "only the command-line entry point (selfplay.cli) starts a flow"
    if source_layer == "tasks" and target_layer in ("flows", "tools"):
        return f"a task imports {target_layer}/"
    if source_layer == "tasks" and target_layer == "tasks" and target not in ("tasks", importer):
        return "a task imports another task"
    if source_layer == "flows" and target_layer == "tools":
        return "a flow imports tools/"
    return None


def test_the_walk_sees_imports_at_every_depth():
    found = arrows()
    assert ("flows.dpo_round", "tasks.judge") in found
    assert ("selfplay.orchestration.preflight", "selfplay.judging.runner") in found  # a lazy import, inside a function
    assert ("tasks.sample", "selfplay.runtime.isolate") in found  # `from selfplay.runtime import isolate`


@pytest.mark.parametrize("importer, target, broken", [
    ("selfplay.orchestration.preflight", "tasks.judge", True),
    ("selfplay.cli", "flows.self_play", False),
    ("selfplay.reporting.report", "flows.self_play", True),
    ("selfplay.runtime.stages", "tools.faults", True),
    ("tasks.evaluate", "tasks.judge", True),
    ("tasks.evaluate", "flows.dpo_round", True),
    ("flows.dpo_round", "tasks.judge", False),
    ("tasks.judge", "selfplay.judging.runner", False),
    ("tools.bench", "selfplay.cli", False),
])
def test_the_rule_itself(importer, target, broken):
    assert (forbidden(importer, target) is not None) == broken


def test_circles_are_found():
    assert circles([("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")]) == [["a", "b", "c"]]
    assert circles([("a", "b"), ("b", "c")]) == []


def test_no_import_circle_among_modules():
    assert not circles(arrows()), circles(arrows())


def test_no_circle_among_selfplay_folders():
    """Each folder of selfplay/ only uses folders below it, so the folders read as layers."""
    edges = [(folder(a), folder(b)) for a, b in arrows() if a.startswith("selfplay.") and b.startswith("selfplay.")
             and folder(a) != folder(b)]
    assert len({a for a, _ in edges}) >= 8  # the walk found the folders
    assert not circles(edges), circles(edges)


def test_no_arrow_points_up_or_sideways():
    bad = [f"{a} -> {b}: {why}" for a, b in arrows() if (why := forbidden(a, b))]
    assert not bad, "\n".join(bad)


def test_package_inits_are_docstrings_only():
    inits = sorted((REPO / "selfplay").rglob("__init__.py"))
    assert len(inits) >= 10
    for path in inits:
        body = ast.parse(path.read_text()).body
        assert body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant), f"{path}: no docstring"
        assert len(body) == 1, f"{path}: a package's __init__ holds its docstring only (import its modules directly)"


def test_no_selfplay_module_is_over_450_lines():
    lines = {str(p.relative_to(REPO)): len(p.read_text().splitlines()) for p in (REPO / "selfplay").rglob("*.py")}
    assert len(lines) > 20 and max(lines.values()) > 100  # the walk found the package
    long = {path: n for path, n in lines.items() if n > MAX_LINES}
    assert not long, long


def test_tools_are_not_shipped():
    find = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    shipped = [p for p in ("selfplay", "selfplay.runtime", "flows", "tasks", "tools", "tests")
               if any(re.fullmatch(pattern.replace(".", r"\.").replace("*", ".*"), p) for pattern in find["include"])]
    assert shipped == ["selfplay", "selfplay.runtime", "flows", "tasks"]


def architecture_table() -> dict[str, set[str]]:
    """docs/architecture.md's table of selfplay/: folder -> the modules it names (`cli.py` and the like under "")."""
    text = (REPO / "docs" / "architecture.md").read_text()
    section = text.split("## selfplay/, by folder", 1)[1].split("\n## ", 1)[0]
    table: dict[str, set[str]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`"):
            continue
        name = cells[0].strip("`").rstrip("/")
        table.setdefault("" if name.endswith(".py") else name, set()).update(
            re.findall(r"`([a-z_]+\.py)`", cells[2]) if not name.endswith(".py") else {name})
    return table


def test_the_architecture_table_and_the_folders_agree():
    on_disk: dict[str, set[str]] = {}
    for path in (REPO / "selfplay").rglob("*.py"):
        rel = path.relative_to(REPO / "selfplay")
        if path.name != "__init__.py":
            on_disk.setdefault(str(rel.parent) if len(rel.parts) > 1 else "", set()).add(path.name)
    assert architecture_table() == on_disk

"""The package's import structure: no cycles, and core depends on nothing above it.

Every ``import`` statement in ``src/concept_attention`` (also inside functions) is read with ``ast``
and resolved to the package's own modules; the graph must be acyclic, and ``core`` may import only
``core`` (front ends → core ← adapters). Small functions are checked too (≤ 60 lines).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "concept_attention"


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    return {module_name(path): path for path in (SRC / PACKAGE).rglob("*.py")}


def resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module a ``from ... import`` names (before its imported names)."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``module`` imports."""
    found: set[str] = set()
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            target = resolve(module, path.name == "__init__.py", node)
            names = [f"{target}.{alias.name}" for alias in node.names]
            submodules = [name for name in names if name in modules]
            found.update(submodules or [target])
            if len(submodules) < len(names):
                found.add(target)
    return {name for name in found if name in modules and name != module}


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 20
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_core_imports_only_core():
    graph = import_graph()
    core = f"{PACKAGE}.core"
    outside = {(name, target) for name, targets in graph.items() if name.startswith(core)
               for target in targets if not target.startswith(core)}
    assert not outside, sorted(outside)


def test_adapters_import_only_core_and_adapters():
    graph = import_graph()
    allowed = (f"{PACKAGE}.core", f"{PACKAGE}.adapters")
    outside = {(name, target) for name, targets in graph.items() if name.startswith(f"{PACKAGE}.adapters")
               for target in targets if not target.startswith(allowed)}
    assert not outside, sorted(outside)


def test_the_checks_see_cycles_and_forbidden_imports():
    """The graph reader finds a planted cycle and a planted core -> viz import (the checks can fail)."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    modules = package_modules()
    node = ast.parse("from ..viz import colorize\nfrom . import scoring").body
    core_session = f"{PACKAGE}.core.session"
    targets = {resolve(core_session, False, statement) for statement in node}
    assert targets == {f"{PACKAGE}.viz", f"{PACKAGE}.core"}
    assert f"{PACKAGE}.viz" in modules and f"{PACKAGE}.core.scoring" in modules


@pytest.mark.parametrize("path", sorted((SRC / PACKAGE).rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_functions_are_at_most_60_lines(path):
    tree = ast.parse(path.read_text())
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)" for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60]
    assert not long, long

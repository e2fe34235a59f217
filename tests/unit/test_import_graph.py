"""The layers hold: the service imports nothing from the commands, ``consumer`` nothing from
``devstack`` (the servers of the demo and the tests), and no module of ``consumer``,
``benchmarks`` or ``devstack`` imports itself through others.

Read from the source with ``ast`` (nothing is imported). An import inside a function counts
as an edge like any other: a lazy import that hides a cycle is still a cycle. The one exception
is the CLI's lazy imports of the commands and the service, which exist so that ``milestones
--help`` starts without loading aiokafka and asyncpg.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("consumer", "benchmarks", "schemas", "devstack")
CLI = "consumer.cli"


def _module_files() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = _module_files()


def _imports(name: str, path: Path) -> Iterator[tuple[str, bool]]:
    """(imported module, inside a function) for each import of the file, resolved to the most
    specific module of ours (``from consumer.store import batch_sql`` is the submodule)."""
    tree = ast.parse(path.read_text(), str(path))
    lazy: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            lazy.update(id(inner) for inner in ast.walk(node) if inner is not node)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
                for alias in node.names
            ]
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name:
                yield target, id(node) in lazy


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        for target, lazy in _imports(name, path):
            if lazy and name == CLI:
                continue
            graph[name].add(target)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path that returns to its start, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return [*path[path.index(target):], target]
            if target not in state and (found := visit(target)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_modules_are_found() -> None:
    assert {"consumer.runtime", "consumer.service", "consumer.commands.replay",
            "benchmarks.cli", "benchmarks.scenarios"} <= set(MODULES)


def test_the_service_imports_nothing_from_the_commands() -> None:
    offenders = sorted(
        f"{name} imports {target}"
        for name, path in MODULES.items()
        if name.startswith("consumer") and name != CLI and not name.startswith("consumer.commands")
        for target, _ in _imports(name, path)
        if target.startswith("consumer.commands")
    )
    assert offenders == []


def test_the_service_imports_nothing_from_the_dev_stack() -> None:
    """Only the CLI's dispatcher names the demo command, lazily, when it is asked for."""
    offenders = sorted(
        f"{name} imports {target}"
        for name, path in MODULES.items()
        if name.startswith("consumer")
        for target, lazy in _imports(name, path)
        if target.startswith("devstack") and not (name == CLI and lazy)
    )
    assert offenders == []


@pytest.mark.parametrize("package", ["consumer", "benchmarks", "devstack"])
def test_there_is_no_import_cycle(package: str) -> None:
    graph = _graph()
    inside = {
        name: {target for target in targets if target.startswith(package)}
        for name, targets in graph.items() if name.startswith(package)
    }
    assert _cycle(inside) is None, " -> ".join(_cycle(inside) or [])


def test_a_cycle_is_found_when_there_is_one() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


_SQL = re.compile(r"^\s*(SELECT|INSERT|UPDATE|DELETE|WITH|CREATE|ALTER|DROP|GRANT|LOCK)\s")


def test_sql_is_written_only_in_the_store() -> None:
    offenders = sorted(
        f"{name}:{node.lineno} {node.value.strip()[:40]!r}"
        for name, path in MODULES.items()
        if name.startswith("consumer") and not name.startswith("consumer.store")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and _SQL.match(node.value)
    )
    assert offenders == []

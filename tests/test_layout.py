"""The layering rules, checked on the code itself: imports point one way (bench -> launcher ->
averaging -> models -> core), no package's modules import each other in a circle, the sidecar's
process holds no trainer code, and no module grows past 600 lines."""
from __future__ import annotations

import ast
import subprocess
import sys

import pytest

from conftest import REPO

ALLOWED = {  # which of our packages each package may import
    "core": {"core"},
    "models": {"core", "models"},
    "averaging": {"core", "models", "averaging"},
    "launcher": {"core", "models", "averaging", "launcher"},
    "bench": {"core", "models", "averaging", "launcher", "bench"},  # benchmarks time every layer; none imports them
}


def imported_packages(path) -> set[str]:
    """Our top-level packages that a file imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & set(ALLOWED)


MODULES = sorted(p for package in ALLOWED for p in (REPO / package).rglob("*.py"))


def module_name(path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_at_load(path, known: set[str]) -> set[str]:
    """Our modules that importing `path` imports (its module-level statements, `if`/`try` included:
    an import inside a function runs later, when called)."""
    found = set()

    def visit(statements):
        for node in statements:
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                for alias in node.names:  # `from a.b import c` imports a.b.c when c is a module
                    found.add(f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in known else node.module)
            elif isinstance(node, (ast.If, ast.Try)):
                visit(node.body)
                visit(node.orelse)
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)
                visit(getattr(node, "finalbody", []))

    visit(ast.parse(path.read_text(), str(path)).body)
    return found & known


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan), each a circle of imports."""
    order: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def connect(v: str) -> None:
        order[v] = low[v] = len(order)
        stack.append(v)
        for w in graph[v]:
            if w not in order:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], order[w])
        if low[v] == order[v]:
            group = []
            while not group or group[-1] != v:
                group.append(stack.pop())
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in order:
            connect(v)
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_no_package_imports_itself_in_a_circle(package):
    names = {module_name(p): p for p in MODULES}
    inside = {name: path for name, path in names.items() if name.split(".")[0] == package}
    graph = {name: imported_at_load(path, set(inside)) for name, path in inside.items()}
    assert not circles(graph), f"{package}: modules that import each other at load: {circles(graph)}"


def test_the_circle_check_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("path", MODULES, ids=[str(p.relative_to(REPO)) for p in MODULES])
def test_imports_point_down_and_modules_stay_small(path):
    package = path.relative_to(REPO).parts[0]
    upward = imported_packages(path) - ALLOWED[package]
    assert not upward, f"{path.relative_to(REPO)} ({package}) imports {sorted(upward)}"
    lines = len(path.read_text().splitlines())
    assert lines <= 600, f"{path.relative_to(REPO)} has {lines} lines: split it"


def loaded_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_the_sidecar_process_holds_no_trainer_code():
    loaded = loaded_after("import averaging.sidecar.worker")
    assert not {m for m in loaded if m.split(".")[0] == "launcher"}


def test_reading_a_job_loads_neither_the_sidecar_worker_nor_deepspeed():
    loaded = loaded_after("from launcher.config import load_job; load_job()")
    assert "averaging.sidecar.worker" not in loaded and "deepspeed" not in loaded

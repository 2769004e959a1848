"""The layering rules, checked on the code itself: imports point one way (launcher -> averaging ->
models -> core), the sidecar's process holds no trainer code, and no module grows past 600 lines."""
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

"""The tree's three rooms as the README draws them: import arrows point from the adapters
and the operations to the core, never back, and only the adapters import a server."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

PACKAGE = Path(__file__).resolve().parents[2] / "handler" / "sdxl_serve"
ADAPTERS = {"torchserve_handler", "triton_model"}
OPERATIONS = {"server", "management", "pod", "triton_server", "triton_client"}
SERVERS = {"ts", "triton_python_backend_utils", "tritonserver", "pytriton", "sdxl_jobs"}


def imported(module: Path) -> set[str]:
    """Every module ``module`` imports, at any depth of its code (lazy imports included)."""
    names = set()
    for node in ast.walk(ast.parse(module.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def core_modules() -> list[Path]:
    return sorted(path for path in PACKAGE.glob("*.py")
                  if path.stem not in ADAPTERS | OPERATIONS | {"__init__"})


def test_the_rooms_name_modules_that_exist():
    present = {path.stem for path in PACKAGE.glob("*.py")}
    assert ADAPTERS | OPERATIONS <= present
    assert {"contract", "engine", "service", "recycling"} <= {p.stem for p in core_modules()}


@pytest.mark.parametrize("module", core_modules(), ids=lambda path: path.stem)
def test_the_core_imports_no_adapter_no_operation_and_no_server(module):
    outside = {f"sdxl_serve.{name}" for name in ADAPTERS | OPERATIONS}
    wrong = {name for name in imported(module)
             if name in outside or name.split(".")[0] in SERVERS}
    assert not wrong, f"{module.stem} (core) imports {sorted(wrong)}"


def test_only_the_torchserve_handler_imports_torchserve():
    importers = {path.stem for path in PACKAGE.glob("*.py")
                 if any(name.split(".")[0] == "ts" for name in imported(path))}
    assert importers <= {"torchserve_handler"}


SCRIPTS = sorted((PACKAGE.parents[1] / "scripts").glob("*.py"))


@pytest.mark.parametrize("script", SCRIPTS, ids=[path.name for path in SCRIPTS])
def test_every_script_answers_help(script: Path):
    # What a person runs says what it does: bench_jobs.py and bench_report.py, modules of
    # bench.py, printed nothing and exited 0.
    done = subprocess.run([sys.executable, str(script), "--help"], capture_output=True,
                          text=True, timeout=120, cwd=PACKAGE.parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(done.stdout.strip()) > 80, done.stdout

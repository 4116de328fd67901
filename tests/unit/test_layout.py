"""The tree's three rooms as the README draws them: import arrows point from the adapters
and the operations to the core, never back, and only the adapters import a server."""

from __future__ import annotations

import ast
import os
import shutil
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


# What a script imports, given as a file to run: the package each module of ours came from,
# and the one a job process it starts (`same_code`'s environment) would import.
PROBE = """
import os, runpy, subprocess, sys
runpy.run_path(sys.argv[1], run_name="probe")
import sdxl_jobs, sdxl_serve
from sdxl_jobs.processes import same_code
print(sdxl_serve.__file__)
print(sdxl_jobs.__file__)
child = subprocess.run([sys.executable, "-c", "import sdxl_jobs, sdxl_serve; "
                        "print(sdxl_serve.__file__); print(sdxl_jobs.__file__)"],
                       env=same_code(os.environ), capture_output=True, text=True, check=True)
print(child.stdout)
"""
IMPORTERS = [path for path in SCRIPTS
             if {name.split(".")[0] for name in imported(path)} & {"sdxl_serve", "sdxl_jobs"}]


@pytest.fixture(scope="module")
def second_checkout(tmp_path_factory) -> Path:
    """Another checkout of this tree, which the venv's editable install does not name: a
    venv shared by two checkouts sees one of them so."""
    root = tmp_path_factory.mktemp("second-checkout")
    for part in ("handler", "jobs", "scripts", "config"):
        shutil.copytree(PACKAGE.parents[1] / part, root / part,
                        ignore=shutil.ignore_patterns("__pycache__"))
    return root


@pytest.mark.parametrize("script", IMPORTERS, ids=[path.name for path in IMPORTERS])
def test_every_script_runs_its_own_checkouts_code(script: Path, second_checkout: Path):
    # serve.py, serve_jobs.py, build_archive.py and rollout.py imported the code the venv's
    # editable install named, and serve_jobs.py's API and dispatcher too: from a second
    # checkout they ran the first one's code and wrote into its build/run.
    done = subprocess.run([sys.executable, "-c", PROBE, str(second_checkout / "scripts" /
                                                          script.name)],
                          capture_output=True, text=True, timeout=120, cwd=second_checkout)
    assert done.returncode == 0, done.stderr[-2000:]
    files = [Path(line) for line in done.stdout.split()]
    assert len(files) == 4, done.stdout
    assert all(path.is_relative_to(second_checkout) for path in files), done.stdout


def test_torchserve_workers_drop_a_checkouts_handler_from_pythonpath_and_keep_installs(
        tmp_path: Path):
    # A checkout's handler/ took the archive's place in the workers; a folder our package
    # was installed into holds torch and diffusers too, and the first version of the
    # filter dropped it because it holds `sdxl_serve`.
    from sdxl_serve.server import archive_code_path
    installed = tmp_path / "target"
    (installed / "sdxl_serve").mkdir(parents=True)
    (installed / "torch").mkdir()
    checkout = PACKAGE.parent
    kept = archive_code_path(os.pathsep.join([str(checkout), str(installed), "/x"]))
    assert kept.split(os.pathsep) == [str(installed), "/x"]

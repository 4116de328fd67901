"""The launchers run by a Python that lacks what they need: one `error:` line, not a
traceback. Real interpreters (fresh venvs), each without the packages in question."""

from __future__ import annotations

import os
import site
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]


def venv(folder: Path, site_dirs: list[Path] = ()) -> Path:
    """A fresh venv's python, seeing ``site_dirs`` (their .pth files too) and nothing else."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True,
                   capture_output=True, timeout=120)
    python = folder / "bin" / "python"
    own = subprocess.run([str(python), "-c", "import site; print(site.getsitepackages()[0])"],
                         check=True, capture_output=True, text=True, timeout=60).stdout.strip()
    (Path(own) / "sites.pth").write_text("".join(
        f"import site; site.addsitedir({str(path)!r})\n" for path in site_dirs))
    return python


def run(python: Path, script: str, tmp_path: Path, path: str | None = None
        ) -> subprocess.CompletedProcess:
    from sdxl_serve.server import Addresses

    # Free ports: a launcher that went on (before the check) must not meet another server.
    addresses = Addresses.free()
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(("PYTHON", "TS_", "SDXL_"))}
    env.update(TS_INFERENCE_ADDRESS=addresses.inference,
               TS_MANAGEMENT_ADDRESS=addresses.management, TS_METRICS_ADDRESS=addresses.metrics)
    if path is not None:
        env["PATH"] = path
    store = [] if script == "serve_triton.py" else ["--model-store", str(tmp_path / "store")]
    return subprocess.run([str(python), str(REPO / "scripts" / script), *store], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("script, named", [
    ("serve.py", "torchserve, torch-model-archiver, torch, diffusers, pyyaml"),
    ("serve_jobs.py", "torchserve, torch-model-archiver, torch, diffusers, pyyaml, redis, "
                      "fastapi, uvicorn, httpx"),
    ("serve_triton.py", "nvidia-pytriton, torch, diffusers, pyyaml, numpy"),
])
def test_a_python_without_the_requirements_is_told_to_make_the_venv(tmp_path, script, named):
    """The system's python3 running a launcher: it was `ModuleNotFoundError: No module
    named 'yaml'` (or 'redis', 'numpy') in a traceback."""
    python = venv(tmp_path / "bare")
    done = run(python, script, tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr == (f"error: this Python ({python}) lacks {named}: `make venv` "
                           f"installs them (requirements*.txt) into .venv, which the Makefile's "
                           f"targets run (or run the script with .venv/bin/python)\n")


def test_a_venv_without_torchserve_is_said_before_the_archive_is_built(tmp_path):
    """Every requirement but `ts`: a RuntimeError traceback, after the model and archive
    were built."""
    shadow = tmp_path / "site"
    shadow.mkdir()
    for real in map(Path, site.getsitepackages()):
        for entry in real.iterdir():
            if entry.name != "ts" and not entry.name.startswith("torchserve-") and \
                    not (shadow / entry.name).exists():
                (shadow / entry.name).symlink_to(entry)
    python = venv(tmp_path / "partial", [shadow])
    # The console scripts (torch-model-archiver) on PATH, as an activated venv has them.
    done = run(python, "serve.py", tmp_path,
               f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"error: this Python ({python}) lacks torchserve: "), \
        done.stderr
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert not (tmp_path / "store").exists()  # nothing built

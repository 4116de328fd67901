"""The playground's files travel with the package: an install that is not editable (a wheel,
an image without the source tree) still serves the page."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit  # no Redis, browser or model: setuptools alone

REPO = Path(__file__).resolve().parents[2]


def test_setuptools_builds_the_playground_into_the_package(tmp_path):
    # build_py is the step that copies a package's files into a wheel or an install.
    done = subprocess.run([sys.executable, "-c", "from setuptools import setup; setup()", "-q",
                           "build_py", "--build-lib", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    source = REPO / "jobs" / "sdxl_jobs" / "playground"
    built = tmp_path / "sdxl_jobs" / "playground"
    assert sorted(p.name for p in built.iterdir()) == sorted(p.name for p in source.iterdir())
    for path in source.iterdir():
        assert (built / path.name).read_bytes() == path.read_bytes()

"""What `make serve`'s first start shows while it builds the tiny model: its own two lines."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]


def test_building_the_tiny_model_says_what_it_does_and_nothing_else(tmp_path):
    """It also showed the libraries' seven notes about themselves as diffusers was imported
    (torchao, torch, diffusers, transformers) and a "Writing model shards" bar for each text
    encoder, in the launcher's terminal before TorchServe started."""
    out = tmp_path / "tiny-sdxl"
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "build_model.py"),
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert re.fullmatch(rf"building the tiny SDXL in {re.escape(str(out))} \.\.\.\n"
                        r"built in [0-9.]+ s\n", done.stdout), done.stdout

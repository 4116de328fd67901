"""The libraries' notes about themselves (torchao, torch, diffusers, transformers) and their
bars stay out of what an operator reads: the model log at a worker's start, and `make
serve`'s first start while it builds the tiny model."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.handler
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


LIBRARIES = textwrap.dedent("""
    import logging
    import sdxl_serve.pipeline_libraries
    from sdxl_serve.log_streams import IMPORT_NOTE_LOGGERS
    print([logging.getLogger(name).level for name in IMPORT_NOTE_LOGGERS])
""")


def test_the_pipeline_libraries_import_without_notes_about_themselves():
    """What the engines' fork server imports (and an engine process, with a CUDA torch) said
    seven things on stderr, each a WARN line in the model log at every worker start: torchao
    kernels a CPU torch cannot load, torch deprecating two of torchao's enums, diffusers
    without torchao's tensor classes, transformers without torchvision. The loggers held
    are as they were after the import, so a later warning of theirs still shows."""
    done = subprocess.run([sys.executable, "-c", LIBRARIES], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert done.stdout.split() == ["[0,", "0,", "0,", "0]"]

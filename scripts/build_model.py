#!/usr/bin/env python3
"""Build the embedded tiny SDXL (random weights, real diffusers classes) as safetensors.

Usage: python scripts/build_model.py [--out build/tiny-sdxl] [--force]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# This checkout's code first, not the checkout a shared venv's editable install names.
sys.path[:0] = [str(REPO / "handler"), str(REPO / "jobs"), str(REPO / "scripts")]
from sdxl_serve.model_files import MANIFEST  # noqa: E402
from sdxl_serve.tiny_model import build_tiny_sdxl  # noqa: E402

# SDXL_TINY_MODEL_DIR moves it out of the checkout (the tests point it at their own copy).
DEFAULT_OUT = Path(os.environ.get("SDXL_TINY_MODEL_DIR") or REPO / "build" / "tiny-sdxl")


def ensure_tiny_model(out: Path = DEFAULT_OUT, force: bool = False) -> Path:
    """Build the tiny model into ``out`` unless a complete one is already there."""
    # Complete means built with its manifest (one built before manifests is built again).
    if (out / "model_index.json").is_file() and (out / MANIFEST).is_file() and not force:
        return out
    if out.exists():
        shutil.rmtree(out)
    started = time.perf_counter()
    print(f"building the tiny SDXL in {out} ...", flush=True)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    build_tiny_sdxl(partial)
    partial.rename(out)  # never leave a half-written model where serve looks for one
    print(f"built in {time.perf_counter() - started:.1f} s", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--force", action="store_true", help="rebuild even if present")
    args = parser.parse_args(argv)
    ensure_tiny_model(args.out, args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())

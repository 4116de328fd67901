#!/usr/bin/env python3
"""The speed switches on this machine, each against the switch off, in one run.

Each variant is a real engine process (``engine_process``: forked, loads the tiny SDXL,
warms up, reports READY) serving the same requests one at a time through the service
(validation, one pipeline call, PNG, JSON): time to READY as the worker sees it, and
img/s at the compiled bucket's shape. ``compile cold`` starts with an empty compile cache,
``compile warm`` is the next engine process on the cache it left: what a recycled engine
process pays. Every number is measured in this run; the last line printed is JSON.

On a GPU the same script runs against the same tiny model; full-size SDXL figures come
from scripts/bench_gpu.py (docs/benchmarks.md), not from here.

Usage:
    python scripts/bench_speed.py [--size 32] [--steps 2] [--requests 10] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# This checkout's code first, not the checkout a shared venv's editable install names.
sys.path[:0] = [str(REPO / "handler"), str(REPO / "jobs"), str(REPO / "scripts")]
from bench_report import publish  # noqa: E402

VARIANTS = ("off", "fuse_qkv", "channels_last", "int8_dynamic", "compile cold",
            "compile warm")


def variant_list(text: str) -> list[str]:
    """``--variants``: a misspelt one was measured as "off" under its own name.

    >>> variant_list("off,compile warm")
    ['off', 'compile warm']
    """
    variants = [name.strip() for name in text.split(",")]
    unknown = [name for name in variants if name not in VARIANTS]
    if unknown:
        raise argparse.ArgumentTypeError(f"not a variant: {', '.join(unknown)} (the "
                                         f"variants: {', '.join(VARIANTS)})")
    return variants


def variant_config(variant: str, size: int, steps: int, cache: Path) -> dict:
    config = {"device": "cpu", "warmup_sizes": f"{size}x{size}", "warmup_steps": steps,
              "compile_batch_sizes": "1", "compile_cache_dir": str(cache)}
    if variant in ("fuse_qkv", "channels_last"):
        config[variant] = True
    if variant == "int8_dynamic":
        config["quantize"] = variant
    if variant.startswith("compile"):
        config["compile"] = "default"
    return config


def run_variant(model_dir: Path, variant: str, size: int, steps: int, requests: int,
                cache: Path) -> dict:
    """Start one engine process with the variant, serve ``requests``, stop it."""
    from sdxl_serve.engine_process import EngineProcess, EngineSpec
    from sdxl_serve.service import Incoming

    engine = EngineProcess(EngineSpec(str(model_dir),
                                      variant_config(variant, size, steps, cache)))
    engine.start()
    try:
        info = engine.wait_ready(timeout=1800)
        seconds = []
        for seed in range(requests):
            body = json.dumps({"prompt": "a lighthouse", "seed": seed, "width": size,
                               "height": size, "num_inference_steps": steps}).encode()
            started = time.perf_counter()
            replies, _, gauges = engine.serve([Incoming(body)])
            seconds.append(time.perf_counter() - started)
            if replies[0].status != 200:
                raise RuntimeError(f"{variant}: status {replies[0].status}")
    finally:
        engine.stop()
    return {"variant": variant, "ready_s": info["ready_s"], "warm_up_s": info["warm_up_s"],
            "images_per_s": requests / sum(seconds),
            "p50_s": statistics.median(seconds), "gauges": gauges}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--variants", default=",".join(VARIANTS), type=variant_list,
                        help=f"comma-separated, of: {', '.join(VARIANTS)} (default: all)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    from build_model import ensure_tiny_model

    model_dir = ensure_tiny_model()
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} CPU(s), "
                         f"load {os.getloadavg()[0]:.1f} at start",
              "size": args.size, "steps": args.steps, "requests": args.requests,
              "variants": {}}
    with tempfile.TemporaryDirectory(prefix="sdxl-bench-compile-") as cache:
        for variant in args.variants:
            result = run_variant(model_dir, variant, args.size, args.steps, args.requests,
                                 Path(cache))
            report["variants"][variant] = result
            base = report["variants"].get("off", result)
            print(f"{variant:<14} READY {result['ready_s']:7.1f} s  "
                  f"{result['images_per_s']:6.2f} img/s  p50 {result['p50_s']:.3f} s  "
                  f"({result['images_per_s'] / base['images_per_s']:.2f}x off)", flush=True)
    report["load_at_end"] = os.getloadavg()[0]
    publish(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

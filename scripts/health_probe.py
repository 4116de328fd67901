#!/usr/bin/env python3
"""Deep health probe: exit 0 if the model can generate, printing the worker's answer.

The same check as the pod's readiness probe (``python -m sdxl_serve.pod ready``), for a
server started from this checkout: ``/ping`` must say Healthy, then ``GET
/predictions/<model>`` with ``X-Health-Check: deep`` and the inference key must answer 200.
The worker answers from its latest check, at most ``health_interval_s`` old, or runs one
cheap real generation first. While requests are queued for the model the check is not sent
(it would wait behind them, and stay queued once the probe gave up): a busy server passes.
An expired key is renewed with the API key.

Usage:
    python3 scripts/health_probe.py [--url http://127.0.0.1:8080] [--model sdxl]
        [--run-dir build/run/8080] [--management http://127.0.0.1:8081] [--timeout 5]
    python3 scripts/health_probe.py --triton [--model sdxl] [--timeout 5]

The addresses default to the TS_* variables, as for serve.py; the run directory to
serve.py's for the inference port: build/run/<port>.

With --triton, the readiness of a model of serve_triton.py's Triton (the ports from the
SDXL_TRITON_*_PORT variables, as for serve_triton.py): exit 0 when Triton says the model is
ready and its circuit breaker is closed (`sdxl_circuit_state` 0 on Triton's /metrics).
Triton's own readiness stays 200 while the breaker is open and every request is a 503.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# This checkout's code first, not the checkout a shared venv's editable install names.
sys.path[:0] = [str(REPO / "handler"), str(REPO / "jobs"), str(REPO / "scripts")]
from sdxl_serve.pod import main  # noqa: E402
from sdxl_serve.server import run_dir_for, seconds  # noqa: E402
from sdxl_serve.triton_server import TritonPorts, model_unready  # noqa: E402


def with_run_dir(argv: list[str]) -> list[str]:
    """``argv`` with serve.py's run directory added when none is given: the pod's default
    (the working directory) holds no key file in a checkout."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--url", default=os.environ.get("TS_INFERENCE_ADDRESS",
                                                        "http://127.0.0.1:8080"))
    parser.add_argument("--run-dir")
    known, _ = parser.parse_known_args(argv)
    if known.run_dir or os.environ.get("SDXL_RUN_DIR"):
        return argv
    try:
        run_dir = run_dir_for(known.url)
    except ValueError:
        return argv  # the probe itself says what is wrong with the address
    return [*argv, "--run-dir", str(run_dir)]


def triton_ready(argv: list[str]) -> int:
    """Exit status of the --triton probe; prints why the model is not ready."""
    parser = argparse.ArgumentParser(prog="health_probe.py --triton")
    parser.add_argument("--triton", action="store_true", required=True)
    parser.add_argument("--model", default="sdxl")
    parser.add_argument("--timeout", type=seconds, default=5.0,
                        help="seconds for each of its two calls")
    args = parser.parse_args(argv)
    try:
        ports = TritonPorts.from_env()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    reason = model_unready(ports, args.model, args.timeout)
    if reason:
        print(f"not ready: {reason}")
        return 1
    print(f"ready: model {args.model} at {ports.http_url}")
    return 0


if __name__ == "__main__":
    if "--triton" in sys.argv[1:]:
        sys.exit(triton_ready(sys.argv[1:]))
    if {"-h", "--help"} & set(sys.argv[1:]):
        # Not the pod probe's own help: its defaults (the run directory: "$SDXL_RUN_DIR,
        # else here") are not this script's.
        print(__doc__)
        sys.exit(0)
    sys.exit(main(["ready", *with_run_dir(sys.argv[1:])]))

"""A start that fails, fails fast: `make serve` (scripts/serve.py) against real TorchServe.

TorchServe alone retries a worker whose model cannot load for as long as it runs, with a
growing pause; the start must end at the first failed load with the worker's exception,
and Ctrl-C must stop it at any time, Java included. (The pod's entry point: test_pod.py.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from sdxl_serve.server import Addresses

pytestmark = pytest.mark.e2e

SERVE = Path(__file__).resolve().parents[2] / "scripts" / "serve.py"


def serve_command(store: Path, run_dir: Path, *extra: str) -> tuple[list[str], dict]:
    addresses = Addresses.free()
    env = dict(os.environ, TS_INFERENCE_ADDRESS=addresses.inference,
               TS_MANAGEMENT_ADDRESS=addresses.management, TS_METRICS_ADDRESS=addresses.metrics,
               TMPDIR=str(run_dir / "tmp"), PYTHONUNBUFFERED="1")
    return [sys.executable, str(SERVE), "--model-store", str(store), "--run-dir", str(run_dir),
            *extra], env


def servers_of(run_dir: Path) -> list[psutil.Process]:
    """Every process started for this run directory: Java (its temp dir) and the workers."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if any(str(run_dir) in word for word in process.info["cmdline"] or []):
            found.append(process)
    return found


def test_a_model_that_cannot_load_ends_the_start_with_its_exception(tmp_path,
                                                                     unloadable_model_store):
    store, weights = unloadable_model_store
    run_dir = tmp_path / "run"
    command, env = serve_command(store, run_dir, "--model-dir", str(weights))
    started = time.monotonic()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    took = time.monotonic() - started
    print(done.stdout, done.stderr, sep="\n")
    assert done.returncode == 1
    assert took < 60, f"the failed start took {took:.0f} s"
    # It said which weights its archive serves, and the worker's own exception.
    assert f"serves the weights in {weights}" in done.stdout
    assert "Traceback (most recent call last):" in done.stderr
    assert f"SettingsError: model_dir '{weights}' is not a directory" in done.stderr
    assert "READY" not in done.stdout
    assert not servers_of(run_dir)


def test_ctrl_c_while_the_model_loads_stops_everything_at_once(tmp_path, model_store):
    run_dir = tmp_path / "run"
    command, env = serve_command(model_store, run_dir)
    serve = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        out = []
        for line in serve.stdout:
            out.append(line)
            if line.startswith("starting TorchServe"):
                break
        assert "serves the embedded tiny model" in "".join(out)
        # Java is up and its worker loading when Ctrl-C comes.
        deadline = time.monotonic() + 30
        while not [p for p in servers_of(run_dir) if p.name() == "java"]:
            assert time.monotonic() < deadline, "no Java after 30 s"
            time.sleep(0.1)
        java = [p for p in servers_of(run_dir) if p.name() == "java"]
        interrupted = time.monotonic()
        serve.send_signal(signal.SIGINT)
        rest, _ = serve.communicate(timeout=60)
        took = time.monotonic() - interrupted
        out.append(rest)
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()
    print("".join(out))
    assert "READY" not in "".join(out), "the model was ready before Ctrl-C: nothing tested"
    assert serve.returncode == 130
    assert took < 15, f"Ctrl-C took {took:.1f} s to stop the start"
    psutil.wait_procs(java, timeout=5)
    assert not [p for p in servers_of(run_dir) if p.is_running()
                and p.status() != psutil.STATUS_ZOMBIE]

"""scripts/health_probe.py's defaults for a server started from this checkout."""

from pathlib import Path

import pytest

from health_probe import with_run_dir

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]


def test_the_run_directory_defaults_to_serve_pys_for_the_inference_port(monkeypatch):
    """It was the working directory, where a checkout has no key file: run from the
    repository after `make serve`, the probe failed with '/ping answered 400'."""
    monkeypatch.delenv("SDXL_RUN_DIR", raising=False)
    monkeypatch.delenv("TS_INFERENCE_ADDRESS", raising=False)
    assert with_run_dir([]) == ["--run-dir", str(REPO / "build" / "run" / "8080")]
    assert with_run_dir(["--url", "http://127.0.0.1:28080", "--timeout", "3"]) == [
        "--url", "http://127.0.0.1:28080", "--timeout", "3",
        "--run-dir", str(REPO / "build" / "run" / "28080")]
    monkeypatch.setenv("TS_INFERENCE_ADDRESS", "http://127.0.0.1:18080")
    assert with_run_dir([])[-1] == str(REPO / "build" / "run" / "18080")
    assert with_run_dir(["--run-dir", "/srv/ts"]) == ["--run-dir", "/srv/ts"]
    monkeypatch.setenv("SDXL_RUN_DIR", "/srv/ts")
    assert with_run_dir([]) == []


def test_a_probe_given_no_timeout_gives_up_when_its_usage_says(tmp_path):
    """Its --help said `[--timeout 30]`, where it gives up after the pod probe's 5 s: an
    operator who set a check's period from it saw every slow worker fail 25 s early."""
    import re
    import socket
    import subprocess
    import sys
    import time

    import health_probe

    usage = health_probe.__doc__.split("Usage:", 1)[1].split("--triton", 1)[0]
    said = float(re.search(r"\[--timeout (\d+)\]", usage).group(1))
    # A server that takes the connection and never answers: the probe waits out its timeout.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, str(REPO / "scripts" / "health_probe.py"), "--url",
             f"http://127.0.0.1:{silent.getsockname()[1]}", "--run-dir", str(tmp_path)],
            capture_output=True, text=True, timeout=said + 30)
        took = time.monotonic() - started
    finally:
        silent.close()
    assert done.returncode == 1, done.stdout + done.stderr
    assert said - 0.5 <= took <= said + 10, (said, took, done.stdout)

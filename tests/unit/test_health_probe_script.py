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

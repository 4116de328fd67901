"""The circuit breaker through a real TorchServe: the engine broken by fault injection (a file
that makes every pipeline call fail, warm-up included), 503 with Retry-After and a JSON body,
the readiness probe failing, the metrics, and recovery once the fault is gone."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from conftest import start_server
from sdxl_serve.management import http
from sdxl_serve.pod import PodServer, drain

pytestmark = pytest.mark.e2e
COOLDOWN_S = 3


@pytest.fixture(scope="module")
def breakable(tmp_path_factory, model_store):
    fault = tmp_path_factory.mktemp("fault") / "engine-broken"
    running = start_server(tmp_path_factory.mktemp("circuit_run"), model_store,
                           {"sdxl": "sdxl-1.0.mar"},
                           env={"SDXL_FAULT_ENGINE_BROKEN_FILE": str(fault),
                                "SDXL_CIRCUIT_FAILURE_THRESHOLD": "2",
                                "SDXL_CIRCUIT_COOLDOWN_S": str(COOLDOWN_S),
                                "SDXL_METRICS_INTERVAL_S": "0.5",
                                "SDXL_WARMUP_SIZES": "32x32", "SDXL_WARMUP_STEPS": "1"})
    yield running, fault
    running.stop()
    fault.unlink(missing_ok=True)


def predict(server, seed=0):
    body = {"prompt": "a lighthouse", "seed": seed, "width": 32, "height": 32,
            "num_inference_steps": 1}
    return http("POST", f"{server.addresses.inference}/predictions/sdxl",
                server.keys()["inference"], json.dumps(body).encode(), timeout=240)


def ready(server) -> subprocess.CompletedProcess:
    """The pod's readiness probe, as the kubelet runs it."""
    return subprocess.run(
        [sys.executable, "-m", "sdxl_serve.pod", "ready", "--url", server.addresses.inference,
         "--management", server.addresses.management, "--run-dir", str(server.run_dir),
         "--timeout", "120"], capture_output=True, text=True, timeout=180)


def circuit_metrics(server) -> dict[str, float]:
    """sdxl_circuit_state and the transitions by state, from /metrics."""
    _, _, body = http("GET", server.addresses.metrics + "/metrics")
    found = {}
    for line in body.decode().splitlines():
        if line.startswith("sdxl_circuit_state{"):
            found["state"] = float(line.rsplit(" ", 1)[1])
        elif line.startswith("sdxl_circuit_transitions_total{"):
            state = line.split('state="', 1)[1].split('"', 1)[0]
            found[state] = found.get(state, 0) + float(line.rsplit(" ", 1)[1])
    return found


def metrics_until(server, predicate, timeout=30.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        found = circuit_metrics(server)
        if predicate(found) or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def test_the_circuit_opens_refuses_fails_readiness_and_recovers(breakable):
    server, fault = breakable
    assert predict(server)[0] == 200
    assert ready(server).returncode == 0
    assert metrics_until(server, lambda m: m.get("state") == 0).get("state") == 0
    # 1. Broken: two failures in a row, each confirmed by a deep check, open the circuit.
    fault.touch()
    statuses = [predict(server, seed)[0] for seed in (1, 2)]
    assert statuses == [500, 500]
    # 2. Open: 503 at once, with Retry-After and a JSON body saying so.
    started = time.monotonic()
    status, headers, body = predict(server, 3)
    elapsed = time.monotonic() - started
    assert status == 503, body
    assert elapsed < 2.0, elapsed  # no model load, no generation
    payload = json.loads(body)
    assert payload["type"] == "CircuitOpen" and payload["code"] == 503
    retry_after = {k.lower(): v for k, v in headers.items()}["retry-after"]
    assert 1 <= int(retry_after) <= COOLDOWN_S and payload["retry_after_s"] == int(retry_after)
    # TorchServe's own 503 (a full queue) has another type: this one is ours.
    assert "health check" in payload["message"]
    # Readiness fails, so Kubernetes stops routing to the pod.
    probe = ready(server)
    assert probe.returncode == 1, probe.stdout + probe.stderr
    assert json.loads(probe.stdout)["circuit"] in ("open", "half_open")
    found = metrics_until(server, lambda m: m.get("state") == 2 and m.get("open", 0) >= 1)
    assert found["state"] == 2 and found["open"] >= 1, found
    # A pod stopping now drains at once: the barrier's 503 is the circuit's, not a full
    # queue's (read as full, it waited out the whole drain timeout).
    pod = PodServer(server.addresses, server.run_dir)
    started = time.monotonic()
    assert drain(pod, settle_s=0, timeout_s=20, log=lambda line: None)
    assert time.monotonic() - started < 10
    # 3. Fixed: after the cool-down one deep check closes it, by a request, a probe, or
    # the worker's own upkeep, whichever comes first.
    fault.unlink()
    time.sleep(COOLDOWN_S + 0.5)
    status, _, body = predict(server, 4)
    assert status == 200, body
    probe = ready(server)
    assert probe.returncode == 0, probe.stdout + probe.stderr
    found = metrics_until(server, lambda m: m.get("state") == 0 and m.get("closed", 0) >= 1)
    assert found["state"] == 0 and found["closed"] >= 1 and found["half_open"] >= 1, found

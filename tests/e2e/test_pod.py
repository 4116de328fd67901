"""The pod entry point against real TorchServe: PID 1, probes, key renewal, drain, SIGTERM.

The server here is started exactly as the container starts it (``python -m sdxl_serve.pod
start``, which execs Java), on free loopback ports with its own run and temp directories.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from sdxl_serve.pod import PodServer, drain, is_alive, is_ready
from sdxl_serve.management import http
from sdxl_serve.server import METRICS_CONFIG, Addresses, free_port

pytestmark = pytest.mark.e2e


class Pod:
    def __init__(self, process: subprocess.Popen, server: PodServer, env: dict, log: Path):
        self.process, self.server, self.env, self.log = process, server, env, log

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-40:])


@pytest.fixture(scope="module")
def pod(tmp_path_factory, model_store):
    base = tmp_path_factory.mktemp("pod")
    run_dir, tmp_dir = base / "run", base / "tmp"
    addresses = Addresses.free()
    env = dict(os.environ,
               TS_INFERENCE_ADDRESS=addresses.inference.replace("127.0.0.1", "0.0.0.0"),
               TS_MANAGEMENT_ADDRESS=addresses.management,
               TS_METRICS_ADDRESS=addresses.metrics,
               TS_METRICS_CONFIG=str(METRICS_CONFIG),
               TS_GRPC_INFERENCE_PORT=str(free_port()), TS_GRPC_MANAGEMENT_PORT=str(free_port()),
               TEMP=str(tmp_dir), TMPDIR=str(tmp_dir),
               LOG_LOCATION=str(base / "logs"), METRICS_LOCATION=str(base / "logs"),
               SDXL_RUN_DIR=str(run_dir),
               PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"])
    log = base / "pod.out"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "sdxl_serve.pod", "start", "--model-store", str(model_store),
             "--models", "sdxl=sdxl-1.0.mar"],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    handle = Pod(process, PodServer(Addresses.from_env(env), run_dir), env, log)
    try:
        deadline = time.monotonic() + 240
        while not is_ready(handle.server):
            assert process.poll() is None, f"the pod's server exited:\n{handle.tail()}"
            assert time.monotonic() < deadline, f"not ready in 240 s:\n{handle.tail()}"
            time.sleep(0.25)
        yield handle
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


def predict(pod: Pod, body: dict) -> tuple[int, bytes]:
    status, _, reply = http("POST", f"{pod.server.inference}/predictions/sdxl",
                            pod.server.key("inference"), json.dumps(body).encode(),
                            timeout=240)
    return status, reply


def test_start_execs_java_in_its_own_process(pod):
    # The process we started *is* the frontend: as PID 1 in a container it gets SIGTERM.
    cmdline = Path(f"/proc/{pod.process.pid}/cmdline").read_bytes().split(b"\0")
    assert b"org.pytorch.serve.ModelServer" in cmdline
    assert Path(f"/proc/{pod.process.pid}/exe").resolve().name == "java"
    # Java's children are the model workers, and once a minute TorchServe's system-metrics
    # collector (a short-lived python process) beside them.
    children = [" ".join(c.cmdline()) for c in psutil.Process(pod.process.pid).children()]
    assert any("model_service_worker" in line for line in children), children
    assert all("model_service_worker" in line or "metric_collector" in line
               for line in children), children
    # The key file is where the probes look for it, and auth is on.
    assert pod.server.key("inference")
    assert http("GET", f"{pod.server.inference}/ping")[0] == 400


def test_probe_commands_pass_on_a_ready_server(pod):
    for command in ("live", "ready"):
        done = subprocess.run([sys.executable, "-m", "sdxl_serve.pod", command],
                              env=pod.env, capture_output=True, timeout=30)
        assert done.returncode == 0, (command, done.stdout, done.stderr)


def test_liveness_fails_when_nothing_answers(tmp_path):
    nobody = Addresses.free()
    assert not is_alive(PodServer(nobody, tmp_path), timeout=2)
    assert not is_ready(PodServer(nobody, tmp_path), timeout=2)


def test_a_refused_key_is_renewed_with_the_api_key(pod):
    server = pod.server
    old = server.key("inference")
    assert server.keys.renew("inference")
    new = server.key("inference")
    assert new != old
    assert http("GET", f"{server.inference}/ping", old)[0] == 400
    assert http("GET", f"{server.inference}/ping", new)[0] == 200
    # A key file holding a dead inference key (as after expiry): readiness renews it.
    key_file = server.run_dir / "key_file.json"
    keys = json.loads(key_file.read_text())
    keys["inference"]["key"] = "expired"
    key_file.write_text(json.dumps(keys))
    # Each probe is a new process in a pod, so a new KeyFile: not held back by the renewal
    # above (KeyFile renews a kind at most every 10 s).
    assert is_ready(PodServer(Addresses(server.inference, server.management, server.metrics),
                              server.run_dir))
    assert server.key("inference") not in ("expired", new)


def test_drain_returns_only_after_running_and_queued_requests_are_answered(pod):
    answered: dict[str, tuple[int, float]] = {}

    def send(name: str, body: dict) -> None:
        status, _ = predict(pod, body)
        answered[name] = (status, time.monotonic())

    # A long generation, then one queued behind it while it runs.
    slow = {"prompt": "slow", "width": 64, "height": 64, "num_inference_steps": 30}
    first = threading.Thread(target=send, args=("running", slow))
    first.start()
    time.sleep(0.5)
    second = threading.Thread(target=send, args=("queued", {**slow, "seed": 1}))
    second.start()
    time.sleep(0.2)
    assert not answered, "the generation was too short to test a drain"
    started = time.monotonic()
    assert drain(pod.server, settle_s=0, timeout_s=240, log=lambda line: None)
    returned = time.monotonic()
    first.join(240)
    second.join(240)
    assert answered["running"][0] == 200 and answered["queued"][0] == 200
    # Both were answered before the drain said the pod was idle, and it really waited.
    assert answered["running"][1] <= returned and answered["queued"][1] <= returned
    assert answered["queued"][1] - started > 0.5


def test_sigterm_stops_torchserve_and_its_workers(pod):
    frontend = psutil.Process(pod.process.pid)
    workers = frontend.children(recursive=True)
    assert workers
    started = time.monotonic()
    os.kill(pod.process.pid, signal.SIGTERM)
    code = pod.process.wait(timeout=60)
    print(f"TorchServe stopped {time.monotonic() - started:.1f} s after SIGTERM, exit {code}")
    # The JVM ends through its shutdown hook: 143 is 128 + SIGTERM, not a crash.
    assert code in (0, 143), pod.tail()
    psutil.wait_procs(workers, timeout=30)
    assert not [w for w in workers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE]

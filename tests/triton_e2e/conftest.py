"""A real tritonserver on free loopback ports serving triton-models/ (model `sdxl`), one per test
module, always stopped; its stop must leave no process of its group (the server, the
python backend stub, the fork server and the engine processes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lifetimes import started_and_ready, wait_until
from sdxl_serve.cancellation import process_running
from sdxl_serve.management import http
from sdxl_serve.triton_server import TritonPorts, TritonServerProcess, command_line


def start_triton(run_dir: Path, model_dir: Path, models: list[str],
                 env: dict[str, str] | None = None) -> TritonServerProcess:
    server = started_and_ready(TritonServerProcess(run_dir, ports=TritonPorts.free(),
                                                   models=models,
                                                   env={"SDXL_MODEL_DIR": str(model_dir),
                                                        **(env or {})}),
                               models, 300)
    # Triton starts its metrics endpoint last, after it answers ready on HTTP: on 2 loaded
    # cores a module's first test that read /metrics at once was refused the connection.
    try:
        wait_until(lambda: metrics_answer(server), 30, "Triton's metrics endpoint to answer")
    except BaseException:
        server.stop()
        raise
    return server


def metrics_answer(server: TritonServerProcess) -> bool:
    try:
        return http("GET", server.ports.metrics_url, timeout=5)[0] == 200
    except OSError:
        return False


def stop_and_check(server: TritonServerProcess) -> None:
    """Stop the server; fail if any process it started outlives it."""
    started = server.group_pids()
    lines = {pid: command_line(pid) for pid in started}
    # The check would prove nothing without the stub and an engine process to look for.
    assert any("triton_python_backend_stub" in line for line in lines.values()), lines
    assert any("multiprocessing.forkserver" in line for line in lines.values()), lines
    server.stop()

    def left() -> list[int]:
        return [pid for pid in started if process_running(pid)]

    wait_until(lambda: not left(), 10, "every process of the server's group to end",
               detail=lambda: {pid: lines[pid] for pid in left()})
    assert not server.group_pids()


@pytest.fixture(scope="module")
def triton(tmp_path_factory, tiny_model_dir):
    """Triton serving the session's tiny model (the one the test archive packs, so both
    servers generate from the same weights)."""
    server = start_triton(tmp_path_factory.mktemp("triton"), tiny_model_dir, ["sdxl"])
    yield server
    stop_and_check(server)


@pytest.fixture(scope="module")
def triton_stream(tmp_path_factory, tiny_model_dir):
    """Triton serving only the streaming model, `sdxl_stream`."""
    server = start_triton(tmp_path_factory.mktemp("triton-stream"), tiny_model_dir,
                          ["sdxl_stream"])
    yield server
    stop_and_check(server)


@pytest.fixture(scope="module")
def triton_faulty(tmp_path_factory, tiny_model_dir):
    """Triton serving `sdxl` and `sdxl_stream` with faults injected: an image over 64x64
    runs out of GPU memory, and while the yielded file exists every pipeline call fails
    (one failure opens a model's circuit, for 600 s; each model has its own)."""
    fault = tmp_path_factory.mktemp("fault") / "engine-broken"
    server = start_triton(tmp_path_factory.mktemp("triton-faults"), tiny_model_dir,
                          ["sdxl", "sdxl_stream"],
                          {"SDXL_FAULT_OOM_MAX_PIXELS": str(64 * 64),
                           "SDXL_FAULT_ENGINE_BROKEN_FILE": str(fault),
                           "SDXL_CIRCUIT_FAILURE_THRESHOLD": "1",
                           "SDXL_CIRCUIT_COOLDOWN_S": "600"})
    yield server, fault
    stop_and_check(server)
    fault.unlink(missing_ok=True)

"""What a client gets through Triton for our statuses that Triton's error codes cannot all
carry: 507 (out of GPU memory) and 503 (circuit open, with when to retry), over HTTP and
over gRPC (`sdxl`'s infer, `sdxl_stream`'s stream). A real tritonserver serving both models
with faults injected: an image over 64x64 runs out of memory, and a file that, while it
exists, makes every pipeline call fail."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from tritonclient.utils import InferenceServerException

from sdxl_serve.triton_client import error_of
from test_triton_grpc import OUTPUTS, client, inputs, opened_stream, until_last
from test_triton_serving import infer, metrics, series

pytestmark = pytest.mark.triton
REPO = Path(__file__).resolve().parents[2]
TOO_LARGE = {"prompt": "x", "width": 128, "height": 128, "num_inference_steps": 1}
RETRY = "requests are refused until a health check passes: retry in"
# What a client reads for TOO_LARGE, over either protocol: our status, then what to lower.
OUT_OF_MEMORY = ("507 OutOfMemory: one 128x128 image does not fit in GPU memory, even alone: "
                 "lower `width` and `height`, e.g. to 96x96")


def test_out_of_gpu_memory_is_a_500_whose_message_starts_with_507(triton_faulty):
    # No Triton error code gives 507: INTERNAL (500), the message naming our status first.
    server, _ = triton_faulty
    status, _, body = infer(server, TOO_LARGE)
    assert status == 500, (status, body[:300])
    assert error_of(body).startswith(OUT_OF_MEMORY), body[:300]


def test_out_of_gpu_memory_over_grpc_is_internal_with_the_same_advice(triton_faulty):
    server, _ = triton_faulty
    _, _, body = infer(server, TOO_LARGE)
    with client(server) as grpc, pytest.raises(InferenceServerException) as failed:
        grpc.infer("sdxl", inputs(TOO_LARGE), outputs=OUTPUTS)
    # INTERNAL, as HTTP's 500: the same words, our 507 first, what to lower and to what.
    assert failed.value.status() == "StatusCode.INTERNAL", failed.value
    assert failed.value.message().startswith(OUT_OF_MEMORY), failed.value.message()
    assert failed.value.message() == error_of(body), (failed.value.message(), body[:300])


def test_out_of_gpu_memory_on_a_grpc_stream_is_an_error_response_with_the_advice(
        triton_faulty):
    server, _ = triton_faulty
    _, _, body = infer(server, TOO_LARGE)
    with opened_stream(server) as (grpc, arrived):
        grpc.async_stream_infer("sdxl_stream", inputs(TOO_LARGE))
        result, error = arrived.get(timeout=60)
        # A stream's error carries its message alone (no status code: Triton's protocol).
        assert result is None and error.status() is None, (result, error)
        assert error.message().startswith(OUT_OF_MEMORY), error.message()
        assert error.message() == error_of(body), error.message()
        # The stream serves on: the size that fits gets its image.
        grpc.async_stream_infer("sdxl_stream", inputs({**TOO_LARGE, "width": 64,
                                                       "height": 64}))
        last, error = until_last(arrived)[-1]
    assert error is None and last.as_numpy("image_base64") is not None


def readiness_probe(server, model: str) -> subprocess.CompletedProcess:
    """health_probe.py --triton, on the server's ports as serve_triton.py's variables."""
    env = {**os.environ, "SDXL_TRITON_HTTP_PORT": str(server.ports.http),
           "SDXL_TRITON_GRPC_PORT": str(server.ports.grpc),
           "SDXL_TRITON_METRICS_PORT": str(server.ports.metrics)}
    return subprocess.run([sys.executable, str(REPO / "scripts" / "health_probe.py"),
                           "--triton", "--model", model], env=env, capture_output=True,
                          text=True, timeout=60)


def test_an_open_circuit_is_a_503_whose_message_says_when_to_retry(triton_faulty):
    # Triton sends no Retry-After header: the message carries the seconds.
    server, fault = triton_faulty
    probe = readiness_probe(server, "sdxl")
    assert probe.returncode == 0 and "ready: model sdxl" in probe.stdout, probe
    fault.touch()
    # The first call fails and opens the circuit, unless the model's upkeep, whose health
    # check fails too, opened it first (refused_once_open below).
    status, headers, body = infer(server, {"prompt": "x", "num_inference_steps": 1})
    if RETRY not in error_of(body):
        assert status == 500 and "generation failed" in error_of(body), (status, body[:300])
        status, headers, body = infer(server, {"prompt": "x", "num_inference_steps": 1})
    assert status == 503, (status, body[:300])
    assert "Retry-After" not in headers
    assert RETRY in error_of(body), body[:300]
    # Triton's readiness knows nothing of it (docs/triton.md says so): our gauge does, and
    # the readiness probe the docs give Triton's users reads it.
    assert server.ready("sdxl") and server.ready()
    values = metrics(server)
    assert series(values, "sdxl_circuit_state", model_name="sdxl") == 2, values
    probe = readiness_probe(server, "sdxl")
    assert probe.returncode == 1, probe
    assert probe.stdout == ("not ready: model sdxl's circuit breaker is open: its requests "
                            "are refused with 503 until a health check passes\n"), probe


def refused_once_open(send) -> InferenceServerException:
    """The error ``send`` gets once the circuit is open: the fault makes the first call
    fail (which opens it) unless the model's upkeep, whose health check fails too, or a
    test before opened it already."""
    error = send()
    if RETRY not in error.message():
        assert "generation failed" in error.message(), error.message()
        error = send()
    return error


def test_an_open_circuit_over_grpc_is_unavailable_saying_when_to_retry(triton_faulty):
    server, fault = triton_faulty
    fault.touch()

    def send() -> InferenceServerException:
        with client(server) as grpc, pytest.raises(InferenceServerException) as failed:
            grpc.infer("sdxl", inputs({"prompt": "x", "num_inference_steps": 1}),
                       outputs=OUTPUTS)
        return failed.value

    refused = refused_once_open(send)
    # UNAVAILABLE, as HTTP's 503; gRPC has no Retry-After either: the message says when.
    assert refused.status() == "StatusCode.UNAVAILABLE", refused
    assert RETRY in refused.message(), refused.message()


def test_an_open_circuit_on_a_grpc_stream_is_an_error_response_saying_when_to_retry(
        triton_faulty):
    server, fault = triton_faulty
    fault.touch()
    with opened_stream(server) as (grpc, arrived):
        def send() -> InferenceServerException:
            grpc.async_stream_infer("sdxl_stream",
                                    inputs({"prompt": "x", "num_inference_steps": 1}))
            result, error = arrived.get(timeout=60)
            assert result is None, result
            return error

        refused = refused_once_open(send)
    assert refused.status() is None and RETRY in refused.message(), refused.message()

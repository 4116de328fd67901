"""What a client gets through Triton for our statuses that Triton's error codes cannot all
carry: 507 (out of GPU memory) and 503 (circuit open, with when to retry). A real
tritonserver serving `sdxl` with faults injected: an image over 64x64 runs out of memory,
and a file that, while it exists, makes every pipeline call fail."""

from __future__ import annotations

import pytest

from sdxl_serve.triton_client import error_of
from test_triton_serving import infer

pytestmark = pytest.mark.triton


def test_out_of_gpu_memory_is_a_500_whose_message_starts_with_507(triton_faulty):
    # No Triton error code gives 507: INTERNAL (500), the message naming our status first.
    server, _ = triton_faulty
    status, _, body = infer(server, {"prompt": "x", "width": 128, "height": 128,
                                     "num_inference_steps": 1})
    assert status == 500, (status, body[:300])
    assert error_of(body).startswith(
        "507 OutOfMemory: one 128x128 image does not fit in GPU memory, even alone: lower "
        "`width` and `height`, e.g. to 96x96"), body[:300]


def test_an_open_circuit_is_a_503_whose_message_says_when_to_retry(triton_faulty):
    # Triton sends no Retry-After header: the message carries the seconds.
    server, fault = triton_faulty
    fault.touch()
    status, _, body = infer(server, {"prompt": "x", "num_inference_steps": 1})
    assert status == 500 and "generation failed" in error_of(body), (status, body[:300])
    status, headers, body = infer(server, {"prompt": "x", "num_inference_steps": 1})
    assert status == 503, (status, body[:300])
    assert "Retry-After" not in headers
    assert "requests are refused until a health check passes: retry in" in error_of(body), \
        body[:300]

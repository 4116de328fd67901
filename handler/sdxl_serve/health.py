"""Deep health: proof that the pipeline can still generate an image, not just that a
process answers.

``check_pipeline`` runs one cheap real generation (the model's smallest size, one step, no
classifier-free guidance), decodes it and encodes it as PNG. The image must not be flat: a
pipeline whose weights or GPU state went bad produces NaN, which the engine refuses to
decode (``NonFiniteImage``), or raises. TorchServe's ``/ping`` only says that the frontend runs and workers exist; this
is what a readiness probe should ask (docs/operations.md, "Health and readiness").

Example:
    result = check_pipeline(engine)
    result.healthy, result.detail
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import numpy as np

from sdxl_serve.contract import parse_request
from sdxl_serve.encoding import encode_image

# A decoded image whose pixel values spread less than this (0-255 scale) is flat.
MIN_PIXEL_SPREAD = 1.0


@dataclass(frozen=True)
class HealthResult:
    """The outcome of one deep check."""

    healthy: bool
    detail: str
    checked_at: float  # time.time() of the check
    seconds: float  # how long the check's generation took
    pid: int = 0  # the engine process that ran it


def check_pipeline(engine) -> HealthResult:
    """Generate one small image and check that it is a real image."""
    started = time.perf_counter()
    checked_at = time.time()
    size = engine.limits.min_size
    try:
        request = parse_request({"prompt": "health check", "width": size, "height": size,
                                 "num_inference_steps": 1, "guidance_scale": 0.0,
                                 "seed": 0}, engine.limits)
        [generated] = engine.generate([request])
        image = generated.images[0]
        spread = float(np.asarray(image, dtype=np.float32).std())
        if not spread >= MIN_PIXEL_SPREAD:
            detail = (f"the pipeline produced a flat {size}x{size} image (pixel spread "
                      f"{spread:.2f}): NaN or broken weights")
            return HealthResult(False, detail, checked_at, time.perf_counter() - started,
                                os.getpid())
        encode_image(image, "png", engine.settings)
    except Exception as exc:  # noqa: BLE001 - any failure is the answer to the check
        return HealthResult(False, f"generation failed: {type(exc).__name__}: {exc}",
                            checked_at, time.perf_counter() - started, os.getpid())
    return HealthResult(True, f"generated a {size}x{size} image", checked_at,
                        time.perf_counter() - started, os.getpid())


def health_reply_body(result: HealthResult | None, now: float) -> tuple[int, bytes]:
    """Status and JSON body for a deep health request: 200 healthy, 503 otherwise."""
    if result is None:
        payload = {"status": "unhealthy", "detail": "no engine process is running"}
        return 503, json.dumps(payload).encode()
    payload = {"status": "healthy" if result.healthy else "unhealthy",
               "detail": result.detail,
               "checked_s_ago": round(max(0.0, now - result.checked_at), 3),
               "check_seconds": round(result.seconds, 4),
               "worker_pid": result.pid}
    return (200 if result.healthy else 503), json.dumps(payload).encode()

"""Compile on through a real TorchServe (docs/speed.md): SDXL_* variables reach the worker,
warm-up compiles the shape bucket before the model is READY, requests in the bucket and
outside it are served, the image is the eager one within the quality bound, and the
compile gauges are on /metrics with 0 recompilations."""

from __future__ import annotations

import base64
import io
import json
import time

import numpy as np
import pytest
from PIL import Image

from lifetimes import wait_until
from sdxl_serve.contract import parse_request
from sdxl_serve.management import http
from sdxl_serve.server import Addresses, TorchServeProcess

pytestmark = pytest.mark.e2e
STEPS = 2


@pytest.fixture(scope="module")
def compiled_server(tmp_path_factory, model_store, compile_cache_dir):
    env = {"SDXL_COMPILE": "default", "SDXL_COMPILE_BATCH_SIZES": "1",
           "SDXL_COMPILE_CACHE_DIR": str(compile_cache_dir), "SDXL_WARMUP_SIZES": "32x32",
           "SDXL_WARMUP_STEPS": "1", "SDXL_METRICS_INTERVAL_S": "1",
           # One deep health check (an eager call: the smallest size, no guidance) at most.
           "SDXL_HEALTH_INTERVAL_S": "3600"}
    server = TorchServeProcess(tmp_path_factory.mktemp("compile_run"), model_store,
                               {"sdxl": "sdxl-1.0.mar"}, Addresses.free(), env=env)
    server.start()
    try:
        # conftest's start_server waits 240 s; a cold compile on two busy cores takes
        # longer (TorchServe's startupTimeout in model-config.yaml is 600 s).
        server.wait_ready("sdxl", timeout=600)
    except BaseException:
        server.stop()
        raise
    yield server
    server.stop()


def predict(server, seed: int, size: int) -> np.ndarray:
    body = {"prompt": "a lighthouse", "seed": seed, "width": size, "height": size,
            "num_inference_steps": STEPS}
    status, _, reply = http("POST", f"{server.addresses.inference}/predictions/sdxl",
                            server.keys()["inference"], json.dumps(body).encode(), timeout=300)
    assert status == 200, reply
    image = Image.open(io.BytesIO(base64.b64decode(json.loads(reply)["image"])))
    return np.asarray(image, np.int16)


def gauge(server, name: str) -> list[float]:
    status, _, body = http("GET", server.addresses.metrics + "/metrics")
    assert status == 200
    return [float(line.rsplit(" ", 1)[1]) for line in body.decode().splitlines()
            if line.startswith(name + "{")]


@pytest.mark.timeout(1500)  # a cold compile in the worker: up to startupTimeout (600 s)
def test_compiled_bucket_served_through_torchserve(compiled_server, engine):
    server = compiled_server
    # Logged by the engine process before the model is READY, but TorchServe copies the
    # worker's output into model_log.log from a thread of its own: it may trail READY.
    model_log = server.run_dir / "logs" / "model_log.log"
    wait_until(lambda: "compiled the UNet (default) for 1 shape bucket(s)"
               in model_log.read_text(errors="replace"), 10, "the compile in model_log.log")
    for seed in (1, 2):
        served = predict(server, seed, 32)
        [eager] = engine.generate([parse_request(
            {"prompt": "a lighthouse", "seed": seed, "width": 32, "height": 32,
             "num_inference_steps": STEPS}, engine.limits)])
        difference = np.abs(served - np.asarray(eager.images[0], np.int16))
        assert difference.max() <= 2 and difference.mean() <= 0.1  # test_speed.py's bound
    predict(server, 3, 64)  # outside the bucket: eager
    deadline = time.monotonic() + 60
    while not gauge(server, "sdxl_compile_eager_calls") or \
            max(gauge(server, "sdxl_compile_eager_calls")) < STEPS:
        assert time.monotonic() < deadline, "the compile gauges never reached /metrics"
        time.sleep(0.5)
    assert gauge(server, "sdxl_compile_recompilations") == [0.0]
    # The 64x64 request's steps, and the one deep health check if it has run: the four
    # 32x32 UNet calls ran compiled.
    assert STEPS <= max(gauge(server, "sdxl_compile_eager_calls")) <= STEPS + 1

"""Compile on through recycling (docs/speed.md): engine processes replaced every 5 requests
serve 30 requests without a failure, each replacement is READY sooner from the compile
cache than the first engine process was with a cold one, and nothing recompiles after
warm-up (the exported gauge stays 0).

One compiled shape bucket at the tiny model's smallest size keeps this to minutes: the cold
compile of the tiny UNet takes about 5 minutes on two busy CPU cores, a start from the cache
under a minute.
"""

from __future__ import annotations

import json
import logging

import pytest

from sdxl_serve.engine_process import EngineSpec
from sdxl_serve.metrics import MetricsRecorder
from sdxl_serve.recycling import RecyclingService
from sdxl_serve.service import Incoming
from sdxl_serve.settings import Settings

pytestmark = pytest.mark.handler
log = logging.getLogger(__name__)

REQUESTS = 30
PER_ENGINE = 5
# Every sixth request is at the model's native size: outside the one bucket, it runs eager.
OUTSIDE_EVERY = 6


def body(seed: int, size: int = 32) -> bytes:
    return json.dumps({"prompt": "a lighthouse", "num_inference_steps": 2, "seed": seed,
                       "width": size, "height": size}).encode()


class GaugeSink:
    """Keeps every gauge value the service records, in order."""

    def __init__(self):
        self.gauges: list[tuple[str, float]] = []

    def __call__(self, name, kind, value, labels):
        if kind == "gauge":
            self.gauges.append((name, value))

    def values(self, name: str) -> list[float]:
        return [value for seen, value in self.gauges if seen == name]


@pytest.fixture(scope="module")
def compiled_recycling(tiny_model_dir, compile_cache_dir, tmp_path_factory):
    # The first engine process must start cold: a fresh cache if another test filled it.
    cache = compile_cache_dir if not any(compile_cache_dir.iterdir()) else \
        tmp_path_factory.mktemp("compile-cache-cold")
    config = {"device": "cpu", "compile": "default", "compile_batch_sizes": "1",
              "compile_cache_dir": str(cache), "warmup_sizes": "32x32", "warmup_steps": 1,
              "max_requests_per_worker": PER_ENGINE, "recycle_jitter": 0,
              "health_interval_s": 3600}
    sink = GaugeSink()
    service = RecyclingService(EngineSpec(str(tiny_model_dir), config, None, "1.0"),
                               Settings.from_mapping(config, env={}),
                               MetricsRecorder(sink, "sdxl", "1.0", "test"))
    service.sink = sink
    service.first = service.start()
    yield service
    service.close()


# The cold compile alone took 7 minutes on two busy cores (the default limit is 10).
@pytest.mark.timeout(1800)
def test_thirty_requests_through_recycled_compiled_engines(compiled_recycling):
    service = compiled_recycling
    cold = service.first
    assert cold["compile"] == "default" and cold["compiled_buckets"] == 1
    ready = {cold["pid"]: cold["ready_s"]}
    statuses, outside = [], 0
    for n in range(REQUESTS):
        size = 64 if n % OUTSIDE_EVERY == OUTSIDE_EVERY - 1 else 32
        outside += size == 64
        [reply] = service.handle([Incoming(body(seed=n, size=size), f"r{n}")])
        statuses.append(reply.status)
        ready.setdefault(service.engine.pid, service.engine.info["ready_s"])
    assert statuses == [200] * REQUESTS, statuses
    # 30 requests at 5 per engine process: the first and at least 5 replacements.
    assert service.engines_started >= REQUESTS // PER_ENGINE
    warm = [seconds for pid, seconds in ready.items() if pid != cold["pid"]]
    log.warning("time to READY: cold cache %.1f s; from the cache %s s", cold["ready_s"],
                ", ".join(f"{s:.1f}" for s in warm))
    print(f"time to READY: cold cache {cold['ready_s']:.1f} s; from the cache "
          f"{', '.join(f'{s:.1f}' for s in warm)} s")
    assert len(warm) >= REQUESTS // PER_ENGINE - 1
    assert max(warm) < cold["ready_s"], (cold["ready_s"], warm)
    # The gauges of every engine process: no recompilation after warm-up, ever; the calls
    # outside the bucket ran eager (and only those: the bucket's ran compiled).
    recompilations = service.sink.values("sdxl_compile_recompilations")
    assert recompilations and set(recompilations) == {0}
    # Each engine process after the first served one 64x64 request: its 2 steps are 2
    # eager UNet calls, and no 32x32 call ever ran eager.
    assert max(service.sink.values("sdxl_compile_eager_calls")) == 2

"""The job API's cost over `/predictions`, measured by `make bench` in the same run.

Against the benchmark's own TorchServe: a private Redis, one dispatcher and the API are
started; then, on the same model and the same bodies,
- one client, request by request interleaved (the order alternating): a job (submit with
  `Prefer: wait`, then the image) against a direct `/predictions` call; the added latency is
  the median of the per-request differences, so machine drift cancels;
- several clients: jobs per second against `/predictions` images per second.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
# This checkout's code first, not the checkout a shared venv's editable install names.
sys.path[:0] = [str(REPO / "handler"), str(REPO / "jobs"), str(REPO / "scripts")]
from sdxl_jobs.keys import ensure_key  # noqa: E402
from sdxl_jobs.processes import (  # noqa: E402
    RedisServer, api_process, dispatcher_process, free_port, wait_http)
from sdxl_jobs.store import JobStore  # noqa: E402
from sdxl_serve.management import http  # noqa: E402


class JobClient:
    """Submit-and-wait through the job API; every answer checked."""

    def __init__(self, address: str, key: str):
        self.address, self.key = address, key

    def call(self, method: str, path: str, body: bytes | None = None,
             headers: dict | None = None) -> tuple[int, bytes]:
        status, _, answer = http(method, self.address + path, self.key, body, headers,
                                 timeout=300)
        return status, answer

    def generate(self, body: dict) -> float:
        """Seconds from submit to the first image's bytes in hand."""
        started = time.perf_counter()
        status, raw = self.call("POST", "/v1/jobs", json.dumps(body).encode(),
                                {"Prefer": "wait=60"})
        job = json.loads(raw)
        while job.get("status") in ("queued", "running"):  # longer than Prefer: wait
            time.sleep(0.05)
            status, raw = self.call("GET", f"/v1/jobs/{job['id']}")
            job = json.loads(raw)
        if job.get("status") != "succeeded":
            raise RuntimeError(f"job answered {status}: {raw[:300]!r}")
        status, image = self.call("GET", job["images"][0])
        if status != 200 or not image:
            raise RuntimeError(f"image answered {status}")
        return time.perf_counter() - started


def measure_jobs(server, model: str, bodies: list[dict], direct: Callable[[dict], float],
                 clients: int, work_dir: Path, log: Callable[[str], None]) -> dict:
    """The job path against ``direct`` (one /predictions call, seconds) on ``bodies``."""
    redis = RedisServer(work_dir / "jobs-redis")
    address = f"http://127.0.0.1:{free_port()}"
    processes = []
    try:
        redis.start()

        async def make_key() -> str:
            store = JobStore.from_url(redis.url)
            try:
                return await ensure_key(store, "bench", None)
            finally:
                await store.close()
        key = asyncio.run(make_key())
        env = {"SDXL_JOBS_RATE_PER_MINUTE": "100000", "SDXL_JOBS_MAX_ACTIVE_PER_KEY": "1000"}
        processes = [
            dispatcher_process(redis.url, server.addresses.inference,
                               server.addresses.management, server.run_dir / "key_file.json",
                               work_dir / "dispatcher.log", model=model, env=env),
            api_process(redis.url, address, work_dir / "api.log", env)]
        for process in processes:
            process.start()
        wait_http(f"{address}/v1/health", 120, processes[1])
        client = JobClient(address, key)
        client.generate(bodies[0])  # first-call costs are not measured
        direct(bodies[0])
        # 1. One client, interleaved request by request.
        job_s, direct_s = [], []
        for index, body in enumerate(bodies):
            order = ((job_s, client.generate), (direct_s, direct))
            for times, call in (order if index % 2 == 0 else order[::-1]):
                times.append(call(body))
        added_ms = statistics.median((j - d) * 1e3 for j, d in zip(job_s, direct_s))
        log(f"job API, 1 client: {statistics.median(job_s) * 1e3:.0f} ms a job, "
            f"{statistics.median(direct_s) * 1e3:.0f} ms direct; +{added_ms:.1f} ms")
        # 2. Several clients: throughput of each path on the same bodies.
        throughput = {}
        for name, call in (("jobs", client.generate), ("predictions", direct)):
            shares = [bodies[k::clients] for k in range(clients)]
            errors: list[str] = []

            def run(share: list[dict]) -> None:
                try:
                    for body in share:
                        call(body)
                except Exception as exc:  # noqa: BLE001 - fails the benchmark below
                    errors.append(f"{type(exc).__name__}: {exc}")
            threads = [threading.Thread(target=run, args=(s,)) for s in shares]
            started = time.perf_counter()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            if errors:
                raise RuntimeError(f"{name}: {errors[:3]}")
            throughput[name] = len(bodies) / (time.perf_counter() - started)
        log(f"job API, {clients} clients: {throughput['jobs']:.2f} jobs/s, "
            f"{throughput['predictions']:.2f} requests/s direct")
        return {"requests": len(bodies), "clients": clients,
                "one_client_job_ms": statistics.median(job_s) * 1e3,
                "one_client_direct_ms": statistics.median(direct_s) * 1e3,
                "added_ms_per_job": added_ms,
                "jobs_per_s": throughput["jobs"],
                "predictions_per_s": throughput["predictions"],
                "throughput_ratio": throughput["jobs"] / throughput["predictions"]}
    finally:
        for process in processes:
            process.stop()
        redis.stop()


if __name__ == "__main__":
    import sys

    from bench_report import not_a_command
    sys.exit(not_a_command(__doc__, sys.argv[1:]))

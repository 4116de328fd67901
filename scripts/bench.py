#!/usr/bin/env python3
"""Benchmark the serving stack on this machine: overhead, batching, cold start, encoding.

Every number is measured in this run, with the embedded tiny SDXL (random weights, real
diffusers classes) on the CPU: the same requests go through the pipeline in this process
and through a real TorchServe on loopback ports, in interleaved runs, and the report gives
the median of the runs with their range. The last line printed is one JSON object.

What it measures:
- serving overhead: seconds per image through TorchServe end to end (HTTP, queueing, IPC to
  the worker, our validation, encoding, base64 and JSON) divided by seconds per image of the
  pipeline called in process (``Engine.generate``: text in, PIL images out), same requests,
  same batch size. Reported for a compute-bound workload (as SDXL is on a GPU) and for a
  light one where the overhead shows, with a per-request breakdown of where it goes.
- batching: images/s and p50/p95 latency for TorchServe ``batchSize`` 1, 2, 4, 8 under 8
  concurrent clients; the gain of 8 over 1; a plot of both against batch size.
- cold start: TorchServe start, model load, warm-up and first image, over several starts.
- encoding: ms per format for a 1024x1024 image, and a batch encoded one by one vs in
  parallel, with the configured settings.

Usage:
    python scripts/bench.py [--threads N] [--runs N]   # make bench (7 to 27 min on 2 cores)
    python scripts/bench.py --quick                     # a few requests, one run (the test)
    python scripts/bench.py --check bench/baseline.json # make bench-check: run, compare p95
    python scripts/bench.py --write-baseline bench/baseline.json   # make bench-baseline
    python scripts/bench.py --compare RESULT.json --baseline bench/baseline.json
    python scripts/bench.py --gpu [...]                 # the GPU half: scripts/bench_gpu.py
"""

from __future__ import annotations

import argparse
import http.client
import importlib.metadata
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parents[1]
# This checkout's code first, not the checkout a shared venv's editable install names.
sys.path[:0] = [str(REPO / "handler"), str(REPO / "jobs"), str(REPO / "scripts")]
DEFAULT_OUT = REPO / "build" / "bench"
MODEL_CONFIG = REPO / "config" / "model-config.yaml"
PROMPT = "a lighthouse on a cliff at dawn, oil painting"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class BenchError(RuntimeError):
    """Something could not be measured; the benchmark stops rather than report a guess."""


@dataclass(frozen=True)
class Workload:
    """What every request of a scenario asks for (all requests share one compat_key)."""

    name: str
    width: int
    height: int
    steps: int
    guidance_scale: float = 5.0
    output_format: str = "png"

    def body(self, index: int) -> dict:
        """Request ``index``: the same prompt and settings, its own seed."""
        return {"prompt": PROMPT, "width": self.width, "height": self.height,
                "num_inference_steps": self.steps, "guidance_scale": self.guidance_scale,
                "output_format": self.output_format, "seed": 1000 + index}

    def describe(self) -> dict:
        return {"width": self.width, "height": self.height, "steps": self.steps,
                "guidance_scale": self.guidance_scale, "output_format": self.output_format}


# The request TorchServe's round trip is timed with: refused by our validation, so it
# crosses HTTP, the queue, the socket to the worker and back without generating.
REFUSED_BODY = json.dumps({"prompt": PROMPT, "num_inference_steps": 0}).encode()


@dataclass(frozen=True)
class Scenario:
    """``clients`` concurrent clients each send ``requests_per_client`` requests in turn to a
    model with TorchServe ``batchSize`` = ``batch_size``; the in-process paths run the same
    requests in groups of ``batch_size``."""

    name: str
    workload: Workload
    batch_size: int
    clients: int
    requests_per_client: int
    paths: tuple[str, ...] = ("pipeline", "torchserve")

    @property
    def requests(self) -> int:
        return self.clients * self.requests_per_client

    @property
    def interleaved(self) -> bool:
        """One client at batch size 1: its paths run request by request, in turn."""
        return self.clients == 1 and self.batch_size == 1

    def bodies(self) -> list[dict]:
        return [self.workload.body(index) for index in range(self.requests)]


@dataclass(frozen=True)
class Plan:
    """How much to measure. ``FULL`` is ``make bench``; ``QUICK`` only checks the harness."""

    mode: str
    runs: int
    cold_starts: int
    encode_repeats: int
    encode_batch: int
    light: Workload
    compute: Workload
    sweep: tuple[int, ...]
    sweep_clients: int
    sweep_requests_per_client: int
    sequential_requests: int
    compute_requests: int
    round_trips: int
    job_requests: int = 24
    """Requests of the job API's comparison with /predictions (one client, then 8)."""
    peer_lone_requests: int = 120
    """Lone light requests per stack in the comparison with LitServe (blocks of 6): the
    machine's speed moves by a third within seconds, so fewer let one block decide, and
    each pair of blocks is one vote of the sign test: at 10 pairs only 9 of 10 say
    "ahead", at 20 pairs 15 of 20 do."""
    peer_compute_requests: int = 24
    """Compute-bound requests per stack in that comparison (blocks of 2, 12 pairs)."""
    peer_throughput_runs: int = 8
    """8-client runs per stack in that comparison: each pair of runs is one vote of the sign
    test that says whether a stack is ahead (bench_peers.verdict needs 6 or more)."""
    peer_rounds: int = 4
    """Rounds of that comparison, each with fresh processes on both sides (our model's worker
    and engine process, LitServe's server), sharing the blocks and runs above: two identical
    processes differ by several percent for minutes, so one pair of processes must not
    decide every vote (bench_peers.measure_peers)."""

    def scenarios(self) -> list[Scenario]:
        light_one = Scenario("light-b1-c1", self.light, 1, 1, self.sequential_requests,
                             ("pipeline", "service", "torchserve", "torchserve_raw",
                              "torchserve_lone_in_batch"))
        sweep = [Scenario(f"light-b{size}-c{self.sweep_clients}", self.light, size,
                          self.sweep_clients, self.sweep_requests_per_client)
                 for size in self.sweep]
        compute = Scenario("compute-b1-c1", self.compute, 1, 1, self.compute_requests)
        return [light_one, *sweep, compute]

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        return tuple(sorted({1, *self.sweep}))


# The light workload is the tiny model's native size with few steps: a generation costs
# about as much as serving it, so TorchServe's share shows. The compute-bound one is the
# largest size the tiny model allows with more steps, so that compute dominates as it does
# for SDXL at 1024x1024 on a GPU (seconds per image against milliseconds of serving).
LIGHT = Workload("light", 64, 64, 4)
COMPUTE = Workload("compute_bound", 128, 128, 8)
FULL = Plan(mode="full", runs=3, cold_starts=3, encode_repeats=7, encode_batch=8,
            light=LIGHT, compute=COMPUTE, sweep=(1, 2, 4, 8), sweep_clients=8,
            sweep_requests_per_client=4, sequential_requests=12, compute_requests=8,
            round_trips=40)
QUICK = Plan(mode="quick", runs=1, cold_starts=1, encode_repeats=2, encode_batch=4,
             light=Workload("light", 64, 64, 2), compute=Workload("compute_bound", 64, 64, 4),
             sweep=(1, 8), sweep_clients=8, sweep_requests_per_client=1,
             sequential_requests=2, compute_requests=1, round_trips=3, job_requests=4,
             peer_lone_requests=12, peer_compute_requests=4, peer_throughput_runs=2,
             peer_rounds=2)


@dataclass
class Sample:
    """One timed pass of a scenario on one path."""

    wall_s: float
    images: int
    requests: int
    latencies_s: list[float] = field(default_factory=list)
    # Per JSON reply: the seconds of the pipeline call inside the worker (its timings_s).
    worker_pipeline_s: list[float] = field(default_factory=list)
    # TorchServe's own account of the pass (``frontend_times``): per-request means in ms.
    frontend: dict[str, float] = field(default_factory=dict)


# --- The machine. -----------------------------------------------------------------------------

def machine_info() -> dict:
    """What the numbers were measured on."""
    import torch

    cpu_model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count() or 1
    try:
        java = subprocess.run(["java", "-version"], capture_output=True, text=True,
                              timeout=30).stderr.splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        java = "not found"

    def version(package: str) -> str:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    return {
        "cpu_model": cpu_model,
        "logical_cores": os.cpu_count() or 1,
        "usable_cores": usable,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "diffusers": version("diffusers"),
        "torchserve": version("torchserve"),
        "java": java,
        "os": platform.platform(),
        "load_average_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


# --- Encoding. --------------------------------------------------------------------------------

ENCODE_IMAGE = ("synthetic 1024x1024 RGB: gradients, a Mandelbrot set and 15 % Gaussian noise, "
                "so it compresses like neither a flat image nor pure noise")


def synthetic_image(size: int = 1024, shift: int = 0):
    """A deterministic photo-like test image (see ``ENCODE_IMAGE``)."""
    from PIL import Image, ImageChops

    linear = Image.linear_gradient("L").resize((size, size))
    radial = Image.radial_gradient("L").resize((size, size))
    fractal = Image.effect_mandelbrot((size, size), (-2.0, -1.25, 0.5, 1.25), 60)
    base = Image.merge("RGB", (linear, radial, fractal))
    noise = Image.merge("RGB", [Image.effect_noise((size, size), 40)] * 3)
    image = Image.blend(base, noise, 0.15)
    return ImageChops.offset(image, shift * 37, shift * 11) if shift else image


def bench_encoding(plan: Plan, settings) -> dict:
    """ms per format with the configured settings; a batch one by one vs in parallel."""
    from bench_report import spread
    from sdxl_serve.encoding import ImageEncoder, encode_image

    image = synthetic_image()
    ms, sizes = {}, {}
    for fmt in ("png", "jpeg", "webp"):
        sizes[fmt] = len(encode_image(image, fmt, settings))  # untimed: first-call costs
        times = []
        for _ in range(plan.encode_repeats):
            started = time.perf_counter()
            encode_image(image, fmt, settings)
            times.append((time.perf_counter() - started) * 1e3)
        ms[fmt] = spread(times)
    images = [synthetic_image(shift=k) for k in range(plan.encode_batch)]
    jobs = [(img, "png") for img in images]
    encoder = ImageEncoder(settings)
    encoder.encode_all(jobs)  # starts the pool's threads
    sequential, parallel = [], []
    for _ in range(plan.encode_repeats):
        started = time.perf_counter()
        for img in images:
            encode_image(img, "png", settings)
        sequential.append((time.perf_counter() - started) * 1e3)
        started = time.perf_counter()
        encoder.encode_all(jobs)
        parallel.append((time.perf_counter() - started) * 1e3)
    encoder.close()
    return {"image": ENCODE_IMAGE, "width": image.width, "height": image.height,
            "settings": {"png_compress_level": settings.png_compress_level,
                         "jpeg_quality": settings.jpeg_quality,
                         "webp_quality": settings.webp_quality},
            "ms": ms, "bytes": sizes,
            "batch": {"images": plan.encode_batch, "format": "png",
                      "threads": settings.encode_threads,
                      "sequential_ms": spread(sequential), "parallel_ms": spread(parallel),
                      "speedup": spread([s / p for s, p in zip(sequential, parallel)])}}


# --- The in-process paths. --------------------------------------------------------------------

def run_pipeline(engine, scenario: Scenario) -> Sample:
    """The same requests through ``Engine.generate`` in groups of ``batch_size``."""
    from sdxl_serve.contract import parse_request

    requests = [parse_request(body, engine.limits) for body in scenario.bodies()]
    latencies = []
    started = time.perf_counter()
    for first in range(0, len(requests), scenario.batch_size):
        group_started = time.perf_counter()
        results = engine.generate(requests[first:first + scenario.batch_size])
        if not all(len(r.images) == r.request.num_images for r in results):
            raise BenchError("the pipeline returned fewer images than asked")
        latencies.append(time.perf_counter() - group_started)
    return Sample(time.perf_counter() - started, len(requests), len(requests), latencies)


def run_service(service, scenario: Scenario, bodies: list[bytes] | None = None,
                expect: int = 200) -> Sample:
    """The same request bodies through ``GenerationService.handle`` in groups."""
    from sdxl_serve.service import Incoming

    raw = bodies or [json.dumps(body).encode() for body in scenario.bodies()]
    items = [Incoming(body, request_id=f"bench-{i}") for i, body in enumerate(raw)]
    latencies = []
    started = time.perf_counter()
    for first in range(0, len(items), scenario.batch_size):
        group_started = time.perf_counter()
        replies = service.handle(items[first:first + scenario.batch_size])
        bad = [reply.status for reply in replies if reply.status != expect]
        if bad:
            raise BenchError(f"the service answered {bad}, expected {expect}")
        latencies.append(time.perf_counter() - group_started)
    images = len(items) if expect == 200 else 0
    return Sample(time.perf_counter() - started, images, len(items), latencies)


# --- The TorchServe path: a small thread-per-client load generator. ------------------------

class Client:
    """One keep-alive connection to TorchServe's inference API; every reply is checked
    (status, and an image in it), so a failure is never timed as a success."""

    def __init__(self, server, model: str, accept: str | None = None, expect: int = 200,
                 timeout: float = 300.0):
        address = urlsplit(server.addresses.inference)
        if address.hostname not in ("127.0.0.1", "localhost", "::1"):
            raise BenchError(f"the benchmark drives loopback only, not {address.hostname}")
        self.path = f"/predictions/{model}"
        self.accept, self.expect = accept, expect
        self.headers = {"Authorization": f"Bearer {server.keys()['inference']}",
                        "Content-Type": "application/json"}
        if accept:
            self.headers["Accept"] = accept
        self.connection = http.client.HTTPConnection(address.hostname, address.port,
                                                     timeout=timeout)
        self.connection.connect()

    def send(self, body: bytes) -> tuple[float, float | None]:
        """(seconds end to end, the worker's pipeline seconds if the reply says)."""
        started = time.perf_counter()
        self.connection.request("POST", self.path, body, self.headers)
        response = self.connection.getresponse()
        data = response.read()
        elapsed = time.perf_counter() - started
        problem, pipeline_s = _check_reply(response.status, data, self.accept, self.expect)
        if problem:
            raise BenchError(problem)
        return elapsed, pipeline_s

    def close(self) -> None:
        self.connection.close()


def drive(server, model: str, bodies: list[bytes], clients: int, accept: str | None = None,
          expect: int = 200, timeout: float = 300.0) -> Sample:
    """Send ``bodies`` from ``clients`` concurrent keep-alive connections, each in turn.

    Client k sends bodies k, k + clients, ... one after another. Bounded in count (the
    bodies) and time (``timeout`` per request, loopback only).
    """
    shares = [bodies[k::clients] for k in range(clients)]
    latencies: list[float] = []
    worker_pipeline: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)

    def client(share: list[bytes]) -> None:
        connection = None
        try:
            connection = Client(server, model, accept, expect, timeout)
            barrier.wait()
            for body in share:
                elapsed, pipeline_s = connection.send(body)
                with lock:
                    latencies.append(elapsed)
                    if pipeline_s is not None:
                        worker_pipeline.append(pipeline_s)
        except Exception as exc:  # noqa: BLE001 - reported below, the run fails
            with lock:
                errors.append(f"{type(exc).__name__}: {exc}")
            barrier.abort()
        finally:
            if connection is not None:
                connection.close()

    threads = [threading.Thread(target=client, args=(share,), daemon=True) for share in shares]
    for thread in threads:
        thread.start()
    try:
        barrier.wait(timeout=60)
    except threading.BrokenBarrierError:
        pass
    started = time.perf_counter()
    for thread in threads:
        thread.join(timeout * max(1, len(shares[0])) + 30)
    wall = time.perf_counter() - started
    if errors or len(latencies) != len(bodies):
        raise BenchError(f"{model}: {len(latencies)} of {len(bodies)} requests answered as "
                         f"expected; first problems: {errors[:3]}\n{server.tail(20)}")
    images = len(bodies) if expect == 200 else 0
    if clients > 1:
        # With several clients a request also waits for the others' work: its latency
        # over its pipeline time would not isolate what serving costs.
        worker_pipeline = []
    return Sample(wall, images, len(bodies), latencies, worker_pipeline)


FRONTEND_METRIC = re.compile(
    r'^(ts_inference_requests_total|ts_inference_latency_microseconds|'
    r'ts_queue_latency_microseconds)\{model_name="([^"]+)",[^}]*\}\s+(\S+)$', re.M)


def frontend_counters(server, model: str) -> dict[str, float]:
    """TorchServe's counters for one model from its Prometheus endpoint (summed over versions).

    ``ts_inference_latency_microseconds`` sums, per request, the time from the frontend
    having the request to the reply being sent; ``ts_queue_latency_microseconds`` the part
    spent waiting for a worker. They are counters, so only means come from them.
    """
    from sdxl_serve.management import http

    status, _, body = http("GET", server.addresses.metrics + "/metrics", None)
    if status != 200:
        raise BenchError(f"/metrics answered {status}")
    counters: dict[str, float] = {}
    for name, metric_model, value in FRONTEND_METRIC.findall(body.decode()):
        if metric_model == model:
            counters[name] = counters.get(name, 0.0) + float(value)
    return counters


def settled_frontend_counters(server, model: str, timeout_s: float = 5.0) -> dict[str, float]:
    """``frontend_counters`` once TorchServe has booked the last replies: it adds a request's
    latency after sending the reply, so a read right after the client's last answer can miss
    it. Two equal reads 0.2 s apart with every counter present mean it is booked."""
    names = ("ts_inference_requests_total", "ts_inference_latency_microseconds",
             "ts_queue_latency_microseconds")
    deadline = time.monotonic() + timeout_s
    last = frontend_counters(server, model)
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = frontend_counters(server, model)
        if now == last and all(name in now for name in names):
            return now
        last = now
    raise BenchError(f"TorchServe's counters for {model} did not settle: {last}")


def frontend_times(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Per-request means (ms) between two ``frontend_counters`` snapshots."""
    requests = after["ts_inference_requests_total"] - before.get("ts_inference_requests_total", 0)
    if requests <= 0:
        raise BenchError("TorchServe counted no requests for the pass; cannot split its time")

    def mean_ms(name: str) -> float:
        return (after[name] - before.get(name, 0.0)) / requests / 1e3

    return {"requests": requests, "job_ms": mean_ms("ts_inference_latency_microseconds"),
            "queue_ms": mean_ms("ts_queue_latency_microseconds")}


def _check_reply(status: int, data: bytes, accept: str | None, expect: int
                 ) -> tuple[str, float | None]:
    """(what is wrong with a reply or "", the worker's pipeline seconds if it says)."""
    if status != expect:
        return f"status {status} (expected {expect}): {data[:200]!r}", None
    if expect != 200:
        return "", None
    if accept:
        return ("" if data.startswith(PNG_MAGIC) else "a raw reply that is not a PNG"), None
    reply = json.loads(data)
    if not reply.get("image"):
        return "a JSON reply without an image", None
    return "", sum(reply["timings_s"].values())


# --- Servers: archives per batch size, cold starts, registration. ---------------------------

def handler_settings_section() -> dict:
    import yaml

    return yaml.safe_load(MODEL_CONFIG.read_text()).get("handler", {})


def build_archives(batch_sizes: tuple[int, ...], store: Path,
                   tiny_model: Path | None = None) -> dict[int, str]:
    """One archive per TorchServe ``batchSize``, otherwise the shipped model config."""
    import yaml
    from build_archive import build_archive

    store.mkdir(parents=True, exist_ok=True)
    files = {}
    for size in batch_sizes:
        config = yaml.safe_load(MODEL_CONFIG.read_text())
        config["batchSize"] = size
        config_path = store.parent / f"model-config-b{size}.yaml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        files[size] = build_archive(f"sdxl_b{size}", "1.0", None, store, config=config_path,
                                    tiny_model=tiny_model).name
    return files


# The engine logs its warm-up where it runs; the worker logs it again when an engine process
# it started is ready (the engine process's own log lines may not reach model_log.log).
WARM_UP_LINE = re.compile(r"(?:warm-up of \d+ size\(s\)(?: x \d+ image count\(s\))? took"
                          r"|ready in [0-9.]+ s \(warm-up) ([0-9.]+) s")


def logged_warm_up_s(run_dir: Path) -> float:
    """The warm-up time our handler logged (engine.warm_up) in the worker's log."""
    log = run_dir / "logs" / "model_log.log"
    found = WARM_UP_LINE.findall(log.read_text(errors="replace")) if log.exists() else []
    if not found:
        raise BenchError(f"no warm-up line in {log}: cannot split model load from warm-up")
    return float(found[-1])


def cold_start(out: Path, store: Path, archive: str, env: dict, index: int,
               first_body: bytes):
    """Start TorchServe with one model and time its phases up to the first image.

    Returns (phases, running server). Phases: ``torchserve_start`` (process start until the
    management API answers), ``model_load`` (from there until a worker is READY, less the
    warm-up), ``warm_up`` (as our handler logs it), ``first_image`` (READY until the first
    reply), ``total``.
    """
    from sdxl_serve.server import Addresses, TorchServeProcess

    run_dir = out / "run" / f"start-{index}"
    shutil.rmtree(run_dir, ignore_errors=True)
    server = TorchServeProcess(run_dir, store, {"sdxl_b1": archive}, Addresses.free(), env=env)
    started = time.perf_counter()
    server.start()
    try:
        server.wait_ready(None, timeout=180, poll=0.05)
        api_up = time.perf_counter()
        server.wait_ready("sdxl_b1", timeout=600, poll=0.05)
        ready = time.perf_counter()
        drive(server, "sdxl_b1", [first_body], 1)
        first = time.perf_counter()
        warm_up = logged_warm_up_s(run_dir)
    except BaseException:
        server.stop()
        raise
    phases = {"torchserve_start": api_up - started, "model_load": ready - api_up - warm_up,
              "warm_up": warm_up, "first_image": first - ready, "total": first - started}
    if phases["model_load"] <= 0:
        server.stop()
        raise BenchError(f"cold start phases do not add up: {phases}")
    return phases, server


def register(server, archive: str, name: str, batch_size: int) -> None:
    """Register one more model on the running server and check its batchSize."""
    from sdxl_serve.management import http

    token = server.keys()["management"]
    url = (f"{server.addresses.management}/models?url={archive}&model_name={name}"
           "&initial_workers=1&synchronous=true")
    status, _, body = http("POST", url, token, timeout=600)
    if status != 200:
        raise BenchError(f"registering {archive} answered {status}: {body[:300]!r}")
    status, _, body = http("GET", f"{server.addresses.management}/models/{name}", token)
    described = json.loads(body)[0]
    if described.get("batchSize") != batch_size:
        raise BenchError(f"{name} has batchSize {described.get('batchSize')}, not {batch_size}")


# --- The whole run. ---------------------------------------------------------------------------

def measure(plan: Plan, out: Path, threads: int | None, log: Callable[[str], None],
            tiny_model: Path | None = None) -> dict:
    """Run the plan and return the result dictionary (see ``summarize``); ``tiny_model``
    is the model served (default build/tiny-sdxl, built if missing)."""
    import torch

    from build_model import ensure_tiny_model
    from sdxl_serve.engine import load_engine
    from sdxl_serve.service import GenerationService
    from sdxl_serve.settings import Settings

    began = time.perf_counter()
    env = {}
    if threads:
        torch.set_num_threads(threads)
        env["OMP_NUM_THREADS"] = str(threads)  # the worker's torch reads it at import
    machine = machine_info()
    log(f"machine: {machine['cpu_model']}, {machine['usable_cores']} cores, torch "
        f"{machine['torch']} with {machine['torch_threads']} threads, load "
        f"{machine['load_average_start']}")
    settings = Settings.from_mapping(handler_settings_section())

    # 1. Encoding, before anything else runs.
    log("encoding 1024x1024 images ...")
    encoding = bench_encoding(plan, settings)

    # 2. Archives (one per batchSize) and the same pipeline in this process.
    log(f"building archives for batchSize {plan.batch_sizes} ...")
    store = out / "model_store"
    shutil.rmtree(store, ignore_errors=True)
    archives = build_archives(plan.batch_sizes, store, tiny_model)
    engine = load_engine(tiny_model or ensure_tiny_model(), settings)
    engine.warm_up()
    service = GenerationService(engine, "1.0")

    # 3. Cold starts; the last server stays up and gets the other batch sizes.
    starts, server = [], None
    first_body = json.dumps(plan.light.body(0)).encode()
    for index in range(plan.cold_starts):
        phases, server = cold_start(out, store, archives[1], env, index, first_body)
        log(f"cold start {index + 1}/{plan.cold_starts}: {phases['total']:.1f} s")
        starts.append(phases)
        if index < plan.cold_starts - 1:
            server.stop()
    assert server is not None
    scenarios = plan.scenarios()
    samples: dict[str, dict[str, list[Sample]]] = {s.name: {p: [] for p in s.paths}
                                                   for s in scenarios}
    round_trips: dict[str, list[Sample]] = {"torchserve": [], "service": []}
    try:
        for size in plan.batch_sizes:
            if size != 1:
                register(server, archives[size], f"sdxl_b{size}", size)

        def run(scenario: Scenario, path: str, requests_per_client: int | None = None):
            bodies = scenario.bodies()
            if requests_per_client is not None:  # a shorter, untimed pass
                bodies = bodies[:scenario.clients * requests_per_client]
            raw = [json.dumps(body).encode() for body in bodies]
            small = Scenario(scenario.name, scenario.workload, scenario.batch_size,
                             scenario.clients, len(raw) // scenario.clients, scenario.paths)
            if path == "pipeline":
                return run_pipeline(engine, small)
            if path == "service":
                return run_service(service, small, raw)
            accept = "image/png" if path == "torchserve_raw" else None
            # A lone client of a batching model: each request waits up to maxBatchDelay
            # (5 ms as shipped) for companions that never come.
            size = max(plan.sweep) if path == "torchserve_lone_in_batch" else scenario.batch_size
            return drive_counted(f"sdxl_b{size}", raw, scenario.clients, accept)

        def drive_counted(model: str, bodies: list[bytes], clients: int,
                          accept: str | None = None, expect: int = 200) -> Sample:
            before = frontend_counters(server, model)
            sample = drive(server, model, bodies, clients, accept, expect)
            sample.frontend = frontend_times(before, settled_frontend_counters(server, model))
            return sample

        def interleaved(scenario: Scenario, paths: tuple[str, ...], number: int
                        ) -> dict[str, Sample]:
            """A one-client scenario, one request at a time through each path in turn, the
            order rotated with every request. The paths then share the same moments of the
            machine: a virtual machine's speed drifts over minutes (ours by up to 1.7x),
            which would land in the ratio of two passes timed one after the other."""
            from sdxl_serve.contract import parse_request
            from sdxl_serve.service import Incoming

            lone = f"sdxl_b{max(plan.sweep)}"
            clients = {"torchserve": Client(server, "sdxl_b1"),
                       "torchserve_lone_in_batch": Client(server, lone)}

            def one(path: str, index: int, body: dict) -> tuple[float, float | None]:
                raw = json.dumps(body).encode()
                if path in clients:
                    return clients[path].send(raw)
                started = time.perf_counter()
                if path == "pipeline":
                    engine.generate([parse_request(body, engine.limits)])
                else:
                    reply = service.handle([Incoming(raw, request_id=f"bench-{index}")])[0]
                    if reply.status != 200:
                        raise BenchError(f"the service answered {reply.status}")
                return time.perf_counter() - started, None

            times: dict[str, list[float]] = {path: [] for path in paths}
            worker: list[float] = []
            before = frontend_counters(server, "sdxl_b1")
            try:
                for index, body in enumerate(scenario.bodies()):
                    turn = (index + number) % len(paths)
                    for path in paths[turn:] + paths[:turn]:
                        elapsed, pipeline_s = one(path, index, body)
                        times[path].append(elapsed)
                        if path == "torchserve" and pipeline_s is not None:
                            worker.append(pipeline_s)
            finally:
                for client in clients.values():
                    client.close()
            after = settled_frontend_counters(server, "sdxl_b1")
            samples = {path: Sample(sum(t), len(t), len(t), t) for path, t in times.items()}
            if "torchserve" in samples:
                samples["torchserve"].worker_pipeline_s = worker
                samples["torchserve"].frontend = frontend_times(before, after)
            return samples

        # 4. One untimed pass per scenario and path: first-shape costs are not measured.
        log("warming every scenario up ...")
        for scenario in scenarios:
            for path in scenario.paths:
                run(scenario, path, requests_per_client=1)
        refused = [REFUSED_BODY] * plan.round_trips
        refused_scenario = Scenario("refused", plan.light, 1, 1, plan.round_trips)
        # 5. Timed runs, the paths interleaved within each run and their order reversed
        # every other run (A B, B A, ...), so that a machine slowly getting busier or
        # quieter does not favour the path that always runs first.
        # One-client scenarios interleave request by request instead (``interleaved``);
        # the raw-reply path runs as its own pass, since it shares the JSON path's model
        # and so TorchServe's counters, which split the JSON path's time.
        for number in range(plan.runs):
            for scenario in scenarios:
                paths = scenario.paths if number % 2 == 0 else scenario.paths[::-1]
                if scenario.interleaved:
                    together = tuple(p for p in paths if p != "torchserve_raw")
                    measured = interleaved(scenario, together, number)
                    measured.update({p: run(scenario, p) for p in paths if p not in together})
                else:
                    measured = {path: run(scenario, path) for path in paths}
                for path in paths:
                    sample = measured[path]
                    samples[scenario.name][path].append(sample)
                    log(f"run {number + 1}/{plan.runs} {scenario.name:<14} {path:<15} "
                        f"{sample.images / sample.wall_s:6.2f} img/s")
            round_trips["torchserve"].append(drive_counted("sdxl_b1", refused, 1, expect=400))
            round_trips["service"].append(run_service(service, refused_scenario, refused, 400))
        # 6. The job API over the same server: its cost over /predictions.
        jobs = measure_job_api(plan, server, out, log)
        # 7. A peer serving stack (LitServe) doing the same work, side by side.
        peers = measure_peer_stack(plan, server, archives, tiny_model or ensure_tiny_model(),
                                   env, out, log)
    finally:
        server.stop()
    result = summarize(plan, machine, encoding, starts, scenarios, samples, round_trips,
                       wall_s=time.perf_counter() - began)
    result["job_api"] = jobs
    result["peers"] = peers
    return result


def measure_peer_stack(plan: Plan, server, archives: dict[int, str], model_dir: Path,
                       env: dict[str, str], out: Path, log: Callable[[str], None]) -> dict:
    """Ours against LitServe on the same pipeline and batching settings: the shipped
    ``batchSize`` where the plan has that model, and the shipped ``maxBatchDelay``;
    ``env`` (torch's threads) as TorchServe's worker has it. The server's other models are
    unregistered first: ours serves one model, as shipped, like the peer."""
    import yaml
    from bench_peers import measure_peers
    from sdxl_serve.management import http
    from sdxl_serve.server import free_port

    shipped = yaml.safe_load(MODEL_CONFIG.read_text())
    size = shipped["batchSize"] if shipped["batchSize"] in archives else max(plan.sweep)
    for other in archives:
        if other != size:
            status, _, body = http("DELETE", f"{server.addresses.management}/models/"
                                   f"sdxl_b{other}", server.keys()["management"], timeout=120)
            if status != 200:
                raise BenchError(f"unregistering sdxl_b{other} answered {status}: {body[:200]!r}")
    def fresh_worker() -> int:
        # Nothing else calls this server now, so a synchronous scale (which holds one of
        # TorchServe's event loop threads for the whole load) stalls no one.
        for workers in (0, 1):
            status, _, body = http("PUT", f"{server.addresses.management}/models/sdxl_b{size}"
                                   f"?min_worker={workers}&max_worker={workers}"
                                   "&synchronous=true", server.keys()["management"],
                                   timeout=600)
            if status != 200:
                raise BenchError(f"scaling sdxl_b{size} to {workers} workers answered "
                                 f"{status}: {body[:200]!r}")
        _, _, body = http("GET", f"{server.addresses.management}/models/sdxl_b{size}",
                          server.keys()["management"])
        [worker] = json.loads(body)[0]["workers"]
        return int(worker["pid"])

    return measure_peers(plan, lambda: Client(server, f"sdxl_b{size}"), server.process.pid,
                         fresh_worker, model_dir, handler_settings_section(), size,
                         int(shipped["maxBatchDelay"]), free_port, out, log, env)


def measure_job_api(plan: Plan, server, out: Path, log: Callable[[str], None]) -> dict:
    """A job (Redis, dispatcher, API) against a direct call, on the batching model."""
    from bench_jobs import measure_jobs

    model = f"sdxl_b{max(plan.sweep)}"
    local = threading.local()

    def direct(body: dict) -> float:
        if not hasattr(local, "client"):
            local.client = Client(server, model)
        return local.client.send(json.dumps(body).encode())[0]

    bodies = [plan.light.body(index) for index in range(plan.job_requests)]
    return measure_jobs(server, model, bodies, direct, plan.sweep_clients, out / "jobs", log)


def overhead_ratio(scenario: Scenario, served: Sample, pipeline: Sample) -> float:
    """Seconds per image through TorchServe over seconds per image in process, for one run.

    A one-client scenario ran interleaved (``interleaved`` in ``measure``): request i took
    both paths moments apart, so the ratio is the median over requests of their two times,
    which a burst of machine noise during one request cannot move. Other scenarios compare
    their two passes' throughput."""
    if scenario.interleaved and len(served.latencies_s) == len(pipeline.latencies_s):
        return statistics.median(a / b for a, b in zip(served.latencies_s,
                                                          pipeline.latencies_s))
    return (served.wall_s / served.images) / (pipeline.wall_s / pipeline.images)


def summarize(plan: Plan, machine: dict, encoding: dict, starts: list[dict],
              scenarios: list[Scenario], samples: dict, round_trips: dict, wall_s: float
              ) -> dict:
    """Turn the samples into the result: headline numbers first, details with ranges."""
    from bench_report import percentile, spread

    machine = dict(machine, load_average_end=" ".join(f"{x:.2f}" for x in os.getloadavg()))
    detail_scenarios, latency, overhead, paired = {}, {}, {}, {}
    for scenario in scenarios:
        paths = samples[scenario.name]
        detail_scenarios[scenario.name] = {
            path: {"images_per_s": spread([s.images / s.wall_s for s in runs]),
                   "seconds_per_image": spread([s.wall_s / s.images for s in runs])}
            for path, runs in paths.items()}
        served = paths["torchserve"]
        latency[scenario.name] = {
            "p50": spread([percentile(s.latencies_s, 50) for s in served]),
            "p95": spread([percentile(s.latencies_s, 95) for s in served])}
        if all(s.worker_pipeline_s for s in served):
            # Each request's end-to-end time against the pipeline time the worker measured
            # for that same request: machine noise hits both alike.
            paired[scenario.name] = {
                "ratio": spread([statistics.median(l / p for l, p in zip(
                    s.latencies_s, s.worker_pipeline_s)) for s in served]),
                "ms": spread([statistics.median((l - p) * 1e3 for l, p in zip(
                    s.latencies_s, s.worker_pipeline_s)) for s in served])}
        overhead[scenario.name] = spread([
            overhead_ratio(scenario, ts, pl) for ts, pl in zip(served, paths["pipeline"])])
    light = samples["light-b1-c1"]

    def per_request_ms(runs: list[Sample]) -> dict:
        return spread([s.wall_s / s.requests * 1e3 for s in runs])

    def split(runs: list[Sample], part) -> dict:
        """One part of a TorchServe request's time, per run, from the pass's own numbers."""
        return spread([part(s) for s in runs])

    def mean_ms(values: list[float]) -> float:
        return statistics.fmean(values) * 1e3

    served, refused = light["torchserve"], round_trips["torchserve"]
    # Where a light request's time goes through TorchServe, each part measured in the same
    # pass: the client's time, TorchServe's job time (its metrics), the queue, and the
    # pipeline time the worker reported in each reply.
    where = {
        "end_to_end": split(served, lambda s: mean_ms(s.latencies_s)),
        "http_outside_the_job": split(
            served, lambda s: mean_ms(s.latencies_s) - s.frontend["job_ms"]),
        "queue": split(served, lambda s: s.frontend["queue_ms"]),
        "worker_round_trip_less_pipeline": split(
            served, lambda s: s.frontend["job_ms"] - s.frontend["queue_ms"]
            - mean_ms(s.worker_pipeline_s)),
        "worker_pipeline": split(served, lambda s: mean_ms(s.worker_pipeline_s)),
        "refused_end_to_end": split(refused, lambda s: mean_ms(s.latencies_s)),
        "refused_http_outside_the_job": split(
            refused, lambda s: mean_ms(s.latencies_s) - s.frontend["job_ms"]),
        "refused_queue": split(refused, lambda s: s.frontend["queue_ms"]),
        "refused_worker_round_trip": split(
            refused, lambda s: s.frontend["job_ms"] - s.frontend["queue_ms"]),
    }
    breakdown = {"pipeline": per_request_ms(light["pipeline"]),
                 "service": per_request_ms(light["service"]),
                 "torchserve_json": per_request_ms(light["torchserve"]),
                 "torchserve_raw": per_request_ms(light["torchserve_raw"]),
                 "torchserve_lone_in_batch": per_request_ms(light["torchserve_lone_in_batch"]),
                 "torchserve_round_trip": per_request_ms(round_trips["torchserve"]),
                 "service_round_trip": per_request_ms(round_trips["service"])}
    small, large = min(plan.sweep), max(plan.sweep)
    sweep_name = f"light-b{{}}-c{plan.sweep_clients}".format
    sweep = []
    for size in plan.sweep:
        paths = samples[sweep_name(size)]
        sweep.append({"batch_size": size,
                      "images_per_s": {path: detail_scenarios[sweep_name(size)][path]
                                       ["images_per_s"] for path in paths},
                      "p50_s": latency[sweep_name(size)]["p50"],
                      "p95_s": latency[sweep_name(size)]["p95"]})

    def gain(path: str) -> dict:
        return spread([
            (b.images / b.wall_s) / (a.images / a.wall_s)
            for a, b in zip(samples[sweep_name(small)][path], samples[sweep_name(large)][path])])

    batching = {"workload": "light", "clients": plan.sweep_clients, "small": small,
                "large": large, "gain": gain("torchserve"), "pipeline_gain": gain("pipeline"),
                "sweep": sweep}
    cold = {phase: spread([s[phase] for s in starts]) for phase in starts[0]}
    return {
        "bench": "sdxl-serve",
        "mode": plan.mode,
        "runs": plan.runs,
        "serving_overhead_ratio": overhead["compute-b1-c1"]["median"],
        "serving_overhead_ratio_light": overhead["light-b1-c1"]["median"],
        "serving_overhead_ratio_paired": paired["compute-b1-c1"]["ratio"]["median"],
        "serving_overhead_ratio_paired_light": paired["light-b1-c1"]["ratio"]["median"],
        "batching_throughput_gain": batching["gain"]["median"],
        "cold_start_s": {phase: stat["median"] for phase, stat in cold.items()},
        "encode_ms": {fmt: stat["median"] for fmt, stat in encoding["ms"].items()},
        "encode_batch_parallel_speedup": encoding["batch"]["speedup"]["median"],
        "latency_p50_s": latency["light-b1-c1"]["p50"]["median"],
        "latency_p95_s": latency["light-b1-c1"]["p95"]["median"],
        "machine": machine,
        "workloads": {"light": plan.light.describe(), "compute_bound": plan.compute.describe()},
        "wall_s": wall_s,
        "detail": {"scenarios": detail_scenarios, "latency_s": latency,
                   "serving_overhead": overhead, "serving_overhead_paired": paired,
                   "overhead_breakdown_ms": breakdown, "torchserve_split_ms": where,
                   "batching": batching, "cold_start_s": cold, "encode": encoding},
    }


# --- Command line. ----------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--gpu"]:
        from bench_gpu import main as gpu_main

        return gpu_main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="a few requests and one run: checks the harness, not the speed")
    parser.add_argument("--runs", type=int, help="timed runs (default 3; quick 1)")
    parser.add_argument("--threads", type=int,
                        help="torch threads, here and in the worker (default: torch's own)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="where archives, server logs, result.json and the plot go")
    parser.add_argument("--tiny-model", type=Path, metavar="DIR",
                        help="the tiny model to serve (default build/tiny-sdxl, built if "
                             "missing)")
    parser.add_argument("--check", type=Path, metavar="BASELINE",
                        help="after the run, compare p95s with this baseline; exit 1 on a "
                             "regression, 2 when it cannot be judged")
    parser.add_argument("--write-baseline", type=Path, metavar="PATH",
                        help="after the run, store the result as the baseline")
    parser.add_argument("--compare", type=Path, metavar="RESULT",
                        help="no run: compare a stored result with --baseline")
    parser.add_argument("--baseline", type=Path, default=REPO / "bench" / "baseline.json")
    args = parser.parse_args(argv)
    import bench_report

    if args.compare:
        verdict, rows = bench_report.compare(bench_report.load(args.compare),
                                             _baseline(args.baseline))
        print(bench_report.format_check(verdict, rows))
        return bench_report.check_exit_code(verdict)
    baseline = _baseline(args.check) if args.check else None  # fail before a 10-minute run
    plan = QUICK if args.quick else FULL
    if args.runs:
        plan = replace(plan, runs=args.runs)
    args.out.mkdir(parents=True, exist_ok=True)

    def log(message: str) -> None:
        print(message, flush=True)

    try:
        result = measure(plan, args.out.resolve(), args.threads, log, args.tiny_model)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 3
    plot = bench_report.plot_batch_sweep(result, args.out / "batch-sweep.png").resolve()
    # Relative to the checkout where it is inside it: results and baselines get committed.
    result["plot"] = str(plot.relative_to(REPO) if plot.is_relative_to(REPO) else plot)
    result_path = args.out / "result.json"
    result_path.write_text(json.dumps(result, indent=1))
    print()
    print(bench_report.format_table(result))
    code = 0
    if baseline is not None:
        verdict, rows = bench_report.compare(result, baseline)
        print()
        print(bench_report.format_check(verdict, rows))
        code = bench_report.check_exit_code(verdict)
    if args.write_baseline:
        args.write_baseline.parent.mkdir(parents=True, exist_ok=True)
        args.write_baseline.write_text(json.dumps(result, indent=1) + "\n")
        print(f"baseline written to {args.write_baseline}: commit it")
    print(json.dumps(result), flush=True)
    return code


def _baseline(path: Path) -> dict:
    import bench_report

    if not path.is_file():
        print(f"bench: no baseline at {path}. Write one on a quiet machine with "
              "`make bench-baseline` and commit it.", file=sys.stderr)
        raise SystemExit(2)
    return bench_report.load(path)


if __name__ == "__main__":
    sys.exit(main())

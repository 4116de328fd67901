"""Production runtime against real TorchServe: loss-free recycling, OOM handling, deep
health, metrics, and the hardened configuration (tokens, allowed_urls, size and queue
limits, key expiry)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
import urllib.parse
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from http.client import HTTPConnection
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import start_server
from lifetimes import wait_until
from sdxl_serve.cancellation import process_running
from sdxl_serve.management import http

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
REFUSED = b"InvalidKeyException"


def predict(server, body, headers=None, model="sdxl", timeout=300):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return http("POST", f"{server.addresses.inference}/predictions/{model}",
                server.keys()["inference"], raw, headers=headers, timeout=timeout)


def management(server, method, path, token="key"):
    token = server.keys()["management"] if token == "key" else token
    return http(method, server.addresses.management + path, token, timeout=60)


SAMPLE_LINE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def scrape(server) -> dict[tuple[str, frozenset], float]:
    """/metrics (no token: TorchServe leaves it open), series named as Prometheus stores
    them. prometheus_client's parser checks the format, but it renames counters to
    OpenMetrics' ``_total`` names, so the samples are read here as the text has them."""
    status, _, body = http("GET", server.addresses.metrics + "/metrics")
    assert status == 200
    text = body.decode()
    list(text_string_to_metric_families(text))  # raises on malformed exposition text
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, labels, number = SAMPLE_LINE.fullmatch(line.strip()).groups()
            samples[(name, frozenset(LABEL.findall(labels or "")))] = float(number)
    return samples


def value(samples, name, **labels) -> float:
    """Sum of the series of ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def series(samples, name) -> list[dict]:
    return [dict(ls) | {"value": v} for (n, ls), v in samples.items() if n == name]


def scrape_until(server, predicate, timeout=60.0) -> dict:
    """/metrics once ``predicate`` holds, settled (``settled_scrape``)."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(server)
        if predicate(samples):
            return settled_scrape(server, max(1.0, deadline - time.monotonic()))
        if time.monotonic() > deadline:
            pytest.fail(f"/metrics never satisfied {predicate.__name__}")
        time.sleep(0.2)


def counters(samples) -> dict:
    return {key: number for key, number in samples.items()
            if key[0].endswith(("_total", "_count", "_sum", "_bucket"))}


def settled_scrape(server, timeout=60.0) -> dict:
    """/metrics once its counters have stopped moving. The worker writes its metric lines
    0.1 s after its last batch (``metrics.DeferredSink``) and the frontend reads them a
    moment after that, so a count read right after a reply may still grow: two scrapes a
    second apart that agree on every counter settle it."""
    deadline = time.monotonic() + timeout
    samples = scrape(server)
    while True:
        time.sleep(1.0)  # ten times the worker's deferral: the window that proves it settled
        latest = scrape(server)
        if counters(latest) == counters(samples):
            return latest
        if time.monotonic() > deadline:
            pytest.fail("/metrics counters never settled")
        samples = latest


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """Prometheus' histogram_quantile over (upper bound, cumulative count) pairs."""
    buckets = sorted(buckets)
    total = buckets[-1][1]
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower_bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / \
                max(count - lower_count, 1e-9)
        lower_bound, lower_count = bound, count
    return lower_bound


def worker_pid(server) -> int:
    status, _, body = management(server, "GET", "/models/sdxl")
    assert status == 200
    [worker] = json.loads(body)[0]["workers"]
    assert worker["status"] == "READY"
    return worker["pid"]


def run_health_probe(server, run_dir: Path | None = None) -> subprocess.CompletedProcess:
    """scripts/health_probe.py against ``server``, as a Kubernetes exec probe runs it, and
    without site-packages (-S): it must run on any python3, as `make serve` prints it."""
    return subprocess.run(
        [sys.executable, "-S", str(REPO / "scripts" / "health_probe.py"),
         "--url", server.addresses.inference, "--management", server.addresses.management,
         "--run-dir", str(run_dir or server.run_dir), "--timeout", "120"],
        capture_output=True, text=True, timeout=120)


# --- Hardened configuration, on the suite's server. ----------------------------------------

def test_management_calls_without_a_valid_token_are_refused(server):
    calls = [("POST", "/models?url=sdxl-1.0.mar&model_name=intruder"),
             ("PUT", "/models/sdxl?min_worker=3"),
             ("DELETE", "/models/sdxl/1.0"),
             ("GET", "/models/sdxl")]
    for method, path in calls:
        for token in (None, "not-the-key", server.keys()["inference"]):
            status, _, body = management(server, method, path, token)
            assert status == 400 and REFUSED in body, (method, path, token, body)
    worker_pid(server)  # still registered, one READY worker


class CountingHandler(BaseHTTPRequestHandler):
    """A web server that would hand out an archive, and counts who asked."""

    hits: list[str] = []

    def do_GET(self):  # noqa: N802 - the http.server API
        CountingHandler.hits.append(self.path)
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"PK\x03\x04 not really an archive")

    def log_message(self, *args):
        pass


def test_registering_from_a_foreign_url_is_refused_without_fetching(server):
    web = ThreadingHTTPServer(("127.0.0.1", 0), CountingHandler)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    try:
        for url in (f"http://127.0.0.1:{web.server_port}/evil.mar",
                    "https://example.com/evil.mar", "file:///etc/passwd"):
            status, _, body = management(
                server, "POST", f"/models?url={urllib.parse.quote(url, safe='')}")
            assert status in (400, 403, 404) and b"allowed" in body.lower(), (url, body)
    finally:
        web.shutdown()
    assert CountingHandler.hits == []  # TorchServe did not even download it
    # The model API is on (not 405): a name in the local store is looked up there.
    status, _, body = management(server, "POST", "/models?url=not-in-the-store.mar")
    assert status == 404 and b"not-in-the-store.mar" in body


def test_a_directory_outside_the_model_store_is_registered(server, tmp_path):
    """A known limit of TorchServe 0.12 (security.md, "What could not be done here"): a
    directory named by its absolute path is registered wherever it is, `allowed_urls`
    being read for URLs only, so whoever holds the management key can have a worker load
    code from any directory the server can read. Without a worker its handler never runs;
    when TorchServe refuses it, this test fails and the docs' line goes."""
    planted = tmp_path / "planted"
    (planted / "MAR-INF").mkdir(parents=True)
    (planted / "MAR-INF" / "MANIFEST.json").write_text(json.dumps(
        {"runtime": "python", "archiverVersion": "0.12.0",
         "model": {"modelName": "planted", "handler": "planted.py", "modelVersion": "1.0"}}))
    (planted / "planted.py").write_text("raise SystemExit('a planted handler ran')\n")
    # The same directory by a path with `..` or as a file:// URL is refused, as documented.
    for refused in (f"{tmp_path}/../{tmp_path.name}/planted", f"file://{planted}"):
        status, _, body = management(
            server, "POST", f"/models?url={urllib.parse.quote(refused, safe='')}"
                            f"&model_name=refused&initial_workers=0")
        assert status == 404, (refused, body)
    status, _, body = management(
        server, "POST", f"/models?url={urllib.parse.quote(str(planted), safe='')}"
                        f"&model_name=planted&initial_workers=0")
    try:
        assert status == 200 and b"registered" in body, body
    finally:
        management(server, "DELETE", "/models/planted/1.0")


def test_a_body_over_the_request_limit_gets_413(server):
    url = urllib.parse.urlsplit(server.addresses.inference)
    connection = HTTPConnection(url.hostname, url.port, timeout=60)
    # Like curl with a large body: announce it and wait for the server's answer first.
    connection.putrequest("POST", "/predictions/sdxl")
    connection.putheader("Authorization", f"Bearer {server.keys()['inference']}")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", str(2 * 1024 * 1024))
    connection.putheader("Expect", "100-continue")
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 413
    connection.close()
    status, _, _ = predict(server, {"prompt": "x", "num_inference_steps": 1})
    assert status == 200  # and the server goes on


# --- Deep health and metrics, on the suite's server. ----------------------------------------

def test_deep_health_answers_through_torchserve_and_the_probe_script(server):
    status, _, body = http("GET", f"{server.addresses.inference}/predictions/sdxl",
                           server.keys()["inference"], headers={"X-Health-Check": "deep"},
                           timeout=120)
    assert status == 200, body
    payload = json.loads(body)
    assert payload["status"] == "healthy" and payload["worker_pid"] > 0
    # Without the token even the probe is refused: TorchServe 0.12 guards predictions.
    status, _, body = http("GET", f"{server.addresses.inference}/predictions/sdxl",
                           headers={"X-Health-Check": "deep"})
    assert status == 400 and REFUSED in body
    probe = run_health_probe(server)
    assert probe.returncode == 0, probe.stdout + probe.stderr
    assert json.loads(probe.stdout)["status"] == "healthy"


def test_the_health_probe_says_when_its_key_is_the_problem_not_the_server(server, tmp_path):
    """A run directory without the server's key file, or with another run's, made the probe
    say "/ping answered 400 (no status)", which reads as a server that is not healthy."""
    missing = run_health_probe(server, tmp_path)
    assert missing.returncode == 1
    assert (f"/ping answered 400 (no status): no inference key in "
            f"{tmp_path / 'key_file.json'}") in missing.stdout + missing.stderr
    (tmp_path / "key_file.json").write_text(json.dumps({
        "inference": {"key": "stale"}, "management": {"key": "stale"}, "API": {"key": "stale"}}))
    stale = run_health_probe(server, tmp_path)
    assert stale.returncode == 1
    assert (f"/ping answered 400 (no status): TorchServe refused the inference key in "
            f"{tmp_path / 'key_file.json'}") in stale.stdout + stale.stderr
    # Its renewal with that file's API key is refused too: said as TorchServe's message, where
    # it was the body's bytes, `400 b'{\\n  "code": 400,\\n  "type": ...`.
    assert ("could not renew the inference key at "
            f"{server.addresses.management}/token?type=inference: 400 InvalidKeyException: "
            "Token Authentication failed.") in stale.stderr, stale.stderr
    assert "b'" not in stale.stderr, stale.stderr


def test_the_health_probe_names_a_model_the_server_does_not_have(server):
    """`--model nope` said `describing nope failed: 404 b'{\\n  "code": 404,\\n ...`: the
    body's bytes, where TorchServe's message says it in words."""
    probe = subprocess.run(
        [sys.executable, "-S", str(REPO / "scripts" / "health_probe.py"),
         "--url", server.addresses.inference, "--management", server.addresses.management,
         "--run-dir", str(server.run_dir), "--model", "nope"],
        capture_output=True, text=True, timeout=120)
    assert probe.returncode == 1
    assert probe.stdout == ("describing nope failed: 404 ModelNotFoundException: Model not "
                            "found: nope\n"), probe.stdout


def test_metrics_are_exported_with_sensible_values_after_traffic(server):
    before = settled_scrape(server)
    ok_before = value(before, "sdxl_requests_total", outcome="ok")
    bad_before = value(before, "sdxl_requests_total", outcome="bad_request")
    bodies = [{"prompt": "metrics", "seed": i, "num_inference_steps": 2} for i in range(3)]
    bodies.append({"prompt": "metrics", "width": 7})
    with ThreadPoolExecutor(len(bodies)) as pool:
        statuses = [r[0] for r in pool.map(lambda b: predict(server, b), bodies)]
    assert statuses == [200, 200, 200, 400]

    def counted_with_queue_gauge(samples):
        return (value(samples, "sdxl_requests_total", outcome="ok") >= ok_before + 3
                and series(samples, "sdxl_queue_pending_requests"))

    after = scrape_until(server, counted_with_queue_gauge)
    # TorchServe's own.
    for name in ("ts_inference_requests_total", "ts_queue_latency_microseconds",
                 "ts_inference_latency_microseconds", "Requests2XX", "Requests4XX"):
        assert series(after, name), name
    # Ours: counts by outcome, images, OOMs.
    assert value(after, "sdxl_requests_total", outcome="bad_request") >= bad_before + 1
    assert value(after, "sdxl_images_generated_total") >= ok_before + 3
    assert series(after, "sdxl_oom_events_total")[0]["value"] == 0
    assert {s["model_version"] for s in series(after, "sdxl_requests_total")} == {"1.0"}
    # A histogram Prometheus can take quantiles of: cumulative buckets up to 120 s and +Inf.
    # By size: the model's native size (its warm-up size) has its own series, every other
    # size shares "other".
    native = "64x64"
    assert {s["size"] for s in series(after, "sdxl_generation_seconds_count")} == \
        {native, "other"}
    buckets = [(float(s["le"]), s["value"]) for s in series(
        after, "sdxl_generation_seconds_bucket") if s["size"] == native]
    assert 120.0 in dict(buckets) and float("inf") in dict(buckets)
    counts = [count for _, count in sorted(buckets)]
    assert counts == sorted(counts)
    count = value(after, "sdxl_generation_seconds_count", size=native)
    assert dict(buckets)[float("inf")] == count >= 3
    mean = value(after, "sdxl_generation_seconds_sum", size=native) / count
    assert 0 < mean < 120
    assert 0 < histogram_quantile(0.99, buckets) <= 120
    for stage in ("validate", "denoise", "decode", "encode"):
        assert value(after, "sdxl_stage_seconds_count", stage=stage) >= 1, stage
        assert value(after, "sdxl_stage_seconds_sum", stage=stage) > 0, stage
    assert value(after, "sdxl_stage_seconds_sum", stage="denoise") > \
        value(after, "sdxl_stage_seconds_sum", stage="validate")
    batches = value(after, "sdxl_batch_size_count")
    assert batches >= 1 and value(after, "sdxl_batch_size_sum") >= batches
    # Gauges of the engine process and of TorchServe's queue.
    [requests] = series(after, "sdxl_worker_requests")
    assert requests["value"] >= 1 and requests["worker"].isdigit()
    assert series(after, "sdxl_worker_age_seconds")[0]["value"] > 0
    assert series(after, "sdxl_queue_pending_requests")[0]["value"] >= 0
    # No GPU here: the GPU gauges are absent, not zero.
    assert not [name for name, _ in after if name.startswith("sdxl_gpu_")]
    # Our log configuration (config/log4j2.xml): TorchServe took in every metric line above
    # without echoing it to its log (TorchServe's own configuration does, about 95 lines a
    # batch), and wrote each of its own lines once (its own writes them twice).
    log = (server.run_dir / "logs" / "ts_log.log").read_text(errors="replace")
    assert "result=[METRICS]" not in log
    assert log.count("Torchserve version:") == 1


# --- Recycling and out-of-memory handling, on a server with a budget of 5 requests. ---------

# Fault injection: a pipeline call of more than two 64x64 images raises the real
# torch.cuda.OutOfMemoryError; the recycling test's 32x32 batches (at most 8 images, 8192
# pixels) stay under it.
OOM_PIXELS = 2 * 64 * 64
MAX_AGE_S = 20
REPLACED_BY_AGE = re.compile(r"replaced engine process (\d+) by (\d+) because it was (\d+) s "
                             r"old, past its \d+ s \(max_worker_age_s\), having served "
                             r"(\d+) of \d+ requests")


def test_a_lone_request_starts_at_once_and_requests_queued_behind_a_busy_engine_batch(server):
    """The shipped maxBatchDelay is short: a request that finds the worker idle does not
    wait for companions that never come, and batches still form from what queued while the
    engine was busy (TorchServe's pollBatch takes queued requests without waiting)."""
    import yaml

    shipped = yaml.safe_load((REPO / "config" / "model-config.yaml").read_text())
    assert shipped["batchSize"] == 4 and shipped["maxBatchDelay"] <= 10
    model = {"model_name": "sdxl"}

    def served(count):
        def enough(samples):
            return value(samples, "ts_inference_requests_total", **model) >= count
        return enough

    # 1. Lone requests, one after the other: TorchServe's queue latency (which includes
    # the batch wait) stays far under the 50 ms the old default made each of them wait.
    before = settled_scrape(server)
    lone = 6
    for seed in range(lone):
        status, _, body = predict(server, {"prompt": "lone", "seed": seed,
                                           "num_inference_steps": 2})
        assert status == 200, body
    after = scrape_until(server, served(value(before, "ts_inference_requests_total", **model)
                                        + lone))
    waited_ms = (value(after, "ts_queue_latency_microseconds", **model)
                 - value(before, "ts_queue_latency_microseconds", **model)) / lone / 1000
    # 40: each waits the 5 ms and two thread wake-ups; one stall of a loaded machine
    # counts a sixth in the mean. Each would have waited 50 ms or more before.
    assert waited_ms < 40, f"a lone request waited {waited_ms:.1f} ms in TorchServe's queue"

    # 2. Four compatible requests sent while a long streamed one runs: they queue, and the
    # next batch takes all four at once, however short maxBatchDelay is.
    calls_before = value(after, "sdxl_batch_size_count")
    sum_before = value(after, "sdxl_batch_size_sum")
    token = server.keys()["inference"]
    url = urllib.parse.urlsplit(server.addresses.inference)
    busy = HTTPConnection(url.hostname, url.port, timeout=300)
    busy.request("POST", "/predictions/sdxl",
                 json.dumps({"prompt": "busy", "num_inference_steps": 60, "stream": True}),
                 {"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    response = busy.getresponse()
    assert json.loads(response.readline())["step"] == 1  # the engine is busy now
    bodies = [{"prompt": "queued", "seed": i, "num_inference_steps": 2} for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        pending = [pool.submit(predict, server, body) for body in bodies]
        last = json.loads(response.read().splitlines()[-1])
        statuses = [future.result()[0] for future in pending]
    busy.close()
    assert "image" in last and statuses == [200] * 4
    final = scrape_until(server, lambda s: value(s, "sdxl_batch_size_count") >= calls_before + 2)
    # The busy request's call and one call of the four, nothing else.
    assert value(final, "sdxl_batch_size_count") == calls_before + 2
    assert value(final, "sdxl_batch_size_sum") == sum_before + 5


@pytest.fixture(scope="module")
def budget_server(tmp_path_factory, model_store):
    running = start_server(tmp_path_factory.mktemp("budget_run"), model_store,
                           {"sdxl": "sdxl-1.0.mar"},
                           env={"SDXL_MAX_REQUESTS_PER_WORKER": "5",
                                "SDXL_FAULT_OOM_MAX_PIXELS": str(OOM_PIXELS),
                                # An idle engine process is replaced at this age, checked
                                # every second (the last test of this group).
                                "SDXL_MAX_WORKER_AGE_S": str(MAX_AGE_S),
                                "SDXL_METRICS_INTERVAL_S": "1",
                                # A dozen engine processes start here: warm up cheaply.
                                "SDXL_WARMUP_SIZES": "32x32", "SDXL_WARMUP_STEPS": "1"})
    yield running
    running.stop()


def test_recycling_at_a_budget_of_5_loses_no_request_under_load(budget_server):
    torchserve_worker = worker_pid(budget_server)

    def client(number: int) -> list[tuple[int, str]]:
        results = []
        for i in range(15):
            status, headers, body = predict(budget_server, {
                "prompt": f"client {number}", "seed": i, "width": 32, "height": 32,
                "num_inference_steps": 1})
            results.append((status, headers.get("X-Worker-Pid", "")))
        return results

    with ThreadPoolExecutor(4) as pool:
        results = [r for rs in pool.map(client, range(4)) for r in rs]
    assert len(results) == 60
    assert [status for status, _ in results] == [200] * 60
    served = Counter(int(pid) for _, pid in results)
    assert len(served) >= 10, served
    assert max(served.values()) <= 5, served  # no engine process beyond its budget
    # Each replaced process really ended (its memory is back), only the current one runs.
    assert sum(process_running(pid) for pid in served) <= 1
    # TorchServe never saw a worker die or restart.
    assert worker_pid(budget_server) == torchserve_worker
    log = (budget_server.run_dir / "logs" / "ts_log.log").read_text(errors="replace")
    assert "Worker died" not in log and "Backend worker process died" not in log


def test_an_oom_splits_the_batch_and_only_an_image_too_big_alone_gets_507(budget_server):
    torchserve_worker = worker_pid(budget_server)
    # Four 64x64 images in one request: too big at once, fine two by two.
    status, _, body = predict(budget_server, {"prompt": "four", "seed": 3, "num_images": 4,
                                              "num_inference_steps": 1})
    assert status == 200, body
    assert json.loads(body)["seeds"] == [3, 4, 5, 6] and len(json.loads(body)["images"]) == 4
    # One 96x96 image does not fit even alone.
    status, _, body = predict(budget_server, {"prompt": "big", "width": 96, "height": 96,
                                              "num_inference_steps": 1})
    assert status == 507, body
    error = json.loads(body)
    assert error["type"] == "OutOfMemory" and "96x96" in error["message"]
    assert "`width`" in error["message"] and "72x72" in error["message"]
    # The worker keeps serving, in the same TorchServe worker process.
    status, _, _ = predict(budget_server, {"prompt": "after", "num_inference_steps": 1})
    assert status == 200
    assert worker_pid(budget_server) == torchserve_worker

    def ooms_counted(samples):
        return (value(samples, "sdxl_oom_events_total") >= 2
                and value(samples, "sdxl_requests_total", outcome="oom") >= 1)

    scrape_until(budget_server, ooms_counted)


def test_an_idle_engine_process_past_its_age_is_replaced_without_a_request(budget_server):
    torchserve_worker = worker_pid(budget_server)
    log = budget_server.run_dir / "logs" / "model_log.log"
    start = log.stat().st_size

    def replaced_by_age():
        with open(log, "rb") as text:
            text.seek(start)
            said = text.read().decode(errors="replace")
            for old, new, age, served in REPLACED_BY_AGE.findall(said):
                # Not a replacement at the request budget (5): the age (drawn up to 10 %
                # below MAX_AGE_S) ran out first.
                if int(served) < 5 and int(age) >= MAX_AGE_S * 0.9 - 1:
                    return int(old), int(new), int(age)
        return None

    # No request comes: the worker's upkeep (every second here) replaces the idle engine
    # process once it is old enough.
    old, new, age = wait_until(replaced_by_age, MAX_AGE_S + 60,
                               "an engine process to be replaced by age")
    assert age <= MAX_AGE_S + 2, age
    assert not process_running(old)
    # The next request is served by the new process, in the same TorchServe worker.
    status, headers, _ = predict(budget_server, {"prompt": "after", "width": 32,
                                                 "height": 32, "num_inference_steps": 1})
    assert status == 200 and int(headers["X-Worker-Pid"]) == new
    assert worker_pid(budget_server) == torchserve_worker


# --- Overload and key expiry, on a server with a queue of 2 and keys valid for 12 s. --------

@pytest.fixture(scope="module")
def small_queue_server(tmp_path_factory, model_store):
    running = start_server(tmp_path_factory.mktemp("queue_run"), model_store,
                           {"sdxl": "sdxl-1.0.mar"},
                           env={"TS_JOB_QUEUE_SIZE": "2", "TS_TOKEN_EXPIRATION_TIME_MIN": "0.2",
                                "SDXL_METRICS_INTERVAL_S": "0.5"})
    yield running
    running.stop()


def inferences_received(server) -> int:
    """Batches the server's workers have taken so far (TorchServe's worker logs one line as
    it receives each one)."""
    try:
        log = (server.run_dir / "logs" / "model_log.log").read_text(errors="replace")
    except FileNotFoundError:
        return 0
    return log.count("Backend received inference at:")


def test_a_flood_beyond_the_queue_gets_503_then_the_server_recovers(small_queue_server):
    server = small_queue_server
    keys = server.key_file()
    keys.renew("inference")  # a fresh key for the flood: they live 12 s on this server
    token = keys.key("inference")
    url = f"{server.addresses.inference}/predictions/sdxl"

    def send(i):
        body = {"prompt": "flood", "seed": i, "num_inference_steps": 1}
        if i == 0:  # keeps the worker busy a few seconds, so the backlog lasts
            body.update(width=128, height=128, num_inference_steps=20)
        return http("POST", url, token, json.dumps(body).encode(), timeout=300)

    def backlog_seen_or_slow_one_done():
        if value(scrape(server), "sdxl_queue_pending_requests") >= 1:
            return "seen"
        return "too late" if first.done() else None

    with ThreadPoolExecutor(12) as pool:
        received = inferences_received(server)
        first = pool.submit(send, 0)
        # The slow one reaches the worker first; the flood queues (or is refused) behind it.
        wait_until(lambda: inferences_received(server) > received or first.done(), 60,
                   "the slow request to reach the worker")
        flood = [pool.submit(send, i) for i in range(1, 12)]
        # The queue depth gauge (the worker's poller, every 0.5 s here) shows the backlog
        # while the slow one still runs.
        seen = wait_until(backlog_seen_or_slow_one_done, 120, "the queue depth gauge",
                          interval=0.1)
        results = [future.result() for future in [first, *flood]]
    assert seen == "seen", "the slow request ended before the gauge showed the backlog"
    statuses = Counter(status for status, _, _ in results)
    assert set(statuses) == {200, 503}, statuses
    refused = [json.loads(body) for status, _, body in results if status == 503]
    assert refused[0]["type"] == "ServiceUnavailableException"
    # Recovered: the next request is served (with a renewed key if this one expired).
    status, _, body = keys.call("POST", url, "inference",
                                json.dumps({"prompt": "after", "num_inference_steps": 1}).encode(),
                                {"Content-Type": "application/json"}, timeout=300)
    assert status == 200, body

    def queue_empty(samples):
        return value(samples, "sdxl_queue_pending_requests") == 0

    scrape_until(server, queue_empty)


def expires_at(server, kind: str) -> float:
    entry = json.loads((server.run_dir / "key_file.json").read_text())[kind]
    return datetime.fromisoformat(entry["expiration time"].replace("Z", "+00:00")).timestamp()


def test_expired_keys_are_renewed_by_the_worker_and_the_probe(small_queue_server):
    server = small_queue_server
    first_key = server.keys()["management"]
    # The keys of this server expire 12 s after they were issued; wait for that, no longer.
    time.sleep(max(0.0, expires_at(server, "management") - time.time() + 0.5))
    status, _, body = management(server, "GET", "/models/sdxl", token=first_key)
    assert status == 400 and REFUSED in body  # expired
    # The worker's queue-depth poller renews the management key through the API key.
    wait_until(lambda: server.keys()["management"] != first_key, 30,
               "the worker to renew the expired management key")
    assert management(server, "GET", "/models/sdxl")[0] == 200
    # The readiness probe renews an expired inference key itself.
    time.sleep(max(0.0, expires_at(server, "inference") - time.time() + 0.5))
    probe = run_health_probe(server)
    assert probe.returncode == 0, probe.stdout + probe.stderr

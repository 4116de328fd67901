"""The shipped alerts, dashboard and autoscaling queries, evaluated by a real Prometheus
scraping a real TorchServe and a real job API over a real Redis.

promtool's unit tests (test_alerts.py) feed the rules series their authors wrote, and
test_metric_names.py checks the names against real scrapes; neither shows that a rule can
fire on what the servers really export (their exporter's own labels, counters that appear
only after an event, joins on labels a series may not carry), nor that a panel draws.
Here the ``prometheus`` binary scrapes the servers every second with the PrometheusRules
loaded as Prometheus Operator would load them, and the labels a PodMonitor gives a target
(namespace, pod, container, job) added by relabelling:

- healthy traffic: no alert pending or firing, and every dashboard panel, the Namespace
  list, the recording rules and the HPA and KEDA queries return data, except what is absent
  by design (test_metric_names.py's lists: GPU-only, compile-only, event-only; the pinned
  baselines; a week ago's data);
- each condition caused for real makes its alert fire: a broken engine (error rate,
  TorchServe's 5xx, the circuit open), a circuit opening and closing again and again, a hung
  batch (TorchServe's queue three quarters full, a job waiting while its dispatcher runs,
  the job dead-lettered), out-of-memory events (the real torch.cuda error, injected), jobs and webhook events with no dispatcher, a Redis on a full
  disk, and the baselines pinned as docs/regression-alerts.md shows (loaded by a reload).

What is changed in the rules to fit a test, and nothing else: every ``for:`` is 1 s, and the
job API's age thresholds (10, 25 and 15 minutes) are seconds (SCALED_AGES). Not caused here:
the GPU alerts (no GPU: their series are absent on a CPU), SDXLLatencyP99High (a minute of
generation per request), SDXLCompileRecompiling
(compile on), the week-over-week regression alerts (a week of data), and the second half of
SDXLJobsNoDispatcher (jobs left running by a dispatcher gone: 25 minutes, plus the 30 s its
check-in stays fresh), and SDXLJobsStoreLostData (flushing the shared stack's Redis would
take the jobs, keys and consumer groups the later tests use; its promtool tests, and the
mark it reads changing over a real Redis in tests/jobs/test_persistence.py).
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import sys
import textwrap
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis
import yaml

# The job stack's helpers (tests/jobs/jobstack.py); last, so that its conftest.py never
# stands for the suite's.
sys.path.append(str(Path(__file__).resolve().parents[1] / "jobs"))

from jobstack import make_key, redis_on_disk, start_api, start_dispatcher  # noqa: E402
from lifetimes import started_and_ready, wait_until  # noqa: E402
from sdxl_jobs.processes import Managed, RedisServer, api_process, wait_http  # noqa: E402
from sdxl_serve.management import http  # noqa: E402
from sdxl_serve.server import Addresses, TorchServeProcess, free_port, text_since  # noqa: E402
from test_alerts import K8S, RULE_SETS, rule_set  # noqa: E402
from test_metric_names import (COMPILE_ONLY, EVENT_ONLY, GPU_ONLY, OPERATOR_SERIES,  # noqa: E402
                               job_api_queries, manifest_queries, namespace_series,
                               promql_metrics)

pytestmark = [pytest.mark.e2e, pytest.mark.jobs, pytest.mark.k8s]

NAMESPACE = "sdxl-serve"  # the KEDA queries name it
# The age thresholds no test can wait out, as seconds: the joins, names and labels around
# them are what is tested. Each must still be in its rule as written here.
SCALED_AGES = {
    "SDXLJobsWaitingTooLong": ("(sdxl_jobs_oldest_queued_age_seconds) > 600",
                               "(sdxl_jobs_oldest_queued_age_seconds) > 3"),
    "SDXLJobsNoDispatcher": ("(sdxl_jobs_oldest_queued_age_seconds) > 1500",
                             "(sdxl_jobs_oldest_queued_age_seconds) > 3"),
    "SDXLWebhooksBehind": ("(sdxl_webhook_oldest_age_seconds) > 900",
                           "(sdxl_webhook_oldest_age_seconds) > 3"),
}
ABSENT_BY_DESIGN = GPU_ONLY | COMPILE_ONLY | EVENT_ONLY | OPERATOR_SERIES
# A hung request holds the worker this long before its engine is killed: the queue behind
# it and the job waiting for its dispatcher must be seen within it.
STALL_S = 25
HANG = "hang until the stall deadline"
# A call for more pixels than this runs out of memory (the real torch.cuda error): the
# jobs' 64x64 fits, 128x128 does not.
OOM_OVER = 64 * 64
LIGHT = {"prompt": "a lighthouse", "width": 32, "height": 32, "num_inference_steps": 1}
JOB = {"prompt": "a red fox", "width": 64, "height": 64, "num_inference_steps": 1,
       "num_images": 1}


def pod_labels(pod: str, monitor: Path, namespace: str = NAMESPACE) -> list[dict]:
    """The relabelling that gives a target the labels Prometheus Operator gives a
    PodMonitor's: namespace, pod, container, and job ``namespace/monitor name``."""
    name = yaml.safe_load(monitor.read_text())["metadata"]["name"]
    return [{"target_label": label, "replacement": value}
            for label, value in (("namespace", namespace), ("pod", pod),
                                 ("container", pod.rsplit("-", 1)[0]),
                                 ("job", f"{namespace}/{name}"))]


def rules_for_a_test(name: str) -> dict:
    """The PrometheusRule's spec as a rule file, ``for:`` 1 s and SCALED_AGES applied."""
    spec = rule_set(name)[0]["spec"]
    for group in spec["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = "1s"
            if rule.get("alert") in SCALED_AGES:
                old, new = SCALED_AGES[rule["alert"]]
                expr = " ".join(rule["expr"].split())
                assert old in expr, (rule["alert"], expr)
                rule["expr"] = expr.replace(old, new)
    return spec


class Prometheus:
    """A real prometheus on a free loopback port, its storage in ``where``."""

    def __init__(self, where: Path, targets: dict[str, tuple[str, list[dict]]]):
        where.mkdir(parents=True, exist_ok=True)
        self.targets = targets
        rule_files = []
        for name in sorted(RULE_SETS):
            path = where / f"{name}.rules.yaml"
            path.write_text(yaml.safe_dump(rules_for_a_test(name), sort_keys=False))
            rule_files.append(path.name)
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s",
                       "evaluation_interval": "1s"},
            # What an operator pins later (docs/regression-alerts.md), loaded at a reload.
            "rule_files": rule_files + ["pinned/*.yaml"],
            "scrape_configs": [{"job_name": job, "metrics_path": "/metrics",
                                "static_configs": [{"targets": [address]}],
                                "relabel_configs": labels}
                               for job, (address, labels) in targets.items()]}
        self.pinned = where / "pinned"
        self.pinned.mkdir()
        (where / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
        self.address = f"http://127.0.0.1:{free_port()}"
        self.process = Managed(
            ["prometheus", f"--config.file={where / 'prometheus.yml'}",
             f"--storage.tsdb.path={where / 'data'}",
             f"--web.listen-address={self.address.split('//')[1]}", "--web.enable-lifecycle"],
            where / "prometheus.log", cwd=where)

    def start(self) -> None:
        self.process.start()
        try:
            wait_http(self.address + "/-/ready", 30, self.process)
            # Targets come from discovery 5 s after the start: a counter first scraped
            # after the traffic has no increase for rate() to see.
            wait_until(lambda: self.scraped(len(self.targets)), 30, "every target scraped",
                       detail=lambda: self.api("targets"))
        except BaseException:
            self.process.stop()
            raise

    def api(self, path: str, **params) -> object:
        url = f"{self.address}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as response:
            answer = json.load(response)
        assert answer["status"] == "success", answer
        return answer["data"]

    def pin(self, name: str, spec: dict) -> None:
        """Load one more rule file (a PrometheusRule's spec) by a reload, as the operator
        applying it does."""
        (self.pinned / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        request = urllib.request.Request(self.address + "/-/reload", method="POST")
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.status == 200
        wait_until(lambda: any(group["name"] == spec["groups"][0]["name"]
                               for group in self.api("rules")["groups"]), 30,
                   f"{name} loaded")

    def scraped(self, count: int) -> bool:
        """Whether ``count`` targets were each scraped once (a target down included)."""
        targets = self.api("targets")["activeTargets"]
        return len(targets) == count and all(t["health"] != "unknown" for t in targets)

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]

    def alerts(self) -> dict[str, list[dict]]:
        """Alert name -> its pending or firing alerts."""
        found: dict[str, list[dict]] = {}
        for alert in self.api("alerts")["alerts"]:
            found.setdefault(alert["labels"]["alertname"], []).append(alert)
        return found

    def evaluations(self) -> dict[str, str]:
        """Rule group -> the start of its last evaluation, as Prometheus writes it."""
        return {group["file"] + group["name"]: group["lastEvaluation"]
                for group in self.api("rules")["groups"]}

    def await_evaluation(self) -> None:
        """Wait until every rule group was evaluated after this call: its last evaluation
        changed twice (the first change may be one under way at the call)."""
        for _ in range(2):
            before = self.evaluations()
            wait_until(lambda: all(when != before.get(group)
                                   for group, when in self.evaluations().items()), 30,
                       "the rules evaluated again", interval=0.2)

    def await_alerts(self, names: set[str], timeout: float, **labels: str) -> dict:
        """Wait until each of ``names`` is pending or firing (with ``labels``)."""
        def active():
            found = {name: [a for a in alerts if labels.items() <= a["labels"].items()]
                     for name, alerts in self.alerts().items()}
            return {name: found[name] for name in names if found.get(name)} \
                if names <= {name for name, hits in found.items() if hits} else None
        return wait_until(active, timeout, f"{sorted(names)} pending or firing",
                          interval=0.5, detail=lambda: sorted(self.alerts()))

    def stop(self) -> None:
        self.process.stop()


class Stack:
    """What the module's tests share: TorchServe, Redis, the job API and Prometheus."""

    def __init__(self, server, fault: Path, redis_server, api, key: str, prometheus,
                 logs: Path, full_disk_api: str):
        self.server, self.fault, self.redis, self.api, self.key = (
            server, fault, redis_server, api, key)
        self.prometheus, self.logs, self.full_disk_api = prometheus, logs, full_disk_api

    def predict(self, body: dict, timeout: float = 120) -> tuple[int, dict, bytes]:
        return http("POST", f"{self.server.addresses.inference}/predictions/sdxl",
                    self.server.keys()["inference"], json.dumps(body).encode(),
                    timeout=timeout)

    def submit(self, body: dict) -> str:
        status, _, job = self.api.json("POST", "/v1/jobs", self.key, body)
        assert status == 202, job
        return job["id"]

    def job(self, job_id: str) -> dict:
        status, _, job = self.api.json("GET", f"/v1/jobs/{job_id}", self.key)
        assert status == 200, job
        return job

    def dispatcher(self, name: str, env: dict | None = None, extra: tuple[str, ...] = ()):
        """A dispatcher for the stack's TorchServe, once it has checked in and published
        the model's bounds (the API validates against them)."""
        started = time.time()
        process = start_dispatcher(self.redis.url, self.server, self.logs, name, env, extra)
        client = redis.Redis.from_url(self.redis.url)
        try:
            wait_until(lambda: (client.zscore("sdxl:dispatchers", name) or 0) > started
                       and client.exists("sdxl:model"), 120,
                       f"dispatcher {name} to check in and publish the model's bounds")
        except BaseException:
            process.stop()
            raise
        finally:
            client.close()
        return process


@pytest.fixture(scope="module")
def stack(tmp_path_factory, model_store):
    if not (shutil.which("prometheus") and shutil.which("redis-server")):
        pytest.skip("prometheus or redis-server is not installed: `apt-get install "
                    "prometheus redis-server` (.ci/run does)")
    base = tmp_path_factory.mktemp("alerts-live")
    fault = base / "engine-broken"
    monitoring = K8S / "components" / "monitoring" / "podmonitor.yaml"
    jobs_monitor = K8S / "overlays" / "keda-jobs" / "podmonitor.yaml"
    with contextlib.ExitStack() as stop:
        models = {"sdxl": "sdxl-1.0.mar"}
        server = started_and_ready(TorchServeProcess(base / "run", model_store, models,
                                                     Addresses.free(), env={
            "SDXL_FAULT_ENGINE_BROKEN_FILE": str(fault),
            "SDXL_FAULT_HANG_PROMPT": HANG, "SDXL_ENGINE_STALL_S": str(STALL_S),
            "SDXL_FAULT_OOM_MAX_PIXELS": str(OOM_OVER),
            "SDXL_CIRCUIT_FAILURE_THRESHOLD": "2", "SDXL_CIRCUIT_COOLDOWN_S": "3",
            "SDXL_METRICS_INTERVAL_S": "0.5",
            "SDXL_WARMUP_SIZES": "32x32", "SDXL_WARMUP_STEPS": "1"}), models, 240)
        stop.callback(server.stop)
        stop.callback(fault.unlink, missing_ok=True)
        (base / "redis").mkdir()
        redis_server = RedisServer(base / "redis")
        redis_server.start()
        stop.callback(redis_server.stop)
        key = make_key(redis_server.url)
        # Webhook events of this module are never delivered (no dispatcher runs then).
        api = start_api(redis_server.url, base, {
            "SDXL_JOBS_WEBHOOK_ALLOW": "127.0.0.1:9",
            "SDXL_JOBS_WEBHOOK_SECRET": "whsec_c2VjcmV0LWtleS1vZi0xNi1ieXRlcw=="})
        stop.callback(api.process.stop)
        # A second job API of its own namespace, over a Redis on a full disk: started by its
        # test, scraped from the start (down until then).
        full_disk_api = f"http://127.0.0.1:{free_port()}"
        prometheus = Prometheus(base / "prometheus", {
            "torchserve": (server.addresses.metrics.split("//")[1],
                           pod_labels("sdxl-serve-0", monitoring)),
            "jobs-api": (api.address.split("//")[1], pod_labels("sdxl-jobs-api-0", jobs_monitor)),
            "jobs-api-full-disk": (full_disk_api.split("//")[1],
                                   pod_labels("sdxl-jobs-api-0", jobs_monitor,
                                              "sdxl-serve-full-disk"))})
        prometheus.start()
        stop.callback(prometheus.stop)
        yield Stack(server, fault, redis_server, api, key, prometheus, base, full_disk_api)


def expected_queries(absent: set[str] = ABSENT_BY_DESIGN) -> dict[str, str]:
    """Every query that must return data on a healthy server, keyed by where it is: the
    dashboard's panels and Namespace list, the recording rules, the KEDA triggers, the
    prometheus-adapter rule as the HPA asks it; not the alerts (quiet when healthy), nor
    what reads a series of ``absent`` or a week ago."""
    queries = {place: expr for place, expr in {**manifest_queries(), **job_api_queries()}.items()
               if not place.startswith("rule ") or place[5:].startswith("sdxl:")}
    queries["variable namespace"] = "{__name__=~\"%s\"}" % "|".join(sorted(namespace_series()))
    adapter = yaml.safe_load((K8S / "overlays" / "gpu" / "prometheus-adapter-values.yaml")
                             .read_text())
    for n, rule in enumerate(adapter["rules"]["custom"]):
        queries[f"adapter rule {n} metricsQuery"] = (
            rule["metricsQuery"].replace("<<.GroupBy>>", "pod")
            .replace("<<.Series>>", rule["name"]["as"])
            .replace("<<.LabelMatchers>>", f'namespace="{NAMESPACE}",pod=~"sdxl-serve-0"'))
    del queries["hpa metric 0"]  # a metric's name, served by the adapter rule above
    return {place: expr.replace("$namespace", NAMESPACE) for place, expr in queries.items()
            if not promql_metrics(expr) & absent and "offset 1w" not in expr}


def empty_queries(prometheus: Prometheus, queries: dict[str, str]) -> dict[str, str]:
    """The queries with no sample that is a number (NaN draws nothing either)."""
    return {place: expr for place, expr in queries.items()
            if not any(not math.isnan(float(sample["value"][1]))
                       for sample in prometheus.query(expr))}


def test_healthy_traffic_fires_nothing_and_every_query_has_data(stack):
    # TorchServe creates its ts_inference_* counters at the first inference: scraped first
    # at their value after all four, they would show no increase for rate() to see.
    assert stack.predict(LIGHT)[0] == 200
    wait_until(lambda: stack.prometheus.query("ts_inference_requests_total"), 30,
               "TorchServe's inference counters scraped")
    for _ in range(3):
        assert stack.predict(LIGHT)[0] == 200
    assert stack.predict({"prompt": ""})[0] == 400  # the client's error, not ours
    dispatcher = stack.dispatcher("d-healthy")
    try:
        job_id = stack.submit(JOB)
        wait_until(lambda: stack.job(job_id)["status"] == "succeeded", 120, "the job done",
                   interval=0.5)
    finally:
        dispatcher.stop()
    queries = expected_queries()
    # The extraction found what the dashboard and the autoscalers read.
    assert {"keda trigger queue", "variable namespace",
            "adapter rule 0 metricsQuery"} <= set(queries) and len(queries) > 30
    empty: dict[str, str] = {}

    def all_drawn() -> bool:
        empty.clear()
        empty.update(empty_queries(stack.prometheus, queries))
        return not empty
    wait_until(all_drawn, 60, "every query to return data", interval=1,
               detail=lambda: json.dumps(empty, indent=1))
    stack.prometheus.await_evaluation()
    assert stack.prometheus.alerts() == {}


def test_a_broken_engine_fires_the_error_and_circuit_alerts_not_flapping(stack):
    """A breaker stuck open (every trial fails) counts an opening per cool-down: that is
    SDXLCircuitOpen's, not the intermittent fault SDXLCircuitFlapping is for."""
    prometheus = stack.prometheus
    stack.fault.touch()
    try:
        statuses = [stack.predict(LIGHT, timeout=240)[0] for _ in range(3)]
        assert statuses == [500, 500, 503], statuses
        prometheus.await_alerts({"SDXLErrorRateHigh", "SDXLServer5xxRateHigh",
                                 "SDXLCircuitOpen"}, 60, namespace=NAMESPACE)
        # What was left out as event-only draws once the event came.
        after_5xx = {place: expr for place, expr in
                     expected_queries(ABSENT_BY_DESIGN - EVENT_ONLY).items()
                     if promql_metrics(expr) & EVENT_ONLY}
        assert after_5xx
        wait_until(lambda: not empty_queries(prometheus, after_5xx), 30,
                   "the event-only series' queries to return data",
                   detail=lambda: empty_queries(prometheus, after_5xx))
        opened = (f'sum by (namespace, pod) (increase(sdxl_circuit_transitions_total'
                  f'{{namespace="{NAMESPACE}",state="open"}}[1h])) > 3')
        wait_until(lambda: prometheus.query(opened), 60, "the circuit opened 4 times")
        prometheus.await_evaluation()
        assert "SDXLCircuitFlapping" not in prometheus.alerts()
    finally:
        stack.fault.unlink(missing_ok=True)
    wait_until(lambda: stack.predict(LIGHT)[0] == 200, 60, "the circuit closed again",
               interval=0.5)


def test_a_circuit_that_opens_and_closes_again_and_again_fires_flapping(stack):
    prometheus = stack.prometheus
    for _ in range(5):
        stack.fault.touch()
        try:
            wait_until(lambda: stack.predict(LIGHT, timeout=240)[0] == 503, 60,
                       "the circuit open")
        finally:
            stack.fault.unlink(missing_ok=True)
        wait_until(lambda: stack.predict(LIGHT)[0] == 200, 60, "the circuit closed again",
                   interval=0.5)
        prometheus.await_evaluation()
        prometheus.await_evaluation()  # the close scraped, then evaluated
        if "SDXLCircuitFlapping" in prometheus.alerts():
            break
    prometheus.await_alerts({"SDXLCircuitFlapping"}, 10, namespace=NAMESPACE,
                            pod="sdxl-serve-0")


def test_three_out_of_memory_events_stay_quiet_and_a_fourth_fires(stack):
    """SDXLOutOfMemoryEvents is "more than 3 in 15 minutes": increase() extrapolates to the
    window's end, so 3 events read a little over 3 and fired, unless evaluated at the very
    moment of a scrape."""
    prometheus = stack.prometheus
    events = f'sum(sdxl_oom_events_total{{namespace="{NAMESPACE}"}})'
    # A minute of samples first, as a pod of some age has: on a series only seconds old
    # the extrapolation to the window's end (up to one scrape interval) is a large part
    # of its span, and 3 events read over 3.5.
    wait_until(lambda: prometheus.query(
        f'count_over_time(sdxl_oom_events_total{{namespace="{NAMESPACE}"}}[15m]) >= 60'),
        120, "a minute of samples of the out-of-memory counter", interval=1)
    before = float(prometheus.query(events)[0]["value"][1])
    too_large = {**LIGHT, "width": 128, "height": 128}
    for _ in range(3):
        assert stack.predict(too_large)[0] == 507
    wait_until(lambda: float(prometheus.query(events)[0]["value"][1]) == before + 3, 30,
               "the 3 events scraped")
    prometheus.await_evaluation()
    assert "SDXLOutOfMemoryEvents" not in prometheus.alerts()
    # The dashboard's panel counts them as the alert does: 3, not 3.05.
    (panel,) = [expr for place, expr in expected_queries().items()
                if place.startswith("panel 'Out-of-memory events")]
    assert [float(sample["value"][1]) for sample in prometheus.query(panel)] == [before + 3]
    assert stack.predict(too_large)[0] == 507
    prometheus.await_alerts({"SDXLOutOfMemoryEvents"}, 30, namespace=NAMESPACE,
                            pod="sdxl-serve-0")


def test_a_hung_batch_fills_the_queue_holds_a_job_and_dead_letters_another(stack):
    """A batch that hangs (a stuck driver call, here the engine's injected hang) holds the
    only worker for STALL_S: 14 requests queue behind it (SDXLQueueNearFull, over 12), a
    dispatcher of capacity 1 holds a second job queued while it checks in
    (SDXLJobsWaitingTooLong), and the hung job, answered 500 EngineStalled with one attempt
    allowed, is dead-lettered (SDXLJobsDeadLettersGrowing)."""
    prometheus = stack.prometheus
    model_log = stack.server.run_dir / "logs" / "model_log.log"
    offset = model_log.stat().st_size
    dispatcher = stack.dispatcher("d-one", {"SDXL_JOBS_MAX_ATTEMPTS": "1"},
                                  ("--capacity", "1"))
    try:
        hung = stack.submit({**JOB, "prompt": HANG})
        wait_until(lambda: "injected hang" in text_since(model_log, offset), 60,
                   "the engine hanging")
        held = stack.submit(JOB)
        with ThreadPoolExecutor(14) as pool:
            queued = [pool.submit(stack.predict, LIGHT, 240) for _ in range(14)]
            prometheus.await_alerts({"SDXLQueueNearFull", "SDXLJobsWaitingTooLong"},
                                    STALL_S - 5, namespace=NAMESPACE)
            assert [answer.result()[0] for answer in queued] == [200] * 14
        wait_until(lambda: stack.job(hung)["status"] == "failed", 60, "the hung job failed",
                   interval=0.5)
        prometheus.await_alerts({"SDXLJobsDeadLettersGrowing"}, 30, namespace=NAMESPACE)
        wait_until(lambda: stack.job(held)["status"] == "succeeded", 120,
                   "the held job done", interval=0.5)
    finally:
        dispatcher.stop()


def test_jobs_and_webhook_events_with_no_dispatcher_fire(stack):
    """No dispatcher checks in (KEDA, the node pool or the pods failing): a queued job
    (SDXLJobsNoDispatcher) and a webhook event nobody sends (SDXLWebhooksBehind)."""
    wait_until(lambda: stack.prometheus.query(
        f'sdxl_jobs_dispatchers{{namespace="{NAMESPACE}"}} == 0'), 30,
        "the last dispatcher's check-out scraped")
    canceled = stack.submit({**JOB, "webhook": "http://127.0.0.1:9/hook",
                             "webhook_events": ["canceled"]})
    status, _, body = stack.api.json("DELETE", f"/v1/jobs/{canceled}", stack.key)
    assert status == 200 and body["status"] == "canceled", body
    waiting = stack.submit(JOB)
    stack.prometheus.await_alerts({"SDXLJobsNoDispatcher", "SDXLWebhooksBehind"}, 30,
                                  namespace=NAMESPACE)
    assert stack.api.json("DELETE", f"/v1/jobs/{waiting}", stack.key)[0] == 200


def test_a_redis_on_a_full_disk_fires_store_refuses_writes(stack, full_disk, tmp_path):
    """Redis refusing writes because it cannot persist (MISCONF) on a real full disk, as in
    tests/jobs/test_api.py; the API in a namespace of its own, beside the healthy one."""
    with redis_on_disk(full_disk.path, tmp_path / "redis.log") as (url, client):
        api = api_process(url, stack.full_disk_api, tmp_path / "api.log")
        try:
            api.start()
            wait_http(stack.full_disk_api + "/v1/health?dispatchers=0", 30, api)
            full_disk.fill()
            with contextlib.suppress(redis.ResponseError):  # the write the disk refuses
                client.set("more", "x" * 100_000)
            stack.prometheus.await_alerts({"SDXLJobsStoreRefusesWrites"}, 30,
                                          namespace="sdxl-serve-full-disk")
            # The healthy namespace's Redis takes writes: its alert stays quiet.
            assert not [a for a in stack.prometheus.alerts()["SDXLJobsStoreRefusesWrites"]
                        if a["labels"]["namespace"] == NAMESPACE]
        finally:
            api.stop()
            full_disk.free()


def pinned_baseline_example() -> dict:
    """The PrometheusRule docs/regression-alerts.md gives an operator to pin baselines with,
    as written there (placeholders and all)."""
    page = (K8S.parent / "docs" / "regression-alerts.md").read_text().splitlines()
    start = page.index("      apiVersion: monitoring.coreos.com/v1")
    end = page.index("", start)
    return yaml.safe_load(textwrap.dedent("\n".join(page[start:end])))


def test_the_docs_pinned_baselines_fire_the_baseline_alerts(stack):
    """The docs' example, pinned for the size the tiny model serves (32x32) at 1 ms: p95
    and mean generation time, recorded over real requests, are over 1.2 times it: the
    example's series join the recorded ones (model name, version, size)."""
    example = pinned_baseline_example()
    pinned = []
    for rule in example["spec"]["groups"][0]["rules"]:
        assert rule["expr"].startswith("vector(<") and rule["labels"]["model_version"] == "1.0"
        pinned.append(rule["record"])
        rule["expr"] = "vector(0.001)"
        rule["labels"]["size"] = "32x32"
    assert pinned == ["sdxl:generation_seconds:p95_baseline",
                      "sdxl:generation_seconds:mean_baseline"]
    assert not {"SDXLLatencyP95AboveBaseline", "SDXLLatencyMeanAboveBaseline"} & set(
        stack.prometheus.alerts())
    for _ in range(20):
        assert stack.predict(LIGHT)[0] == 200
    stack.prometheus.pin("baseline", example["spec"])
    stack.prometheus.await_alerts({"SDXLLatencyP95AboveBaseline",
                                   "SDXLLatencyMeanAboveBaseline"}, 30,
                                  namespace=NAMESPACE, model_version="1.0", size="32x32")
    # The dashboard's panel draws the pinned baseline.
    assert stack.prometheus.query("sdxl:generation_seconds:p95_baseline")

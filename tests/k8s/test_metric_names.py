"""Every metric the manifests name is one the server exports.

The names are extracted from the files themselves (alert rules, dashboard, HPA and KEDA
queries, the prometheus-adapter rule), then checked twice: against the list the runtime
exports by design (a unit test), and against a real TorchServe's ``/metrics`` after traffic
(end to end). The dashboard's job API row and the keda-jobs alerts read the job API's
``/metrics`` instead: checked against the text the API writes, and against a real API's
scrape over a real Redis. Label names are checked too: the exporter adds its own (model name, level,
hostname) that may change, so the manifests use only le, outcome, stage, state (our own) and
the namespace and pod labels Prometheus adds; the label values they match (outcome="oom"),
against the values our series are created with. The metric names and label values the
docs name (README.md, k8s/README.md, docs/*.md) are checked the same way.
"""

from __future__ import annotations

import json
import re
import shutil
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from sdxl_serve.management import http
from sdxl_serve.metrics import SPEC_BY_NAME, SPECS, MetricsRecorder

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
MONITORING = K8S / "components" / "monitoring"
# The dashboard's row of panels on the job API's /metrics (the keda-jobs overlay's
# PodMonitor scrapes it), not on TorchServe's: its names are checked against the job API.
JOB_API_ROW = "Job API (keda-jobs overlay)"

# What the server exports: ours as the runtime declares them (metrics.py; each histogram
# as its _bucket, _sum and _count series) and TorchServe's own that config/metrics.yaml
# declares. Read from there, not copied: with a copy, a metric renamed in metrics.py stayed
# "exported" for alerts still reading the old name, and the GPU ones never show on a CPU's
# /metrics for the end-to-end check to catch it.
EXPORTED = {name for spec in SPECS for name, *_ in spec.series()} | {
    entry["name"] for entries in yaml.safe_load(
        (REPO / "config" / "metrics.yaml").read_text())["ts_metrics"].values()
    for entry in entries}
# Absent on a CPU (no torch.cuda memory, no NVML), by design: absent, not zero.
GPU_ONLY = {"sdxl_gpu_memory_allocated_bytes", "sdxl_gpu_memory_reserved_bytes",
            "sdxl_gpu_memory_total_bytes", "sdxl_gpu_utilization_ratio"}
# Absent while compile is off (the default; the session's server runs without it): their
# presence with compile on is checked by tests/e2e/test_compile_through_torchserve.py.
COMPILE_ONLY = {"sdxl_compile_recompilations", "sdxl_compile_eager_calls"}
# Written only at an event this test does not cause: TorchServe creates Requests5XX at a
# server's first 5xx (its declaration is checked instead).
EVENT_ONLY = {"Requests5XX"}
# Our own model labels (metrics.py sets them, config/metrics.yaml declares them) are stable
# too: the regression rules compare a model version with itself.
ALLOWED_LABELS = {"le", "outcome", "stage", "state", "namespace", "pod", "model_name",
                  "model_version", "size"}
# Series that exist without being exported: what the rules record, and the per-version p95
# and mean baselines an operator pins (docs/regression-alerts.md).
OPERATOR_SERIES = {"sdxl:generation_seconds:p95_baseline", "sdxl:generation_seconds:mean_baseline"}

_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and",
             "or", "unless", "offset", "inf", "nan"}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_MATCHERS = re.compile(r"\{([^}]*)\}")
_WORD = re.compile(r"(?<![A-Za-z0-9_.:$])[A-Za-z_:][A-Za-z0-9_:]*")


def promql_metrics(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions or keywords.

    Example:
        >>> sorted(promql_metrics('sum by (le) (rate(a_bucket{x="y"}[5m])) / on (pod) b > 1e6'))
        ['a_bucket', 'b']
    """
    expr = _STRING.sub('""', expr)
    expr = _MATCHERS.sub("", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = _GROUPING.sub("", expr)
    names = set()
    for match in _WORD.finditer(expr):
        if expr[match.end():].lstrip().startswith("(") or match.group(0) in _KEYWORDS:
            continue  # a function or aggregation, or an operator word
        names.add(match.group(0))
    return names


def promql_labels(expr: str) -> set[str]:
    """Label names an expression matches on or groups by."""
    expr = _STRING.sub('""', expr)
    labels = set()
    for _, inside in _GROUPING.findall(expr):
        labels |= {label.strip() for label in inside.split(",") if label.strip()}
    for inside in _MATCHERS.findall(expr):
        labels |= set(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)", inside))
    return labels


def manifest_queries() -> dict[str, str]:
    """Every PromQL expression in the manifests, keyed by where it is."""
    queries = {}
    rule = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    for group in rule["spec"]["groups"]:
        for item in group["rules"]:
            queries[f"rule {item.get('alert') or item.get('record')}"] = item["expr"]
    dashboard = json.loads((MONITORING / "dashboard.json").read_text())
    queries.update(dashboard_queries(dashboard, job_api=False))
    for variable in dashboard["templating"]["list"]:
        # The Namespace list reads the job API's series too: checked on its own
        # (namespace_series).
        if variable["type"] == "query" and variable["name"] != "namespace":
            queries[f"variable {variable['name']}"] = variable["definition"]
    scaled = yaml.safe_load((K8S / "overlays" / "keda" / "scaledobject.yaml").read_text())
    for trigger in scaled["spec"]["triggers"]:
        queries[f"keda trigger {trigger['name']}"] = trigger["metadata"]["query"]
    hpa = yaml.safe_load((K8S / "overlays" / "gpu" / "hpa.yaml").read_text())
    for n, metric in enumerate(hpa["spec"]["metrics"]):
        queries[f"hpa metric {n}"] = metric["pods"]["metric"]["name"]
    adapter = yaml.safe_load(
        (K8S / "overlays" / "gpu" / "prometheus-adapter-values.yaml").read_text())
    for n, rule in enumerate(adapter["rules"]["custom"]):
        queries[f"adapter rule {n}"] = rule["seriesQuery"]
    return queries


def dashboard_queries(dashboard: dict, job_api: bool) -> dict[str, str]:
    """The dashboard panels' expressions, keyed by panel: those of the job API's row
    (``job_api``), or all the others. A row panel has no query of its own; the panels after
    it, up to the next row, are in it."""
    queries, row = {}, None
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            row = panel["title"]
            continue
        if (row == JOB_API_ROW) == job_api:
            for target in panel["targets"]:
                queries[f"panel {panel['title']!r} {target['refId']}"] = target["expr"]
    return queries


def job_api_queries() -> dict[str, str]:
    """What reads the job API's /metrics: the keda-jobs alerts and the dashboard's row."""
    queries = {}
    rule = yaml.safe_load((K8S / "overlays" / "keda-jobs" / "prometheusrule.yaml").read_text())
    for group in rule["spec"]["groups"]:
        for item in group["rules"]:
            queries[f"rule {item['alert']}"] = item["expr"]
    dashboard = json.loads((MONITORING / "dashboard.json").read_text())
    queries.update(dashboard_queries(dashboard, job_api=True))
    return queries


def namespace_series() -> set[str]:
    """The series the dashboard's Namespace list reads its namespaces from: Grafana's
    ``label_values(name, namespace)`` or ``label_values({__name__=~"a|b"}, namespace)``."""
    dashboard = json.loads((MONITORING / "dashboard.json").read_text())
    (variable,) = [v for v in dashboard["templating"]["list"] if v["name"] == "namespace"]
    found = re.fullmatch(r'label_values\(\s*(?:\{__name__=~"([^"]+)"\}|([A-Za-z_:][A-Za-z0-9_:]*))'
                         r'\s*,\s*namespace\s*\)', variable["definition"])
    assert found, f"not a label_values of namespace: {variable['definition']}"
    return set((found.group(1) or found.group(2)).split("|"))


def recorded_series() -> set[str]:
    rule = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    return {item["record"] for group in rule["spec"]["groups"] for item in group["rules"]
            if "record" in item}


def named_metrics() -> dict[str, set[str]]:
    """Metric name -> where the manifests use it; recorded and pinned series left out (the
    metrics they are made from are in)."""
    where: dict[str, set[str]] = {}
    made_here = recorded_series() | OPERATOR_SERIES
    for place, expr in manifest_queries().items():
        # Grafana's label_values(metric, label) names a metric as its first argument.
        expr = re.sub(r"label_values\(\s*([A-Za-z_:][A-Za-z0-9_:]*)\s*,[^)]*\)", r"\1", expr)
        for name in promql_metrics(expr) - made_here:
            where.setdefault(name, set()).add(place)
    return where


@pytest.mark.unit
@pytest.mark.k8s
def test_the_extractor_finds_names_and_skips_the_rest():
    expr = ('histogram_quantile(0.99, sum by (namespace, le) (rate(x_bucket{a="b"}[5m])))'
            ' / on (pod) group_left count without (c) (y offset 5m) > bool 1e-3'
            ' and z{outcome=~"error|oom"} unless max(w) by (d)')
    assert promql_metrics(expr) == {"x_bucket", "y", "z", "w"}
    assert promql_labels(expr) == {"namespace", "le", "a", "pod", "c", "outcome", "d"}


@pytest.mark.unit
@pytest.mark.k8s
def test_manifests_name_only_exported_metrics():
    used = named_metrics()
    # The extraction found the metrics the alerts are about: it is not finding nothing.
    assert {"sdxl_generation_seconds_bucket", "sdxl_gpu_utilization_ratio",
            "sdxl_queue_pending_requests", "sdxl_requests_total",
            "sdxl_gpu_memory_allocated_bytes"} <= set(used)
    unknown = {name: sorted(places) for name, places in used.items() if name not in EXPORTED}
    assert not unknown, f"not exported by the server: {unknown}"
    # What the end-to-end check skips must be exported too, or it skips a name that is gone.
    assert GPU_ONLY | COMPILE_ONLY <= EXPORTED


@pytest.mark.unit
@pytest.mark.k8s
def test_manifests_rely_only_on_stable_labels():
    stray = {}
    for place, expr in manifest_queries().items():
        labels = promql_labels(expr) - ALLOWED_LABELS
        if labels:
            stray[place] = sorted(labels)
    rule = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    for group in rule["spec"]["groups"]:
        for item in group["rules"]:
            for text in item.get("annotations", {}).values():
                labels = set(re.findall(r"\$labels\.([A-Za-z_][A-Za-z0-9_]*)", text))
                if labels - ALLOWED_LABELS:
                    stray[f"annotations of {item['alert']}"] = sorted(labels - ALLOWED_LABELS)
    assert not stray, stray


@pytest.mark.unit
@pytest.mark.k8s
def test_the_namespace_list_reads_a_series_every_deployment_exports():
    # It read the TorchServe workers' sdxl_worker_age_seconds alone: a namespace with the
    # job API and its GPU pods scaled to zero (keda-jobs, an idle queue) was not listed,
    # and the dashboard's job API row could not be shown for it.
    names = namespace_series()
    job_api = exposition_names(job_api_exposition(), declared=False)
    assert names <= EXPORTED | job_api, names - EXPORTED - job_api
    # On TorchServe's /metrics on any device (not a GPU-only or compile-only one), and on
    # the job API's from its start: the real scrapes are checked end to end below.
    assert names & EXPORTED - GPU_ONLY - COMPILE_ONLY - EVENT_ONLY, names
    assert names & job_api, names


def exposition_names(text: str, declared: bool = True) -> set[str]:
    """Names a Prometheus text exposition offers: samples, and (``declared``) the families
    it declares with ``# TYPE``, which TorchServe writes for every metric of metrics.yaml
    whether or not one was ever recorded."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            if declared:
                _, _, family, kind = line.split(maxsplit=3)
                names.add(family)
                if kind.strip() == "histogram":
                    names |= {family + suffix for suffix in ("_bucket", "_sum", "_count")}
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{\s]", line, maxsplit=1)[0])
    return names


@pytest.mark.e2e
def test_every_named_metric_is_on_the_real_servers_metrics(server):
    # Traffic first: some families appear only once they have a sample.
    token = server.keys()["inference"]
    url = f"{server.addresses.inference}/predictions/sdxl"
    ok = http("POST", url, token, json.dumps({"prompt": "a lighthouse",
                                              "num_inference_steps": 2}).encode(), timeout=120)
    bad = http("POST", url, token, b'{"prompt": ""}', timeout=120)
    assert ok[0] == 200 and bad[0] == 400
    used = named_metrics()
    import torch  # only to know whether the GPU metrics can exist here
    unchecked = (set() if torch.cuda.is_available() else GPU_ONLY) | COMPILE_ONLY
    if unchecked & set(used):
        print(f"not checked here (absent on CPU, or with compile off, by design): "
              f"{sorted(unchecked & set(used))}")
    # Samples, not declarations: a metric declared in metrics.yaml and never written (a
    # name our code does not record) has a `# TYPE` line and nothing else. The worker's
    # gauges come with its upkeep, every metrics_interval_s (5 s): scraped until then.
    deadline = time.monotonic() + 60
    while True:
        status, _, body = http("GET", f"{server.addresses.metrics}/metrics")
        assert status == 200
        text = body.decode()
        exported = exposition_names(text, declared=False) | \
            (EVENT_ONLY & exposition_names(text))
        missing = {name: sorted(places) for name, places in used.items()
                   if name not in exported and name not in unchecked}
        if not namespace_series() & exported:
            missing["a series of the dashboard's Namespace list"] = sorted(namespace_series())
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert not missing, f"named in the manifests but not on /metrics: {missing}"


def job_api_exposition() -> str:
    """The text the job API's /metrics writes (its own function, on an empty queue)."""
    from sdxl_jobs.api import prometheus_text

    empty = {"queued": 0, "running": 0, "backlog": 0, "oldest_age_s": 0.0, "dead": 0,
             "stats": {}, "webhooks": 0, "oldest_webhook_age_s": 0.0, "created": 1.7e9}
    return prometheus_text(empty, 0)


def exposition_labels(text: str) -> dict[str, set[str]]:
    """Label name -> the values its samples carry in a Prometheus text exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    labels: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            for name, value in sample.labels.items():
                labels.setdefault(name, set()).add(value)
    return labels


def unmatched_label_values(expr: str, labels: dict[str, set[str]]) -> set[str]:
    """``label="value"`` (or ``=~"a|b"``) matchers whose value no sample carries: a panel
    on outcome="failure" where the API writes "failed" draws nothing, and says nothing."""
    wrong = set()
    for inside in _MATCHERS.findall(expr):
        for label, op, value in re.findall(r'([A-Za-z_][A-Za-z0-9_]*)\s*(=~|=)\s*"([^"]*)"',
                                           inside):
            if label in labels:
                wrong |= {f"{label}{op}{part!r}" for part in value.split("|")
                          if part not in labels[label]}
    return wrong


def check_job_api_queries(queries: dict[str, str], text: str, labels: set[str]) -> None:
    """Every name ``queries`` use is a sample of ``text``, every label one of ``labels`` or
    of its samples, and every label value matched one its samples carry."""
    exported, carried = exposition_names(text, declared=False), exposition_labels(text)
    unknown, stray, values = {}, {}, {}
    for place, expr in queries.items():
        for name in promql_metrics(expr) - exported:
            unknown.setdefault(name, []).append(place)
        if promql_labels(expr) - labels - set(carried):
            stray[place] = sorted(promql_labels(expr) - labels - set(carried))
        if unmatched_label_values(expr, carried):
            values[place] = sorted(unmatched_label_values(expr, carried))
    assert not unknown, f"not exported by the job API: {unknown}"
    assert not stray, f"labels the job API's series do not carry: {stray}"
    assert not values, f"label values no series carries: {values}"


def declared_label_values() -> dict[str, set[str]]:
    """Label name -> the values our TorchServe series are created with at a worker's start
    (``MetricsRecorder.declare``: every counter series, each outcome, stage and state)."""
    labels: dict[str, set[str]] = {}

    def sink(name, kind, value, values):
        spec = SPEC_BY_NAME[re.sub(r"_(bucket|sum|count)$", "", name)]
        names = spec.labels + ("le",) if name.endswith("_bucket") else spec.labels
        for label, carried in zip(names, values):
            labels.setdefault(label, set()).add(carried)

    MetricsRecorder(sink, "sdxl", "1.0", "9000").declare()
    # The model's own labels are the deployment's: any value may be matched.
    return {label: values for label, values in labels.items()
            if label not in ("model_name", "model_version", "worker", "le")}


@pytest.mark.unit
@pytest.mark.k8s
def test_manifests_match_only_label_values_our_series_carry():
    # The job API's queries are checked so (check_job_api_queries); TorchServe's were not:
    # an alert on outcome="oom" written "out_of_memory" would never fire, and say nothing.
    carried = declared_label_values()
    assert {"outcome", "stage", "state"} <= carried.keys()
    wrong = {place: sorted(unmatched_label_values(expr, carried))
             for place, expr in manifest_queries().items()
             if unmatched_label_values(expr, carried)}
    assert not wrong, f"label values no series carries: {wrong}"


# Words on the pages that look like metric names and are not: packages, models, log files.
NOT_METRICS = {"sdxl_serve", "sdxl_serve_handler", "sdxl_jobs", "sdxl_stream", "ts_log",
               "ts_metrics", "sdxl_0_0"}


@pytest.mark.unit
@pytest.mark.k8s
def test_every_metric_the_docs_name_is_exported_with_the_label_values_named():
    pages = [REPO / "README.md", K8S / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    job_api = job_api_exposition()
    families = {spec.name for spec in SPECS} | exposition_names(job_api) | {
        entry["name"] for entries in yaml.safe_load(
            (REPO / "config" / "metrics.yaml").read_text())["ts_metrics"].values()
        for entry in entries}
    named, values = set(), {}
    for page in pages:
        text = page.read_text()
        named |= {(page.name, name) for name in
                  re.findall(r"(?<![\w./:-])((?:sdxl|ts)_[a-z0-9_]*[a-z0-9])(?![\w.(/-])", text)}
        for name, matchers in re.findall(r"\b((?:sdxl|ts)_\w+)(\{[^}`]*=[^}`]*\})", text):
            values.setdefault(page.name, []).append(name + matchers)
    assert ("operations.md", "sdxl_requests_total") in named
    unknown = sorted(f"{page}: {name}" for page, name in named
                     if name not in EXPORTED | families | NOT_METRICS)
    assert not unknown, f"named on a page, exported by nothing: {unknown}"
    carried = declared_label_values()
    for label, job_values in exposition_labels(job_api).items():
        carried.setdefault(label, set()).update(job_values)
    wrong = sorted(f"{page}: {expr}" for page, exprs in values.items() for expr in exprs
                   if unmatched_label_values(expr.replace("\\|", "|"), carried))
    assert sum(map(len, values.values())) >= 3
    assert not wrong, f"label values no series carries: {wrong}"


@pytest.mark.unit
@pytest.mark.k8s
def test_job_alerts_name_only_what_the_job_api_exports():
    # The keda-jobs overlay's rules read the job API's /metrics, not TorchServe's.
    alerts = {place: expr for place, expr in job_api_queries().items()
              if place.startswith("rule ")}
    used = set().union(*map(promql_metrics, alerts.values()))
    assert {"sdxl_jobs_oldest_queued_age_seconds", "sdxl_jobs_dispatchers",
            "sdxl_jobs_dead_lettered_total", "sdxl_webhook_oldest_age_seconds",
            "sdxl_jobs_store_writable", "sdxl_jobs_store_evicts",
            "sdxl_jobs_store_created_timestamp_seconds"} <= used
    # Only the labels Prometheus adds: every API replica reports the same queue.
    check_job_api_queries(alerts, job_api_exposition(), {"namespace", "pod"})
    stray = {place: sorted(promql_labels(expr)) for place, expr in alerts.items()
             if promql_labels(expr) - {"namespace", "pod"}}
    assert not stray, stray


@pytest.mark.unit
@pytest.mark.k8s
def test_the_dashboards_job_api_row_names_only_what_the_job_api_exports():
    panels = dashboard_queries(json.loads((MONITORING / "dashboard.json").read_text()),
                               job_api=True)
    used = set().union(*map(promql_metrics, panels.values()))
    # The row is there and holds what an operator of the job API looks at first.
    assert {"sdxl_jobs", "sdxl_jobs_queue_depth", "sdxl_jobs_oldest_queued_age_seconds",
            "sdxl_jobs_dispatchers", "sdxl_job_wait_seconds_bucket",
            "sdxl_job_run_seconds_bucket", "sdxl_webhook_deliveries_total",
            "sdxl_jobs_dead_lettered_total"} <= used
    check_job_api_queries(panels, job_api_exposition(), {"namespace", "pod"})
    # The API's replicas report the same totals (they are kept in Redis): a sum would
    # count each once per replica.
    summed = [place for place, expr in panels.items() if re.search(r"\bsum\b", expr)]
    assert not summed, f"sum over the API's replicas: {summed}"


@pytest.mark.jobs
@pytest.mark.k8s
def test_every_job_series_named_is_on_a_real_job_apis_metrics(tmp_path):
    # The alerts and the dashboard row against a real API's scrape over a real Redis: the
    # API writes every family from its start, zeros on an empty queue.
    from sdxl_jobs.processes import RedisServer, api_process, free_port, wait_http

    if not shutil.which("redis-server"):
        pytest.skip("redis-server is not installed: `apt-get install redis-server` "
                    "(.ci/run does)")
    (tmp_path / "redis").mkdir()
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    address = f"http://127.0.0.1:{free_port()}"
    api = api_process(redis.url, address, tmp_path / "api.log")
    try:
        api.start()
        wait_http(address + "/v1/health?dispatchers=0", 30, api)
        with urllib.request.urlopen(address + "/metrics", timeout=10) as response:
            text = response.read().decode()
    finally:
        api.stop()
        redis.stop()
    queries = job_api_queries()
    assert any(place.startswith("panel ") for place in queries)
    check_job_api_queries(queries, text, {"namespace", "pod"})
    # A namespace with the job API alone (GPU pods at zero) is in the dashboard's list.
    assert namespace_series() & exposition_names(text, declared=False), namespace_series()

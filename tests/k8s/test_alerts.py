"""The alert and recording rules: promtool accepts them, and their unit tests pass, a firing
and a quiet case for each alert.

Two rule sets: the server's (k8s/components/monitoring) and the job queue's
(k8s/overlays/keda-jobs). Each PrometheusRule is the one source: its ``spec`` is written out as
a plain rule file next to a copy of its promtool tests (``tests/*.test.yaml`` beside it), as
Prometheus would load it.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.k8s

K8S = Path(__file__).resolve().parents[2] / "k8s"
# Where each PrometheusRule is; its promtool tests are in tests/ beside it.
RULE_SETS = {"monitoring": K8S / "components" / "monitoring",
             "keda-jobs": K8S / "overlays" / "keda-jobs"}
# alerts.test.yaml: the alerts evaluated every minute; regression.test.yaml: the regression
# alerts, over a week of data evaluated every 5 minutes.
TEST_FILES = {"monitoring": ("alerts.test.yaml", "regression.test.yaml"),
              "keda-jobs": ("alerts.test.yaml",)}
MONITORING = RULE_SETS["monitoring"]
RULE = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
REGRESSION = "sdxl-serve-regression"
# Thresholds moved by a little, and the quiet case that must then fail.
MOVED = [
    ("monitoring", "SDXLLatencyP99High", "> 60", "> 50", "p99 of 57 s stays quiet"),
    ("monitoring", "SDXLQueueNearFull", "> 12", "> 10", "12 queued stays quiet"),
    # The oldest undelivered webhook event at 15 minutes (one's tries end within about 65 s).
    ("keda-jobs", "SDXLWebhooksBehind", "> 900", "> 800",
     "webhooks 14 minutes behind on two replicas stay quiet"),
    # Summing the workers' reports would double the queue.
    ("monitoring", "SDXLQueueNearFull", "max by (namespace, pod)", "sum by (namespace, pod)",
     "12 queued stays quiet"),
    ("keda-jobs", "SDXLJobsWaitingTooLong", "> 600", "> 500",
     "a job waiting 590 s on two replicas stays quiet"),
    ("keda-jobs", "SDXLJobsNoDispatcher", "> 1500", "> 1400",
     "a scale from zero still within 24 minutes stays quiet"),
    # Jobs left running by a GPU pod that went: 25 minutes without a dispatcher, as above.
    ("keda-jobs", "SDXLJobsNoDispatcher", "[25m]", "[20m]",
     "jobs running with a dispatcher that checks in stay quiet"),
    # Every API replica reports the same queue: summing them would double it.
    ("keda-jobs", "SDXLJobsWaitingTooLong", "max by (namespace) (sdxl_jobs_oldest",
     "sum by (namespace) (sdxl_jobs_oldest", "a job waiting 590 s on two replicas stays quiet"),
    ("keda-jobs", "SDXLJobsDeadLettersGrowing", "[15m]", "[20m]",
     "a dead letter 16 minutes ago stays quiet"),
    # TorchServe keeps a stopped worker's series, frozen: only a moving age tells it is gone.
    ("monitoring", "SDXLCircuitOpen", "changes(sdxl_worker_age_seconds[2m]) > 0",
     "sdxl_worker_age_seconds", "a worker stopped while its circuit was open stops firing"),
    ("monitoring", "SDXLQueueNearFull", "changes(sdxl_worker_age_seconds[2m]) > 0",
     "sdxl_worker_age_seconds", "a version stopped with 14 queued stops firing"),
    # A breaker stuck open counts an opening per failed trial: only closings in between
    # make it flapping.
    ("monitoring", "SDXLCircuitFlapping", '{state="closed"}[1h]))) >= 3',
     '{state="closed"}[1h]))) >= 0', "a circuit stuck open, its trial failing every 30 s"),
    # increase() extrapolates 3 events a little past 3: rounded, "more than 3" means it.
    ("monitoring", "SDXLOutOfMemoryEvents", "round(sum", "(sum",
     "3 OOM events in 15 minutes stay quiet"),
    ("monitoring", "SDXLCircuitFlapping", "round(sum by (namespace, pod)\n  (increase(sdxl_circuit_transitions_total{state=\"open\"}",
     "(sum by (namespace, pod)\n  (increase(sdxl_circuit_transitions_total{state=\"open\"}",
     "3 openings and closings in an hour stay quiet"),
    # Redis refusing writes: 0, never anything between.
    ("keda-jobs", "SDXLJobsStoreRefusesWrites", "== 0", "<= 1",
     "a Redis that takes writes, or refused them for a minute, stays quiet"),
    # A Redis that evicts: a policy set, kept for 5 minutes, not one scrape.
    ("keda-jobs", "SDXLJobsStoreEvicts", "== 1", ">= 0",
     "a Redis set to noeviction, or evicting for 4 minutes, stays quiet"),
    # SDXLJobsStoreLostData: told for an hour after a loss, from the series that ended
    # before the last hour (the offset); fires while none of them ended with the mark read
    # now (==), not while one ended with another; quiet with no series before (a first
    # deployment: the "and"), and where one had the mark (the "unless").
    *[("keda-jobs", "SDXLJobsStoreLostData", old, new, case) for old, new, case in (
        ("offset 1h", "offset 30m", "a Redis that lost its data fires for an hour"),
        ("== on (namespace) group_left", "!= on (namespace) group_left",
         "a Redis that lost its data fires for an hour"),
        ("unless on (namespace)", "and on (namespace)",
         "a first mark, and an API restarted on the same Redis, stay quiet"),
        ("and on (namespace)", "or on (namespace)",
         "a first mark, and an API restarted on the same Redis, stay quiet"))],
]


def rule_set(name: str) -> tuple[dict, list[dict]]:
    """The PrometheusRule of a rule set and the cases of all its promtool tests."""
    where = RULE_SETS[name]
    cases = [case for file in TEST_FILES[name]
             for case in yaml.safe_load((where / "tests" / file).read_text())["tests"]]
    return yaml.safe_load((where / "prometheusrule.yaml").read_text()), cases


def alerts(rule: dict) -> list[str]:
    return [item["alert"] for group in rule["spec"]["groups"] for item in group["rules"]
            if "alert" in item]


def rule_count(rule: dict) -> int:
    return sum(len(group["rules"]) for group in rule["spec"]["groups"])


REFERENCE = {
    # The reference table, alert by alert: what each must compare, and for how long.
    "SDXLLatencyP99High": ("histogram_quantile(0.99", "> 60", "5m"),
    "SDXLGPUUnderused": ("sdxl_gpu_utilization_ratio", "< 0.5", None),
    "SDXLGPUSaturated": ("sdxl_gpu_utilization_ratio", "> 0.95", None),
    # The reference's "> 50 queued" cannot come: TorchServe answers 503 past job_queue_size.
    "SDXLQueueNearFull": ("max by (namespace, pod) ( sdxl_queue_pending_requests", "> 12",
                          None),
    "SDXLErrorRateHigh": ('outcome=~"error|oom"', "> 0.05", None),
    "SDXLGPUMemoryHigh": ("sdxl_gpu_memory_total_bytes", "> 0.95", None),
}


def promtool() -> str:
    found = shutil.which("promtool")
    if not found:
        pytest.skip("promtool is not installed: `apt-get install prometheus` (.ci/run does)")
    return found


def write_rules(where: Path, name: str, spec: dict) -> Path:
    (where / "alerts.rules.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    for file in TEST_FILES[name]:
        shutil.copy(RULE_SETS[name] / "tests" / file, where)
    return where


@pytest.fixture(scope="module", params=sorted(RULE_SETS))
def rules_dir(request, tmp_path_factory) -> tuple[str, Path]:
    rule, _ = rule_set(request.param)
    return request.param, write_rules(tmp_path_factory.mktemp("rules"), request.param,
                                      rule["spec"])


def run(command: list[str], where: Path) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=where, capture_output=True, text=True, timeout=120)


def test_promtool_checks_the_rules(rules_dir):
    name, where = rules_dir
    done = run([promtool(), "check", "rules", "alerts.rules.yaml"], where)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {rule_count(rule_set(name)[0])} rules found" in done.stdout


def test_promtool_unit_tests_pass(rules_dir):
    name, where = rules_dir
    for file in TEST_FILES[name]:
        done = run([promtool(), "test", "rules", file], where)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "SUCCESS" in done.stdout


@pytest.mark.parametrize("name, alert, old, new, failing", MOVED)
def test_promtool_tests_fail_when_a_threshold_moves(name, alert, old, new, failing, tmp_path):
    # The unit tests are close enough to the thresholds to notice a change.
    rule, _ = rule_set(name)
    spec = yaml.safe_load(yaml.safe_dump(rule["spec"]))
    (item,) = [item for group in spec["groups"] for item in group["rules"]
               if item.get("alert") == alert]
    assert old in item["expr"]
    item["expr"] = item["expr"].replace(old, new)
    write_rules(tmp_path, name, spec)
    done = run([promtool(), "test", "rules", "alerts.test.yaml"], tmp_path)
    assert done.returncode != 0 and failing in done.stdout + done.stderr


@pytest.mark.parametrize("name", sorted(RULE_SETS))
def test_every_alert_has_a_firing_and_a_quiet_case(name):
    rule, cases = rule_set(name)
    firing, quiet = set(), set()
    for case in cases:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert set(alerts(rule)) <= firing, f"no firing case: {set(alerts(rule)) - firing}"
    assert set(alerts(rule)) <= quiet, f"no quiet case: {set(alerts(rule)) - quiet}"


def test_the_reference_table_has_a_rule_each():
    rules = {rule["alert"]: rule for group in RULE["spec"]["groups"]
             for rule in group["rules"] if "alert" in rule}
    for alert, (measure, threshold, duration) in REFERENCE.items():
        expr = " ".join(rules[alert]["expr"].split())
        assert measure in expr and expr.endswith(threshold), (alert, expr)
        if duration:
            assert rules[alert]["for"] == duration, alert


@pytest.mark.parametrize("config", [K8S.parent / "config" / "config.properties",
                                    K8S / "base" / "config.properties"])
def test_the_queue_alert_fires_before_torchserve_refuses(config):
    # Past job_queue_size TorchServe answers 503, so the queue never grows beyond it: an
    # alert at or above it could never fire.
    (line,) = [line for line in config.read_text().splitlines()
               if line.startswith("job_queue_size=")]
    rules = {rule["alert"]: rule for group in RULE["spec"]["groups"]
             for rule in group["rules"] if "alert" in rule}
    threshold = float(rules["SDXLQueueNearFull"]["expr"].split(">")[-1])
    assert 0.5 * int(line.split("=")[1]) < threshold < int(line.split("=")[1])


@pytest.mark.parametrize("factor, failing_case", [
    # Raised to 1.3, the 25 % slowdown would no longer fire; lowered to 1.05, the 11 % one
    # would: the tests sit on both sides of the 20 % threshold.
    ("1.3", "p95 25 % slower than the same time a week ago fires after 30 minutes"),
    ("1.05", "p95 11 % slower than the same time a week ago stays quiet"),
    ("1.3", "p95 25 % over the pinned baseline fires after 30 minutes"),
    ("1.05", "p95 11 % over the pinned baseline stays quiet"),
    ("1.3", "mean 23 % slower inside one bucket fires week over week, the p95 cannot see it"),
    ("1.05", "mean 9 % slower than the same time a week ago stays quiet"),
    ("1.3", "mean 23 % over the pinned baseline fires after 30 minutes"),
    ("1.05", "mean 9 % over the pinned baseline stays quiet, and a version without a baseline"),
])
def test_regression_tests_fail_when_the_20_percent_moves(tmp_path, factor, failing_case):
    spec = yaml.safe_load(yaml.safe_dump(RULE["spec"]))
    (group,) = [g for g in spec["groups"] if g["name"] == REGRESSION]
    for rule in group["rules"]:
        if "alert" in rule:
            assert "1.2 *" in rule["expr"]
            rule["expr"] = rule["expr"].replace("1.2 *", f"{factor} *")
    write_rules(tmp_path, "monitoring", spec)
    done = run([promtool(), "test", "rules", "regression.test.yaml"], tmp_path)
    assert done.returncode != 0 and failing_case in done.stdout + done.stderr, done.stdout


def test_the_regression_rules_are_a_group_of_their_own():
    (group,) = [g for g in RULE["spec"]["groups"] if g["name"] == REGRESSION]
    records = {rule["record"]: " ".join(rule["expr"].split())
               for rule in group["rules"] if "record" in rule}
    for quantile, q in (("p50", "0.5"), ("p95", "0.95")):
        expr = records[f"sdxl:generation_seconds:{quantile}_30m"]
        assert expr.startswith(f"histogram_quantile({q}, ")
        assert "by (namespace, model_name, model_version, size, le)" in expr
        assert "rate(sdxl_generation_seconds_bucket[30m])" in expr
    alerts = {rule["alert"]: " ".join(rule["expr"].split())
              for rule in group["rules"] if "alert" in rule}
    assert "> 1.2 * (sdxl:generation_seconds:p95_30m offset 1w)" in \
        alerts["SDXLLatencyP95RegressedWeekOverWeek"]
    assert "1.2 * sdxl:generation_seconds:p95_baseline" in alerts["SDXLLatencyP95AboveBaseline"]
    assert records["sdxl:generation_seconds:mean_30m"] == (
        "sum by (namespace, model_name, model_version, size) "
        "(rate(sdxl_generation_seconds_sum[30m])) / "
        "sum by (namespace, model_name, model_version, size) "
        "(rate(sdxl_generation_seconds_count[30m]))")
    assert "> 1.2 * (sdxl:generation_seconds:mean_30m offset 1w)" in \
        alerts["SDXLLatencyMeanRegressedWeekOverWeek"]
    assert "1.2 * sdxl:generation_seconds:mean_baseline" in alerts["SDXLLatencyMeanAboveBaseline"]


def test_the_dashboard_shows_what_the_regression_alerts_compare():
    import json

    dashboard = json.loads((MONITORING / "dashboard.json").read_text())
    # A row panel (the job API's) has no targets.
    (panel,) = [p for p in dashboard["panels"] if any(
        "sdxl:generation_seconds:p95_30m" in t["expr"] for t in p.get("targets", []))]
    exprs = [" ".join(t["expr"].split()) for t in panel["targets"]]
    assert any(e.endswith("offset 1w") for e in exprs)
    assert any(e.startswith("1.2 * (") and "offset 1w" in e for e in exprs)
    assert "sdxl:generation_seconds:p95_baseline" in exprs
    # Beside the other panels, not on top of one.
    taken = {(p["gridPos"]["x"], p["gridPos"]["y"]) for p in dashboard["panels"]
             if p is not panel}
    assert (panel["gridPos"]["x"], panel["gridPos"]["y"]) not in taken


def keda_query(overlay: str, trigger: str) -> str:
    scaled = yaml.safe_load((K8S / "overlays" / overlay / "scaledobject.yaml").read_text())
    (query,) = [t["metadata"]["query"] for t in scaled["spec"]["triggers"]
                if t["name"] == trigger]
    return query


def check_promql(where: Path, series: list[tuple[str, str]], expr: str,
                 samples: list[tuple[str, float]]) -> None:
    """``expr`` evaluated by promtool at 8m over ``series`` (name, values every minute)
    gives ``samples`` (labels, value)."""
    test = {"rule_files": [], "evaluation_interval": "1m", "tests": [{
        "interval": "1m",
        "input_series": [{"series": name, "values": values} for name, values in series],
        "promql_expr_test": [{"expr": expr, "eval_time": "8m", "exp_samples": [
            {"labels": labels, "value": value} for labels, value in samples]}]}]}
    (where / "query.test.yaml").write_text(yaml.safe_dump(test, sort_keys=False))
    done = run([promtool(), "test", "rules", "query.test.yaml"], where)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_keda_gpu_trigger_reads_live_workers_only(tmp_path):
    """TorchServe keeps a stopped worker's series, frozen, for the pod's life: a worker it
    restarted after a crash gets a new id, and the old one's last utilisation was averaged
    into the pod's (seen: both workers in /metrics after a scale to 0 and back). The KEDA
    trigger, evaluated by promtool: pod a's live worker at 0.9, its dead one frozen at 0.1;
    pod b at 0.5. Scaled on 1.4, not 1.0."""
    labels = 'namespace="sdxl-serve", model_name="sdxl", model_version="1.0"'
    series = [
        (f'sdxl_worker_age_seconds{{{labels}, pod="a", worker="9001"}}', "0+60x10"),
        (f'sdxl_gpu_utilization_ratio{{{labels}, pod="a", worker="9001"}}', "0.9x10"),
        (f'sdxl_worker_age_seconds{{{labels}, pod="a", worker="9000"}}', "55x10"),
        (f'sdxl_gpu_utilization_ratio{{{labels}, pod="a", worker="9000"}}', "0.1x10"),
        (f'sdxl_worker_age_seconds{{{labels}, pod="b", worker="9000"}}', "0+60x10"),
        (f'sdxl_gpu_utilization_ratio{{{labels}, pod="b", worker="9000"}}', "0.5x10"),
    ]
    check_promql(tmp_path, series, keda_query("keda", "gpu"), [("{}", 1.4)])


# Pod a: version 1.0 scaled to 0 with 14 requests queued a moment before (its queue gauge and
# its worker's age frozen, as TorchServe keeps them), 2.0 live with 2 queued; pod b: 6 queued.
QUEUES_WITH_A_STOPPED_VERSION = [
    ('sdxl_queue_pending_requests{namespace="sdxl-serve", pod="a", model_name="sdxl", '
     'model_version="1.0"}', "14x10"),
    ('sdxl_worker_age_seconds{namespace="sdxl-serve", pod="a", model_name="sdxl", '
     'model_version="1.0", worker="9000"}', "300x10"),
    ('sdxl_queue_pending_requests{namespace="sdxl-serve", pod="a", model_name="sdxl", '
     'model_version="2.0"}', "2x10"),
    ('sdxl_worker_age_seconds{namespace="sdxl-serve", pod="a", model_name="sdxl", '
     'model_version="2.0", worker="9001"}', "0+60x10"),
    ('sdxl_queue_pending_requests{namespace="sdxl-serve", pod="b", model_name="sdxl", '
     'model_version="2.0"}', "6x10"),
    ('sdxl_worker_age_seconds{namespace="sdxl-serve", pod="b", model_name="sdxl", '
     'model_version="2.0", worker="9000"}', "0+60x10"),
]


def test_the_keda_queue_trigger_reads_versions_with_a_live_worker_only(tmp_path):
    """A version scaled to 0 right after requests were queued keeps its last depth on
    /metrics for the pod's life (docs/operations.md): read, it held replicas for a queue
    that was gone (20, five replicas' worth, where 8 are queued)."""
    check_promql(tmp_path, QUEUES_WITH_A_STOPPED_VERSION, keda_query("keda", "queue"),
                 [("{}", 8)])


def test_the_adapter_serves_the_queue_of_versions_with_a_live_worker_only(tmp_path):
    """The HPA's pods metric, as prometheus-adapter asks it of Prometheus for the pods of
    the namespace: the same frozen version must not count."""
    values = yaml.safe_load((K8S / "overlays" / "gpu" / "prometheus-adapter-values.yaml")
                            .read_text())
    (rule,) = values["rules"]["custom"]
    query = (rule["metricsQuery"].replace("<<.GroupBy>>", "pod")
             .replace("<<.Series>>", rule["name"]["as"])
             .replace("<<.LabelMatchers>>", 'namespace="sdxl-serve",pod=~"a|b"'))
    check_promql(tmp_path, QUEUES_WITH_A_STOPPED_VERSION, query,
                 [('{pod="a"}', 2), ('{pod="b"}', 6)])

"""The alert rules: promtool accepts them, and their unit tests pass, a firing and a quiet case
each.

Two rule sets: the server's (k8s/components/monitoring) and the job queue's
(k8s/overlays/keda-jobs). Each PrometheusRule is the one source: its ``spec`` is written out as
a plain rule file next to a copy of its promtool tests (``tests/alerts.test.yaml`` beside it),
as Prometheus would load it.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.k8s

K8S = Path(__file__).resolve().parents[2] / "k8s"
# Where each PrometheusRule is; its promtool tests are in tests/alerts.test.yaml beside it.
RULE_SETS = {"monitoring": K8S / "components" / "monitoring",
             "keda-jobs": K8S / "overlays" / "keda-jobs"}
MONITORING = RULE_SETS["monitoring"]
RULE = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
# Thresholds moved by a little, and the quiet case that must then fail.
MOVED = [
    ("monitoring", "SDXLLatencyP99High", "> 60", "> 50", "p99 of 57 s stays quiet"),
    ("keda-jobs", "SDXLJobsWaitingTooLong", "> 600", "> 500",
     "a job waiting 590 s on two replicas stays quiet"),
    ("keda-jobs", "SDXLJobsNoDispatcher", "> 1500", "> 1400",
     "a scale from zero still within 24 minutes stays quiet"),
    # Every API replica reports the same queue: summing them would double it.
    ("keda-jobs", "SDXLJobsWaitingTooLong", "max by (namespace) (sdxl_jobs_oldest",
     "sum by (namespace) (sdxl_jobs_oldest", "a job waiting 590 s on two replicas stays quiet"),
    ("keda-jobs", "SDXLJobsDeadLettersGrowing", "[15m]", "[20m]",
     "a dead letter 16 minutes ago stays quiet"),
]


def rule_set(name: str) -> tuple[dict, dict]:
    """The PrometheusRule of a rule set and its promtool tests."""
    where = RULE_SETS[name]
    return (yaml.safe_load((where / "prometheusrule.yaml").read_text()),
            yaml.safe_load((where / "tests" / "alerts.test.yaml").read_text()))


def alerts(rule: dict) -> list[str]:
    return [item["alert"] for group in rule["spec"]["groups"] for item in group["rules"]
            if "alert" in item]
REFERENCE = {
    # The reference table, alert by alert: what each must compare, and for how long.
    "SDXLLatencyP99High": ("histogram_quantile(0.99", "> 60", "5m"),
    "SDXLGPUUnderused": ("sdxl_gpu_utilization_ratio", "< 0.5", None),
    "SDXLGPUSaturated": ("sdxl_gpu_utilization_ratio", "> 0.95", None),
    "SDXLQueuePerWorkerHigh": ("count by (namespace, pod) (sdxl_worker_age_seconds)", "> 50",
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
    shutil.copy(RULE_SETS[name] / "tests" / "alerts.test.yaml", where)
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
    assert f"SUCCESS: {len(alerts(rule_set(name)[0]))} rules found" in done.stdout


def test_promtool_unit_tests_pass(rules_dir):
    _, where = rules_dir
    done = run([promtool(), "test", "rules", "alerts.test.yaml"], where)
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
    rule, tests = rule_set(name)
    firing, quiet = set(), set()
    for case in tests["tests"]:
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

"""The alert rules: promtool accepts them, and their unit tests pass, a firing and a quiet case each.

The PrometheusRule in k8s/components/monitoring is the one source: its ``spec`` is written
out as a plain rule file next to a copy of the promtool tests, as Prometheus would load it.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.k8s

MONITORING = Path(__file__).resolve().parents[2] / "k8s" / "components" / "monitoring"
RULE = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
TESTS = yaml.safe_load((MONITORING / "tests" / "alerts.test.yaml").read_text())
ALERTS = [rule["alert"] for group in RULE["spec"]["groups"] for rule in group["rules"]
          if "alert" in rule]
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


@pytest.fixture(scope="module")
def rules_dir(tmp_path_factory) -> Path:
    where = tmp_path_factory.mktemp("rules")
    (where / "alerts.rules.yaml").write_text(yaml.safe_dump(RULE["spec"], sort_keys=False))
    shutil.copy(MONITORING / "tests" / "alerts.test.yaml", where)
    return where


def run(command: list[str], where: Path) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=where, capture_output=True, text=True, timeout=120)


def test_promtool_checks_the_rules(rules_dir):
    done = run([promtool(), "check", "rules", "alerts.rules.yaml"], rules_dir)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in done.stdout


def test_promtool_unit_tests_pass(rules_dir):
    done = run([promtool(), "test", "rules", "alerts.test.yaml"], rules_dir)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_promtool_tests_fail_when_a_threshold_moves(rules_dir, tmp_path):
    # The unit tests are close enough to the thresholds to notice a change.
    moved = RULE["spec"]["groups"][0]["rules"][0]["expr"].replace("> 60", "> 50")
    spec = yaml.safe_load(yaml.safe_dump(RULE["spec"]))
    spec["groups"][0]["rules"][0]["expr"] = moved
    (tmp_path / "alerts.rules.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    shutil.copy(rules_dir / "alerts.test.yaml", tmp_path)
    done = run([promtool(), "test", "rules", "alerts.test.yaml"], tmp_path)
    assert done.returncode != 0 and "p99 of 57 s stays quiet" in done.stdout + done.stderr


def test_every_alert_has_a_firing_and_a_quiet_case():
    firing, quiet = set(), set()
    for case in TESTS["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert set(ALERTS) <= firing, f"no firing case: {set(ALERTS) - firing}"
    assert set(ALERTS) <= quiet, f"no quiet case: {set(ALERTS) - quiet}"


def test_the_reference_table_has_a_rule_each():
    rules = {rule["alert"]: rule for group in RULE["spec"]["groups"]
             for rule in group["rules"] if "alert" in rule}
    for alert, (measure, threshold, duration) in REFERENCE.items():
        expr = " ".join(rules[alert]["expr"].split())
        assert measure in expr and expr.endswith(threshold), (alert, expr)
        if duration:
            assert rules[alert]["for"] == duration, alert

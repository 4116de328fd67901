"""The benchmark's statistics and its regression check (scripts/bench_report.py)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from bench_report import (NOT_COMPARABLE, OK, REGRESSED, TOO_NOISY, check_exit_code, compare,
                          format_check, load, percentile, spread)

pytestmark = pytest.mark.unit
MACHINE = {"cpu_model": "AMD EPYC", "usable_cores": 2, "torch": "2.13.0+cpu", "torch_threads": 2}


def result(p95_runs: dict[str, list[float]], machine: dict | None = None) -> dict:
    """A result with only what compare() reads: the machine and p95 runs per scenario."""
    return {"machine": dict(machine or MACHINE),
            "detail": {"latency_s": {name: {"p95": spread(runs)}
                                     for name, runs in p95_runs.items()}}}


def test_percentile_interpolates_like_numpy():
    values = [0.1, 0.4, 0.2, 0.3]
    assert percentile(values, 50) == pytest.approx(0.25)
    assert percentile(values, 95) == pytest.approx(0.385)
    assert percentile([7.0], 95) == 7.0


def test_spread_keeps_median_range_and_runs():
    assert spread([3, 1, 2]) == {"median": 2, "min": 1, "max": 3, "runs": [3.0, 1.0, 2.0]}


def test_a_p95_within_20_percent_passes():
    baseline = result({"light": [1.0, 1.02, 0.98]})
    verdict, rows = compare(result({"light": [1.15, 1.14, 1.16]}), baseline)
    assert verdict == OK and check_exit_code(verdict) == 0
    assert rows[0]["change"] == pytest.approx(0.15)


def test_a_p95_worse_by_more_than_20_percent_fails():
    baseline = result({"light": [1.0, 1.02, 0.98], "compute": [2.0, 2.0, 2.0]})
    verdict, rows = compare(result({"light": [1.3, 1.31, 1.29], "compute": [2.0, 2.0, 2.0]}),
                            baseline)
    assert verdict == REGRESSED and check_exit_code(verdict) == 1
    assert [row["verdict"] for row in rows] == [REGRESSED, OK]
    assert "REGRESSED" in format_check(verdict, rows)


def test_runs_that_disagree_by_more_than_the_threshold_cannot_be_judged():
    baseline = result({"light": [1.0, 1.0, 1.0]})
    verdict, rows = compare(result({"light": [1.0, 1.6, 1.1]}), baseline)
    assert verdict == TOO_NOISY and check_exit_code(verdict) == 2
    assert "quiet machine" in rows[0]["why"]


def test_a_regression_is_reported_even_beside_a_noisy_scenario():
    baseline = result({"a": [1.0, 1.0, 1.0], "b": [1.0, 1.0, 1.0]})
    verdict, _ = compare(result({"a": [1.5, 1.5, 1.5], "b": [1.0, 2.0, 1.5]}), baseline)
    assert verdict == REGRESSED


def test_another_machine_is_not_comparable():
    other = copy.deepcopy(MACHINE)
    other["usable_cores"] = 16
    verdict, rows = compare(result({"light": [0.5] * 3}, other), result({"light": [1.0] * 3}))
    assert verdict == NOT_COMPARABLE and check_exit_code(verdict) == 2
    assert "usable_cores" in rows[0]["why"]


def test_a_single_run_cannot_be_judged():
    verdict, rows = compare(result({"light": [1.0]}), result({"light": [1.0, 1.0, 1.0]}))
    assert verdict == TOO_NOISY and "single run" in rows[0]["why"]


def test_other_workloads_are_not_comparable():
    baseline = result({"light": [1.0] * 3})
    other = result({"light": [1.0] * 3})
    other["workloads"] = {"light": {"width": 128}}
    verdict, rows = compare(other, baseline)
    assert verdict == NOT_COMPARABLE and "workloads" in rows[0]["why"]


def test_no_common_scenario_is_not_comparable():
    verdict, _ = compare(result({"a": [1.0]}), result({"b": [1.0]}))
    assert verdict == NOT_COMPARABLE


def test_the_committed_baseline_is_a_full_run_that_compare_can_read():
    """bench/baseline.json is what `make bench-check` compares with: a full run (3 runs per
    scenario), every headline key present, no path of the machine it ran on."""
    path = Path(__file__).resolve().parents[2] / "bench" / "baseline.json"
    baseline = load(path)
    assert baseline["mode"] == "full" and baseline["runs"] >= 3
    for key in ("serving_overhead_ratio", "serving_overhead_ratio_paired",
                "batching_throughput_gain", "cold_start_s", "encode_ms", "machine"):
        assert key in baseline, key
    assert not Path(baseline["plot"]).is_absolute()
    verdict, rows = compare(baseline, baseline)
    assert rows and all(row["scenario"] for row in rows)
    assert verdict in (OK, TOO_NOISY)

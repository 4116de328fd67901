"""`make bench`'s harness in its quick mode: it must print a JSON line of measured numbers.

This does not judge speed (a few requests on a busy machine); it keeps the benchmark from
rotting: every scenario runs against a real TorchServe and every number is measured.
"""

from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path

import pytest

from bench_report import TOO_NOISY, compare, numbers
from lifetimes import Deadline, run, timeout_of

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
HEADLINE = ("serving_overhead_ratio", "serving_overhead_ratio_light",
            "serving_overhead_ratio_paired", "serving_overhead_ratio_paired_light",
            "batching_throughput_gain", "cold_start_s", "encode_ms",
            "encode_batch_parallel_speedup", "latency_p50_s", "latency_p95_s", "machine")


@pytest.mark.timeout(960)
def test_quick_bench_ends_with_a_json_line_of_measured_numbers(request, tmp_path,
                                                              tiny_model_dir):
    # One torch thread: the check is about shape, and two threads per process thrash
    # when the machine is shared. The bench starts TorchServe (a session of its own),
    # Redis, a dispatcher and the API: `run` ends all of them, whatever happens, and gives
    # up (with the bench's last lines) a minute before pytest's timeout would.
    out = tmp_path / "bench"
    code, output = run([sys.executable, "scripts/bench.py", "--quick", "--threads", "1",
                        "--out", str(out), "--tiny-model", str(tiny_model_dir)],
                       Deadline(timeout_of(request.node) - 60).left(), tmp_path / "bench.log",
                       "the quick bench", cwd=REPO)
    assert code == 0, output[-3000:]
    result = json.loads(output.strip().splitlines()[-1])
    assert all(key in result for key in HEADLINE), sorted(result)
    assert set(result["cold_start_s"]) == {"torchserve_start", "model_load", "warm_up",
                                           "first_image", "total"}
    assert set(result["encode_ms"]) == {"png", "jpeg", "webp"}
    # The job API's cost over /predictions, measured in the same run (Redis, dispatcher, API).
    assert {"added_ms_per_job", "jobs_per_s", "predictions_per_s"} <= set(result["job_api"])
    # LitServe on the same pipeline, side by side (scripts/bench_peers.py).
    assert set(result["peers"]["ratios"]) == {"lone_p50", "clients_throughput", "compute_p50"}
    assert "side by side with LitServe" in output
    # Each round of it has fresh processes on both sides: our model's worker and LitServe.
    peers = result["peers"]
    assert [sorted(r) for r in peers["round_ratios"]] == [
        ["clients_throughput", "compute_p50", "lone_p50"]] * 2
    first, second = peers["round_processes"]
    assert first["torchserve_worker"] != second["torchserve_worker"]
    assert first["litserve"] != second["litserve"]
    for key in ("cpu_model", "usable_cores", "python", "torch", "torchserve"):
        assert result["machine"][key], key
    # Every number but the configuration (machine, workloads, encoder settings) is measured.
    configured = ("machine", "workloads", "detail.encode.settings", "peers.settings",
                  "peers.round_processes")
    found = [(path, value) for path, value in numbers(result)
             if not path.startswith(configured)]
    assert len(found) > 100
    # A difference of two timings may come out below zero on a busy machine (the job API's
    # added time per job was -19 ms in a run beside another test suite); the rest are
    # durations, rates and ratios.
    signed = ("job_api.added_ms_per_job",)
    bad = [(path, value) for path, value in found
           if isinstance(value, bool) or not math.isfinite(value)
           or (value <= 0 and path not in signed)]
    assert not bad, bad
    assert json.loads((out / "result.json").read_text()) == result
    assert Path(result["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # One run has no spread: the check must refuse to judge it, rather than pass or fail
    # it, even against a baseline it would fail by far (every p95 half as long).
    faster = copy.deepcopy(result)
    for latency in faster["detail"]["latency_s"].values():
        latency["p95"] = {key: ([run / 2 for run in value] if key == "runs" else value / 2)
                          for key, value in latency["p95"].items()}
    verdict, rows = compare(result, faster)
    assert verdict == TOO_NOISY and rows, rows
    assert all("single run" in row["why"] for row in rows), rows


@pytest.mark.timeout(300)
def test_two_identical_processes_side_by_side_report_their_blocks(request, tmp_path,
                                                                  tiny_model_dir):
    """`bench_peers.py identical`: the comparison's method on two equal processes of our
    core, so that a reader can see how far apart equal stacks come out on their machine."""
    code, output = run([sys.executable, "scripts/bench_peers.py", "identical", "--pairs", "2",
                        "--blocks", "2", "--block", "1", "--model-dir", str(tiny_model_dir)],
                       Deadline(timeout_of(request.node) - 30).left(), tmp_path / "same.log",
                       "two identical processes", cwd=REPO)
    assert code == 0, output[-3000:]
    result = json.loads(output.strip().splitlines()[-1])
    assert result["workload"]["width"] == 64 and "seed" not in result["workload"]
    assert len(result["pairs"]) == 2
    for pair in result["pairs"]:
        assert len(pair["a_ms"]) == len(pair["b_ms"]) == len(pair["ratios"]) == 2
        assert all(t > 0 for t in pair["a_ms"] + pair["b_ms"])
        assert pair["ratios"] == [a / b for a, b in zip(pair["a_ms"], pair["b_ms"])]
    assert "pair 2/2: A / B" in output

"""Statistics, the printed table, the plot and the regression check of the benchmark.

Pure functions over the result dictionary that ``bench.py`` measures, so they are tested
without a model or a server.

Example:
    >>> spread([2.0, 1.0, 3.0])
    {'median': 2.0, 'min': 1.0, 'max': 3.0, 'runs': [2.0, 1.0, 3.0]}
    >>> percentile([1.0, 2.0, 3.0, 4.0], 50)
    2.5
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

# The references' regression threshold: p95 may worsen by at most 20 %.
REGRESSION_THRESHOLD = 0.20
# Machine facts that must match for two p95s to be comparable at all.
COMPARABLE_MACHINE_KEYS = ("cpu_model", "usable_cores", "torch", "torch_threads")

OK, REGRESSED, TOO_NOISY, NOT_COMPARABLE = "ok", "REGRESSED", "too noisy to judge", \
    "not comparable"


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile with linear interpolation between ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def spread(runs: Sequence[float]) -> dict[str, Any]:
    """Median of several runs with their range, and the runs themselves."""
    values = [float(v) for v in runs]
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "runs": values}


def relative_spread(stat: dict[str, Any]) -> float:
    """(max - min) / median: how far apart the runs were, as a share of the median."""
    return (stat["max"] - stat["min"]) / stat["median"]


def numbers(value: Any, path: str = "") -> Iterable[tuple[str, Any]]:
    """Every number in a nested result, with its path (for the shape test)."""
    if isinstance(value, bool):
        yield path, value
    elif isinstance(value, (int, float)):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from numbers(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from numbers(item, f"{path}[{index}]")


# --- The regression check. ------------------------------------------------------------------

def compare(result: dict, baseline: dict, threshold: float = REGRESSION_THRESHOLD
            ) -> tuple[str, list[dict[str, Any]]]:
    """Compare every p95 latency the two results share; return (verdict, rows).

    A p95 is judged only when both results have several runs and those agree within
    ``threshold`` (relative spread); otherwise the row says the spread is too large to
    judge, because a 20 % change cannot be told from noise that is itself over 20 %.
    Results from different machines, torch versions, thread counts, modes or workloads are
    not comparable at all.

    Verdict: ``REGRESSED`` if any row regressed, else ``too noisy to judge`` or
    ``not comparable`` if any row could not be judged, else ``ok``.
    """
    rows: list[dict[str, Any]] = []
    mismatched = [key for key in COMPARABLE_MACHINE_KEYS
                  if result.get("machine", {}).get(key) != baseline.get("machine", {}).get(key)]
    for key in ("mode", "workloads"):  # the same scenario name under another plan
        if result.get(key) != baseline.get(key):
            mismatched.append(key)
    now_latency = result.get("detail", {}).get("latency_s", {})
    base_latency = baseline.get("detail", {}).get("latency_s", {})
    shared = [name for name in now_latency if name in base_latency]
    if not shared:
        return NOT_COMPARABLE, [{"scenario": "-", "verdict": NOT_COMPARABLE,
                                 "why": "no scenario in common with the baseline"}]
    for name in shared:
        now, base = now_latency[name]["p95"], base_latency[name]["p95"]
        change = now["median"] / base["median"] - 1.0
        row = {"scenario": name, "baseline_p95_s": base["median"], "p95_s": now["median"],
               "change": change, "spread": relative_spread(now),
               "baseline_spread": relative_spread(base)}
        fewest_runs = min(len(now["runs"]), len(base["runs"]))
        if mismatched:
            row["verdict"] = NOT_COMPARABLE
            row["why"] = "results differ in " + ", ".join(mismatched)
        elif fewest_runs < 2:
            row["verdict"] = TOO_NOISY
            row["why"] = "a single run shows no spread, so noise cannot be told from change"
        elif max(row["spread"], row["baseline_spread"]) > threshold:
            row["verdict"] = TOO_NOISY
            row["why"] = (f"runs spread {row['spread']:.0%} (baseline {row['baseline_spread']:.0%})"
                          f", over the {threshold:.0%} threshold: rerun on a quiet machine")
        elif change > threshold:
            row["verdict"] = REGRESSED
            row["why"] = f"p95 {change:+.0%}, over +{threshold:.0%}"
        else:
            row["verdict"] = OK
            row["why"] = f"p95 {change:+.0%}"
        rows.append(row)
    verdicts = {row["verdict"] for row in rows}
    for verdict in (REGRESSED, NOT_COMPARABLE, TOO_NOISY):
        if verdict in verdicts:
            return verdict, rows
    return OK, rows


def check_exit_code(verdict: str) -> int:
    """0 ok, 1 regressed, 2 could not judge (noise or another machine)."""
    return {OK: 0, REGRESSED: 1}.get(verdict, 2)


def format_check(verdict: str, rows: list[dict[str, Any]]) -> str:
    lines = [f"{'scenario':<22} {'baseline p95':>12} {'p95':>9} {'change':>7}  verdict"]
    for row in rows:
        if "p95_s" in row:
            lines.append(f"{row['scenario']:<22} {row['baseline_p95_s']:>11.3f}s "
                         f"{row['p95_s']:>8.3f}s {row['change']:>+7.0%}  {row['verdict']}: "
                         f"{row['why']}")
        else:
            lines.append(f"{row['scenario']:<22} {row['verdict']}: {row['why']}")
    lines.append(f"bench-check: {verdict}")
    return "\n".join(lines)


def load(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def publish(report: dict, path: Path | None) -> None:
    """Write ``report`` to ``path`` (``--json``) if given, and print it as the last line:
    the one line a caller of a bench script parses."""
    if path:
        path.write_text(json.dumps(report, indent=2))
    print(json.dumps(report))


# --- The readable table. --------------------------------------------------------------------

def _range(stat: dict[str, Any], scale: float = 1.0, digits: int = 3) -> str:
    """'median [min-max]' of a spread, scaled (e.g. s to ms)."""
    return (f"{stat['median'] * scale:.{digits}f} "
            f"[{stat['min'] * scale:.{digits}f}-{stat['max'] * scale:.{digits}f}]")


def format_table(result: dict) -> str:
    """The human-readable report printed before the JSON line."""
    m, d = result["machine"], result["detail"]
    out = [f"sdxl-serve benchmark ({result['mode']}, {result['runs']} run(s); "
           "median [min-max] over runs)",
           f"machine: {m['cpu_model']}, {m['usable_cores']} usable cores, torch {m['torch']} "
           f"({m['torch_threads']} threads), python {m['python']}, torchserve "
           f"{m['torchserve']}, load average at start {m['load_average_start']}", ""]
    for name, workload in result["workloads"].items():
        out.append(f"workload {name}: {workload['width']}x{workload['height']}, "
                   f"{workload['steps']} steps, guidance {workload['guidance_scale']}, "
                   f"{workload['output_format']}")
    out += ["", f"{'scenario':<22} {'path':<25} {'img/s':>22} {'s/img':>22} "
                f"{'p50 s':>22} {'p95 s':>22}"]
    for name, paths in d["scenarios"].items():
        for path, sample in paths.items():
            latency = d["latency_s"].get(name, {}) if path == "torchserve" else {}
            out.append(
                f"{name:<22} {path:<25} {_range(sample['images_per_s'], 1, 2):>22} "
                f"{_range(sample['seconds_per_image']):>22} "
                f"{_range(latency['p50']) if latency else '':>22} "
                f"{_range(latency['p95']) if latency else '':>22}")
    out += ["", "serving overhead (TorchServe end to end / pipeline in process, s per image):"]
    for name, stat in d["serving_overhead"].items():
        out.append(f"  {name:<22} {_range(stat)}")
    out += ["", "paired within each request (one client): end to end / the worker's own pipeline "
                "time from the reply's timings_s, and the difference in ms:"]
    for name, stat in d["serving_overhead_paired"].items():
        out.append(f"  {name:<22} {_range(stat['ratio'])}   {_range(stat['ms'], 1, 1)} ms")
    b = d["overhead_breakdown_ms"]
    large = d["batching"]["large"]
    out += ["", "where a request's time goes (light workload, one client; ms per request):"]
    for label, key in (
            ("pipeline in process", "pipeline"),
            ("service in process: + validation, encoding, base64, JSON", "service"),
            ("TorchServe end to end, JSON reply", "torchserve_json"),
            ("TorchServe end to end, raw PNG reply (Accept: image/png)", "torchserve_raw"),
            (f"TorchServe, alone at a batchSize {large} model (up to maxBatchDelay)",
             "torchserve_lone_in_batch"),
            ("TorchServe round trip of a refused request (no generation)",
             "torchserve_round_trip"),
            ("the same refused request in process", "service_round_trip")):
        out.append(f"  {label:<62} {_range(b[key], 1, 2)}")
    w = d["torchserve_split_ms"]
    out += ["", "inside one TorchServe request (light, one client; ms, means per request, each "
                "run's parts from the same pass):"]
    for label, key in (
            ("end to end, as the client sees it", "end_to_end"),
            ("  HTTP outside TorchServe's job (Netty, auth, client)", "http_outside_the_job"),
            ("  queue, waiting for the worker", "queue"),
            ("  worker round trip less the pipeline (see below)",
             "worker_round_trip_less_pipeline"),
            ("  the pipeline, as the worker timed it", "worker_pipeline"),
            ("a refused request, end to end (new connection each)",
             "refused_end_to_end"),
            ("  HTTP outside TorchServe's job", "refused_http_outside_the_job"),
            ("  queue", "refused_queue"),
            ("  worker round trip", "refused_worker_round_trip")):
        out.append(f"  {label:<62} {_range(w[key], 1, 2)}")
    out.append("  (worker round trip: the socket to the worker and back, TorchServe's Python "
               "worker, our validation, encoding, base64, JSON)")
    out.append("  (TorchServe closes the connection after an error reply, so each refused "
               "request also connects anew)")
    jobs = result.get("job_api")
    if jobs:
        out += ["", f"job API over /predictions ({jobs['requests']} light requests): one client "
                    f"{jobs['one_client_job_ms']:.0f} ms a job against "
                    f"{jobs['one_client_direct_ms']:.0f} ms direct (+{jobs['added_ms_per_job']:.1f}"
                    f" ms, median of paired requests); {jobs['clients']} clients "
                    f"{jobs['jobs_per_s']:.2f} jobs/s against {jobs['predictions_per_s']:.2f} "
                    f"requests/s ({jobs['throughput_ratio']:.2f}x)"]
    peers = result.get("peers")
    if peers:
        ts, lit, r, st = peers["torchserve"], peers["litserve"], peers["ratios"], \
            peers["settings"]

        def noise(key: str) -> str:
            if "pair_ratios" not in peers:  # a result from before 2026-12-01's verdicts
                return ""
            pairs = peers["pair_ratios"][key]
            return f"; pairs {min(pairs):.2f}-{max(pairs):.2f}: {peers['verdicts'][key]}"
        out += ["", f"side by side with LitServe (same pipeline and core, batch "
                    f"{st['batch_size']}, {st['batch_delay_ms']} ms delay; ours / LitServe):",
                f"  lone light request p50     {ts['lone_p50_ms']:7.1f} ms / "
                f"{lit['lone_p50_ms']:7.1f} ms  ({r['lone_p50']:.3f}x{noise('lone_p50')})",
                f"  lone light request p95     {ts['lone_p95_ms']:7.1f} ms / "
                f"{lit['lone_p95_ms']:7.1f} ms",
                f"  {st['clients']} clients, light          {ts['clients_throughput_rps']:7.2f} "
                f"req/s / {lit['clients_throughput_rps']:7.2f} req/s "
                f"({r['clients_throughput']:.3f}x{noise('clients_throughput')})",
                f"  compute-bound p50          {ts['compute_p50_ms']:7.1f} ms / "
                f"{lit['compute_p50_ms']:7.1f} ms  ({r['compute_p50']:.3f}x{noise('compute_p50')})"]
        if peers.get("round_ratios"):  # results from 2026-12-02 on: fresh processes a round
            out.append("  each round, fresh processes (lone p50, 8 clients, compute-bound): "
                       + ", ".join("/".join(f"{one[key]:.2f}" if key in one else "-"
                                            for key in ("lone_p50", "clients_throughput",
                                                        "compute_p50"))
                                   for one in peers["round_ratios"]))
    batching = d["batching"]
    out += ["", f"batching throughput gain (batchSize {batching['large']} vs "
                f"{batching['small']}, {batching['clients']} clients): through TorchServe "
                f"{_range(batching['gain'], 1, 2)}, pipeline in process "
                f"{_range(batching['pipeline_gain'], 1, 2)}"]
    c = d["cold_start_s"]
    out += ["", "cold start (s): " + ", ".join(
        f"{phase} {_range(c[phase], 1, 2)}" for phase in
        ("torchserve_start", "model_load", "warm_up", "first_image", "total"))]
    e = d["encode"]
    out += ["", f"encode {e['width']}x{e['height']} (ms, {e['image']}):"]
    for fmt, stat in e["ms"].items():
        out.append(f"  {fmt:<5} {_range(stat, 1, 1)}  ({e['bytes'][fmt] / 1e3:.0f} kB)")
    batch = e["batch"]
    out.append(f"  batch of {batch['images']} {batch['format']}: sequential "
               f"{_range(batch['sequential_ms'], 1, 1)}, parallel ({batch['threads']} threads) "
               f"{_range(batch['parallel_ms'], 1, 1)}, speedup {_range(batch['speedup'], 1, 2)}")
    out.append("")
    out.append(f"wall time {result['wall_s']:.0f} s; plot: {result['plot']}")
    return "\n".join(out)


# --- The plot. -------------------------------------------------------------------------------

def plot_batch_sweep(result: dict, path: str | Path) -> Path:
    """Throughput and latency against TorchServe's batchSize, with the runs' range."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    batching = result["detail"]["batching"]
    sweep = batching["sweep"]
    sizes = [point["batch_size"] for point in sweep]

    def series(key: str, path_name: str | None = None):
        stats = [point[key] if path_name is None else point[key][path_name] for point in sweep]
        medians = [s["median"] for s in stats]
        errors = [[s["median"] - s["min"] for s in stats], [s["max"] - s["median"] for s in stats]]
        return medians, errors

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for path_name, label in (("torchserve", "TorchServe end to end"),
                             ("pipeline", "pipeline in process")):
        medians, errors = series("images_per_s", path_name)
        left.errorbar(sizes, medians, yerr=errors, marker="o", capsize=3, label=label)
    left.set(xlabel="TorchServe batchSize", ylabel="images / s", title="throughput")
    left.legend()
    for key, label in (("p50_s", "p50"), ("p95_s", "p95")):
        medians, errors = series(key)
        right.errorbar(sizes, medians, yerr=errors, marker="o", capsize=3, label=label)
    right.set(xlabel="TorchServe batchSize", ylabel="seconds",
              title="latency through TorchServe")
    right.legend()
    for axes in (left, right):
        axes.set_xscale("log", base=2)
        axes.minorticks_off()
        axes.set_xticks(sizes, [str(size) for size in sizes])
        axes.set_ylim(bottom=0)
    workload = result["workloads"][batching["workload"]]
    machine = result["machine"]
    figure.suptitle(f"{workload['width']}x{workload['height']}, {workload['steps']} steps, "
                    f"{batching['clients']} clients; {machine['cpu_model']}, "
                    f"{machine['usable_cores']} cores; median and range of "
                    f"{result['runs']} run(s)", fontsize=9)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def not_a_command(doc: str, argv: list[str]) -> int:
    """What a module of bench.py says when run, rather than exit silently: its docstring
    and who runs it; on stdout with exit 0 for --help, else on stderr with exit 2."""
    asked = argv in (["-h"], ["--help"])
    print(f"{doc.strip()}\n\nNot a command: `make bench` (scripts/bench.py) runs this.",
          file=sys.stdout if asked else sys.stderr)
    return 0 if asked else 2


if __name__ == "__main__":
    sys.exit(not_a_command(__doc__, sys.argv[1:]))

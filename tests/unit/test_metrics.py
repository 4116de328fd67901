"""Our metrics: histogram arithmetic, labels, and agreement with config/metrics.yaml."""

from __future__ import annotations

import math
import re
import threading
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from lifetimes import wait_until

from sdxl_serve.metrics import (COUNTER, GAUGE, GENERATION_BUCKETS, OUTCOMES, SPECS, STAGES,
                                DeferredSink, MetricsRecorder, bucket_counts, outcome_of,
                                torchserve_metrics_yaml_section)
from sdxl_serve.service import BatchStats

pytestmark = pytest.mark.unit
METRICS_YAML = Path(__file__).resolve().parents[2] / "config" / "metrics.yaml"
# How TorchServe 0.12's frontend parses a backend metric line (org.pytorch.serve.metrics.Metric).
TORCHSERVE_METRIC_LINE = re.compile(
    r"\s*([\w\s]+)\.([\w\s]+):([0-9\-,.e]+)\|#([^|]*)(\|#type:([^|,]+))?\|#hostname:([^,]+),"
    r"([^,]+)(,(.*))?")


class Recorded:
    """A sink that keeps what was written, as TorchServe's frontend would add it up."""

    def __init__(self):
        self.counters: dict[tuple, float] = {}
        self.gauges: dict[tuple, float] = {}
        self.lines: list[tuple] = []

    def __call__(self, name, kind, value, labels):
        self.lines.append((name, kind, value, labels))
        store = self.counters if kind == "counter" else self.gauges
        if kind == "counter":
            store[(name, labels)] = store.get((name, labels), 0) + value
        else:
            store[(name, labels)] = value


def test_buckets_are_cumulative_with_inf_last():
    assert bucket_counts([0.1, 0.3, 7, 500], (0.25, 1, 10)) == [1, 2, 3, 4]
    assert bucket_counts([], (1, 2)) == [0, 0, 0]


def test_generation_buckets_reach_two_minutes():
    assert max(GENERATION_BUCKETS) >= 120
    assert list(GENERATION_BUCKETS) == sorted(GENERATION_BUCKETS)


@pytest.mark.parametrize("status, outcome", [(200, "ok"), (400, "bad_request"),
                                             (413, "bad_request"), (507, "oom"),
                                             (500, "error"), (503, "error")])
def test_outcome_of_a_status(status, outcome):
    assert outcome_of(status) == outcome


def test_a_batch_is_recorded_as_counts_buckets_and_stages():
    sink = Recorded()
    recorder = MetricsRecorder(sink, "sdxl", "1.0", "9000")
    recorder.declare(["64x64"])
    stats = BatchStats(validate_s=0.002, encode_s=0.03, calls=[(2, 1.5, 0.2), (1, 0.7, 0.1)],
                       images=3, oom_events=1)
    recorder.record_batch([200, 200, 200, 400, 507], stats, seconds=3.0,
                          sizes=["64x64", "other", "64x64", "64x64", "other"])
    model = ("sdxl", "1.0")
    assert sink.counters[("sdxl_requests_total", model + ("ok",))] == 3
    assert sink.counters[("sdxl_requests_total", model + ("bad_request",))] == 1
    assert sink.counters[("sdxl_requests_total", model + ("oom",))] == 1
    assert sink.counters[("sdxl_requests_total", model + ("error",))] == 0  # declared
    assert sink.counters[("sdxl_images_generated_total", model)] == 3
    assert sink.counters[("sdxl_oom_events_total", model)] == 1
    # Three successful requests of 3 s each: in the 5 s bucket and above, not in 2 s; two at
    # the warm-up size, one at another size.
    native, other = model + ("64x64",), model + ("other",)
    assert sink.counters[("sdxl_generation_seconds_bucket", native + ("2.0",))] == 0
    assert sink.counters[("sdxl_generation_seconds_bucket", native + ("5.0",))] == 2
    assert sink.counters[("sdxl_generation_seconds_bucket", native + ("120.0",))] == 2
    assert sink.counters[("sdxl_generation_seconds_bucket", native + ("+Inf",))] == 2
    assert sink.counters[("sdxl_generation_seconds_count", native)] == 2
    assert sink.counters[("sdxl_generation_seconds_sum", native)] == pytest.approx(6.0)
    assert sink.counters[("sdxl_generation_seconds_count", other)] == 1
    assert sink.counters[("sdxl_stage_seconds_count", model + ("denoise",))] == 2
    assert sink.counters[("sdxl_stage_seconds_sum", model + ("denoise",))] == pytest.approx(2.2)
    for stage, seconds in zip(STAGES, (0.002, 2.2, 0.3, 0.03)):  # each its own time
        assert sink.counters[("sdxl_stage_seconds_count", model + (stage,))] >= 1
        assert sink.counters[("sdxl_stage_seconds_sum", model + (stage,))] == \
            pytest.approx(seconds), stage
    assert sink.counters[("sdxl_batch_size_sum", model)] == 3
    assert sink.counters[("sdxl_batch_size_bucket", model + ("1.0",))] == 1


def test_declare_creates_every_series_at_zero():
    sink = Recorded()
    MetricsRecorder(sink, "sdxl", "1.0", "9000").declare()
    assert all(value == 0 for value in sink.counters.values())
    for outcome in OUTCOMES:
        assert ("sdxl_requests_total", ("sdxl", "1.0", outcome)) in sink.counters
    buckets = [labels[-1] for name, labels in sink.counters
               if name == "sdxl_generation_seconds_bucket" and labels[-2] == "other"]
    assert buckets == [repr(float(b)) for b in GENERATION_BUCKETS] + ["+Inf"]


def test_gauges_that_are_absent_stay_unset():
    sink = Recorded()
    MetricsRecorder(sink, "sdxl", "1.0", "9000").record_gauges(
        {"sdxl_worker_requests": 4, "sdxl_gpu_utilization_ratio": None})
    assert sink.gauges == {("sdxl_worker_requests", ("sdxl", "1.0", "9000")): 4}


def test_config_metrics_yaml_declares_exactly_our_series():
    declared = yaml.safe_load(METRICS_YAML.read_text())["model_metrics"]
    for kind, entries in torchserve_metrics_yaml_section().items():
        ours = {entry["name"]: entry for entry in declared.get(kind, [])
                if entry["name"].startswith("sdxl_")}
        assert ours == {entry["name"]: entry for entry in entries}, kind
    names = [entry["name"] for entries in declared.values() for entry in entries]
    assert len(names) == len(set(names))


def test_the_operations_metrics_table_lists_every_series_we_declare():
    """docs/operations.md presents its table as ours, declared in metrics.py: a series
    added there and not to the table was missing from the page operators read."""
    text = (METRICS_YAML.parents[1] / "docs" / "operations.md").read_text()
    table = text.split("| metric | type | labels | meaning |", 1)[1].split("\n\n", 1)[0]
    listed = set()
    for row in table.splitlines()[2:]:
        listed.update(re.findall(r"`(sdxl_\w+)`", row.split("|")[1]))
    assert listed == {spec.name for spec in SPECS}


def test_metric_names_follow_prometheus_conventions():
    for spec in SPECS:
        assert re.fullmatch(r"sdxl_[a-z_]+", spec.name)
        if spec.kind == "counter":
            assert spec.name.endswith("_total")
        if spec.unit == "Seconds":
            assert spec.name.endswith("_seconds")
        if spec.unit == "Bytes":
            assert spec.name.endswith("_bytes")


@given(st.floats(min_value=0, max_value=1e15, allow_nan=False))
def test_every_value_we_write_parses_as_a_torchserve_metric_line(value):
    sink = Recorded()
    MetricsRecorder(sink, "sdxl", "1.0", "9000").observe("sdxl_generation_seconds", [value],
                                                         size="64x64")
    for name, kind, written, labels in sink.lines:
        line = f"[METRICS]{name}.Count:{written}|#model_name:sdxl|#type:COUNTER|#hostname:h,1"
        match = TORCHSERVE_METRIC_LINE.match(line[len("[METRICS]"):])
        assert match, line
        assert math.isclose(float(match.group(3)), float(written))


def test_a_deferred_sink_returns_before_the_write_and_writes_every_update():
    written, writing, release = [], threading.Event(), threading.Event()

    def slow_sink(*update):
        writing.set()
        release.wait(10)
        written.append(update)

    sink = DeferredSink(slow_sink, delay_s=0.0)
    sink("sdxl_batch_size_count", COUNTER, 1, ("a",))
    assert writing.wait(10)  # the thread is inside the sink ...
    started = time.perf_counter()
    sink("sdxl_batch_size_count", COUNTER, 1, ("a",))  # ... and a caller does not wait for it
    assert time.perf_counter() - started < 0.5
    assert not sink.flush(timeout=0.05)  # not written yet: flush says so
    release.set()
    assert sink.flush(timeout=10)
    assert sum(value for _, _, value, _ in written) == 2


def test_a_deferred_sink_sums_counters_keeps_the_last_gauge_and_survives_a_bad_update():
    written, taken, gate = [], threading.Event(), threading.Event()

    def sink_after_gate(name, kind, value, labels):
        taken.set()
        gate.wait(10)
        if name == "broken":
            raise ValueError("no such metric")
        written.append((name, kind, value, labels))

    sink = DeferredSink(sink_after_gate, delay_s=0.0)
    sink("first", GAUGE, 0, ())  # the thread takes this one and waits at the gate
    assert taken.wait(10)
    for value in (0.1, 0.2, 0.3):  # queued meanwhile: one update each below
        sink("sdxl_generation_seconds_sum", COUNTER, value, ("m",))
        sink("sdxl_worker_requests", GAUGE, value, ("m",))
    sink("broken", COUNTER, 1, ())
    sink("sdxl_generation_seconds_count", COUNTER, 0, ("m",))  # a declared zero is written
    gate.set()
    assert sink.flush(timeout=10)
    assert written[1:] == [("sdxl_generation_seconds_sum", COUNTER, 0.6, ("m",)),
                           ("sdxl_worker_requests", GAUGE, 0.3, ("m",)),
                           ("sdxl_generation_seconds_count", COUNTER, 0, ("m",))]


def test_a_deferred_sink_holds_updates_while_a_batch_is_served_and_writes_after_it():
    written = []
    sink = DeferredSink(lambda *update: written.append(update), delay_s=0.05, max_delay_s=60)
    with sink.busy():
        sink("sdxl_requests_total", COUNTER, 1, ("ok",))
        time.sleep(0.3)  # six times delay_s: a sink that ignored busy would have written
        assert written == []
        sink("sdxl_requests_total", COUNTER, 1, ("ok",))
    wait_until(lambda: written, 10, "the write after the batch")
    assert written == [("sdxl_requests_total", COUNTER, 2, ("ok",))]


def test_a_deferred_sink_that_is_never_idle_writes_every_max_delay():
    # One batch after another (a client sending requests back to back): the sink is never
    # idle for delay_s, so the updates go out when the oldest is max_delay_s old.
    written, writes = [], threading.Event()
    sink = DeferredSink(lambda *update: (written.append(update), writes.set()),
                        delay_s=0.05, max_delay_s=0.5)
    started = time.monotonic()
    with sink.busy():
        sink("sdxl_images_generated_total", COUNTER, 1, ())
        assert writes.wait(10)
        waited = time.monotonic() - started
    assert waited >= 0.5 and written == [("sdxl_images_generated_total", COUNTER, 1, ())]


def test_flushing_a_busy_deferred_sink_writes_at_once():
    written = []
    sink = DeferredSink(lambda *update: written.append(update), delay_s=0.05, max_delay_s=60)
    with sink.busy():
        sink("sdxl_worker_requests", GAUGE, 3, ("m",))
        assert sink.flush(timeout=10)
        assert written == [("sdxl_worker_requests", GAUGE, 3, ("m",))]

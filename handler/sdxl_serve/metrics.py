"""The worker's own metrics: names, labels, histogram buckets, and how they are recorded.

They are exported on TorchServe's metrics address next to TorchServe's own, so one scrape
target has everything. TorchServe 0.12 exports a backend metric on ``/metrics`` only when
``config/metrics.yaml`` declares it, and its Prometheus histograms use the Java client's
default buckets (5 ms to 10 s), which cannot express a 60 s SDXL generation. So each
histogram here is written the way Prometheus itself stores one: cumulative ``_bucket``
counters with an ``le`` label, plus ``_sum`` and ``_count`` counters. ``histogram_quantile``
works on those series as on any native histogram; only the ``# TYPE`` line says counter.

This module does not know TorchServe: ``MetricsRecorder`` writes to a ``sink`` function
(the adapter passes one that feeds TorchServe's metrics cache), so the arithmetic is tested
on its own.

Example:
    >>> seen = []
    >>> recorder = MetricsRecorder(lambda *m: seen.append(m), "sdxl", "1.0", "9000")
    >>> recorder.observe("sdxl_batch_size", [3])
    >>> {labels[-1]: value for name, kind, value, labels in seen if name.endswith("_bucket")}
    ... # doctest: +NORMALIZE_WHITESPACE
    {'1.0': 0, '2.0': 0, '3.0': 1, '4.0': 1, '6.0': 1, '8.0': 1, '12.0': 1, '16.0': 1,
     '+Inf': 1}
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

from sdxl_serve.circuit import STATES as CIRCUIT_STATES

log = logging.getLogger(__name__)

COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"
MODEL_LABELS = ("model_name", "model_version")
WORKER_LABELS = MODEL_LABELS + ("worker",)
OUTCOMES = ("ok", "bad_request", "oom", "error")
# The size label of a request at none of the warm-up sizes: one series for all of them, so
# clients choosing sizes cannot multiply the series Prometheus stores.
OTHER_SIZE = "other"
STAGES = ("validate", "denoise", "decode", "encode")

# Seconds. Reaches 120 s so a p99 of a slow GPU or a big batch stays measurable.
GENERATION_BUCKETS = (0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 90, 120)
# Stages run from milliseconds (validation) to a minute (denoising a big batch).
STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)
BATCH_SIZE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16)


@dataclass(frozen=True)
class MetricSpec:
    """One metric as Prometheus shows it."""

    name: str
    kind: str
    unit: str
    help: str
    labels: tuple[str, ...] = MODEL_LABELS
    buckets: tuple[float, ...] = ()

    def series(self) -> list[tuple[str, str, str, tuple[str, ...]]]:
        """The (name, TorchServe type, unit, label names) TorchServe must declare for it."""
        if self.kind != HISTOGRAM:
            return [(self.name, self.kind, self.unit, self.labels)]
        return [(self.name + "_bucket", COUNTER, "Count", self.labels + ("le",)),
                (self.name + "_sum", COUNTER, self.unit, self.labels),
                (self.name + "_count", COUNTER, "Count", self.labels)]


SPECS = (
    MetricSpec("sdxl_requests_total", COUNTER, "Count",
               "Generation requests answered, by outcome: ok, bad_request (4xx), oom (507), "
               "error (5xx)", MODEL_LABELS + ("outcome",)),
    MetricSpec("sdxl_images_generated_total", COUNTER, "Count", "Images generated and returned"),
    MetricSpec("sdxl_generation_seconds", HISTOGRAM, "Seconds",
               "Seconds from the worker receiving a request to its reply being ready, for "
               "successful requests (queue wait not included: see ts_queue_latency), by "
               "image size: a warm-up size (WIDTHxHEIGHT) or other",
               MODEL_LABELS + ("size",), GENERATION_BUCKETS),
    MetricSpec("sdxl_stage_seconds", HISTOGRAM, "Seconds",
               "Seconds per stage: validate and encode per batch, denoise and decode per "
               "pipeline call", MODEL_LABELS + ("stage",), STAGE_BUCKETS),
    MetricSpec("sdxl_batch_size", HISTOGRAM, "Count", "Requests per pipeline call",
               buckets=BATCH_SIZE_BUCKETS),
    MetricSpec("sdxl_oom_events_total", COUNTER, "Count",
               "CUDA out-of-memory errors caught (each splits a batch or refuses one image)"),
    MetricSpec("sdxl_gpu_memory_allocated_bytes", GAUGE, "Bytes",
               "GPU memory held by tensors of the engine process (torch.cuda)", WORKER_LABELS),
    MetricSpec("sdxl_gpu_memory_reserved_bytes", GAUGE, "Bytes",
               "GPU memory reserved by the engine process's caching allocator", WORKER_LABELS),
    MetricSpec("sdxl_gpu_memory_total_bytes", GAUGE, "Bytes", "GPU memory of the device",
               WORKER_LABELS),
    MetricSpec("sdxl_gpu_utilization_ratio", GAUGE, "Ratio",
               "GPU busy fraction over NVML's last sample period, 0 to 1", WORKER_LABELS),
    MetricSpec("sdxl_compile_recompilations", GAUGE, "Count",
               "torch.compile recompilations of the UNet in the current engine process since "
               "its warm-up sealed the shape buckets: 0 at steady state (each one was refused "
               "and ran eager); absent when compile is off", WORKER_LABELS),
    MetricSpec("sdxl_compile_eager_calls", GAUGE, "Count",
               "UNet calls of the current engine process since warm-up that matched no "
               "compiled shape bucket and ran eager; absent when compile is off",
               WORKER_LABELS),
    MetricSpec("sdxl_worker_requests", GAUGE, "Count",
               "Requests served by the current engine process (it is replaced at its budget)",
               WORKER_LABELS),
    MetricSpec("sdxl_worker_age_seconds", GAUGE, "Seconds",
               "Age of the current engine process", WORKER_LABELS),
    MetricSpec("sdxl_queue_pending_requests", GAUGE, "Count",
               "Requests waiting in TorchServe's queue for this model version (management "
               "API describe, jobQueueStatus.pendingRequests)"),
    MetricSpec("sdxl_circuit_state", GAUGE, "Count",
               "The circuit breaker around the engine: 0 closed (serving), 1 half-open (one "
               "deep health check decides), 2 open (requests get 503 at once)", WORKER_LABELS),
    MetricSpec("sdxl_circuit_transitions_total", COUNTER, "Count",
               "Circuit breaker changes, by the state entered: open, half_open, closed",
               WORKER_LABELS + ("state",)),
)
SPEC_BY_NAME = {spec.name: spec for spec in SPECS}

Sink = Callable[[str, str, float, tuple[str, ...]], None]
"""Receives (series name, "counter" or "gauge", value, label values in declared order).
A counter value is an increment, a gauge value the new level."""


def size_label(size: str, known: Sequence[str]) -> str:
    """``WIDTHxHEIGHT`` for a warm-up size, else ``other``.

    Example:
        >>> size_label("1024x1024", ["1024x1024"]), size_label("640x480", ["1024x1024"])
        ('1024x1024', 'other')
    """
    return size if size in known else OTHER_SIZE


def outcome_of(status: int) -> str:
    """The ``outcome`` label of a reply status."""
    if status < 400:
        return "ok"
    if status == 507:
        return "oom"
    if status < 500:
        return "bad_request"
    return "error"


def bucket_counts(values: Iterable[float], buckets: Sequence[float]) -> list[int]:
    """Cumulative counts per upper bound, ``+Inf`` last: what Prometheus' ``_bucket`` holds.

    Example:
        >>> bucket_counts([0.3, 4, 200], (1, 5))
        [1, 2, 3]
    """
    values = list(values)
    return [sum(1 for v in values if v <= bound) for bound in buckets] + [len(values)]


def bound_label(bound: float) -> str:
    """``le`` as Prometheus' own clients write it: ``1.0``, ``0.25``, ``+Inf``."""
    return "+Inf" if math.isinf(bound) else repr(float(bound))


class MetricsRecorder:
    """Turns measurements into increments and levels of the metrics in ``SPECS``."""

    def __init__(self, sink: Sink, model_name: str, model_version: str, worker: str):
        self.sink = sink
        self.labels = {"model_name": model_name, "model_version": model_version,
                       "worker": worker}

    def serving(self):
        """The context of a batch being served: a deferring sink holds its writes until the
        batch is over (``DeferredSink.busy``); any other sink writes at once."""
        busy = getattr(self.sink, "busy", None)
        return busy() if busy is not None else contextlib.nullcontext()

    def _values(self, spec: MetricSpec, extra: Mapping[str, str]) -> tuple[str, ...]:
        merged = {**self.labels, **extra}
        return tuple(str(merged[name]) for name in spec.labels)

    def count(self, name: str, increment: float = 1, **labels: str) -> None:
        spec = SPEC_BY_NAME[name]
        self.sink(name, COUNTER, _number(increment), self._values(spec, labels))

    def gauge(self, name: str, value: float, **labels: str) -> None:
        spec = SPEC_BY_NAME[name]
        self.sink(name, GAUGE, _number(value), self._values(spec, labels))

    def observe(self, name: str, values: Sequence[float], **labels: str) -> None:
        """Add observations to a histogram: one increment per bucket, sum and count."""
        spec = SPEC_BY_NAME[name]
        base = self._values(spec, labels)
        bounds = list(spec.buckets) + [math.inf]
        for bound, count in zip(bounds, bucket_counts(values, spec.buckets)):
            self.sink(name + "_bucket", COUNTER, count, base + (bound_label(bound),))
        self.sink(name + "_sum", COUNTER, _number(sum(values)), base)
        self.sink(name + "_count", COUNTER, len(values), base)

    def declare(self, sizes: Sequence[str] = ()) -> None:
        """Create every counter series at zero, so rates and quantiles work from the start
        (a missing bucket would make ``histogram_quantile`` interpolate wrongly).

        ``sizes``: the size labels of ``sdxl_generation_seconds`` (the warm-up sizes), to
        which ``other`` is added."""
        for outcome in OUTCOMES:
            self.count("sdxl_requests_total", 0, outcome=outcome)
        self.count("sdxl_images_generated_total", 0)
        self.count("sdxl_oom_events_total", 0)
        for size in (*sizes, OTHER_SIZE):
            self.observe("sdxl_generation_seconds", [], size=size)
        for stage in STAGES:
            self.observe("sdxl_stage_seconds", [], stage=stage)
        self.observe("sdxl_batch_size", [])
        for state in CIRCUIT_STATES:
            self.count("sdxl_circuit_transitions_total", 0, state=state)

    def record_batch(self, statuses: Sequence[int], stats, seconds: float,
                     sizes: Sequence[str] | None = None) -> None:
        """Record one served batch.

        Args:
            statuses: the HTTP status of each generation request of the batch.
            stats: its ``service.BatchStats`` (None when the engine process died).
            seconds: from the worker receiving the batch to the replies being ready.
            sizes: each request's size label (``size_label``); ``other`` when not given.
        """
        outcomes = [outcome_of(status) for status in statuses]
        for outcome in OUTCOMES:
            if outcome in outcomes:
                self.count("sdxl_requests_total", outcomes.count(outcome), outcome=outcome)
        sizes = sizes or [OTHER_SIZE] * len(outcomes)
        ok_sizes = [size for outcome, size in zip(outcomes, sizes) if outcome == "ok"]
        for size in sorted(set(ok_sizes)):
            self.observe("sdxl_generation_seconds", [seconds] * ok_sizes.count(size),
                         size=size)
        if stats is None:
            return
        if stats.images:
            self.count("sdxl_images_generated_total", stats.images)
        if stats.oom_events:
            self.count("sdxl_oom_events_total", stats.oom_events)
        self.observe("sdxl_stage_seconds", [stats.validate_s], stage="validate")
        if stats.calls:
            self.observe("sdxl_stage_seconds", [c[1] for c in stats.calls], stage="denoise")
            self.observe("sdxl_stage_seconds", [c[2] for c in stats.calls], stage="decode")
            self.observe("sdxl_batch_size", [c[0] for c in stats.calls])
        if stats.images:
            self.observe("sdxl_stage_seconds", [stats.encode_s], stage="encode")

    def record_gauges(self, values: Mapping[str, float]) -> None:
        """Set gauges by name; a name that is absent (no GPU, no NVML) is left unset."""
        for name, value in values.items():
            if value is not None:
                self.gauge(name, value)


def scraped_max(metrics_text: str, name: str, model: str, version: str | None,
                workers: Iterable[str] | None = None) -> float | None:
    r"""The highest value of series ``name`` of ``model`` at ``version`` (any, when None) in
    Prometheus text as TorchServe's or Triton's ``/metrics`` serves it (one series per
    worker), of ``workers`` (ids) only when given; None when there is none.

    Example:
        >>> text = ('sdxl_circuit_state{model_name="sdxl",model_version="1.0",'
        ...         'worker="9000",Hostname="h",} 2.0\n')
        >>> scraped_max(text, "sdxl_circuit_state", "sdxl", "1.0")
        2.0
        >>> scraped_max(text, "sdxl_circuit_state", "sdxl", "0.9") is None
        True
    """
    found = None
    wanted = (f'model_name="{model}"',) + ((f'model_version="{version}"',) if version else ())
    of_workers = None if workers is None else {f'worker="{worker}"' for worker in workers}
    for line in metrics_text.splitlines():
        if line.startswith(name + "{"):
            labels, _, value = line.rpartition("}")
            if all(label in labels for label in wanted) and (
                    of_workers is None or any(label in labels for label in of_workers)):
                found = max(found if found is not None else -math.inf, float(value))
    return found


class DeferredSink:
    """A sink that returns at once and hands the updates to ``sink`` from a thread, at a
    moment when no batch is being served.

    A served batch records about 95 series (each histogram bucket is a series). Written by
    the worker, they cost it about 4 ms of Python (TorchServe's metrics cache formats and
    prints one line per series) and the frontend about 2 ms of parsing as many lines,
    measured on our 2-core machines: CPU taken from the pipeline when it overlaps a batch.
    So updates wait while a batch is served (``busy``) and are written ``delay_s`` after
    the last batch ended; a worker that is never idle that long (a client sending one
    request after another) writes them every ``max_delay_s``. Meanwhile counter increments
    to one series are summed into one update and a gauge keeps its last value, so one line
    per series carries all the batches of the wait. A scrape sees them that much later.
    """

    def __init__(self, sink: "Sink", delay_s: float = 0.1, max_delay_s: float = 5.0,
                 name: str = "sdxl-metrics"):
        self.sink, self.delay_s, self.max_delay_s = sink, delay_s, max(delay_s, max_delay_s)
        self._pending: dict[tuple[str, str, tuple[str, ...]], float] = {}
        self._first_at = 0.0  # time.monotonic() of the oldest pending update
        self._busy = 0  # batches being served (``busy``)
        self._idle_at = 0.0  # when the last one ended
        self._flushing = 0  # callers of ``flush`` waiting: write at once
        self._writing = False
        self._changed = threading.Condition()
        threading.Thread(target=self._write_forever, name=name, daemon=True).start()

    def __call__(self, name: str, kind: str, value: float, labels: tuple[str, ...]) -> None:
        key = (name, kind, labels)
        with self._changed:
            if not self._pending:  # the writer only needs to hear of the first one
                self._first_at = time.monotonic()
                self._changed.notify_all()
            if kind == COUNTER and key in self._pending:
                self._pending[key] += value
            else:
                self._pending[key] = value

    @contextlib.contextmanager
    def busy(self):
        """Hold the writes while the block runs (a batch being served)."""
        with self._changed:
            self._busy += 1
        try:
            yield
        finally:
            with self._changed:
                self._busy -= 1
                self._idle_at = time.monotonic()
                self._changed.notify_all()

    def flush(self, timeout: float = 10.0) -> bool:
        """Write every update so far to ``sink`` now, busy or not; False after ``timeout``."""
        with self._changed:
            self._flushing += 1
            self._changed.notify_all()
            try:
                return self._changed.wait_for(lambda: not self._pending and not self._writing,
                                              timeout)
            finally:
                self._flushing -= 1

    def _wait_s(self) -> float:
        """Seconds until the pending updates are due (0 or less: now)."""
        now = time.monotonic()
        if self._flushing:
            return 0.0
        by_age = self._first_at + self.max_delay_s - now
        if self._busy:
            return by_age
        # The reply leaves first: updates made during a batch wait for its end.
        return min(by_age, max(self._first_at, self._idle_at) + self.delay_s - now)

    def _write_forever(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._pending)
                while (wait := self._wait_s()) > 0:
                    self._changed.wait(wait)
                pending, self._pending, self._writing = self._pending, {}, True
            try:
                for (name, kind, labels), value in pending.items():
                    try:
                        self.sink(name, kind, _number(value), labels)
                    except Exception:  # noqa: BLE001 - a bad update must not stop the rest
                        log.exception("metric %s could not be written", name)
            finally:
                with self._changed:
                    self._writing = False
                    self._changed.notify_all()


def _number(value: float) -> float | int:
    """Values TorchServe's metric line parser accepts: no exponent with a '+' sign."""
    if isinstance(value, int) or float(value).is_integer() and abs(value) < 2**53:
        return int(value)
    return round(float(value), 6)


def torchserve_metrics_yaml_section() -> dict[str, list[dict]]:
    """The ``model_metrics`` entries config/metrics.yaml must hold for ``SPECS``."""
    section: dict[str, list[dict]] = {COUNTER: [], GAUGE: []}
    for spec in SPECS:
        for name, kind, unit, labels in spec.series():
            section[kind].append({"name": name, "unit": unit, "dimensions": list(labels)})
    return section

"""Loss-free worker recycling, deep health and the gauges, around an engine process.

Why this design (read from TorchServe 0.12's source): TorchServe has no "restart a worker
every N requests". A backend process that exits while the frontend's WorkerThread has a
batch in flight fails that batch with 500 "Worker died."; between two batches the
WorkerThread polls the queue and writes the next batch to the socket at once, so even a
backend that exits right after answering races with the next batch under load. Scaling
workers down through the management API kills busy workers too (their requests get 500
"Worker died.", or no answer at all: docs/rollouts.md).

So TorchServe's worker process is never ended by us. It keeps the frontend's connection
and forwards each batch to an engine process (``engine_process``) that holds the
pipeline. Between two batches, and only then, the worker replaces an engine process that
has used its budget (``max_requests_per_worker`` requests or ``max_worker_age_s`` seconds,
each drawn up to ``recycle_jitter`` lower per process): the old one exits, giving all its
memory back, and a fresh interpreter loads and warms up the model. A batch that arrives
meanwhile waits in TorchServe's queue or in this worker; nothing fails. A batch larger than
the budget left is split across the two processes, so no process serves more than its
budget.

What a fresh process does not fix (a broken driver, a bad model file, a full disk) the
circuit breaker (``circuit``) handles: failures confirmed by a deep health check open it,
requests then get 503 at once and readiness fails until a check passes (docs/circuit-breaker.md).

An engine process that dies in the middle of a batch loses no request: the batch runs
again once, unchanged, on a fresh engine process (generation is deterministic per seed, so
the images are the same bytes); a request that kills the engine each time fails alone
(``_serve_chunk``). A batch sent to an engine process that hangs or dies writing the
previous batch's profile, before it took the batch, runs on a fresh one as if sent now.

Example:
    service = RecyclingService(EngineSpec("build/tiny-sdxl", {"device": "cpu"}), settings)
    service.start()
    replies = service.handle([Incoming(b'{"prompt": "x"}')])
    service.close()
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from sdxl_serve.circuit import CLOSED, HALF_OPEN, CircuitBreaker
from sdxl_serve.contract import CIRCUIT_OPEN, ModelLimits, RequestError
from sdxl_serve.engine_process import (EngineDied, EngineLostBeforeTaking, EngineProcess,
                                       EngineProcessError, EngineSpec)
from sdxl_serve.health import HealthResult, health_reply_body
from sdxl_serve.metrics import MetricsRecorder, size_label
from sdxl_serve.service import (JSON_TYPE, BatchStats, EngineCrashed, Incoming, ProgressSink,
                                Reply, error_replies, error_reply, parse_incoming,
                                refused_field)
from sdxl_serve.settings import Settings

log = logging.getLogger(__name__)


def engine_failure(status: int) -> bool:
    """A reply status that may be the engine's fault: a server error, but not 507 (one image
    too large for GPU memory is the request's size, not a broken engine)."""
    return status >= 500 and status != 507


@dataclass
class WorkerBudget:
    """How much one engine process may serve before it is replaced.

    Example:
        >>> budget = WorkerBudget(max_requests=5, max_age_s=60.0, started_at=0.0)
        >>> budget.served = 5
        >>> budget.remaining, budget.exhausted(now=1.0)
        (0, True)
    """

    max_requests: int
    max_age_s: float
    started_at: float
    served: int = 0

    @classmethod
    def draw(cls, settings: Settings, rng: random.Random, now: float) -> "WorkerBudget":
        """Budgets drawn up to ``recycle_jitter`` below the settings, never above: the
        settings stay hard limits, and workers started together do not end together."""
        jitter = settings.recycle_jitter
        requests = settings.max_requests_per_worker
        return cls(max_requests=requests - rng.randint(0, int(requests * jitter)),
                   max_age_s=settings.max_worker_age_s * (1 - rng.uniform(0, jitter)),
                   started_at=now)

    @property
    def remaining(self) -> int:
        return max(0, self.max_requests - self.served)

    def age(self, now: float) -> float:
        return now - self.started_at

    def exhausted(self, now: float) -> bool:
        return self.remaining == 0 or self.age(now) >= self.max_age_s


def request_ids(items: Sequence[Incoming], chunk: Sequence[int]) -> str:
    """The request ids of ``items[chunk]`` for a log line: how a request is followed from
    TorchServe's lines (and its client's reply) to the worker's."""
    return ", ".join(items[index].request_id for index in chunk)


class ForwardOnly:
    """``progress`` for one batch, passing each request's step events only forward.

    A request can run more than once within its batch (its engine process died, a request
    of its batch failed it, an out-of-memory split): each run counts its steps from 1 again.
    A client that saw step 3 then sees nothing until the run again passes it. Its
    ``elapsed_s`` counts on from the first run's start: a fresh engine process counts from
    when it took the batch again, which left out the dead run and the restart (seconds) and
    could send a smaller ``elapsed_s`` after a larger one. A run is placed by when the worker
    sent it to an engine process (``run_starts``), not by its events: a request whose engine
    died before its first step (in an earlier call of its batch) had sent none.

    Example:
        >>> seen = []
        >>> sink = ForwardOnly(lambda index, event: seen.append(event["step"]))
        >>> for step in (1, 2, 3, 1, 2, 3, 4):
        ...     sink(0, {"step": step, "total": 4})
        >>> seen
        [1, 2, 3, 4]
    """

    def __init__(self, progress: ProgressSink, clock: Callable[[], float] = time.perf_counter):
        self.progress = progress
        self.clock = clock
        self._reached: dict[int, int] = {}
        self._first_sent: dict[int, float] = {}  # on ``clock``
        self._late_by: dict[int, float] = {}  # this run's start after the first run's

    def run_starts(self, indexes: Sequence[int]) -> None:
        """``indexes`` are sent to an engine process now, which counts ``elapsed_s`` from
        when it takes them."""
        now = self.clock()
        for index in indexes:
            self._late_by[index] = now - self._first_sent.setdefault(index, now)

    def __call__(self, index: int, event: dict) -> None:
        step = event.get("step")
        if isinstance(step, int):
            if step <= self._reached.get(index, 0):
                return
            self._reached[index] = step
        late_by, elapsed = self._late_by.get(index), event.get("elapsed_s")
        if late_by and isinstance(elapsed, (int, float)):
            event = {**event, "elapsed_s": round(elapsed + late_by, 4)}
        self.progress(index, event)


class RecyclingService:
    """Serves batches through an engine process it replaces at its budget.

    ``handle`` has the interface of ``GenerationService.handle``. One lock serialises the
    engine process between TorchServe's batches and the upkeep thread (replacement when idle,
    health checks, gauges).
    """

    def __init__(self, spec: EngineSpec, settings: Settings,
                 metrics: MetricsRecorder | None = None,
                 queue_depth: Callable[[], int | None] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None):
        self.spec = spec
        self.settings = settings
        self.metrics = metrics
        self.queue_depth = queue_depth
        self.clock = clock
        self.rng = rng or random.Random()
        self.engine: EngineProcess | None = None
        self.budget: WorkerBudget | None = None
        self.health_result: HealthResult | None = None
        self.limits: ModelLimits | None = None  # as the engine processes publish them
        self.engines_started = 0
        self.size_labels: list[str] = []
        self._replace_engine = False  # a CUDA error may have poisoned the process
        self.breaker = CircuitBreaker(settings.circuit_failure_threshold,
                                      settings.circuit_cooldown_s, clock, self._circuit_moved)
        self._since_profile = 0  # requests run since the last profiled pipeline call
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._upkeep: threading.Thread | None = None

    # --- Lifecycle. ---------------------------------------------------------------------
    def start(self) -> dict:
        """Start the first engine process; returns once it has warmed up every bucket."""
        with self._lock:
            return self._start_engine()

    def start_upkeep(self) -> None:
        """Run recycling-when-idle, health refresh and gauges on a background thread.

        The thread lives as long as the worker: engine processes it starts die with the
        thread that started them (PR_SET_PDEATHSIG follows the starting thread).
        """
        if self.metrics is not None:
            self.metrics.declare(self.size_labels)
        self._upkeep = threading.Thread(target=self._upkeep_loop, name="sdxl-upkeep",
                                        daemon=True)
        self._upkeep.start()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._upkeep is not None:
            self._upkeep.join(timeout=30)
        with self._lock:
            self._stop_engine()

    # --- Serving. -----------------------------------------------------------------------
    def handle(self, items: Sequence[Incoming], progress: ProgressSink | None = None
               ) -> list[Reply]:
        """One reply per item; generation requests go to the engine process within its
        budget, deep health requests (``Incoming.health``) get the latest check."""
        serving = self.metrics.serving() if self.metrics is not None else \
            contextlib.nullcontext()
        with serving:
            return self._handle(items, progress and ForwardOnly(progress))

    def record_refused(self, statuses: Sequence[int]) -> None:
        """Count requests an adapter answered before they reached ``handle`` (a request
        Triton's tensors carried that is no request body: bad UTF-8, a misspelt
        parameter), by status, as ``handle`` counts its own refusals."""
        if statuses:
            self._record(list(statuses), None, self.clock())

    def _handle(self, items: Sequence[Incoming], progress: ForwardOnly | None
                ) -> list[Reply]:
        started = self.clock()
        replies: list[Reply | None] = [None] * len(items)
        work = [index for index, item in enumerate(items) if not item.health]
        # Bad input is the client's 400 in every state of the engine: checked here too,
        # with the limits its engine processes publish (17 us a request), it got the open
        # circuit's 503, or a 500 while no engine process could start. The engine checks
        # again what it is sent.
        if work and self.limits is not None:
            work = self._refuse_invalid(items, work, replies, started)
        generation = list(work)
        with self._lock:
            # 0. An open circuit answers at once; after its cool-down, one check decides.
            self._trial_if_due()
            if work and not self.breaker.allows_requests():
                for index in work:
                    replies[index] = self._circuit_reply(items[index].request_id)
                self._record([replies[i].status for i in work], None, started)
                work = []
            while work:
                # 1. A fresh engine process when the current one has used its budget.
                try:
                    engine = self._engine_with_budget()
                except EngineProcessError as exc:
                    failed = error_replies(exc, [items[index].request_id for index in work])
                    for index, reply in zip(work, failed):
                        replies[index] = reply
                    self._record([replies[i].status for i in work], None, started)
                    break
                # 2. As many requests as the budget allows, in one engine call.
                chunk, work = work[:self.budget.remaining], work[self.budget.remaining:]
                chunk_replies, stats = self._serve_chunk(engine, items, chunk, progress)
                # After an engine death the chunk may have been cut to a fresh engine
                # process's budget: the rest goes to the next one, first. So do requests
                # that a CUDA error of another call left unrun (the engine is replaced),
                # and all of it when the engine hung or died in a profile's write before
                # taking it.
                chunk, work = chunk[:len(chunk_replies)], chunk[len(chunk_replies):] + work
                not_run = sorted(chunk[position] for position in (stats.not_run if stats else ()))
                if not_run:
                    log.warning("%d request(s) of the batch did not run before its engine "
                                "broke (%s); running them on a fresh engine process",
                                len(not_run), request_ids(items, not_run))
                    work = not_run + work
                answered = [(index, reply) for index, reply in zip(chunk, chunk_replies)
                            if index not in not_run]
                for index, reply in answered:
                    replies[index] = reply
                self._record([reply.status for _, reply in answered], stats, started,
                             [reply.headers.get("X-Image-Size", "") for _, reply in answered])
            # 3. A failure on our side: the engine's, or this request's? A real generation
            # (the deep check) decides; only the engine's count towards opening the circuit.
            if self.breaker.allows_requests() and generation:
                if any(engine_failure(replies[i].status) for i in generation):
                    self._fresh_health(force=True, after_failure=True)
                elif any(replies[i].status == 200 for i in generation):
                    self.breaker.record(healthy=True)
            # 4. Deep health requests.
            for index, item in enumerate(items):
                if item.health:
                    replies[index] = self._health_reply(item.request_id)
            if self._due_for_replacement():
                self._wake.set()  # replace it now, before the next batch needs it
        if self.metrics is not None:
            self._record_worker_gauges()
        return replies  # type: ignore[return-value]

    def _refuse_invalid(self, items: Sequence[Incoming], work: list[int],
                        replies: list[Reply | None], started: float) -> list[int]:
        """``work`` less the requests refused by the contract, each answered in
        ``replies`` with its 400 (as ``GenerationService`` answers it) and counted."""
        valid, refused = [], []
        for index in work:
            request_id = items[index].request_id
            try:
                parse_incoming(items[index], self.limits)
            except RequestError as exc:
                log.info("request %s refused: %s", request_id, refused_field(exc.field))
                replies[index] = error_reply(exc, request_id)
                refused.append(replies[index].status)
            except Exception:  # noqa: BLE001 - a bug of ours in validation: the engine's
                valid.append(index)  # check meets it too and fails this request alone
            else:
                valid.append(index)
        if refused:
            self._record(refused, None, started)
        return valid

    def _serve_chunk(self, engine: EngineProcess, items: Sequence[Incoming],
                     chunk: list[int], progress: ForwardOnly | None):
        """Serve ``chunk`` on ``engine``, losing no request to an engine process that dies.

        Generation is deterministic per seed, so a chunk whose engine process dies under it
        (the kernel's OOM killer, a crash in a CUDA kernel, a SIGKILL) runs again once, as
        the same batch, on a fresh engine process: the same images, byte for byte. Should
        that one die too, a request of the chunk kills engines: each request then runs
        alone, and one that kills its engine again (a poison request) alone gets an error.

        Returns replies for a prefix of ``chunk``, all of it unless an engine died: the
        fresh engine process's budget (drawn anew, so it may be smaller) then bounds the
        rerun, and the caller serves the rest on the next engine process. None of it when
        the engine hung or died writing the previous batch's profile before it took the
        chunk: the caller serves all of it on a fresh engine process, its first run.
        """
        try:
            return self._serve_on(engine, items, chunk, progress)
        except EngineLostBeforeTaking as exc:  # before ``EngineDied``: no death of the chunk
            self._log_not_taken(exc, items, chunk)
            return [], None
        except EngineDied as exc:
            log.error("%s under %d request(s) (%s); running them again on a fresh engine "
                      "process", exc, len(chunk), request_ids(items, chunk))
        except EngineProcessError as exc:
            return error_replies(exc, [items[i].request_id for i in chunk]), None
        # A fresh engine process that dies while it loads or warms up never ran the chunk:
        # that is the engine's failure, not the requests' (not a poison request).
        try:
            engine = self._engine_with_budget()
        except EngineProcessError as exc:  # no fresh engine process: nothing to run on
            return error_replies(exc, [items[i].request_id for i in chunk]), None
        chunk = chunk[:self.budget.remaining]  # the budgets are hard limits, reruns included
        try:
            return self._serve_on(engine, items, chunk, progress)
        except EngineDied as exc:
            log.error("%s under the same %d request(s) again (%s)", exc, len(chunk),
                      request_ids(items, chunk))
        except EngineProcessError as exc:
            return error_replies(exc, [items[i].request_id for i in chunk]), None
        if len(chunk) == 1:
            return [error_reply(EngineCrashed(2), items[chunk[0]].request_id)], None
        replies, stats = [], BatchStats()
        for position, index in enumerate(chunk):
            part = reply = None
            # Twice at most: the engine may hang or die in the write of the request before's
            # profile, not taking this one; a fresh engine process has no profile to write.
            while reply is None:
                try:
                    engine = self._engine_with_budget()
                except EngineProcessError as exc:
                    # No engine to run on: the rest fail with this request, where each
                    # waited for a start of its own (up to engine_start_s each, past
                    # TorchServe's response timeout for a batch of 4 that hang), as a
                    # batch's start failure fails the batch (``_handle``).
                    rest = chunk[position:]
                    return replies + error_replies(exc, [items[i].request_id
                                                         for i in rest]), stats
                try:
                    [reply], part = self._serve_on(engine, items, [index], progress)
                except EngineLostBeforeTaking as exc:
                    self._log_not_taken(exc, items, [index])
                except EngineDied:
                    reply = error_reply(EngineCrashed(3), items[index].request_id)
                except EngineProcessError as exc:
                    reply = error_reply(exc, items[index].request_id)
            replies.append(reply)
            stats.add(part)
        return replies, stats

    @staticmethod
    def _log_not_taken(exc: EngineLostBeforeTaking, items: Sequence[Incoming],
                       chunk: list[int]) -> None:
        log.warning("%s before it took %d request(s) (%s); running them on a fresh engine "
                    "process", exc.lost, len(chunk), request_ids(items, chunk))

    def _serve_on(self, engine: EngineProcess, items: Sequence[Incoming],
                  chunk: list[int], progress: ForwardOnly | None):
        """One engine call for ``chunk``; raises ``EngineProcessError`` when it dies."""
        def relay(position: int, event: dict) -> None:
            if progress is not None:
                progress(chunk[position], event)

        self.budget.served += len(chunk)
        if progress is not None:
            progress.run_starts(chunk)
        try:
            replies, stats, gauges = engine.serve([items[i] for i in chunk], relay,
                                                  self._profile_due(len(chunk)))
        except EngineProcessError:
            self._replace_engine = True
            raise
        # Counted up front so no call exceeds the budget; a refusal costs the engine no
        # pipeline work, and counted, cheap 400s would replace engines (a model load each).
        not_generated = stats.refused + len(stats.not_run)
        self.budget.served -= not_generated
        self._count_for_profile(len(chunk) - not_generated)
        if stats.engine_broken:
            log.error("engine process %d hit a CUDA error; replacing it", engine.pid)
            self._replace_engine = True
        if self.metrics is not None:
            self.metrics.record_gauges(gauges)
        return replies, stats

    def _record(self, statuses: list[int], stats, started: float,
                sizes: list[str] | None = None) -> None:
        if self.metrics is not None:
            labels = [size_label(size, self.size_labels) for size in sizes] if sizes else None
            self.metrics.record_batch(statuses, stats, self.clock() - started, labels)

    def _profile_due(self, requests: int) -> bool:
        """Whether this chunk's first pipeline call is the one profiled: its ``requests``
        would bring the count to every N-th request."""
        every = self.settings.profile_every_n_requests
        return bool(every) and self._since_profile + requests >= every

    def _count_for_profile(self, generated: int) -> None:
        """Count the requests an engine call ran, once it has answered: counted up front,
        a chunk whose engine died counted again when it ran again, and a request the engine
        refused (a 4xx) counted as generated."""
        every = self.settings.profile_every_n_requests
        if every:
            self._since_profile = (self._since_profile + generated) % every

    # --- Deep health. -------------------------------------------------------------------
    def _fresh_health(self, force: bool = False, after_failure: bool = False
                      ) -> HealthResult | None:
        """The latest deep check, run again when older than ``health_interval_s`` (or
        ``force``d); each check that runs is recorded by the circuit breaker."""
        result = self.health_result
        if not force and result is not None and time.time() - result.checked_at < \
                self.settings.health_interval_s:
            return result
        try:
            result = self._run_health()
        except Exception as exc:  # noqa: BLE001 - any failure is the check's answer
            # Unrecorded, a failure during a trial would leave the breaker half-open for
            # good: no trial is due from there, so it would refuse every request forever.
            log.exception("deep health check could not run")
            result = HealthResult(False, f"the deep health check could not run: "
                                         f"{type(exc).__name__}: {exc}", time.time(), 0.0)
        self.health_result = result
        if after_failure and result.healthy:
            log.warning("a request failed, but the deep health check right after it passed: "
                        "the request's failure, not counted against the engine")
        elif not result.healthy and self.breaker.state == CLOSED:
            log.error("engine failure %d of %d in a row (deep health check: %s)",
                      self.breaker.failures + 1, self.breaker.threshold, result.detail)
        self.breaker.record(result.healthy, result.detail)
        return result

    def _run_health(self) -> HealthResult:
        """One deep check; a failed one is tried once more on a fresh engine process."""
        if self.engine is None or not self.engine.alive() or self._replace_engine:
            try:
                self._replace()
            except EngineProcessError as exc:
                return HealthResult(False, str(exc), time.time(), 0.0)
        result = self._check()
        if not result.healthy:
            # A fresh process clears a poisoned CUDA context; a broken model stays broken.
            log.error("deep health check failed in engine process %d: %s; trying a fresh "
                      "process", result.pid, result.detail)
            try:
                self._replace()
                result = self._check()
            except EngineProcessError as exc:
                result = HealthResult(False, str(exc), time.time(), 0.0)
        return result

    def _check(self) -> HealthResult:
        try:
            return self.engine.health()
        except EngineProcessError as exc:
            self._replace_engine = True
            return HealthResult(False, str(exc), time.time(), 0.0, self.engine.pid)

    def _health_reply(self, request_id: str) -> Reply:
        self._trial_if_due()
        if not self.breaker.allows_requests():
            retry = self.breaker.retry_after_s()
            payload = {"status": "unhealthy", "circuit": self.breaker.state,
                       "detail": f"circuit breaker open: {self._circuit_why()}; the next "
                                 f"deep health check in {retry} s decides",
                       "retry_after_s": retry}
            return Reply(503, json.dumps(payload).encode(), JSON_TYPE,
                         {"X-Request-Id": request_id, "Retry-After": str(retry)})
        status, body = health_reply_body(self._fresh_health(), time.time())
        return Reply(status, body, JSON_TYPE, {"X-Request-Id": request_id})

    # --- Circuit breaker. ---------------------------------------------------------------
    def _trial_if_due(self) -> None:
        """Open past its cool-down: half-open, and one deep check closes or reopens it."""
        if self.breaker.trial_due():
            self.breaker.begin_trial()
            self._fresh_health(force=True)

    def _circuit_why(self) -> str:
        return (f"{self.breaker.threshold} engine failure(s) in a row, each confirmed by a "
                f"deep health check (last: {self.breaker.last_detail})")

    def _circuit_reply(self, request_id: str) -> Reply:
        """503 at once while the circuit is open, with when to come back."""
        retry = self.breaker.retry_after_s()
        payload = {"code": 503, "type": CIRCUIT_OPEN,
                   "message": f"the model cannot generate images right now "
                              f"({self.breaker.threshold} engine failures in a row); "
                              f"requests are refused until a health check passes: retry "
                              f"in {retry} s",
                   "retry_after_s": retry, "request_id": request_id}
        return Reply(503, json.dumps(payload).encode(), JSON_TYPE,
                     {"X-Request-Id": request_id, "Retry-After": str(retry)})

    def _circuit_moved(self, old: str, new: str) -> None:
        if new == CLOSED:
            log.warning("circuit breaker %s -> closed: the deep health check passed, serving "
                        "again", old)
        elif new == HALF_OPEN:
            log.warning("circuit breaker open -> half_open: cool-down over, one deep health "
                        "check decides")
        else:
            log.error("circuit breaker %s -> %s: %s; requests get 503 for %g s", old, new,
                      self._circuit_why(), self.breaker.cooldown_s)
        if self.metrics is not None:
            self.metrics.count("sdxl_circuit_transitions_total", state=new)
            self.metrics.gauge("sdxl_circuit_state", self.breaker.state_value)

    # --- Engine processes. --------------------------------------------------------------
    def _engine_with_budget(self) -> EngineProcess:
        if self.engine is None or self._due_for_replacement():
            self._replace()
        return self.engine

    def _due_for_replacement(self) -> bool:
        return (self.engine is None or self._replace_engine or not self.engine.alive()
                or self.budget.exhausted(self.clock()))

    def _replace(self) -> None:
        old = self.engine
        level = logging.INFO  # the budget used up: the normal life of an engine
        if old is not None:
            age = self.budget.age(self.clock())
            if old.ended_why or not old.alive():
                # Killed between batches too (the kernel's OOM killer, an operator): a WARN
                # line, as a death under a batch is, where it was an INFO line alone. One
                # this worker ended (hung) said "it died" too, and one that SIGKILL did not
                # end (stuck in a driver call) gave its age as the reason.
                level = logging.WARNING
                reason = old.ended_why or f"it died (exit code {old.process.exitcode})"
            elif self._replace_engine:
                level = logging.WARNING
                reason = "of a CUDA error or a failed health check"
            elif self.budget.remaining == 0:
                reason = (f"it served {self.budget.served} of {self.budget.max_requests} "
                          f"requests in {age:.0f} s")
            else:  # it said "served 0 of 954 requests", not why
                reason = (f"it was {age:.0f} s old, past its {self.budget.max_age_s:.0f} s "
                          f"(max_worker_age_s), having served {self.budget.served} of "
                          f"{self.budget.max_requests} requests")
        self._stop_engine()  # first, so its GPU memory is free for the new one
        info = self._start_engine()
        if old is not None:
            log.log(level, "replaced engine process %d by %d because %s", old.pid,
                    info["pid"], reason)

    def _start_engine(self) -> dict:
        engine = EngineProcess(self.spec, self.settings.engine_stall_s)
        engine.start()
        info = engine.wait_ready(self.settings.engine_start_s)
        self.engine = engine
        self.budget = WorkerBudget.draw(self.settings, self.rng, self.clock())
        self.engines_started += 1
        # Generation time is labelled by size for the warm-up sizes only (bounded series).
        self.size_labels = [f"{w}x{h}" for w, h in info.get("warm_up_sizes", ())]
        if info.get("limits"):
            self.limits = ModelLimits.published(info["limits"])
        self._replace_engine = False
        if self.metrics is not None:  # the compile gauges exist (at 0) from READY on
            self.metrics.record_gauges(info.get("gauges", {}))
        log.info("engine process %d ready in %.2f s (warm-up %.2f s); budget %d requests or "
                 "%.0f s", engine.pid, info["ready_s"], info["warm_up_s"],
                 self.budget.max_requests, self.budget.max_age_s)
        return info

    def _stop_engine(self) -> None:
        if self.engine is not None:
            self.engine.stop()
            self.engine = None

    # --- Upkeep. ------------------------------------------------------------------------
    def upkeep(self) -> None:
        """One round of the background duties; each engine duty only when the engine is idle
        (a busy engine is never interrupted: those duties wait for the next round)."""
        if self._lock.acquire(blocking=False):
            try:
                self._trial_if_due()
                if self.breaker.allows_requests():  # open: no engine starts, no checks
                    if self._due_for_replacement():
                        try:
                            self._replace()
                        except EngineProcessError as exc:
                            # Counted by the next deep check that runs (health_interval_s).
                            log.error("upkeep: %s", exc)
                    self._fresh_health()
                if self.metrics is not None and self.engine is not None and \
                        self.engine.alive():
                    self.metrics.record_gauges(self.engine.sample())
            except EngineProcessError as exc:
                # A gauge sample or a health check that went wrong left the pipe out of step
                # (its process was killed, or survived SIGKILL stuck in a driver call): the
                # next batch must not be sent to it.
                self._replace_engine = True
                log.error("upkeep: %s", exc)
            finally:
                self._lock.release()
        if self.metrics is not None:
            self._record_worker_gauges()
            depth = self.queue_depth() if self.queue_depth is not None else None
            if depth is not None:
                self.metrics.gauge("sdxl_queue_pending_requests", depth)

    def _record_worker_gauges(self) -> None:
        self.metrics.gauge("sdxl_circuit_state", self.breaker.state_value)
        budget = self.budget
        if budget is not None:
            self.metrics.gauge("sdxl_worker_requests", budget.served)
            self.metrics.gauge("sdxl_worker_age_seconds", budget.age(self.clock()))

    def _upkeep_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.settings.metrics_interval_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.upkeep()
            except Exception:  # noqa: BLE001 - upkeep must never end the worker
                log.exception("upkeep round failed")

"""The circuit breaker in process, for real: engine processes with the tiny pipeline, broken by
fault injection inside the real pipeline call (``fault_engine_broken_file``: while the file
exists every call raises, warm-up included, as with a broken driver or bad weights), and a
poison request (``fault_error_prompt``) that fails alone while the engine is fine."""

from __future__ import annotations

import json
import os
import resource
import time

import pytest

from lifetimes import wait_until
from sdxl_serve.circuit import CLOSED, HALF_OPEN, OPEN
from sdxl_serve.engine_process import EngineSpec
from sdxl_serve.metrics import MetricsRecorder
from sdxl_serve.recycling import RecyclingService
from sdxl_serve.service import Incoming
from sdxl_serve.settings import Settings

pytestmark = pytest.mark.handler
COOLDOWN_S = 2.0


def body(**fields) -> bytes:
    return json.dumps({"prompt": "a lighthouse", "num_inference_steps": 1, "width": 32,
                       "height": 32, **fields}).encode()


class Sink:
    """Keeps what the service writes to the metrics, as (name, value, labels)."""

    def __init__(self):
        self.lines = []

    def __call__(self, name, kind, value, labels):
        self.lines.append((name, value, labels))

    def transitions(self) -> list[str]:
        return [labels[-1] for name, value, labels in self.lines
                if name == "sdxl_circuit_transitions_total" and value]

    def states(self) -> list[int]:
        """The gauge's values, a run of repeats (it is refreshed after each batch) as one."""
        values = [value for name, value, _ in self.lines if name == "sdxl_circuit_state"]
        return [v for i, v in enumerate(values) if i == 0 or values[i - 1] != v]


def make_service(tiny_model_dir, sink=None, **overrides) -> RecyclingService:
    config = {"device": "cpu", "warmup_sizes": "32x32", "warmup_steps": 1,
              "health_interval_s": 3600, "circuit_failure_threshold": 2,
              "circuit_cooldown_s": COOLDOWN_S, **overrides}
    metrics = MetricsRecorder(sink, "sdxl", "1.0", "9000") if sink is not None else None
    service = RecyclingService(EngineSpec(str(tiny_model_dir), config, None, "1.0"),
                               Settings.from_mapping(config, env={}), metrics)
    service.start()
    return service


def test_a_broken_engine_opens_the_circuit_and_a_passing_check_closes_it(tiny_model_dir,
                                                                        tmp_path):
    broken = tmp_path / "engine-broken"
    sink = Sink()
    service = make_service(tiny_model_dir, sink, fault_engine_broken_file=str(broken))
    try:
        [ok] = service.handle([Incoming(body(), "before")])
        assert ok.status == 200
        # 1. The engine breaks. Each failed request is confirmed by a deep check (which
        # also fails on a fresh process: its warm-up fails too); two in a row open it.
        broken.touch()
        [first] = service.handle([Incoming(body(), "f1")])
        assert first.status == 500 and service.breaker.state == CLOSED
        assert service.breaker.failures == 1
        [second] = service.handle([Incoming(body(seed=2), "f2")])
        assert second.status == 500 and service.breaker.state == OPEN
        assert "fault_engine_broken_file" in service.breaker.last_detail
        # 2. Open: 503 at once, with Retry-After and a JSON body that says why.
        started = time.monotonic()
        refused = service.handle([Incoming(body(), "r1"), Incoming(body(seed=3), "r2")])
        assert time.monotonic() - started < 0.5  # no engine start, no generation
        assert [r.status for r in refused] == [503, 503]
        payload = refused[0].json()
        assert payload["type"] == "CircuitOpen" and payload["request_id"] == "r1"
        assert 1 <= int(refused[0].headers["Retry-After"]) <= COOLDOWN_S
        assert payload["retry_after_s"] == int(refused[0].headers["Retry-After"])
        assert "retry in" in payload["message"]
        # The deep health check (readiness) fails as well, without generating.
        [health] = service.handle([Incoming(b"", "probe", health=True)])
        assert health.status == 503 and health.json()["circuit"] == "open"
        assert "Retry-After" in health.headers
        # 3. Still broken after the cool-down: the trial fails, open for another one.
        time.sleep(COOLDOWN_S + 0.1)
        [trial] = service.handle([Incoming(body(), "t1")])
        assert trial.status == 503 and service.breaker.state == OPEN
        # 4. Fixed: before the cool-down has passed it stays open; after, one passing
        # check closes it and the request that triggered the trial is served.
        broken.unlink()
        [waiting] = service.handle([Incoming(body(), "w1")])
        assert waiting.status == 503
        time.sleep(COOLDOWN_S + 0.1)
        [served] = service.handle([Incoming(body(), "after")])
        assert served.status == 200 and service.breaker.state == CLOSED
        [health] = service.handle([Incoming(b"", "probe2", health=True)])
        assert health.status == 200 and health.json()["status"] == "healthy"
    finally:
        service.close()
    # Every change reached the metrics: the transitions counter and the state gauge.
    assert sink.transitions() == ["open", "half_open", "open", "half_open", "closed"]
    assert sink.states() == [0, 2, 1, 2, 1, 0]


def test_a_poison_request_that_always_fails_never_opens_the_circuit(tiny_model_dir):
    service = make_service(tiny_model_dir, fault_error_prompt="poison")
    try:
        checks = []
        for attempt in range(5):  # more than twice the threshold, in a row
            [reply] = service.handle([Incoming(body(prompt="poison", seed=attempt),
                                               f"poison-{attempt}")])
            assert reply.status == 500, reply.body
            # A deep check ran right after it, passed, and so the failure did not count.
            checks.append(service.health_result.checked_at)
            assert service.health_result.healthy
            assert service.breaker.state == CLOSED and service.breaker.failures == 0
        assert len(set(checks)) == 5
        # Everyone else is served meanwhile, the poison in a batch failing alone.
        replies = service.handle([Incoming(body(prompt="poison"), "p"),
                                  Incoming(body(seed=9), "other")])
        assert [r.status for r in replies] == [500, 200]
        assert service.breaker.state == CLOSED
    finally:
        service.close()


def test_a_trial_that_cannot_even_start_an_engine_reopens_the_circuit(tiny_model_dir, tmp_path):
    """The trial after the cool-down fails in an unexpected way: the worker is out of file
    descriptors, so not even an engine process can start. That trial must count as failed
    (open for another cool-down); before, the breaker stayed half-open, where no trial is
    ever due, and refused every request for good."""
    broken = tmp_path / "engine-broken"
    service = make_service(tiny_model_dir, fault_engine_broken_file=str(broken),
                           circuit_failure_threshold=1)
    try:
        broken.touch()
        [failed] = service.handle([Incoming(body(), "f1")])
        assert failed.status == 500 and service.breaker.state == OPEN
        broken.unlink()
        time.sleep(COOLDOWN_S + 0.1)  # the cool-down passes
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        # No descriptor left above the ones open now: a new pipe fails with EMFILE.
        resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")), hard))
        try:
            [trial] = service.handle([Incoming(body(), "t1")])
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert trial.status == 503 and trial.json()["type"] == "CircuitOpen"
        assert service.breaker.state == OPEN != HALF_OPEN
        assert "Too many open files" in service.breaker.last_detail
        # Descriptors are back: a later trial closes it. (multiprocessing's fork server
        # ended on the half-sent request; it is started again once it has exited, which
        # may take more than one cool-down on a busy machine.)
        def served_after_a_trial() -> bool:
            if service.breaker.state == OPEN and not service.breaker.trial_due():
                return False
            [reply] = service.handle([Incoming(body(), "after")])
            return reply.status == 200 and service.breaker.state == CLOSED

        wait_until(served_after_a_trial, 120, "a trial to close the circuit again",
                   detail=lambda: service.breaker.last_detail)
    finally:
        service.close()


def test_bad_input_is_a_400_while_the_engine_is_broken(tiny_model_dir, tmp_path):
    """A request the contract refuses is the client's 400 whatever the engine's state. It
    was validated in the engine process alone: while no engine process could start (the
    engine broken, before the circuit opened) it got a 500, and with the circuit open a
    503 "retry in N s", which no retry could cure."""
    broken = tmp_path / "engine-broken"
    service = make_service(tiny_model_dir, fault_engine_broken_file=str(broken))
    bad = {"steps": body(num_inference_steps=2000), "width": body(width=33),
           "json": b'{"prompt": ', "raw": body(num_images=2)}
    try:
        broken.touch()
        [first] = service.handle([Incoming(body(), "f1")])
        assert first.status == 500 and service.breaker.state == CLOSED
        # No engine process now (its replacement failed its warm-up): still the 400s.
        replies = service.handle([Incoming(raw, name, accept="image/png" if name == "raw"
                                           else "") for name, raw in bad.items()])
        assert [r.status for r in replies] == [400] * len(bad), [r.body for r in replies]
        assert [r.json()["field"] for r in replies] == \
            ["num_inference_steps", "width", "body", "num_images"]
        assert service.breaker.state == CLOSED and service.breaker.failures == 1
        [second] = service.handle([Incoming(body(seed=2), "f2")])
        assert second.status == 500 and service.breaker.state == OPEN
        # Open: the good request's 503 beside the bad one's 400, in one batch.
        good, wrong = service.handle([Incoming(body(), "g"), Incoming(bad["steps"], "b")])
        assert (good.status, wrong.status) == (503, 400), wrong.body
        assert wrong.json()["request_id"] == "b" and "2000" in wrong.json()["message"]
    finally:
        service.close()

"""The deep health check through the recycling service, with real engine processes: a
failed check is tried once more on a fresh engine process, and an engine that stays broken
gets a 503 that says why (the circuit still closed: this is the check's own reply).

The fault is the real one of ``fault_engine_broken_file`` (every pipeline call raises while
the file exists). To break only the first engine process, the file is removed at the moment
the service logs that it tries a fresh process: a logging handler on the service's own
logger, called in the same thread right before the replacement starts.
"""

from __future__ import annotations

import logging

import pytest

from sdxl_serve.cancellation import process_running
from sdxl_serve.engine_process import EngineSpec
from sdxl_serve.recycling import RecyclingService
from sdxl_serve.service import Incoming
from sdxl_serve.settings import Settings

pytestmark = pytest.mark.handler


class RepairOnRetry(logging.Handler):
    """Removes the fault's file when the service says it tries a fresh engine process."""

    def __init__(self, broken):
        super().__init__()
        self.broken = broken
        self.retries = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "trying a fresh process" in record.getMessage():
            self.retries += 1
            self.broken.unlink(missing_ok=True)


@pytest.fixture
def checked_every_time(tiny_model_dir, tmp_path):
    """A service whose every deep health request runs a check (health_interval_s 0)."""
    broken = tmp_path / "engine-broken"
    config = {"device": "cpu", "warmup_sizes": "32x32", "warmup_steps": 1,
              "health_interval_s": 0, "circuit_failure_threshold": 3,
              "fault_engine_broken_file": str(broken)}
    service = RecyclingService(EngineSpec(str(tiny_model_dir), config, None, "1.0"),
                               Settings.from_mapping(config, env={}))
    try:
        service.start()
        yield service, broken
    finally:
        service.close()


def probe(service: RecyclingService, name: str):
    [reply] = service.handle([Incoming(b"", name, health=True)])
    return reply


def test_a_failed_check_passes_on_a_fresh_engine_process(checked_every_time):
    service, broken = checked_every_time
    first, started = service.engine.pid, service.engines_started
    repair = RepairOnRetry(broken)
    logger = logging.getLogger("sdxl_serve.recycling")
    logger.addHandler(repair)
    try:
        broken.touch()
        reply = probe(service, "probe")
    finally:
        logger.removeHandler(repair)
    assert repair.retries == 1  # the first check failed and was tried again
    assert reply.status == 200, reply.body
    payload = reply.json()
    assert payload["status"] == "healthy"
    # Answered by a new engine process; the one that failed has ended.
    assert payload["worker_pid"] not in (first, 0) and payload["worker_pid"] == service.engine.pid
    assert service.engines_started == started + 1
    assert not process_running(first)
    assert service.breaker.failures == 0


def test_an_engine_that_stays_broken_gets_a_503_that_says_why(checked_every_time):
    service, broken = checked_every_time
    first, started = service.engine.pid, service.engines_started
    broken.touch()
    reply = probe(service, "probe")
    assert reply.status == 503, reply.body
    payload = reply.json()
    assert payload["status"] == "unhealthy"
    # The fresh engine process failed as well (its warm-up is a pipeline call): the reply
    # names the injected failure, and the breaker counted one failure, still closed.
    assert "injected engine failure" in payload["detail"], payload
    assert service.engines_started == started  # no fresh process became ready
    assert not process_running(first)
    assert service.breaker.failures == 1 and service.breaker.state == "closed"
    # Repaired: the next check starts a fresh process and passes.
    broken.unlink()
    reply = probe(service, "probe2")
    assert reply.status == 200 and reply.json()["status"] == "healthy", reply.body
    assert service.engines_started == started + 1


def test_close_ends_the_engine_process(checked_every_time):
    # What every fixture of a RecyclingService relies on to leave no engine process behind.
    service, _ = checked_every_time
    engine = service.engine.pid
    assert process_running(engine)
    service.close()
    assert not process_running(engine) and service.engine is None
    service.close()  # twice is harmless (the fixture closes it again)

"""The circuit breaker's state machine, on a clock the test moves."""

from __future__ import annotations

import pytest

from sdxl_serve.circuit import CLOSED, HALF_OPEN, OPEN, CircuitBreaker
from sdxl_serve.recycling import engine_failure

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def moves():
    return []


@pytest.fixture
def breaker(clock, moves):
    return CircuitBreaker(threshold=3, cooldown_s=30.0, clock=clock,
                          on_transition=lambda old, new: moves.append((old, new)))


def test_it_opens_after_threshold_failures_in_a_row(breaker, moves):
    for _ in range(2):
        breaker.record(healthy=False, detail="boom")
    assert breaker.state == CLOSED and breaker.allows_requests() and moves == []
    breaker.record(healthy=False, detail="boom")
    assert breaker.state == OPEN and not breaker.allows_requests()
    assert moves == [(CLOSED, OPEN)] and breaker.last_detail == "boom"
    assert breaker.state_value == 2


def test_a_success_between_failures_resets_the_count(breaker):
    for _ in range(2):
        breaker.record(healthy=False)
    breaker.record(healthy=True)
    for _ in range(2):
        breaker.record(healthy=False)
    assert breaker.state == CLOSED and breaker.failures == 2


def test_open_answers_with_the_time_left_then_a_trial_is_due(breaker, clock):
    for _ in range(3):
        breaker.record(healthy=False)
    assert breaker.retry_after_s() == 30 and not breaker.trial_due()
    clock.now += 12.5
    assert breaker.retry_after_s() == 18  # rounded up: never invites a retry too early
    with pytest.raises(RuntimeError):
        CircuitBreaker(1, 1.0).begin_trial()  # only from open
    clock.now += 17.5
    assert breaker.trial_due() and breaker.retry_after_s() == 1


def test_a_passing_trial_closes(breaker, clock, moves):
    for _ in range(3):
        breaker.record(healthy=False)
    clock.now += 30
    breaker.begin_trial()
    assert breaker.state == HALF_OPEN and breaker.state_value == 1
    assert not breaker.allows_requests()  # the trial decides first
    breaker.record(healthy=True)
    assert breaker.state == CLOSED and breaker.failures == 0
    assert moves == [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, CLOSED)]


def test_a_failing_trial_opens_for_another_full_cooldown(breaker, clock, moves):
    for _ in range(3):
        breaker.record(healthy=False)
    clock.now += 45
    breaker.begin_trial()
    breaker.record(healthy=False, detail="still broken")
    assert breaker.state == OPEN and moves[-1] == (HALF_OPEN, OPEN)
    assert breaker.retry_after_s() == 30 and not breaker.trial_due()
    assert breaker.last_detail == "still broken"
    clock.now += 30
    assert breaker.trial_due()


def test_threshold_zero_never_opens(clock):
    breaker = CircuitBreaker(threshold=0, cooldown_s=30.0, clock=clock)
    for _ in range(100):
        breaker.record(healthy=False)
    assert breaker.state == CLOSED


@pytest.mark.parametrize("status, counts", [(200, False), (400, False), (413, False),
                                            (507, False), (500, True), (503, True)])
def test_which_reply_statuses_may_be_the_engines_fault(status, counts):
    assert engine_failure(status) is counts

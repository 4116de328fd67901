"""The circuit breaker around the engine: stop sending work to a pipeline that cannot serve.

Engine replacement (``recycling``) fixes what a fresh process fixes: leaked memory, a
poisoned CUDA context. It does not fix a broken driver, a bad model file or a full disk; then
every request would wait for a model load or a generation that fails anyway, and Kubernetes
would keep routing traffic to the pod. The breaker counts failures that are the engine's,
opens after ``threshold`` of them in a row, answers at once while open, and after
``cooldown_s`` lets one real generation (the deep health check) decide whether to close.

Only failures that a deep health check confirms are counted (``RecyclingService`` runs one
right after a request fails on the server side): a request that fails while the check
passes is the request's own failure, so one client sending a request that always fails
cannot open the breaker for everyone else.

This module is pure state: the caller says what happened and when (``clock``).

Example:
    >>> now = [0.0]
    >>> breaker = CircuitBreaker(threshold=2, cooldown_s=30, clock=lambda: now[0])
    >>> breaker.record(healthy=False); breaker.record(healthy=False); breaker.state
    'open'
    >>> now[0] = 10.0; breaker.retry_after_s(), breaker.trial_due()
    (20, False)
    >>> now[0] = 30.0; breaker.trial_due(); breaker.begin_trial(); breaker.state
    True
    'half_open'
    >>> breaker.record(healthy=True); breaker.state
    'closed'
"""

from __future__ import annotations

import math
import time
from typing import Callable

CLOSED, HALF_OPEN, OPEN = "closed", "half_open", "open"
STATES = (CLOSED, HALF_OPEN, OPEN)
"""In the order of their gauge value: ``sdxl_circuit_state`` is 0, 1 or 2."""

Transition = Callable[[str, str], None]
"""Receives (old state, new state) on every change."""


class CircuitBreaker:
    """Closed: serving, counting confirmed engine failures. Open: refusing at once, until
    the cool-down has passed. Half-open: one trial (a deep health check) under way.

    Args:
        threshold: confirmed engine failures in a row that open the breaker; 0 never opens.
        cooldown_s: seconds the breaker stays open before a trial.
        clock: monotonic seconds.
        on_transition: called with (old, new) state on every change.
    """

    def __init__(self, threshold: int, cooldown_s: float,
                 clock: Callable[[], float] = time.monotonic,
                 on_transition: Transition | None = None):
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self.clock = clock
        self.on_transition = on_transition
        self.state = CLOSED
        self.failures = 0
        """Confirmed engine failures in a row (while closed)."""
        self.opened_at = 0.0
        self.last_detail = ""
        """What the last confirmed failure said (the deep check's detail)."""

    @property
    def state_value(self) -> int:
        """The state as the gauge shows it: 0 closed, 1 half-open, 2 open."""
        return STATES.index(self.state)

    def allows_requests(self) -> bool:
        return self.state == CLOSED

    def record(self, healthy: bool, detail: str = "") -> None:
        """The outcome of a deep health check (a real generation).

        Closed: a failure adds one, reaching ``threshold`` opens; a success resets the count.
        Half-open: a success closes, a failure opens again for another cool-down.
        """
        if healthy:
            self.failures = 0
            if self.state == HALF_OPEN:
                self._move(CLOSED)
            return
        self.last_detail = detail
        if self.state == HALF_OPEN:
            self.opened_at = self.clock()
            self._move(OPEN)
            return
        if self.state == CLOSED:
            self.failures += 1
            if self.threshold and self.failures >= self.threshold:
                self.opened_at = self.clock()
                self._move(OPEN)

    def trial_due(self) -> bool:
        """Open, and the cool-down has passed: time for one trial generation."""
        return self.state == OPEN and self.clock() - self.opened_at >= self.cooldown_s

    def begin_trial(self) -> None:
        """Open -> half-open; the caller now runs the deep check and ``record``s it."""
        if self.state != OPEN:
            raise RuntimeError(f"a trial starts from the open state, not {self.state}")
        self._move(HALF_OPEN)

    def retry_after_s(self) -> int:
        """Whole seconds until the next trial (at least 1): the ``Retry-After`` value."""
        if self.state != OPEN:
            return 1
        left = self.cooldown_s - (self.clock() - self.opened_at)
        return max(1, math.ceil(left))

    def _move(self, new: str) -> None:
        old, self.state = self.state, new
        if new == CLOSED:
            self.failures = 0
        if self.on_transition is not None:
            self.on_transition(old, new)

"""Worker budgets: jittered below the settings, never above, spent by requests or by age."""

from __future__ import annotations

import random

import pytest

from sdxl_serve.recycling import WorkerBudget
from sdxl_serve.settings import Settings

pytestmark = pytest.mark.unit


def test_budgets_are_drawn_below_the_settings_and_differ():
    settings = Settings.from_mapping({"max_requests_per_worker": 1000, "max_worker_age_s": 3600},
                                     env={})
    rng = random.Random(5)
    budgets = [WorkerBudget.draw(settings, rng, now=0.0) for _ in range(200)]
    assert all(900 <= b.max_requests <= 1000 for b in budgets)
    assert all(3240 <= b.max_age_s <= 3600 for b in budgets)
    assert len({b.max_requests for b in budgets}) > 20  # workers do not restart together


def test_a_small_budget_is_exact():
    settings = Settings.from_mapping({"max_requests_per_worker": 5}, env={})
    assert {WorkerBudget.draw(settings, random.Random(i), 0.0).max_requests
            for i in range(50)} == {5}


def test_no_jitter_means_the_settings_themselves():
    settings = Settings.from_mapping({"max_requests_per_worker": 1000, "recycle_jitter": 0},
                                     env={})
    budget = WorkerBudget.draw(settings, random.Random(1), now=10.0)
    assert (budget.max_requests, budget.max_age_s, budget.started_at) == (1000, 3600.0, 10.0)


def test_spent_by_requests_or_by_age():
    budget = WorkerBudget(max_requests=3, max_age_s=60.0, started_at=100.0)
    assert not budget.exhausted(now=101.0) and budget.remaining == 3
    budget.served = 3
    assert budget.exhausted(now=101.0) and budget.remaining == 0
    assert WorkerBudget(3, 60.0, 100.0).exhausted(now=160.0)

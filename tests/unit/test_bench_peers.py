"""How the side-by-side bench tells a lead from the machine's noise (scripts/bench_peers.py)."""

from __future__ import annotations

import random

import pytest

from bench_peers import pair_ratios, round_shares, verdict

pytestmark = pytest.mark.unit

# The machine moves between moments (block medians 0.6x to 1.1x of each other, as measured
# on our build machine); the two blocks of one moment move together.
DRIFT = [1.0, 0.6, 1.1, 0.8, 0.7, 1.05, 0.9, 0.65, 1.0, 0.75]


def blocks(factor: float, noise: float, seed: int) -> list[list[float]]:
    """Six timings per moment of DRIFT around ``moment * factor``, each off by up to
    ``noise``."""
    draw = random.Random(seed)
    return [[moment * factor * (1 + draw.uniform(-noise, noise)) for _ in range(6)]
            for moment in DRIFT]


def test_a_small_lead_shows_through_drift_both_sides_share():
    """Pooled over all moments the drift (0.6x-1.1x) would swamp a 3 % lead; pair by pair
    it cancels."""
    ratios = pair_ratios(blocks(0.97, 0.01, 1), blocks(1.0, 0.01, 2))
    assert all(0.94 < r < 1.0 for r in ratios)
    assert verdict(ratios, lower_is_better=True).startswith("ours ahead (10 of 10 pairs")


def test_the_same_stack_on_both_sides_is_within_noise():
    ratios = pair_ratios(blocks(1.0, 0.05, 3), blocks(1.0, 0.05, 4))
    assert verdict(ratios, lower_is_better=True).startswith("within noise")


def test_a_lag_is_reported_as_the_peer_ahead():
    ratios = pair_ratios(blocks(1.05, 0.01, 5), blocks(1.0, 0.01, 6))
    assert verdict(ratios, lower_is_better=True).startswith("LitServe ahead (10 of 10")


def test_one_spoiled_pair_is_one_vote_not_a_lead():
    """A block the machine slowed by a fifth does not outvote nine even pairs."""
    ratios = [0.8] + [1.0 + 0.001 * k for k in range(1, 10)]
    assert verdict(ratios, lower_is_better=True).startswith("LitServe ahead (9 of 10")
    assert verdict([0.8, 0.99, 1.01] * 3 + [1.01], True).startswith("within noise")


def test_for_throughput_higher_is_ahead():
    ratios = [1.04, 1.02, 1.03, 1.01, 1.05, 1.02]
    assert verdict(ratios, lower_is_better=False) == "ours ahead (6 of 6 pairs, p = 0.031)"
    assert verdict(ratios, lower_is_better=True) == "LitServe ahead (6 of 6 pairs, p = 0.031)"


def test_fewer_than_six_pairs_are_never_judged():
    """`make bench --quick` measures one pair; five all one way are still p = 0.0625."""
    assert verdict([0.5] * 5, True) == "too few pairs to judge (5)"
    assert verdict([0.5], True) == "too few pairs to judge (1)"


@pytest.mark.parametrize("count, rounds", [(20, 4), (12, 4), (8, 4), (5, 2), (1, 2)])
def test_the_rounds_share_every_block_once_in_order(count, rounds):
    shares = round_shares(count, rounds)
    assert len(shares) == rounds
    assert [block for share in shares for block in share] == list(range(count))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1

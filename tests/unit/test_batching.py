"""Grouping compatible requests, order restoration and per-group failure."""

from __future__ import annotations

import pytest

from sdxl_serve.batching import plan_groups, run_batched

pytestmark = pytest.mark.unit


def test_groups_by_key_in_order_of_first_arrival():
    groups = plan_groups(["a", "b", "a", "c", "b"], key=str, size=lambda r: 1, max_images=8)
    assert groups == [[0, 2], [1, 4], [3]]


def test_groups_are_split_at_max_images():
    sizes = [3, 3, 3, 1]
    groups = plan_groups(sizes, key=lambda r: "k", size=lambda r: r, max_images=6)
    assert groups == [[0, 1], [2, 3]]


def test_a_request_larger_than_max_images_gets_its_own_group():
    assert plan_groups([9, 1], key=lambda r: "k", size=lambda r: r, max_images=4) == [[0], [1]]


def test_results_come_back_in_request_order():
    calls = []

    def generate(group):
        calls.append(list(group))
        return [f"{item}!" for item in group]

    results = run_batched(["a1", "b1", "a2"], generate, key=lambda r: r[0], size=lambda r: 1,
                          max_images=8)
    assert results == ["a1!", "b1!", "a2!"]
    assert calls == [["a1", "a2"], ["b1"]]


def test_a_failing_group_fails_only_its_requests():
    def generate(group):
        if group[0].startswith("bad"):
            raise RuntimeError("boom")
        return group

    results = run_batched(["ok1", "bad1", "ok2"], generate, key=lambda r: r[:2],
                          size=lambda r: 1, max_images=8)
    assert results[0] == "ok1" and results[2] == "ok2"
    assert isinstance(results[1], RuntimeError)


def test_a_wrong_result_count_is_an_error_not_a_shifted_answer():
    results = run_batched(["a", "a"], lambda group: ["only one"], key=str, size=lambda r: 1,
                          max_images=8, retry_alone=lambda exc: False)
    assert all(isinstance(r, RuntimeError) for r in results)
    assert "1 results for 2 requests" in str(results[0])
    # Too many is as wrong: which two are whose cannot be known.
    results = run_batched(["a", "a"], lambda group: ["x", "y", "z"], key=str,
                          size=lambda r: 1, max_images=8, retry_alone=lambda exc: False)
    assert all(isinstance(r, RuntimeError) for r in results)
    assert "3 results for 2 requests" in str(results[0])


def test_a_failed_group_is_retried_one_request_at_a_time():
    calls = []

    def generate(group):
        calls.append(list(group))
        if "bad" in group:
            raise ValueError("this one breaks the pipeline")
        return [r.upper() for r in group]

    results = run_batched(["a", "bad", "b", "c"], generate, key=lambda r: 0,
                          size=lambda r: 1, max_images=8)
    assert results[0] == "A" and results[2:] == ["B", "C"]
    assert isinstance(results[1], ValueError)
    assert calls == [["a", "bad", "b", "c"], ["a"], ["bad"], ["b"], ["c"]]
    # Not retried when the error says the engine itself is broken.
    calls.clear()
    results = run_batched(["a", "bad"], generate, key=lambda r: 0, size=lambda r: 1,
                          max_images=8, retry_alone=lambda exc: False)
    assert all(isinstance(r, ValueError) for r in results) and len(calls) == 1

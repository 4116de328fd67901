"""Dynamic batching: group compatible requests, run each group once, restore the order.

Pure Python over a ``generate`` function, so the grouping logic is tested without a model
and the same code serves TorchServe's batches and the benchmark's direct calls.

Example:
    >>> run_batched(["a", "b", "a"], lambda group: [x.upper() for x in group],
    ...             key=lambda x: x, size=lambda x: 1, max_images=8)
    ['A', 'B', 'A']
"""

from __future__ import annotations

import math
from typing import Callable, Hashable, Sequence, TypeVar

Request = TypeVar("Request")
Result = TypeVar("Result")


def plan_groups(requests: Sequence[Request], key: Callable[[Request], Hashable],
                size: Callable[[Request], int], max_images: int,
                cost: Callable[[Request], float] = lambda request: 0.0,
                max_cost: float = math.inf) -> list[list[int]]:
    """Indices of ``requests`` grouped by ``key``, each group at most ``max_images`` images
    and at most ``max_cost`` in summed ``cost``.

    Groups keep arrival order inside them and come in the order of their first request, so
    the oldest request is served first. A request larger than either limit gets a group
    of its own.

    Example:
        >>> plan_groups([3, 3, 3], key=lambda r: 0, size=lambda r: 1, max_images=8,
        ...             cost=lambda r: r, max_cost=6)
        [[0, 1], [2]]
    """
    by_key: dict[Hashable, list[list[int]]] = {}
    order: list[list[int]] = []
    slack = 1 + 1e-9  # costs are floats: a group at exactly the limit still fits
    for index, request in enumerate(requests):
        chunks = by_key.setdefault(key(request), [])
        if (chunks and sum(size(requests[i]) for i in chunks[-1]) + size(request) <= max_images
                and sum(cost(requests[i]) for i in chunks[-1]) + cost(request)
                <= max_cost * slack):
            chunks[-1].append(index)
        else:
            chunks.append([index])
            order.append(chunks[-1])
    return order


def run_batched(requests: Sequence[Request],
                generate: Callable[[list[Request]], Sequence[Result]],
                key: Callable[[Request], Hashable], size: Callable[[Request], int],
                max_images: int,
                retry_alone: Callable[[Exception], bool] = lambda exc: True,
                cost: Callable[[Request], float] = lambda request: 0.0,
                max_cost: float = math.inf) -> list[Result | Exception]:
    """Call ``generate`` once per group; return one result (or its error) per request.

    Groups are those of ``plan_groups``: no call is larger than ``max_images`` images or
    ``max_cost`` in summed ``cost``.

    When a group of several requests fails and ``retry_alone(error)`` says so, each of its
    requests runs again on its own: one request that breaks the pipeline fails alone
    instead of taking its companions with it. Other groups run either way.

    Example:
        >>> def generate(group):
        ...     if "bad" in group:
        ...         raise ValueError("bad input")
        ...     return [x.upper() for x in group]
        >>> run_batched(["a", "bad", "c"], generate, key=lambda x: 0, size=lambda x: 1,
        ...             max_images=8)
        ['A', ValueError('bad input'), 'C']
    """
    results: list[Result | Exception | None] = [None] * len(requests)

    def attempt(group: list[int]) -> list[Result | Exception]:
        try:
            outputs = generate([requests[i] for i in group])
            if len(outputs) != len(group):
                raise RuntimeError(f"generate returned {len(outputs)} results for "
                                   f"{len(group)} requests")
            return list(outputs)
        except Exception as exc:  # noqa: BLE001 - the caller maps it to a status per request
            if len(group) > 1 and retry_alone(exc):
                return [attempt([index])[0] for index in group]
            return [exc] * len(group)

    for group in plan_groups(requests, key, size, max_images, cost, max_cost):
        for index, output in zip(group, attempt(group)):
            results[index] = output
    missing = [i for i, r in enumerate(results) if r is None]
    if missing:
        raise RuntimeError(f"no result for requests {missing}")
    return results  # type: ignore[return-value]

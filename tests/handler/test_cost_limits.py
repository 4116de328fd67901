"""Cost limits in process with the tiny pipeline: an oversized request is refused with the
contract's JSON error while its batch-mates are served, and a batch over the per-call limit
runs as several real pipeline calls."""

from __future__ import annotations

import json

import pytest

from sdxl_serve.contract import COST_FIELDS, request_cost
from sdxl_serve.engine import Engine
from sdxl_serve.service import GenerationService, Incoming
from sdxl_serve.settings import Settings

pytestmark = pytest.mark.handler


def body(**fields) -> bytes:
    return json.dumps({"prompt": "a lighthouse", "num_inference_steps": 3, **fields}).encode()


def with_settings(engine, **settings) -> GenerationService:
    """The session's pipeline behind other settings (the pipe is shared)."""
    return GenerationService(Engine(engine.pipe, Settings.from_mapping(
        {"device": "cpu", **settings}, env={}), engine.device))


def test_the_tiny_models_default_request_costs_one(engine):
    service = GenerationService(engine)
    request = service.parse(Incoming(b'{"prompt": "x"}'))
    assert (request.width, request.num_inference_steps) == (64, 30)
    assert request_cost(request, engine.limits) == 1.0
    assert engine.limits.max_request_cost == 4.0  # the setting's default reaches the model


def test_an_oversized_request_is_refused_alone_with_the_fields_cost_and_limit(engine):
    service = GenerationService(engine)
    # The attack on the tiny model: 4 images of twice the native side, 100 steps.
    attack = body(num_images=4, width=128, height=128, num_inference_steps=100)
    replies, stats = service.serve([Incoming(body(seed=1), "fine"),
                                    Incoming(attack, "attack")])
    assert [r.status for r in replies] == [200, 400]
    error = replies[1].json()
    assert error["type"] == "CostLimitExceeded" and error["code"] == 400
    assert error["field"] == "num_images" and error["fields"] == list(COST_FIELDS)
    assert (error["cost"], error["limit"]) == (53.33, 4.0)
    assert error["request_id"] == "attack"
    assert "`num_inference_steps` at most 7" in error["message"]
    # Refused before any work: the one call made was the good request's.
    assert [requests for requests, _, _ in stats.calls] == [1]


def test_the_request_limit_follows_the_setting(engine):
    strict = with_settings(engine, max_request_cost=0.1, max_call_cost=0.1)
    [at_limit, over] = strict.handle([Incoming(body()), Incoming(body(num_inference_steps=4))])
    assert (at_limit.status, over.status) == (200, 400)  # 3 steps cost 0.1, 4 cost 0.133
    assert over.json()["limit"] == 0.1


def test_a_batch_over_the_call_limit_runs_as_several_pipeline_calls(engine):
    # Five compatible requests of 0.1 each (3 steps of 30) with calls of at most 0.2.
    split = with_settings(engine, max_request_cost=0.2, max_call_cost=0.2)
    items = [Incoming(body(seed=seed), str(seed)) for seed in range(5)]
    replies, stats = split.serve(items)
    assert [r.status for r in replies] == [200] * 5
    assert [requests for requests, _, _ in stats.calls] == [2, 2, 1]
    assert [r.json()["seed"] for r in replies] == [0, 1, 2, 3, 4]  # each its own image
    # The same batch without the call limit is one call.
    _, whole = GenerationService(engine).serve(items)
    assert [requests for requests, _, _ in whole.calls] == [5]


@pytest.mark.parametrize("fields, field", [({"num_images": 4}, "num_images"),
                                           ({"num_images": 1, "stream": True}, "stream")])
def test_what_raw_image_bytes_cannot_carry_is_said_before_the_cost(engine, fields, field):
    # The request's own error first: it was told its cost, fixed that, then heard of this.
    service = GenerationService(engine)
    costly = body(width=128, height=128, num_inference_steps=100, **fields)
    [reply] = service.handle([Incoming(costly, accept="image/png")])
    assert reply.status == 400
    error = reply.json()
    assert (error["type"], error["field"]) == ("InvalidRequest", field), error
    assert "raw image bytes" in error["message"]

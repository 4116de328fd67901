"""Request cost: the arithmetic, the refusal and its message, and the batcher's split."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from sdxl_serve.batching import plan_groups, run_batched
from sdxl_serve.contract import (COST_FIELDS, SDXL_LIMITS, CostLimitExceeded, ModelLimits,
                                 RequestError, parse_request, request_cost)
from sdxl_serve.settings import Settings, SettingsError

pytestmark = pytest.mark.unit
TINY = ModelLimits(default_size=64, min_size=32, max_size=128)


def parse(limits=SDXL_LIMITS, **fields):
    return parse_request({"prompt": "x", **fields}, limits)


def refusal(limits=SDXL_LIMITS, **fields) -> CostLimitExceeded:
    with pytest.raises(CostLimitExceeded) as caught:
        parse(limits, **fields)
    return caught.value


@pytest.mark.parametrize("fields, cost", [
    ({}, 1.0),                                                   # the default request
    ({"num_images": 4}, 4.0),
    ({"width": 2048, "height": 2048}, 4.0),                      # pixels, not sides
    ({"width": 512, "height": 1024}, 0.5),
    ({"num_inference_steps": 15}, 0.5),
    ({"guidance_scale": 1.0}, 0.5),                              # guidance off at 1
    ({"guidance_scale": 1.01}, 1.0),                             # and on above it
    ({"guidance_scale": 0.0, "num_inference_steps": 60}, 1.0),
])
def test_cost_is_images_pixels_steps_and_guidance_over_a_default_request(fields, cost):
    assert request_cost(parse(**fields), SDXL_LIMITS) == pytest.approx(cost)


def test_the_same_request_relative_to_the_native_size_costs_the_same_on_any_model():
    # 2x the native side at default steps: 4 default requests on SDXL and on the tiny model.
    assert request_cost(parse(SDXL_LIMITS, width=2048, height=2048), SDXL_LIMITS) == \
        request_cost(parse(TINY, width=128, height=128), TINY) == 4.0
    assert request_cost(parse(TINY), TINY) == 1.0


def test_the_unit_follows_the_models_default_steps_and_guidance():
    unguided = replace(SDXL_LIMITS, default_steps=20, default_guidance_scale=1.0)
    assert request_cost(parse(unguided), unguided) == 1.0
    # 20 steps with guidance: twice the work of the unguided 20-step default.
    assert request_cost(parse(unguided, guidance_scale=5.0), unguided) == 2.0


def test_a_request_at_the_limit_passes_and_just_over_it_is_refused():
    assert request_cost(parse(num_images=4), SDXL_LIMITS) == SDXL_LIMITS.max_request_cost
    error = refusal(num_images=4, num_inference_steps=31)
    assert isinstance(error, RequestError) and error.status == 400
    assert error.cost == pytest.approx(4 * 31 / 30)


def test_the_attack_from_the_issue_is_refused_with_a_json_error_naming_everything():
    # 4 images of 2048x2048, 100 steps, guidance: 53 default requests.
    error = refusal(num_images=4, width=2048, height=2048, num_inference_steps=100)
    body = json.loads(json.dumps(error.to_json()))
    assert {"code", "type", "field", "message"} <= set(body)
    assert body["code"] == 400 and body["type"] == "CostLimitExceeded"
    assert body["cost"] == 53.33 and body["limit"] == 4.0
    assert body["fields"] == list(COST_FIELDS)
    assert body["field"] == "num_images"  # the largest factor: 4 images
    message = body["message"]
    assert "costs 53.33 default requests" in message and "limit of 4 per request" in message
    for name in COST_FIELDS:
        assert f"`{name}`" in message, name
    # How to get under it, each change alone: 7 steps, or a smaller size.
    assert "`num_inference_steps` at most 7" in message
    assert "`width` x `height` at most 560x560" in message


@pytest.mark.parametrize("fields, field, hints", [
    ({"num_images": 4, "num_inference_steps": 40}, "num_images",
     ["`num_images` at most 3", "`num_inference_steps` at most 30",
      "`guidance_scale` 1 or less"]),
    ({"width": 2048, "height": 2048, "num_inference_steps": 100, "guidance_scale": 1.0},
     "width", ["`num_inference_steps` at most 60", "at most 1584x1584"]),
    ({"num_inference_steps": 100, "num_images": 2}, "num_inference_steps",
     ["`num_images` at most 1", "`num_inference_steps` at most 60",
      "`guidance_scale` 1 or less"]),
])
def test_each_suggested_change_alone_gets_under_the_limit(fields, field, hints):
    error = refusal(**fields)
    assert error.field == field
    for hint in hints:
        assert hint in str(error), (hint, str(error))
    # Apply each suggestion alone and check that it passes.
    if "num_images" in fields and "`num_images` at most" in str(error):
        parse(**{**fields, "num_images": int(str(error).split("`num_images` at most ")[1][0])})
    steps = int(str(error).split("`num_inference_steps` at most ")[1].split(";")[0])
    parse(**{**fields, "num_inference_steps": steps})
    with pytest.raises(CostLimitExceeded):
        parse(**{**fields, "num_inference_steps": steps + 1})
    if "`guidance_scale` 1 or less" in str(error):
        parse(**{**fields, "guidance_scale": 1.0})
    if "`width` x `height` at most " in str(error):
        size = str(error).split("`width` x `height` at most ")[1].split(";")[0]
        width, height = (int(side) for side in size.split("x"))
        parse(**{**fields, "width": width, "height": height})


def test_no_single_change_fits_then_the_message_says_lower_several():
    tight = replace(SDXL_LIMITS, max_request_cost=0.02)
    message = str(refusal(tight, num_images=2, width=2048, height=2048))
    assert "lower several of" in message


def test_the_limit_comes_from_settings_and_the_environment():
    settings = Settings.from_mapping({"max_request_cost": 2, "max_call_cost": 3}, env={})
    assert (settings.max_request_cost, settings.max_call_cost) == (2.0, 3.0)
    settings = Settings.from_mapping({}, env={"SDXL_MAX_REQUEST_COST": "6",
                                              "SDXL_MAX_CALL_COST": "12"})
    assert (settings.max_request_cost, settings.max_call_cost) == (6.0, 12.0)
    assert (Settings().max_request_cost, Settings().max_call_cost) == (4.0, 8.0)


@pytest.mark.parametrize("config, words", [
    ({"max_request_cost": 8, "max_call_cost": 4}, "max_call_cost (4.0) must be at least"),
    ({"max_request_cost": 0}, "max_request_cost must be between"),
    ({"max_call_cost": "lots"}, "max_call_cost has a bad value"),
])
def test_bad_cost_settings_fail_naming_the_setting(config, words):
    with pytest.raises(SettingsError, match=words.replace("(", r"\(").replace(")", r"\)")):
        Settings.from_mapping(config, env={})


def test_the_batcher_splits_a_group_at_the_call_cost():
    # Five compatible requests of cost 3: at most two (6) per call of cost 8.
    groups = plan_groups([3.0] * 5, key=lambda r: 0, size=lambda r: 1, max_images=8,
                         cost=lambda r: r, max_cost=8)
    assert groups == [[0, 1], [2, 3], [4]]
    # Exactly at the limit fits, despite float sums (0.1 * 3 > 0.3 in binary).
    assert plan_groups([0.1] * 3, key=lambda r: 0, size=lambda r: 1, max_images=8,
                       cost=lambda r: r, max_cost=0.3) == [[0, 1, 2]]
    # The image limit still applies with the cost limit.
    assert plan_groups([1.0] * 3, key=lambda r: 0, size=lambda r: 2, max_images=4,
                       cost=lambda r: r, max_cost=100) == [[0, 1], [2]]


def test_no_pipeline_call_exceeds_the_call_cost_and_every_request_is_served():
    requests = [parse(seed=i, num_images=n) for i, n in enumerate([4, 1, 3, 2, 4, 1])]
    calls = []

    def generate(group):
        calls.append(sum(request_cost(r, SDXL_LIMITS) for r in group))
        return [r.seed for r in group]

    results = run_batched(requests, generate, key=lambda r: r.compat_key,
                          size=lambda r: r.num_images, max_images=64,
                          cost=lambda r: request_cost(r, SDXL_LIMITS), max_cost=8)
    assert results == [0, 1, 2, 3, 4, 5]
    # Arrival order, cut where the next request would go over 8: 4+1+3, then 2+4+1.
    assert calls == [8.0, 7.0]
    # Without the cost limit all six would have been one call of 15 default requests.
    calls.clear()
    run_batched(requests, generate, key=lambda r: r.compat_key, size=lambda r: r.num_images,
                max_images=64)
    assert calls == [15.0]

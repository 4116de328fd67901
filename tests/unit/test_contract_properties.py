"""Property-based tests: whatever arrives, the contract answers with a request or a 4xx
that names a field; it never raises anything else."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sdxl_serve.contract import FIELD_NAMES, ModelLimits, RequestError, parse_request
from sdxl_serve.service import error_reply

pytestmark = pytest.mark.unit
LIMITS = ModelLimits(default_size=64, min_size=32, max_size=128, max_num_images=4)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True)
    | st.text(max_size=50),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)


def outcome(raw) -> None:
    try:
        parse_request(raw, LIMITS)
    except RequestError as exc:
        assert 400 <= exc.status < 500
        message = str(exc)
        if exc.field == "body":
            assert "body" in message
        else:
            # The message names the field it is about (as its repr() if not printable).
            assert f"`{exc.field}`" in message or f"`{exc.field!r}`" in message
            assert message.isprintable()
        reply = error_reply(exc, "req-1")
        assert reply.status == exc.status and reply.json()["field"] == exc.field


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_any_json_value_is_a_request_or_a_named_4xx(value):
    outcome(json.dumps(value).encode())
    outcome(value)  # already decoded by the server


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(FIELD_NAMES), json_values)
def test_any_field_with_any_type(name, value):
    body = {"prompt": "a fox", name: value}
    outcome(json.dumps(body).encode())


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes(raw):
    outcome(raw)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=80), json_values, max_size=5))
def test_any_object(body):
    outcome(json.dumps(body).encode())

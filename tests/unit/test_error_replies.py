"""One failure, the replies of the requests it failed: each its own, as alone, and the
failure logged once, naming them all (a batch that failed as one logged the same traceback
once per request)."""

from __future__ import annotations

import json
import logging

import pytest

from sdxl_serve.contract import RequestError
from sdxl_serve.engine_process import EngineStalled, EngineStalledBeforeTaking
from sdxl_serve.service import GenerationCancelled, error_replies

pytestmark = pytest.mark.unit
IDS = ["a", "b", "c", "d"]


def raised(exc: Exception) -> Exception:
    """``exc`` with a traceback, as a failure reaches ``error_replies``."""
    try:
        raise exc
    except Exception as caught:  # noqa: BLE001 - handed on
        return caught


def test_a_failure_of_ours_is_logged_once_with_every_request_id(caplog):
    with caplog.at_level(logging.ERROR, logger="sdxl_serve.service"):
        replies = error_replies(raised(RuntimeError("boom")), IDS)
    # Each request's own reply, byte for byte what it was: its id, never the exception's
    # words (they may quote the request).
    assert [reply.body for reply in replies] == [json.dumps({
        "code": 500, "type": "InternalServerError",
        "message": f"generation failed; quote request id {request_id} when reporting it",
        "request_id": request_id}).encode() for request_id in IDS]
    [logged] = caplog.records
    assert logged.getMessage() == "4 requests (a, b, c, d) failed: boom"
    assert logged.exc_info[1].args == ("boom",)  # the traceback, once


def test_one_request_is_logged_as_it_was(caplog):
    with caplog.at_level(logging.ERROR, logger="sdxl_serve.service"):
        [reply] = error_replies(raised(RuntimeError("boom")), ["a"])
    assert [record.getMessage() for record in caplog.records] == ["request a failed: boom"]
    assert reply.json()["request_id"] == "a"


def test_a_stalled_engine_is_one_line_for_the_batch_and_each_reply_quotes_its_own_id(caplog):
    with caplog.at_level(logging.ERROR, logger="sdxl_serve.service"):
        replies = error_replies(raised(EngineStalled(123, 60)), IDS[:2])
    [logged] = caplog.records
    assert logged.getMessage() == ("2 requests (a, b): engine process 123 sent nothing for "
                                   "60 s (engine_stall_s) while it owed an answer; it was "
                                   "ended; answering each with an error")
    assert logged.exc_info is None
    for request_id, reply in zip(IDS[:2], replies, strict=True):
        assert reply.status == 500 and reply.json() == {
            "code": 500, "type": "EngineStalled", "request_id": request_id,
            "message": "generation stopped making progress for 60 s (a stuck GPU or driver "
                       "call?), so the engine process was replaced and the request not run "
                       f"again. Quote request id {request_id} when reporting it"}


def test_an_engine_that_hung_before_taking_the_request_does_not_say_it_ran():
    # Hung writing an earlier request's profile, it never took this one: "not run again",
    # its parent's words, was false (a reviewer's finding); the worker runs such a request
    # again, so only a caller of EngineProcess alone gets this reply.
    [reply] = error_replies(raised(EngineStalledBeforeTaking(123, 60)), ["a"])
    assert reply.status == 500 and reply.json() == {
        "code": 500, "type": "EngineStalled", "request_id": "a",
        "message": "the engine process hung for 60 s writing an earlier request's profile, "
                   "before it took this request, so it was replaced; this request did not "
                   "run and may be sent again. Quote request id a when reporting it"}


@pytest.mark.parametrize("exc, status", [(RequestError("width", "`width` must be ..."), 400),
                                         (GenerationCancelled(), 499),
                                         (MemoryError(), 507)])
def test_what_is_no_failure_of_ours_is_not_logged(caplog, exc, status):
    with caplog.at_level(logging.DEBUG, logger="sdxl_serve.service"):
        replies = error_replies(raised(exc), IDS)
    assert [(reply.status, reply.json()["request_id"]) for reply in replies] == \
        [(status, request_id) for request_id in IDS]
    assert caplog.records == []

"""Schemathesis hooks for tests/jobs/test_openapi_conformance.py: the answers to a valid
request that the OpenAPI document says in words, because a JSON schema cannot say them.

Each is dropped only as the exact refusal it is (its status, type and words); any other
answer to the same request still fails the run.
"""

from __future__ import annotations

import schemathesis


def excused(check_code: str, path: str, status: int, body: object) -> str | None:
    """Why a failure is the document's stated behaviour, or None when it is a failure.

    >>> excused("ST202", "/v1/jobs", 400, {"type": "CostLimitExceeded"})
    'a request over the cost limit (a product of four fields)'
    >>> excused("ST202", "/v1/jobs", 400, {"type": "InvalidRequest"}) is None
    True
    """
    if not isinstance(body, dict):
        return None
    message = str(body.get("message", ""))
    if check_code == "ST202" and status == 400 and body.get("type") == "CostLimitExceeded":
        return "a request over the cost limit (a product of four fields)"
    if check_code == "ST202" and status == 400 and body.get("field") == "webhook" \
            and "is not an allowed destination" in message:
        return "a webhook to a host the operator does not allow"
    if check_code == "ST202" and status == 400 and body.get("field") == "webhook" \
            and "whose host a name lookup can find" in message:
        return "a webhook host with a label past 63 characters (said in words, as the port)"
    if check_code == "ST202" and status == 400 and body.get("field") == "num_images" \
            and "must be an integer from 1 to" in message:
        return "more images than the server's max_num_images (said in words; 4 here)"
    if check_code == "ST202" and status == 400 and body.get("field") in ("width", "height") \
            and "must be a multiple of 8 from" in message:
        return "a size outside the served model's (said in words; SDXL's here)"
    if check_code == "ST202" and status == 422 and body.get("type") == "IdempotencyConflict":
        return "an Idempotency-Key used before with another body (the generator repeats keys)"
    if check_code == "ST101" and path == "/v1/health" and status == 503 \
            and "dispatcher(s) checked in" in message:
        return "fewer dispatchers than `?dispatchers=` asks for (none run here)"
    return None


@schemathesis.hook
def filter_failure(context, failure, case, response) -> bool:
    try:
        body = response.json()
    except ValueError:
        body = None
    return excused(type(failure).code, case.path, response.status_code, body) is None

"""Schemathesis hooks for tests/jobs/test_openapi_conformance.py: the answers to a valid
request that the OpenAPI document says in words, because a JSON schema cannot say them.

Each is dropped only as the exact refusal it is (its status, type and words); any other
answer to the same request still fails the run.
"""

from __future__ import annotations

import schemathesis

# The served model's bounds in the test (its dispatchers publish them): as wide as the
# document's own, so that a generated size or num_images is read as any server reads it,
# and the fields after them are read too. At SDXL's (512 to 2048, 4 images) nearly every
# generated body was refused at its width, the smallest the document allows (8), and none
# that set a size was ever taken. The document gives no largest size (each model has its
# own): one above max_size is the one refusal a server may give a size it allows.
SERVED_LIMITS = {"default_size": 1024, "min_size": 8, "max_size": 1 << 20,
                 "max_num_images": 64}


def excused(check_code: str, path: str, status: int, body: object,
            sent: object = None) -> str | None:
    """Why a failure is the document's stated behaviour, or None when it is a failure;
    ``sent`` is the request's body.

    >>> excused("ST202", "/v1/jobs", 400, {"type": "CostLimitExceeded"})
    'a request over the cost limit (a product of four fields)'
    >>> excused("ST202", "/v1/jobs", 400, {"type": "InvalidRequest"}) is None
    True
    >>> size = {"type": "InvalidRequest", "field": "width",
    ...         "message": "`width` must be a multiple of 8 from 8 to 1048576, got 16"}
    >>> excused("ST202", "/v1/jobs", 400, size, {"width": 16}) is None
    True
    >>> excused("ST202", "/v1/jobs", 400, size, {"width": 2 << 20})
    "a size above the served model's largest (said in words)"
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
    field = body.get("field")
    if check_code == "ST202" and status == 400 and field in ("width", "height") \
            and "must be a multiple of 8 from" in message and isinstance(sent, dict) \
            and isinstance(sent.get(field), int) and sent[field] > SERVED_LIMITS["max_size"]:
        return "a size above the served model's largest (said in words)"
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
    return excused(type(failure).code, case.path, response.status_code, body,
                   case.body) is None

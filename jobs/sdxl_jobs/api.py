"""The job API: submit, watch, cancel and fetch SDXL generations (FastAPI).

Routes are thin: the request is validated by ``sdxl_serve.contract`` (the same declaration,
the same 4xx naming the field as ``/predictions``), jobs live in Redis through
``store.JobStore``, and every error, ours or the framework's, leaves through one handler in
the same JSON shape as the TorchServe path: ``{"code", "type", "message", "field"?,
"request_id"}``.

The playground page (``/``, files in ``playground/``) is a client of these same routes: it
builds its form from ``/v1/request-schema`` and sends the key as every other client does.

Usage: python -m sdxl_jobs.api --redis URL [--address http://127.0.0.1:8090]
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import logging
import os
import re
import secrets
import sys
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any, AsyncIterator, Awaitable, get_origin

import h11
import uvicorn
from fastapi import Depends, FastAPI, Query, Request
from fastapi import Path as PathParameter
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from PIL import Image
from pydantic import BaseModel
from redis.exceptions import OutOfMemoryError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match
from uvicorn.config import STARTUP_FAILURE
from uvicorn.protocols.http.h11_impl import H11Protocol

from sdxl_serve.contract import (FIELD_NAMES, FIELDS, MOST_NUM_IMAGES, SDXL_LIMITS,
                                 SIZE_MULTIPLE, ModelLimits, RequestError, check_cost,
                                 check_field_names, decode_object, json_schema, number_text,
                                 parse_fields)
from sdxl_serve.server import HTTP_ADDRESS, address_setting
from sdxl_jobs.retention import keep_forgetting
from sdxl_jobs.settings import JobSettings, command_parser
from sdxl_jobs.store import (FINAL_STATES, LONGEST_BLOCK_MS, RUN_BUCKETS, STATES, WAIT_BUCKETS,
                             NO_EVICTION, JobStore, Place, RepeatedWarnings, answered_within,
                             no_connection_free, reason_to_log, refused_unrun, usable_at_start)
from sdxl_jobs.views import job_view, retention_s
from sdxl_jobs.webhooks import EVENTS, WebhookRefused, check_webhook

log = logging.getLogger("sdxl_jobs.api")

DISPATCHER_FRESH_S = 30.0
# How long /v1/health and /metrics wait for Redis's answers. A Redis that takes the
# connection and never answers (stopped, paused, a proxy with nothing behind it) held each
# call for the socket timeout, 30 s, while the readiness probe gives up after 5 s
# (timeoutSeconds) and Prometheus after 10 s (scrapeTimeout), neither with a reason, and
# the calls held piled up. Within this each is a 503 that says why; a Redis that answers
# at all does in milliseconds. Below both figures (tests/k8s compares them).
PROBE_REDIS_S = 3.0
# How long every other route waits for one answer of Redis (a blocking read: this beyond its
# block). A Redis that takes the connection and never answers held each call for the socket
# timeout, 30 s, then answered the 503 it gives now within this: a Redis that answers at
# all does in milliseconds, a 12 MB image included, and a client, a load balancer (AWS's
# idle timeout, 60 s) or an ingress (nginx's proxy_read_timeout, 60 s) that waits less than
# 30 s had already given up without Retry-After. As long as a connection alone may take
# (``socket_connect_timeout``), so a reconnect after Redis restarted is not cut short.
STORE_ANSWER_S = 5.0
MODEL_INFO_CACHE_S = 5.0
# What a submit may hold: the contract's fields and the job API's own.
SUBMIT_FIELDS = (*FIELD_NAMES, "webhook", "webhook_events")
# A Redis stream id, as `Last-Event-ID` may give it: two numbers of up to 19 ASCII digits
# (\d takes any script's), so each is within Redis's unsigned 64 bits without a comparison
# the OpenAPI document could not state. (Our ids are milliseconds and a count: 13 and 1.)
EVENT_ID_PATTERN = "^([0-9]{1,19}-[0-9]{1,19})?$"  # empty: from the start
# A page's `next_cursor`: the submit time as repr() writes it (never an exponent for a Unix
# time) and the job's id; as a pattern, so the document states the rule the server checks.
CURSOR_PATTERN = "^[0-9]{1,16}(\\.[0-9]{1,17})?-[0-9a-f]{32}$"
MAX_IDEMPOTENCY_KEY = 200
# An integer parameter as the document's `integer` reads in a URL: no sign but `-`, no
# fraction, exponent, spaces or `_` (each of which pydantic's lax parsing took).
INTEGER_PATTERN = "-?[0-9]+"
# `Prefer` as RFC 7240 writes it: preferences separated by commas, each a name (any case),
# perhaps `=` and a value (a token or a quoted string, whose commas and semicolons are its
# own), perhaps parameters after `;`, blanks (space, tab) around each part. Only the first
# `wait` counts (RFC 7240: a repeated preference is ignored), and its value must be whole
# seconds (ASCII digits, quoted or not); any other preference, or anything malformed that is
# not a `wait`, is ignored, as the RFC asks of preferences a server does not know. One
# pattern, for the server's check and the document's rule, in the regex syntax both Python
# and JSON Schema read: it matches a header without a `wait`, or whose first `wait` is good
# (its seconds in group 1).
_OWS = "[ \\t]*"
_QUOTED = '"(?:[^"\\\\]|\\\\[\\s\\S])*(?:"|\\\\?$)'  # unterminated: to the end
_ELEMENT = f'(?:[^,"]|{_QUOTED})*'  # one preference, up to a comma outside quotes
_WAIT_NAME = f"{_OWS}[wW][aA][iI][tT]{_OWS}"
_NOT_WAIT = f"(?!{_WAIT_NAME}(?:[=;,]|$)){_ELEMENT}"
_SECONDS = '[0-9]+|"(?:\\\\?[0-9])+"'  # a quoted string may escape its digits (RFC 9110)
PREFER_PATTERN = (f"^(?:{_NOT_WAIT},)*(?:{_NOT_WAIT}$|"
                  f"{_WAIT_NAME}={_OWS}({_SECONDS}){_OWS}(?:[;,]|$))")
# The first `wait` preference in a header PREFER_PATTERN refused, to quote it.
FIRST_WAIT = f"^(?:{_NOT_WAIT},)*({_ELEMENT})"
# `Content-Encoding` as a submit may send it: no coding but `identity` (any case), in RFC
# 9110's list form (several lines are one list; blanks and empty elements are nothing). The
# body is read as sent: gzip, deflate or br was read as JSON and refused as "not JSON", a
# 400 about the body for what its header said. One pattern, for the check and the document.
_IDENTITY = "[iI][dD][eE][nN][tT][iI][tT][yY]"
CONTENT_ENCODING_PATTERN = (f"^{_OWS}(?:{_IDENTITY})?{_OWS}"
                            f"(?:,{_OWS}(?:{_IDENTITY})?{_OWS})*$")
# Any case: the ids are 32 lower-case hex digits, but hex is the same number in either case,
# as UUIDs are read (RFC 9562), and an id pasted from a tool that upper-cases it is still one.
JOB_ID_PATTERN = "^[0-9a-fA-F]{32}$"
KEEPALIVE_S = 15.0
# What a stream refused past SDXL_JOBS_MAX_WAITING is told: waits end as their jobs do
# (seconds for a small job) or at `Prefer: wait`'s end, so places come free that often.
WAITING_RETRY_AFTER_S = 5
# What a call is told when no connection of the replica's pool for calls came free within
# CALL_CONNECTION_S: calls hold one for milliseconds, so a burst is over within seconds.
CALLS_RETRY_AFTER_S = 2
# A body left unread (over the size limit, or refused before it was read) is still read and
# dropped up to this many times the limit, so the client gets the reply (BodyDeadline).
DRAIN_FACTOR = 8
# A request's line and headers, at most: h11's cap on an incomplete head, now on every head
# (HeadDeadline).
MAX_HEAD_BYTES = 16 * 1024
# An image's preview (`?max_side=N`): a list's thumbnail (the playground's shows 56 px, at
# 128) is a few KiB, where the image is 1 to 2 MB at SDXL's 1024 px, 6 to 12 MB at 2048.
PREVIEW_SIDES = (16, 512)
# JPEG whatever the image's own format: for a 256 px preview of a 2048 px PNG, 17 KB (q85)
# where PNG gives 116 KB; WebP's 10 KB cost 5 ms to encode where JPEG's took 0.2, and
# every client and library reads JPEG.
PREVIEW_QUALITY = 85
# Decoding the image is most of a preview's cost: 45 to 110 ms for a 2048 px PNG, 28 ms at
# 1024 px, on one core (measured). Off the event loop, on threads of their own: a pool
# sized by the cores would decode as many at once as the node has cores (12 MB of pixels
# each) in a pod of 1 GiB, and the loop's default pool also resolves Redis's host name.
PREVIEW_THREADS = 2
# Previews that may wait for those threads, each holding its image's bytes; past them a 503
# with Retry-After. Nothing bounded them: a burst of preview requests queued without end,
# 12 MB each for a 2048 px PNG, in a pod of 1 GiB. Two playground lists' worth (12
# thumbnails each) wait: about 1.3 s of work (24 x 110 ms on two threads) and, at worst,
# 24 x 12 MB = 288 MB.
PREVIEWS_WAITING = 24
# What a refused preview is told: the queue above drains in about that.
PREVIEW_RETRY_AFTER_S = 2
# A finished job's images never change (its final state takes no more writes), so the job
# id and index name the bytes; a preview's tag is weak, its bytes being the encoder's.
# `no-cache`: a client may keep an image but asks before each use, so the key is checked
# every time (a cache does not vary on Authorization); the answer is a 304 without the bytes.
IMAGE_CACHE_CONTROL = "private, no-cache"
PLAYGROUND = Path(__file__).resolve().parent / "playground"
PLAYGROUND_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                    ".css": "text/css; charset=utf-8"}
# The page loads nothing from elsewhere and runs no inline script, so an injected string
# cannot run or send the key anywhere; images are blob: URLs (fetched with the key).
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "img-src 'self' blob:; connect-src 'self'; form-action 'none'; "
                               "base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


class ApiError(Exception):
    """An answer other than success: status, type and a message that says what to do."""

    def __init__(self, status: int, kind: str, message: str, field: str | None = None,
                 headers: dict[str, str] | None = None, extra: dict[str, Any] | None = None):
        super().__init__(message)
        self.status, self.kind, self.field, self.headers = status, kind, field, headers or {}
        self.extra = extra or {}

    @classmethod
    def refused(cls, exc: RequestError) -> "ApiError":
        """The contract's own refusal, in its own words and shape (a cost refusal keeps its
        cost, limit and fields), as /predictions gives it."""
        body = exc.to_json()
        extra = {k: v for k, v in body.items() if k not in ("code", "type", "field", "message")}
        return cls(exc.status, body["type"], str(exc), exc.field, extra=extra)


# A job's id in a path, as the document states it (checked by hand: see job_id_of).
JobIdPath = Annotated[str, PathParameter(description="The job's `id`",
                                         json_schema_extra={"pattern": JOB_ID_PATTERN})]


def sent_once(request: Request, header: str) -> str | None:
    """The value of ``header``, None when not sent; 400 when sent more than once. None of
    ours is a list header: which one counts would be a guess (Starlette's `get` took the
    first, where a proxy in front may go by the last)."""
    values = request.headers.getlist(header)
    if len(values) > 1:
        raise ApiError(400, "InvalidRequest", f"`{header}` must be sent once, got "
                                              f"{len(values)}", header)
    return values[0] if values else None


def place_of(cursor: str | None) -> Place | None:
    """Where a page of the job list ends, from its `next_cursor` (``<submit time>-<id>``).

    >>> place_of("1764800000.25-" + "a" * 32) == (1764800000.25, "a" * 32)
    True
    >>> place_of("nan-1")
    Traceback (most recent call last):
    ...
    sdxl_jobs.api.ApiError: `cursor` must be a `next_cursor` of this list, got "nan-1"
    """
    if cursor is None:
        return None
    if not re.fullmatch(CURSOR_PATTERN, cursor):  # fullmatch: "$" passes a final "\n"
        raise ApiError(400, "InvalidRequest", "`cursor` must be a `next_cursor` of this list, "
                                              f"got {json.dumps(cursor[:80])}", "cursor")
    at, _, job_id = cursor.rpartition("-")
    return float(at), job_id


def not_found(job_id: str) -> ApiError:
    # Unknown, expired and someone else's look the same: ids do not leak across keys. No TTL
    # is quoted: the job was kept for that of the process that ended it (its `kept_s`), which
    # went with its record, and this replica's own may differ.
    return ApiError(404, "NotFound", f"no job {job_id[:40]!r} for this key: it never existed, "
                                     f"or it ended and its results expired")


def image_gone(job: dict, job_id: str, index: int, ttl_s: int) -> ApiError:
    # The job is kept and this image is not: gone a moment before its job (the same expiry),
    # or deleted by a Redis that evicts keys (volatile-lru takes the idlest keys with an
    # expiry: a finished job's images first). "No job", said before, contradicted the job.
    return ApiError(404, "NotFound", f"image {index} of job {job_id} is no longer kept: its "
                                     f"results expired ({retention_s(job, ttl_s):.15g} s after "
                                     f"the job ended), or Redis evicted it when full", "index")


def error_body(status: int, kind: str, message: str, request_id: str | None,
               field: str | None = None, extra: dict[str, Any] | None = None) -> dict:
    """The API's error shape (``ErrorBody``), for every way an error goes out: an answer, a
    refused request head, an event stream's last event."""
    body = {**(extra or {}), "code": status, "type": kind, "message": message,
            "request_id": request_id}
    if field is not None:
        body["field"] = field
    return body


def stream_unavailable(request_id: str) -> bytes:
    """The last event of a stream whose job store failed: a 503's body (the stream's 200 is
    sent), and its Retry-After as `retry:`, when an EventSource comes back."""
    body = error_body(503, "Unavailable", "the job store (Redis) is unavailable, so this "
                      "stream ends; the job is kept: reconnect with Last-Event-ID shortly",
                      request_id)
    return f"retry: 5000\nevent: unavailable\ndata: {json.dumps(body)}\n\n".encode()


def stream_expired(request_id: str) -> bytes:
    """The last event of a stream whose job expired under it: the 404's body a read of the
    job then gets. Its `message` is the one the event carried alone before it had the
    errors' shape, for the clients that read it."""
    body = error_body(404, "NotFound", "the job expired", request_id)
    return f"event: expired\ndata: {json.dumps(body)}\n\n".encode()


# --- What goes out (for the OpenAPI document; handlers return JSON directly). -----------
class Progress(BaseModel):
    step: int
    total: int


class ErrorBody(BaseModel):
    code: int
    type: str
    message: str
    field: str | None = None
    request_id: str | None = None


class Job(BaseModel):
    id: str
    status: str
    created_at: str
    started_at: str | None
    finished_at: str | None
    queue_position: int | None
    estimated_start_at: str | None
    progress: Progress
    attempts: int
    request: dict[str, Any]
    seeds: list[int]
    timings: dict[str, float | None]
    links: dict[str, str]
    expires_at: str | None = None
    images: list[str] | None = None
    result: dict[str, Any] | None = None
    error: ErrorBody | None = None
    webhook: str | None = None
    webhook_events: list[str] | None = None


class JobList(BaseModel):
    jobs: list[Job]
    next_cursor: str | None = None


class RequestDeclaration(BaseModel):
    request_schema: dict[str, Any]
    limits: dict[str, Any]
    model_version: str | None


class Health(BaseModel):
    status: str
    redis: str
    dispatchers: int


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The error answers a route can give, for the OpenAPI document: a client generated from
    it knows these and no others, so each route lists its own (every /v1 route answers 400
    to a query parameter it does not take; every route that reads Redis, 503). Those any
    request can get, 400 (not HTTP), 408 and 431, are added to every route
    (``CONNECTION_ERRORS``)."""
    return {code: {"model": ErrorBody} for code in sorted(codes)}


# What every route of one job can answer: 400 (a query parameter it does not take), 401 (no
# key, or an unknown one), 404 (no job of this key by that id), 503 (Redis unavailable).
JOB_ERRORS = (400, 401, 404, 503)


# A webhook URL as check_webhook takes it, as far as a pattern can say: http(s), printable
# ASCII, a host and no credentials (no "@" before the path). Its port, its host's form and
# whether the operator allows that host are said in words.
WEBHOOK_PATTERN = '^[hH][tT][tT][pP][sS]?://[!"$-.0-9;->A-~][!"$-.0->A-~]*([/?#][!-~]*)?$'


def submit_schema(limits: ModelLimits) -> dict[str, Any]:
    """The POST /v1/jobs body as the job API reads it, at ``limits``: the contract's JSON
    schema, each of its fields with its rule in words (``x-rule``, the words its errors
    use), `stream` false only, the webhook fields, and null for any field but `prompt`
    ("not given", as ``parse_request`` reads it: a client that writes out every field sends
    them). The one schema of the body: the OpenAPI document gives it at SDXL's bounds
    (``documented_submit_schema``), GET /v1/request-schema at the served model's."""
    schema = json_schema(limits)
    properties = schema["properties"]
    for field in FIELDS:
        properties[field.name]["x-rule"] = field.rule(limits)
    properties["stream"] = {
        "type": "boolean", "const": False,
        "description": "Only false: a job's progress is on GET /v1/jobs/{job_id}/events.",
        "x-rule": "false (progress is on the events stream)"}
    properties["webhook"] = {
        "type": "string", "format": "uri", "maxLength": 2000, "pattern": WEBHOOK_PATTERN,
        "examples": ["https://hooks.example.com/sdxl"],
        "description": "POST the job here (signed, Standard Webhooks) on `webhook_events`: "
                       "an http(s) URL in printable ASCII, without credentials, with a "
                       "port from 1 to 65535 and a host a name lookup can find (labels "
                       "of 1 to 63 characters), to a destination the server's operator "
                       "allows (SDXL_JOBS_WEBHOOK_ALLOW; none by default)."}
    properties["webhook_events"] = {
        "type": "array", "minItems": 1, "items": {"type": "string", "enum": list(EVENTS)},
        "description": "States that trigger the webhook (default: the final ones); only "
                       "with a `webhook`."}
    for name, rule in properties.items():
        if name not in schema["required"]:
            # In the form FastAPI gives an optional model field, which client generators
            # read as an optional type; the words stay beside it.
            words = {key: rule.pop(key) for key in ("description", "default", "examples",
                                                    "x-rule") if key in rule}
            properties[name] = {"anyOf": [rule, {"type": "null"}], **words}
    schema["if"] = {"required": ["webhook_events"],
                    "properties": {"webhook_events": {"type": "array"}}}
    schema["then"] = {"required": ["webhook"], "properties": {"webhook": {"type": "string"}}}
    return schema


class LimitsRead:
    """SDXL's limits, noting which of them are read: a field's default that reads one is
    the server's (its model's or operator's), not every server's. Read, not compared with
    another server's defaults: a limit added later is seen as soon as a default reads it."""

    def __init__(self) -> None:
        self.names: set[str] = set()

    def __getattr__(self, name: str) -> Any:
        self.names.add(name)
        return getattr(SDXL_LIMITS, name)


# The bounds any server keeps (low, high; None for none): a model's sizes are at least
# SIZE_MULTIPLE (half its native size, at least 8) and at most twice its native size.
EVERY_SERVERS_BOUNDS = {"width": (SIZE_MULTIPLE, None), "height": (SIZE_MULTIPLE, None),
                        "num_images": (1, MOST_NUM_IMAGES)}


def documented_submit_schema() -> dict[str, Any]:
    """The POST /v1/jobs body as the OpenAPI document gives it, true of every server:
    ``submit_schema`` at SDXL's bounds, but what a server's model or operator decides at
    every server's bounds, and its default said in words, not as a `default`; GET
    /v1/request-schema gives the served ones. At SDXL's alone, a client generated from it
    could not ask a server set for 64 images for 5, nor a model of 512 px for 256 px, and
    one that sends the defaults it read (as generators' models do) asked 30 steps where
    the operator chose 8 (SDXL_DEFAULT_STEPS), and of a 512 px model 1024 px with guidance
    (30 default requests: refused, over the cost limit of 4)."""
    schema = submit_schema(SDXL_LIMITS)
    for field in FIELDS:
        read = LimitsRead()
        field.default(read)  # type: ignore[arg-type]
        words = schema["properties"][field.name]
        if read.names and "default" in words:
            default = json.dumps(words.pop("default"))
            words["description"] += (f" Default: the server's, {default} at SDXL's "
                                      f"(GET /v1/request-schema gives it).")
        if field.name in EVERY_SERVERS_BOUNDS:
            rule = words["anyOf"][0]
            rule.pop("maximum", None)
            rule["minimum"], high = EVERY_SERVERS_BOUNDS[field.name]
            if high is not None:
                rule["maximum"] = high
            words["x-rule"] = (f"{words['x-rule']} at SDXL's defaults; the server's bounds "
                               f"are GET /v1/request-schema's")
    return schema


async def until_first(*calls: Awaitable[Any]) -> list[asyncio.Future]:
    """Run ``calls`` until the first ends; cancel the others and await every one to its end,
    returning them in order, each done (cancelled, answered or failed).

    Awaited to their end because a cancel is only a request: a call cancelled as it failed
    (a read of Redis's events, Redis killed as the client hung up) ends with that error,
    not cancelled (Python 3.11's wait_for hands it out in place of the cancel), and left
    alone it was asyncio's "Task exception was never retrieved" at ERROR with a traceback.
    """
    running = [asyncio.ensure_future(call) for call in calls]
    try:
        await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for each in running:
            each.cancel()
        await asyncio.wait(running)
    return running


def create_app(settings: JobSettings, store: JobStore) -> FastAPI:
    """The API over one store, served by ``ApiServer`` (``main``): plain ``uvicorn.run``
    serves it too, but never sets ``app.state.stopping``, so a held wait or event stream is
    cut at its stop, not answered."""
    repeated = RepeatedWarnings(log)

    async def known_query(request: Request) -> None:
        """Refuse a query parameter that a /v1 route does not take: `GET /v1/jobs?status=
        failed` answered the unfiltered list, as if it were filtered. Refuse too a parameter
        given twice that is not a list (the last one was taken: `?limit=5&limit=50`, a
        client's two settings, read as one of them), and an integer, in the query or the
        path, written other than in decimal digits: `images/+0` and `max_side=16.0` were
        read as 0 and 16 (pydantic's lax parsing), where the document says integer."""
        route = request.scope.get("route")
        if route is None or not route.path.startswith("/v1/"):
            return
        params = {param.alias: param for param in route.dependant.query_params}
        taken = sorted(params)
        for name in request.query_params:
            if name not in taken:
                takes = ", ".join(f"`{t}`" for t in taken) if taken else "none"
                raise ApiError(400, "InvalidRequest",
                               f"`{name[:40]}` is not a query parameter of "
                               f"{request.method} {route.path} (it takes {takes})", name[:40])
            given = request.query_params.getlist(name)
            if len(given) > 1 and get_origin(params[name].field_info.annotation) is not list:
                raise ApiError(400, "InvalidRequest",
                               f"`{name}` must be given once, got {len(given)} values "
                               f"({', '.join(json.dumps(value[:20]) for value in given[:3])})",
                               name)
        given_at = [(param, request.query_params.get(param.alias)) for param in params.values()]
        given_at += [(param, request.path_params.get(param.alias))
                     for param in route.dependant.path_params]
        for param, value in given_at:
            if param.field_info.annotation is int and value is not None and \
                    not re.fullmatch(INTEGER_PATTERN, value):
                raise ApiError(400, "InvalidRequest",
                               f"`{param.alias}` must be written in digits 0-9 alone, as an "
                               f"integer, got {json.dumps(value[:40])}", param.alias)

    app = FastAPI(title="SDXL job API", version="1.0",
                  dependencies=[Depends(known_query)],
                  description="Asynchronous SDXL generations on a durable Redis queue.",
                  docs_url=None, redoc_url=None,  # Swagger UI loads scripts from the web
                  # A path with a final "/" is a 404 that names the path without it, not
                  # a 307 with an empty body to an absolute URL built from the Host header
                  # (behind a proxy, the API's own address, over http).
                  redirect_slashes=False)
    # Set when the server begins to stop (SIGTERM: a rolling update, a scale down): a held
    # `Prefer: wait` answers then with the job as it is, and an event stream ends, where
    # uvicorn cut both after its 5 s grace, the submit with no answer at all though its job
    # was accepted (`ApiServer`).
    app.state.stopping = asyncio.Event()
    model_cache: dict[str, Any] = {"at": -1e9, "limits": None, "version": None}
    preview_threads = ThreadPoolExecutor(PREVIEW_THREADS, thread_name_prefix="preview")
    previews = {"held": 0}  # being made or waiting for a thread, on this replica

    def hold_preview() -> None:
        """Count one more preview, or refuse it past PREVIEWS_WAITING waiting."""
        if previews["held"] >= PREVIEW_THREADS + PREVIEWS_WAITING:
            raise ApiError(503, "Unavailable", f"{previews['held']} previews are being made "
                                               f"or waiting (the most this server queues); "
                                               f"retry shortly, or fetch the image without "
                                               f"`max_side`", "max_side",
                           headers={"Retry-After": str(PREVIEW_RETRY_AFTER_S)})
        previews["held"] += 1

    def release_preview() -> None:
        previews["held"] -= 1
    # Waits held open per key on this replica: event streams and `Prefer: wait` submits.
    waiting: dict[str, int] = {}

    def hold_wait(who: str) -> str | None:
        """Count one more wait for ``who``; else (nothing counted) the cap that refused it:
        ``key`` (``max_streams_per_key``) or ``replica`` (``max_waiting``, all keys' waits
        together: each holds one of the store's ``max_waiting`` connections for waits)."""
        if waiting.get(who, 0) >= settings.max_streams_per_key:
            return "key"
        if sum(waiting.values()) >= settings.max_waiting:
            return "replica"
        waiting[who] = waiting.get(who, 0) + 1
        return None

    def release_wait(who: str) -> None:
        waiting[who] -= 1
        if not waiting[who]:
            del waiting[who]

    async def from_store(call: Awaitable[Any], asked: str, block_ms: int = 0) -> Any:
        """``call``'s answer from Redis, or a 503 (``store_unavailable``) once Redis has not
        answered ``asked`` within STORE_ANSWER_S; a blocking read's ``block_ms`` (as much as
        the store blocks, at most LONGEST_BLOCK_MS) on top, so a wait that is no fault of
        Redis's (`Prefer: wait`, an event stream between events) is never cut short."""
        return await answered_within(STORE_ANSWER_S + min(block_ms, LONGEST_BLOCK_MS) / 1000,
                                     call, asked)

    # --- Errors: one shape for all. --------------------------------------------------
    def error_response(request: Request, status: int, kind: str, message: str,
                       field: str | None = None, headers: dict[str, str] | None = None,
                       extra: dict[str, Any] | None = None) -> JSONResponse:
        body = error_body(status, kind, message, getattr(request.state, "request_id", None),
                          field, extra)
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(request, exc.status, exc.kind, str(exc), exc.field, exc.headers,
                              exc.extra)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kinds = {404: "NotFound", 405: "MethodNotAllowed"}
        path = request.url.path[:100]
        # Only to a path that exists: /playground/ was pointed to /playground, itself a 404.
        bare = path.rstrip("/")
        hint = f" (without the final /: {bare})" \
            if exc.status_code == 404 and len(path) > 1 and path.endswith("/") and any(
                route.matches({**request.scope, "path": bare})[0] is not Match.NONE
                for route in app.router.routes) else ""
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:
            # Every method of the path: Starlette names only those of the first route that
            # matched it (`Allow: POST` on /v1/jobs, which GET serves too).
            allowed = sorted({method for route in app.router.routes
                              if route.matches(request.scope)[0] is not Match.NONE
                              for method in getattr(route, "methods", None) or ()})
            headers = {**(headers or {}), "Allow": ", ".join(allowed)}
        message = {404: f"no such endpoint: {request.method} {path}{hint}",
                   405: f"{request.method} is not allowed on {path}"}
        return error_response(request, exc.status_code, kinds.get(exc.status_code, "Error"),
                              message.get(exc.status_code, str(exc.detail)), headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        field = str(first["loc"][-1])
        # The value too, as every other refusal says it (cut short: it is the client's).
        got = f", got {json.dumps(first['input'])[:60]}" if "input" in first else ""
        return error_response(request, 400, "InvalidRequest",
                              f"`{field}` {first['msg'].lower()}{got}", field)

    @app.exception_handler(RedisError)
    async def store_unavailable(request: Request, exc: RedisError) -> JSONResponse:
        # Redis restarting, unreachable or out of memory. (A submit that reached Redis may
        # have been accepted: it answers for itself, see submit.)
        # By the route's template: a job's id makes each path a line of its own.
        route = getattr(request.scope.get("route"), "path", request.url.path)
        busy = no_connection_free(exc)
        # Named as what it is: redis-py's "ConnectionError: No connection available." read
        # as Redis being away, where it is this replica's own limit.
        repeated.warning(f"job store unavailable on {request.method} {route}: "
                         + (f"all {settings.redis_connections} connections to Redis busy "
                            f"(SDXL_JOBS_REDIS_CONNECTIONS)" if busy else reason_to_log(exc)))
        if busy:
            # Redis is there: this replica's bounded pool is all taken by a burst of calls.
            return error_response(request, 503, "Unavailable",
                                  f"this server's {settings.redis_connections} connections "
                                  f"to the job store (Redis) are all busy (its limit, "
                                  f"SDXL_JOBS_REDIS_CONNECTIONS); retry shortly",
                                  headers={"Retry-After": str(CALLS_RETRY_AFTER_S)})
        return error_response(request, 503, "Unavailable", "the job store (Redis) is "
                                                           "unavailable; retry shortly",
                              headers={"Retry-After": "5"})

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # With the request_id the answer tells the client to quote: the traceback is found by it.
        request_id = getattr(request.state, "request_id", None)
        log.exception("unexpected error on %s %s (request_id %s)", request.method,
                      request.url.path, request_id)
        # Answered outside the request_id middleware (Starlette's outermost error handler),
        # which adds the header to every other answer.
        return error_response(request, 500, "InternalServerError",
                              "the job API failed unexpectedly; quote the request_id",
                              headers={"x-request-id": request_id} if request_id else None)

    # Added before request_id's, so inside it: its 408 raised from a read then reaches the
    # exception handlers as itself, not wrapped in the ExceptionGroup of request_id's task
    # group (which made it a 500).
    app.add_middleware(BodyDeadline, seconds=settings.body_timeout_s,
                       drain_bytes=DRAIN_FACTOR * settings.max_body_bytes)

    @app.middleware("http")
    async def request_id(request: Request, call_next):
        request.state.request_id = secrets.token_hex(8)
        response = await call_next(request)
        response.headers["x-request-id"] = request.state.request_id
        return response

    # --- Dependencies. ---------------------------------------------------------------
    async def owner(request: Request) -> str:
        scheme, _, token = (sent_once(request, "Authorization") or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "Unauthorized", "send the API key as `Authorization: Bearer "
                                                "<key>`", headers={"WWW-Authenticate": "Bearer"})
        found = await from_store(store.owner_of(token.strip()), "the key's lookup")
        if found is None:
            raise ApiError(401, "Unauthorized", "the API key is not known",
                           headers={"WWW-Authenticate": "Bearer"})
        return found

    async def limits() -> ModelLimits:
        """The served model's bounds, as its dispatchers published them; SDXL's before any
        dispatcher has started (scaled to zero on the first deployment)."""
        now = time.monotonic()
        if now - model_cache["at"] > MODEL_INFO_CACHE_S:
            info = await from_store(store.model(), "the read of the model's bounds") or {}
            published = info.get("limits")
            model_cache.update(at=now, version=info.get("version"),
                               limits=ModelLimits.published(published) if published else None)
        return model_cache["limits"] or SDXL_LIMITS

    def job_id_of(job_id: str) -> str:
        """The stored form of a job id from a path (lower case), or 404 naming the path
        parameter as the document does (`job_id`: what a generated client calls it)."""
        if not re.fullmatch(JOB_ID_PATTERN, job_id):
            raise ApiError(404, "NotFound", f"`job_id` must be a job id (32 hex digits), got "
                                            f"{job_id[:40]!r}", "job_id")
        return job_id.lower()

    async def view(job: dict) -> dict:
        shown = await views([job])
        if not shown:  # read queued, gone since (see ``views``)
            raise not_found(job["id"])
        return shown[0]

    async def views(jobs: list[dict], statuses: frozenset[str] | None = None) -> list[dict]:
        """The jobs' views: the queued ones' positions in one round trip and the throughput
        read once, where a listing read both for each of its queued jobs (a page of 100 was
        500 Redis commands one after another). A job read queued is shown as it is when its
        position is read (``store.with_queue_positions``): a dispatcher may have started it
        (or its owner canceled it) since, and its position read alone was null while its
        view said queued. One gone since (evicted, Redis's data lost) is left out, as is one
        no longer in ``statuses`` (a listing's filter) when given."""
        queued = [job for job in jobs if job["status"] == "queued"]
        now_read: dict[str, tuple[dict, int | None]] = {}
        rate = now = 0.0
        refusing_until = None
        if queued:
            now_read = dict(zip((job["id"] for job in queued), await from_store(
                store.with_queue_positions(queued), "the read of the queue positions")))
            # Redis's time, as the ends the rate counts and the jobs' own times: this
            # replica's clock, minutes off, counted no end and showed no estimate.
            now, rate, refusing_until = await from_store(
                store.throughput(live_s=DISPATCHER_FRESH_S), "the read of the throughput")
        # Every live dispatcher refusing jobs (its pod's breaker open) starts none before
        # the first of them takes jobs again: counted from now, the estimate said a start
        # within seconds at each look for the breaker's whole cool-down.
        first_start = refusing_until or now
        shown = []
        for job in jobs:
            job, position = now_read.get(job["id"], (job, None))
            if not job or statuses is not None and job["status"] not in statuses:
                continue
            estimated = first_start + (position - 1) / rate \
                if position is not None and rate > 0 else None
            shown.append(job_view(job, position, estimated, settings.result_ttl_s))
        return shown

    async def wait_final(job_id: str, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        last = "0-0"
        while (left := deadline - time.monotonic()) > 0:
            block_ms = int(left * 1000) + 1
            for last, event in await from_store(store.events_after(job_id, last, block_ms),
                                                "a wait for the job's events", block_ms):
                if event.get("type") == "status" and event.get("status") in FINAL_STATES:
                    return

    async def wait_final_while_connected(request: Request, job_id: str,
                                         seconds: float) -> None:
        """``wait_final``, given up when the client hangs up: a client whose own timeout is
        shorter than its `Prefer: wait` held one of its key's waits for the whole wait
        (eight of them refused the key's event streams, the playground's too, for a
        minute, with nobody connected)."""
        async def hung_up() -> None:
            # The body is read: what comes now is the disconnect (or a pipelined request's
            # first bytes, which uvicorn holds back, so none).
            while (await request.receive())["type"] != "http.disconnect":
                pass
        waiting, _, _ = await until_first(wait_final(job_id, seconds), hung_up(),
                                          app.state.stopping.wait())
        if not waiting.cancelled() and waiting.exception() is not None:
            raise waiting.exception()  # a RedisError: the submit's one WARNING line says it

    async def read_body(request: Request) -> bytes:
        """The submit body, or 413 past the size limit. What is left of a refused body is
        read and dropped before the 413 goes out (BodyDeadline), and the whole body must
        arrive within ``body_timeout_s`` (408 past it)."""
        limit = settings.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise ApiError(413, "PayloadTooLarge", f"the body has {declared} bytes; the "
                                                   f"limit is {limit}")
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise ApiError(413, "PayloadTooLarge", f"the body is over the limit of "
                                                           f"{limit} bytes")
                chunks.append(chunk)
        except ClientDisconnect:
            # The client hung up mid-body (its own timeout, a dropped network): nothing is
            # queued and nobody reads the answer. It was an ERROR with a traceback, and
            # uvicorn's with another, for every such client.
            raise ApiError(400, "InvalidRequest", "the connection closed before the body "
                                                  "arrived whole", "body") from None
        return b"".join(chunks)

    # --- Routes. ---------------------------------------------------------------------
    @app.post("/v1/jobs", status_code=202, response_model=Job,
              responses={200: {"model": Job, "description": "The job, finished: within "
                               "`Prefer: wait=N`, or replayed for its `Idempotency-Key`",
                               "headers": PREFERENCE_APPLIED},
                         202: {"headers": PREFERENCE_APPLIED},
                          **errors(400, 401, 413, 415, 422, 429, 503),
                          415: {"model": ErrorBody, "description": "The body is declared as "
                                "another type than JSON (`Content-Type`) or sent encoded "
                                "(`Content-Encoding` other than identity)",
                                "headers": ACCEPT_ENCODING}},
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": documented_submit_schema()}}}},
              summary="Submit a generation")
    async def submit(request: Request, who: str = Depends(owner)) -> Response:
        """Validated at once with the same rules as `/predictions`; answers 202 with the job.

        `Idempotency-Key` makes a retried submit return the first job (422 if the body
        differs); `Prefer: wait=N` (N at most SDXL_JOBS_MAX_WAIT_S, 60 by default) answers
        with the finished job if it finishes within N seconds.

        What is wrong with the request itself is refused before what this server limits,
        so that a client fixes its request once: the headers (before the body is read),
        then the body's fields; then the webhook's host and the cost, and in the store the
        `Idempotency-Key`'s first body, the key's active jobs and its rate.
        """
        # 1. The headers: how the body is to be read, and how to answer.
        check_media_type(request.headers.getlist("content-type"))
        check_content_encoding(request.headers.getlist("content-encoding"))
        sent_key = sent_once(request, "Idempotency-Key")
        idempotency_key = sent_key or ""
        if sent_key is not None and not 1 <= len(idempotency_key) <= MAX_IDEMPOTENCY_KEY:
            # An empty one (a client's unset variable) was read as none: its retries each
            # made a job, where the client took them to be safe.
            raise ApiError(400, "InvalidRequest", f"`Idempotency-Key` must be 1 to "
                                                  f"{MAX_IDEMPOTENCY_KEY} characters, got "
                                                  f"{len(idempotency_key)}", "Idempotency-Key")
        # Several `Prefer` lines are one list (RFC 7240); the first `wait` in it counts.
        wait_s = prefer_wait(", ".join(request.headers.getlist("prefer")), settings.max_wait_s)
        raw = await read_body(request)
        try:
            # 2. The body's own fields, at the served model's bounds.
            body = decode_object(raw)
            check_field_names(body, SUBMIT_FIELDS)
            webhook, events = body.pop("webhook", None), body.pop("webhook_events", None)
            served = await limits()
            parsed = parse_fields(body, served)
            if parsed.stream:  # accepted and ignored, it promised what the API does elsewhere
                raise RequestError("stream", "`stream` must be false or absent on the job "
                                             "API: a job's progress is on GET "
                                             "/v1/jobs/{job_id}/events")
            # 3. What this server allows: where a webhook may go, what a request may cost.
            webhook, events = check_webhook(webhook, events, settings)
            check_cost(parsed, served)
        except RequestError as exc:
            raise ApiError.refused(exc) from None
        except WebhookRefused as exc:
            raise ApiError(400, "InvalidRequest", str(exc), exc.field) from None
        normalized = asdict(parsed)
        normalized.pop("stream")  # progress comes from the events stream
        # The request as read, not as written: a retry that writes 30 as 30.0, sends a
        # null for a field it left out before, or spells out a default it left out, is the
        # same request. Only the fields given count (a seed the server draws differs every
        # time), and of those only the ones that differ from their default.
        defaults = {field.name: field.default(served) for field in FIELDS}
        given = {name: normalized[name] for name in body
                 if name in normalized and body[name] is not None
                 and normalized[name] != defaults[name]}
        body_sha = hashlib.sha256(json.dumps(
            {"body": given, "webhook": webhook, "events": events},
            sort_keys=True).encode()).hexdigest()
        try:
            submitted = await from_store(store.submit(
                who, normalized, idempotency_key=idempotency_key, body_sha=body_sha,
                rate_per_minute=settings.rate_per_minute,
                max_active=settings.max_active_per_key, ttl_s=settings.result_ttl_s,
                webhook=webhook, webhook_events=events), "the submit")
        except OutOfMemoryError:
            # Refused at its first write (maxmemory, noeviction): nothing was written.
            repeated.warning("submit refused: the job store is full (maxmemory)")
            raise ApiError(503, "Unavailable", "the job store (Redis) is full and accepts no "
                                               "job now; the job was not accepted: retry "
                                               "later", headers={"Retry-After": "30"}) from None
        except RedisError as exc:
            if no_connection_free(exc):
                raise  # nothing was sent: the busy pool's 503, as every call gets it
            if refused_unrun(exc):  # a failover's replica, too few replicas, a long script
                repeated.warning(f"submit refused: the job store refuses writes "
                                 f"({reason_to_log(exc)})")
                raise ApiError(503, "Unavailable", "the job store (Redis) refuses writes now; "
                                                   "the job was not accepted: retry later",
                               headers={"Retry-After": "5"}) from None
            # The script may have run and only its answer been lost (a connection dropped,
            # a timeout): the job may exist, and a plain retry would make a second one.
            log.warning("submit's outcome unknown: %s", reason_to_log(exc))
            advice = ("retry with the same Idempotency-Key: it answers the job if there is "
                      "one, and makes it if not" if idempotency_key else
                      "list this key's jobs (GET /v1/jobs) before submitting again, and send "
                      "an Idempotency-Key to make retries safe")
            raise ApiError(503, "Unavailable", f"the job store (Redis) failed after the "
                                               f"submit reached it, so the job may have been "
                                               f"accepted; {advice}",
                           headers={"Retry-After": "5"}) from None
        if submitted.outcome == "conflict":
            raise ApiError(422, "IdempotencyConflict",
                           f"this Idempotency-Key was used for job {submitted.job_id} with "
                           f"another body; use a new key for a new job", "Idempotency-Key")
        if submitted.outcome == "rate":
            raise ApiError(429, "RateLimited", f"more than {settings.rate_per_minute} submits "
                                               f"a minute for this key; retry in "
                                               f"{submitted.detail} s",
                           headers={"Retry-After": submitted.detail})
        if submitted.outcome == "cap":
            raise ApiError(429, "TooManyJobs", f"this key already has {submitted.detail} "
                                               f"queued or running jobs (the limit is "
                                               f"{settings.max_active_per_key}); wait for "
                                               f"some to finish", headers={"Retry-After": "5"})
        headers = {"Location": f"/v1/jobs/{submitted.job_id}"}
        try:
            # Past the key's cap on open waits the submit answers at once: Prefer is a
            # preference (RFC 7240), and the job is queued either way.
            held = bool(wait_s) and hold_wait(who) is None
            if held:
                try:
                    await wait_final_while_connected(request, submitted.job_id, wait_s)
                finally:
                    release_wait(who)
            job = await from_store(store.job(submitted.job_id), "the read of the job")
            if job is None:  # expired in the meantime: only with a tiny result TTL
                raise not_found(submitted.job_id)
            shown = await view(job)
        except RedisError as exc:
            log.warning("job %s accepted, then the store failed: %s", submitted.job_id,
                        reason_to_log(exc))
            raise ApiError(503, "Unavailable", f"job {submitted.job_id} was accepted, but the "
                                               f"job store (Redis) failed before it could be "
                                               f"shown; follow it at {headers['Location']}",
                           headers={**headers, "Retry-After": "5"}) from None
        if submitted.outcome == "existing":
            headers["Idempotent-Replayed"] = "true"
        if held or wait_s == 0:
            # Said (RFC 7240), so that a client can tell a 202 after the wait from one given
            # at once past the cap; N as honoured: the client's, or the cap.
            headers["Preference-Applied"] = f"wait={wait_s:.0f}"
        status = 200 if shown["status"] in FINAL_STATES else 202
        return JSONResponse(shown, status_code=status, headers=headers)

    # `str = None`, not `str | None`: a query parameter is never null, and the document
    # would say that it may be. Bounds and patterns are in `json_schema_extra`, checked here
    # by hand, so that a refusal is ours (400, naming the field and the rule).
    @app.get("/v1/jobs", response_model=JobList, responses=errors(400, 401, 503),
             summary="This key's jobs, newest first")
    async def list_jobs(who: str = Depends(owner), limit: Annotated[int, Query(
            description="At most this many jobs (1 to 100)",
            json_schema_extra={"minimum": 1, "maximum": 100})] = 20,
            status: Annotated[list[str], Query(
                description="Only jobs in these states: `?status=queued&status=running`, "
                            "or comma-separated, `?status=queued,running`",
                json_schema_extra={"items": {"type": "string", "enum": list(STATES)},
                                   "minItems": 1})] = None,
            cursor: Annotated[str, Query(
                description="The `next_cursor` of the page before: the jobs submitted "
                            "before that page's last",
                json_schema_extra={"pattern": CURSOR_PATTERN})] = None) -> Response:
        """A page of this key's jobs, newest first, and `next_cursor` for the next (null
        when no job is left). With `status`, a page reads the jobs in those states alone,
        however many others the key has."""
        if not 1 <= limit <= 100:
            raise ApiError(400, "InvalidRequest", f"`limit` must be an integer from 1 to 100, "
                                                  f"got {limit}", "limit")
        statuses = None
        if status is not None:
            # Repeated, as generated clients send a list (most ignore `explode: false`), or
            # comma-separated, as the docs have always shown it: a repeat read as only its
            # last value filtered by one state without a word.
            statuses = frozenset(part.strip() for value in status for part in value.split(","))
            unknown = sorted(statuses - set(STATES))
            if unknown:
                raise ApiError(400, "InvalidRequest",
                               f"`status` must be one or more of {', '.join(STATES)}, "
                               f"comma-separated, got {json.dumps(unknown[0][:40])}", "status")
        page, after = await from_store(store.owned_jobs(who, limit, place_of(cursor), statuses),
                                       "the read of the key's jobs")
        return JSONResponse({"jobs": await views(page, statuses),
                             "next_cursor": after and f"{after[0]!r}-{after[1]}"})

    @app.get("/v1/jobs/{job_id}", response_model=Job, responses=errors(*JOB_ERRORS),
             summary="A job")
    async def get_job(job_id: JobIdPath, who: str = Depends(owner)) -> Response:
        job_id = job_id_of(job_id)
        job = await from_store(store.job(job_id, who), "the read of the job")
        if job is None:
            raise not_found(job_id)
        return JSONResponse(await view(job))

    @app.delete("/v1/jobs/{job_id}", response_model=Job, responses=errors(*JOB_ERRORS, 409),
                summary="Cancel a job")
    async def cancel_job(job_id: JobIdPath, who: str = Depends(owner)) -> Response:
        """A queued job is never run; a running one ends `canceled` at once and its result
        is never stored."""
        job_id = job_id_of(job_id)
        outcome = await from_store(store.cancel(job_id, who, settings.result_ttl_s), "the cancel")
        if outcome == "missing":
            raise not_found(job_id)
        if outcome != "canceled":
            raise ApiError(409, "Conflict", f"job {job_id} already {outcome}; nothing to "
                                            f"cancel")
        job = await from_store(store.job(job_id, who), "the read of the job")
        if job is None:  # it expired in between, with a result_ttl_s of a few seconds
            raise not_found(job_id)
        return JSONResponse(await view(job))

    @app.get("/v1/jobs/{job_id}/images/{index}", responses={
        200: {"content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}},
              "headers": IMAGE_HEADERS},
        304: {"description": "Not modified: `If-None-Match` names this image's `ETag`",
              "headers": IMAGE_HEADERS},
        **errors(*JOB_ERRORS)},
        response_class=Response, summary="An image's bytes, or a preview")
    async def get_image(job_id: JobIdPath,
                        index: Annotated[int, PathParameter(
                            description="Which image, from 0 to the job's `num_images` - 1",
                            # No maximum: a job's count is its own (an operator may allow up
                            # to 64 images), and an index past it is that job's 404.
                            json_schema_extra={"minimum": 0})],
                        request: Request, who: str = Depends(owner),
                        max_side: Annotated[int, Query(
                            description=f"A preview instead of the image: a JPEG no wider "
                                        f"or taller than this many pixels "
                                        f"({PREVIEW_SIDES[0]} to {PREVIEW_SIDES[1]}), its "
                                        f"aspect ratio kept, never larger than the image",
                            json_schema_extra={"minimum": PREVIEW_SIDES[0],
                                               "maximum": PREVIEW_SIDES[1]})] = None
                        ) -> Response:
        """The image as generated, in its `output_format`; with `max_side`, a small JPEG
        of it (a list's thumbnail). `ETag` and `Cache-Control: private, no-cache`: a
        client may keep it and ask again with `If-None-Match`, answered 304."""
        if index < 0:  # the document's minimum: a rule broken, not an image missing (404)
            raise ApiError(400, "InvalidRequest", f"`index` must be an integer from 0 (the "
                                                  f"job's first image), got {index}", "index")
        low, high = PREVIEW_SIDES
        if max_side is not None and not low <= max_side <= high:
            raise ApiError(400, "InvalidRequest", f"`max_side` must be an integer from {low} "
                                                  f"to {high}, got {max_side}", "max_side")
        job_id = job_id_of(job_id)
        job = await from_store(store.job(job_id, who), "the read of the job")
        if job is None:
            raise not_found(job_id)
        if job["status"] != "succeeded":
            raise ApiError(404, "NotFound", f"job {job_id} has no images: it is "
                                            f"{job['status']}")
        count = int(job.get("num_images") or 0)
        if not 0 <= index < count:
            raise ApiError(404, "NotFound", f"image {index} does not exist: the job has "
                                            f"{count} (0 to {count - 1})", "index")
        seed = json.loads(job.get("seeds") or "[]")
        headers = {"X-Seed": str(seed[index])} if index < len(seed) else {}
        headers["Cache-Control"] = IMAGE_CACHE_CONTROL
        headers["ETag"] = f'"{job_id}-{index}"' if max_side is None \
            else f'W/"{job_id}-{index}-{max_side}"'
        if names_etag(", ".join(request.headers.getlist("if-none-match")), headers["ETag"]):
            return Response(status_code=304, headers=headers)
        if max_side is None:
            data = await from_store(store.image(job_id, index), "the read of the image")
            if data is None:
                raise image_gone(job, job_id, index, settings.result_ttl_s)
            fmt = json.loads(job["request"])["output_format"]
            return Response(data, media_type=f"image/{fmt}", headers=headers)
        # Counted from before its bytes are read until its thread is done with them (or it
        # is dropped unstarted): a client that leaves does not free a place its bytes hold.
        hold_preview()
        try:
            data = await from_store(store.image(job_id, index), "the read of the image")
            if data is None:
                raise image_gone(job, job_id, index, settings.result_ttl_s)
            made = preview_threads.submit(preview_jpeg, data, max_side)
        except BaseException:
            release_preview()
            raise
        loop = asyncio.get_running_loop()
        made.add_done_callback(lambda _: loop.call_soon_threadsafe(release_preview))
        return Response(await asyncio.wrap_future(made), media_type="image/jpeg",
                        headers=headers)

    @app.get("/v1/jobs/{job_id}/events", responses={
        200: {"content": {"text/event-stream": {}}},
        204: {"description": "Resumed at or after the final event: nothing more will come"},
        **errors(*JOB_ERRORS, 429)}, summary="Progress (SSE)")
    async def events(job_id: JobIdPath, request: Request,
                     who: str = Depends(owner)) -> Response:
        """Server-Sent Events: `status` on every state change and `progress` on every
        denoising step. `Last-Event-ID` resumes after that event; the stream ends after the
        final state, or with `expired` when the job expired under it: an `ErrorBody` (code
        404, `message` "the job expired"), or with `unavailable` when the job store fails
        under it: an `ErrorBody` (code 503), and `retry: 5000`; the job is kept, so
        reconnect with `Last-Event-ID`, as after a stream that ends with no event (the
        server answering it stops). Resumed at or after the final event (an
        EventSource reconnects after every stream), it is `204`, which tells an
        EventSource to stop reconnecting."""
        job_id = job_id_of(job_id)
        job = await from_store(store.job(job_id, who), "the read of the job")
        if job is None:
            raise not_found(job_id)
        last = sent_once(request, "Last-Event-ID") or ""
        # Checked in full before the stream starts: Redis refuses an id out of range only
        # once the 200 is sent, and the stream would just break.
        if not re.fullmatch(EVENT_ID_PATTERN, last):
            raise ApiError(400, "InvalidRequest", f"`Last-Event-ID` must be an event id such "
                                                  f"as 1700000000000-0 (two numbers of up to "
                                                  f"19 digits), got {last[:40]!r}",
                           "Last-Event-ID")
        last = last or "0-0"
        if job["status"] in FINAL_STATES and not await from_store(
                store.events_after(job_id, last), "the read of the job's events"):
            # A stream would send keep-alives until the job expired, holding a stream slot.
            return Response(status_code=204, headers={"Cache-Control": "no-store"})
        stream_headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        if request.method == "HEAD":  # what GET would answer, without holding a stream open
            return Response(media_type="text/event-stream", headers=stream_headers)
        refused = hold_wait(who)
        if refused == "key":
            raise ApiError(429, "TooManyStreams", f"this key already has "
                                                  f"{settings.max_streams_per_key} event streams "
                                                  f"open (the limit); close one, or poll "
                                                  f"GET /v1/jobs/{job_id}",
                           headers={"Retry-After": "5"})
        if refused == "replica":
            # Before the 200, so a client is told at once and how long to wait, where a
            # stream past Redis's `maxclients` was a 200 ended by its `unavailable` event.
            raise ApiError(503, "Unavailable", f"this server already holds "
                                               f"{settings.max_waiting} event streams and "
                                               f"`Prefer: wait` submits of all keys (its "
                                               f"limit, SDXL_JOBS_MAX_WAITING); retry shortly, "
                                               f"or poll GET /v1/jobs/{job_id}",
                           headers={"Retry-After": str(WAITING_RETRY_AFTER_S)})
        return HeldStream(event_stream(job_id, who, last, request.state.request_id),
                          lambda: release_wait(who), media_type="text/event-stream",
                          headers=stream_headers)

    async def sse(event: dict, job: dict | None, event_id: str | None = None) -> bytes:
        """One server-sent event; given the ``job``, the event carries its whole view (the
        final status event does, however the stream reached it)."""
        if job is not None:
            event = {**event, "job": await view(job)}
        head = f"id: {event_id}\n" if event_id is not None else ""
        return f"{head}event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()

    async def unless_stopping(call: Awaitable[Any]) -> Any:
        """``call``'s answer, or None (``call`` cancelled) once the server begins to stop."""
        answer, _ = await until_first(call, app.state.stopping.wait())
        return None if answer.cancelled() else answer.result()

    async def event_stream(job_id: str, who: str, last: str,
                           request_id: str) -> AsyncIterator[bytes]:
        yield b"retry: 2000\n\n"
        block_ms = int(KEEPALIVE_S * 1000)
        try:
            while True:
                events = await unless_stopping(from_store(
                    store.events_after(job_id, last, block_ms), "a wait for the job's events",
                    block_ms))
                if events is None:
                    # This replica stops (a rolling update): the stream ends whole, and the
                    # client comes back with its Last-Event-ID (to another replica) after
                    # `retry`, where it was cut after uvicorn's 5 s grace, a broken reply.
                    return
                if not events:
                    job = await from_store(store.job(job_id, who), "the read of the job")
                    if job is None:
                        yield stream_expired(request_id)
                        return
                    if job["status"] not in FINAL_STATES:
                        yield b": keep-alive\n\n"
                        continue
                    # Its final event may have come between the wait's end and this read:
                    # sent as it is, with its id, where one made up without an id came
                    # again to an EventSource that reconnected.
                    events = await from_store(store.events_after(job_id, last),
                                              "a look at the job's events")
                    if not events:
                        # Ended with its final event at or before the client's position (an
                        # id from the future): nothing more will come, so say the end and close.
                        yield await sse({"type": "status", "status": job["status"]}, job)
                        return
                for last, event in events:
                    final = event.get("type") == "status" and event.get("status") in FINAL_STATES
                    job = await from_store(store.job(job_id, who), "the read of the job") \
                        if final else None
                    yield await sse(event, job, last)
                    if final:
                        return
        except RedisError as exc:
            # The 200 is sent, so no 503 can say it: a last event does, in the errors' shape,
            # where the stream ended without a word (a failed read of the job with uvicorn's
            # traceback). No id: Last-Event-ID stays the last real event.
            log.warning("event stream of job %s ended: the job store failed (%s)",
                        job_id, reason_to_log(exc))
            yield stream_unavailable(request_id)

    @app.get("/v1/request-schema", response_model=RequestDeclaration,
             responses=errors(400, 503),
             summary="The request, at the served model's bounds (no key)")
    async def request_declaration(served: ModelLimits = Depends(limits)) -> Response:
        """The `POST /v1/jobs` body as JSON Schema, the OpenAPI document's, with the bounds
        the served model published (SDXL's before any dispatcher started), and those
        bounds. The playground builds its form from it, so a field added to the contract
        appears there by itself."""
        return JSONResponse({"request_schema": submit_schema(served),
                             "limits": asdict(served), "model_version": model_cache["version"]})

    # --- The playground: static files, no key (the page asks for one). --------------
    page_files = {path.name: path for path in PLAYGROUND.iterdir() if path.suffix in
                  PLAYGROUND_TYPES} if PLAYGROUND.is_dir() else {}

    def page_file(name: str) -> Response:
        path = page_files.get(name)  # only files that were there at start: no traversal
        if path is None:
            raise ApiError(404, "NotFound", f"no playground file {name[:60]!r}")
        return FileResponse(path, media_type=PLAYGROUND_TYPES[path.suffix],
                            headers=PAGE_HEADERS)

    @app.get("/", include_in_schema=False)
    async def playground() -> Response:
        return page_file("index.html")

    @app.get("/playground/{name}", include_in_schema=False)
    async def playground_file(name: str) -> Response:
        return page_file(name)

    # The description from the figures the route uses, for the document (not a docstring).
    @app.get("/v1/health", summary="Redis and dispatchers (no key)", response_model=Health,
             responses=errors(400, 503), description=(
                 f"200 when Redis answers within {PROBE_REDIS_S:g} s and at least "
                 f"`dispatchers` dispatchers checked in within {DISPATCHER_FRESH_S:g} s; 503 "
                 f"naming what is missing. `?dispatchers=0` checks Redis only (the API's own "
                 f"probe where GPU pods scale to zero)."))
    async def health(request: Request, dispatchers: Annotated[int, Query(
            ge=0, description="How many dispatchers must have checked in (0: Redis only)")
            ] = 1) -> Response:
        async def redis_and_dispatchers() -> tuple[str, int]:
            # A Redis that refuses writes (full, read-only, a full disk: refuses_writes)
            # answers, every read is served and each submit says it was not accepted, so
            # this replica stays in service. A 503 here took every replica out of it, reads and
            # the submits' own 503s with them. sdxl_jobs_store_writable pages instead.
            refusal = await store.refuses_writes()
            said = f"refuses writes: {refusal}" if refusal else "ok"
            return said, await store.live_dispatchers(DISPATCHER_FRESH_S)
        try:
            said, live = await answered_within(PROBE_REDIS_S, redis_and_dispatchers(),
                                               "the health check")
        except RedisTimeoutError:
            # Said from our own figure: redis-py's own timeout words name Redis's host,
            # which an unauthenticated caller is not told.
            return error_response(request, 503, "Unavailable",
                                  f"Redis is unavailable to the API: it does not answer "
                                  f"within {PROBE_REDIS_S:g} s", headers={"Retry-After": "5"})
        except Exception as exc:  # noqa: BLE001 - any Redis failure is "Redis is missing"
            why = "all its connections to Redis are busy (SDXL_JOBS_REDIS_CONNECTIONS)" \
                if no_connection_free(exc) else type(exc).__name__
            return error_response(request, 503, "Unavailable",
                                  f"Redis is unavailable to the API: {why}",
                                  headers={"Retry-After": "5"})
        if live < dispatchers:
            # A dispatcher checks in every 5 s (dispatcher.CHECK_IN_EVERY_S): one that
            # starts is counted within that, so it is when to ask again, said as every
            # other 503 of the API says it.
            return error_response(request, 503, "Unavailable",
                                  f"{live} dispatcher(s) checked in within "
                                  f"{DISPATCHER_FRESH_S:.0f} s; {dispatchers} needed",
                                  headers={"Retry-After": "5"})
        return JSONResponse({"status": "ok", "redis": said, "dispatchers": live})

    @app.get("/metrics", response_class=Response, summary="Prometheus metrics", responses={
        200: {"content": {"text/plain": {"schema": {"type": "string"}}}}, **errors(503)})
    async def metrics() -> Response:
        async def read() -> tuple[dict[str, Any], int, bool, str | None]:
            return (await store.gauges(), await store.live_dispatchers(DISPATCHER_FRESH_S),
                    await store.refuses_writes() is None, await store.eviction_policy())
        # Past the deadline, the 503 of any Redis error (store_unavailable), its log line
        # saying Redis does not answer.
        gauges, live, writable, policy = await answered_within(PROBE_REDIS_S, read(),
                                                               "the reads of /metrics")
        return Response(prometheus_text(gauges, live, writable, policy),
                        media_type="text/plain; version=0.0.4")

    # HEAD wherever GET is served, as RFC 9110 asks of every server (uptime checks and
    # `curl -I` use it): the same route, whose body uvicorn leaves out. FastAPI's routes take
    # only the methods they name (Starlette's own add HEAD to GET). Not in the document:
    # HEAD is implied there, and a generated client would get a second function per route.
    for route in list(app.router.routes):
        if isinstance(route, APIRoute) and "GET" in route.methods:
            app.add_api_route(route.path, route.endpoint, methods=["HEAD"],
                              response_class=route.response_class, include_in_schema=False)
    document_auth_and_headers(app)
    return app


# What a submit answers when it honoured `Prefer: wait` (absent past the key's cap on waits).
PREFERENCE_APPLIED = {"Preference-Applied": {
    "description": "`wait=N` when the submit waited for the job, up to N seconds (the "
                   "`Prefer` header's, or SDXL_JOBS_MAX_WAIT_S if less).",
    "schema": {"type": "string", "pattern": "^wait=[0-9]+$"}}}

# What an image and its preview answer, 200 or 304.
IMAGE_HEADERS = {
    "ETag": {"description": "The image's tag (weak for a preview): send it back as "
                            "`If-None-Match` to be answered 304 without the bytes.",
             "schema": {"type": "string"}},
    "Cache-Control": {"description": "`private, no-cache`: a client may keep the image, "
                                     "and asks again (with its key) before each use.",
                      "schema": {"type": "string", "const": IMAGE_CACHE_CONTROL}},
    "X-Seed": {"description": "The image's seed.", "schema": {"type": "string",
                                                             "pattern": "^[0-9]+$"}}}

# What a submit's 415 says it takes, when its `Content-Encoding` was refused.
ACCEPT_ENCODING = {"Accept-Encoding": {
    "description": "`identity` when the body was refused for its `Content-Encoding`: the "
                   "only coding the API reads.",
    "schema": {"type": "string", "const": "identity"}}}

# Headers the routes read themselves (they are not FastAPI parameters), for the document.
# With their rules as the routes check them, so a client generated from the document sends
# nothing the server refuses.
DOCUMENTED_HEADERS = {
    ("/v1/jobs", "post"): [
        ("Content-Encoding", "`identity` or absent: the body is read as sent; a compressed "
                             "one (gzip, deflate, br) is a 415.",
         {"type": "string", "pattern": CONTENT_ENCODING_PATTERN}),
        ("Idempotency-Key", "A retry with the same key and body returns the first job "
                            "(`Idempotent-Replayed: true`); another body is 422.",
         {"type": "string", "minLength": 1, "maxLength": MAX_IDEMPOTENCY_KEY}),
        ("Prefer", "`wait=N` (N whole seconds, at most SDXL_JOBS_MAX_WAIT_S; `wait=\"N\"` "
                   "too): answer 200 with the finished job if it finishes within N seconds, "
                   "else 202, with `Preference-Applied: wait=N`. As RFC 7240 reads it: names "
                   "in any case, parameters after `;` and other preferences ignored, only the "
                   "first `wait` counts (a first `wait` without whole seconds is a 400).",
         {"type": "string", "pattern": PREFER_PATTERN})],
    ("/v1/jobs/{job_id}/images/{index}", "get"): [
        ("If-None-Match", "`ETag`s of this image (or `*`): answered 304, without the bytes, "
                          "when one is its own.",
         {"type": "string"})],
    ("/v1/jobs/{job_id}/events", "get"): [
        ("Last-Event-ID", "Resume after this event id (`<ms>-<seq>`, as sent in each "
                          "event's `id:`).",
         {"type": "string", "pattern": EVENT_ID_PATTERN})],
}


# What any request can be answered, whatever its route: given before a route is chosen
# (HeadDeadline, BodyDeadline), so FastAPI, which lists what a route declares, does not.
CONNECTION_ERRORS = {
    "400": "Bad Request: the request is not HTTP/1.1 as RFC 9112 writes it (a malformed "
           "request line or header line, a control character, no Host header or two, a "
           "Content-Length that is not one number of up to 20 digits, a Transfer-Encoding "
           "other than chunked, a malformed chunk, a chunk's size line or trailer over 16 "
           "KiB), the message naming which; the connection is closed.",
    "408": "Request Timeout: the request's line and headers did not arrive within "
           "SDXL_JOBS_HEADER_TIMEOUT_S, or its body within SDXL_JOBS_BODY_TIMEOUT_S; the "
           "connection is closed.",
    "431": f"Request Header Fields Too Large: the request line and headers are over "
           f"{MAX_HEAD_BYTES} bytes; the connection is closed.",
}


def document_auth_and_headers(app: FastAPI) -> None:
    """The OpenAPI document says what the routes check by hand: the bearer key on every
    `/v1/jobs` route, and the headers above; what any request can be answered
    (``CONNECTION_ERRORS``); and a query parameter FastAPI cannot parse is our 400 (the
    `RequestValidationError` handler), not FastAPI's 422 shape."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()
        schema["components"]["securitySchemes"] = {"apiKey": {
            "type": "http", "scheme": "bearer",
            "description": "An API key (`python -m sdxl_jobs.keys create`)."}}
        body = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
        error = {"description": "Invalid request", "content": body}
        for path, operations in schema["paths"].items():
            for method, operation in operations.items():
                if path.startswith("/v1/jobs"):
                    operation["security"] = [{"apiKey": []}]
                for name, text, rule in DOCUMENTED_HEADERS.get((path, method), []):
                    operation.setdefault("parameters", []).append(
                        {"name": name, "in": "header", "required": False,
                         "schema": rule, "description": text})
                answers = operation.get("responses", {})
                if "HTTPValidationError" in json.dumps(answers.get("422", {})):
                    del answers["422"]
                    answers.setdefault("400", error)
                for code, text in CONNECTION_ERRORS.items():  # a route's own 400 kept
                    answers.setdefault(code, {"description": text, "content": body})
                operation["responses"] = dict(sorted(answers.items()))
        schema["components"]["schemas"].pop("HTTPValidationError", None)
        schema["components"]["schemas"].pop("ValidationError", None)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


class BodyTimedOut(ApiError):
    """The request's body did not arrive within ``body_timeout_s``."""

    def __init__(self, seconds: float):
        super().__init__(408, "RequestTimeout", f"the request body did not arrive within "
                                                f"{seconds:g} s (the limit); send it whole, "
                                                f"at once")


class BodyDeadline:
    """ASGI middleware: a request's body must arrive within ``seconds`` of its headers, and
    no response leaves a body unread on a connection that stays open.

    uvicorn sets no time limit on a body: a client that declares one and then trickles it,
    or sends nothing, held a connection and the route's task for as long as it liked (seen:
    open after 40 s, one byte a second). Past the deadline a read raises ``BodyTimedOut``
    (408). A reply to a request whose body was not read to its end (a 401 before the body,
    a 413) first reads and drops the rest, up to ``drain_bytes`` and within the same
    deadline, so a client that sends it all before reading gets the reply rather than a
    reset connection (seen: urllib's BrokenPipeError on a 2 MiB body answered at once);
    what is still unread then is not waited for: the reply says ``Connection: close`` and
    uvicorn closes the connection after it (left open, a client trickling after a 401 kept
    it open for good: uvicorn's keep-alive timer stops at the first byte received). So does
    the reply to a request with both a Content-Length and a Transfer-Encoding.
    """

    def __init__(self, app, seconds: float, drain_bytes: int):
        self.app, self.seconds, self.drain_bytes = app, seconds, drain_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        deadline = asyncio.get_running_loop().time() + self.seconds
        body = {"done": False, "size": 0}
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length", b"")
        if not declared.isdigit() and b"transfer-encoding" not in headers:
            body["done"] = True  # no body (h11 reads none without either header)
        # A body framed twice is read by its Transfer-Encoding (h11 does), and RFC 9112 6.1
        # says the connection MUST then close after the reply: h11 kept it open, so what a
        # proxy in front that went by the Content-Length had taken for the rest of the body
        # was answered as a request of its own, smuggled past the proxy.
        framed_twice = b"content-length" in headers and b"transfer-encoding" in headers

        async def timed_receive():
            if body["done"]:  # disconnect listeners of streaming replies wait unbounded
                return await receive()
            left = deadline - asyncio.get_running_loop().time()
            try:  # wait_for, not asyncio.timeout: that is 3.11+, and we support 3.10
                message = await asyncio.wait_for(receive(), max(left, 0.0))
            except asyncio.TimeoutError:
                raise BodyTimedOut(self.seconds) from None
            if message["type"] == "http.request":
                body["size"] += len(message.get("body", b""))
                body["done"] = not message.get("more_body", False)
            else:
                body["done"] = True  # the client went away
            return message

        async def drain() -> None:
            if declared.isdigit() and int(declared) > self.drain_bytes:
                return  # declared far too large: refused unread
            if headers.get(b"expect", b"").lower() == b"100-continue" and not body["size"]:
                return  # the client waits for a 100 before it sends: nothing to drop
            try:
                while not body["done"] and body["size"] <= self.drain_bytes:
                    await timed_receive()
            except BodyTimedOut:
                pass

        async def closing_send(message) -> None:
            if message["type"] == "http.response.start":
                if not body["done"]:
                    await drain()
                if not body["done"] or framed_twice:
                    message = {**message, "headers": [*message.get("headers", []),
                                                      (b"connection", b"close")]}
            await send(message)

        await self.app(scope, timed_receive, closing_send)


# A request head's end as h11 finds it: a blank line, its line ends CRLF or a bare LF (CRLF
# CRLF alone took the body after a head of LFs, sent in the same read, for more head).
HEAD_END = re.compile(rb"\n\r?\n")


def head_size(received: bytes) -> int:
    """The size of the request head at the start of ``received``: to its blank line, or
    all of it while that has not come."""
    end = HEAD_END.search(received)
    return len(received) if end is None else end.end()


# h11's (0.16) reasons for refusing what a client sent, as it words them: whole, or
# before the ": " after which it quotes the bytes ("illegal header line: bytearray(b'...')",
# a whole line: an Authorization with a NUL in it, its key). Only these are told: a text
# of another h11 could hold a client's bytes another way, and they would be in the reply
# and the INFO line.
H11_REASONS = frozenset({
    "Missing mandatory Host: header", "Found multiple Host: headers",
    "Illegal method characters", "Illegal target characters",
    "conflicting Content-Length headers", "bad Content-Length",
    "multiple Transfer-Encoding headers", "Only Transfer-Encoding: chunked is supported",
    "continuation line at start of headers", "no request line received",
    "Receive buffer too long", "Got data when expecting EOF"})
H11_QUOTING_REASONS = frozenset({"illegal request line", "illegal header line",
                                 "illegal chunk header", "malformed chunk footer"})


def h11_reason(fault: BaseException | None) -> str | None:
    """Why h11 refused a request, in its words without any bytes it quotes; None for a
    text it is not known to write (``H11_REASONS``).

    >>> h11_reason(h11.RemoteProtocolError("illegal header line: bytearray(b'X: \\x00')"))
    'illegal header line'
    >>> h11_reason(h11.RemoteProtocolError("Found multiple Host: headers"))
    'Found multiple Host: headers'
    >>> h11_reason(h11.RemoteProtocolError("bad header value Bearer sk-1 (a NUL)")) is None
    True
    """
    if not isinstance(fault, h11.ProtocolError):
        return None
    text = str(fault)
    if text in H11_REASONS:
        return text
    quoting, colon, _ = text.partition(": ")
    return quoting if colon and quoting in H11_QUOTING_REASONS else None


class HeadDeadline(H11Protocol):
    """uvicorn's h11 protocol with a deadline on each request's head (request line and
    headers): ``seconds`` from the connection's start, or from the first bytes of the next
    request on a keep-alive connection. Past it the connection is closed, after a 408 when
    part of a head had come. A head over ``MAX_HEAD_BYTES`` gets a 431 and the connection
    closed, before it is parsed.

    uvicorn (h11) caps a head at 16 KiB only while it is incomplete, and sets no time limit
    on it; its keep-alive timer stops at the first byte received: a client that sent one
    header byte a second held its connection (a socket, a descriptor) for good, as did one
    that connected and sent nothing (seen: both still open after 65 s), and enough of them
    exhaust the process's descriptors. ``BodyDeadline`` cannot see this: the app is called
    only once the head is whole. Time idle between requests is left to uvicorn's keep-alive
    timer. A head pipelined behind a request (sent before its answer) waits in h11's buffer
    while that request runs, and is checked and timed once its answer is sent.

    Why a subclass, and why this shape: uvicorn has no setting for it, and a proxy in front
    is not always there. The hooks overridden are asyncio's own protocol callbacks
    (``connection_made``, ``data_received``, ``connection_lost``) and uvicorn's
    ``on_response_complete`` (where it starts a pipelined request), each calling uvicorn's
    first or last, and whether a head is still awaited is read from h11's public
    ``their_state`` (IDLE until the whole head is parsed); of uvicorn's internals only
    ``conn`` and ``transport`` are used. No uvicorn code is copied, so its fixes still
    apply, and the tests run the real process, so an upgrade that breaks this fails there.

    Example: ``uvicorn.run(app, http=HeadDeadline.within(10.0))``.
    """

    seconds = 10.0
    head_timer: asyncio.TimerHandle | None = None

    @classmethod
    def within(cls, seconds: float) -> type["HeadDeadline"]:
        """This protocol with a deadline of ``seconds`` (uvicorn takes a class, not an
        instance, and builds one per connection)."""
        return type(cls.__name__, (cls,), {"seconds": seconds})

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.start_head_timer()

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE and self.head_too_large(data):
            return
        super().data_received(data)
        # Armed after the bytes are parsed, so a head that comes whole in one read (every
        # normal request) never starts a timer.
        if self.conn.their_state is not h11.IDLE:
            self.stop_head_timer()
        elif self.head_timer is None:
            self.start_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self.stop_head_timer()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        """A request pipelined behind this one (sent before its answer) waited in h11's
        buffer, past ``data_received``'s checks, and uvicorn parses it here: a head of up to
        a whole read (64 KiB and more) was served, and one that had not come whole got no
        deadline until its next bytes. Both are checked now, as if it had just come."""
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE and \
                head_size(bytes(self.conn.trailing_data[0])) > MAX_HEAD_BYTES:
            self.conn.start_next_cycle()  # h11 answers only a connection between requests
            self.head_too_large(b"")
        super().on_response_complete()  # counts the request; closed, it parses nothing
        if self.conn.their_state is h11.IDLE and self.conn.trailing_data[0] and \
                self.head_timer is None and not self.transport.is_closing():
            self.start_head_timer()

    def start_head_timer(self) -> None:
        self.head_timer = asyncio.get_running_loop().call_later(self.seconds,
                                                                self.head_timed_out)

    def stop_head_timer(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def head_too_large(self, data: bytes) -> bool:
        """Refuse a head over MAX_HEAD_BYTES, whole or not, before h11 parses it: h11 caps
        only an incomplete one, so a head that came whole in one read (64 KiB and more)
        was parsed whatever its size. Whether it was refused."""
        head = bytes(self.conn.trailing_data[0]) + data  # what h11 holds is under the cap
        size = head_size(head)
        if size <= MAX_HEAD_BYTES:
            return False
        self.stop_head_timer()
        whole = HEAD_END.search(head) is not None
        self.refuse_head(431, b"Request Header Fields Too Large", "HeadersTooLarge",
                         f"the request line and headers are {'' if whole else 'over '}"
                         f"{size} bytes; the limit is {MAX_HEAD_BYTES}")
        return True

    def head_timed_out(self) -> None:
        self.head_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if not self.conn.trailing_data[0]:
            # Not one byte of a request yet: an idle pooled or preconnected socket, whose
            # client would read a 408 as the answer to the request it sends next (seen
            # with http.client). A plain close it sees before writing, and reconnects.
            log.info("closed a connection that sent no request within %g s", self.seconds)
            self.transport.close()
            return
        self.refuse_head(408, b"Request Timeout", "RequestTimeout",
                         f"the request's headers did not arrive within {self.seconds:g} s "
                         f"(the limit); send them whole, at once")

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request h11 cannot parse, in the API's error shape: it was
        a plain-text "Invalid HTTP request received." that no client of the API reads.

        With h11's reason: uvicorn calls this in its ``except h11.RemoteProtocolError``
        and passes a fixed text, so the error is read from there. Without it the message
        listed four faults and not which one, and a request without Host, with two, or
        with a Content-Length of 21 digits was told of none of its own."""
        self.stop_head_timer()
        reason = h11_reason(sys.exc_info()[1])
        here = f" (here: {reason})" if reason else ""
        self.refuse_head(400, b"Bad Request", "InvalidRequest",
                         f"the request is not HTTP/1.1 as RFC 9112 writes it{here}: a "
                         f"malformed request line or header line, a control character, no "
                         f"Host header or two, a Content-Length that is not one number of "
                         f"up to 20 digits, a Transfer-Encoding other than chunked, a "
                         f"malformed chunk, or a chunk's size line or trailer over 16 KiB; "
                         f"send it as an HTTP client does")

    def refuse_head(self, status: int, reason: bytes, kind: str, message: str) -> None:
        """Answer a request whose head never became one, in the API's error shape, and
        close the connection."""
        request_id = secrets.token_hex(8)
        body = json.dumps(error_body(status, kind, message, request_id)).encode()
        log.info("closed a connection: %s (request_id %s)", message, request_id)
        headers = [(b"content-type", b"application/json"), (b"connection", b"close"),
                   (b"content-length", str(len(body)).encode()),
                   (b"x-request-id", request_id.encode())]
        try:  # h11 lets a server answer before a request exists (its IDLE state)
            self.transport.write(b"".join((
                self.conn.send(h11.Response(status_code=status, reason=reason,
                                            headers=headers)),
                self.conn.send(h11.Data(data=body)), self.conn.send(h11.EndOfMessage()))))
        except h11.LocalProtocolError:
            pass  # not in a state to answer: closed without one
        if self.transport.get_write_buffer_size():
            self.transport.abort()  # a client that does not read even its answer is not waited for
        else:
            self.transport.close()


class HeldStream(StreamingResponse):
    """A streaming response that calls ``release`` once it is over, however it ends: sent
    whole, the client gone, or cancelled before its first byte (a generator's ``finally``
    would not run for a stream that never started)."""

    def __init__(self, content: AsyncIterator[bytes], release, **kwargs: Any):
        super().__init__(content, **kwargs)
        self.release = release

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.release()


def preview_jpeg(image: bytes, max_side: int) -> bytes:
    """A JPEG of the encoded ``image`` no wider or taller than ``max_side``, its aspect ratio
    kept and never larger than the image (``Image.thumbnail``, which also decodes a JPEG at
    the scale it needs). A tenth of a second of CPU for a 2048 px PNG: call it off the event
    loop.

        >>> buffer = io.BytesIO()
        >>> Image.new("RGB", (200, 100)).save(buffer, "PNG")
        >>> Image.open(io.BytesIO(preview_jpeg(buffer.getvalue(), 64))).size
        (64, 32)
    """
    with Image.open(io.BytesIO(image)) as opened:
        opened.thumbnail((max_side, max_side))
        buffer = io.BytesIO()
        opened.convert("RGB").save(buffer, format="JPEG", quality=PREVIEW_QUALITY)
    return buffer.getvalue()


def names_etag(if_none_match: str, etag: str) -> bool:
    """Whether an `If-None-Match` value (its lines joined with commas) names ``etag``, by
    RFC 9110's weak comparison (`W/` aside), or is `*`.

        >>> names_etag('W/"a-0-64", "b"', 'W/"a-0-64"'), names_etag('"a-0-64"', 'W/"a-0-64"')
        (True, True)
        >>> names_etag("*", '"a-0"'), names_etag('"a-1"', '"a-0"'), names_etag("", '"a-0"')
        (True, False, False)
    """
    opaque = etag.removeprefix("W/")
    return any(tag.strip().removeprefix("W/") in ("*", opaque)
               for tag in if_none_match.split(","))


def check_media_type(content_types: list[str]) -> None:
    """Refuse a submit body that is not sent as JSON: ``content_types`` are the request's
    `Content-Type` values (one, or it is not one type).

    Parameters may follow (`; charset=utf-8`: RFC 8259 gives JSON no charset, and the body
    is read as UTF-8 whatever it says). A `+json` type (`application/merge-patch+json`,
    `application/problem+json`) is refused too: it is JSON that means something else than
    a generation request, as a form is text that does. A body with no `Content-Type` at all
    is read as JSON, as it always was here: it declares nothing else (RFC 9110 lets the
    receiver look at it), `/predictions` and FastAPI read it so, and clients send it so
    (Python's requests with ``data=``, httpx with ``content=``).

        >>> check_media_type(["Application/JSON ; charset=utf-8"]), check_media_type([])
        (None, None)
        >>> check_media_type(["text/plain"])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        sdxl_jobs.api.ApiError: `Content-Type` must be application/json ..., got 'text/plain'; ...
    """
    if not content_types:
        return
    media_type = content_types[0].partition(";")[0].strip(" \t").lower() \
        if len(content_types) == 1 else ""
    if media_type != "application/json":
        given = repr(", ".join(content_types)[:80])
        raise ApiError(415, "UnsupportedMediaType", f"`Content-Type` must be application/json "
                                                    f"(parameters such as `; charset=utf-8` "
                                                    f"may follow), got {given}; send the "
                                                    f"body as JSON", "Content-Type")


def check_content_encoding(codings: list[str]) -> None:
    """Refuse a submit body sent encoded (gzip, deflate, br): ``codings`` are the request's
    `Content-Encoding` values, which may name `identity` (any case) or nothing
    (CONTENT_ENCODING_PATTERN). The answer says, as RFC 9110 asks of a 415 for a coding,
    which codings are taken: `Accept-Encoding: identity`.

        >>> check_content_encoding([]), check_content_encoding(["Identity", " identity, "])
        (None, None)
        >>> check_content_encoding(["gzip"])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        sdxl_jobs.api.ApiError: `Content-Encoding` must be identity or absent ..., got 'gzip'; ...
    """
    given = ", ".join(codings)
    if not re.fullmatch(CONTENT_ENCODING_PATTERN, given):
        raise ApiError(415, "UnsupportedMediaType",
                       f"`Content-Encoding` must be identity or absent (the job API reads "
                       f"a body as sent, not compressed), got {given[:80]!r}; send the "
                       f"body uncompressed", "Content-Encoding",
                       headers={"Accept-Encoding": "identity"})


def prefer_wait(header: str, max_wait_s: int) -> float | None:
    """Seconds from the first ``wait`` of a ``Prefer`` header (RFC 7240), capped; None
    without one. ``header`` is every `Prefer` line of the request, joined with commas, as
    RFC 7240 reads several.

    Only ASCII digits are a number here (``str.isdigit`` takes "²" too, which ``int``
    refuses), and any N beyond the cap is the cap, however many digits it has (``int``
    refuses more than 4300):
        >>> prefer_wait("respond-async, wait=15", 60), prefer_wait("wait=" + "9" * 5000, 60)
        (15.0, 60.0)
        >>> prefer_wait('Wait = "5"; foo, wait=x', 60), prefer_wait("return=minimal", 60)
        (5.0, None)
        >>> prefer_wait("respond-async, wait=5s", 60)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        sdxl_jobs.api.ApiError: `Prefer`'s first `wait` must be whole seconds ..., got 'wait=5s'
    """
    found = re.match(PREFER_PATTERN, header)
    if found is None:
        wait = re.match(FIRST_WAIT, header)[1].strip(" \t")  # type: ignore[index]
        raise ApiError(400, "InvalidRequest", f"`Prefer`'s first `wait` must be whole seconds "
                                              f"(wait=N, N digits 0-9, or quoted: "
                                              f'wait="N"), got {wait[:60]!r}', "Prefer")
    if found[1] is None:
        return None
    digits = found[1].strip('"').replace("\\", "").lstrip("0") or "0"
    return float(max_wait_s if len(digits) > 9 else min(int(digits), max_wait_s))


def prometheus_text(gauges: dict[str, Any], dispatchers: int, writable: bool = True,
                    eviction_policy: str | None = NO_EVICTION) -> str:
    """The queue's state in Prometheus text format; counters and histograms are kept in
    Redis, so every API replica reports the same totals. ``writable``: whether Redis takes
    writes (``JobStore.refuses_writes``); ``eviction_policy``: its ``maxmemory-policy``,
    None where Redis refuses to tell (``JobStore.eviction_policy``)."""
    stats = gauges["stats"]
    lines = [
        "# HELP sdxl_jobs Jobs waiting or running, by state.", "# TYPE sdxl_jobs gauge",
        f'sdxl_jobs{{state="queued"}} {gauges["queued"]}',
        f'sdxl_jobs{{state="running"}} {gauges["running"]}',
        "# HELP sdxl_jobs_queue_depth Jobs not finished (the stream KEDA scales on).",
        "# TYPE sdxl_jobs_queue_depth gauge", f"sdxl_jobs_queue_depth {gauges['backlog']}",
        "# HELP sdxl_jobs_oldest_queued_age_seconds Age of the oldest queued job.",
        "# TYPE sdxl_jobs_oldest_queued_age_seconds gauge",
        f"sdxl_jobs_oldest_queued_age_seconds {gauges['oldest_age_s']:.3f}",
        "# HELP sdxl_jobs_dead_letter Jobs in the dead-letter stream.",
        "# TYPE sdxl_jobs_dead_letter gauge", f"sdxl_jobs_dead_letter {gauges['dead']}",
        "# HELP sdxl_jobs_dead_lettered_total Jobs moved to the dead-letter stream.",
        "# TYPE sdxl_jobs_dead_lettered_total counter",
        f"sdxl_jobs_dead_lettered_total {number_text(stats.get('jobs_dead_lettered', 0))}",
        f"# HELP sdxl_jobs_dispatchers Dispatchers that checked in within "
        f"{DISPATCHER_FRESH_S:.0f} s.",
        "# TYPE sdxl_jobs_dispatchers gauge", f"sdxl_jobs_dispatchers {dispatchers}",
        # Readiness stays 200 while Redis refuses writes (reads are served): this pages.
        "# HELP sdxl_jobs_store_writable 1 while Redis takes writes, 0 while it refuses every "
        "write (full: OOM; read-only; NOREPLICAS; MISCONF: its disk full); submits are "
        "refused meanwhile.",
        "# TYPE sdxl_jobs_store_writable gauge", f"sdxl_jobs_store_writable {int(writable)}",
        # Absent where Redis refuses INFO (an ACL user without it): no value is a guess.
        *(() if eviction_policy is None else (
            "# HELP sdxl_jobs_store_evicts 1 while Redis's maxmemory-policy is not "
            "noeviction: full, it deletes keys of its choosing, jobs and API keys among them.",
            "# TYPE sdxl_jobs_store_evicts gauge",
            f"sdxl_jobs_store_evicts {int(eviction_policy != NO_EVICTION)}")),
        # Absent while Redis refuses to write a missing mark (full, read-only).
        *(() if gauges.get("created") is None else (
            "# HELP sdxl_jobs_store_created_timestamp_seconds When the job store in Redis was "
            "set up (Redis's clock); another value later means that Redis lost its data.",
            "# TYPE sdxl_jobs_store_created_timestamp_seconds gauge",
            f"sdxl_jobs_store_created_timestamp_seconds {gauges['created']:.6f}")),
        "# HELP sdxl_jobs_total Jobs submitted and ended, by state.",
        "# TYPE sdxl_jobs_total counter",
    ]
    for state in ("submitted", *FINAL_STATES):
        lines.append(f'sdxl_jobs_total{{state="{state}"}} '
                     f'{number_text(stats.get(f"jobs_{state}", 0))}')
    for name, bounds, text in (("wait_seconds", WAIT_BUCKETS, "Submit to first start."),
                               ("run_seconds", RUN_BUCKETS, "Last start to end.")):
        metric = f"sdxl_job_{name}"
        lines += [f"# HELP {metric} {text}", f"# TYPE {metric} histogram"]
        for le in (*bounds, "+Inf"):
            # Lua wrote the bucket keys with its own number format (%.14g).
            key = f"{name}_bucket:{format(float(le), '.14g') if le != '+Inf' else le}"
            label = "+Inf" if le == "+Inf" else f"{float(le):g}"
            lines.append(f'{metric}_bucket{{le="{label}"}} {number_text(stats.get(key, 0))}')
        lines.append(f"{metric}_sum {number_text(stats.get(f'{name}_sum', 0))}")
        lines.append(f"{metric}_count {number_text(stats.get(f'{name}_count', 0))}")
    lines += ["# HELP sdxl_webhook_backlog Webhook events not yet delivered or given up "
              "(waiting, under way, or pending a retry).",
              "# TYPE sdxl_webhook_backlog gauge", f"sdxl_webhook_backlog {gauges['webhooks']}",
              "# HELP sdxl_webhook_oldest_age_seconds Age of the oldest of them.",
              "# TYPE sdxl_webhook_oldest_age_seconds gauge",
              f"sdxl_webhook_oldest_age_seconds {gauges['oldest_webhook_age_s']:.3f}",
              "# HELP sdxl_webhook_deliveries_total Webhook events by outcome.",
              "# TYPE sdxl_webhook_deliveries_total counter"]
    for outcome in ("delivered", "failed", "refused", "expired"):
        lines.append(f'sdxl_webhook_deliveries_total{{outcome="{outcome}"}} '
                     f'{number_text(stats.get(f"webhooks_{outcome}", 0))}')
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("sdxl_jobs.api", __doc__)
    parser.add_argument("--address", help="http://HOST:PORT to listen on (SDXL_JOBS_ADDRESS, "
                                          "else http://127.0.0.1:8090)")
    args = parser.parse_args(argv)
    # Checked as make serve-jobs checks it: `127.0.0.1:8090`, read as a URL, has no host and
    # no port, and uvicorn listened on every interface's port 80.
    name, given = (("--address", args.address) if args.address else
                   ("SDXL_JOBS_ADDRESS", os.environ.get("SDXL_JOBS_ADDRESS", "")))
    try:
        address = urllib.parse.urlsplit(address_setting({name: given}, name,
                                                        "http://127.0.0.1:8090", HTTP_ADDRESS))
    except ValueError as exc:
        parser.error(str(exc))
    settings = JobSettings.of_command(parser, args.redis)
    # Served all the same: a liveness probe must not restart the API over Redis (its
    # readiness probe fails meanwhile).
    usable_at_start(settings.redis_url, "every call that needs it answers 503 until it can",
                    no_aof_ok=settings.redis_no_aof_ok)
    if settings.redis_rewrite_s:
        # A daemon thread: it holds nothing that must be handed back at exit (its lease
        # expires), and blocking calls (a SCAN of the whole store) stay off the event loop.
        threading.Thread(target=keep_forgetting, name="redis-rewrite", daemon=True,
                         args=(settings.redis_url, settings.redis_rewrite_s)).start()
    app = create_app(settings, JobStore.from_url(settings.redis_url,
                                                 max_waiting=settings.max_waiting,
                                                 max_calls=settings.redis_connections))
    # h11, not httptools: httptools reads headers of any size (a 60 MB header blocked the
    # event loop for 6 s, before any key is checked). Its protocol with a size and a time
    # limit on the headers (HeadDeadline).
    server = ApiServer(uvicorn.Config(app, host=address.hostname, port=address.port,
                                      log_level="warning", timeout_graceful_shutdown=5,
                                      http=HeadDeadline.within(settings.header_timeout_s)))
    # As uvicorn.run ends: Ctrl-C stops it as SIGTERM does (uvicorn raises it again once
    # stopped, a traceback here), and a start that failed (its port taken) exits 3.
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    return 0 if server.started else STARTUP_FAILURE


class ApiServer(uvicorn.Server):
    """uvicorn's server, telling the app (``app.state.stopping``) as it begins to stop, so
    that a held `Prefer: wait` answers with its job (202) and an event stream ends while
    their connections are still there. uvicorn has no hook for it: the app's lifespan
    shutdown comes only after the connections' grace (5 s), where it had cut them."""

    async def shutdown(self, sockets: Any = None) -> None:
        self.config.app.state.stopping.set()
        await super().shutdown(sockets)


if __name__ == "__main__":
    sys.exit(main())

"""The job API process against a real Redis, before any TorchServe: validation at every
endpoint, keys, limits, cancel, health, metrics and the committed OpenAPI document."""

from __future__ import annotations

import contextlib
import gzip
import http.client
import io
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from faulty_link import FaultyLink
from jobstack import (finish_as_a_dispatcher, hold_until_closed, make_key, redis_on_disk,
                      refused_start, run, slow_preview_png, start_api, with_store)
from lifetimes import wait_until
from prompt_texts import assert_committed_is_current
from sdxl_jobs.processes import api_process, free_port, wait_http
from sdxl_jobs.store import JobStore

pytestmark = pytest.mark.jobs

REPO = Path(__file__).resolve().parents[2]
GOOD = {"prompt": "a red fox", "seed": 3}


# Port 9 (discard): webhooks to it are allowed, and never sent (no dispatcher runs here).
HOOKS = "127.0.0.1:9"


@pytest.fixture(scope="module")
def api(redis_server, tmp_path_factory):
    running = start_api(redis_server.url, tmp_path_factory.mktemp("api"),
                        {"SDXL_JOBS_RATE_PER_MINUTE": "40", "SDXL_JOBS_MAX_ACTIVE_PER_KEY": "30",
                         "SDXL_JOBS_MAX_WAIT_S": "2", "SDXL_JOBS_WEBHOOK_ALLOW": HOOKS,
                         "SDXL_JOBS_WEBHOOK_SECRET": "whsec_c2VjcmV0LWtleS1vZi0xNi1ieXRlcw=="})
    yield running
    running.process.stop()


@pytest.fixture(scope="module")
def key(redis_server):
    return make_key(redis_server.url, "alice")


def assert_error(status, body, code, field=None):
    assert status == code, body
    assert body["code"] == code and body["type"] and body["message"] and body["request_id"]
    if field is not None:
        assert body["field"] == field, body


def submit_with(api, key: str, body: bytes, headers: list[tuple[str, str]]):
    """(status, headers, JSON body) of a submit with exactly these header lines (a name may
    come twice; no Content-Type unless given)."""
    conn = connection(api)
    try:
        conn.putrequest("POST", "/v1/jobs", skip_accept_encoding=True)
        conn.putheader("Authorization", f"Bearer {key}")
        conn.putheader("Content-Length", str(len(body)))
        for name, value in headers:
            conn.putheader(name, value)
        conn.endheaders(body)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), json.loads(response.read())
    finally:
        conn.close()


JSON = ("Content-Type", "application/json")


@pytest.mark.parametrize("raw, field", [
    (b"{not json", "body"),
    (b"[1, 2]", "body"),
    (b'"a string"', "body"),
    (b'"{\\"prompt\\": \\"x\\"}"', "body"),  # decoded twice, it was a 500
    (b"", "body"),
    (b'{"prompt": "x", "width": NaN}', "body"),
    (b'{"prompt": 5}', "prompt"),
    (b'{"prompt": "x", "num_inference_steps": true}', "num_inference_steps"),
    (b'{"prompt": "x", "num_inference_steps": 0}', "num_inference_steps"),
    (b'{"prompt": "x", "width": 1001}', "width"),
    (b'{"prompt": "x", "widht": 1024}', "widht"),
    (b'{"prompt": "x", "webhook": "http://169.254.169.254/latest"}', "webhook"),
    (b'{"prompt": "x", "webhook": "file:///etc/passwd"}', "webhook"),
    (b'{"prompt": "x", "webhook_events": ["succeeded"]}', "webhook_events"),
    (b'\xff\xfe', "body"),
    (b'{"prompt": "x", "stream": true}', "stream"),  # progress is on the events stream
])
def test_bad_submits_are_4xx_naming_the_field_and_queue_nothing(api, key, raw, field):
    before = metrics(api)["sdxl_jobs_total"]["submitted"]
    status, _, body = api.json("POST", "/v1/jobs", key, raw)
    assert_error(status, body, 400, field)
    assert metrics(api)["sdxl_jobs_total"]["submitted"] == before


@pytest.mark.parametrize("lines", [
    [("Content-Type", "application/x-www-form-urlencoded")],  # what curl -d sends alone
    [("Content-Type", "text/plain")],
    [("Content-Type", "")],
    [("Content-Type", "application/merge-patch+json")],
    [("Content-Type", "application/jsonl")],
    [JSON, ("Content-Type", "text/plain")],
])
def test_a_body_not_sent_as_json_is_415_and_queues_nothing(api, redis_server, lines):
    # It was read as JSON whatever its Content-Type said, and the job queued.
    frank = make_key(redis_server.url, "frank")
    before = metrics(api)["sdxl_jobs_total"]["submitted"]
    status, _, body = submit_with(api, frank, json.dumps(GOOD).encode(), lines)
    assert_error(status, body, 415, "Content-Type")
    assert body["type"] == "UnsupportedMediaType"
    given = ", ".join(value for _, value in lines)
    assert "must be application/json" in body["message"], body
    assert body["message"].endswith(f"got {given!r}; send the body as JSON"), body
    assert metrics(api)["sdxl_jobs_total"]["submitted"] == before


@pytest.mark.parametrize("lines", [
    [("Content-Encoding", "gzip")],
    [("Content-Encoding", "deflate")],
    [("Content-Encoding", "br")],
    [("Content-Encoding", "identity, gzip")],
    [("Content-Encoding", "identity"), ("Content-Encoding", "gzip")],
])
def test_a_body_sent_encoded_is_415_naming_content_encoding_and_queues_nothing(
        api, redis_server, lines):
    # A gzip body was read as JSON and refused as "not JSON" (400 naming the body), for
    # what its header said; the API reads a body as sent.
    frank = make_key(redis_server.url, "frank")
    before = metrics(api)["sdxl_jobs_total"]["submitted"]
    status, headers, body = submit_with(api, frank, gzip.compress(json.dumps(GOOD).encode()),
                                        [JSON, *lines])
    assert_error(status, body, 415, "Content-Encoding")
    assert body["type"] == "UnsupportedMediaType"
    given = ", ".join(value for _, value in lines)
    assert "`Content-Encoding` must be identity or absent" in body["message"], body
    assert body["message"].endswith(f"got {given!r}; send the body uncompressed"), body
    assert {k.lower(): v for k, v in headers.items()}["accept-encoding"] == "identity"
    assert metrics(api)["sdxl_jobs_total"]["submitted"] == before


@pytest.mark.parametrize("lines", [[("Content-Encoding", "identity")],
                                   [("Content-Encoding", "Identity , IDENTITY")],
                                   [("Content-Encoding", "")]])
def test_a_body_sent_as_identity_is_read(api, redis_server, lines):
    status, _, job = submit_with(api, make_key(redis_server.url, "frank"),
                                 json.dumps(GOOD).encode(), [JSON, *lines])
    assert status == 202, job


@pytest.mark.parametrize("media_type", ["application/json; charset=utf-8",
                                        "Application/JSON", "application/json ;charset=UTF-8",
                                        None])
def test_json_with_parameters_or_in_capitals_or_without_a_type_is_json(api, redis_server,
                                                                       media_type):
    # None: no Content-Type at all, as Python's requests (data=) and httpx (content=) send
    # a body, and as /predictions takes it: refused with 415 for a while, after it had
    # always been read as JSON.
    frank = make_key(redis_server.url, "frank")
    status, _, job = submit_with(api, frank, json.dumps(GOOD).encode(),
                                 [("Content-Type", media_type)] if media_type else [])
    assert status == 202, job


def test_an_unknown_field_is_named_with_the_job_apis_own_fields(api, key):
    status, _, answer = api.json("POST", "/v1/jobs", key, {**GOOD, "webhok": "x"})
    assert_error(status, answer, 400, "webhok")
    assert "did you mean `webhook`" in answer["message"]
    status, _, answer = api.json("POST", "/v1/jobs", key, {**GOOD, "zzz": 1})
    assert_error(status, answer, 400, "zzz")
    assert "webhook, webhook_events" in answer["message"] and "prompt" in answer["message"]


@pytest.mark.parametrize("url, rule", [
    # urlsplit takes these; the HTTP client refused them only when delivering, and its
    # error (no HTTPError) stopped every webhook of the dispatcher.
    (f"http://{HOOKS}/hook\x7f", "printable ASCII"),
    (f"http://{HOOKS}/caf\u00e9", "printable ASCII"),
    (f"http://{HOOKS}/a b", "printable ASCII"),
    (f"http://{HOOKS.split(':')[0]}:99999/hook", "Port out of range"),
    (f"http://{HOOKS.split(':')[0]}:0/hook", "port from 1 to 65535"),
    ("http://[::1/hook", "Invalid IPv6 URL"),
    # Userinfo would be sent to the receiver as Basic auth (and kept in Redis).
    (f"http://user:secret@{HOOKS}/hook", "without credentials"),
    (f"ftp://{HOOKS}/hook", "http:// or https:// URL with a host"),
    (f"http://:secret@{HOOKS}/hook", "without credentials"),
    (f"http://@{HOOKS}/hook", "without credentials"),
    # The resolver's IDNA encoding refuses an empty label or one of 64 characters with a
    # UnicodeError at each delivery, which left the event pending for good.
    ("http://hooks..example.com/hook", "host a name lookup can find"),
    (f"http://{'h' * 64}.example.com/hook", "host a name lookup can find"),
    # An empty one was told to be "printable ASCII without spaces", which it is.
    ("", "http:// or https:// URL with a host"),
])
def test_a_webhook_url_that_cannot_be_called_is_refused_at_submit(api, key, url, rule):
    status, _, body = api.json("POST", "/v1/jobs", key, {**GOOD, "webhook": url})
    assert_error(status, body, 400, "webhook")
    assert rule in body["message"] and repr(url)[1:-1][:60] in body["message"], body


def test_a_request_over_the_cost_limit_is_refused_as_predictions_refuses_it(api, key):
    status, _, body = api.json("POST", "/v1/jobs", key, {
        "prompt": "x", "num_images": 4, "width": 2048, "height": 2048,
        "num_inference_steps": 100})
    assert_error(status, body, 400)
    assert body["type"] == "CostLimitExceeded" and body["cost"] > body["limit"]
    assert "num_inference_steps" in body["fields"]


COSTLY = {"prompt": "x", "num_images": 4, "width": 2048, "height": 2048,
          "num_inference_steps": 100}


@pytest.mark.parametrize("body, headers, field", [
    # The request's own errors come before what this server limits: a costly request with
    # `stream: true` was told to cut its cost, then told that `stream` is refused anyway.
    ({**COSTLY, "stream": True}, {}, "stream"),
    (COSTLY, {"Prefer": "wait=soon"}, "Prefer"),
    (COSTLY, {"Idempotency-Key": "k" * 201}, "Idempotency-Key"),
    # A webhook host this server does not allow came before the request's own fields.
    ({**GOOD, "webhook": "http://not-allowed.example/hook", "width": 1001}, {}, "width"),
    ({**GOOD, "webhook": "http://not-allowed.example/hook", "webhook_events": ["done"]}, {},
     "webhook_events"),
])
def test_a_requests_own_errors_come_before_the_servers_limits(api, redis_server, body,
                                                              headers, field):
    status, _, answer = api.json("POST", "/v1/jobs", make_key(redis_server.url, "gina"), body,
                                 headers=headers)
    assert_error(status, answer, 400, field)
    assert answer["type"] == "InvalidRequest", answer


def test_generate_py_sends_its_submit_as_json(api, redis_server, tmp_path):
    """generate.py's submit says `Content-Type: application/json`, read off the wire between
    it and the API. The API's answer alone could not show it: it reads a body without a
    type as JSON, so a submit sent with none (as http.client sends it unless told; urllib
    sends a form's type, which is a 415) was still refused for its width."""
    key_file = tmp_path / "api-key"
    key_file.write_text(make_key(redis_server.url, "hana"))
    link = FaultyLink(urlsplit(api.address).port)
    try:
        done = subprocess.run([sys.executable, str(REPO / "scripts" / "generate.py"),
                               "--async", "--api-key-file", str(key_file), "--jobs-url",
                               link.address, "--width", "33", "a fox"],
                              capture_output=True, text=True, timeout=60)
    finally:
        link.close()
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith("error: HTTP 400: `width` must be"), done.stderr
    # The refusal ends generate.py: its submit is all that went through the link.
    request_line, _, rest = bytes(link.sent).partition(b"\r\n")
    assert request_line == b"POST /v1/jobs HTTP/1.1", bytes(link.sent)
    headers = http.client.parse_headers(io.BytesIO(rest))
    assert headers.get_all("Content-Type") == ["application/json"], headers.keys()


def connection(api) -> http.client.HTTPConnection:
    address = urlsplit(api.address)
    return http.client.HTTPConnection(address.hostname, address.port, timeout=60)


def submit_in_pieces(conn, key, body: bytes, chunked: bool) -> tuple[bool, int, dict]:
    """(whether the API answered before the body's second half was sent, status, body)."""
    conn.putrequest("POST", "/v1/jobs")
    conn.putheader("Authorization", f"Bearer {key}")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Connection", "close")  # as urllib sends it
    conn.putheader(*(("Transfer-Encoding", "chunked") if chunked
                     else ("Content-Length", str(len(body)))))
    conn.endheaders()
    pieces = [body[start:start + (64 << 10)] for start in range(0, len(body), 64 << 10)]
    answered_early = False
    for number, piece in enumerate(pieces):
        if number == len(pieces) // 2:
            answered_early = bool(select.select([conn.sock], [], [], 0.5)[0])
        conn.send(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
    if chunked:
        conn.send(b"0\r\n\r\n")
    response = conn.getresponse()
    return answered_early, response.status, json.loads(response.read())


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_body_over_the_limit_is_read_before_its_413(api, key, chunked):
    # A client sends the whole body before it reads the reply (urllib does, with
    # `Connection: close`). Answered and closed while it still sends, it gets a broken pipe
    # or a reset instead of the 413 (seen in CI under load); so the API reads and drops the
    # rest of the body first. Half way through, it must not have answered yet.
    conn = connection(api)
    try:
        answered_early, status, body = submit_in_pieces(
            conn, key, b'{"prompt": "' + b"a" * (2 << 20) + b'"}', chunked)
        assert not answered_early, "the API answered before the body was read"
        assert_error(status, body, 413)
    finally:
        conn.close()


def test_a_body_declared_far_over_the_limit_is_refused_unread(api, key):
    conn = connection(api)
    try:
        conn.putrequest("POST", "/v1/jobs")
        conn.putheader("Authorization", f"Bearer {key}")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(1 << 30))
        conn.endheaders()  # and not one byte of the gigabyte
        response = conn.getresponse()
        assert_error(response.status, json.loads(response.read()), 413)
    finally:
        conn.close()


def test_keys_are_required_and_never_cross(api, key, redis_server):
    status, headers, body = api.json("POST", "/v1/jobs", None, GOOD)
    assert_error(status, body, 401)
    assert headers["www-authenticate"] == "Bearer"
    for written in (f"Basic {key}", key, f"Bearer{key}"):  # a valid key, not as a bearer's
        status, headers, body = api.json("GET", "/v1/jobs", None,
                                         headers={"Authorization": written})
        assert_error(status, body, 401)
        assert headers["www-authenticate"] == "Bearer"
    assert_error(*api.json("GET", "/v1/jobs", "sdxl_not-a-key")[::2], 401)
    status, headers, job = api.json("POST", "/v1/jobs", key, GOOD)
    assert status == 202 and headers["location"] == f"/v1/jobs/{job['id']}"
    other = make_key(redis_server.url, "bob")
    for method, path in (("GET", f"/v1/jobs/{job['id']}"), ("DELETE", f"/v1/jobs/{job['id']}"),
                         ("GET", f"/v1/jobs/{job['id']}/events"),
                         ("GET", f"/v1/jobs/{job['id']}/images/0")):
        assert_error(*api.json(method, path, other)[::2], 404)
    assert api.json("GET", "/v1/jobs", other)[2] == {"jobs": [], "next_cursor": None}


def test_submit_answers_the_queued_job(api, key):
    status, _, job = api.json("POST", "/v1/jobs", key, {**GOOD, "num_images": 2})
    assert status == 202
    assert job["status"] == "queued" and job["queue_position"] >= 1
    assert job["seeds"] == [3, 4] and job["request"]["prompt"] == "a red fox"
    # Filled in with the served model's defaults (SDXL's until a dispatcher publishes).
    assert job["request"]["width"] == 1024 and job["request"]["num_inference_steps"] == 30
    assert job["links"] == {"self": f"/v1/jobs/{job['id']}",
                            "events": f"/v1/jobs/{job['id']}/events"}
    assert api.json("GET", job["links"]["self"], key)[2]["id"] == job["id"]
    listed = [j["id"] for j in api.json("GET", "/v1/jobs", key)[2]["jobs"]]
    assert listed[0] == job["id"]
    # A random seed is drawn at submit, so a retried start makes the same image.
    _, _, drawn = api.json("POST", "/v1/jobs", key, {"prompt": "a red fox"})
    assert isinstance(drawn["request"]["seed"], int)


@contextlib.contextmanager
def refusing_writes(client: redis.Redis, kind: str, data_dir: Path):
    """Redis refusing writes for a reason of its own, each as a real one does: full
    (`maxmemory`, no eviction), short of replicas (`min-replicas-to-write`), a failover's
    demoted primary (a read-only replica of a primary that is not there), unable to persist
    (a snapshot that failed, with `stop-writes-on-bgsave-error`: its file's name is taken by
    a directory, so even root cannot write it)."""
    snapshot = data_dir / "dump.rdb"
    if kind in ("maxmemory", "min-replicas-to-write"):
        client.config_set(kind, 1)
    elif kind == "READONLY":
        client.config_set("replica-read-only", "yes")
        client.replicaof("127.0.0.1", free_port())
    elif kind == "MISCONF":
        snapshot.mkdir()
        (snapshot / "in-the-way").write_text("")
        client.config_set("stop-writes-on-bgsave-error", "yes")
        client.config_set("save", "3600 1")
        client.bgsave(schedule=True)
        wait_until(lambda: client.info("persistence")["rdb_last_bgsave_status"] == "err"
                   and not client.info("persistence")["rdb_bgsave_in_progress"], 30,
                   "the snapshot failing")
    try:
        yield
    finally:
        if kind in ("maxmemory", "min-replicas-to-write"):
            client.config_set(kind, 0)
        elif kind == "READONLY":
            client.replicaof("NO", "ONE")
        elif kind == "MISCONF":
            client.config_set("save", "")  # no snapshots, so none failed counts
            (snapshot / "in-the-way").unlink()
            snapshot.rmdir()


@pytest.mark.parametrize("kind, said, retry_after, reply", [
    ("maxmemory", "is full", "30", "OOM command not allowed when used memory"),
    ("min-replicas-to-write", "refuses writes", "5", "NOREPLICAS Not enough good replicas"),
    # A read-only replica refuses the script at its first write, after its reads; one that
    # cannot persist before it starts (measured with Redis 7.0).
    ("READONLY", "refuses writes", "5", "READONLY You can't write against a read only"),
    ("MISCONF", "refuses writes", "5", "MISCONF Redis is configured to save RDB snapshots"),
])
def test_a_submit_redis_refuses_without_running_says_it_was_not_accepted(
        api, key, redis_server, kind, said, retry_after, reply):
    """Redis refused the submit's script for reasons of its own before any write: nothing
    was written, but the 503 said the job may have been accepted (and told the client to
    list its jobs before trying again). Full at maxmemory (noeviction) was the first case
    fixed; a refusal for want of replicas said so until this release. `/metrics` and
    readiness say Redis refuses writes (the alert's page): for all but MISCONF they said
    it took them, read off a PING that only MISCONF refuses."""
    client = redis.Redis.from_url(redis_server.url)
    try:
        jobs = client.zcard("sdxl:queued"), client.xlen("sdxl:stream")
        with refusing_writes(client, kind, redis_server.data_dir):
            status, headers, body = api.json("POST", "/v1/jobs", key, GOOD)
            scraped = metrics(api)
            ready_status, _, ready = api.json("GET", "/v1/health?dispatchers=0")
        assert scraped["sdxl_jobs_store_writable"] == {"": 0}, scraped
        assert ready_status == 200 and ready["redis"].startswith(f"refuses writes: {reply}"), \
            ready
        assert metrics(api)["sdxl_jobs_store_writable"] == {"": 1}
        assert_error(status, body, 503)
        assert said in body["message"] and "was not accepted" in body["message"], body
        assert {k.lower(): v for k, v in dict(headers).items()}["retry-after"] == retry_after
        assert (client.zcard("sdxl:queued"), client.xlen("sdxl:stream")) == jobs
        assert client.delete("sdxl:queued:none") == 0  # it takes writes again
    finally:
        client.close()


@pytest.mark.parametrize("lines, said", [
    # An empty key (`-H "Idempotency-Key: $ORDER"` with ORDER unset) was read as none: each
    # retry made another job.
    ([("Idempotency-Key", "")], "must be 1 to 200 characters, got 0"),
    # Two lines (a proxy adding its own): the first was taken and the other dropped.
    ([("Idempotency-Key", "order-a"), ("Idempotency-Key", "order-b")], "must be sent once"),
])
def test_an_empty_or_repeated_idempotency_key_is_refused(api, redis_server, lines, said):
    ivan = make_key(redis_server.url, "ivan")
    for _ in range(2):  # a retry, as the client took to be safe
        status, _, body = submit_with(api, ivan, json.dumps(GOOD).encode(), [JSON, *lines])
        assert_error(status, body, 400, "Idempotency-Key")
        assert said in body["message"], body
    assert api.json("GET", "/v1/jobs", ivan)[2]["jobs"] == []

def test_idempotency_key(api, key):
    headers = {"Idempotency-Key": "order-17"}
    first = api.json("POST", "/v1/jobs", key, GOOD, headers=headers)
    again = api.json("POST", "/v1/jobs", key, GOOD, headers=headers)
    assert first[0] == again[0] == 202
    assert first[2]["id"] == again[2]["id"] and again[1]["idempotent-replayed"] == "true"
    status, _, body = api.json("POST", "/v1/jobs", key, {**GOOD, "seed": 4}, headers=headers)
    assert_error(status, body, 422, "Idempotency-Key")
    assert first[2]["id"] in body["message"]
    # The same request written otherwise (a number as 3.0, a null for a field not given)
    # is the same request.
    rewritten = api.json("POST", "/v1/jobs", key, {**GOOD, "seed": 3.0, "width": None},
                         headers=headers)
    assert rewritten[0] == 202 and rewritten[2]["id"] == first[2]["id"], rewritten
    # So is one that spells out defaults it left out (the served model's, as published).
    schema = api.json("GET", "/v1/request-schema")[2]["request_schema"]["properties"]
    spelled = {name: schema[name]["default"] for name in ("width", "num_inference_steps",
                                                          "guidance_scale", "output_format")}
    spelled = api.json("POST", "/v1/jobs", key, {**GOOD, **spelled}, headers=headers)
    assert spelled[0] == 202 and spelled[2]["id"] == first[2]["id"], spelled
    # Webhook events are a set: written in another order, or the default set spelled out,
    # they are the same request (each was a 422 IdempotencyConflict).
    hook = {"webhook": f"http://{HOOKS}/hook"}
    headers = {"Idempotency-Key": "order-18"}
    first = api.json("POST", "/v1/jobs", key, {**GOOD, **hook,
                                               "webhook_events": ["succeeded", "failed"]},
                     headers=headers)
    again = api.json("POST", "/v1/jobs", key, {**GOOD, **hook,
                                               "webhook_events": ["failed", "succeeded"]},
                     headers=headers)
    assert first[0] == again[0] == 202 and again[2]["id"] == first[2]["id"], again
    headers = {"Idempotency-Key": "order-19"}
    first = api.json("POST", "/v1/jobs", key, {**GOOD, **hook}, headers=headers)
    again = api.json("POST", "/v1/jobs", key, {
        **GOOD, **hook, "webhook_events": ["canceled", "failed", "succeeded"]}, headers=headers)
    assert first[0] == again[0] == 202 and again[2]["id"] == first[2]["id"], again
    # Another destination is another request: its events must not go to the first one's.
    status, _, body = api.json("POST", "/v1/jobs", key, {
        **GOOD, "webhook": f"http://{HOOKS}/other"}, headers=headers)
    assert_error(status, body, 422, "Idempotency-Key")


def test_a_redis_on_a_full_disk_refuses_submits_keeps_the_api_ready_and_recovers(
        full_disk, tmp_path):
    """A Redis of the operator's (append-only, `appendfsync everysec`) on a real full disk:
    it refuses writes, MISCONF, and PING with them. Each submit is the documented 503 "not
    accepted" with Retry-After 5, reads are served, `sdxl_jobs_store_writable` is 0 on a
    scrape that still answers (the alert's page), and once there is room submits are
    taken again, with no restart. Readiness answered 503 "Redis is unavailable to the API:
    ResponseError" (taking every replica out of service, reads and the submits' own 503s
    with them), the API logged one WARNING per refused submit, and nothing said on /metrics
    that Redis refused writes."""
    api = None
    with redis_on_disk(full_disk.path, tmp_path / "redis.log") as (url, client):
        try:
            own_key = make_key(url)
            api = start_api(url, tmp_path)
            status, _, before = api.json("POST", "/v1/jobs", own_key, GOOD)
            assert status == 202, before
            assert metrics(api)["sdxl_jobs_store_writable"] == {"": 1}
            full_disk.fill()
            with contextlib.suppress(redis.ResponseError):  # the write the disk refuses
                client.set("more", "x" * 100_000)
            wait_until(lambda: client.info("persistence")["aof_last_write_status"] == "err", 10,
                       "Redis to fail a write of its append-only file")
            for _ in range(5):
                status, headers, body = api.json("POST", "/v1/jobs", own_key, GOOD)
                assert_error(status, body, 503)
                assert "refuses writes" in body["message"] and "was not accepted" in \
                    body["message"], body
                assert headers["retry-after"] == "5"
            status, _, ready = api.json("GET", "/v1/health?dispatchers=0")
            assert status == 200 and ready["redis"].startswith(
                "refuses writes: MISCONF Errors writing to the AOF file: No space left on device"
            ), ready
            status, _, job = api.json("GET", f"/v1/jobs/{before['id']}", own_key)
            assert status == 200 and job["status"] == "queued", job
            refusing = metrics(api)  # the scrape answers: every other gauge is read as ever
            assert refusing["sdxl_jobs_store_writable"] == {"": 0}, refusing
            assert refusing["sdxl_jobs_queue_depth"] == {"": 1}, refusing
            full_disk.free()
            wait_until(lambda: api.json("POST", "/v1/jobs", own_key, GOOD)[0] == 202, 10,
                       "a submit taken once the disk has room")
            status, _, ready = api.json("GET", "/v1/health?dispatchers=0")
            assert status == 200 and ready["redis"] == "ok", ready
            assert metrics(api)["sdxl_jobs_store_writable"] == {"": 1}
        finally:
            if api is not None:
                api.process.stop()
    refused = [line for line in api.process.log_path.read_text().splitlines()
               if "submit refused" in line]
    assert len(refused) == 1 and "No space left on device" in refused[0], refused


def test_cancel_a_queued_job(api, key):
    _, _, job = api.json("POST", "/v1/jobs", key, GOOD)
    status, _, canceled = api.json("DELETE", f"/v1/jobs/{job['id']}", key)
    assert status == 200 and canceled["status"] == "canceled" and canceled["expires_at"]
    again = api.json("DELETE", f"/v1/jobs/{job['id']}", key)  # DELETE is idempotent
    assert again[0] == 200 and again[2]["status"] == "canceled"
    assert_error(*api.json("GET", f"/v1/jobs/{job['id']}/images/0", key)[::2], 404)
    status, headers, raw = api.call("GET", f"/v1/jobs/{job['id']}/events", key)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert b"event: status" in raw and b'"status": "canceled"' in raw


def test_an_upper_case_job_id_finds_its_job(api, key):
    # Hex is one number in either case; an id upper-cased by a tool on its way was "not a
    # job id (32 hex digits)", which it is.
    _, _, job = api.json("POST", "/v1/jobs", key, GOOD)
    upper = job["id"].upper()
    status, _, found = api.json("GET", f"/v1/jobs/{upper}", key)
    assert status == 200 and found["id"] == job["id"], found
    status, _, canceled = api.json("DELETE", f"/v1/jobs/{upper}", key)
    assert status == 200 and canceled["id"] == job["id"] and canceled["status"] == "canceled"
    status, _, raw = api.call("GET", f"/v1/jobs/{upper}/events", key, timeout=10)
    assert status == 200 and b'"status": "canceled"' in raw, raw
    status, _, body = api.json("GET", f"/v1/jobs/{upper}/images/0", key)
    assert_error(status, body, 404)
    assert "has no images: it is canceled" in body["message"], body


def test_head_is_answered_wherever_get_is(api, key):
    # RFC 9110: a server that serves GET serves HEAD (uptime checks, `curl -I`); it was 405.
    _, _, job = api.json("POST", "/v1/jobs", key, GOOD)
    for path in ("/", "/v1/health?dispatchers=0", "/metrics", "/v1/request-schema",
                 "/v1/jobs?limit=1", f"/v1/jobs/{job['id']}"):
        got, got_headers, body = api.call("GET", path, key)
        status, headers, empty = api.call("HEAD", path, key)
        assert (status, empty) == (got, b""), (path, status)
        assert headers["content-type"] == got_headers["content-type"], path
        if not path.startswith(("/metrics", "/v1/jobs")):  # the same body, not a changed one
            assert headers["content-length"] == str(len(body)), path
    # A job's events: the stream's head at once, no stream held open until the job ends.
    started = time.monotonic()
    status, headers, empty = api.call("HEAD", f"/v1/jobs/{job['id']}/events", key, timeout=10)
    assert (status, empty) == (200, b"") and time.monotonic() - started < 5
    assert headers["content-type"].startswith("text/event-stream")
    status, _, empty = api.call("HEAD", "/v1/jobs/" + "0" * 32, key)
    assert (status, empty) == (404, b"")


@pytest.mark.parametrize("method, path, allowed", [
    ("OPTIONS", "/v1/jobs", "GET, HEAD, POST"),
    ("PUT", "/v1/jobs/" + "a" * 32, "DELETE, GET, HEAD"),
    ("POST", "/v1/health", "GET, HEAD"),
])
def test_a_405_names_every_method_of_its_path(api, key, method, path, allowed):
    # `Allow` named only the methods of the first route on the path: POST for /v1/jobs.
    status, headers, body = api.json(method, path, key)
    assert_error(status, body, 405)
    assert headers["allow"] == allowed


def test_a_stream_resumed_after_the_final_event_is_204_at_once(api, key):
    # An EventSource reconnects after every stream, with the last id it saw. Resumed after
    # the final event, the stream sent keep-alives until the job expired (an hour), holding
    # one of the key's stream slots each time; 204 tells an EventSource to stop.
    _, _, job = api.json("POST", "/v1/jobs", key, GOOD)
    api.json("DELETE", f"/v1/jobs/{job['id']}", key)
    _, _, raw = api.call("GET", f"/v1/jobs/{job['id']}/events", key)
    final = [line[4:] for line in raw.decode().splitlines() if line.startswith("id: ")][-1]
    started = time.monotonic()
    status, _, body = api.call("GET", f"/v1/jobs/{job['id']}/events", key,
                               headers={"Last-Event-ID": final}, timeout=10)
    assert status == 204 and body == b"" and time.monotonic() - started < 5


def test_a_stream_resumed_past_every_event_still_ends_with_its_job(api, key):
    # A Last-Event-ID later than any event (a client's clock, another job's id): the job's
    # final event comes before it, so the stream never told the end and never closed.
    _, _, job = api.json("POST", "/v1/jobs", key, GOOD)
    later = f"{int(time.time() * 1000) + 10**9}-0"
    where = urlsplit(api.address)
    stream = http.client.HTTPConnection(where.hostname, where.port, timeout=60)
    try:
        stream.request("GET", f"/v1/jobs/{job['id']}/events",
                       headers={"Authorization": f"Bearer {key}", "Last-Event-ID": later})
        # Its head read before the cancel: the API chose to stream while the job was not
        # final (a second's sleep stood for that: a slow start could get 204, canceled).
        reply = stream.getresponse()
        assert reply.status == 200
        replies = []
        reader = threading.Thread(target=lambda: replies.append(reply.read()), daemon=True)
        reader.start()
        api.json("DELETE", f"/v1/jobs/{job['id']}", key)
        reader.join(40)  # one keep-alive period (15 s) at most after the cancel
    finally:
        stream.close()
    assert replies, "the stream did not end"
    assert b"event: status" in replies[0] and b'"status": "canceled"' in replies[0]


@pytest.mark.parametrize("method, path, code", [
    ("GET", "/v1/jobs/not-an-id", 404),
    ("GET", "/v1/jobs/" + "0" * 32, 404),
    ("GET", "/v1/jobs/../../etc/passwd", 404),
    ("DELETE", "/v1/jobs/" + "f" * 32, 404),
    ("GET", "/v1/jobs/" + "a" * 32 + "/images/x", 400),
    ("GET", "/v1/jobs/" + "a" * 32 + "/images/-1", 400),  # below the minimum 0
    ("GET", "/v1/nothing", 404),
    ("PUT", "/v1/jobs", 405),
    ("GET", "/v1/jobs?limit=1000", 400),
    ("GET", "/v1/health?dispatchers=-5", 400),  # it answered 200: fewer than none checked in
])
def test_bad_paths_are_json_4xx(api, key, method, path, code):
    status, _, body = api.json(method, path, key)
    assert_error(status, body, code)


def test_a_query_or_path_value_that_is_not_a_number_is_named(api, key):
    status, _, body = api.json("GET", "/v1/jobs?limit=abc", key)
    assert_error(status, body, 400, "limit")
    assert body["message"].endswith(', got "abc"'), body
    status, _, body = api.json("GET", "/v1/jobs/" + "a" * 32 + "/images/x", key)
    assert_error(status, body, 400, "index")
    assert body["message"].endswith(', got "x"'), body


def test_a_negative_image_index_breaks_the_rule_not_a_missing_image(api, key):
    """`images/-1` was a 404 "image -1 does not exist", where the document's minimum is 0
    and every other parameter's rule broken is a 400 naming it."""
    status, _, body = api.json("GET", "/v1/jobs/" + "a" * 32 + "/images/-1", key)
    assert_error(status, body, 400, "index")
    assert body["message"] == "`index` must be an integer from 0 (the job's first image), " \
                              "got -1", body


@pytest.mark.parametrize("path, name, given", [
    # Each was read as the number: `images/+0` as image 0, `limit=5.0` as 5.
    ("/v1/jobs/" + "a" * 32 + "/images/+0", "index", "+0"),
    ("/v1/jobs/" + "a" * 32 + "/images/0.0", "index", "0.0"),
    ("/v1/jobs?limit=5.0", "limit", "5.0"),
    ("/v1/jobs?limit=1e1", "limit", "1e1"),
    ("/v1/health?dispatchers=%200", "dispatchers", " 0"),
])
def test_an_integer_written_other_than_in_digits_is_named(api, key, path, name, given):
    status, _, body = api.json("GET", path, key)
    assert_error(status, body, 400, name)
    assert body["message"] == (f"`{name}` must be written in digits 0-9 alone, as an "
                               f"integer, got {json.dumps(given)}"), body


@pytest.mark.parametrize("path, name, values", [
    ("/v1/jobs?limit=5&limit=50", "limit", '"5", "50"'),  # the last was taken: 50 jobs
    ("/v1/health?dispatchers=1&dispatchers=0", "dispatchers", '"1", "0"'),
])
def test_a_query_parameter_given_twice_is_refused_not_read_as_its_last(api, key, path, name,
                                                                       values):
    status, _, body = api.json("GET", path, key)
    assert_error(status, body, 400, name)
    assert body["message"] == f"`{name}` must be given once, got 2 values ({values})", body


@pytest.mark.parametrize("header, path", [
    ("Authorization", "/v1/jobs"),  # the first was taken, where a proxy may take the last
    ("Last-Event-ID", "/v1/jobs/{job_id}/events"),
])
def test_a_header_sent_twice_is_refused_not_read_as_its_first(api, key, header, path):
    status, _, job = api.json("POST", "/v1/jobs", key, GOOD)
    assert status == 202, job
    values = {"Authorization": [f"Bearer {key}", "Bearer someone-else"],
              "Last-Event-ID": ["", "1700000000000-0"]}[header]
    conn = connection(api)
    try:
        conn.putrequest("GET", path.format(job_id=job["id"]))
        if header != "Authorization":
            conn.putheader("Authorization", f"Bearer {key}")
        for value in values:
            conn.putheader(header, value)
        conn.endheaders()
        response = conn.getresponse()
        # Not read unless refused: the stream of a job still queued would never end.
        assert response.status == 400, response.status
        body = json.loads(response.read())
    finally:
        conn.close()
    assert_error(400, body, 400, header)
    assert body["message"] == f"`{header}` must be sent once, got 2", body


def test_a_query_parameter_a_route_does_not_take_is_named_not_ignored(api, key):
    # `?status=failed` answered the unfiltered list, as if it were filtered.
    status, _, body = api.json("GET", "/v1/jobs?sort=created_at&limit=3", key)
    assert_error(status, body, 400, "sort")
    assert body["message"] == ("`sort` is not a query parameter of GET /v1/jobs (it takes "
                               "`cursor`, `limit`, `status`)"), body
    status, _, body = api.json("GET", "/v1/jobs/" + "a" * 32 + "?cursor=x", key)
    assert_error(status, body, 400, "cursor")
    assert "(it takes none)" in body["message"], body
    status, _, body = api.json("GET", "/v1/jobs?limit=3", key)
    assert status == 200 and "jobs" in body


def test_the_job_list_pages_and_filters_by_status(api, redis_server):
    carol = make_key(redis_server.url, "carol")  # her own jobs only, whatever ran before
    ids = []
    for seed in range(5):
        status, _, job = api.json("POST", "/v1/jobs", carol, {**GOOD, "seed": seed})
        assert status == 202, job
        ids.append(job["id"])
    for job_id in ids[1], ids[3]:
        assert api.json("DELETE", f"/v1/jobs/{job_id}", carol)[0] == 200
    seen, path = [], "/v1/jobs?limit=2"
    while path:
        status, _, page = api.json("GET", path, carol)
        assert status == 200 and len(page["jobs"]) <= 2, page
        seen += [job["id"] for job in page["jobs"]]
        path = page["next_cursor"] and f"/v1/jobs?limit=2&cursor={page['next_cursor']}"
    assert seen == ids[::-1]
    status, _, page = api.json("GET", "/v1/jobs?status=canceled", carol)
    assert [job["id"] for job in page["jobs"]] == [ids[3], ids[1]], page
    assert {job["status"] for job in page["jobs"]} == {"canceled"}
    assert page["next_cursor"] is None
    status, _, page = api.json("GET", "/v1/jobs?status=queued,running&limit=2", carol)
    assert [job["id"] for job in page["jobs"]] == [ids[4], ids[2]], page
    status, _, page = api.json("GET", f"/v1/jobs?status=queued&cursor={page['next_cursor']}",
                               carol)
    assert [job["id"] for job in page["jobs"]] == [ids[0]] and page["next_cursor"] is None
    # Repeated, as a client generated from the document sends a list: it was read as its
    # last value alone, the canceled jobs left out without a word.
    status, _, page = api.json("GET", "/v1/jobs?status=canceled&status=queued", carol)
    assert [job["id"] for job in page["jobs"]] == ids[::-1], page
    status, _, body = api.json("GET", "/v1/jobs?status=queued,done", carol)
    assert_error(status, body, 400, "status")
    assert body["message"] == ("`status` must be one or more of queued, running, succeeded, "
                               'failed, canceled, comma-separated, got "done"'), body
    for cursor in ("x", f"nan-{ids[0]}", "1.5-xyz", "1.5"):
        status, _, body = api.json("GET", f"/v1/jobs?cursor={cursor}", carol)
        assert_error(status, body, 400, "cursor")
        assert body["message"].endswith(f'got "{cursor}"'), body


def test_a_page_of_queued_jobs_reads_the_throughput_once(api, redis_server):
    """Each queued job of a listing read the queue's throughput (and its position) on its
    own: a page of 100 queued jobs was 500 Redis commands one after another (26 ms behind a
    backlog of 20,000). The throughput is read once a page now, the positions together."""
    dave = make_key(redis_server.url, "dave")
    for seed in range(25):
        status, _, job = api.json("POST", "/v1/jobs", dave, {**GOOD, "seed": seed})
        assert status == 202, job
    client = redis.Redis.from_url(redis_server.url)
    try:
        client.config_resetstat()
        status, _, page = api.json("GET", "/v1/jobs?limit=25", dave)
        calls = {name: stats["calls"] for name, stats in client.info("commandstats").items()}
    finally:
        client.close()
    assert status == 200 and len(page["jobs"]) == 25, page
    assert [job["queue_position"] for job in page["jobs"]] == sorted(
        (job["queue_position"] for job in page["jobs"]), reverse=True)
    # The throughput's reads (finished: ZCOUNT, busy spells and the live check-ins, none
    # here: ZRANGEBYSCORE, busy-since: GET).
    assert calls.get("cmdstat_zrangebyscore") == 2 and calls.get("cmdstat_get") == 1, calls


def test_a_job_started_while_it_is_read_is_never_queued_without_a_place(tmp_path):
    """A job was read (queued), then its place in the queue in a second command: a
    dispatcher that started it in between had taken it out of the queue, and the job and
    the listing said `queued` with a `queue_position` of null (once in 60 submits under
    load). The dispatcher's start is put between the two here, by a link to Redis that
    holds the read of the place; the job is shown as it is then: running, or queued again
    once started (handed back), never as it was first read. One whose record went in
    between (evicted) is not there."""
    from sdxl_jobs.processes import RedisServer

    redis_server = RedisServer(tmp_path / "redis")
    redis_server.start()
    link = FaultyLink(redis_server.port)
    api = start_api(redis_server.url.replace(f":{redis_server.port}/", f":{link.port}/"),
                    tmp_path)
    client = redis.Redis.from_url(redis_server.url)

    def read_while(path: str, between, marker: bytes = b"queued") -> tuple[int, dict]:
        """GET ``path``, ``between()`` run after the API read the job, before its place."""
        link.held.clear()
        link.let_through.clear()
        # The read of its place names the queue (`queued`, a ZRANK's key) or the job's
        # status as read (the script's argument); no command of the job's read before does.
        link.hold_request_with = marker
        answers = []
        reading = threading.Thread(target=lambda: answers.append(api.json("GET", path, key)))
        reading.start()
        try:
            assert link.held.wait(10), "the API read no place in the queue"
            between()
        finally:
            link.let_through.set()
            reading.join(30)
        [(status, _, body)] = answers
        return status, body

    def start_as_a_dispatcher(job_id: str, hand_back: bool = False) -> None:
        async def start(store: JobStore):
            [(entry, taken)] = await store.next_jobs("d1", 10, 100)
            assert taken == job_id
            outcome, claim = await store.start(job_id, entry, "d1", 3, 600)
            assert outcome == "claimed"
            if hand_back:  # its TorchServe refused it: queued again, started once
                assert await store.requeue(job_id, claim, "d1", 60, "CircuitOpen") == "ok"
        with_store(redis_server.url, start, fresh_prefix=False)

    try:
        key = make_key(redis_server.url)
        for path, hand_back, now in (("/v1/jobs/{id}", False, ("running", None)),
                                     ("/v1/jobs?limit=1", False, ("running", None)),
                                     ("/v1/jobs/{id}", True, ("queued", 1))):
            status, _, job = api.json("POST", "/v1/jobs", key, GOOD)
            assert status == 202 and job["queue_position"] == 1, job
            status, body = read_while(path.format(id=job["id"]),
                                      lambda: start_as_a_dispatcher(job["id"], hand_back))
            assert status == 200, body
            [shown] = body["jobs"] if "jobs" in body else [body]
            assert shown["id"] == job["id"], body
            assert (shown["status"], shown["queue_position"]) == now, shown
            # As it is with that position: started once, never as it was read.
            assert shown["started_at"] is not None, shown
        # A listing by state leaves out a job no longer in its states. Its own reads name
        # `queued` (the key's listing of queued jobs): held at the job's id and its status
        # as read, the script's arguments.
        started = api.json("POST", "/v1/jobs", key, GOOD)[2]["id"]
        status, body = read_while("/v1/jobs?status=queued",
                                  lambda: start_as_a_dispatcher(started),
                                  marker=started.encode() + b"\r\n$6\r\nqueued")
        assert status == 200 and started not in [job["id"] for job in body["jobs"]], body
        assert {job["status"] for job in body["jobs"]} == {"queued"}, body  # the handed back
        gone = api.json("POST", "/v1/jobs", key, GOOD)[2]["id"]
        status, body = read_while(f"/v1/jobs/{gone}",
                                  lambda: client.delete(f"sdxl:job:{gone}"))
        assert_error(status, body, 404)
    finally:
        client.close()
        api.process.stop()
        link.close()
        redis_server.stop()


@pytest.mark.parametrize("method, path", [("GET", "/v1/jobs/"), ("POST", "/v1/jobs/"),
                                          ("GET", "/v1/jobs/" + "a" * 32 + "/")])
def test_a_path_with_a_final_slash_is_a_json_404_naming_the_path_without_it(api, key, method,
                                                                            path):
    # It was a 307 with an empty body, to an absolute URL built from the Host header.
    status, headers, body = api.json(method, path, key)
    assert_error(status, body, 404)
    assert body["message"].endswith(f"(without the final /: {path.rstrip('/')})"), body
    assert "location" not in {name.lower() for name in headers}


@pytest.mark.parametrize("path", ["/playground/", "/nowhere/", "/v1/jobs/x/y/"])
def test_a_final_slash_on_a_path_that_is_not_there_points_nowhere(api, key, path):
    # /playground/ (a guess at the playground's address) said "without the final /:
    # /playground", itself a 404; the page is at /.
    status, _, body = api.json("GET", path, key)
    assert_error(status, body, 404)
    assert body["message"] == f"no such endpoint: GET {path}", body


@pytest.mark.parametrize("method, suffix", [("GET", ""), ("GET", "/events"), ("DELETE", "")])
def test_an_id_with_a_final_newline_is_not_an_id(api, key, method, suffix):
    # "$" matches before a final newline: it passed the id check and became a Redis key.
    status, _, body = api.json(method, "/v1/jobs/" + "a" * 32 + "%0A" + suffix, key)
    assert_error(status, body, 404, "job_id")
    assert "must be a job id (32 hex digits)" in body["message"]


@pytest.mark.parametrize("method, path", [
    ("GET", "/v1/jobs/{job_id}"), ("DELETE", "/v1/jobs/{job_id}"),
    ("GET", "/v1/jobs/{job_id}/events"), ("GET", "/v1/jobs/{job_id}/images/{index}")])
def test_a_malformed_job_id_is_named_as_the_documents_path_parameter(api, key, method, path):
    # The refusal named `id`, a name the document's path parameter (`job_id`) does not
    # have, so a generated client could not tell which of its arguments was wrong.
    document = api.json("GET", "/openapi.json")[2]
    names = [parameter["name"] for parameter in
             document["paths"][path][method.lower()].get("parameters", [])
             if parameter["in"] == "path"]
    assert names[0] == "job_id", names
    status, _, body = api.json(method, path.format(job_id="not-an-id", index=0), key)
    assert_error(status, body, 404, "job_id")
    assert body["message"] == "`job_id` must be a job id (32 hex digits), got 'not-an-id'"


@pytest.mark.parametrize("last_event_id", [
    "'; DROP",
    # Twenty digits, but past the largest stream id: Redis refused it only once the stream
    # had begun with a 200, which then broke off.
    "99999999999999999999-0",
    f"1-{2**64}",
])
def test_a_bad_last_event_id_is_refused_before_the_stream_starts(api, key, last_event_id):
    _, _, job = api.json("POST", "/v1/jobs", key, GOOD)
    status, _, body = api.json("GET", f"/v1/jobs/{job['id']}/events", key,
                               headers={"Last-Event-ID": last_event_id})
    assert_error(status, body, 400, "Last-Event-ID")


def open_stream(api, key: str, job_id: str) -> tuple[socket.socket, int]:
    """An event stream held open, as an EventSource holds it, and its status."""
    where = urlsplit(api.address)
    held = socket.create_connection((where.hostname, where.port), timeout=10)
    held.sendall(f"GET /v1/jobs/{job_id}/events HTTP/1.1\r\nHost: x\r\n"
                 f"Authorization: Bearer {key}\r\n\r\n".encode())
    return held, int(held.recv(4096).split(b" ")[1])


def test_a_key_holds_at_most_its_streams_and_others_are_served(api, redis_server):
    # Each open stream holds a Redis connection while it waits: 120 of one key's streams
    # took every connection, and the whole API answered 503 to every key.
    streamer = make_key(redis_server.url, "streamer")
    _, _, job = api.json("POST", "/v1/jobs", streamer, GOOD)
    held = [open_stream(api, streamer, job["id"]) for _ in range(8)]  # the default cap
    try:
        assert [status for _, status in held] == [200] * 8
        status, headers, body = api.json("GET", f"/v1/jobs/{job['id']}/events", streamer,
                                         timeout=10)  # a stream (the old way) never ends
        assert_error(status, body, 429)
        assert body["type"] == "TooManyStreams"
        assert {k.lower(): v for k, v in headers.items()}["retry-after"] == "5"
        # Past the cap a Prefer: wait submit answers at once: the job is queued all the same,
        # and the wait not said to be applied.
        started = time.monotonic()
        status, headers, waited = api.json("POST", "/v1/jobs", streamer, GOOD,
                                           headers={"Prefer": "wait=2"})
        assert status == 202 and time.monotonic() - started < 1.5, waited
        assert "preference-applied" not in {k.lower() for k in headers}, headers
        assert api.json("GET", "/v1/jobs", make_key(redis_server.url, "other"))[0] == 200
        assert api.json("GET", "/v1/health?dispatchers=0")[0] == 200
        held.pop()[0].close()  # one stream ends: the key may open another
        deadline = time.monotonic() + 10
        while True:
            again, status = open_stream(api, streamer, job["id"])
            held.append((again, status))
            if status == 200:
                break
            assert time.monotonic() < deadline, status
            time.sleep(0.2)
    finally:
        for stream, _ in held:
            stream.close()


def test_an_api_stopped_by_ctrl_c_exits_0_and_one_whose_port_is_taken_exits_3(redis_server,
                                                                              tmp_path):
    """Its server is run as `uvicorn.run` ran it: Ctrl-C (SIGINT) stops it as SIGTERM does,
    exit 0 without a traceback, and a start whose port is taken exits 3."""
    api = start_api(redis_server.url, tmp_path)
    taken = api_process(redis_server.url, api.address, tmp_path / "second.log")
    try:
        taken.start()
        assert taken.process.wait(30) == 3, taken.tail()
        api.process.kill(signal.SIGINT)
        assert api.process.process.wait(10) == 0, api.process.tail()
        assert "Traceback" not in api.process.tail(), api.process.tail()
    finally:
        taken.stop()
        api.process.stop()


def test_a_wait_whose_client_hung_up_gives_its_slot_back_at_once(redis_server, tmp_path):
    """A `Prefer: wait` client that hangs up (its own timeout shorter than the wait) held
    one of its key's waits until the wait ended: with the cap at one, the key's event
    streams were refused (429) for the whole 30 s, with nobody connected."""
    api = start_api(redis_server.url, tmp_path, {"SDXL_JOBS_MAX_WAIT_S": "30",
                                                 "SDXL_JOBS_MAX_STREAMS_PER_KEY": "1"})
    try:
        waiter = make_key(redis_server.url, "waiter")
        where = urlsplit(api.address)
        body = json.dumps(GOOD).encode()
        with socket.create_connection((where.hostname, where.port), timeout=10) as raw:
            raw.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                        + waiter.encode() + b"\r\nContent-Type: application/json\r\n"
                        b"Prefer: wait=30\r\nContent-Length: " + str(len(body)).encode()
                        + b"\r\n\r\n" + body)
            job = wait_until(lambda: api.json("GET", "/v1/jobs", waiter)[2]["jobs"], 10,
                             "the waited job to be queued")[0]
            stream, status = open_stream(api, waiter, job["id"])
            stream.close()
            assert status == 429  # the wait holds the key's one slot while its client is here
        hung_up = time.monotonic()  # no dispatcher runs: the job stays queued, the wait on
        while True:
            stream, status = open_stream(api, waiter, job["id"])
            stream.close()
            if status == 200:
                break
            assert time.monotonic() - hung_up < 5, "the wait's slot is still held"
            time.sleep(0.2)
    finally:
        api.process.stop()


def test_a_wait_held_as_the_api_stops_is_answered_with_its_job(redis_server, tmp_path):
    """A `Prefer: wait` held when its API replica is told to stop (SIGTERM: a rolling
    update) answers at once with its job, queued (202, its Location), and the API ends
    with nothing cut; uvicorn cut it after its 5 s grace without an answer (the job accepted, its id
    never told: a client without an `Idempotency-Key` could only submit it again)."""
    api = start_api(redis_server.url, tmp_path, {"SDXL_JOBS_MAX_WAIT_S": "60"})
    try:
        waiter = make_key(redis_server.url, "stopping-waiter")
        answer: dict = {}

        def submit() -> None:
            try:
                answer["reply"] = api.json("POST", "/v1/jobs", waiter, GOOD,
                                           headers={"Prefer": "wait=60"}, timeout=30)
            except Exception as exc:  # what the client got instead of an answer
                answer["reply"] = exc
        client = threading.Thread(target=submit)
        client.start()
        job = wait_until(lambda: api.json("GET", "/v1/jobs", waiter)[2]["jobs"], 10,
                         "the waited job to be queued")[0]
        told = time.monotonic()
        api.process.kill(signal.SIGTERM)  # no dispatcher runs: the job stays queued
        client.join(30)
        assert not isinstance(answer["reply"], Exception), answer["reply"]
        status, headers, body = answer["reply"]
        assert time.monotonic() - told < 3
        assert (status, body["id"], body["status"]) == (202, job["id"], "queued")
        assert headers["location"] == f"/v1/jobs/{job['id']}"
        api.process.process.wait(10)  # ended, by the SIGTERM uvicorn raises again at its end
        assert "timeout graceful shutdown exceeded" not in api.process.tail()
    finally:
        api.process.stop()


def test_an_event_stream_open_as_the_api_stops_ends_whole_at_once(redis_server, tmp_path):
    """An event stream open when its API replica is told to stop (SIGTERM) ends at once,
    its reply whole (the chunked body's last chunk), so its client comes back with its
    Last-Event-ID to another replica; it was cut after uvicorn's 5 s grace, a broken reply
    (`generate.py --async` said "connection lost") and an ERROR in the API's log."""
    api = start_api(redis_server.url, tmp_path)
    try:
        streamer = make_key(redis_server.url, "stopping-streamer")
        _, _, job = api.json("POST", "/v1/jobs", streamer, GOOD)  # no dispatcher: queued
        where = urlsplit(api.address)
        conn = http.client.HTTPConnection(where.hostname, where.port, timeout=30)
        conn.request("GET", f"/v1/jobs/{job['id']}/events",
                     headers={"Authorization": f"Bearer {streamer}"})
        response = conn.getresponse()
        assert response.status == 200
        while not response.readline().startswith(b"data: "):  # its `queued` event
            pass
        told = time.monotonic()
        api.process.kill(signal.SIGTERM)
        rest = response.read()  # http.client.IncompleteRead on a reply cut short
        assert time.monotonic() - told < 3
        assert rest == b"\n"  # the event's end, then no other: the job goes on
        conn.close()
        api.process.process.wait(10)
        assert "timeout graceful shutdown exceeded" not in api.process.tail()
    finally:
        api.process.stop()


def test_waits_of_all_keys_hold_at_most_their_connections_and_leave_redis_to_others(tmp_path):
    """Each event stream and `Prefer: wait` held a Redis connection of its own, unbounded
    per replica (the per-key cap only): past Redis's `maxclients` a dispatcher could no
    longer connect (its check-in failed, so the queue stopped because browsers watched),
    and a stream over it was a 200 ended by its `unavailable` event. Now at most
    SDXL_JOBS_MAX_WAITING wait at once; one more is a 503 with Retry-After before it starts."""
    from sdxl_jobs.processes import RedisServer

    redis_server = RedisServer(tmp_path / "redis")
    redis_server.start()
    bound = 6
    api = start_api(redis_server.url, tmp_path, {"SDXL_JOBS_MAX_WAITING": str(bound),
                                                 "SDXL_JOBS_MAX_WAIT_S": "30"})
    watcher = redis.Redis.from_url(redis_server.url)
    held = []
    try:
        keys = [make_key(redis_server.url, f"watcher-{n}") for n in range(3)]
        jobs = {key: api.json("POST", "/v1/jobs", key, GOOD)[2]["id"] for key in keys}
        # Room for the bound's waits, the API's other calls and one dispatcher, no more: each
        # stream past the bound would take the dispatcher's.
        room = watcher.info("clients")["connected_clients"] + bound + 3
        watcher.config_set("maxclients", room)
        # 4 streams a key (under its cap of 8), 12 in all: one browser tab per job.
        held = [open_stream(api, key, jobs[key]) for key in keys for _ in range(4)]
        assert [status for _, status in held] == [200] * bound + [503] * (12 - bound)

        def blocked() -> list[dict]:
            return [c for c in watcher.client_list() if "b" in c["flags"]]
        wait_until(lambda: len(blocked()) == bound, 10, f"{bound} waits blocked in Redis",
                   detail=blocked)
        assert len([c for c in watcher.client_list() if c["cmd"] == "xread"]) == bound
        status, headers, refusal = api.json("GET", f"/v1/jobs/{jobs[keys[2]]}/events",
                                            keys[2], timeout=10)
        assert_error(status, refusal, 503)
        assert refusal["type"] == "Unavailable", refusal
        assert {k.lower(): v for k, v in headers.items()}["retry-after"] == "5"
        assert "SDXL_JOBS_MAX_WAITING" in refusal["message"], refusal
        assert f"holds {bound} event streams" in refusal["message"], refusal
        # Past the bound a `Prefer: wait` submit answers at once, the job queued.
        started = time.monotonic()
        status, headers, job = api.json("POST", "/v1/jobs", keys[0], GOOD,
                                        headers={"Prefer": "wait=30"})
        assert status == 202 and time.monotonic() - started < 3, job
        assert "preference-applied" not in {k.lower() for k in headers}, headers
        # A dispatcher connects and checks in; every other call is served.
        with_store(redis_server.url, lambda store: store.check_in("still-served"),
                   fresh_prefix=False)
        assert api.json("GET", f"/v1/jobs/{job['id']}", keys[0])[0] == 200
        assert api.call("GET", "/metrics")[0] == 200
        assert api.json("GET", "/v1/health?dispatchers=1")[0] == 200
        assert watcher.info("stats")["rejected_connections"] == 0
        for stream, _ in held[:bound]:  # tabs closed: their places come free
            stream.close()
        wait_until(lambda: open_stream(api, keys[1], jobs[keys[1]])[1] == 200, 10,
                   "a stream let through once others closed")
    finally:
        for stream, _ in held:
            stream.close()
        watcher.close()
        api.process.stop()
        redis_server.stop()


def test_a_burst_of_calls_holds_at_most_its_connections_and_past_them_is_503(tmp_path):
    """Every call but the waits took a Redis connection of a pool without a bound: as many
    as calls reached Redis at once, all kept for good (300 GETs at once left 24 open), from
    the `maxclients` the dispatchers share. Now at most SDXL_JOBS_REDIS_CONNECTIONS (counted
    in `CLIENT LIST`); a call that finds none free within 2 s (Redis paused under a burst)
    is a 503 with Retry-After naming the limit, never a 500, and the others are served."""
    from concurrent.futures import ThreadPoolExecutor

    from sdxl_jobs.processes import RedisServer

    redis_server = RedisServer(tmp_path / "redis")
    redis_server.start()
    bound = 4
    api = start_api(redis_server.url, tmp_path, {"SDXL_JOBS_REDIS_CONNECTIONS": str(bound)})
    watcher = redis.Redis.from_url(redis_server.url)
    try:
        key = make_key(redis_server.url, "burst")
        job = api.json("POST", "/v1/jobs", key, GOOD)[2]

        def burst(calls: int) -> list[tuple[int, dict, dict]]:
            with ThreadPoolExecutor(calls) as pool:
                return list(pool.map(lambda _: api.json("GET", f"/v1/jobs/{job['id']}", key,
                                                        timeout=20), range(calls)))

        def api_connections() -> int:
            return len([c for c in watcher.client_list() if c["id"] != str(watcher.client_id())])
        assert {status for status, _, _ in burst(48)} == {200}
        assert 1 <= api_connections() <= bound, watcher.client_list()
        watcher.client_pause(3000)  # every client's commands wait 3 s
        answers = burst(12)
        assert {status for status, _, _ in answers} == {200, 503}, answers
        for status, headers, refusal in answers:
            if status == 503:
                assert_error(status, refusal, 503)
                assert refusal["type"] == "Unavailable", refusal
                assert {k.lower(): v for k, v in headers.items()}["retry-after"] == "2"
                assert f"{bound} connections" in refusal["message"], refusal
                assert "SDXL_JOBS_REDIS_CONNECTIONS" in refusal["message"], refusal
        assert api_connections() <= bound, watcher.client_list()
        assert api.json("GET", f"/v1/jobs/{job['id']}", key)[0] == 200  # the burst is over
        # The log names the limit too, where it said redis-py's "ConnectionError: No
        # connection available.", read as Redis being away.
        said = api.process.log_path.read_text()
        assert f"all {bound} connections to Redis busy (SDXL_JOBS_REDIS_CONNECTIONS)" in said
        assert "No connection available" not in said
    finally:
        watcher.close()
        api.process.stop()
        redis_server.stop()


def test_a_submit_that_finds_no_connection_free_is_told_it_was_not_accepted(tmp_path):
    """A submit whose own call found this replica's pool all taken was answered as a call
    that reached Redis: "the job may have been accepted", list the key's jobs before
    submitting again, Retry-After 5. Nothing had been sent: now the busy pool's 503, as
    every other call gets it, and no job was made for it."""
    from sdxl_jobs.processes import RedisServer

    redis_server = RedisServer(tmp_path / "redis")
    redis_server.start()
    bound = 4
    api = start_api(redis_server.url, tmp_path, {"SDXL_JOBS_REDIS_CONNECTIONS": str(bound)})
    watcher = redis.Redis.from_url(redis_server.url)
    host, port = urlsplit(api.address).hostname, urlsplit(api.address).port
    body = json.dumps(GOOD).encode()
    sockets = []
    try:
        key = make_key(redis_server.url, "submits")
        assert api.json("POST", "/v1/jobs", key, GOOD)[0] == 202  # the model's bounds read
        # Twelve submits past their key's lookup (a read), each waiting for its last byte.
        for _ in range(12):
            sock = socket.create_connection((host, port), timeout=20)
            sock.sendall(f"POST /v1/jobs HTTP/1.1\r\nHost: {host}\r\nAuthorization: "
                         f"Bearer {key}\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:-1])
            sockets.append(sock)
        time.sleep(1.0)
        # Writes wait 3 s (the submit's script): the first four submits hold the pool, the
        # others find it taken at their own call.
        watcher.client_pause(3000, all=False)
        for sock in sockets:
            sock.sendall(body[-1:])
        answers = []
        for sock in sockets:
            response = http.client.HTTPResponse(sock)
            response.begin()
            answers.append((response.status, response.getheader("Retry-After"),
                            json.loads(response.read())))
        assert sorted(status for status, _, _ in answers) == [202] * bound + [503] * 8, answers
        for status, retry_after, refusal in answers:
            if status == 503:
                assert refusal["type"] == "Unavailable" and retry_after == "2", refusal
                assert f"{bound} connections" in refusal["message"], refusal
                assert "may have been accepted" not in refusal["message"], refusal
        listed = api.json("GET", "/v1/jobs?limit=100", key)[2]
        assert len(listed["jobs"]) == 1 + bound, listed  # none made for a refused submit
    finally:
        for sock in sockets:
            sock.close()
        watcher.close()
        api.process.stop()
        redis_server.stop()


@pytest.mark.parametrize("size", [17 * 1024, 60 * 1024, 1 << 20])
def test_a_head_over_16_kib_is_refused_before_anything_is_read(api, key, size):
    # httptools read a header of any size (60 MB blocked the event loop for 6 s, before any
    # key was checked); h11 stops at 16 KiB only while a head is incomplete, so one that
    # came whole in one read (60 KiB) was parsed and served.
    where = urlsplit(api.address)
    with socket.create_connection((where.hostname, where.port), timeout=10) as raw:
        started = time.monotonic()
        try:
            raw.sendall(b"GET /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                        + key.encode() + b"\r\nX-Big: " + b"a" * size + b"\r\n\r\n")
        except OSError:
            pass  # refused while still sending: what we want
        answer = read_response(raw)
    assert time.monotonic() - started < 5
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431"), answer[:300]
    refusal = json.loads(body)
    assert refusal["code"] == 431 and refusal["type"] == "HeadersTooLarge"
    assert "16384" in refusal["message"] and refusal["request_id"]


def test_a_pipelined_head_over_16_kib_is_refused(api, key):
    # Sent behind a request before its answer, it waited in h11's buffer past the size
    # check and was parsed and served whole once the first was answered (a 401 here).
    where = urlsplit(api.address)
    with socket.create_connection((where.hostname, where.port), timeout=10) as raw:
        raw.sendall(HEALTH + b"GET /v1/jobs HTTP/1.1\r\nHost: x\r\nX-Big: "
                    + b"a" * (60 * 1024) + b"\r\n\r\n")
        answer, _ = hold_until_closed(raw, trickle=False, seconds=8)
    first, second = answer.split(b"HTTP/1.1 ")[1:]
    assert first.startswith(b"200") and second.startswith(b"431"), answer[:600]
    refusal = json.loads(second.partition(b"\r\n\r\n")[2])
    assert refusal["type"] == "HeadersTooLarge" and "16384" in refusal["message"], refusal


def test_a_head_just_under_16_kib_with_its_body_in_the_same_read_is_served(api, key):
    # The limit is on the head alone: a body that came in the same read does not count.
    where = urlsplit(api.address)
    body = json.dumps({**GOOD, "negative_prompt": "b" * 1500}).encode()
    start = (b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + key.encode()
             + b"\r\nContent-Type: application/json\r\nContent-Length: "
             + str(len(body)).encode() + b"\r\nX-Pad: ")
    pad = 16 * 1024 - len(start) - len(b"\r\n\r\n")
    with socket.create_connection((where.hostname, where.port), timeout=10) as raw:
        raw.sendall(start + b"a" * pad + b"\r\n\r\n" + body)
        answer = read_response(raw)
    assert answer.startswith(b"HTTP/1.1 202"), answer[:300]


def test_a_head_of_bare_line_feeds_is_measured_to_its_blank_line(api, key):
    # h11 ends a head at a blank line whether its lines end in CRLF or a bare LF; the size
    # check looked for CRLF CRLF only, so this head of 156 bytes written with LFs, with a
    # 20,000-byte body in the same read, was a 431 "over 20156 bytes": its body was counted.
    where = urlsplit(api.address)
    body = json.dumps(GOOD).encode()
    body += b" " * (20000 - len(body))  # JSON's whitespace: the same body, 20,000 bytes
    head = (b"POST /v1/jobs HTTP/1.1\nHost: x\nAuthorization: Bearer " + key.encode()
            + b"\nContent-Type: application/json\nContent-Length: "
            + str(len(body)).encode() + b"\n\n")
    with socket.create_connection((where.hostname, where.port), timeout=10) as raw:
        raw.sendall(head + body)
        answer = read_response(raw)
    assert answer.startswith(b"HTTP/1.1 202"), answer[:300]


# The head limit docs/jobs.md states, written out rather than read from the API's constant,
# so that a change of it fails here until the docs say the new one.
DOCUMENTED_HEAD_BYTES = 16 * 1024


@pytest.mark.parametrize("where", ["request line", "header"])
@pytest.mark.parametrize("size", [DOCUMENTED_HEAD_BYTES, DOCUMENTED_HEAD_BYTES + 1],
                         ids=["at the limit", "one byte over"])
def test_the_head_limit_is_16384_bytes_however_the_head_is_split(api, where, size):
    # One cap on the whole head (its request line, headers and blank line), and none on
    # one line or on how many there are: TorchServe's own limits (a 4096-byte request line,
    # 8192 bytes of headers, docs/api.md) are not the job API's. A long request line is
    # a query of digits (`dispatchers` with leading zeros, still 0), a long header one the
    # API does not read.
    line = b"GET /v1/health?dispatchers=0%s HTTP/1.1\r\n"
    rest = b"Host: x\r\nConnection: close\r\n%s\r\n"
    pad = size - len(line % b"") - len(rest % b"")
    if where == "request line":
        head = line % (b"0" * pad) + rest % b""
    else:
        pad -= len(b"X-Pad: \r\n")
        head = line % b"" + rest % (b"X-Pad: " + b"a" * pad + b"\r\n")
    assert len(head) == size
    address = urlsplit(api.address)
    with socket.create_connection((address.hostname, address.port), timeout=10) as raw:
        raw.sendall(head)
        answer = read_response(raw)
    status, _, body = answer.partition(b"\r\n\r\n")
    if size == DOCUMENTED_HEAD_BYTES:
        assert status.startswith(b"HTTP/1.1 200"), answer[:300]
        assert json.loads(body)["status"] == "ok"
    else:
        assert status.startswith(b"HTTP/1.1 431"), answer[:300]
        refusal = json.loads(body)
        assert refusal["type"] == "HeadersTooLarge", refusal
        assert f"are {size} bytes; the limit is {DOCUMENTED_HEAD_BYTES}" in refusal["message"]


# Slow clients (slowloris): short deadlines, so a test can outwait them.
BODY_TIMEOUT_S = 2
HEADER_TIMEOUT_S = 1
# Well past the deadline, and short of uvicorn's keep-alive (5 s), which would close an
# idle connection on its own.
OUTWAIT_S = HEADER_TIMEOUT_S + 3
HEALTH = b"GET /v1/health?dispatchers=0 HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.fixture(scope="module")
def slow_client_api(redis_server, tmp_path_factory):
    """An API with short body and header deadlines."""
    running = start_api(redis_server.url, tmp_path_factory.mktemp("slow-client-api"),
                        {"SDXL_JOBS_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
                         "SDXL_JOBS_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S)})
    yield running
    running.process.stop()


def trickle_until_closed(api, head: bytes, seconds: float) -> tuple[bytes, float]:
    """Send ``head`` (headers and the start of a body), then trickle the body
    (``hold_until_closed``) until the API closes the connection."""
    where = urlsplit(api.address)
    with socket.create_connection((where.hostname, where.port), timeout=seconds) as raw:
        raw.sendall(head)
        return hold_until_closed(raw, trickle=True, seconds=seconds)


@pytest.mark.parametrize("first_bytes", [b"", b'{"prompt": "'], ids=["nothing", "trickle"])
def test_a_body_that_never_arrives_gets_408_and_the_connection_closed(slow_client_api, key,
                                                                      first_bytes):
    # uvicorn sets no time limit on a body: one that trickled a byte a second, or never
    # came, held the connection and the submit's task for good (still open after 40 s).
    head = (f"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n").encode()
    answer, took = trickle_until_closed(slow_client_api, head + first_bytes,
                                          BODY_TIMEOUT_S + 8)
    status, _, body = answer.partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 408") and b"connection: close" in status, answer
    assert_error(408, json.loads(body), 408)
    assert json.loads(body)["type"] == "RequestTimeout"
    assert f"within {BODY_TIMEOUT_S} s" in json.loads(body)["message"]
    assert took >= BODY_TIMEOUT_S - 0.5


def test_a_body_left_unread_after_a_refusal_does_not_hold_the_connection(slow_client_api):
    # Refused before its body is read (no key), the request goes on trickling: uvicorn's
    # keep-alive timer stops at the first byte after the reply, so the connection stayed
    # open for good. Now the rest is read up to the deadline, then the connection closed.
    head = (b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100000\r\n\r\n{")
    answer, _ = trickle_until_closed(slow_client_api, head, BODY_TIMEOUT_S + 8)
    assert answer.startswith(b"HTTP/1.1 401") and b"connection: close" in answer, answer


@pytest.mark.parametrize("framing", [b"Content-Length: 100000", b"Transfer-Encoding: chunked"],
                         ids=["length", "chunked"])
def test_a_client_that_hangs_up_mid_body_logs_no_error(api, key, framing):
    # A client gone before its body arrived whole (its own timeout, a dropped network) was
    # an ERROR "unexpected error on POST /v1/jobs" with a traceback, and uvicorn's
    # "Exception in ASGI application" with another: some 100 lines for each such client.
    log = api.process.log_path
    before = log.stat().st_size
    where = urlsplit(api.address)
    with socket.create_connection((where.hostname, where.port), timeout=10) as raw:
        raw.sendall(f"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
                    f"Content-Type: application/json\r\n".encode() + framing + b"\r\n\r\n"
                    + (b"c\r\n" if b"chunked" in framing else b"") + b'{"prompt": "')
        time.sleep(0.5)  # the submit reads the body
    time.sleep(0.5)  # and finds the client gone
    assert api.json("POST", "/v1/jobs", key, GOOD)[0] == 202  # the API serves on
    with log.open("rb") as said:
        said.seek(before)
        new = said.read().decode()
    assert "Traceback" not in new and "ERROR" not in new, new[-3000:]


def test_a_whole_body_is_not_hurried_by_the_deadline(slow_client_api, key):
    # The deadline covers the body only: a submit whose body came at once is answered as
    # usual, and a refusal of a small body keeps its connection (keep-alive).
    assert slow_client_api.json("POST", "/v1/jobs", key, GOOD)[0] == 202
    conn = connection(slow_client_api)
    try:
        for _ in range(2):
            conn.request("POST", "/v1/jobs", body=json.dumps(GOOD))  # no key: 401
            response = conn.getresponse()
            assert response.status == 401 and response.getheader("connection") is None
            response.read()
    finally:
        conn.close()


def read_response(raw: socket.socket) -> bytes:
    """One whole response with a Content-Length, read from ``raw``."""
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += raw.recv(65536)
    head, _, body = answer.partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    while len(body) < length:
        body += raw.recv(65536)
    return head + b"\r\n\r\n" + body


@pytest.mark.parametrize("request_bytes, reason", [
    (b"GET /v1/jobs HTTP/1.1\r\nHost: x\r\nA header without a colon\r\n\r\n",
     "(here: illegal header line)"),
    (b"GET /v1/jobs HTTP/1.1\r\nHost: x\r\nX-Note: a\x00b\r\n\r\n",
     "(here: illegal header line)"),
    (b"GET /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-secret\x00\r\n\r\n",
     "(here: illegal header line)"),
    (b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
     "(here: conflicting Content-Length headers)"),
    (b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
     "(here: Only Transfer-Encoding: chunked is supported)"),
    (b"GET /v1/jobs HTTP/1.1\r\nX-Note: a\r\n\r\n", "(here: Missing mandatory Host: header)"),
    (b"GET /v1/jobs HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
     "(here: Found multiple Host: headers)"),
    (b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: " + b"1" * 21 + b"\r\n\r\n",
     "(here: bad Content-Length)"),
    (b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nsk-secret\r\n",
     "(here: illegal chunk header)"),
    (b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
     + b"0" * 20000, "(here: Receive buffer too long)"),
], ids=["no-colon", "nul", "key-with-nul", "two-lengths", "transfer-encoding", "no-host",
        "two-hosts", "21-digit-length", "chunk-header", "chunk-size-line-over-16-kib"])
def test_a_request_that_is_not_http_is_a_json_400_and_the_connection_closed(api,
                                                                            request_bytes,
                                                                            reason):
    # uvicorn answered these with a plain-text line, "Invalid HTTP request received.". Then
    # ours listed four faults and not which one: a request without Host, with two, or with
    # a Content-Length of 21 digits (h11's bound) was told of none of its own. Now h11's
    # reason, in its words, without the line it quotes (a key, in neither reply nor log).
    log = api.process.log_path
    before = log.stat().st_size
    where = urlsplit(api.address)
    with socket.create_connection((where.hostname, where.port), timeout=10) as raw:
        raw.sendall(request_bytes)
        answer = b""
        while chunk := raw.recv(65536):  # to the close
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), answer[:300]
    assert b"content-type: application/json" in head.lower(), head
    refusal = json.loads(body)
    assert refusal["code"] == 400 and refusal["type"] == "InvalidRequest", refusal
    assert "not HTTP/1.1" in refusal["message"] and refusal["request_id"]
    assert reason in refusal["message"], refusal["message"]
    # Its list of faults has this one's kind: it named header faults only.
    assert ("malformed chunk" if b"chunked\r\n\r\n" in request_bytes else "header") \
        in refusal["message"].partition("): ")[2], refusal["message"]
    assert b"secret" not in answer
    with log.open("rb") as said:
        said.seek(before)
        assert b"secret" not in said.read()


def test_the_h11_reasons_told_are_h11s_own_and_nothing_else_is_told():
    # The reason was h11's text cut before a quote of bytes in the form h11 0.16 writes
    # (": b'...'"): a text quoting them another way, from another h11, went out whole, a
    # client's header (a key) in the reply and the INFO line. Now only texts known to be
    # h11's are told, and each is in its source: an h11 that rewords one fails here.
    import h11

    from sdxl_jobs.api import H11_QUOTING_REASONS, H11_REASONS, h11_reason

    source = "".join(path.read_text() for path in Path(h11.__file__).parent.glob("*.py"))
    for reason in H11_REASONS:
        assert f'"{reason}"' in source, reason
    for reason in H11_QUOTING_REASONS:
        assert f'"{reason}: {{' in source, reason
        assert h11_reason(h11.RemoteProtocolError(f"{reason}: 'sk-secret'")) == reason
    for text in ("illegal header value: sk-secret", "Authorization sk-secret refused",
                 "illegal header line sk-secret"):
        assert h11_reason(h11.RemoteProtocolError(text)) is None, text


def test_a_request_framed_twice_is_answered_and_its_connection_closed(api):
    # A body with both a Content-Length and a Transfer-Encoding is read as chunked (h11),
    # and RFC 9112 6.1 says the connection must close after the reply: uvicorn kept it
    # open and answered what followed the chunked body as a second request, the one a
    # proxy in front going by the Content-Length would have let through as body bytes.
    where = urlsplit(api.address)
    with socket.create_connection((where.hostname, where.port), timeout=10) as raw:
        raw.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
                    + HEALTH)
        answer, closed = b"", False
        try:
            while chunk := raw.recv(65536):
                answer += chunk
            closed = True
        except socket.timeout:
            pass
    head = answer.partition(b"\r\n\r\n")[0].lower()
    assert head.startswith(b"http/1.1 401") and b"connection: close" in head, answer[:300]
    assert answer.count(b"HTTP/1.1 ") == 1, f"the smuggled request was answered: {answer!r}"
    assert closed, f"the connection stayed open: {answer!r}"

@pytest.mark.parametrize("after_a_response", [False, True],
                         ids=["trickle", "trickle-on-a-kept-alive-connection"])
def test_headers_that_do_not_arrive_in_time_get_408_and_the_connection_closed(
        slow_client_api, after_a_response):
    # uvicorn sets no time limit on a request's head and its keep-alive timer stops at the
    # first byte: a client that trickled its headers, one byte a second, held the connection
    # for good (still open after 65 s).
    where = urlsplit(slow_client_api.address)
    with socket.create_connection((where.hostname, where.port), timeout=OUTWAIT_S) as raw:
        if after_a_response:  # the deadline starts again with the next request
            raw.sendall(HEALTH)
            assert read_response(raw).startswith(b"HTTP/1.1 200"), "the first request failed"
            time.sleep(0.5)
        raw.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        answer, took = hold_until_closed(raw, trickle=True, seconds=OUTWAIT_S)
    status, _, body = answer.partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 408") and b"connection: close" in status, answer
    error = json.loads(body)
    assert error["code"] == 408 and error["type"] == "RequestTimeout" and error["request_id"]
    assert f"within {HEADER_TIMEOUT_S} s" in error["message"]
    assert HEADER_TIMEOUT_S - 0.3 <= took < HEADER_TIMEOUT_S + 2, took


def test_a_pipelined_head_that_does_not_come_whole_gets_408(slow_client_api):
    # Sent behind a request before its answer, it waited in h11's buffer with no deadline
    # until its next bytes: it got none, and the connection was closed by keep-alive (5 s)
    # without a word.
    where = urlsplit(slow_client_api.address)
    with socket.create_connection((where.hostname, where.port), timeout=OUTWAIT_S) as raw:
        raw.sendall(HEALTH + b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        answer, took = hold_until_closed(raw, trickle=False, seconds=OUTWAIT_S)
    first, second = answer.split(b"HTTP/1.1 ")[1:]
    assert first.startswith(b"200") and second.startswith(b"408"), answer
    assert json.loads(second.partition(b"\r\n\r\n")[2])["type"] == "RequestTimeout"
    assert HEADER_TIMEOUT_S - 0.3 <= took < HEADER_TIMEOUT_S + 2, took


def test_a_connection_that_sends_nothing_is_closed_without_a_reply(slow_client_api):
    # It held the connection for good too (still open after 65 s). No 408 here: a pooled
    # client that sent its request just after would read it as that request's answer
    # (seen with http.client), where a plain close it notices before writing.
    where = urlsplit(slow_client_api.address)
    with socket.create_connection((where.hostname, where.port), timeout=OUTWAIT_S) as raw:
        answer, took = hold_until_closed(raw, trickle=False, seconds=OUTWAIT_S)
    assert answer == b"", answer
    assert HEADER_TIMEOUT_S - 0.3 <= took < HEADER_TIMEOUT_S + 2, took


def test_a_kept_alive_connection_idle_between_requests_is_not_hurried(slow_client_api):
    # Idle time between requests is keep-alive's (5 s), not the header deadline's; and a
    # head that comes in pieces, whole within the deadline, is served.
    where = urlsplit(slow_client_api.address)
    conn = http.client.HTTPConnection(where.hostname, where.port, timeout=10)
    try:
        conn.request("GET", "/v1/health?dispatchers=0")
        first = conn.getresponse()
        assert first.status == 200 and first.getheader("connection") is None
        first.read()
        sock = conn.sock
        time.sleep(HEADER_TIMEOUT_S + 1)  # idle past the header deadline
        conn.request("GET", "/v1/health?dispatchers=0")
        second = conn.getresponse()
        assert second.status == 200, second.read()
        second.read()
        assert conn.sock is sock, "the connection was not kept"

        time.sleep(HEADER_TIMEOUT_S + 1)
        half = len(HEALTH) // 2
        sock.sendall(HEALTH[:half])
        time.sleep(HEADER_TIMEOUT_S / 2)
        sock.sendall(HEALTH[half:])
        assert read_response(sock).startswith(b"HTTP/1.1 200")
    finally:
        conn.close()


# "²" is a digit to str.isdigit, and not to int().
@pytest.mark.parametrize("prefer, wait", [
    ("wait=soon", "wait=soon"), ("wait=\u00b2", "wait=\u00b2"), ("wait=-1", "wait=-1"),
    ("wait=1.5", "wait=1.5"), ("wait", "wait"), ("respond-async, wait=", "wait="),
    ('wait=""', 'wait=""'), ('wait="soon"', 'wait="soon"'), ("wait=5s; x=1", "wait=5s; x=1"),
    ("Wait=soon, wait=1", "Wait=soon"),  # the first `wait` is the one read
    ('return=minimal; x="a,b", WAIT ;foo', "WAIT ;foo"),
])
def test_a_bad_prefer_wait_is_refused(api, key, prefer, wait):
    status, _, body = api.json("POST", "/v1/jobs", key, GOOD, headers={"Prefer": prefer})
    assert_error(status, body, 400, "Prefer")
    assert "first `wait` must be whole seconds" in body["message"], body
    assert body["message"].endswith(f", got {wait!r}"), body


@pytest.mark.parametrize("lines, applied", [
    # RFC 7240's own forms, each refused with a 400 before: a preference's parameters, a
    # quoted value, a name in capitals with blanks around "=".
    ([("Prefer", "wait=1; foo")], "wait=1"),
    ([("Prefer", 'wait="1"')], "wait=1"),
    ([("Prefer", "respond-async, WAIT = 1 ;foo=bar")], "wait=1"),
    # A repeated preference is ignored (RFC 7240), whatever it holds.
    ([("Prefer", "wait=1, wait=soon")], "wait=1"),
    ([("Prefer", "wait=0, wait=2")], "wait=0"),
    # A quoted string's commas are its own: this `wait` is inside one.
    ([("Prefer", 'foo="a, wait=x", wait=1')], "wait=1"),
    # Two lines are one list: the first `wait` of both counts.
    ([("Prefer", "respond-async"), ("Prefer", "wait=1"), ("Prefer", "wait=2")], "wait=1"),
    ([("Prefer", "wait=" + "9" * 30)], "wait=2"),  # the cap (SDXL_JOBS_MAX_WAIT_S)
    ([("Prefer", "return=minimal, handling=lenient")], None),
])
def test_prefer_is_read_as_rfc_7240_writes_it(api, redis_server, lines, applied):
    erin = make_key(redis_server.url, "erin")  # her own limits: these jobs stay queued
    started = time.monotonic()
    status, headers, job = submit_with(api, erin, json.dumps(GOOD).encode(), [JSON, *lines])
    took = time.monotonic() - started
    assert status == 202 and job["status"] == "queued", job
    assert {k.lower(): v for k, v in headers.items()}.get("preference-applied") == applied
    waited = int(applied.split("=")[1]) if applied else 0
    # Waited as long as it says (the header says which wait counted), and not for good:
    # the upper bound leaves a busy 2-core machine its round trip.
    assert waited <= took < waited + 3, took


def test_a_prefer_wait_over_the_cap_waits_the_cap(api, key):
    # More digits than int() takes (4300): the cap (2 s here), not a 500.
    started = time.monotonic()
    status, _, job = api.json("POST", "/v1/jobs", key, GOOD,
                              headers={"Prefer": "wait=" + "9" * 5000})
    assert status == 202 and job["status"] == "queued"
    assert 2 <= time.monotonic() - started < 10


def test_rate_limit_answers_429_with_retry_after(api, redis_server):
    key = make_key(redis_server.url, "busy")
    answers = [api.json("POST", "/v1/jobs", key, GOOD) for _ in range(32)]
    statuses = [a[0] for a in answers]
    assert statuses[:30] == [202] * 30
    status, headers, body = answers[30]
    assert_error(status, body, 429)
    assert int(headers["retry-after"]) >= 1 and "30" in body["message"]  # the cap of 30
    # At its cap, a request with its own error is still told that error, not to wait.
    assert_error(*api.json("POST", "/v1/jobs", key, {**GOOD, "stream": True})[::2], 400,
                 "stream")


def test_health_needs_a_dispatcher(api):
    """No dispatcher checked in is a 503 with Retry-After, as every other 503 of the API
    (it had none); 5 s, a dispatcher's check-in interval."""
    status, headers, body = api.json("GET", "/v1/health")
    assert_error(status, body, 503)
    assert "dispatcher" in body["message"]
    assert headers.get("retry-after") == "5"
    status, _, body = api.json("GET", "/v1/health?dispatchers=0")
    assert status == 200 and body["redis"] == "ok"


def metrics(api) -> dict:
    status, _, raw = api.call("GET", "/metrics")
    assert status == 200
    found: dict = {}
    for family in text_string_to_metric_families(raw.decode()):
        for sample in family.samples:
            label = next(iter(sample.labels.values()), "")
            found.setdefault(sample.name, {})[label] = sample.value
    return found


def test_metrics(api, key):
    api.json("POST", "/v1/jobs", key, GOOD)
    found = metrics(api)
    assert found["sdxl_jobs"]["queued"] >= 1
    assert found["sdxl_jobs_queue_depth"][""] >= 1
    assert found["sdxl_jobs_oldest_queued_age_seconds"][""] >= 0
    assert found["sdxl_jobs_total"]["submitted"] >= 1
    assert "+Inf" in found["sdxl_job_wait_seconds_bucket"]
    assert set(found["sdxl_webhook_deliveries_total"]) >= {"delivered", "failed"}
    assert found["sdxl_webhook_backlog"][""] >= 0
    assert found["sdxl_webhook_oldest_age_seconds"][""] >= 0


def test_counters_past_a_million_are_exported_exactly(api, redis_server):
    """Counters kept in Redis grow for the life of the queue; printed with 6 significant
    digits they read 1.23457e+06 past 999,999 and stood still for rate() until the next
    digit moved. Raised by what a long-lived queue reaches, then lowered back."""
    client = redis.Redis.from_url(redis_server.url)
    before = metrics(api)
    raised = {"jobs_submitted": 1_234_567, "wait_seconds_sum": 98_765_432.125,
              "wait_seconds_count": 1_234_567, "webhooks_delivered": 7_654_321}

    def add(sign: int) -> None:
        for field, amount in raised.items():
            increment = client.hincrbyfloat if isinstance(amount, float) else client.hincrby
            increment("sdxl:stats", field, sign * amount)

    try:
        add(1)
        after = metrics(api)
    finally:
        add(-1)
        client.close()
    for name, label, field in (("sdxl_jobs_total", "submitted", "jobs_submitted"),
                               ("sdxl_job_wait_seconds_sum", "", "wait_seconds_sum"),
                               ("sdxl_job_wait_seconds_count", "", "wait_seconds_count"),
                               ("sdxl_webhook_deliveries_total", "delivered",
                                "webhooks_delivered")):
        # 6 digits were 1e-6 off or worse; a float sum keeps 1e-16 of its own.
        assert after[name][label] - before[name][label] == pytest.approx(raised[field],
                                                                         rel=1e-12), name


def test_openapi_document_is_committed_and_current(api):
    status, _, served = api.json("GET", "/openapi.json")
    assert status == 200
    body = served["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]
    assert {"prompt", "webhook", "webhook_events"} <= set(body["schema"]["properties"])
    # What the routes check by hand is in the document: the key, the headers they read,
    # the 200 of a finished job, and our 400 (not FastAPI's 422) for a bad query.
    paths = served["paths"]
    assert served["components"]["securitySchemes"]["apiKey"]["scheme"] == "bearer"
    assert all(op["security"] == [{"apiKey": []}] for path, ops in paths.items()
               if path.startswith("/v1/jobs") for op in ops.values())
    assert "security" not in paths["/v1/health"]["get"]
    submit = paths["/v1/jobs"]["post"]
    assert {"200", "202"} <= set(submit["responses"])
    assert [p["name"] for p in submit["parameters"]] == ["Content-Encoding",
                                                         "Idempotency-Key", "Prefer"]
    assert "Last-Event-ID" in [p["name"] for p in paths["/v1/jobs/{job_id}/events"]["get"]
                               ["parameters"]]
    assert "422" not in paths["/v1/health"]["get"]["responses"]
    assert "ValidationError" not in json.dumps(served)
    # Last: under another Unicode version than the committed document's, it skips after
    # comparing all but the patterns that version decides.
    committed = json.loads((REPO / "docs" / "jobs-openapi.json").read_text())
    assert_committed_is_current(committed, served,
                                "run `make docs` to regenerate docs/jobs-openapi.json")


@pytest.mark.parametrize("body, refused_field", [
    # The server reads null as "not given" and takes `stream: false`; the document refused
    # both, so a client generated from it could not send what the API documents in words.
    ({"prompt": "x", "stream": False}, None),
    ({"prompt": "x", "seed": None, "width": None, "stream": None, "webhook": None,
      "webhook_events": None}, None),
    ({"prompt": "x", "stream": True}, "stream"),
    ({"prompt": None}, "prompt"),
    ({"prompt": "x", "webhook": f"http://{HOOKS}/hook", "webhook_events": []},
     "webhook_events"),
    ({"prompt": "x", "webhook_events": ["failed"]}, "webhook_events"),
    ({"prompt": "x", "webhook": None, "webhook_events": ["failed"]}, "webhook_events"),
    ({"prompt": "x", "webhook": f"http://user@{HOOKS}/hook"}, "webhook"),
    # The document took a lone surrogate, invisible characters above U+FFFF alone and (read
    # by Python's jsonschema) U+FEFF alone; every class of character: tests/unit.
    ({"prompt": "\U0001f600"}, None),
    ({"prompt": "a\ud800"}, "prompt"),
    ({"prompt": "x", "negative_prompt": "\udfff"}, "negative_prompt"),
    ({"prompt": "\U000e0020\U000e0021"}, "prompt"),
    ({"prompt": "\ufeff"}, "prompt"),
])
def test_the_document_takes_the_bodies_the_server_takes(api, redis_server, body,
                                                          refused_field):
    import jsonschema

    document = json.loads((REPO / "docs" / "jobs-openapi.json").read_text())
    schema = (document["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]
              ["application/json"]["schema"])
    valid = jsonschema.validators.validator_for(schema)(schema).is_valid(body)
    # A key of its own: the module's key has its submits a minute counted.
    status, _, answer = api.json("POST", "/v1/jobs", make_key(redis_server.url, "dave"), body)
    if refused_field is None:
        assert valid and status == 202, answer
    else:
        assert not valid
        assert_error(status, answer, 400, refused_field)


def test_413_and_422_are_documented_only_where_a_body_is_read(api):
    # 413 (too large) and 422 (an Idempotency-Key reused) were listed on every route.
    paths = api.json("GET", "/openapi.json")[2]["paths"]
    for path, operations in paths.items():
        for method, operation in operations.items():
            reads_a_body = (path, method) == ("/v1/jobs", "post")
            assert reads_a_body == ("413" in operation["responses"]), (path, method)
            assert reads_a_body == ("422" in operation["responses"]), (path, method)


def test_408_and_431_are_documented_on_every_route(api):
    # Any request can get them, before a route is chosen (a head over 16 KiB on GET /v1/jobs,
    # headers or a body that do not arrive in time: the tests above); only the submit listed
    # 408, and no route 431, so a generated client met answers it did not know.
    paths = api.json("GET", "/openapi.json")[2]["paths"]
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
    for path, operations in paths.items():
        for method, operation in operations.items():
            for code in ("408", "431"):
                assert operation["responses"].get(code, {}).get("content") == error, \
                    (path, method, code)


def test_request_schema_needs_no_key_and_has_sdxls_bounds_before_any_dispatcher(api):
    status, _, declaration = api.json("GET", "/v1/request-schema")
    assert status == 200 and declaration["model_version"] is None
    assert declaration["limits"]["default_size"] == 1024
    # At SDXL's bounds it is the document's body to the letter: it was a second schema of
    # the body, which refused what the body takes (null, `stream: false`, a webhook). The
    # served document's, whose string patterns are this Python's Unicode version's, as the
    # declaration's are; the committed one is held to it above. But for what a server's
    # model or operator decides: the document gives every server's bounds and says the
    # defaults in words (test_the_document_is_true_of_a_server_unlike_sdxl).
    document = api.json("GET", "/openapi.json")[2]
    body = document["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"][
        "schema"]
    decided = ("num_inference_steps", "guidance_scale", "width", "height", "num_images",
               "scheduler")
    served = {name: declaration["request_schema"]["properties"].pop(name) for name in decided}
    documented = {name: body["properties"].pop(name) for name in decided}
    assert declaration["request_schema"] == body
    assert served["num_images"]["anyOf"][0]["maximum"] == 4
    assert documented["num_images"]["anyOf"][0]["maximum"] == 64
    assert served["num_inference_steps"]["default"] == 30
    assert [name for name in decided if "default" in documented[name]] == ["num_images"]
    assert "30 at SDXL's" in documented["num_inference_steps"]["description"]
    width = served["width"]
    assert (width["anyOf"][0]["minimum"], width["anyOf"][0]["maximum"]) == (512, 2048)
    assert width["x-rule"] == "a multiple of 8 from 512 to 2048"


def test_a_default_that_reads_any_limit_is_said_in_words(monkeypatch):
    # Which defaults were the server's was found by comparing them at SDXL's limits and at
    # a made-up server's (UNLIKE_SDXL): a default reading a limit that server left at
    # SDXL's value (max_request_cost, say) stayed in the document as every server's.
    # Now a default that reads any limit is the server's.
    from dataclasses import replace

    from sdxl_jobs import api as job_api
    from sdxl_serve import contract

    fields = tuple(replace(field, default=lambda m: int(m.max_request_cost) // 4)
                   if field.name == "num_images" else field for field in contract.FIELDS)
    monkeypatch.setattr(contract, "FIELDS", fields)
    monkeypatch.setattr(job_api, "FIELDS", fields)
    num_images = job_api.documented_submit_schema()["properties"]["num_images"]
    assert "default" not in num_images, num_images
    assert "Default: the server's, 1 at SDXL's" in num_images["description"], num_images


def publish_bounds(redis_url: str, version: str, limits: dict) -> None:
    """Publish a model's bounds as its dispatchers do when they start."""
    async def publish():
        store = JobStore.from_url(redis_url)
        try:
            await store.publish_model({"version": version, "limits": limits})
        finally:
            await store.close()
    run(publish())


def test_the_document_is_true_of_a_server_unlike_sdxl(tmp_path):
    # Its body was SDXL's at its defaults: num_images up to 4 where an operator may allow
    # 64, sizes from 512 to 2048 where a model of 512 px takes 256 to 1024, and defaults
    # (30 steps, guidance 5, 1024 px) that a client generated from it sends as given,
    # where the server's own would have run (8 steps, set by its operator) or been refused.
    import jsonschema
    from sdxl_jobs.processes import RedisServer

    redis = RedisServer(tmp_path / "redis")
    redis.start()
    api = None
    try:
        publish_bounds(redis.url, "1.0", {
            "default_size": 512, "min_size": 256, "max_size": 1024, "max_num_images": 64,
            "default_steps": 8, "default_guidance_scale": 0.0, "max_request_cost": 100.0,
            "default_scheduler": "euler_ancestral"})
        api = start_api(redis.url, tmp_path)
        own_key = make_key(redis.url, "unlike-sdxl")
        document = api.json("GET", "/openapi.json")[2]
        schema = document["paths"]["/v1/jobs"]["post"]["requestBody"]["content"][
            "application/json"]["schema"]
        served = api.json("GET", "/v1/request-schema")[2]["request_schema"]
        # Every bound the server keeps is within the document's, and no default differs.
        for name, words in served["properties"].items():
            rule = words.get("anyOf", [words])[0]
            documented = schema["properties"][name]
            said = documented.get("anyOf", [documented])[0]
            assert said.get("minimum", float("-inf")) <= rule.get("minimum", float("-inf")), \
                (name, said, rule)
            assert said.get("maximum", float("inf")) >= rule.get("maximum", float("inf")), \
                (name, said, rule)
            assert "default" not in documented or documented["default"] == words.get(
                "default"), (name, documented, words)
        validator = jsonschema.validators.validator_for(schema)(schema)
        for body in ({"prompt": "a fox", "num_images": 64, "width": 256, "height": 1024},
                     {"prompt": "a fox", "num_images": 1, "width": 1024, "height": 256}):
            assert validator.is_valid(body), body
            status, _, job = api.json("POST", "/v1/jobs", own_key, body)
            assert status == 202, job
        assert not validator.is_valid({"prompt": "a fox", "num_images": 65})  # no server's
        # A client that sends the document's defaults asks what the server's own would run.
        written_out = {name: words["default"] for name, words in schema["properties"].items()
                       if "default" in words}
        plain = api.json("POST", "/v1/jobs", own_key, {"prompt": "a fox", "seed": 1})[2]
        filled = api.json("POST", "/v1/jobs", own_key,
                          {**written_out, "prompt": "a fox", "seed": 1})[2]
        assert filled["request"] == plain["request"], (filled["request"], plain["request"])
        assert plain["request"]["num_inference_steps"] == 8
    finally:
        if api is not None:
            api.process.stop()
        redis.stop()


def test_bounds_published_by_a_newer_dispatcher_are_still_read(tmp_path):
    """In a rolling update a newer dispatcher may publish bounds with a field this API does
    not know: it validates with the ones it knows instead of answering every submit 500."""
    from sdxl_jobs.processes import RedisServer

    redis = RedisServer(tmp_path / "redis")
    redis.start()
    api = None
    try:
        publish_bounds(redis.url, "2.0", {"default_size": 64, "min_size": 64, "max_size": 128,
                                          "max_num_images": 2, "max_frames": 16})
        api = start_api(redis.url, tmp_path)
        own_key = make_key(redis.url, "skew")
        status, _, declaration = api.json("GET", "/v1/request-schema")
        assert status == 200 and declaration["model_version"] == "2.0"
        assert declaration["limits"]["max_size"] == 128
        assert "max_frames" not in declaration["limits"]
        assert api.json("POST", "/v1/jobs", own_key, {**GOOD, "width": 128})[0] == 202
        status, _, answer = api.json("POST", "/v1/jobs", own_key, {**GOOD, "width": 136})
        assert_error(status, answer, 400, "width")
    finally:
        if api is not None:
            api.process.stop()
        redis.stop()


def test_a_finished_jobs_images_are_only_its_owners(tmp_path):
    """The image route's owner check: the job of the test above never finishes, so its
    image call was a 404 ("no images") with or without one. Finished here, as a dispatcher
    finishes it, on a Redis of the test's own."""
    from sdxl_jobs.processes import RedisServer

    redis = RedisServer(tmp_path / "redis")
    redis.start()
    api = None
    try:
        api = start_api(redis.url, tmp_path)
        alice, bob = make_key(redis.url, "alice"), make_key(redis.url, "bob")
        status, _, job = api.json("POST", "/v1/jobs", alice, GOOD)
        assert status == 202, job
        finish_as_a_dispatcher(redis.url, {job["id"]: ("png", [b"\x89PNG alice's"])})
        status, headers, image = api.call("GET", f"/v1/jobs/{job['id']}/images/0", alice)
        assert status == 200 and image == b"\x89PNG alice's"
        assert headers["content-type"] == "image/png"
        for path in (f"/v1/jobs/{job['id']}", f"/v1/jobs/{job['id']}/images/0",
                     f"/v1/jobs/{job['id']}/images/0?max_side=64"):
            status, _, body = api.json("GET", path, bob)
            assert_error(status, body, 404)
            assert "alice" not in json.dumps(body)
    finally:
        if api is not None:
            api.process.stop()
        redis.stop()


def encoded(width: int, height: int, fmt: str, seed: int) -> bytes:
    """Noise of this size in this format, as the tiny model's images are (and as hard to
    compress as an image gets)."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt.upper())
    return buffer.getvalue()


# Finished jobs of every output format, as (format, sizes of its images).
FINISHED = {"wide": ("png", [(1024, 576), (1024, 576)]), "tall": ("jpeg", [(512, 1024)]),
            "small": ("webp", [(64, 64)]), "largest": ("png", [(2048, 2048)])}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """An API on a Redis of its own (no other job queued there) with alice's FINISHED jobs,
    their images real ones as TorchServe encodes them, sized as asked (the tiny model's 64
    px too: the bounds published as its dispatcher does): (api, alice's key, bob's key,
    {name: job id})."""
    from sdxl_jobs.processes import RedisServer

    redis = RedisServer(tmp_path_factory.mktemp("redis"))
    redis.start()
    api = None
    try:
        publish_bounds(redis.url, "1.0", {"default_size": 1024, "min_size": 64,
                                          "max_size": 2048})
        api = start_api(redis.url, tmp_path_factory.mktemp("api"))
        alice, bob = make_key(redis.url, "alice"), make_key(redis.url, "bob")
        ids, stored = {}, {}
        for name, (fmt, sizes) in FINISHED.items():
            (width, height), count = sizes[0], len(sizes)
            status, _, job = api.json("POST", "/v1/jobs", alice, {
                "prompt": name, "width": width, "height": height, "num_images": count,
                "output_format": fmt, "num_inference_steps": 2})
            assert status == 202, job
            ids[name] = job["id"]
            stored[job["id"]] = (fmt, [encoded(w, h, fmt, seed) for seed, (w, h)
                                       in enumerate(sizes)])
        finish_as_a_dispatcher(redis.url, stored)
        yield api, alice, bob, ids
    finally:
        if api is not None:
            api.process.stop()
        redis.stop()


@pytest.mark.parametrize("name, index, max_side, size", [
    ("wide", 0, 256, (256, 144)), ("wide", 1, 512, (512, 288)), ("wide", 0, 17, (17, 10)),
    ("tall", 0, 100, (50, 100)),
    ("small", 0, 16, (16, 16)), ("small", 0, 512, (64, 64)),  # never larger than the image
])
def test_a_preview_is_a_jpeg_within_max_side_keeping_the_aspect(finished, name, index,
                                                                 max_side, size):
    # The playground's thumbnails were the full images (1 to 2 MB each at 1024 px), scaled
    # by the browser; there was no smaller one to ask for.
    from PIL import Image

    api, alice, _, ids = finished
    path = f"/v1/jobs/{ids[name]}/images/{index}"
    status, headers, image = api.call("GET", path, alice)
    assert status == 200 and headers["content-type"] == f"image/{FINISHED[name][0]}"
    status, preview_headers, preview = api.call("GET", f"{path}?max_side={max_side}", alice)
    assert status == 200 and preview_headers["content-type"] == "image/jpeg"
    assert preview_headers["x-seed"] == headers["x-seed"] == str(3 + index)
    with Image.open(io.BytesIO(preview)) as opened:
        assert (opened.format, opened.size) == ("JPEG", size)
    if name != "small":  # 50 KB and more
        assert len(preview) < len(image) / 4, (len(preview), len(image))


@pytest.mark.parametrize("given, rule", [
    ("15", "from 16 to 512, got 15"), ("513", "from 16 to 512, got 513"),
    ("-1", "from 16 to 512, got -1"), ("abc", 'integer, got "abc"'),
    ("2.5", 'integer, got "2.5"'), ("", 'integer, got ""'),
    # A client's typos, each read as 16 (pydantic's lax parsing of a number).
    ("16.0", 'integer, got "16.0"'), ("1_6", 'integer, got "1_6"'),
    ("%2B16", 'integer, got "+16"'), ("+16", 'integer, got " 16"'),  # `+` is a space there
])
def test_a_bad_max_side_is_a_400_naming_it(finished, given, rule):
    api, alice, _, ids = finished
    status, _, body = api.json("GET", f"/v1/jobs/{ids['wide']}/images/0?max_side={given}",
                               alice)
    assert_error(status, body, 400, "max_side")
    assert body["message"].startswith("`max_side` ") and body["message"].endswith(rule), body


def test_images_and_previews_are_tagged_and_answer_304_to_their_own_tag(finished):
    # A client could keep no image: nothing told it an image would not change, nor let it
    # ask whether it had.
    api, alice, bob, ids = finished
    path = f"/v1/jobs/{ids['wide']}/images/0"
    tags = {}
    for asked in (path, f"{path}?max_side=64", f"{path}?max_side=128"):
        status, headers, _ = api.call("GET", asked, alice)
        assert status == 200 and headers["cache-control"] == "private, no-cache"
        tags[asked] = headers["etag"]
    full, small, larger = tags.values()
    assert not full.startswith("W/") and small.startswith("W/") and len(set(tags.values())) == 3
    for asked, tag in tags.items():
        for method in ("GET", "HEAD"):
            status, headers, body = api.call(method, asked, alice,
                                             headers={"If-None-Match": tag})
            assert (status, body, headers["etag"]) == (304, b"", tag), (method, asked)
            assert headers["cache-control"] == "private, no-cache" and headers["x-seed"] == "3"
    # A list, either strength (RFC 9110 compares tags weakly here), and `*` are answered 304;
    # another representation's tag is not.
    for sent in (f'"x", {small}', small.removeprefix("W/"), "*"):
        status, _, _ = api.call("GET", f"{path}?max_side=64", alice,
                                headers={"If-None-Match": sent})
        assert status == 304, sent
    for asked, sent in ((path, small), (f"{path}?max_side=64", full),
                        (f"{path}?max_side=64", larger),
                        (f"/v1/jobs/{ids['wide']}/images/1", full)):
        status, headers, body = api.call("GET", asked, alice, headers={"If-None-Match": sent})
        assert status == 200 and body and headers["etag"] != sent, (asked, sent)
    # The key is checked before the tag: another key gets a 404, not a 304 that says the
    # image is there.
    status, _, body = api.json("GET", path, bob, headers={"If-None-Match": full})
    assert_error(status, body, 404)


def test_head_of_a_preview_has_the_heads_of_its_get(finished):
    api, alice, _, ids = finished
    path = f"/v1/jobs/{ids['tall']}/images/0?max_side=200"
    status, headers, preview = api.call("GET", path, alice)
    assert status == 200
    status, head, empty = api.call("HEAD", path, alice)
    assert (status, empty) == (200, b"")
    assert {name: head[name] for name in ("content-type", "content-length", "etag", "x-seed",
                                          "cache-control")} == {
        "content-type": "image/jpeg", "content-length": str(len(preview)),
        "etag": headers["etag"], "x-seed": "3", "cache-control": "private, no-cache"}


def test_previews_being_made_do_not_hold_the_apis_other_requests(finished):
    """A preview of a 2048 px PNG takes 50 to 90 ms of CPU (decoding it, mostly): made on
    the event loop, six at once held every other request of the API meanwhile (the health
    check's median wait: 58 and 73 ms here, 261 ms for a photograph's PNG; about 1 ms on
    threads of their own)."""
    api, alice, _, ids = finished
    path = f"/v1/jobs/{ids['largest']}/images/0?max_side=128"

    def timed(path: str, key: str | None = None) -> float:
        started = time.monotonic()
        status, _, _ = api.call("GET", path, key)
        assert status == 200, path
        return time.monotonic() - started

    alone = min(timed(path, alice) for _ in range(3))
    made: list[float] = []
    previews = [threading.Thread(target=lambda: made.append(timed(path, alice)))
                for _ in range(6)]
    for thread in previews:
        thread.start()
    waits = []
    while any(thread.is_alive() for thread in previews):
        waits.append(timed("/v1/health?dispatchers=0"))
    for thread in previews:
        thread.join()
    assert len(made) == 6
    waits.sort()  # a few may meet a preview's last step on the loop: the median
    assert waits[len(waits) // 2] < alone / 2, (alone, waits)


def test_previews_past_the_queue_are_503_with_retry_after_and_the_rest_are_made(tmp_path):
    """Previews are made on two threads; nothing bounded how many waited for them, each
    holding its image's bytes (12 MB for a 2048 px PNG). A burst past PREVIEWS_WAITING is
    answered at once, a 503 with Retry-After as other overload is, and the place of each
    preview made is free again after it. The image here is slow to preview (8192 px: 0.2 s
    of CPU, where a 2048 px PNG takes 0.1) and small to send, so that a burst fills the
    queue before the threads drain it (slow_preview_png)."""
    from sdxl_jobs.api import PREVIEW_RETRY_AFTER_S, PREVIEW_THREADS, PREVIEWS_WAITING
    from sdxl_jobs.processes import RedisServer

    redis = RedisServer(tmp_path / "redis")
    redis.start()
    api = None
    try:
        api = start_api(redis.url, tmp_path)
        alice = make_key(redis.url, "alice")
        _, _, job = api.json("POST", "/v1/jobs", alice, {**GOOD, "output_format": "png"})
        finish_as_a_dispatcher(redis.url, {job["id"]: ("png", [slow_preview_png()])})
        path = f"/v1/jobs/{job['id']}/images/0?max_side=128"
        burst = PREVIEW_THREADS + PREVIEWS_WAITING + 24
        together = threading.Barrier(burst)
        answers = []

        def preview() -> None:
            together.wait()
            answers.append(api.call("GET", path, alice))

        callers = [threading.Thread(target=preview) for _ in range(burst)]
        for caller in callers:
            caller.start()
        for caller in callers:
            caller.join()
        made = [headers for status, headers, _ in answers if status == 200]
        refused = [(status, headers, json.loads(body)) for status, headers, body in answers
                   if status != 200]
        assert refused, "every preview of the burst was queued"
        assert len(made) >= PREVIEW_THREADS + PREVIEWS_WAITING, (len(made), len(refused))
        assert all(headers["content-type"] == "image/jpeg" for headers in made)
        for status, headers, body in refused:
            assert_error(status, body, 503, "max_side")
            assert body["type"] == "Unavailable"
            assert headers["retry-after"] == str(PREVIEW_RETRY_AFTER_S)
            assert "retry shortly, or fetch the image without `max_side`" in body["message"]
        # Every place was given back: a whole queue's worth is made again, none refused.
        again = []
        callers = [threading.Thread(target=lambda: again.append(api.call("GET", path, alice)[0]))
                   for _ in range(PREVIEW_THREADS + PREVIEWS_WAITING)]
        for caller in callers:
            caller.start()
        for caller in callers:
            caller.join()
        assert again == [200] * (PREVIEW_THREADS + PREVIEWS_WAITING), again
    finally:
        if api is not None:
            api.process.stop()
        redis.stop()


def test_the_document_states_max_side_and_the_image_routes_caching(finished):
    api = finished[0]
    route = api.json("GET", "/openapi.json")[2]["paths"]["/v1/jobs/{job_id}/images/{index}"]
    operation = route["get"]
    parameters = {p["name"]: p for p in operation["parameters"]}
    assert (parameters["max_side"]["in"], parameters["max_side"]["schema"]["minimum"],
            parameters["max_side"]["schema"]["maximum"]) == ("query", 16, 512)
    assert parameters["If-None-Match"]["in"] == "header"
    # It had SDXL's default count's last index (3) as a maximum, where a server allowed more
    # images (max_num_images up to 64) serves index 4 and beyond: a generated client
    # refused them. A job's own count bounds it (its 404).
    assert parameters["index"]["schema"]["minimum"] == 0
    assert "maximum" not in parameters["index"]["schema"], parameters["index"]
    assert {"ETag", "Cache-Control", "X-Seed"} <= set(operation["responses"]["200"]["headers"])
    assert "304" in operation["responses"]


def test_redis_down_is_503_with_retry_after_never_500(tmp_path, key):
    from sdxl_jobs.processes import RedisServer

    redis = RedisServer(tmp_path / "redis")
    redis.start()
    api = start_api(redis.url, tmp_path)
    try:
        own_key = make_key(redis.url, "outage")
        assert api.json("POST", "/v1/jobs", own_key, GOOD)[0] == 202
        redis.stop()
        for method, path, body in (("POST", "/v1/jobs", GOOD), ("GET", "/v1/jobs", None),
                                   ("GET", "/v1/jobs/" + "a" * 32, None)):
            status, headers, answer = api.json(method, path, own_key, body)
            assert_error(status, answer, 503)
            assert headers["retry-after"] == "5" and "Redis" in answer["message"]
        status, headers, answer = api.json("GET", "/v1/health?dispatchers=0")
        assert_error(status, answer, 503)
        assert headers["retry-after"] == "5" and "Redis" in answer["message"]
    finally:
        api.process.stop()
        redis.stop()


def test_an_api_whose_redis_does_not_answer_says_so_in_seconds_and_serves(tmp_path):
    """A peer that takes the connection and never answers (a Redis stopped or paused, a
    proxy with nothing behind it): the API's start PING waited for the socket timeout,
    30 s, before it said anything and served. Now one line says within START_PING_S that
    Redis does not answer, and the API serves, as after any start whose PING failed."""
    mute = socket.create_server(("127.0.0.1", 0))  # listens; never accepts or answers
    address = f"http://127.0.0.1:{free_port()}"
    api = api_process(f"redis://127.0.0.1:{mute.getsockname()[1]}/0", address,
                      tmp_path / "api.log")
    started = time.monotonic()
    api.start()
    try:
        # The start's imports take a few seconds on a busy machine: well under 30 s all told.
        wait_http(address + "/openapi.json", 20, api)
        assert time.monotonic() - started < 20
    finally:
        api.stop()
        mute.close()
    said = api.log_path.read_text()
    (line,) = [line for line in said.splitlines() if "cannot be used" in line]
    assert " ERROR " in line and line.endswith(
        "TimeoutError: Redis does not answer (no reply to a PING within 5 s); every call "
        "that needs it answers 503 until it can"), said


def test_health_and_metrics_of_a_redis_that_stopped_answering_are_503_within_the_probes(
        tmp_path):
    """A Redis that keeps its connections and stops answering (stopped here with SIGSTOP, as
    a paused container or a proxy with nothing behind it): /v1/health waited for the socket
    timeout, 30 s, where the readiness probe gives up after 5 s with no reason, and
    /metrics past Prometheus's 10 s. Each is now a 503 within PROBE_REDIS_S, and once Redis
    answers again so do they, with nothing left over from the calls given up on."""
    from sdxl_jobs.api import PROBE_REDIS_S
    from sdxl_jobs.processes import RedisServer

    redis_server = RedisServer(tmp_path / "redis")
    redis_server.start()
    api = None
    try:
        api = start_api(redis_server.url, tmp_path)
        assert api.json("GET", "/v1/health?dispatchers=0")[0] == 200
        redis_server.kill(signal.SIGSTOP)
        try:
            for path in ("/v1/health?dispatchers=0", "/v1/health", "/metrics"):
                started = time.monotonic()
                status, headers, answer = api.json("GET", path)
                took = time.monotonic() - started
                assert_error(status, answer, 503)
                assert PROBE_REDIS_S <= took < 5, (path, took)
                assert headers["retry-after"] == "5"
                if path.startswith("/v1/health"):
                    assert answer["message"] == ("Redis is unavailable to the API: it does not "
                                                 f"answer within {PROBE_REDIS_S:g} s"), answer
        finally:
            redis_server.kill(signal.SIGCONT)
        status, _, answer = api.json("GET", "/v1/health?dispatchers=0")
        assert status == 200 and answer["redis"] == "ok", answer
        assert metrics(api)["sdxl_jobs_dispatchers"][""] == 0
    finally:
        if api is not None:
            api.process.stop()
        redis_server.stop()
    said = api.process.log_path.read_text()
    assert ("job store unavailable on GET /metrics: TimeoutError: Redis does not answer (no "
            f"reply to the reads of /metrics within {PROBE_REDIS_S:g} s)") in said, said


def test_every_route_of_a_redis_that_stopped_answering_is_503_within_seconds(tmp_path):
    """A Redis that keeps its connections and stops answering (SIGSTOP): every route that
    needs it (submit, a job, the list, a cancel, an image, events) waited for the socket
    timeout, 30 s, before its 503, past what many clients and proxies wait. Each is now the
    same 503 within STORE_ANSWER_S, and an open event stream ends within its block and that,
    where waits longer than STORE_ANSWER_S that are no fault of Redis's go on: an event
    stream between events (its reads block 10 s) and a `Prefer: wait` submit."""
    from sdxl_jobs.api import STORE_ANSWER_S
    from sdxl_jobs.processes import RedisServer
    from sdxl_jobs.store import LONGEST_BLOCK_MS

    redis_server = RedisServer(tmp_path / "redis")
    redis_server.start()
    api = None
    try:
        api = start_api(redis_server.url, tmp_path, {"SDXL_JOBS_MAX_WAIT_S": "8"})
        own_key = make_key(redis_server.url, "paused")
        _, _, job = api.json("POST", "/v1/jobs", own_key, GOOD)  # queued: no dispatcher
        events = f"/v1/jobs/{job['id']}/events"
        # An open stream, read line by line as an EventSource does.
        stream = connection(api)
        stream.request("GET", events, headers={"Authorization": f"Bearer {own_key}"})
        lines = stream.getresponse()
        assert lines.status == 200
        started = time.monotonic()
        waited = {}
        waiter = threading.Thread(target=lambda: waited.update(zip(
            ("status", "headers", "job"), api.json("POST", "/v1/jobs", own_key, GOOD,
                                                   headers={"Prefer": "wait=7"}))))
        waiter.start()
        while lines.readline() != b": keep-alive\n":
            pass
        assert time.monotonic() - started > STORE_ANSWER_S + 2  # a read of 10 s, whole
        waiter.join()
        assert waited["status"] == 202, waited
        assert waited["headers"]["preference-applied"] == "wait=7"

        answers: dict[str, tuple[int, dict, dict, float]] = {}

        def timed(method: str, path: str, body=None) -> None:
            began = time.monotonic()
            status, headers, answer = api.json(method, path, own_key, body)
            answers[f"{method} {path}"] = status, headers, answer, time.monotonic() - began

        routes = [("POST", "/v1/jobs", GOOD), ("GET", f"/v1/jobs/{job['id']}", None),
                  ("GET", "/v1/jobs", None), ("DELETE", f"/v1/jobs/{job['id']}", None),
                  ("GET", f"/v1/jobs/{job['id']}/images/0", None), ("GET", events, None)]
        callers = [threading.Thread(target=timed, args=route) for route in routes]
        redis_server.kill(signal.SIGSTOP)
        paused = time.monotonic()
        try:
            for caller in callers:
                caller.start()
            for caller in callers:
                caller.join()
            # The stream's read under way when Redis stopped, given up on past its block.
            rest = lines.read()  # blank lines and keep-alives, if any, to its end
            stream_ended = time.monotonic() - paused
            stream.close()
        finally:
            redis_server.kill(signal.SIGCONT)
        # Its read began at the keep-alive, just before the pause: it ends after its block
        # and STORE_ANSWER_S, 15 s (15.0 measured on 2 loaded cores, within 20 % of a bound
        # of 17 s), where the old stream waited for the socket timeout, 30 s.
        assert stream_ended < LONGEST_BLOCK_MS / 1000 + STORE_ANSWER_S + 8, stream_ended
        assert_ended_unavailable(rest)  # it ended without a word
        assert len(answers) == len(routes), answers
        for route, (status, headers, answer, took) in answers.items():
            assert_error(status, answer, 503)
            assert STORE_ANSWER_S <= took < STORE_ANSWER_S + 3, (route, took)
            assert headers["retry-after"] == "5", route
            assert answer["message"] == ("the job store (Redis) is unavailable; retry "
                                         "shortly"), (route, answer)
        # Nothing left over from the reads given up on: Redis's next answers are its own.
        status, _, again = api.json("GET", f"/v1/jobs/{job['id']}", own_key)
        assert status == 200 and again["id"] == job["id"] and again["status"] == "queued"
    finally:
        if api is not None:
            api.process.stop()
        redis_server.stop()
    said = api.process.log_path.read_text()
    assert GOOD["prompt"] not in said
    assert ("job store unavailable on GET /v1/jobs: TimeoutError: Redis does not answer (no "
            f"reply to the key's lookup within {STORE_ANSWER_S:g} s)") in said, said
    assert f"ended: the job store failed (TimeoutError: Redis does not answer (no reply to " \
           f"a wait for the job's events within " in said, said


def test_an_unexpected_error_is_logged_with_the_request_id_its_answer_asks_to_quote(
        redis_server, api):
    """A 500 says "quote the request_id"; its traceback in the API's log named the method and
    path only, so the id a client quoted found nothing. A job record damaged in Redis (its
    request no longer JSON) is such an error, of a key of its own: listing its jobs fails."""
    key = make_key(redis_server.url, "damaged")
    status, _, job = api.json("POST", "/v1/jobs", key, GOOD)
    assert status == 202, job
    client = redis.Redis.from_url(redis_server.url)
    try:
        client.hset(f"sdxl:job:{job['id']}", "request", "{damaged")
    finally:
        client.close()
    status, headers, body = api.json("GET", f"/v1/jobs/{job['id']}", key)
    assert_error(status, body, 500)
    assert headers.get("x-request-id") == body["request_id"], headers
    assert "quote the request_id" in body["message"], body
    said = api.process.log_path.read_text()
    (line,) = [line for line in said.splitlines()
               if line.startswith("20") and "unexpected error on GET" in line]
    assert f"(request_id {body['request_id']})" in line, line
    assert GOOD["prompt"] not in said


@contextlib.contextmanager
def api_losing_answer(redis_server, tmp_path: Path, marker: bytes):
    """An API whose Redis connection carrying an answer that holds ``marker`` is dropped,
    once: Redis ran the command, and the API never hears so."""
    link = FaultyLink(redis_server.port, lose_answer_with=marker)
    api = start_api(redis_server.url.replace(f":{redis_server.port}/", f":{link.port}/"),
                    tmp_path)
    try:
        yield api, link
    finally:
        api.process.stop()
        link.close()


def store_line(api, redis_server, saying: str) -> str:
    """The one log line ``saying`` something, after checking that the log has neither the
    prompt nor Redis's password."""
    said = api.process.log_path.read_text()
    assert GOOD["prompt"] not in said and redis_server.password not in said, said
    (line,) = [line for line in said.splitlines() if saying in line]
    return line


def server_events(raw: bytes) -> list[tuple[str, dict]]:
    """(event name, data) of each event of a stream read to its end; comments and `retry:`
    alone are not events."""
    events = []
    for frame in raw.decode().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in frame.splitlines()
                      if ": " in line and not line.startswith(":"))
        if "data" in fields:
            events.append((fields.get("event", "message"), json.loads(fields["data"])))
    return events


def assert_ended_unavailable(raw: bytes) -> dict:
    """The stream's last event says that the job store failed, in the errors' shape (a 503's),
    with `retry:` as a 503's Retry-After; its data."""
    name, data = server_events(raw)[-1]
    assert name == "unavailable", raw
    assert_error(503, data, 503)
    assert data["type"] == "Unavailable" and "Last-Event-ID" in data["message"], data
    assert raw.endswith(b"retry: 5000\nevent: unavailable\ndata: " + json.dumps(data).encode()
                        + b"\n\n"), raw
    return data


def stream_at_its_first_event(api, key: str, job_id: str):
    """The job's event stream, read up to its first event (the job's status, at once): the
    connection, its response, and what was read."""
    stream = connection(api)
    stream.request("GET", f"/v1/jobs/{job_id}/events",
                   headers={"Authorization": f"Bearer {key}"})
    answer = stream.getresponse()
    assert answer.status == 200
    raw = b""
    while b"event: status" not in raw:
        raw += answer.readline()
    return stream, answer, raw


def test_an_event_stream_whose_store_fails_ends_and_logs_redis_reason(redis_server, api,
                                                                      tmp_path):
    """The job store fails under an open event stream: the stream ends with one last event
    saying so (it ended without a word), EventSource comes back with Last-Event-ID, and
    its log line gives Redis's reason, as the API's other lines about the store do (it
    said `ConnectionError` alone)."""
    key = make_key(redis_server.url, "stream-cut")
    status, _, job = api.json("POST", "/v1/jobs", key, GOOD)
    assert status == 202, job
    # The answer carrying the stream's first event (the job's `queued`) is lost.
    with api_losing_answer(redis_server, tmp_path, b'"status":"queued"') as (cut, link):
        status, _, raw = cut.call("GET", f"/v1/jobs/{job['id']}/events", key, timeout=30)
        assert link.dropped.is_set()
        assert status == 200 and b"event: status" not in raw, raw
        assert_ended_unavailable(raw)
        assert store_line(cut, redis_server, "event stream of job").endswith(
            "the job store failed (ConnectionError: Connection closed by server.)")


def test_an_event_stream_whose_read_of_the_job_fails_ends_with_an_event(redis_server, api,
                                                                         tmp_path):
    """The read of the job that follows its final event fails (here its answer is lost): the
    stream ends with its `unavailable` event, where the error escaped the stream (uvicorn's
    traceback in the log) and the stream ended without a word."""
    key = make_key(redis_server.url, "job-read-cut")
    status, _, job = api.json("POST", "/v1/jobs", key, GOOD)
    assert status == 202, job
    # Only the job's hash holds finished_at, and it does once the job ended: the stream's
    # read of the ended job is the first answer holding it.
    with api_losing_answer(redis_server, tmp_path, b"finished_at") as (cut, link):
        stream, answer, raw = stream_at_its_first_event(cut, key, job["id"])
        status, _, canceled = api.json("DELETE", f"/v1/jobs/{job['id']}", key)
        assert status == 200 and canceled["status"] == "canceled", canceled
        raw += answer.read()
        stream.close()
        assert link.dropped.is_set()
        assert [name for name, _ in server_events(raw)] == ["status", "unavailable"], raw
        assert_ended_unavailable(raw)
    # It was uvicorn's traceback: "Caught handled exception, but response already started."
    assert store_line(cut, redis_server, "event stream of job").endswith(
        "the job store failed (ConnectionError: Connection closed by server.)")
    assert "Traceback" not in cut.process.log_path.read_text()


def expire_now(redis_url: str, job_id: str) -> None:
    """Have the job and its events expire as they would at the end of their TTL."""
    store = redis.Redis.from_url(redis_url)
    try:
        for name in (f"sdxl:job:{job_id}", f"sdxl:events:{job_id}"):
            store.pexpire(name, 1)
    finally:
        store.close()


def test_an_event_stream_whose_job_expires_ends_with_an_error_in_the_errors_shape(
        api, redis_server, key):
    """A job expiring under its event stream: the `expired` event's data was `{"message":
    "the job expired"}` alone, where every other error (the `unavailable` event, a 404 of
    the job) is the errors' shape; now it is a 404's, its message kept for the clients that
    read it."""
    _, _, job = api.json("POST", "/v1/jobs", key, GOOD)
    stream, answer, raw = stream_at_its_first_event(api, key, job["id"])
    expire_now(redis_server.url, job["id"])
    raw += answer.read()  # at the stream's next look, within its keep-alive's 15 s
    stream.close()
    assert [name for name, _ in server_events(raw)] == ["status", "expired"], raw
    name, data = server_events(raw)[-1]
    assert_error(404, data, 404)
    assert data == {"code": 404, "type": "NotFound", "message": "the job expired",
                    "request_id": answer.getheader("x-request-id")}, data


def test_an_expired_jobs_404_quotes_no_ttl_it_cannot_know(own_api):
    """A job gone is a 404 that says it may have expired; it quoted the reading API's
    `result_ttl_s` (3600 s) as the time the job was kept, where the job ended under its
    dispatcher's (1 s here), which went with the job's record."""
    api, redis_server = own_api
    own_key = make_key(redis_server.url, "expired")
    _, _, job = api.json("POST", "/v1/jobs", own_key, GOOD)
    finish_as_a_dispatcher(redis_server.url, {job["id"]: ("png", [b"png"])}, ttl_s=1)

    def expired():
        answer = api.json("GET", f"/v1/jobs/{job['id']}", own_key)
        return answer if answer[0] == 404 else None

    status, _, body = wait_until(expired, 10, "the job's expiry")
    assert_error(status, body, 404)
    assert body["message"] == (f"no job {job['id']!r} for this key: it never existed, or it "
                               f"ended and its results expired"), body


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGTERM])
def test_an_event_stream_whose_redis_goes_away_ends_with_an_event(own_api, stop):
    """A real redis-server killed or stopped under an open event stream: the stream ends with
    its `unavailable` event in the errors' shape (it ended with no word of why)."""
    api, redis_server = own_api
    own_key = make_key(redis_server.url, "gone")
    _, _, job = api.json("POST", "/v1/jobs", own_key, GOOD)
    stream, answer, raw = stream_at_its_first_event(api, own_key, job["id"])
    redis_server.kill(stop)
    raw += answer.read()
    stream.close()
    assert [name for name, _ in server_events(raw)] == ["status", "unavailable"], raw
    assert_ended_unavailable(raw)
    assert GOOD["prompt"] not in api.process.log_path.read_text()


def test_waits_whose_clients_hang_up_as_redis_dies_leave_no_unretrieved_error(tmp_path):
    """`Prefer: wait` clients hanging up as a real redis-server is killed: a wait cancelled
    just as its read of the job's events failed ended with that error (Python 3.11's
    wait_for hands the read's error out in place of the cancel), and nothing took it, so
    asyncio logged "Task exception was never retrieved" at ERROR with a traceback. The
    hang-ups are spread over the moments the reads fail, in a few rounds: on the old code
    the line came in each run of this test."""
    from sdxl_jobs.processes import RedisServer

    redis_server = RedisServer(tmp_path / "redis")
    redis_server.start()
    waits = 32
    api = start_api(redis_server.url, tmp_path, {"SDXL_JOBS_MAX_WAIT_S": "30",
                                                 "SDXL_JOBS_MAX_STREAMS_PER_KEY": str(waits)})
    try:
        where = urlsplit(api.address)
        body = json.dumps(GOOD).encode()
        for _ in range(4):
            waiter = make_key(redis_server.url, "waiter")
            clients = []
            for _ in range(waits):
                raw = socket.create_connection((where.hostname, where.port), timeout=10)
                raw.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                            + waiter.encode() + b"\r\nContent-Type: application/json\r\n"
                            b"Prefer: wait=30\r\nContent-Length: " + str(len(body)).encode()
                            + b"\r\n\r\n" + body)
                clients.append(raw)
            wait_until(lambda: len(api.json("GET", "/v1/jobs?limit=100", waiter)[2]["jobs"]) == waits,
                       10, "the waited jobs to be queued")
            time.sleep(0.3)  # each wait is in its blocking read (no dispatcher runs)
            for hung_up, raw in enumerate(clients):  # one hang-up every 0.1 ms or so
                if hung_up == waits // 4:
                    redis_server.kill(signal.SIGKILL)
                raw.close()
                time.sleep(0.0001)
            time.sleep(0.5)
            redis_server.start()
        time.sleep(0.5)
        said = api.process.log_path.read_text()
        assert "never retrieved" not in said, said[-3000:]
        assert "Traceback" not in said and GOOD["prompt"] not in said, said[-3000:]
    finally:
        api.process.stop()
        redis_server.stop()


def test_a_submit_whose_answer_was_lost_says_the_job_may_exist(redis_server, tmp_path):
    """The submit's script ran in Redis and its answer was lost on the way back: the job
    exists, so the 503 must not say "retry" as if nothing had been accepted (a plain retry
    makes a second job) but how to retry safely. Its log line gives Redis's reason, as the
    other lines about the store do (it said `ConnectionError` alone), and neither the prompt
    nor the password."""
    key = make_key(redis_server.url, "lost-answer")
    with api_losing_answer(redis_server, tmp_path, b"$7\r\ncreated\r\n") as (api, link):
        headers = {"Idempotency-Key": "order-lost"}
        status, _, body = api.json("POST", "/v1/jobs", key, GOOD, headers=headers)
        assert link.dropped.is_set()
        assert_error(status, body, 503)
        assert "may have been accepted" in body["message"], body
        assert "same Idempotency-Key" in body["message"], body
        status, replayed, job = api.json("POST", "/v1/jobs", key, GOOD, headers=headers)
        assert status == 202 and replayed["idempotent-replayed"] == "true"
        assert [j["id"] for j in api.json("GET", "/v1/jobs", key)[2]["jobs"]] == [job["id"]]
        assert store_line(api, redis_server, "submit's outcome unknown").endswith(
            "submit's outcome unknown: ConnectionError: Connection closed by server.")


@pytest.mark.parametrize("option, address", [
    ("--address", "127.0.0.1:{port}"),  # no scheme: every interface's port 80 was taken
    ("--address", "http://127.0.0.1:99999"),  # a traceback
    ("--address", "http://127.0.0.1:{port}/jobs"),  # the path was dropped without a word
    ("SDXL_JOBS_ADDRESS", "0.0.0.0:{port}"),
])
def test_an_address_the_api_cannot_listen_on_as_written_ends_its_start(redis_server, option,
                                                                       address):
    address = address.format(port=free_port())
    env = {"SDXL_REDIS_URL": redis_server.url}
    if option == "--address":
        said = refused_start("sdxl_jobs.api", ["--address", address], env)
    else:
        said = refused_start("sdxl_jobs.api", [], {**env, option: address})
    assert said == (f"python -m sdxl_jobs.api: error: {option} must be http://HOST:PORT, the "
                    f"port from 1 to 65535, got {address!r}")


def test_the_printed_curl_lines_work_with_a_key_file_under_a_space(api, redis_server,
                                                                     tmp_path):
    """make serve-jobs prints its lines with the key file's whole path: a checkout under a
    folder with a space (`My Projects`) split it, and every call went out without a key.
    The key stays off every command line: it was in curl's arguments, where `ps` shows it
    to every user of the machine."""
    from pasted_lines import run_pasted
    from serve_jobs import curl_lines

    key_file = tmp_path / "My Projects" / "api-key"
    key_file.parent.mkdir()
    key = make_key(redis_server.url, "spaced")
    key_file.write_text(key + "\n")
    lines = [line.strip() for line in curl_lines(api.address, key_file).splitlines()
             if line.startswith("  ")]
    submit = next(line for line in lines if line.startswith("JOB=$("))
    show = next(line for line in lines if line.endswith("/v1/jobs/$JOB"))
    cancel = next(line for line in lines if "DELETE" in line)
    # (curl ends no answer with a newline: one is added between them)
    done, command_lines = run_pasted("\n".join([submit, show, "echo", cancel]), cwd=tmp_path,
                                     capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert command_lines.count("curl ") == 3 and key not in command_lines, command_lines
    job_id, shown, canceled = done.stdout.splitlines()
    assert json.loads(shown)["id"] == job_id and json.loads(canceled)["status"] == "canceled"
    client = next(line for line in lines if "--async" in line)
    assert f"--api-key-file '{key_file}'" in client


def test_the_printed_keys_line_makes_a_key_the_api_takes(api, redis_server, tmp_path):
    """make serve-jobs prints the line that makes another API key on its Redis, whose port
    changes with each start: a person had to piece that Redis's URL together from the
    `starting Redis on` line and the password file (docs/jobs.md showed none of it)."""
    from serve_jobs import keys_lines

    password_file = tmp_path / "My Projects" / "redis-password"
    password_file.parent.mkdir()
    password_file.write_text(redis_server.password + "\n")
    (line,) = [line.strip() for line in
               keys_lines(redis_server.port, password_file).splitlines()
               if line.startswith("  ")]
    assert redis_server.password not in line  # read from its file as the line runs
    env = {name: value for name, value in os.environ.items() if name != "SDXL_REDIS_URL"}
    done = subprocess.run(["bash", "-c", line], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    new_key = done.stdout.strip()  # the key, printed once
    status, _, body = api.call("GET", "/v1/jobs?limit=1", new_key)
    assert status == 200, body


class GenerateRun:
    """`generate.py --async` as a user runs it, against a real API; its standard error read
    line by line as it comes (a progress bar's \\r ends a line too)."""

    def __init__(self, api, redis_url: str, tmp_path: Path, *args: str):
        key_file = tmp_path / "api-key"
        key_file.write_text(make_key(redis_url, "generate"))
        self.output = tmp_path / "out.png"
        self.process = subprocess.Popen(
            [sys.executable, str(REPO / "scripts" / "generate.py"), "--async",
             "--api-key-file", str(key_file), "--jobs-url", api.address, "-o",
             str(self.output), *args, GOOD["prompt"]],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.process.stderr),
                                       daemon=True)
        self.reader.start()
        wait_until(lambda: self.lines or self.process.poll() is not None, 30,
                   "generate.py's submit", detail=self.said)
        self.job_id = self.lines[0].split()[1]  # "job <id> queued, position 1"

    def said(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str, timeout: float = 30) -> None:
        wait_until(lambda: text in self.said() or self.process.poll() is not None, timeout,
                   f"generate.py to say {text!r}", detail=self.said)
        assert text in self.said(), self.said()

    def end(self, timeout: float = 60) -> tuple[int, str, str]:
        """(exit status, standard output, standard error) once it ended."""
        try:
            out = self.process.stdout.read()
            self.process.wait(timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
        self.reader.join(10)
        return self.process.returncode, out, self.said()


def started_as_a_dispatcher(redis_url: str, job_id: str) -> str:
    """The job taken from the queue and started as a dispatcher starts it: its claim."""
    async def start() -> str:
        store = JobStore.from_url(redis_url)
        try:
            for _ in range(100):
                taken = {job: entry for entry, job in await store.next_jobs("d1", 10, 100)}
                if job_id in taken:
                    return (await store.start(job_id, taken[job_id], "d1", 3, 600))[1]
            raise AssertionError(f"job {job_id} was never queued")
        finally:
            await store.close()
    return run(start())


def run_to_its_end(redis_url: str, job_id: str, claim: str, steps: int, image: bytes) -> None:
    """Its denoising steps' progress, then its image stored, as a dispatcher relays them."""
    async def finish() -> None:
        store = JobStore.from_url(redis_url)
        try:
            for step in range(1, steps + 1):
                assert await store.progress(job_id, claim, step, steps) == "ok"
            assert await store.finish(job_id, claim, 600, "succeeded", {"format": "png"},
                                      seeds=[42], images=[image]) == "stored"
        finally:
            await store.close()
    run(finish())


def png_bytes() -> bytes:
    from PIL import Image

    image = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 40, 10)).save(image, "PNG")
    return image.getvalue()


@pytest.fixture
def own_api(tmp_path):
    """(API, redis-server) of one test: one whose Redis the test stops, or whose queue holds
    its job alone."""
    from sdxl_jobs.processes import RedisServer

    redis_server = RedisServer(tmp_path / "redis")
    redis_server.start()
    api = None
    try:
        api = start_api(redis_server.url, tmp_path)
        yield api, redis_server
    finally:
        if api is not None:
            api.process.stop()
        redis_server.stop()


@pytest.mark.parametrize("stream", [["--stream"], []])
def test_generate_py_async_shows_the_jobs_progress_then_writes_its_image(own_api, tmp_path,
                                                                          stream):
    """`generate.py --async`, with `--stream` or without (progress is always on the job's
    events): a progress bar from the job's steps, then the image and its seed."""
    api, redis_server = own_api
    client = GenerateRun(api, redis_server.url, tmp_path, "--steps", "3", "--seed", "42",
                         *stream)
    claim = started_as_a_dispatcher(redis_server.url, client.job_id)
    image = png_bytes()
    run_to_its_end(redis_server.url, client.job_id, claim, 3, image)
    status, out, err = client.end()
    assert status == 0, err
    assert [line.split("] ")[1].split()[:2] for line in err.splitlines()
            if "] step" in line][-3:] == [["step", "1/3"], ["step", "2/3"], ["step", "3/3"]], err
    assert client.output.read_bytes() == image
    assert out.startswith(f"{client.output}  seed=42"), out


def test_generate_py_says_why_its_stream_stopped_and_resumes_once_redis_is_back(own_api,
                                                                                  tmp_path):
    """Redis killed under `generate.py --async`'s stream: it says the API's reason once (it
    said `HTTP Error 503: Service Unavailable` every second), waits as the API asked, and
    writes the image once Redis is back (from its append-only file) and the job ends."""
    api, redis_server = own_api
    client = GenerateRun(api, redis_server.url, tmp_path, "--timeout", "120")
    claim = started_as_a_dispatcher(redis_server.url, client.job_id)
    client.wait_for("job ")  # its stream is open (the submit said so before)
    time.sleep(1)
    redis_server.kill(signal.SIGKILL)
    redis_server.process.wait(10)
    try:
        client.wait_for("(the job API: the job store (Redis) is unavailable, so this stream "
                        "ends")
        time.sleep(12)  # its next tries, refused (503) while Redis is away
    finally:
        redis_server.start()
    image = png_bytes()
    run_to_its_end(redis_server.url, client.job_id, claim, 2, image)
    status, _, err = client.end()
    assert status == 0, err
    assert client.output.read_bytes() == image
    said = [line for line in err.splitlines() if line.startswith("(")]
    assert said == [
        "(the job API: the job store (Redis) is unavailable, so this stream ends; the job is "
        "kept: reconnect with Last-Event-ID shortly; resuming)",
        "(the job API answered HTTP 503: the job store (Redis) is unavailable; retry "
        "shortly; resuming)"], err


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL], ids=["whole", "cut"])
def test_generate_py_follows_its_job_to_another_replica_as_its_api_stops(own_api, tmp_path,
                                                                         stop):
    """A rolling update under `generate.py --async`: a link in front (a load balancer) sends
    the next connection to another API replica on the same Redis, and the replica holding
    its stream is told to stop (SIGTERM: the stream ends whole) or killed (SIGKILL: the
    connection is cut). It resumes on the other with its Last-Event-ID and writes the
    image; a stream that ended whole is resumed without a word, a cut one is said once (it
    said nothing: iterating http.client's reply reads a cut chunked reply as a whole one)."""
    api, redis_server = own_api
    link = FaultyLink(urlsplit(api.address).port)
    (tmp_path / "other").mkdir()
    other = None
    watcher = redis.Redis.from_url(redis_server.url)
    try:
        client = GenerateRun(link, redis_server.url, tmp_path, "--steps", "3", "--timeout",
                             "120")
        claim = started_as_a_dispatcher(redis_server.url, client.job_id)
        wait_until(lambda: any(c["cmd"] == "xread" and "b" in c["flags"]
                               for c in watcher.client_list()), 30,
                   "the stream to wait in Redis for the job's next event", detail=client.said)
        other = start_api(redis_server.url, tmp_path / "other")
        link.target = urlsplit(other.address).port
        api.process.kill(stop)
        api.process.process.wait(10)
        image = png_bytes()
        run_to_its_end(redis_server.url, client.job_id, claim, 3, image)
        status, _, err = client.end()
    finally:
        watcher.close()
        link.close()
        if other is not None:
            other.process.stop()
    assert status == 0, err
    assert client.output.read_bytes() == image
    assert [line.split("] ")[1].split()[1] for line in err.splitlines()
            if "] step" in line][-3:] == ["1/3", "2/3", "3/3"], err
    said = [line for line in err.splitlines() if line.startswith("(")]
    assert said == ([] if stop == signal.SIGTERM else
                    ["(connection lost: the stream was cut before its end; resuming)"]), err


def test_generate_py_ends_at_once_when_its_job_expired(own_api, tmp_path):
    """The job expires while `generate.py --async` follows it: it ends at once saying so,
    where it asked again every second until its --timeout (404 each time) and then said
    the job did not end in time."""
    api, redis_server = own_api
    client = GenerateRun(api, redis_server.url, tmp_path, "--timeout", "60")
    started_as_a_dispatcher(redis_server.url, client.job_id)
    client.wait_for("job ")
    expired = time.monotonic()
    expire_now(redis_server.url, client.job_id)
    status, _, err = client.end()
    # The stream learns of it at its next look (a read blocks up to 10 s).
    assert time.monotonic() - expired < 30, err
    assert status == 1, err
    assert err.splitlines()[-1] == (f"error: job {client.job_id} expired before it was seen "
                                    f"to end"), err

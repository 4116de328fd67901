"""The job API process against a real Redis: a request's line and headers must arrive within
``SDXL_JOBS_HEADER_TIMEOUT_S`` (slowloris), and normal clients are not hurried by it."""

from __future__ import annotations

import http.client
import json
import socket
import time
from urllib.parse import urlsplit

import pytest

from jobstack import hold_until_closed, start_api

pytestmark = pytest.mark.jobs

HEADER_TIMEOUT_S = 1
# Well past the deadline, and short of uvicorn's keep-alive (5 s), which would close an
# idle connection on its own.
OUTWAIT_S = HEADER_TIMEOUT_S + 3
HEALTH = b"GET /v1/health?dispatchers=0 HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.fixture(scope="module")
def slow_head_api(redis_server, tmp_path_factory):
    """An API with a short header deadline, so a test can outwait it."""
    running = start_api(redis_server.url, tmp_path_factory.mktemp("slow-head-api"),
                        {"SDXL_JOBS_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S)})
    yield running
    running.process.stop()


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


@pytest.mark.parametrize("after_a_response", [False, True],
                         ids=["trickle", "trickle-on-a-kept-alive-connection"])
def test_headers_that_do_not_arrive_in_time_get_408_and_the_connection_closed(
        slow_head_api, after_a_response):
    # uvicorn sets no time limit on a request's head and its keep-alive timer stops at the
    # first byte: a client that trickled its headers, one byte a second, held the connection
    # for good (still open after 65 s).
    where = urlsplit(slow_head_api.address)
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


def test_a_connection_that_sends_nothing_is_closed_without_a_reply(slow_head_api):
    # It held the connection for good too (still open after 65 s). No 408 here: a pooled
    # client that sent its request just after would read it as that request's answer
    # (seen with http.client), where a plain close it notices before writing.
    where = urlsplit(slow_head_api.address)
    with socket.create_connection((where.hostname, where.port), timeout=OUTWAIT_S) as raw:
        answer, took = hold_until_closed(raw, trickle=False, seconds=OUTWAIT_S)
    assert answer == b"", answer
    assert HEADER_TIMEOUT_S - 0.3 <= took < HEADER_TIMEOUT_S + 2, took


def test_a_kept_alive_connection_idle_between_requests_is_not_hurried(slow_head_api):
    # Idle time between requests is keep-alive's (5 s), not the header deadline's; and a
    # head that comes in pieces, whole within the deadline, is served.
    where = urlsplit(slow_head_api.address)
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

"""The decoupled `sdxl_stream` model: one event per denoising step, then the image, over
Triton's generate_stream (server-sent events)."""

from __future__ import annotations

import base64
import json
import re
import socket
import subprocess
import sys
from http.client import HTTPConnection
from pathlib import Path

import pytest

from lifetimes import wait_until
from sdxl_serve.management import http
from sdxl_serve.triton_client import error_of
from test_triton_serving import metrics, series

pytestmark = pytest.mark.triton
REPO = Path(__file__).resolve().parents[2]


def stream_events(server, fields: dict) -> list[dict]:
    status, headers, body = http(
        "POST", f"{server.ports.http_url}/v2/models/sdxl_stream/generate_stream", None,
        json.dumps(fields).encode(), timeout=120)
    assert status == 200, (status, body[:300])
    assert headers.get("Content-Type", "").startswith("text/event-stream")
    return [json.loads(line[len("data: "):]) for line in body.decode().splitlines()
            if line.startswith("data: ")]


def test_steps_arrive_before_the_image(triton_stream):
    events = stream_events(triton_stream, {"prompt": "a red fox", "seed": 5,
                                           "num_inference_steps": 4})
    progress = [json.loads(event["info"]) for event in events[:-1]]
    assert [(p["step"], p["total"]) for p in progress] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert all("image_base64" not in event for event in events[:-1])
    last = events[-1]
    assert base64.b64decode(last["image_base64"]).startswith(b"\x89PNG\r\n\x1a\n")
    assert last["seed"] == 5 and json.loads(last["info"])["width"] == 64


def last_event_error(server, fields: dict) -> str:
    """The ``error`` of the last event generate_stream sends for ``fields``."""
    status, _, body = http(
        "POST", f"{server.ports.http_url}/v2/models/sdxl_stream/generate_stream", None,
        json.dumps(fields).encode(), timeout=60)
    events = [json.loads(line[len("data: "):]) for line in body.decode().splitlines()
              if line.startswith("data: ")]
    assert events and "error" in events[-1], (status, body[:300])
    return events[-1]["error"]


def test_a_bad_value_is_an_error_event_naming_the_rule(triton_stream):
    assert last_event_error(triton_stream, {"prompt": "x", "height": 1004}) == \
        "`height` must be a multiple of 8 from 32 to 128, got 1004"


def test_a_misspelled_field_is_refused_not_dropped(triton_stream):
    # generate_stream hands a key that is no input to the model as a request parameter: it
    # was ignored, and the image made at the default width.
    assert last_event_error(triton_stream, {"prompt": "x", "widht": 32,
                                            "num_inference_steps": 1}) == \
        "`widht` is not a known field (did you mean `width`?)"


def test_stream_false_is_refused_not_ignored(triton_stream):
    assert last_event_error(triton_stream, {"prompt": "x", "stream": False,
                                            "num_inference_steps": 1}) == \
        "`stream` false: this model streams; the `sdxl` model answers once"


def test_plain_infer_is_refused_on_the_streaming_model(triton_stream):
    status, _, body = http(
        "POST", f"{triton_stream.ports.http_url}/v2/models/sdxl_stream/infer", None,
        json.dumps({"inputs": [{"name": "prompt", "shape": [1, 1], "datatype": "BYTES",
                                "data": ["x"]}]}).encode(), timeout=60)
    assert status >= 400 and "decoupled" in error_of(body)


def test_the_command_line_client_shows_progress(triton_stream, tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "generate.py"), "--triton",
                           triton_stream.ports.http_url, "--stream", "a red fox", "--seed", "3",
                           "--steps", "3", "-o", str(tmp_path / "fox.png")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "step 3/3" in done.stderr and "seed=3" in done.stdout
    assert (tmp_path / "fox.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_the_command_line_client_refuses_what_triton_would_answer_500(triton_stream, tmp_path):
    # A negative seed does not fit the UINT64 input: Triton answers 500 with plain JSON
    # before the model runs, where TorchServe's path answers 400 naming the field.
    body = json.dumps({"prompt": "a red fox", "seed": -1}).encode()
    status, _, reply = http("POST", f"{triton_stream.ports.http_url}"
                            "/v2/models/sdxl_stream/generate_stream", None, body, timeout=60)
    assert status == 500 and re.search(r"Unable to parse 'data': .*unsigned", reply.decode())
    # So the client refuses it by name and sends nothing (exit 2, as for a bad option).
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "generate.py"), "--triton",
                           triton_stream.ports.http_url, "--stream", "a red fox", "--seed", "-1",
                           "-o", str(tmp_path / "fox.png")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip() == ("error: `seed` must be an integer from 0 to "
                                   "18446744073709551615 (Triton's UINT64), got -1"), done.stderr
    assert not (tmp_path / "fox.png").exists()


def answered(server, model: str = "sdxl_stream") -> dict[str, float]:
    """{outcome: requests} a model has answered, by our counter, and its images."""
    values = metrics(server)
    counts = {outcome: series(values, "sdxl_requests_total", model_name=model,
                              outcome=outcome)
              for outcome in ("ok", "bad_request", "oom", "error")}
    counts["images"] = series(values, "sdxl_images_generated_total", model_name=model)
    return counts


def answered_after(server, before: dict[str, float], more: int = 1,
                   model: str = "sdxl_stream") -> dict[str, float]:
    """``answered``, once the model has answered ``more`` requests since ``before``."""
    def settled() -> dict[str, float] | None:
        now = answered(server, model)
        done = sum(now[k] - before[k] for k in ("ok", "bad_request", "oom", "error"))
        return now if done >= more else None

    return wait_until(settled, 20, f"{more} more request(s) answered by {model}",
                      detail=lambda: (before, answered(server, model)))


def test_a_cancelled_stream_stops_its_generation(triton_stream):
    # A client that closes its generate_stream cancels the request (Triton's HTTP frontend);
    # the generation ran all its steps anyway, keeping the GPU and every request behind it.
    before = answered(triton_stream)
    connection = HTTPConnection(triton_stream.ports.host, triton_stream.ports.http,
                                timeout=120)
    try:
        # 100 steps: 20 s or more on a 2-core machine, were they all run.
        connection.request("POST", "/v2/models/sdxl_stream/generate_stream", json.dumps(
            {"prompt": "a red fox", "num_inference_steps": 100}),
            {"Content-Type": "application/json"})
        reply = connection.getresponse()
        assert reply.status == 200
        line = reply.fp.readline()
        while not line.startswith(b"data: "):
            line = reply.fp.readline()
        assert json.loads(json.loads(line[len(b"data: "):])["info"])["step"] == 1
        connection.sock.shutdown(socket.SHUT_RDWR)
    finally:
        connection.close()
    after = answered_after(triton_stream, before)
    # Stopped between steps (our 499, a 4xx: no image, no failure counted).
    assert after["ok"] == before["ok"] and after["images"] == before["images"], (before, after)
    assert after["bad_request"] == before["bad_request"] + 1, (before, after)
    # The model serves on.
    events = stream_events(triton_stream, {"prompt": "a red fox", "num_inference_steps": 1})
    assert "image_base64" in events[-1]


def test_a_value_of_another_json_type_is_refused_by_triton_with_500(triton_stream):
    # Triton parses each value into its input's datatype before any model code runs, and
    # answers a mismatch with 500 on generate_stream as on /infer (docs/triton.md).
    status, _, body = http(
        "POST", f"{triton_stream.ports.http_url}/v2/models/sdxl_stream/generate_stream",
        None, json.dumps({"prompt": "x", "num_inference_steps": "many"}).encode(),
        timeout=60)
    assert status == 500 and error_of(body).startswith("Unable to parse 'data'"), \
        (status, body[:300])


def open_stream(server, fields: dict) -> HTTPConnection:
    """A generate_stream request sent, its reply not read yet."""
    connection = HTTPConnection(server.ports.host, server.ports.http, timeout=120)
    connection.request("POST", "/v2/models/sdxl_stream/generate_stream", json.dumps(fields),
                       {"Content-Type": "application/json"})
    return connection


def next_event(reply) -> dict:
    """The next server-sent event of a reply (read raw: the chunk framing is skipped)."""
    line = reply.fp.readline()
    while not line.startswith(b"data: "):
        line = reply.fp.readline()
    return json.loads(line[len(b"data: "):])


def last(event: dict) -> bool:
    """Whether an event is a stream's last: the image or an error."""
    return "image_base64" in event or "error" in event


def calls_of_two(values: dict) -> float:
    """Pipeline calls of the stream model that served two requests."""
    return (series(values, "sdxl_batch_size_bucket", model_name="sdxl_stream", le="2.0")
            - series(values, "sdxl_batch_size_bucket", model_name="sdxl_stream", le="1.0"))


def test_one_cancelled_stream_leaves_its_batch_companion_served(triton_stream):
    # Two streams in one pipeline call, one client gone: the call goes on for the other.
    before = metrics(triton_stream)
    # The blocker holds the model until both others are queued, then its client goes.
    blocker = open_stream(triton_stream, {"prompt": "blocker", "num_inference_steps": 100})
    gone = stays = None
    try:
        # The others are sent once the blocker runs: sent with it, they reached Triton's
        # dynamic batcher inside its 5 ms delay about one time in four and joined the
        # blocker's `execute`: never queued together, and so never one call.
        blocker_reply = blocker.getresponse()
        assert not last(next_event(blocker_reply))
        gone = open_stream(triton_stream, {"prompt": "a red fox", "seed": 1,
                                           "num_inference_steps": 20})
        stays = open_stream(triton_stream, {"prompt": "a red fox", "seed": 2,
                                            "num_inference_steps": 20})
        # Both queued behind the blocker, so they reach `execute` (and one call) together.
        wait_until(lambda: series(metrics(triton_stream), "nv_inference_pending_request_count",
                                  model="sdxl_stream") == 2, 60, "two requests queued")
        blocker.sock.shutdown(socket.SHUT_RDWR)
        blocker.close()
        gone_reply = gone.getresponse()
        assert json.loads(next_event(gone_reply)["info"])["step"] == 1
        gone.sock.shutdown(socket.SHUT_RDWR)
        gone.close()
        stays_reply = stays.getresponse()
        events = [next_event(stays_reply)]
        while not last(events[-1]):
            events.append(next_event(stays_reply))
    finally:
        for connection in (blocker, gone, stays):
            if connection is not None:
                connection.close()
    assert [json.loads(event["info"])["step"] for event in events[:-1]] == list(range(1, 21))
    assert base64.b64decode(events[-1]["image_base64"]).startswith(b"\x89PNG\r\n\x1a\n")
    assert events[-1]["seed"] == 2
    # They were one pipeline call of two (so the call was not stopped for the one gone).
    after = metrics(triton_stream)
    assert calls_of_two(after) == calls_of_two(before) + 1

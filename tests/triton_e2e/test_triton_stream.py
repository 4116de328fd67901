"""The decoupled `sdxl_stream` model: one event per denoising step, then the image, over
Triton's generate_stream (server-sent events)."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sdxl_serve.management import http
from sdxl_serve.triton_client import error_of

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


def test_a_bad_value_is_an_error_event_naming_the_rule(triton_stream):
    status, _, body = http(
        "POST", f"{triton_stream.ports.http_url}/v2/models/sdxl_stream/generate_stream",
        None, json.dumps({"prompt": "x", "height": 1004}).encode(), timeout=60)
    events = [json.loads(line[len("data: "):]) for line in body.decode().splitlines()
              if line.startswith("data: ")]
    assert events and events[-1]["error"] == \
        "`height` must be a multiple of 8 from 32 to 128, got 1004", (status, body)


def test_a_misspelled_field_is_refused_not_dropped(triton_stream):
    # generate_stream hands a key that is no input to the model as a request parameter: it
    # was ignored, and the image made at the default width.
    status, _, body = http(
        "POST", f"{triton_stream.ports.http_url}/v2/models/sdxl_stream/generate_stream",
        None, json.dumps({"prompt": "x", "widht": 32, "num_inference_steps": 1}).encode(),
        timeout=60)
    events = [json.loads(line[len("data: "):]) for line in body.decode().splitlines()
              if line.startswith("data: ")]
    assert events and events[-1]["error"] == \
        "`widht` is not a known field (did you mean `width`?)", (status, body[:300])


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


def test_the_command_line_client_says_a_refusal_before_the_model_ran(triton_stream, tmp_path):
    # A negative seed does not fit the UINT64 input: Triton refuses with plain JSON before
    # the model runs, not with an error event, and the client says Triton's own words.
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "generate.py"), "--triton",
                           triton_stream.ports.http_url, "--stream", "a red fox", "--seed", "-1",
                           "-o", str(tmp_path / "fox.png")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    # Triton's own words (it answers HTTP 500 here), not an empty `{}`.
    assert re.fullmatch(r"error: HTTP [45]\d\d: Unable to parse 'data': [^\n]*unsigned[^\n]*",
                        done.stderr.strip()), done.stderr
    assert not (tmp_path / "fox.png").exists()

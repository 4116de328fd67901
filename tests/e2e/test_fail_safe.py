"""Failing safely through a real TorchServe: a request over the cost limit gets a 400 JSON
error naming the fields that drive the cost, and an engine process killed with SIGKILL in
the middle of a request still answers it with 200 and the same image."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import start_server  # tests/conftest.py, imported before any other

from lifetimes import cpu_seconds, wait_until
from sdxl_serve.cancellation import process_running
from sdxl_serve.contract import COST_FIELDS
from sdxl_serve.management import http
from sdxl_serve.server import text_since

pytestmark = pytest.mark.e2e


def predict(server, body: dict, timeout: float = 300):
    return http("POST", f"{server.addresses.inference}/predictions/sdxl",
                server.keys()["inference"], json.dumps(body).encode(), timeout=timeout)


def torchserve_worker_pid(server) -> int:
    status, _, body = http("GET", f"{server.addresses.management}/models/sdxl",
                           server.keys()["management"], timeout=60)
    assert status == 200
    [worker] = json.loads(body)[0]["workers"]
    return worker["pid"]


def test_a_request_over_the_cost_limit_gets_400_naming_the_fields(server):
    worker = torchserve_worker_pid(server)
    # The attack, on the tiny model: 4 images of twice its side at 100 steps.
    status, headers, body = predict(server, {"prompt": "x", "num_images": 4, "width": 128,
                                             "height": 128, "num_inference_steps": 100})
    assert status == 400, body
    content_type = {k.lower(): v for k, v in headers.items()}["content-type"]
    assert content_type.startswith("application/json")
    error = json.loads(body)
    assert error["code"] == 400 and error["type"] == "CostLimitExceeded"
    assert error["field"] == "num_images" and error["fields"] == list(COST_FIELDS)
    assert (error["cost"], error["limit"]) == (53.33, 4.0)
    for name in COST_FIELDS:
        assert f"`{name}`" in error["message"], name
    assert "`num_inference_steps` at most 7" in error["message"]
    # The same request within the limit is served, by the same TorchServe worker.
    status, _, body = predict(server, {"prompt": "x", "num_images": 4, "width": 128,
                                       "height": 128, "num_inference_steps": 7})
    assert status == 200, body
    assert torchserve_worker_pid(server) == worker


def test_an_engine_killed_mid_request_still_answers_200_with_the_same_image(server):
    worker = torchserve_worker_pid(server)
    status, headers, _ = predict(server, {"prompt": "warm", "num_inference_steps": 1})
    assert status == 200
    engine = int(headers["X-Worker-Pid"])
    # A request of several seconds on a CPU (128x128, 20 steps: cost 2.7 of 4).
    slow = {"prompt": "a lighthouse at dawn", "seed": 42, "width": 128, "height": 128,
            "num_inference_steps": 20}
    before = cpu_seconds(engine)
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(predict, server, slow)
        # The engine process is generating once it has spent a second of CPU on it.
        deadline = time.monotonic() + 120
        while cpu_seconds(engine) - before < 1.0:
            assert time.monotonic() < deadline and not answer.done(), "it never got busy"
            time.sleep(0.05)
        assert not answer.done()
        os.kill(engine, signal.SIGKILL)
        status, headers, body = answer.result()
    assert status == 200, body
    assert int(headers["X-Worker-Pid"]) != engine and not process_running(engine)
    # The same image as the same request served without a crash.
    status, _, again = predict(server, slow)
    assert status == 200
    assert json.loads(body)["image"] == json.loads(again)["image"]
    # TorchServe saw nothing: same worker, no death in its log.
    assert torchserve_worker_pid(server) == worker
    log = (server.run_dir / "logs" / "ts_log.log").read_text(errors="replace")
    assert "Worker died" not in log
    # The worker logged the death before it replied, but TorchServe copies the worker's
    # output into model_log.log from a thread of its own: the line may trail the reply.
    model_log = server.run_dir / "logs" / "model_log.log"
    wait_until(lambda: f"engine process {engine} died" in model_log.read_text(errors="replace"),
               10, "the engine's death in model_log.log")


POISON = "a prompt that crashes the engine"


@pytest.fixture(scope="module")
def crash_server(tmp_path_factory, model_store):
    """A server whose engine processes SIGKILL themselves mid-generation for one prompt."""
    running = start_server(tmp_path_factory.mktemp("crash_run"), model_store,
                           {"sdxl": "sdxl-1.0.mar"},
                           env={"SDXL_FAULT_CRASH_PROMPT": POISON, "SDXL_WARMUP_STEPS": "1"})
    yield running
    running.stop()


def test_a_poison_request_fails_alone_and_the_worker_lives_on(crash_server):
    worker = torchserve_worker_pid(crash_server)
    # The companions differ in steps, so neither ever shares a pipeline call with the
    # other: each makes the image its seed makes alone, however TorchServe batches them.
    bodies = [{"prompt": "companion", "seed": 1, "num_inference_steps": 2},
              {"prompt": POISON, "seed": 2, "num_inference_steps": 2},
              {"prompt": "companion", "seed": 3, "num_inference_steps": 3}]
    # Sent at once: in one TorchServe batch or not, only the poison request fails.
    with ThreadPoolExecutor(len(bodies)) as pool:
        results = list(pool.map(lambda b: predict(crash_server, b), bodies))
    assert [status for status, _, _ in results] == [200, 500, 200], results
    error = json.loads(results[1][2])
    assert error["type"] == "EngineCrashed" and "not run again" in error["message"]
    assert POISON not in results[1][2].decode()
    # The companions' images are those their seeds make alone.
    for sent, (_, _, body) in ((bodies[0], results[0]), (bodies[2], results[2])):
        _, _, alone = predict(crash_server, sent)
        assert json.loads(body)["image"] == json.loads(alone)["image"]
    assert torchserve_worker_pid(crash_server) == worker
    log = (crash_server.run_dir / "logs" / "ts_log.log").read_text(errors="replace")
    assert "Worker died" not in log


MODEL_LOG_LINE = re.compile(r"\S+ \[(?P<level>\w+) *\] W-\d+-sdxl_1\.0-(?P<stream>stdout|stderr) "
                            r"MODEL_LOG - (?P<message>.*)")


def test_warnings_and_errors_reach_model_log_at_warn_and_info_lines_at_info(crash_server):
    # TorchServe writes a worker's stdout at INFO and its stderr at WARN: our warnings and
    # errors were INFO lines, unseen by a log pipeline that alerts on WARN.
    model_log = crash_server.run_dir / "logs" / "model_log.log"
    start = model_log.stat().st_size
    status, _, body = predict(crash_server, {"prompt": POISON, "num_inference_steps": 2})
    assert status == 500 and json.loads(body)["type"] == "EngineCrashed", body

    def levels(text: str, count: int) -> list[tuple[str, str]]:
        """(level, stream) of each new line holding ``text``, once ``count`` of them came
        (the frontend copies the worker's output from threads of its own: they may trail
        the reply)."""
        def arrived():
            found = [MODEL_LOG_LINE.fullmatch(line) for line in
                     text_since(model_log, start).splitlines() if text in line]
            return found if len(found) >= count else None
        found = wait_until(arrived, 10, f"{count} line(s) with {text!r} in model_log.log")
        assert all(found), found
        return [(line["level"], line["stream"]) for line in found]

    # The engine process's warning each time it crashed (twice: the rerun crashes too) and
    # the worker's error for each death, at WARN only: not also at INFO. (Sets: a line of
    # the module's earlier crashes may still arrive, at WARN too.)
    assert set(levels("WARNING sdxl_serve.engine: injected crash", 2)) == {("WARN", "stderr")}
    assert set(levels("under 1 request(s) (", 1)) == {("WARN", "stderr")}
    assert set(levels("under the same 1 request(s) again (", 1)) == {("WARN", "stderr")}
    # INFO lines of both stay INFO: the worker's fresh engine, the engine's load.
    assert set(levels(" ready in ", 1)) == {("INFO", "stdout")}
    assert set(levels("INFO sdxl_serve.engine: loaded model", 1)) == {("INFO", "stdout")}
    assert POISON not in text_since(model_log, start)
    # Two fresh engines loaded the model meanwhile, and every WARN line is one of ours:
    # the load's library warnings and loading bars (a `torch_dtype` FutureWarning,
    # "`accelerate` was not found", transformers' bars) were a dozen WARN lines each time.
    ours = ("[engine ", "engine process ", "replaced engine process ", "request ",
            "a request failed")
    warned = [line for line in text_since(model_log, start).splitlines()
              if " [WARN ] " in line and "MODEL_LOG - " in line]
    assert [line for line in warned if not line.split("MODEL_LOG - ", 1)[1].startswith(ours)] \
        == [], warned

"""End to end against a real tritonserver serving triton-models/sdxl: generation, batching,
hostile inputs, metrics, and the same bytes as TorchServe for the same seed."""

from __future__ import annotations

import base64
import gzip
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import sdxl_serve
from lifetimes import live_cpu_seconds, started_and_ready, wait_until
from sdxl_serve.contract import RequestError, parse_request
from sdxl_serve.management import http
from sdxl_serve.triton_client import DATATYPES, error_of, infer_request, parse_reply
from sdxl_serve.triton_server import TritonPorts, TritonServerProcess, command_line

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
from test_hostile_input import HOSTILE, answers  # noqa: E402 - the TorchServe path's, reused

pytestmark = pytest.mark.triton
REPO = Path(__file__).resolve().parents[2]
FAST = {"num_inference_steps": 3}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def infer(server, fields: dict, timeout: float = 120):
    body, headers = infer_request(fields)
    return http("POST", f"{server.ports.http_url}/v2/models/sdxl/infer", None, body,
                headers=headers, timeout=timeout)


def generate(server, fields: dict):
    status, headers, body = infer(server, fields)
    assert status == 200, (status, body[:300])
    return parse_reply(headers, body)


SAMPLE = re.compile(r'^(?P<name>[a-zA-Z_:][\w:]*)(?:\{(?P<labels>.*)\})? (?P<value>\S+)$')
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def metrics(server) -> dict[tuple, float]:
    """{(series name, sorted labels): value} from Triton's /metrics, names as written
    (prometheus_client's parser would append _total to our counter-typed histogram parts)."""
    status, _, body = http("GET", server.ports.metrics_url)
    assert status == 200
    values = {}
    for line in body.decode().splitlines():
        found = SAMPLE.match(line)
        if found and not line.startswith("#"):
            labels = tuple(sorted(LABEL.findall(found.group("labels") or "")))
            values[(found.group("name"), labels)] = float(found.group("value"))
    return values


def series(values: dict, name: str, **labels: str) -> float:
    """The sum of ``name``'s series that carry ``labels``."""
    return sum(value for (series_name, series_labels), value in values.items()
               if series_name == name and set(labels.items()) <= set(series_labels))


def reached_model(server) -> float:
    """Requests the model has answered, by Triton's count (successes and failures)."""
    values = metrics(server)
    return sum(series(values, name, model="sdxl")
               for name in ("nv_inference_request_success", "nv_inference_request_failure"))


def group_cpu_seconds(server) -> float:
    """CPU time of the server's processes (tritonserver, stub, engine) that are alive."""
    return live_cpu_seconds(server.group_pids())


def stub_pid(server) -> int:
    [pid] = [pid for pid in server.group_pids()
             if "triton_python_backend_stub" in command_line(pid)]
    return pid


def test_a_generation(triton):
    reply = generate(triton, {"prompt": "a red fox", "seed": 7, **FAST})
    assert len(reply.images) == 1 and reply.images[0].startswith(PNG_MAGIC)
    assert reply.seeds == [7]
    assert (reply.info["format"], reply.info["width"], reply.info["height"]) == ("png", 64, 64)
    assert reply.info["model_version"] == "1.0" and reply.info["timings_s"]["denoise"] > 0


def test_every_field_as_its_own_tensor(triton):
    reply = generate(triton, {"prompt": "a red fox", "negative_prompt": "blur",
                              "num_inference_steps": 2, "guidance_scale": 1.0, "width": 32,
                              "height": 48, "seed": 2**64 - 1, "num_images": 2,
                              "scheduler": "ddim", "output_format": "jpeg"})
    assert [image[:2] for image in reply.images] == [b"\xff\xd8"] * 2
    assert reply.seeds == [2**64 - 1, 0]  # image i uses seed + i, wrapping
    assert (reply.info["width"], reply.info["height"]) == (32, 48)
    # A seed drawn by the server is returned, and gives the same image again.
    first = generate(triton, {"prompt": "a red fox", **FAST})
    again = generate(triton, {"prompt": "a red fox", "seed": first.seeds[0], **FAST})
    assert again.images == first.images


def behind_a_blocker(triton, send, requests: list) -> list:
    """``send`` each of ``requests`` at once while a longer request occupies the model
    instance, so they wait in Triton's queue and reach `execute` together, whatever the
    threads' timing; their replies."""
    idle = group_cpu_seconds(triton)
    blocker = threading.Thread(target=generate, args=(triton, {
        "prompt": "blocker", "num_inference_steps": 40}))
    blocker.start()
    # A third of a CPU second more than idle: the blocker is being generated (seen as
    # `execute` under way), not only sent.
    wait_until(lambda: group_cpu_seconds(triton) >= idle + 0.3, 60,
               "the blocker to be under way in the model")
    with ThreadPoolExecutor(len(requests)) as pool:
        replies = list(pool.map(send, requests))
    blocker.join()
    return replies


def test_concurrent_requests_are_served_as_one_pipeline_call(triton):
    before = metrics(triton)
    bodies = [{"prompt": f"fox {i}", "seed": i, **FAST} for i in range(4)]
    replies = behind_a_blocker(triton, lambda fields: generate(triton, fields), bodies)
    assert [reply.seeds for reply in replies] == [[0], [1], [2], [3]]
    after = metrics(triton)
    delta = {name: series(after, name, model_name="sdxl") - series(before, name,
                                                                     model_name="sdxl")
             for name in ("sdxl_batch_size_count", "sdxl_batch_size_sum")}
    calls_of_four = (series(after, "sdxl_batch_size_bucket", le="4.0")
                     - series(after, "sdxl_batch_size_bucket", le="3.0")) - \
                    (series(before, "sdxl_batch_size_bucket", le="4.0")
                     - series(before, "sdxl_batch_size_bucket", le="3.0"))
    # Two pipeline calls for five requests: the blocker alone, then the four as one call.
    assert delta == {"sdxl_batch_size_count": 2, "sdxl_batch_size_sum": 5}, delta
    assert calls_of_four == 1

    def executions() -> float:
        return (series(metrics(triton), "nv_inference_exec_count", model="sdxl")
                - series(before, "nv_inference_exec_count", model="sdxl"))

    # Triton's own count of `execute` calls agrees. It counts one once `execute` has
    # returned, after its replies went out: read at once, it was 1 now and then.
    wait_until(lambda: executions() >= 2, 10, "Triton to count both executions",
               detail=executions)
    assert executions() == 2


def test_a_full_queue_refuses_at_once_as_torchserve_does(triton):
    # Past 16 queued requests (config.pbtxt, as TorchServe's job_queue_size) a request is a
    # 503 at once. The queue was unbounded: all 24 were queued, each waiting its turn.
    bodies = [{"prompt": f"fox {i}", "seed": i, **FAST} for i in range(24)]
    replies = behind_a_blocker(triton, lambda fields: infer(triton, fields), bodies)
    statuses = [status for status, _, _ in replies]
    assert set(statuses) == {200, 503} and statuses.count(200) >= 16, statuses
    assert {error_of(body) for status, _, body in replies if status == 503} == {
        "[request id: <id_unknown>] Exceeds maximum queue size"}
    assert generate(triton, {"prompt": "after", **FAST}).images  # it serves on


VALID_IN_TENSOR_FORM = {"valid": True}


class _Pairs(list):
    """A JSON object's members in order, duplicates kept."""


def _plain(value):
    if isinstance(value, _Pairs):
        return {key: _plain(item) for key, item in value}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


def triton_form(raw: bytes) -> tuple[bytes, bool, dict | None]:
    """A TorchServe request body as a Triton client would send it: a JSON object becomes
    one input tensor per member, of the type config.pbtxt declares (BYTES for an unknown
    name), its value as sent; anything else is sent as it is, as the /infer body.

    Returns (the /infer body, whether it is Triton's tensor form, the members as a dict
    when Triton's types let every value through unchanged, so that the answer must be the
    contract's own message, else None)."""
    try:
        # Strict UTF-8 text: a BOM or UTF-16 is the body's problem, sent as it is.
        body = json.loads(raw.decode("utf-8"), object_pairs_hook=_Pairs)
    except (ValueError, RecursionError):
        return raw, False, None
    if not isinstance(body, _Pairs):
        return raw, False, None
    if any(isinstance(value, list) and len(value) == 1 and not isinstance(value[0], list)
           for _, value in body):
        # [64] is a one-element tensor in Triton's form: a valid request there, not hostile.
        return raw, True, VALID_IN_TENSOR_FORM
    inputs = [{"name": name, "shape": [1, 1], "datatype": DATATYPES.get(name, "BYTES"),
               "data": [_plain(value)]} for name, value in body]
    request = json.dumps({"inputs": inputs}).encode()
    names = [name for name, _ in body]
    # Triton itself refuses a request without inputs, and an input given twice.
    passes = bool(names) and len(set(names)) == len(names) and all(
        name in DATATYPES and _passes_type(DATATYPES[name], value) for name, value in body)
    return request, True, dict(body) if passes else None


def _passes_type(datatype: str, value) -> bool:
    if datatype == "BYTES":
        if not isinstance(value, str):
            return False
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate: Triton cannot pass it on unchanged
            return False
        return True
    if isinstance(value, bool):
        return False
    if datatype == "FP64":
        # Infinity too: Triton passes it on; an integer beyond every double it refuses itself.
        return isinstance(value, float) or (isinstance(value, int)
                                            and abs(value) <= sys.float_info.max)
    low, high = (0, 2**64 - 1) if datatype == "UINT64" else (-2**63, 2**63 - 1)
    return isinstance(value, int) and low <= value <= high


def test_every_hostile_body_gets_an_error_naming_the_rule_and_the_stub_survives(
        triton, engine):
    stub = stub_pid(triton)
    url = f"{triton.ports.http_url}/v2/models/sdxl/infer"
    contract_messages, frontend_errors = 0, []
    reached = reached_model(triton)
    for raw in HOSTILE:
        request, _, fields = triton_form(raw)
        if fields is VALID_IN_TENSOR_FORM:
            continue  # it would generate an image (slow on a CPU), not test a refusal
        status, _, body = http("POST", url, None, request, timeout=60)
        message = error_of(body)
        assert 400 <= status < 600 and message, (raw[:80], status, body[:300])
        # Exactly the bodies whose every value Triton let through reach the model. Triton
        # counts a request after its reply is sent, so the count is awaited, not read once;
        # a refused body counted late would show as one too many at the next wait.
        reached += fields is not None
        wait_until(lambda: reached_model(triton) == reached, 10,
                   f"Triton's count of requests that reached the model to be {reached}",
                   detail=lambda: (raw[:80], status, message, reached_model(triton)))
        if status >= 500:
            # Triton's HTTP frontend answers some bodies itself with 500: JSON it cannot
            # parse (" ", "{"), a value of another JSON type than the tensor's datatype
            # ("width": "64"). None of them reaches the model (docs/triton.md).
            assert fields is None, (raw[:80], message)
            frontend_errors.append(raw)
        if fields is not None:
            # Triton let every value through: the answer is the contract's, word for word.
            with pytest.raises(RequestError) as refused:
                parse_request(fields, engine.limits)
            assert (status, message) == (400, str(refused.value)), raw[:80]
            contract_messages += 1
    assert contract_messages >= 8  # enough of the list reached our code to mean something
    assert stub_pid(triton) == stub  # the same stub process served them all
    assert generate(triton, {"prompt": "still serving", **FAST}).images
    wait_until(lambda: reached_model(triton) == reached + 1, 10,
               "Triton's count to take the last request, and only it")


def test_an_id_that_is_no_utf8_fails_no_request_of_its_batch(triton):
    # Triton passes the body's `id` on as sent; reading it raised out of `execute`: each
    # request of the batch was a 500 quoting a traceback (UnicodeDecodeError).
    def send(request_id: bytes):
        body, headers = infer_request({"prompt": "a red fox", **FAST})
        body = body.replace(b"{", b'{"id": "' + request_id + b'", ', 1)
        return http("POST", f"{triton.ports.http_url}/v2/models/sdxl/infer", None, body,
                    headers=headers, timeout=120)

    replies = behind_a_blocker(triton, send, [b"ab\xffcd", b"one", b"two", b"three"])
    assert [status for status, _, _ in replies] == [200] * 4, [r[2][:300] for r in replies]
    # Triton echoes the id as sent, which no JSON parser reads.
    infos = [parse_reply(headers, body.replace(b"ab\xffcd", b"ab?cd", 1)).info
             for _, headers, body in replies]
    assert [info["request_id"] for info in infos[1:]] == ["one", "two", "three"]
    assert re.fullmatch(r"[0-9a-f]{32}", infos[0]["request_id"])  # a fresh one


def test_parameters_that_are_no_utf8_are_refused_by_name(triton):
    # On `generate` a key that is no input is a parameter: reading one that is no UTF-8
    # raised, answered as a 500 with the traceback logged at ERROR.
    status, _, reply = http("POST", f"{triton.ports.http_url}/v2/models/sdxl/generate", None,
                            b'{"prompt": "x", "wid\xffth": 32}', timeout=60)
    assert (status, error_of(reply)) == (400, (
        "the request's parameters must be UTF-8 text (on `generate`, the keys of the body "
        "that are no input, and their values)")), reply[:300]


@pytest.mark.parametrize("part, limit", [("request target", 8190), ("header name", 8192),
                                         ("header value", 8192), ("whole head", None)])
def test_triton_closes_the_connection_on_a_head_part_past_its_limit(triton, part, limit):
    # Triton 2.51's HTTP parser (libevhtp) reads each part of a head into a buffer of 8 KiB:
    # a request target (path and query) of 8190 bytes or more, or one header's name or
    # value of 8192 bytes or more, and it closes the connection without a byte of answer,
    # before any model; a byte less is served. The head as a whole has no limit: 16 header
    # lines of 8000 bytes (128 KiB, 16 times TorchServe's limit) are served (docs/triton.md).
    # This fails once Triton changes it.
    body = json.dumps({"inputs": [{"name": "prompt", "shape": [1, 1], "datatype": "BYTES",
                                   "data": ["x"]},
                                  {"name": "num_inference_steps", "shape": [1, 1],
                                   "datatype": "INT64", "data": [1]}],
                       "outputs": [{"name": "seed"}]}).encode()

    def sent(size: int) -> tuple[list[tuple[bytes, bytes]], bool]:
        target, padding = "/v2/models/sdxl/infer", []
        if part == "request target":
            target += "?pad=" + "a" * (size - len(target) - 5)
            assert len(target) == size
        elif part == "header name":
            padding = ["X" * size + ": 1"]
        elif part == "header value":
            padding = ["X-Pad: " + "a" * size]
        else:
            padding = [f"X-Pad-{i:02}: " + "a" * (size - 10) for i in range(16)]
        head = [f"POST {target} HTTP/1.1", "Host: x", "Content-Type: application/json",
                f"Content-Length: {len(body)}", "Connection: close", *padding]
        with socket.create_connection((triton.ports.host, triton.ports.http), 30) as raw:
            raw.sendall("\r\n".join([*head, "", ""]).encode() + body)
            return answers(raw, 60)

    answered, _ = sent((limit or 8001) - 1)
    assert [status for status, _ in answered] == [b"HTTP/1.1 200 OK"], answered
    assert json.loads(answered[0][1])["outputs"][0]["name"] == "seed", answered
    if limit:
        assert sent(limit) == ([], True)


def classification_of(output: str) -> bytes:
    """An /infer body asking a classification (its top class) of ``output``."""
    return json.dumps({
        "inputs": [{"name": "prompt", "shape": [1, 1], "datatype": "BYTES", "data": ["x"]},
                   {"name": "num_inference_steps", "shape": [1, 1], "datatype": "INT64",
                    "data": [1]}],
        "outputs": [{"name": output, "parameters": {"classification": 1}}]}).encode()


@pytest.mark.parametrize("answered, fatal, encoding, signal_number", [
    # A numeric output's classification is served; a BYTES output's ends Triton.
    (classification_of("seed"), classification_of("info"), None, signal.SIGFPE),
    # JSON nested 80,000 deep is a 500; 200,000 deep (200 KB, under the 1 MiB a proxy's
    # body limit might allow) overflows the stack of Triton's recursive parser.
    (b"[" * 80_000, b"[" * 200_000, None, signal.SIGSEGV),
    # The same sent compressed: 230 bytes, under any body limit; Triton inflates it.
    (b"[" * 80_000, gzip.compress(b"[" * 200_000), "gzip", signal.SIGSEGV),
], ids=["classification of a BYTES output", "JSON nested 200,000 deep", "the same, gzipped"])
def test_one_request_ends_triton(tmp_path, tiny_model_dir, answered, fatal, encoding,
                                 signal_number):
    """What docs/triton.md warns of, held true: one request kills tritonserver (Triton
    2.51), and no setting of Triton's we found refuses it. A Triton that no longer does
    fails this test: then the warning goes. Its own server: the module's would be gone."""
    server = started_and_ready(TritonServerProcess(
        tmp_path / "run", ports=TritonPorts.free(), models=["sdxl"],
        env={"SDXL_MODEL_DIR": str(tiny_model_dir)}), ["sdxl"], 300)
    url = f"{server.ports.http_url}/v2/models/sdxl/infer"
    # The stub's shared memory: it stayed in /dev/shm after such an end, 1 MiB or more.
    [region] = re.findall(r"triton_python_backend_shm_region_[\w-]+",
                          command_line(stub_pid(server)))
    assert (Path("/dev/shm") / region).exists()
    try:
        status, _, body = http("POST", url, None, answered, timeout=60)
        assert status in (200, 500) and server.process.poll() is None, (status, body[:300])
        with pytest.raises(OSError):  # the connection drops: no reply
            http("POST", url, None, fatal, timeout=60,
                 headers={"Content-Encoding": encoding} if encoding else None)
        wait_until(lambda: server.process.poll() is not None, 30, "tritonserver to end")
        assert server.process.returncode == -signal_number
    finally:
        server.stop()
    # Its stub and engine processes outlive it, until stop() kills its process group.
    wait_until(lambda: not server.group_pids(), 10, "no process of its group to be left",
               detail=server.group_pids)
    assert not (Path("/dev/shm") / region).exists()


def test_a_batch_of_prompts_in_one_request_is_refused_alone(triton):
    body = json.dumps({"inputs": [{"name": "prompt", "shape": [2, 1], "datatype": "BYTES",
                                   "data": ["a", "b"]}]}).encode()
    status, _, reply = http("POST", f"{triton.ports.http_url}/v2/models/sdxl/infer", None,
                            body, timeout=60)
    assert status == 400
    assert error_of(reply).startswith("`prompt` must hold one value per request")


def test_stream_true_on_the_plain_model_is_refused_not_ignored(triton):
    # `generate` with "stream": true answered once, as if it had not been asked.
    status, _, reply = http("POST", f"{triton.ports.http_url}/v2/models/sdxl/generate", None,
                            json.dumps({"prompt": "x", "stream": True}).encode(), timeout=60)
    assert status == 400, (status, reply[:300])
    assert error_of(reply) == ("`stream` true: this model answers once; the `sdxl_stream` "
                               "model streams (its generate_stream)")


def test_no_client_can_unload_the_model_or_register_shared_memory(triton):
    for path in ("/v2/repository/models/sdxl/unload", "/v2/systemsharedmemory/region/x/register"):
        status, _, body = http("POST", triton.ports.http_url + path, None, b"{}", timeout=30)
        assert status == 403, (path, status, body)
    assert triton.ready("sdxl")


LOADED_CODE = """
class TritonPythonModel:
    def initialize(self, args):
        open(%r, "w").write("ran")

    def execute(self, requests):
        return []
"""


def test_whoever_reads_tritons_command_line_can_run_code_in_it(triton, tmp_path):
    """The admin key is on Triton's command line, which every local user reads; with it,
    the model repository API loads a python model whose files come in the request, and
    Triton runs them (docs/triton.md). It was said to give only the log and trace settings.
    Fails once the key is kept off the command line or such loads are refused."""
    argv = Path(f"/proc/{triton.process.pid}/cmdline").read_bytes().decode().split("\0")
    restricted = next(arg for arg in argv if arg.startswith("--http-restricted-api="))
    header, _, key = restricted.rpartition(":")[2].partition("=")
    ran = tmp_path / "ran"
    config = {"name": "intruder", "backend": "python", "max_batch_size": 0,
              "input": [{"name": "IN", "data_type": "TYPE_FP32", "dims": [1]}],
              "output": [{"name": "OUT", "data_type": "TYPE_FP32", "dims": [1]}],
              "instance_group": [{"kind": "KIND_CPU", "count": 1}]}
    code = base64.b64encode((LOADED_CODE % str(ran)).encode()).decode()
    body = json.dumps({"parameters": {"config": json.dumps(config),
                                      "file:1/model.py": code}}).encode()
    models = triton.ports.http_url + "/v2/repository/models/intruder"
    try:
        status, _, answer = http("POST", f"{models}/load", None, body,
                                 headers={header: key}, timeout=120)
        assert status == 200, answer
        assert ran.read_text() == "ran"
    finally:
        http("POST", f"{models}/unload", None, b"{}", headers={header: key}, timeout=60)
    assert triton.ready("sdxl")


def test_metrics_hold_tritons_and_ours(triton):
    generate(triton, {"prompt": "counted", **FAST})
    infer(triton, {"prompt": "x", "width": 1004})

    def counted() -> dict[tuple, float] | None:
        values = metrics(triton)
        return values if series(values, "nv_inference_exec_count", model="sdxl") >= 1 \
            else None

    # Triton counts a request once `execute` has returned, after the reply went out: read
    # at once, this held only after earlier tests of the module.
    values = wait_until(counted, 10, "Triton to count the execution")
    assert series(values, "nv_inference_request_success", model="sdxl") >= 1
    assert any(name == "nv_inference_queue_duration_us" for name, _ in values)
    labels = {"model_name": "sdxl", "model_version": "1.0"}
    assert series(values, "sdxl_requests_total", outcome="ok", **labels) >= 1
    assert series(values, "sdxl_requests_total", outcome="bad_request", **labels) >= 1
    assert series(values, "sdxl_images_generated_total", **labels) >= 1
    assert series(values, "sdxl_generation_seconds_count", **labels) >= 1
    assert series(values, "sdxl_stage_seconds_count", stage="denoise", **labels) >= 1
    assert series(values, "sdxl_worker_requests", **labels) >= 1


def test_requests_refused_before_the_service_are_counted_and_say_what_to_do(triton):
    """A request whose tensors are no request body (a misspelt parameter, a field sent as a
    parameter, bad UTF-8) is answered by the adapter before the service: it is still a
    `bad_request` in our metrics, as the same request is under TorchServe."""
    labels = {"model_name": "sdxl", "model_version": "1.0"}

    def refused() -> float:
        return series(metrics(triton), "sdxl_requests_total", outcome="bad_request", **labels)

    before = refused()
    prompt = {"name": "prompt", "shape": [1, 1], "datatype": "BYTES", "data": ["x"]}
    for parameters, message in (
            ({"widht": 32}, "`widht` is not a known field (did you mean `width`?)"),
            ({"width": 32}, "`width` is an input of this model, not a parameter: send it as "
                            "an input tensor"),
            ({"stream": "yes"}, '`stream` must be true or false, got "yes"')):
        body = json.dumps({"inputs": [prompt], "parameters": parameters}).encode()
        status, _, reply = http("POST", f"{triton.ports.http_url}/v2/models/sdxl/infer", None,
                                body, timeout=60)
        assert status == 400 and error_of(reply).startswith(message), (status, reply[:300])
    wait_until(lambda: refused() >= before + 3, 30, "the refusals to be counted")


def test_the_same_seed_gives_the_same_png_through_torchserve(triton, server):
    fields = {"prompt": "a lighthouse at dawn", "seed": 1234, **FAST}
    status, _, png = http("POST", f"{server.addresses.inference}/predictions/sdxl",
                          server.keys()["inference"], json.dumps(fields).encode(),
                          headers={"Accept": "image/png"}, timeout=120)
    assert status == 200 and png.startswith(PNG_MAGIC)
    assert generate(triton, fields).images == [png]


def test_prompts_never_reach_the_log(triton):
    marker = "zebra-crossing-7f3a9"
    generate(triton, {"prompt": marker, "negative_prompt": marker, **FAST})
    infer(triton, {"prompt": marker, "width": 1004})
    log = triton.log_path.read_text(errors="replace")
    assert "successfully loaded 'sdxl'" in log  # the log is the one the server writes
    assert marker not in log
    # Our own INFO lines reach it too (the stub set up no logging: they were dropped).
    assert re.search(r"\[sdxl stub \d+\] INFO sdxl_serve.triton_model: model sdxl version "
                     r"\S+ ready", log), log[-3000:]


def test_the_stub_runs_the_sdxl_serve_its_launcher_runs(tmp_path):
    """The stub's Python read the venv's editable install first: a checkout sharing another
    checkout's venv served the other one's model code. Here the launcher is a copy of the
    package, as a second checkout's is, so this fails where the editable install wins."""
    checkout = tmp_path / "checkout"
    shutil.copytree(Path(sdxl_serve.__file__).parent, checkout / "sdxl_serve",
                    ignore=shutil.ignore_patterns("__pycache__"))
    laid_out = subprocess.run(
        [sys.executable, "-c", "import sys; from pathlib import Path; "
         "from sdxl_serve.triton_server import layered_venv; "
         "print(layered_venv(Path(sys.argv[1])))", str(tmp_path / "venv")],
        env={**os.environ, "PYTHONPATH": str(checkout)}, capture_output=True, text=True,
        timeout=120)
    assert laid_out.returncode == 0, laid_out.stderr
    # The stub's Python is that venv's, environment ignored (-E, as the stub runs it).
    done = subprocess.run([str(tmp_path / "venv" / "bin" / "python3"), "-E", "-c",
                           "import sdxl_serve; print(sdxl_serve.__file__)"],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()).resolve() == (checkout / "sdxl_serve" /
                                                   "__init__.py").resolve()


def test_the_model_says_at_start_where_its_profiles_go(tmp_path, tiny_model_dir):
    """Under Triton no line said where scheduled profiles went (Triton's temp directory),
    so `python -m sdxl_serve.profiling list` looked elsewhere; TorchServe's worker said
    it at start. Now the model says it too, and the profile is there."""
    server = started_and_ready(TritonServerProcess(
        tmp_path / "run", ports=TritonPorts.free(), models=["sdxl"],
        env={"SDXL_MODEL_DIR": str(tiny_model_dir), "SDXL_PROFILE_EVERY_N_REQUESTS": "1"}),
        ["sdxl"], 300)
    try:
        profiles = server.tmp_dir / "sdxl-profiles"
        assert f"profiling one pipeline call every 1 requests into {profiles}" in \
            server.log_path.read_text(errors="replace")
        generate(server, {"prompt": "a profiled fox", "num_inference_steps": 2})

        def listed() -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-m", "sdxl_serve.profiling", "list",
                                   "--dir", str(profiles)],
                                  capture_output=True, text=True, timeout=60)

        # Written after the reply, by the engine process.
        wait_until(lambda: listed().returncode == 0, 60, "the profile to be listed",
                   detail=lambda: listed().stderr)
        assert str(profiles) in listed().stdout
    finally:
        server.stop()


def test_the_command_line_client(triton, tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "generate.py"), "--triton",
                           triton.ports.http_url, "a red fox", "--seed", "9", "--steps", "3",
                           "--num-images", "2", "-o", str(tmp_path / "fox.png")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "seed=9" in done.stdout and "seed=10" in done.stdout
    for index in (0, 1):
        assert (tmp_path / f"fox-{index}.png").read_bytes().startswith(PNG_MAGIC)
    # A refusal is its message, as on TorchServe, not Triton's JSON body.
    refused = subprocess.run([sys.executable, str(REPO / "scripts" / "generate.py"),
                              "--triton", triton.ports.http_url, "a red fox", "--width", "1004",
                              "-o", str(tmp_path / "no.png")],
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 1
    assert refused.stderr.strip().startswith("error: HTTP 400: `width` must be a multiple of 8"), \
        refused.stderr

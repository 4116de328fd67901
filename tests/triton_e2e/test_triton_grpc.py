"""Triton's gRPC face, through tritonclient.grpc: `sdxl` over `infer` (the same image as over
HTTP, refusals as INVALID_ARGUMENT naming field, value and rule, a client deadline that
stops the generation), `sdxl_stream` over a gRPC stream (steps, then the image; errors as
error responses; a cancel that stops the generation, not its batch companion); and the
same through its asyncio client, tritonclient.grpc.aio (a generation, a stream, the
cancel of each). Out of memory and an open circuit over gRPC: test_triton_errors.py."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import queue
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from tritonclient.utils import InferenceServerException, triton_to_np_dtype

from lifetimes import wait_until
from sdxl_serve.triton_client import DATATYPES
from test_triton_serving import (FAST, PNG_MAGIC, generate, group_cpu_seconds, metrics,
                                 series, stub_pid)
from test_triton_stream import answered, answered_after, calls_of_two, stream_events

pytestmark = pytest.mark.triton
OUTPUTS = [grpcclient.InferRequestedOutput(name) for name in ("image", "seed", "info")]
# The most steps a request may ask for: 4 s or more on a 2-core machine, were they all run,
# several times any deadline below.
LONG = {"num_inference_steps": 100}


def tensor(name: str, value, datatype: str | None = None,
           shape: tuple[int, int] = (1, 1)) -> grpcclient.InferInput:
    """An input holding ``value`` (a list of them for another ``shape``), of the type
    config.pbtxt declares unless ``datatype`` says otherwise."""
    datatype = datatype or DATATYPES.get(name, "BYTES")
    values = value if isinstance(value, list) else [value]
    values = [item.encode() if isinstance(item, str) else item for item in values]
    data = np.array(values, dtype=triton_to_np_dtype(datatype)).reshape(shape)
    given = grpcclient.InferInput(name, list(shape), datatype)
    given.set_data_from_numpy(data)
    return given


def inputs(fields: dict) -> list[grpcclient.InferInput]:
    return [tensor(name, value) for name, value in fields.items()]


def client(server) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(f"{server.ports.host}:{server.ports.grpc}")


def test_a_generation_is_the_png_http_gives_for_the_same_seed(triton):
    fields = {"prompt": "a red fox", "seed": 7, **FAST}
    with client(triton) as grpc:
        result = grpc.infer("sdxl", inputs(fields), outputs=OUTPUTS)
    images = list(result.as_numpy("image").reshape(-1))
    assert images[0].startswith(PNG_MAGIC)
    assert images == generate(triton, fields).images
    assert result.as_numpy("seed").reshape(-1).tolist() == [7]
    assert json.loads(result.as_numpy("info").reshape(-1)[0])["width"] == 64


# (what, its inputs, request parameters, the message: the contract's where the request
# reaches our model, Triton's where its own checks refuse it first, marked "Triton:").
REFUSED = [
    ("a bad value", [tensor("prompt", "x"), tensor("width", 1004)], None,
     "`width` must be a multiple of 8 from 32 to 128, got 1004"),
    ("an oversized value", [tensor("prompt", "x"), tensor("num_inference_steps", 10**6)],
     None, "`num_inference_steps` must be an integer from 1 to 100, got 1000000"),
    ("an oversized prompt", [tensor("prompt", "x" * 100_000)], None,
     "`prompt` must be a string of 1 to 2000 characters, with a visible character, got "),
    ("no prompt", [tensor("negative_prompt", "x")], None,
     "`prompt` is required: a string of 1 to 2000 characters, with a visible character"),
    ("a prompt that is no UTF-8", [tensor("prompt", b"\xff")], None,
     "`prompt` must be UTF-8 text: byte 0 is not valid UTF-8"),
    ("two prompts in one request", [tensor("prompt", ["a", "b"], shape=(2, 1))], None,
     "`prompt` must hold one value per request (shape [1, 1]), got shape [2, 1]"),
    ("a misspelt field sent as a parameter", [tensor("prompt", "x")], {"widht": 32},
     "`widht` is not a known field (did you mean `width`?)"),
    ("a misspelt field sent as an input", [tensor("prompt", "x"), tensor("widht", 32, "INT64")],
     None, "Triton: unexpected inference input 'widht' for model 'sdxl'"),
    ("a value of another type", [tensor("prompt", "x"), tensor("width", "64", "BYTES")], None,
     "Triton: inference input 'width' data-type is 'BYTES', but model 'sdxl' expects 'INT64'"),
    ("a prompt of another type", [tensor("prompt", 5, "INT64")], None,
     "Triton: inference input 'prompt' data-type is 'INT64', but model 'sdxl' expects "
     "'BYTES'"),
    # Over HTTP a negative seed is Triton's 500 (it cannot parse -1 as UINT64); over gRPC
    # the tensor's type says what it is.
    ("a negative seed", [tensor("prompt", "x"), tensor("seed", -1, "INT64")], None,
     "Triton: inference input 'seed' data-type is 'INT64', but model 'sdxl' expects "
     "'UINT64'"),
]


def test_every_refusal_is_invalid_argument_naming_the_rule_and_the_stub_survives(triton):
    stub = stub_pid(triton)
    before = answered(triton, "sdxl")
    with client(triton) as grpc:
        for what, given, parameters, message in REFUSED:
            with pytest.raises(InferenceServerException) as refused:
                grpc.infer("sdxl", given, outputs=OUTPUTS, parameters=parameters)
            assert refused.value.status() == "StatusCode.INVALID_ARGUMENT", what
            if message.startswith("Triton: "):
                assert refused.value.message().endswith(message[len("Triton: "):]), \
                    (what, refused.value.message())
            else:
                assert refused.value.message().startswith(message), \
                    (what, refused.value.message())
    # The contract's refusals are ours, counted as TorchServe's path counts them; Triton's
    # never reached the model.
    ours = sum(not message.startswith("Triton: ") for *_, message in REFUSED)
    after = answered_after(triton, before, ours, "sdxl")
    assert after["bad_request"] == before["bad_request"] + ours
    assert stub_pid(triton) == stub
    assert generate(triton, {"prompt": "still serving", **FAST}).images


def test_a_deadline_shorter_than_the_generation_stops_it(triton):
    # Triton cancels a gRPC request whose deadline passes; `sdxl` has no step events to see
    # that at, and ran all 100 steps for nobody, the requests behind it waiting.
    before = answered(triton, "sdxl")
    request_id = uuid.uuid4().hex
    with client(triton) as grpc, pytest.raises(InferenceServerException) as late:
        # 1 s: the request reaches the model well within it on a busy machine (else it is
        # cancelled before it ran, not while), and 100 steps take about 3 s here.
        grpc.infer("sdxl", inputs({"prompt": "a red fox", **LONG}), outputs=OUTPUTS,
                   client_timeout=1.0, request_id=request_id)
    assert late.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    after = answered_after(triton, before, model="sdxl")
    # Stopped between steps (our 499: no image, no failure counted).
    assert (after["ok"], after["images"]) == (before["ok"], before["images"]), (before, after)
    assert after["bad_request"] == before["bad_request"] + 1, (before, after)
    assert f"request {request_id} cancelled by its client while it ran" in \
        triton.log_path.read_text()


def test_a_request_whose_deadline_passes_in_the_queue_never_runs(triton):
    # Triton 2.51 handed a request cancelled in its queue to `execute`, which ran it. Our
    # model refuses such a request unrun; since config.pbtxt sets a queue policy
    # (`max_queue_size`), Triton drops it from its queue itself and `execute` never sees it.
    before = answered(triton, "sdxl")
    ids = {name: f"{name}-{uuid.uuid4().hex}" for name in ("blocker", "queued")}
    idle = group_cpu_seconds(triton)
    with client(triton) as grpc, client(triton) as queued:
        blocker = grpc.async_infer("sdxl", inputs({"prompt": "blocker", **LONG}),
                                   callback=lambda result, error: None, outputs=OUTPUTS,
                                   request_id=ids["blocker"])
        wait_until(lambda: group_cpu_seconds(triton) >= idle + 0.3, 60,
                   "the blocker to be under way in the model")
        with pytest.raises(InferenceServerException) as late:
            queued.infer("sdxl", inputs({"prompt": "queued", **LONG}), outputs=OUTPUTS,
                         client_timeout=0.5, request_id=ids["queued"])
        assert late.value.status() == "StatusCode.DEADLINE_EXCEEDED"
        blocker.cancel()  # its own cancel stops it too
        answered_after(triton, before, 1, "sdxl")
    time.sleep(2)  # room for the queued request to reach the model, were it still to come
    after = answered(triton, "sdxl")
    assert (after["ok"], after["images"]) == (before["ok"], before["images"]), (before, after)
    assert after["bad_request"] == before["bad_request"] + 1, (before, after)
    log = triton.log_path.read_text()
    assert f"request {ids['blocker']} cancelled by its client while it ran" in log
    assert ids["queued"] not in log, "the request cancelled in Triton's queue reached the model"


@contextlib.contextmanager
def opened_stream(server):
    """(a client with its gRPC stream started, the queue of (result, error) that arrive):
    tritonclient holds one stream per client. Cancelled on the way out."""
    grpc = client(server)
    arrived: queue.Queue = queue.Queue()
    grpc.start_stream(callback=lambda result, error: arrived.put((result, error)))
    try:
        yield grpc, arrived
    finally:
        grpc.stop_stream(cancel_requests=True)
        grpc.close()


def until_last(arrived: queue.Queue) -> list:
    """What arrives for one request, up to its image or its error."""
    got = [arrived.get(timeout=60)]
    while got[-1][1] is None and got[-1][0].as_numpy("image_base64") is None:
        got.append(arrived.get(timeout=60))
    return got


def step(result) -> int:
    return json.loads(result.as_numpy("info").reshape(-1)[0])["step"]


def final(result) -> bool:
    flag = result.get_response().parameters.get("triton_final_response")
    return bool(flag and flag.bool_param)


def test_steps_arrive_before_the_image_and_only_the_image_is_final(triton_stream):
    fields = {"prompt": "a red fox", "seed": 5, "num_inference_steps": 4}
    with opened_stream(triton_stream) as (grpc, arrived):
        grpc.async_stream_infer("sdxl_stream", inputs(fields))
        got = until_last(arrived)
    assert [error for _, error in got] == [None] * 5
    results = [result for result, _ in got]
    assert [step(result) for result in results[:-1]] == [1, 2, 3, 4]
    assert [final(result) for result in results] == [False] * 4 + [True]
    image = base64.b64decode(results[-1].as_numpy("image_base64").reshape(-1)[0])
    assert image.startswith(PNG_MAGIC)
    assert results[-1].as_numpy("seed").reshape(-1).tolist() == [5]
    # The same image as generate_stream's over HTTP.
    assert image == base64.b64decode(stream_events(triton_stream, fields)[-1]["image_base64"])


def test_errors_are_error_responses_naming_the_field_and_the_stream_serves_on(triton_stream):
    refused = [
        ([tensor("prompt", "x"), tensor("height", 1004)], None,
         "`height` must be a multiple of 8 from 32 to 128, got 1004"),
        ([tensor("negative_prompt", "x")], None, "`prompt` is required: a string of 1 to "
                                                 "2000 characters, with a visible character"),
        ([tensor("prompt", "x")], {"widht": 32},
         "`widht` is not a known field (did you mean `width`?)"),
        ([tensor("prompt", "x")], {"stream": False},
         "`stream` false: this model streams; the `sdxl` model answers once"),
        ([tensor("prompt", "x"), tensor("width", "64", "BYTES")], None,
         "[request id: <id_unknown>] inference input 'width' data-type is 'BYTES', but model "
         "'sdxl_stream' expects 'INT64'"),
    ]
    with opened_stream(triton_stream) as (grpc, arrived):
        for given, parameters, message in refused:
            grpc.async_stream_infer("sdxl_stream", given, parameters=parameters)
            result, error = arrived.get(timeout=60)
            # A stream's response carries a message, no status code (Triton's protocol).
            assert result is None and error.message() == message, (message, result, error)
        grpc.async_stream_infer("sdxl_stream", inputs({"prompt": "x", "num_inference_steps": 1}))
        last, error = until_last(arrived)[-1]
    assert error is None and last.as_numpy("image_base64") is not None


# A client process that ends mid-stream: its connection goes without a word.
GONE_CLIENT = """
import os, queue, sys
import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
client = grpcclient.InferenceServerClient(sys.argv[1])
arrived = queue.Queue()
client.start_stream(callback=lambda result, error: arrived.put((result, error)))
prompt = grpcclient.InferInput("prompt", [1, 1], "BYTES")
prompt.set_data_from_numpy(np.array([[b"a red fox"]], dtype=object))
steps = grpcclient.InferInput("num_inference_steps", [1, 1], "INT64")
steps.set_data_from_numpy(np.array([[100]], dtype=np.int64))
client.async_stream_infer("sdxl_stream", [prompt, steps])
result, error = arrived.get(timeout=60)
print(result.as_numpy("info").reshape(-1)[0].decode(), flush=True)
os._exit(0)
"""


@pytest.mark.parametrize("how", ["stop_stream", "client_process_ends"])
def test_a_cancelled_stream_stops_its_generation(triton_stream, how):
    before = answered(triton_stream)
    if how == "client_process_ends":
        done = subprocess.run([sys.executable, "-c", GONE_CLIENT,
                               f"{triton_stream.ports.host}:{triton_stream.ports.grpc}"],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["step"] == 1
    else:
        with opened_stream(triton_stream) as (grpc, arrived):
            grpc.async_stream_infer("sdxl_stream",
                                    inputs({"prompt": "a red fox", "num_inference_steps": 100}))
            result, error = arrived.get(timeout=60)
            assert error is None and step(result) == 1
            grpc.stop_stream(cancel_requests=True)
    after = answered_after(triton_stream, before)
    # Stopped between steps (our 499: no image, no failure counted).
    assert (after["ok"], after["images"]) == (before["ok"], before["images"]), (before, after)
    assert after["bad_request"] == before["bad_request"] + 1, (before, after)


def test_one_cancelled_stream_leaves_its_batch_companion_served(triton_stream):
    before = metrics(triton_stream)
    with opened_stream(triton_stream) as (blocker, blocker_arrived), \
            opened_stream(triton_stream) as (gone, gone_arrived), \
            opened_stream(triton_stream) as (stays, stays_arrived):
        # The blocker holds the model until both others are queued, then is cancelled; they
        # are sent once it runs, so they cannot join its `execute` (test_triton_stream.py).
        blocker.async_stream_infer("sdxl_stream", inputs({"prompt": "blocker",
                                                          "num_inference_steps": 100}))
        assert blocker_arrived.get(timeout=60)[1] is None
        gone.async_stream_infer("sdxl_stream", inputs({"prompt": "a red fox", "seed": 1,
                                                       "num_inference_steps": 20}))
        stays.async_stream_infer("sdxl_stream", inputs({"prompt": "a red fox", "seed": 2,
                                                        "num_inference_steps": 20}))
        # Both queued behind the blocker, so they reach `execute` (and one call) together.
        wait_until(lambda: series(metrics(triton_stream), "nv_inference_pending_request_count",
                                  model="sdxl_stream") == 2, 60, "two requests queued")
        blocker.stop_stream(cancel_requests=True)
        result, error = gone_arrived.get(timeout=60)
        assert error is None and step(result) == 1
        gone.stop_stream(cancel_requests=True)
        got = until_last(stays_arrived)
    assert [error for _, error in got] == [None] * 21
    assert [step(result) for result, _ in got[:-1]] == list(range(1, 21))
    assert got[-1][0].as_numpy("seed").reshape(-1).tolist() == [2]
    # They were one pipeline call of two (so the call was not stopped for the one gone).
    assert calls_of_two(metrics(triton_stream)) == calls_of_two(before) + 1


def aio_client(server) -> aioclient.InferenceServerClient:
    """tritonclient's asyncio client; made inside the event loop that uses it."""
    return aioclient.InferenceServerClient(f"{server.ports.host}:{server.ports.grpc}")


def test_the_asyncio_client_gets_the_png_the_sync_client_gets(triton):
    fields = {"prompt": "a red fox", "seed": 7, **FAST}

    async def generation():
        async with aio_client(triton) as grpc:
            return await grpc.infer("sdxl", inputs(fields), outputs=OUTPUTS)

    result = asyncio.run(generation())
    with client(triton) as grpc:
        expected = grpc.infer("sdxl", inputs(fields), outputs=OUTPUTS)
    images = list(result.as_numpy("image").reshape(-1))
    assert images[0].startswith(PNG_MAGIC)
    assert images == list(expected.as_numpy("image").reshape(-1))
    assert result.as_numpy("seed").reshape(-1).tolist() == [7]


def test_an_asyncio_call_cancelled_stops_its_generation(triton):
    # Cancelling the task that awaits the call cancels the gRPC call (grpc.aio does).
    before = answered(triton, "sdxl")
    request_id = uuid.uuid4().hex
    idle = group_cpu_seconds(triton)

    async def cancelled() -> None:
        async with aio_client(triton) as grpc:
            call = asyncio.create_task(grpc.infer(
                "sdxl", inputs({"prompt": "a red fox", **LONG}), outputs=OUTPUTS,
                request_id=request_id))
            # Under way in the model, not only sent: a cancel in the queue is another test.
            await asyncio.to_thread(wait_until, lambda: group_cpu_seconds(triton) >= idle + 0.3,
                                    60, "the request to be under way in the model")
            assert not call.done()
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call

    asyncio.run(cancelled())
    after = answered_after(triton, before, model="sdxl")
    # Stopped between steps (our 499: no image, no failure counted).
    assert (after["ok"], after["images"]) == (before["ok"], before["images"]), (before, after)
    assert after["bad_request"] == before["bad_request"] + 1, (before, after)
    assert f"request {request_id} cancelled by its client while it ran" in \
        triton.log_path.read_text()


async def one_request(fields: dict, sent_all: asyncio.Event):
    """The request iterator of an asyncio stream: one request, then the stream held open
    for sending until ``sent_all`` is set (an iterator that ends closes it for sending;
    Triton then ends the stream after the request's last response)."""
    yield {"model_name": "sdxl_stream", "inputs": inputs(fields)}
    await sent_all.wait()


def test_an_asyncio_stream_gets_the_steps_then_the_image_the_sync_stream_gets(triton_stream):
    fields = {"prompt": "a red fox", "seed": 5, "num_inference_steps": 4}

    async def streamed() -> list:
        sent_all = asyncio.Event()
        sent_all.set()
        async with aio_client(triton_stream) as grpc:
            return [got async for got in grpc.stream_infer(one_request(fields, sent_all))]

    got = asyncio.run(streamed())
    assert [error for _, error in got] == [None] * 5
    results = [result for result, _ in got]
    assert [step(result) for result in results[:-1]] == [1, 2, 3, 4]
    assert [final(result) for result in results] == [False] * 4 + [True]
    with opened_stream(triton_stream) as (grpc, arrived):
        grpc.async_stream_infer("sdxl_stream", inputs(fields))
        expected = until_last(arrived)[-1][0]
    image = results[-1].as_numpy("image_base64").reshape(-1)[0]
    assert base64.b64decode(image).startswith(PNG_MAGIC)
    assert image == expected.as_numpy("image_base64").reshape(-1)[0]


def test_an_asyncio_stream_cancelled_stops_its_generation(triton_stream):
    before = answered(triton_stream)

    async def cancelled() -> None:
        sent_all = asyncio.Event()  # never set: the stream stays open until cancelled
        async with aio_client(triton_stream) as grpc:
            responses = grpc.stream_infer(one_request(
                {"prompt": "a red fox", "num_inference_steps": 100}, sent_all))
            result, error = await anext(responses)
            assert error is None and step(result) == 1
            responses.cancel()

    asyncio.run(cancelled())
    after = answered_after(triton_stream, before)
    # Stopped between steps (our 499: no image, no failure counted).
    assert (after["ok"], after["images"]) == (before["ok"], before["images"]), (before, after)
    assert after["bad_request"] == before["bad_request"] + 1, (before, after)

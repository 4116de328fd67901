"""The production runtime in process, for real: out-of-memory splitting with the real
torch.cuda.OutOfMemoryError raised inside the pipeline call, the deep health check on a
good and a broken pipeline, and engine processes replaced at their budget."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from lifetimes import cpu_seconds, wait_until
from sdxl_serve.cancellation import process_running
from sdxl_serve.engine import Engine, NonFiniteImage, load_engine
from sdxl_serve.engine_process import EngineSpec
from sdxl_serve.health import check_pipeline
from sdxl_serve.recycling import RecyclingService
from sdxl_serve.service import GenerationService, Incoming
from sdxl_serve.settings import Settings

pytestmark = pytest.mark.handler
TINY_PIXELS = 64 * 64


def body(**fields) -> bytes:
    return json.dumps({"prompt": "a lighthouse", "num_inference_steps": 2, **fields}).encode()


def images_of(reply) -> list[Image.Image]:
    payload = reply.json()
    encoded = payload.get("images") or [payload["image"]]
    return [Image.open(io.BytesIO(base64.b64decode(data))) for data in encoded]


def close(a: Image.Image, b: Image.Image) -> bool:
    """Batched and single convolutions may sum in another order on a CPU: a couple of steps
    of 8-bit rounding apart at most, never another image."""
    difference = np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16))
    return difference.max() <= 2 and difference.mean() < 0.1


def faulty(engine, **settings) -> GenerationService:
    """The session's pipeline behind fault-injection settings (the pipe is shared)."""
    config = {"device": "cpu", **settings}
    return GenerationService(Engine(engine.pipe, Settings.from_mapping(config, env={}),
                                    engine.device))


@pytest.mark.parametrize("stage", ["denoise", "decode"])
@pytest.mark.parametrize("error", ["allocator", "cublas"])
def test_an_oom_splits_the_batch_until_it_fits(engine, stage, error):
    # Two images of 64x64 fit in one call; more raise CUDA's out-of-memory error: torch's
    # allocator's, or cuBLAS's plain RuntimeError, which was taken for a broken engine
    # (its "CUDA error"): a 500 for all four images and a new engine process.
    service = faulty(engine, fault_oom_max_pixels=2 * TINY_PIXELS, fault_oom_stage=stage,
                     fault_oom_error=error)
    # 4 images: split by request (3 + 1), then the request of 3 by images (1 + 2).
    items = [Incoming(body(seed=10, num_images=3, num_inference_steps=1)),
             Incoming(body(seed=20, num_inference_steps=1))]
    replies, stats = service.serve(items)
    assert [r.status for r in replies] == [200, 200]
    assert stats.oom_events == 2 and not stats.engine_broken
    assert sorted(requests for requests, _, _ in stats.calls) == [1, 1, 1]
    assert [len(images_of(r)) for r in replies] == [3, 1]
    # Split or not, each image is the one its seed makes alone.
    clean = GenerationService(engine)
    [alone] = clean.handle([Incoming(body(seed=11, num_inference_steps=1))])
    assert close(images_of(replies[0])[1], images_of(alone)[0])
    assert replies[0].json()["seeds"] == [10, 11, 12]


def test_a_canceled_request_split_off_by_an_oom_is_not_generated(engine, tmp_path):
    # Two 64x64 images do not fit in one call, so the batch splits into its requests. The
    # first was canceled before the batch: its half does not run, and its companion's does.
    service = faulty(engine, fault_oom_max_pixels=TINY_PIXELS)
    canceled, live = tmp_path / ("a" * 32), tmp_path / ("b" * 32)
    canceled.touch()
    items = [Incoming(body(seed=1, num_inference_steps=1), "gone", cancel_flag=str(canceled)),
             Incoming(body(seed=2, num_inference_steps=1), "wanted", cancel_flag=str(live))]
    replies, stats = service.serve(items)
    assert [r.status for r in replies] == [499, 200]
    assert replies[0].json()["type"] == "Cancelled"
    assert stats.oom_events == 1
    assert [requests for requests, _, _ in stats.calls] == [1]  # the wanted half alone


def test_a_half_canceled_during_its_steps_stops_and_its_companion_is_served(engine, tmp_path):
    # The cancel lands at the first step of the first half's own call (its progress event),
    # after the batch split: that half stops there, and the second half still runs.
    service = faulty(engine, fault_oom_max_pixels=TINY_PIXELS)
    flags = [tmp_path / (c * 32) for c in "cd"]
    steps: list[tuple[int, int]] = []

    def progress(index: int, event: dict) -> None:
        steps.append((index, event["step"]))
        if index == 0:
            flags[0].touch()

    items = [Incoming(body(seed=1, num_inference_steps=3, stream=True), "gone",
                      cancel_flag=str(flags[0])),
             Incoming(body(seed=2, num_inference_steps=3, stream=True), "wanted",
                      cancel_flag=str(flags[1]))]
    replies, stats = service.serve(items, progress)
    assert [r.status for r in replies] == [499, 200]
    # Each half's listeners hear their own call: one step of the first, all of the second.
    assert steps == [(0, 1), (1, 1), (1, 2), (1, 3)]
    assert [requests for requests, _, _ in stats.calls] == [1]


def test_a_streamed_request_split_by_an_oom_hears_each_parts_steps(engine):
    # The core's events count the steps of the call that runs, from 1 again in each part
    # (the failed call stopped inside its first step, before its line); what a client
    # hears of them is the next test's.
    service = faulty(engine, fault_oom_max_pixels=TINY_PIXELS)
    steps: list[tuple[int, int]] = []
    [reply] = service.handle([Incoming(body(seed=3, num_images=2, stream=True))],
                             lambda index, event: steps.append((event["step"], event["total"])))
    assert reply.status == 200 and reply.json()["seeds"] == [3, 4]
    assert steps == [(1, 2), (2, 2), (1, 2), (2, 2)]


def test_a_streamed_request_split_by_an_oom_sends_each_step_once(tiny_model_dir):
    # docs/api.md: through the engine process (as TorchServe and Triton serve it) a part
    # run after the first sends no step again; the client's lines stop at the first part's
    # last step until the result. The doc said each part's steps came again from step 1.
    config = {"device": "cpu", "fault_oom_max_pixels": TINY_PIXELS, "warmup_steps": 1,
              "health_interval_s": 3600}
    service = RecyclingService(EngineSpec(str(tiny_model_dir), config, None, "1.0"),
                               Settings.from_mapping(config, env={}))
    service.start()
    try:
        steps: list[tuple[int, int]] = []
        [reply] = service.handle(
            [Incoming(body(seed=3, num_images=2, stream=True))],
            lambda index, event: steps.append((event["step"], event["total"])))
        assert reply.status == 200 and reply.json()["seeds"] == [3, 4]
        assert steps == [(1, 2), (2, 2)]
    finally:
        service.close()


@pytest.mark.parametrize("stage", ["denoise", "decode"])
def test_elapsed_s_counts_from_the_requests_start_across_an_oom_split(engine, stage):
    # Two streamed requests that fit one at a time: their call runs out of memory in its
    # first step (before its lines) or at the decode (after them), and each request runs
    # in a half of its own. `elapsed_s` started again from 0 in each half: the second
    # half's lines left out the first half's time, and at the decode each request's lines
    # went back in time.
    service = faulty(engine, fault_oom_max_pixels=TINY_PIXELS, fault_oom_stage=stage)
    heard: dict[int, list[float]] = {0: [], 1: []}

    def progress(index: int, event: dict) -> None:
        if not any(heard.values()):
            time.sleep(0.5)  # time spent in the first call, which every later line counts
        heard[index].append(event["elapsed_s"])

    items = [Incoming(body(seed=1, stream=True)), Incoming(body(seed=2, stream=True))]
    replies, stats = service.serve(items, progress)
    assert [r.status for r in replies] == [200, 200] and stats.oom_events == 1
    for elapsed in heard.values():
        assert elapsed == sorted(elapsed) and elapsed[-1] >= 0.5, heard


def test_a_request_of_more_images_than_a_call_carries_is_split_into_calls(engine):
    # max_num_images above max_batch_images: the request's five images went whole into one
    # pipeline call, past the most one call may carry (the memory and compiled shapes).
    service = faulty(engine, max_num_images=5, max_batch_images=2, compile_batch_sizes="1")
    [reply] = service.handle([Incoming(body(seed=7, num_images=5))])
    assert reply.status == 200, reply.body
    assert service.engine.pipeline_calls == 3  # 2 + 2 + 1 images
    assert reply.json()["seeds"] == [7, 8, 9, 10, 11]
    # Each image is the one its seed makes alone.
    [alone] = GenerationService(engine).handle([Incoming(body(seed=10))])
    assert close(images_of(reply)[3], images_of(alone)[0])


def test_one_image_that_cannot_fit_gets_507_naming_the_size(engine):
    service = faulty(engine, fault_oom_max_pixels=TINY_PIXELS)
    replies, stats = service.serve([Incoming(body(width=128, height=96), "big"),
                                    Incoming(body(num_inference_steps=1), "small")])
    assert [r.status for r in replies] == [507, 200]
    error = replies[0].json()
    assert error["type"] == "OutOfMemory" and error["request_id"] == "big"
    assert "128x96" in error["message"] and "`width`" in error["message"]
    assert "96x72" in error["message"]  # a concrete smaller size to try
    assert stats.oom_events == 1
    # The engine keeps serving.
    [again] = service.handle([Incoming(body(num_inference_steps=1))])
    assert again.status == 200


def test_a_507_suggests_only_what_the_request_can_still_change(engine):
    # Each was told to lower its size and to turn guidance off, which these had done.
    service = faulty(engine, fault_oom_max_pixels=16 * 16)
    unguided, smallest = service.handle([
        Incoming(body(width=128, height=96, guidance_scale=1.0)),
        Incoming(body(width=32, height=32, guidance_scale=0))])
    assert unguided.status == smallest.status == 507
    assert "96x72" in unguided.json()["message"]
    assert "guidance_scale" not in unguided.json()["message"]
    message = smallest.json()["message"]
    assert "`width`" not in message and "guidance_scale" not in message, message
    assert message.startswith("one 32x32 image does not fit in GPU memory, even alone: ")


def test_a_request_that_breaks_a_batched_call_fails_alone(engine):
    # The batched call fails inside the real pipeline; each request then runs on its own,
    # so only the one that breaks it gets a 500 and its companions get their images.
    service = faulty(engine, fault_error_prompt="poison")
    items = [Incoming(body(seed=1, num_inference_steps=1), "first"),
             Incoming(body(prompt="poison", seed=2, num_inference_steps=1), "culprit"),
             Incoming(body(seed=3, num_inference_steps=1), "third")]
    replies, stats = service.serve(items)
    assert [r.status for r in replies] == [200, 500, 200]
    assert replies[1].json()["request_id"] == "culprit"
    assert "poison" not in replies[1].body.decode()  # no prompt text in an error
    # The batched call failed, then three calls alone, two of which succeeded.
    assert sorted(requests for requests, _, _ in stats.calls) == [1, 1]
    [alone] = GenerationService(engine).handle([Incoming(body(seed=3, num_inference_steps=1))])
    assert close(images_of(replies[2])[0], images_of(alone)[0])


def test_requests_after_a_cuda_error_are_not_run_on_the_broken_engine(engine):
    # A sticky CUDA error fails every later call of its process: the batch's other groups
    # (another size here) are not run on it but answered as not run, for a fresh engine.
    service = faulty(engine, fault_cuda_error_prompt="bad gpu")
    items = [Incoming(body(prompt="bad gpu", num_inference_steps=1), "culprit"),
             Incoming(body(width=32, height=32, num_inference_steps=1), "next")]
    replies, stats = service.serve(items)
    assert [r.status for r in replies] == [500, 500]
    assert stats.engine_broken and stats.not_run == [1] and stats.calls == []
    assert replies[0].json()["type"] == "InternalServerError"
    assert replies[1].json()["type"] == "EngineBroken"
    assert "may be sent again" in replies[1].json()["message"]


def test_the_injected_error_is_the_real_cuda_type(engine):
    service = faulty(engine, fault_oom_max_pixels=1)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        service.engine.generate([service.parse(Incoming(body()))])


def test_deep_health_passes_on_a_working_pipeline(engine):
    result = check_pipeline(engine)
    assert result.healthy, result.detail
    assert result.pid == os.getpid() and result.seconds > 0


@pytest.fixture
def broken_engine(tiny_model_dir):
    """A pipeline of its own whose UNet weights went bad (NaN), as after a corrupted load
    or a GPU fault."""
    engine = load_engine(tiny_model_dir, Settings.from_mapping({"device": "cpu"}, env={}))
    with torch.no_grad():
        for parameter in engine.pipe.unet.parameters():
            parameter.fill_(float("nan"))
    return engine


def test_deep_health_fails_on_a_broken_pipeline(broken_engine):
    result = check_pipeline(broken_engine)
    assert not result.healthy
    assert "NaN" in result.detail


def test_a_nan_image_is_a_500_not_a_black_image(broken_engine):
    # NaN pixels became 0 in the decoder's postprocessing: a black PNG answered 200, which
    # also told the circuit breaker that the engine was healthy.
    service = GenerationService(broken_engine)
    replies, stats = service.serve([Incoming(body(seed=1), "first"),
                                    Incoming(body(seed=2, num_images=2), "second")])
    assert [r.status for r in replies] == [500, 500]
    for reply, request_id in zip(replies, ("first", "second")):
        error = reply.json()
        assert error["type"] == "NonFiniteImage" and error["request_id"] == request_id
        assert "NaN" in error["message"] and request_id in error["message"]
    assert stats.images == 0


def test_a_pipeline_that_decodes_nan_fails_its_warm_up(broken_engine):
    # So the engine process fails its start, where the worker became READY on black images.
    with pytest.raises(NonFiniteImage, match="NaN"):
        broken_engine.warm_up()


def test_deep_health_fails_when_generation_raises(broken_engine):
    broken_engine.pipe.vae = None  # decoding now raises
    result = check_pipeline(broken_engine)
    assert not result.healthy and "generation failed" in result.detail


def pid_of(reply) -> int:
    return int(reply.headers["X-Worker-Pid"])


@pytest.fixture(scope="module")
def recycling(tiny_model_dir):
    config = {"device": "cpu", "max_requests_per_worker": 2, "warmup_sizes": "64x64,32x32",
              "health_interval_s": 3600}
    service = RecyclingService(EngineSpec(str(tiny_model_dir), config, None, "1.0"),
                               Settings.from_mapping(config, env={}))
    service.info = service.start()
    yield service
    service.close()


def test_the_engine_process_warms_every_bucket_before_ready(recycling):
    info = recycling.info
    assert info["warm_up_sizes"] == ((64, 64), (32, 32))
    assert info["pipeline_calls"] == 2
    assert info["pid"] != os.getpid()  # the pipeline lives in its own process


def test_engine_processes_are_replaced_at_their_budget_without_failing(recycling):
    first = recycling.engine.pid
    events = []
    items = [Incoming(body(seed=1), "a"), Incoming(body(seed=2), "b"),
             Incoming(body(seed=3, stream=True), "c")]
    replies = recycling.handle(items, progress=lambda index, event: events.append(index))
    assert [r.status for r in replies] == [200, 200, 200]
    pids = [pid_of(r) for r in replies]
    # The batch of three was split: two for the first process, one for a fresh one.
    assert pids[:2] == [first, first] and pids[2] != first
    assert not process_running(first)  # it exited: its memory is back
    assert events and set(events) == {2}  # progress kept the request's place in the batch
    [again] = recycling.handle([Incoming(body(seed=4), "d")])
    assert pid_of(again) == pids[2]  # its second request
    assert recycling.engines_started == 2


def test_requests_refused_by_validation_do_not_use_the_budget(tiny_model_dir):
    # Counted, cheap 400s replaced engine processes (a model load each, seconds to a minute
    # on a GPU) as fast as a client could send them.
    config = {"device": "cpu", "max_requests_per_worker": 2, "recycle_jitter": 0,
              "health_interval_s": 3600}
    service = RecyclingService(EngineSpec(str(tiny_model_dir), config, None, "1.0"),
                               Settings.from_mapping(config, env={}))
    service.start()
    try:
        bad = [Incoming(body(width=7), f"bad{i}") for i in range(5)]
        assert [r.status for r in service.handle(bad)] == [400] * 5
        mixed = service.handle(bad[:3] + [Incoming(body(seed=1), "good")])
        assert [r.status for r in mixed] == [400, 400, 400, 200]
        assert service.engines_started == 1 and service.budget.served == 1
    finally:
        service.close()


def test_an_engine_process_that_comes_of_age_under_load_is_replaced_between_batches(
        tiny_model_dir):
    # No idle moment to replace it in (the worker's upkeep needs one): the batch that finds
    # the engine process past its age starts a fresh one first, and nothing fails.
    config = {"device": "cpu", "max_worker_age_s": 2, "recycle_jitter": 0,
              "warmup_sizes": "32x32", "warmup_steps": 1, "health_interval_s": 3600}
    service = RecyclingService(EngineSpec(str(tiny_model_dir), config, None, "1.0"),
                               Settings.from_mapping(config, env={}))
    service.start()
    try:
        born, batches = {}, []  # engine pid: when its age began; (pid, batch start)
        # Until a third engine process serves: a fixed 7 s of batches saw only two when a
        # start took over 3 s (a loaded machine).
        deadline = time.monotonic() + 120
        seed = 0
        while len(born) < 3 and time.monotonic() < deadline:
            started = service.clock()
            items = [Incoming(body(seed=seed + i, width=32, height=32, num_inference_steps=1),
                              f"r{seed + i}") for i in range(2)]
            seed += 2
            replies = service.handle(items)
            assert [r.status for r in replies] == [200, 200], replies
            pid = pid_of(replies[0])
            born.setdefault(pid, service.budget.started_at)
            batches.append((pid, max(started, born[pid])))
        assert len(born) >= 3, born  # 2 minutes of batches at an age of 2 s
        # No batch started on an engine process past its age: the age is checked before
        # each batch (a batch running when the age passes ends on the old process).
        assert all(start - born[pid] < 2 for pid, start in batches), (born, batches)
        assert sum(process_running(pid) for pid in born) == 1  # the replaced ones ended
    finally:
        service.close()


def test_a_dead_engine_process_is_replaced_before_the_next_batch(recycling):
    old = recycling.engine.pid
    os.kill(old, signal.SIGKILL)
    [reply] = recycling.handle([Incoming(body(), "e")])
    assert reply.status == 200 and pid_of(reply) not in (old, 0)


def test_requests_a_cuda_error_left_unrun_run_on_a_fresh_engine(tiny_model_dir):
    # The request that broke the engine gets its 500; the one after it in the batch (another
    # size, another call) ran on the broken process and failed too. Now it runs on the
    # fresh engine process that replaces the broken one, and the circuit stays closed.
    config = {"device": "cpu", "fault_cuda_error_prompt": "bad gpu", "recycle_jitter": 0,
              "warmup_sizes": "32x32", "warmup_steps": 1, "health_interval_s": 3600}
    service = RecyclingService(EngineSpec(str(tiny_model_dir), config, None, "1.0"),
                               Settings.from_mapping(config, env={}))
    service.start()
    try:
        broken = service.engine.pid
        replies = service.handle([
            Incoming(body(prompt="bad gpu", num_inference_steps=1), "culprit"),
            Incoming(body(width=32, height=32, num_inference_steps=1, seed=5), "next")])
        assert [r.status for r in replies] == [500, 200], [r.body for r in replies]
        assert pid_of(replies[1]) != broken and not process_running(broken)
        assert service.engines_started == 2 and service.breaker.allows_requests()
        [alone] = service.handle([Incoming(body(width=32, height=32, num_inference_steps=1,
                                                seed=5))])
        assert close(images_of(replies[1])[0], images_of(alone)[0])
    finally:
        service.close()


def test_deep_health_requests_are_answered_from_the_engine(recycling):
    [reply] = recycling.handle([Incoming(b"", "probe", health=True)])
    assert reply.status == 200, reply.body
    payload = reply.json()
    # docs/operations.md names each field; worker_pid is the engine process's.
    assert set(payload) == {"status", "detail", "checked_s_ago", "check_seconds",
                            "worker_pid"}
    assert payload["status"] == "healthy" and payload["worker_pid"] == recycling.engine.pid
    # Within health_interval_s the cached result is reused: no second generation (a check
    # that runs makes a new result).
    result = recycling.health_result
    [cached] = recycling.handle([Incoming(b"", "probe2", health=True)])
    assert recycling.health_result is result
    assert cached.json()["worker_pid"] == payload["worker_pid"]
    assert cached.json()["check_seconds"] == payload["check_seconds"]


WORKER_SCRIPT = """
import sys
from sdxl_serve.engine_process import EngineProcess, EngineSpec
from sdxl_serve.service import Incoming

if __name__ == "__main__":  # engine processes import the main module, as multiprocessing does
    # The long request costs 52 default requests: allowed here, so it really runs.
    engine = EngineProcess(EngineSpec(sys.argv[1], {"device": "cpu", "warmup_sizes": "32x32",
                                                    "warmup_steps": 1, "max_request_cost": 60,
                                                    "max_call_cost": 60}))
    engine.start()
    engine.wait_ready()
    open(sys.argv[2], "w").write(str(engine.pid))
    long = (b'{"prompt": "x", "width": 128, "height": 128, "num_inference_steps": 100, '
            b'"num_images": 4}')
    engine.serve([Incoming(long)])  # busy for a long while: killed in the middle
"""


def test_a_busy_engine_process_dies_with_a_worker_killed_outright(tiny_model_dir, tmp_path):
    """TorchServe ends a stuck or scaled-down worker with SIGKILL: its engine process must
    not live on holding (GPU) memory, even in the middle of a generation."""
    script, pid_file = tmp_path / "worker.py", tmp_path / "engine.pid"
    script.write_text(WORKER_SCRIPT)
    worker = subprocess.Popen([sys.executable, str(script), str(tiny_model_dir), str(pid_file)],
                              stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    try:
        wait_until(lambda: worker.poll() is None and pid_file.exists() and pid_file.read_text(),
                   300, "the worker's engine process to be ready",
                   detail=lambda: f"worker exit code {worker.poll()}")
        engine_pid = int(pid_file.read_text())
        # Ready, the engine process idles; half a CPU second more means it is generating.
        idle = cpu_seconds(engine_pid)
        wait_until(lambda: cpu_seconds(engine_pid) >= idle + 0.5, 120,
                   "the engine process to be under way with the long generation")
    finally:
        worker.kill()
        worker.wait()
    # The engine dies once its fork server has (it notices its worker's end, then exits:
    # seconds on a busy machine), far sooner than the generation would end.
    wait_until(lambda: not process_running(engine_pid), 20,
               "the busy engine process to end with its worker")


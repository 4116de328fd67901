"""An engine process killed in the middle of a batch loses no request, for real: a SIGKILL
from outside while the pipeline runs, and a poison request that makes the engine process
SIGKILL itself inside the pipeline call (``fault_crash_prompt``). An engine that hangs
(SIGSTOP stands in for a stuck GPU or driver call) is ended at its stall deadline."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import random
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest

from lifetimes import wait_until
from sdxl_serve.cancellation import process_running
from sdxl_serve.engine_process import KILL_WAIT_S, EngineSpec
from sdxl_serve.profiling import WRITING_PREFIX
from sdxl_serve.recycling import RecyclingService, WorkerBudget
from sdxl_serve.service import Incoming
from sdxl_serve.settings import Settings

pytestmark = pytest.mark.handler
POISON = "a prompt that crashes the engine"


def body(**fields) -> bytes:
    return json.dumps({"prompt": "a lighthouse", "num_inference_steps": 4, **fields}).encode()


def images(reply) -> list[str]:
    """The base64 image bytes of a reply (timings and ids differ between runs)."""
    payload = reply.json()
    return payload.get("images") or [payload["image"]]


def pid_of(reply) -> int:
    return int(reply.headers["X-Worker-Pid"])


@pytest.fixture(scope="module")
def runtime(tiny_model_dir):
    config = {"device": "cpu", "warmup_steps": 1, "health_interval_s": 3600,
              "fault_crash_prompt": POISON}
    service = RecyclingService(EngineSpec(str(tiny_model_dir), config, None, "1.0"),
                               Settings.from_mapping(config, env={}))
    service.start()
    yield service
    service.close()


def mixed_batch() -> list[Incoming]:
    """Two pipeline calls: two 64x64 requests (one of two images), then a streaming 48x48
    one, whose progress tells the test that the second call is under way."""
    return [Incoming(body(seed=1), "a"), Incoming(body(seed=2, num_images=2), "b"),
            Incoming(body(seed=3, width=48, height=48, stream=True), "c")]


def test_an_engine_killed_mid_batch_answers_every_request_with_the_same_bytes(runtime):
    clean = runtime.handle(mixed_batch())
    assert [r.status for r in clean] == [200, 200, 200]
    started = runtime.engines_started
    killed, steps, heard = [], [], []

    def kill_on_first_step(index: int, event: dict) -> None:
        steps.append(event["step"])
        heard.append((time.perf_counter() - handle_started, event["elapsed_s"]))
        if not killed:  # the first call is done, the second one is denoising
            killed.append(runtime.engine.pid)
            os.kill(killed[0], signal.SIGKILL)

    handle_started = time.perf_counter()
    replies = runtime.handle(mixed_batch(), progress=kill_on_first_step)
    assert killed and not process_running(killed[0])
    assert [r.status for r in replies] == [200, 200, 200], [r.body[:200] for r in replies]
    # Served again by a fresh engine process, with the images of the run without a crash.
    assert runtime.engines_started == started + 1
    assert {pid_of(r) for r in replies} == {runtime.engine.pid} != {killed[0]}
    for crashed, reference in zip(replies, clean):
        assert images(crashed) == images(reference)
    assert [r.headers["X-Request-Id"] for r in replies] == ["a", "b", "c"]
    # The streaming client saw step 1 before the crash; the run again goes on from there,
    # not from 1 (it restarted its count: 1, 1, 2, 3, 4).
    assert steps == [1, 2, 3, 4]
    # Its `elapsed_s` counts on through the crash: the fresh engine process's own count
    # left out the dead run and the restart (seconds), and could go back.
    for since_handle, elapsed in heard:
        assert since_handle - 0.25 <= elapsed <= since_handle, heard


def test_a_stream_whose_engine_dies_before_its_first_step_counts_on_from_the_batch(runtime):
    # The engine process dies in the batch's first pipeline call, before the streaming
    # request of its second call took a step: that request's `elapsed_s` counted from the
    # fresh engine process's start, without the dead run and the restart (seconds).
    batch = mixed_batch()
    batch[0] = Incoming(body(seed=1, stream=True), "a")  # a step in the first call
    killed, heard = [], {}

    def kill_in_the_first_call(index: int, event: dict) -> None:
        heard.setdefault(index, []).append(
            (time.perf_counter() - handle_started, event["elapsed_s"]))
        if not killed:
            killed.append(runtime.engine.pid)
            os.kill(killed[0], signal.SIGKILL)

    handle_started = time.perf_counter()
    replies = runtime.handle(batch, progress=kill_in_the_first_call)
    assert killed and [r.status for r in replies] == [200, 200, 200]
    assert sorted(heard) == [0, 2]
    for index, events in heard.items():
        for since_handle, elapsed in events:
            assert since_handle - 0.25 <= elapsed <= since_handle, (index, events)


def test_a_poison_request_fails_alone_and_its_companions_get_their_images(runtime):
    # Each companion as its own request: what its seed makes alone.
    alone = [runtime.handle([Incoming(body(seed=seed))])[0] for seed in (5, 6)]
    started = runtime.engines_started
    items = [Incoming(body(seed=5), "first"),
             Incoming(body(prompt=POISON, seed=9), "poison"),
             Incoming(body(seed=6), "third")]
    replies = runtime.handle(items)
    assert [r.status for r in replies] == [200, 500, 200]
    error = replies[1].json()
    assert error["type"] == "EngineCrashed" and error["request_id"] == "poison"
    assert "not run again" in error["message"]
    assert POISON not in replies[1].body.decode()  # no prompt text in an error
    # The batch died twice, then each request ran alone: the poison one killed a third
    # engine process, the companions got the images their seeds make alone, byte for byte.
    assert runtime.engines_started == started + 3
    assert images(replies[0]) == images(alone[0]) and images(replies[2]) == images(alone[1])
    # And the worker goes on serving.
    [after] = runtime.handle([Incoming(body(seed=7))])
    assert after.status == 200


def test_a_poison_request_alone_is_run_twice_then_refused(runtime, caplog):
    started = runtime.engines_started
    with caplog.at_level(logging.WARNING, logger="sdxl_serve.recycling"):
        [reply] = runtime.handle([Incoming(body(prompt=POISON), "again")])
    assert reply.status == 500 and reply.json()["type"] == "EngineCrashed"
    assert "2 times" in reply.json()["message"]
    # Each death names the request it ran, as the client's reply does: the worker's lines
    # are found from its id (they said "under 1 request(s)" alone).
    deaths = [record.getMessage() for record in caplog.records
              if " died " in record.getMessage() and " under " in record.getMessage()]
    assert [death.split(" under ", 1)[1] for death in deaths] == [
        "1 request(s) (again); running them again on a fresh engine process",
        "the same 1 request(s) again (again)"], deaths
    # Two engine processes died under it: the one it found and one fresh one. Then the
    # circuit breaker's deep check (is it the engine's fault or the request's?) starts a
    # third, which passes and serves the next batch.
    assert runtime.engines_started == started + 2
    assert runtime.breaker.state == "closed"
    [after] = runtime.handle([Incoming(body(seed=8))])
    assert after.status == 200 and runtime.engines_started == started + 2


def test_a_progress_sink_that_raises_leaves_no_answer_for_the_next_batch(runtime):
    """A stream whose client has gone can make its sink raise (a closed Triton response
    sender, a broken socket). The batch's answer must still be read off the pipe: left
    there, the next batch took it for its own and its client got another client's image."""
    calls = []

    def gone(index: int, event: dict) -> None:
        calls.append(index)
        raise BrokenPipeError("the stream's client has gone")

    first = runtime.handle([Incoming(body(seed=11, stream=True), "streamed"),
                            Incoming(body(seed=12), "companion")], progress=gone)
    assert [r.headers["X-Request-Id"] for r in first] == ["streamed", "companion"]
    assert [r.status for r in first] == [200, 200], [r.body[:200] for r in first]
    assert calls == [0]  # a sink that raised is not called again for that request
    [second] = runtime.handle([Incoming(body(seed=13), "next")])
    assert second.status == 200 and second.headers["X-Request-Id"] == "next"
    assert second.json()["seed"] == 13


def test_a_replacement_that_dies_in_warm_up_does_not_make_its_batch_poison(runtime):
    """The engine dies under a batch, and so does every fresh one while warming up (here its
    warm-up prompt crashes it, as a load that the kernel's OOM killer ends would): the
    requests never ran again, so they must not be called poison requests that kill engines
    ("died each of the 3 times it ran this request")."""
    spec = runtime.spec
    runtime.spec = dataclasses.replace(spec, config={**spec.config,
                                                     "fault_crash_prompt": "warm-up"})
    killed = []

    def kill_on_first_step(index: int, event: dict) -> None:
        if not killed:
            killed.append(runtime.engine.pid)
            os.kill(killed[0], signal.SIGKILL)

    try:
        replies = runtime.handle([Incoming(body(seed=21, stream=True), "s"),
                                  Incoming(body(seed=22), "t")], progress=kill_on_first_step)
    finally:
        runtime.spec = spec
    assert killed
    assert [r.status for r in replies] == [500, 500]
    for reply in replies:
        assert reply.json()["type"] != "EngineCrashed", reply.body
    [served] = runtime.handle([Incoming(body(seed=23), "u")])  # a good engine again
    assert served.status == 200


def test_a_batch_whose_engine_cannot_start_logs_its_failure_once(runtime, caplog):
    """Each request of the batch gets its own typed 500, as before, and the traceback is in
    the log once, naming every request: it was there once per request (4 times for this
    batch of 4), under Triton and TorchServe alike."""
    spec = runtime.spec
    runtime.spec = dataclasses.replace(spec, config={**spec.config,
                                                     "fault_crash_prompt": "warm-up"})
    runtime._replace_engine = True  # the next batch starts a fresh engine process
    ids = ["w", "x", "y", "z"]
    try:
        with caplog.at_level(logging.ERROR, logger="sdxl_serve.service"):
            replies = runtime.handle([Incoming(body(seed=31 + n), request_id)
                                      for n, request_id in enumerate(ids)])
    finally:
        runtime.spec = spec
    for request_id, reply in zip(ids, replies, strict=True):
        assert reply.status == 500, reply.body[:300]
        assert reply.json() == {
            "code": 500, "type": "InternalServerError", "request_id": request_id,
            "message": f"generation failed; quote request id {request_id} when reporting it"}
    tracebacks = [record.getMessage() for record in caplog.records
                  if record.name == "sdxl_serve.service" and record.exc_info]
    assert len(tracebacks) == 1, tracebacks
    assert tracebacks[0].startswith("4 requests (w, x, y, z) failed: "), tracebacks
    [served] = runtime.handle([Incoming(body(seed=35), "v")])  # a good engine again
    assert served.status == 200


def test_requests_run_one_by_one_stop_at_the_first_engine_that_cannot_start(runtime, caplog):
    """The engine dies twice under a batch, so its requests are to run one by one; but no
    fresh engine process can start now (its warm-up crashes, as a GPU that faults would
    make it). The first failed start answers them all, logged once: each request tried a
    start of its own, which with starts that hang was engine_start_s (10 minutes) each,
    past TorchServe's response timeout for the batch."""
    spec = runtime.spec
    killed = []

    def kill_twice(index: int, event: dict) -> None:
        pid = runtime.engine.pid
        if len(killed) < 2 and pid not in killed:
            killed.append(pid)
            if len(killed) == 2:  # from now on no engine process gets through its warm-up
                runtime.spec = dataclasses.replace(spec, config={
                    **spec.config, "fault_crash_prompt": "warm-up"})
            os.kill(pid, signal.SIGKILL)

    ids = ["p", "q", "r"]
    try:
        with caplog.at_level(logging.ERROR, logger="sdxl_serve.service"):
            replies = runtime.handle([Incoming(body(seed=41, stream=True), "p"),
                                      Incoming(body(seed=42), "q"),
                                      Incoming(body(seed=43), "r")], progress=kill_twice)
    finally:
        runtime.spec = spec
    assert len(killed) == 2
    for request_id, reply in zip(ids, replies, strict=True):
        assert reply.status == 500, reply.body[:300]
        assert reply.json()["type"] != "EngineCrashed", reply.body  # they never ran alone
    tracebacks = [record.getMessage() for record in caplog.records
                  if record.name == "sdxl_serve.service" and record.exc_info]
    assert len(tracebacks) == 1, tracebacks  # one start tried, where each request tried one
    assert tracebacks[0].startswith("3 requests (p, q, r) failed: "), tracebacks
    [served] = runtime.handle([Incoming(body(seed=44), "s")])  # a good engine again
    assert served.status == 200


def test_an_engine_killed_between_batches_is_replaced_with_a_warning(runtime, caplog):
    """An idle engine process killed (the kernel's OOM killer, an operator) is replaced at
    the next upkeep or batch, and the model log says so at WARN with its exit code: it said
    so at INFO only, unseen by a log pipeline that alerts on WARN, where a death under a
    batch was a WARN line."""
    [served] = runtime.handle([Incoming(body(seed=41), "k")])  # an engine up and idle
    killed = pid_of(served)
    os.kill(killed, signal.SIGKILL)
    # Until the service sees it dead: the fork server reaps it, then tells its exit code,
    # and a pid already gone (psutil's wait) read alive in between, about once in 100 on a
    # loaded machine; the upkeep then had nothing to replace.
    wait_until(lambda: not runtime.engine.alive(), 30, "the service to see its engine dead")
    with caplog.at_level(logging.INFO, logger="sdxl_serve.recycling"):
        runtime.upkeep()
    replaced = [record for record in caplog.records
                if record.getMessage().startswith(f"replaced engine process {killed} by ")]
    assert [(record.levelname, record.getMessage().split(" because ")[1])
            for record in replaced] == [("WARNING", "it died (exit code -9)")], caplog.text
    assert runtime.engine.pid != killed and runtime.engine.alive()


def engine_pids() -> set[int]:
    """Live engine processes of this test process (children of multiprocessing's fork
    server, so at any depth)."""
    return {child.pid for child in psutil.Process().children(recursive=True)
            if child.is_running() and child.status() != psutil.STATUS_ZOMBIE
            and "forkserver" not in " ".join(child.cmdline())}


def test_a_replacement_that_hangs_in_warm_up_is_ended_at_engine_start_s(runtime, caplog):
    """A replacement engine whose load or warm-up hangs (a stuck driver call, a dead network
    file system) was waited for without end, the worker's lock held: under Triton for good,
    under TorchServe until responseTimeout killed the whole worker. Now it is ended after
    ``engine_start_s``, the batch answered 500, and the next start serves."""
    spec, settings = runtime.spec, runtime.settings
    before = engine_pids()
    runtime.spec = dataclasses.replace(spec, config={**spec.config,
                                                     "fault_hang_prompt": "warm-up"})
    runtime.settings = dataclasses.replace(settings, engine_start_s=5.0)
    runtime._replace_engine = True  # the next batch starts a fresh engine process
    started = time.monotonic()
    try:
        [reply] = runtime.handle([Incoming(body(seed=24), "h")])
    finally:
        runtime.spec, runtime.settings = spec, settings
    waited = time.monotonic() - started
    assert reply.status == 500, reply.body[:300]
    assert "quote request id h" in reply.json()["message"]  # the why is for the log only
    assert "did not load and warm up the model within 5 s (engine_start_s)" in caplog.text
    # The start, then the deep check's own start after the failure: 5 s each, plus loads.
    assert 10 <= waited < 60, waited
    assert runtime.engine is None or not runtime.engine.alive() or \
        runtime.engine.pid in before
    assert engine_pids() <= before, "a hung engine process was left running"
    [served] = runtime.handle([Incoming(body(seed=25), "i")])  # starts one that loads
    assert served.status == 200, served.body[:300]


def test_the_rerun_after_a_crash_keeps_to_the_fresh_engines_budget(tiny_model_dir):
    """Budgets are hard limits, drawn anew (up to ``recycle_jitter`` lower) for each engine
    process. A batch of 4 on an engine with 4 left whose replacement draws 2: the rerun
    gives that one 2 and the next one the other 2 (before, it served all 4)."""
    config = {"device": "cpu", "warmup_steps": 1, "health_interval_s": 3600,
              "max_requests_per_worker": 4, "recycle_jitter": 0.5}
    settings = Settings.from_mapping(config, env={})

    def budgets(seed: int) -> list[int]:
        rng = random.Random(seed)
        return [WorkerBudget.draw(settings, rng, 0.0).max_requests for _ in range(3)]

    seed = next(s for s in range(10_000) if budgets(s)[:2] == [4, 2])
    service = RecyclingService(EngineSpec(str(tiny_model_dir), config, None, "1.0"),
                               settings, rng=random.Random(seed))
    service.start()
    try:
        killed = []

        def kill_on_first_step(index: int, event: dict) -> None:
            if not killed:
                killed.append(service.engine.pid)
                os.kill(killed[0], signal.SIGKILL)

        replies = service.handle([Incoming(body(seed=31, stream=True), "s")] +
                                 [Incoming(body(seed=32 + i), f"r{i}") for i in range(3)],
                                 progress=kill_on_first_step)
        assert killed and [r.status for r in replies] == [200] * 4
        assert [r.headers["X-Request-Id"] for r in replies] == ["s", "r0", "r1", "r2"]
        pids = [pid_of(r) for r in replies]
        assert killed[0] not in pids
        assert pids[0] == pids[1] != pids[2] == pids[3]  # two engines, two requests each
        assert service.engines_started == 3
    finally:
        service.close()


def test_a_hung_engine_is_ended_at_its_stall_deadline_and_the_next_batch_served(
        tiny_model_dir, caplog):
    """An engine that stops between two steps (SIGSTOP) used to hold its batch until
    TorchServe's responseTimeout (300 s) killed the worker. Now the batch is answered 500
    EngineStalled after ``engine_stall_s``, and a fresh engine serves the next batch."""
    stall_s = 5.0
    config = {"device": "cpu", "warmup_steps": 1, "health_interval_s": 3600,
              "engine_stall_s": stall_s}
    service = RecyclingService(EngineSpec(str(tiny_model_dir), config, None, "1.0"),
                               Settings.from_mapping(config, env={}))
    service.start()
    stopped, stopped_at = [], []
    try:
        def stop_on_first_step(index: int, event: dict) -> None:
            if not stopped:
                stopped.append(service.engine.pid)
                os.kill(stopped[0], signal.SIGSTOP)
                stopped_at.append(time.monotonic())

        replies = service.handle([Incoming(body(seed=31, stream=True), "s"),
                                  Incoming(body(seed=32), "t")], progress=stop_on_first_step)
        answered = time.monotonic()
        assert stopped and not process_running(stopped[0])
        waited = answered - stopped_at[0]
        assert [r.status for r in replies] == [500, 500], [r.body[:200] for r in replies]
        for reply in replies:
            assert reply.json()["type"] == "EngineStalled", reply.body
            assert "5 s" in reply.json()["message"]
        # From the stop: the deadline, then the deep check after it on a fresh engine
        # process, bounded by what its start and generation took in this run. A fixed 20 s
        # past the deadline, counted from before the batch's first step, was outrun on a
        # loaded machine (27.5 s in all, one run in five).
        started_again, checked = service.engine.info["ready_s"], service.health_result.seconds
        assert stall_s <= waited < stall_s + started_again + checked + 10, \
            (waited, started_again, checked)
        [served] = service.handle([Incoming(body(seed=33), "u")])
        assert served.status == 200 and pid_of(served) != stopped[0]
        # Its replacement says why: this worker ended it (it said "it died (exit code -9)").
        assert f"replaced engine process {stopped[0]} by {pid_of(served)} because it hung " \
            f"and was ended" in caplog.text, caplog.text
        # A batch that takes longer than the deadline, but steps, is no stall (one 100-step
        # call of 4 images: about 20 s on a 2-core machine, so that a machine twice as fast
        # still takes twice the deadline).
        started = time.monotonic()
        slow = service.handle([Incoming(body(seed=seed, num_inference_steps=100), str(seed))
                               for seed in range(40, 44)])
        assert [r.status for r in slow] == [200] * 4, [r.body[:200] for r in slow]
        took = time.monotonic() - started
        assert took > stall_s, f"{took:.1f} s: too fast to show the heartbeat"
    finally:
        for pid in stopped:
            if process_running(pid):
                os.kill(pid, signal.SIGKILL)
        service.close()


@contextlib.contextmanager
def freezer_group(name: str):
    """A cgroup v1 freezer group. A process frozen in it sleeps in the kernel (state D) and
    outlives SIGKILL until thawed, as one stuck in a GPU driver call does; thawed, it ends
    of the pending kill. Skips where the freezer is not there or not writable (not root)."""
    group = Path("/sys/fs/cgroup/freezer") / name
    try:
        group.mkdir()
    except OSError as exc:
        pytest.skip(f"needs cgroup v1's freezer, writable (root), to hold a process through "
                    f"SIGKILL: {exc}")
    try:
        yield group
    finally:
        (group / "freezer.state").write_text("THAWED")
        wait_until(lambda: not (group / "cgroup.procs").read_text().split(), 30,
                   "the frozen processes ended once thawed")
        group.rmdir()


def test_an_engine_that_sigkill_does_not_end_is_waited_for_once(tiny_model_dir, caplog):
    """An engine stuck in the kernel (frozen by the cgroup freezer, in state D, as a driver
    call can leave a process on a GPU in trouble) hangs and survives its SIGKILL. The worker
    waits ``KILL_WAIT_S`` for it once and goes on: its replacement used to send it "stop",
    wait 30 s for an answer it could not read, kill it again and wait 30 s more, a minute
    before the batch's 500 and the next engine; and its log gave the engine's age as why."""
    stall_s = 5.0
    config = {"device": "cpu", "warmup_steps": 1, "health_interval_s": 3600,
              "engine_stall_s": stall_s}
    with freezer_group(f"sdxl-test-{os.getpid()}") as group:
        service = RecyclingService(EngineSpec(str(tiny_model_dir), config, None, "1.0"),
                                   Settings.from_mapping(config, env={}))
        service.start()
        frozen, frozen_at = [], []
        try:
            def freeze_on_first_step(index: int, event: dict) -> None:
                if not frozen:
                    frozen.append(service.engine.pid)
                    (group / "cgroup.procs").write_text(str(frozen[0]))
                    (group / "freezer.state").write_text("FROZEN")
                    frozen_at.append(time.monotonic())

            [reply] = service.handle([Incoming(body(seed=51, stream=True), "s")],
                                     progress=freeze_on_first_step)
            waited = time.monotonic() - frozen_at[0]
            assert reply.status == 500 and reply.json()["type"] == "EngineStalled", reply.body
            assert process_running(frozen[0]), "SIGKILL ended it: the freezer held nothing"
            started_again = service.engine.info["ready_s"]
            checked = service.health_result.seconds
            # Before: stall_s + KILL_WAIT_S + 60 s + the start and check.
            assert waited < stall_s + KILL_WAIT_S + started_again + checked + 20, \
                (waited, started_again, checked)
            assert f"replaced engine process {frozen[0]} by {service.engine.pid} because it " \
                f"hung and was ended" in caplog.text, caplog.text
            [served] = service.handle([Incoming(body(seed=52), "u")])
            assert served.status == 200 and pid_of(served) != frozen[0]
        finally:
            service.close()


@contextlib.contextmanager
def first_profile_writer_stopped(directory: Path, killed_after_s: float | None = None):
    """SIGSTOP the first engine process seen writing a profile in ``directory`` (a write
    stuck on a disk), found by its ``.writing-<host>-<pid>-`` folder, and SIGKILL it
    ``killed_after_s`` later if given (the OOM killer in the write); yields a list that
    gets (its pid, whether its write was still under way once stopped)."""
    stopped: list[tuple[int, bool]] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            for folder in directory.glob(f"{WRITING_PREFIX}*"):
                pid = int(folder.name[len(WRITING_PREFIX):].split("-")[1])
                os.kill(pid, signal.SIGSTOP)
                stopped.append((pid, folder.exists()))
                if killed_after_s is not None:
                    threading.Timer(killed_after_s, os.kill, (pid, signal.SIGKILL)).start()
                return
            time.sleep(0.005)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield stopped
    finally:
        done.set()
        watcher.join()
        for pid, _ in stopped:
            if process_running(pid):
                os.kill(pid, signal.SIGKILL)


def profiled_runtime(tiny_model_dir, profile_dir: Path, **config) -> RecyclingService:
    """A service that profiles every pipeline call, with the shortest stall deadline."""
    config = {"device": "cpu", "warmup_steps": 1, "health_interval_s": 3600,
              "engine_stall_s": 5, "profile_every_n_requests": 1,
              "profile_dir": str(profile_dir), **config}
    return RecyclingService(EngineSpec(str(tiny_model_dir), config, None, "1.0"),
                            Settings.from_mapping(config, env={}))


def test_a_batch_sent_while_a_profile_write_hangs_runs_on_a_fresh_engine(tiny_model_dir,
                                                                         tmp_path, caplog):
    """The engine writes a profile after its batch's answer, and a batch sent meanwhile
    waits. Should the write hang without using the CPU (a stuck disk), that batch was
    answered 500 EngineStalled, "not run again", though the engine had never taken it: now
    it runs on a fresh engine process."""
    service = profiled_runtime(tiny_model_dir, tmp_path)
    service.start()
    try:
        with first_profile_writer_stopped(tmp_path) as stopped:
            [first] = service.handle([Incoming(body(seed=51, num_inference_steps=16), "p")])
            assert first.status == 200, first.body[:300]
            wait_until(lambda: stopped, 60, "the profile's write to begin")
            assert stopped == [(pid_of(first), True)]  # stopped in the middle of its write
            with caplog.at_level(logging.WARNING, logger="sdxl_serve.recycling"):
                [reply] = service.handle([Incoming(body(seed=52), "w")])
            assert reply.status == 200, reply.body[:300]
            assert pid_of(reply) != pid_of(first)
            assert not process_running(pid_of(first))
        assert f"engine process {pid_of(first)} hung writing a profile before it took " \
               "1 request(s) (w); running them on a fresh engine process" in caplog.text
    finally:
        service.close()


def test_a_batch_whose_own_profile_stop_hangs_is_not_run_again(tiny_model_dir, tmp_path):
    """The profiler's stop runs in the batch (its pipeline call has run): a batch whose
    engine hangs there started, and is answered EngineStalled as before, not run again."""
    service = profiled_runtime(tiny_model_dir, tmp_path, fault_busy_hold_s=3)
    service.start()
    stopped = []

    def stop_in_the_profilers_stop(index: int, event: dict) -> None:
        if event["step"] == event["total"] and not stopped:
            stopped.append(service.engine.pid)  # 1 s into the stop's hold of 3 s
            threading.Timer(1.0, os.kill, (stopped[0], signal.SIGSTOP)).start()

    try:
        [reply] = service.handle([Incoming(body(seed=53, stream=True), "s")],
                                 progress=stop_in_the_profilers_stop)
        assert stopped and not process_running(stopped[0])
        assert reply.status == 500 and reply.json()["type"] == "EngineStalled", reply.body
    finally:
        for pid in stopped:
            if process_running(pid):
                os.kill(pid, signal.SIGKILL)
        service.close()


@pytest.mark.parametrize("killed_after_s", [None, 2.0], ids=["hangs", "dies"])
def test_a_request_run_alone_while_a_profile_write_hangs_or_dies_runs_on_a_fresh_engine(
        tiny_model_dir, tmp_path, killed_after_s):
    """After two deaths each request runs alone; the first one's profile write hangs (or
    its engine dies there, 2 s in: the second request was sent meanwhile), so the second
    never ran: it runs on a fresh engine process (before: 500 EngineStalled, or 500
    EngineCrashed "3 times" for the engine that died), and the poison request after it is
    still refused after its own death."""
    service = profiled_runtime(tiny_model_dir, tmp_path, fault_crash_prompt=POISON)
    service.start()
    try:
        with first_profile_writer_stopped(tmp_path, killed_after_s) as stopped:
            replies = service.handle([Incoming(body(seed=54), "a"),
                                      Incoming(body(seed=55), "b"),
                                      Incoming(body(prompt=POISON, seed=56), "p")])
        assert [pid for pid, _ in stopped] == [pid_of(replies[0])]
        assert stopped[0][1], "the write ended before its engine was stopped"
        assert [r.status for r in replies] == [200, 200, 500], [r.body[:200] for r in replies]
        assert pid_of(replies[1]) != pid_of(replies[0])
        assert replies[2].json()["type"] == "EngineCrashed"
        assert "3 times" in replies[2].json()["message"]
    finally:
        service.close()


def test_an_engine_that_dies_writing_a_profile_is_no_run_of_the_batch_sent_meanwhile(
        tiny_model_dir, tmp_path, caplog):
    """An engine process that dies in the previous batch's profile write (the OOM killer
    in a trace export) never took the batch sent meanwhile. Its death was counted as one of
    that batch's: a poison request sent then was refused, "died each of the 2 times it ran
    this request", having run once (a reviewer's finding). Now it runs on a fresh engine
    process as if just sent, and is refused after two deaths of its own."""
    service = profiled_runtime(tiny_model_dir, tmp_path, fault_crash_prompt=POISON)
    service.start()
    try:
        # Killed 2 s after it is stopped, when the worker has long sent it the batch (a
        # few milliseconds after) and waits on it, within the stall limit of 5 s: killed
        # before the batch, it would be found dead and replaced between batches.
        with first_profile_writer_stopped(tmp_path, killed_after_s=2.0) as stopped:
            [first] = service.handle([Incoming(body(seed=57), "w")])
            assert first.status == 200, first.body[:300]
            wait_until(lambda: stopped, 60, "the profile's write to begin")
            writer = pid_of(first)
            assert stopped == [(writer, True)]  # stopped in the middle of its write
            with caplog.at_level(logging.WARNING, logger="sdxl_serve.recycling"):
                [reply] = service.handle([Incoming(body(prompt=POISON, seed=58), "p")])
        assert reply.status == 500 and reply.json()["type"] == "EngineCrashed", reply.body
        assert "2 times" in reply.json()["message"]
        assert f"engine process {writer} died (exit code -9) writing a profile before it " \
               "took 1 request(s) (p); running them on a fresh engine process" in caplog.text
        # The two deaths under it are its own, on fresh engine processes, not the writer's.
        deaths = [record.getMessage() for record in caplog.records
                  if " died " in record.getMessage() and " under " in record.getMessage()]
        assert [death.split(" under ", 1)[1] for death in deaths] == [
            "1 request(s) (p); running them again on a fresh engine process",
            "the same 1 request(s) again (p)"], deaths
        assert not any(f"engine process {writer} " in death for death in deaths), deaths
    finally:
        service.close()


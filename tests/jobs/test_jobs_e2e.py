"""The job API end to end: real Redis, real TorchServe, the API and dispatchers as real
processes, killed for real. Nothing mocked."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import io
import json
import re
import signal
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

import numpy as np
import psutil
import pytest
import redis
from PIL import Image

from sdxl_jobs.processes import RedisServer, free_port
from sdxl_serve.server import CONFIG, Addresses, TorchServeProcess

from archives import patched_archive
from jobstack import Receiver, make_key, start_api, start_dispatcher
from lifetimes import wait_until
from test_api import metrics
from test_eviction import evict

pytestmark = [pytest.mark.jobs, pytest.mark.e2e]

LEASE_S = 3
WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"test-secret-32-bytes-long-enough").decode()
FAST = {"num_inference_steps": 2}
# Long enough to be caught mid-way on a fast machine, short on a loaded one.
SLOW = {"num_inference_steps": 30, "width": 96, "height": 96}


@pytest.fixture(scope="module")
def receivers():
    hook, elsewhere = Receiver(), Receiver()
    yield hook, elsewhere
    hook.close()
    elsewhere.close()


@pytest.fixture(scope="module")
def stack(redis_server, model_store, tmp_path_factory, receivers):
    """Redis, a TorchServe whose engine is replaced every 40 requests, whose pipeline
    fails on the prompt "poison" and whose engine process is killed by the prompt
    "crasher", and the API; dispatchers are started by each test."""
    logs = tmp_path_factory.mktemp("jobs-logs")
    # The directory TorchServe's worker watches for cancel flags, as the pod's shared volume.
    cancel_dir = tmp_path_factory.mktemp("cancel")
    server = TorchServeProcess(tmp_path_factory.mktemp("ts-run"), model_store,
                               {"sdxl": "sdxl-1.0.mar"}, Addresses.free(),
                               env={"SDXL_MAX_REQUESTS_PER_WORKER": "40",
                                    "SDXL_FAULT_ERROR_PROMPT": "poison",
                                    "SDXL_FAULT_CRASH_PROMPT": "crasher",
                                    "SDXL_CANCEL_DIR": str(cancel_dir)})
    env = {"SDXL_JOBS_LEASE_S": str(LEASE_S), "SDXL_JOBS_RESULT_TTL_S": "600",
           "SDXL_JOBS_CANCEL_DIR": str(cancel_dir),
           "SDXL_JOBS_WEBHOOK_ALLOW": f"127.0.0.1:{receivers[0].port}",
           "SDXL_JOBS_WEBHOOK_SECRET": WEBHOOK_SECRET, "SDXL_JOBS_RATE_PER_MINUTE": "1000",
           "SDXL_JOBS_MAX_ACTIVE_PER_KEY": "300"}
    api = None
    try:
        server.start()
        server.wait_ready("sdxl", timeout=240)
        api = start_api(redis_server.url, logs, env)
        yield {"server": server, "api": api, "redis": redis_server, "logs": logs, "env": env,
               "key": make_key(redis_server.url, "e2e"), "cancel_dir": cancel_dir}
    finally:
        if api is not None:
            api.process.stop()
        server.stop()


class Dispatchers:
    """Dispatchers started by one test, always stopped after it."""

    def __init__(self, stack):
        self.stack = stack
        self.running: list = []

    def start(self, name: str, *extra: str, wait: bool = True, server=None):
        """Start one (for the stack's TorchServe unless ``server``); by default wait until
        it has published the model and checked in."""
        started = time.time()
        process = start_dispatcher(self.stack["redis"].url, server or self.stack["server"],
                                   self.stack["logs"], name, self.stack["env"], extra)
        self.running.append(process)
        if wait:
            client = redis.Redis.from_url(self.stack["redis"].url)
            try:
                wait_until(lambda: (client.zscore("sdxl:dispatchers", name) or 0) > started
                           and client.exists("sdxl:model"), 120,
                           f"dispatcher {name} to check in and publish the model's bounds")
            finally:
                client.close()
        return process

    def stop(self):
        for process in self.running:
            process.stop()


@pytest.fixture
def dispatchers(stack):
    started = Dispatchers(stack)
    yield started
    started.stop()


def logged(process, text: str) -> bool:
    """Whether a dispatcher (or any Managed process) has written ``text`` to its log."""
    return text in process.log_path.read_text(errors="replace")


def job_state(stack, job_id: str) -> dict:
    return stack["api"].json("GET", f"/v1/jobs/{job_id}", stack["key"])[2]


def slow_job_under_way(stack, prompt: str, seed: int, slow: dict = SLOW) -> dict:
    """Submit a slow job and return it once its generation has made a step."""
    status, _, job = stack["api"].json("POST", "/v1/jobs", stack["key"],
                                       {"prompt": prompt, "seed": seed, **slow})
    assert status == 202, (status, job)
    wait_until(lambda: job_state(stack, job["id"])["progress"]["step"] >= 1, 180,
               "the job to make progress")
    return job


def wait_final(stack, job_id: str, timeout: float = 300) -> dict:
    def final():
        job = job_state(stack, job_id)
        return job if job["status"] in ("succeeded", "failed", "canceled") else None

    return wait_until(final, timeout, f"job {job_id} to end")


def predictions(stack, request: dict) -> bytes:
    server = stack["server"]
    status, _, body = server.key_file().call(
        "POST", f"{server.addresses.inference}/predictions/sdxl", "inference",
        json.dumps(request).encode(), timeout=300)
    assert status == 200, body
    return base64.b64decode(json.loads(body)["image"])


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def sse_events(stack, job_id: str, last_event_id: str | None = None) -> list[dict]:
    request = urllib.request.Request(stack["api"].address + f"/v1/jobs/{job_id}/events",
                                     headers={"Authorization": f"Bearer {stack['key']}"})
    if last_event_id:
        request.add_header("Last-Event-ID", last_event_id)
    events, current = [], {}
    with urllib.request.urlopen(request, timeout=120) as response:
        for raw in response:
            line = raw.decode().rstrip("\n")
            if not line:
                if "data" in current:
                    events.append(current)
                current = {}
            elif not line.startswith(":"):
                name, _, value = line.partition(": ")
                current[name] = json.loads(value) if name == "data" else value
    return events


def test_a_job_runs_streams_progress_and_matches_predictions(stack, dispatchers):
    """Submit with Prefer: wait, fetch the image: the image /predictions gives for the same
    seed; the events replay in order and resume after Last-Event-ID."""
    dispatchers.start("d-basic")
    api, key = stack["api"], stack["key"]
    assert api.json("GET", "/v1/health")[0] == 200
    status, headers, job = api.json("POST", "/v1/jobs", key,
                                    {"prompt": "a lighthouse", "seed": 11, **FAST,
                                     "num_images": 2}, headers={"Prefer": "wait=60"})
    assert status == 200 and job["status"] == "succeeded", job
    # The served model's bounds reached the API: its native size is the default.
    assert job["request"]["width"] == 64 and job["result"]["width"] == 64
    assert job["seeds"] == [11, 12] and len(job["images"]) == 2
    assert job["attempts"] == 1 and job["timings"]["run_s"] > 0
    # The job is followed into TorchServe's log by the request id of the run that made it.
    ts_log = stack["server"].run_dir / "logs" / "ts_log.log"
    assert f"Sending response for jobId {job['result']['request_id']}" in \
        ts_log.read_text(errors="replace"), job["result"]
    status, headers, data = api.call("GET", job["images"][1], key)
    assert status == 200 and headers["content-type"] == "image/png"
    assert headers["x-seed"] == "12"
    # The second image of a two-image call, against seed 12 alone: the same image within
    # the rounding a batched call allows (docs/api.md, "What a seed guarantees").
    alone = predictions(stack, {**job["request"], "seed": 12, "num_images": 1})
    difference = np.abs(pixels(data) - pixels(alone))
    assert difference.max() <= 2 and difference.mean() < 0.1
    events = sse_events(stack, job["id"])
    kinds = [(e["event"], e["data"].get("status") or e["data"].get("step")) for e in events]
    assert kinds[0] == ("status", "queued") and kinds[1] == ("status", "running")
    assert [k for k in kinds if k[0] == "progress"] == [("progress", 1), ("progress", 2)]
    assert kinds[-1] == ("status", "succeeded")
    assert events[-1]["data"]["job"]["images"] == job["images"]
    resumed = sse_events(stack, job["id"], last_event_id=events[1]["id"])
    assert [e["id"] for e in resumed] == [e["id"] for e in events[2:]]
    # A finished job cannot be canceled.
    assert api.json("DELETE", f"/v1/jobs/{job['id']}", key)[0] == 409


def test_the_model_bounds_come_back_after_redis_lost_its_data(stack, tmp_path):
    """Redis restarted without its data (or flushed): the dispatchers published the served
    model's bounds only when they started, so the API validated against SDXL's defaults
    (refusing the tiny model's native 64 px) until one restarted. The running dispatcher
    now puts them back."""
    own = RedisServer(tmp_path / "redis")  # of its own: this test empties it
    own.start()
    client = redis.Redis.from_url(own.url)
    dispatcher = api = None
    try:
        dispatcher = start_dispatcher(own.url, stack["server"], tmp_path, "d-bounds",
                                      stack["env"])
        api = start_api(own.url, tmp_path, stack["env"])
        wait_until(lambda: client.get("sdxl:model"), 120, "the model's bounds published")
        published = client.get("sdxl:model")
        assert json.loads(published)["limits"]["default_size"] == 64
        client.flushall()
        wait_until(lambda: client.get("sdxl:model"), 30, "the bounds published again")
        assert client.get("sdxl:model") == published
        key = make_key(own.url, "after-flush")  # the keys went with the data
        status, _, job = api.json("POST", "/v1/jobs", key, {"prompt": "x", "width": 64,
                                                            "height": 64, **FAST})
        assert status == 202, job
        wait_until(lambda: logged(dispatcher, "published again"), 10, "the republish logged")
        api.call("DELETE", f"/v1/jobs/{job['id']}", key)  # nothing more to run
    finally:
        client.close()
        for process in (api.process if api else None, dispatcher):
            if process is not None:
                process.stop()
        own.stop()


def test_a_dispatcher_removes_the_consumers_of_dispatchers_gone(stack, tmp_path):
    """Each dispatcher that ever took a job stayed a consumer of the stream's group for good
    (a new name with every restart: XINFO CONSUMERS grew without end). A live one removes
    those that own nothing and have been idle past SDXL_JOBS_CONSUMER_IDLE_S."""
    own = RedisServer(tmp_path / "redis")
    own.start()
    client = redis.Redis.from_url(own.url)
    dispatcher = None

    def consumers() -> set[str]:
        return {c["name"].decode() for c in client.xinfo_consumers("sdxl:stream",
                                                                    "dispatchers")}
    try:
        # What a dispatcher killed after its job leaves: a consumer that owns nothing.
        client.xgroup_create("sdxl:stream", "dispatchers", id="0", mkstream=True)
        client.xadd("sdxl:stream", {"id": "0" * 32})
        [[_, [(entry, _)]]] = client.xreadgroup("dispatchers", "gone-1",
                                                 {"sdxl:stream": ">"}, count=1)
        client.xack("sdxl:stream", "dispatchers", entry)
        assert consumers() == {"gone-1"}
        dispatcher = start_dispatcher(own.url, stack["server"], tmp_path, "d-prune",
                                      {**stack["env"], "SDXL_JOBS_CONSUMER_IDLE_S": "1"})
        wait_until(lambda: "gone-1" not in consumers(), 60,
                   "the gone dispatcher's consumer removed")
        # The dispatcher logs the removal after Redis answers the script, so the line can
        # trail the removal seen here by a moment on a busy machine.
        wait_until(lambda: logged(dispatcher, "gone-1"), 10, "the removal logged")
        assert dispatcher.running()
    finally:
        client.close()
        if dispatcher is not None:
            dispatcher.stop()
        own.stop()


def answered(server) -> dict[str, float]:
    """{outcome: generation requests} TorchServe's worker has answered (our counter)."""
    with urllib.request.urlopen(f"{server.addresses.metrics}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    counts = dict.fromkeys(("ok", "bad_request", "oom", "error"), 0.0)
    for line in text.splitlines():
        if line.startswith("sdxl_requests_total{"):
            outcome = line.split('outcome="', 1)[1].split('"', 1)[0]
            counts[outcome] = counts.get(outcome, 0.0) + float(line.rsplit(" ", 1)[1])
    return counts


def test_cancel_a_running_job_stores_nothing_and_stops_its_generation(stack, dispatchers):
    dispatcher = dispatchers.start("d-cancel")
    api, key = stack["api"], stack["key"]
    before = answered(stack["server"])
    job = slow_job_under_way(stack, "slow", 1)
    status, _, canceled = api.json("DELETE", f"/v1/jobs/{job['id']}", key)
    assert status == 200 and canceled["status"] == "canceled"
    wait_until(lambda: logged(dispatcher, f"job {job['id']} is no longer ours"), 60,
               "the dispatcher to notice the cancel and drop the job's stream")
    assert job_state(stack, job["id"])["status"] == "canceled"
    assert api.call("GET", f"/v1/jobs/{job['id']}/images/0", key)[0] == 404
    assert "images" not in job_state(stack, job["id"])
    # The worker stopped the generation between two steps (our 499, counted as a 4xx): it
    # did not run the other steps of 30 for nobody (before, it answered 200 at the end).
    wait_until(lambda: answered(stack["server"])["bad_request"] > before["bad_request"], 60,
               "the worker to answer the canceled generation",
               detail=lambda: (before, answered(stack["server"])))
    assert answered(stack["server"])["ok"] == before["ok"]
    # Its flag is removed with the batch (the worker's probe file stays: below; the
    # dispatcher's marker of the call goes with the call).
    wait_until(lambda: not [flag for flag in stack["cancel_dir"].iterdir()
                            if not flag.name.startswith(".worker-")], 10,
               "the cancel flag removed")
    assert not logged(dispatcher, "cancel directory")


def test_a_job_canceled_while_queued_in_torchserve_is_flagged_at_once(stack, dispatchers):
    """A job waiting in TorchServe's queue behind a batch relays no progress, where the
    dispatcher sees a cancel, so its flag waited for the claim's next renewal (lease_s / 3:
    20 s here) and its batch could start it meanwhile. The dispatcher now looks every
    second."""
    start_with_lease(stack, dispatchers, "d-cancel-queued", 60)
    api, key, flags = stack["api"], stack["key"], stack["cancel_dir"]
    before = answered(stack["server"])
    _, _, long = api.json("POST", "/v1/jobs", key, {"prompt": "long", "seed": 3,
                                                    "num_inference_steps": 100})
    wait_until(lambda: job_state(stack, long["id"])["progress"]["step"] >= 1, 180,
               "the long job to make progress")
    _, _, queued = api.json("POST", "/v1/jobs", key, {"prompt": "queued", **FAST})
    # Started by the dispatcher, so waiting in TorchServe's queue for the long batch.
    wait_until(lambda: job_state(stack, queued["id"])["status"] == "running", 30,
               "the second job to be started")
    assert job_state(stack, long["id"])["status"] == "running"
    existing = {flag.name for flag in flags.iterdir()}
    canceled_at = time.monotonic()
    assert api.json("DELETE", f"/v1/jobs/{queued['id']}", key)[0] == 200
    wait_until(lambda: {flag.name for flag in flags.iterdir()} - existing, 20,
               "the canceled job's flag")
    flagged_s = time.monotonic() - canceled_at
    long_job = job_state(stack, long["id"])
    # Under 6 s: a look every second, with room for a loaded machine; the renewal took 20.
    assert flagged_s < 6.0 and long_job["status"] == "running", (flagged_s, long_job)
    # The queued job's batch is answered 499 when it starts, never generated (ok unchanged).
    api.json("DELETE", f"/v1/jobs/{long['id']}", key)
    wait_until(lambda: answered(stack["server"])["bad_request"] >= before["bad_request"] + 2,
               120, "the worker to answer both canceled jobs",
               detail=lambda: (before, answered(stack["server"])))
    assert answered(stack["server"])["ok"] == before["ok"]


def start_with_lease(stack, dispatchers, name: str, lease_s: float) -> None:
    """A dispatcher with a lease of its own (the stack's is 3 s, so that takeovers are
    quick): where a test must tell the dispatcher's own retry from another's takeover."""
    stack_env = stack["env"]
    try:
        stack["env"] = {**stack_env, "SDXL_JOBS_LEASE_S": str(lease_s)}
        dispatchers.start(name)
    finally:
        stack["env"] = stack_env


@pytest.fixture
def own_redis(stack, tmp_path, request):
    """(Redis, dispatcher, API, API key) on a Redis of the test's own, which it may stop or
    fill; the dispatcher is named after the test. All stopped after it."""
    own = RedisServer(tmp_path / "redis")
    started = [own]
    try:
        own.start()
        started.append(start_dispatcher(own.url, stack["server"], tmp_path,
                                        f"d-{request.node.name[5:45]}", stack["env"]))
        api = start_api(own.url, tmp_path, stack["env"])
        started.append(api.process)
        yield own, started[1], api, make_key(own.url, "own")
    finally:
        for process in reversed(started):
            process.stop()


def own_job_under_way(api, key: str, seed: int) -> dict:
    _, _, job = api.json("POST", "/v1/jobs", key, {"prompt": "slow", "seed": seed, **SLOW})
    wait_until(lambda: (api.json("GET", f"/v1/jobs/{job['id']}", key)[2]["progress"]
                        or {}).get("step", 0) >= 1, 180, "the job to make progress")
    return job


def own_job_final(api, key: str, job_id: str, dispatcher) -> dict:
    def final():
        job = api.json("GET", f"/v1/jobs/{job_id}", key)[2]
        return job if job["status"] in ("succeeded", "failed", "canceled") else None
    return wait_until(final, 180, f"job {job_id} to end", detail=dispatcher.tail)


def status_events(redis_url: str, job_id: str) -> list[dict]:
    client = redis.Redis.from_url(redis_url)
    try:
        events = [json.loads(fields[b"data"]) for _, fields in
                  client.xrange(f"sdxl:events:{job_id}")]
    finally:
        client.close()
    return [event for event in events if event["type"] == "status"]


def statuses(redis_url: str, job_id: str) -> list[str]:
    return [event["status"] for event in status_events(redis_url, job_id)]


def test_redis_lost_mid_job_stops_its_generation_and_costs_no_attempt(stack, own_redis):
    """Redis gone while a job runs: its dispatcher can relay nothing and gives the call up,
    so the worker stops generating for nobody; once Redis is back the dispatcher hands the
    job back to the queue, its start not counted, and it runs again. Before, the job waited
    out its lease and was taken over with its start counted: a Redis restart cost every
    running job an attempt, and max_attempts of them dead-lettered it."""
    own, dispatcher, api, key = own_redis
    before = answered(stack["server"])
    job = own_job_under_way(api, key, 5)
    own.stop()
    wait_until(lambda: answered(stack["server"])["bad_request"] > before["bad_request"],
               60, "the worker to stop the generation",
               detail=lambda: (before, answered(stack["server"]), dispatcher.tail()))
    assert answered(stack["server"])["ok"] == before["ok"]
    time.sleep(LEASE_S)  # an outage longer than the lease: the claim has lapsed
    own.start()  # the same port, password and append-only file
    done = own_job_final(api, key, job["id"], dispatcher)
    assert done["status"] == "succeeded" and done["attempts"] == 1, done
    events = status_events(own.url, job["id"])
    assert [event["status"] for event in events] == \
        ["queued", "running", "queued", "running", "succeeded"]
    # What the client reads names the fault, not Redis's host and port.
    assert re.fullmatch(r"Redis failed the job's writes \(\w*Error\)", events[2]["reason"]), \
        events
    assert logged(dispatcher, f"job {job['id']} handed back to the queue, its start "
                              "not counted")


def test_a_redis_outage_is_logged_once_by_the_dispatcher_with_its_end(own_redis):
    """Redis stopped for 8 s under a dispatcher: its queue read (every second), its check-in
    (every 5 s) and its webhook read each say each reason once, and one line says when
    Redis answers again, with how long it lasted and how many lines were not logged. Each
    said it every time: about 8 `queue unreachable` lines here, thousands in an hour's
    outage, and nothing said when it ended."""
    own, dispatcher, _, _ = own_redis
    client = redis.Redis.from_url(own.url)
    try:
        wait_until(lambda: client.zcard("sdxl:dispatchers") > 0, 120,
                   "the dispatcher to check in", detail=dispatcher.tail)
    finally:
        client.close()
    own.stop()
    time.sleep(8)
    own.start()  # the same port, password and append-only file
    wait_until(lambda: logged(dispatcher, "Redis answers again"), 30,
               "the dispatcher to say Redis answers again", detail=dispatcher.tail)
    time.sleep(1)  # a second such line, if any, would come with the loops' next turns
    said = dispatcher.log_path.read_text()
    # Each line once: the connection closed under a read, then refused, are two.
    faults = [line.split(" WARNING ", 1)[1] for line in said.splitlines()
              if any(fault in line for fault in ("unreachable", "check-in failed",
                                                 "model bounds not published"))]
    assert len(faults) == len(set(faults)), said
    # The model's bounds, published again every 5 s, were an INFO line each time.
    assert "model bounds not published" in "".join(faults), said
    assert "INFO sdxl_jobs.dispatcher: model bounds not published" not in said, said
    assert 1 <= said.count("WARNING sdxl_jobs.dispatcher: queue unreachable") <= 2, said
    [back] = [line for line in said.splitlines() if "Redis answers again" in line]
    assert re.search(r"Redis answers again after (\d+) s \((\d+) line\(s\) of it not "
                     r"logged\)", back), back


def test_a_full_redis_mid_job_holds_the_job_and_costs_no_attempt(stack, own_redis):
    """Redis full (maxmemory, noeviction) while a job runs: its progress is refused, so its
    generation is stopped, and the job stays its dispatcher's (the claim still renewed: no
    takeover) until Redis has room, then goes back to the queue at no attempt's cost and
    runs again. Before, it was taken over once Redis had room, its start counted."""
    own, dispatcher, api, key = own_redis
    client = redis.Redis.from_url(own.url)
    try:
        before = answered(stack["server"])
        job = own_job_under_way(api, key, 6)
        client.config_set("maxmemory", 1)
        wait_until(lambda: answered(stack["server"])["bad_request"] > before["bad_request"],
                   60, "the worker to stop the generation",
                   detail=lambda: (before, answered(stack["server"]), dispatcher.tail()))
        time.sleep(LEASE_S + 1)
        held = api.json("GET", f"/v1/jobs/{job['id']}", key)[2]
        assert (held["status"], held["attempts"]) == ("running", 1), held
        client.config_set("maxmemory", 0)
        done = own_job_final(api, key, job["id"], dispatcher)
        assert done["status"] == "succeeded" and done["attempts"] == 1, done
        assert statuses(own.url, job["id"]) == \
            ["queued", "running", "queued", "running", "succeeded"]
    finally:
        client.close()


def test_a_dispatcher_on_a_redis_that_evicts_says_so_drops_an_evicted_job_and_runs_on(
        stack, tmp_path):
    """A Redis with `allkeys-lru` (a managed service's default) that evicted a queued job's
    record, by its own LRU: the dispatcher started on it says in one WARNING that Redis
    evicts, drops that job in one line naming it (not its prompt) and runs the next; the
    job is a 404, neither is counted queued or running on /metrics, and
    `sdxl_jobs_store_evicts` is 1. Before, the dispatcher said nothing of either, and the
    dropped job stayed `queued` on /metrics for good."""
    own = RedisServer(tmp_path / "redis")
    started = [own]
    client = None
    try:
        own.start()
        client = redis.Redis.from_url(own.url)
        client.config_set("maxmemory-policy", "allkeys-lru")
        client.config_set("maxmemory-samples", 64)  # its LRU exact: see test_eviction.py
        api = start_api(own.url, tmp_path, stack["env"])
        started.append(api.process)
        key = make_key(own.url, "own")
        # A first dispatcher publishes the tiny model's bounds, and stops: the jobs must
        # wait queued, unread, for the eviction.
        publisher = start_dispatcher(own.url, stack["server"], tmp_path, "d-publish",
                                     stack["env"])
        try:
            wait_until(lambda: client.get("sdxl:model"), 60, "the model's bounds published",
                       detail=publisher.tail)
        finally:
            publisher.stop()
        gone = api.json("POST", "/v1/jobs", key, {"prompt": "a fox in the snow", **FAST})[2]
        kept = api.json("POST", "/v1/jobs", key, {"prompt": "a red fox", **FAST})[2]
        evict(own.url, f"sdxl:job:{gone['id']}")
        dispatcher = start_dispatcher(own.url, stack["server"], tmp_path, "d-evicts",
                                      stack["env"])
        started.append(dispatcher)
        done = own_job_final(api, key, kept["id"], dispatcher)
        assert done["status"] == "succeeded", done
        wait_until(lambda: logged(dispatcher, f"job {gone['id']} dropped"), 30,
                   "the dispatcher to drop the evicted job", detail=dispatcher.tail)
        assert api.json("GET", f"/v1/jobs/{gone['id']}", key)[0] == 404
        found = metrics(api)
        assert found["sdxl_jobs"] == {"queued": 0, "running": 0}, found
        assert found["sdxl_jobs_store_evicts"] == {"": 1}, found
    finally:
        if client is not None:
            client.close()
        for process in reversed(started):
            process.stop()
    said = dispatcher.log_path.read_text()
    assert said.count("evicts keys (maxmemory-policy allkeys-lru)") == 1, said
    assert said.count(gone["id"]) == 1 and "a fox in the snow" not in said, said


def test_jobs_sent_together_with_an_expired_key_all_succeed(model_store, tmp_path):
    """TorchServe's inference key expires (every 60 minutes by default). Jobs sent together
    with the expired key each asked for its renewal: one renewal ran, the others read the
    old key again, were refused twice and failed for good ("Token Authorization failed")."""
    config = tmp_path / "config.properties"
    config.write_text(CONFIG.read_text().replace("token_expiration_min=60",
                                                 "token_expiration_min=0.25"))
    assert "token_expiration_min=0.25" in config.read_text()
    own = RedisServer(tmp_path / "redis")
    server = TorchServeProcess(tmp_path / "ts", model_store, {"sdxl": "sdxl-1.0.mar"},
                               Addresses.free(), config=config)
    env = {"SDXL_JOBS_RATE_PER_MINUTE": "1000", "SDXL_JOBS_MAX_ACTIVE_PER_KEY": "100"}
    dispatcher = api = None
    try:
        own.start()
        server.start()
        server.wait_ready("sdxl", timeout=240)
        api = start_api(own.url, tmp_path, env)
        key = make_key(own.url, "expired")
        # A first dispatcher publishes the tiny model's bounds (the API's validation), then
        # stops: the jobs wait for the next while every key it used expires.
        dispatcher = start_dispatcher(own.url, server, tmp_path, "d-first", env)
        client = redis.Redis.from_url(own.url)
        try:
            wait_until(lambda: client.exists("sdxl:model"), 120, "the bounds published")
        finally:
            client.close()
        dispatcher.stop()
        ids = [api.json("POST", "/v1/jobs", key, {"prompt": f"fox {i}", "seed": i, **FAST}
                        )[2]["id"] for i in range(8)]
        time.sleep(0.25 * 60 + 3)
        # Restarted on a backlog, a dispatcher sends as many calls at once as it may.
        dispatcher = start_dispatcher(own.url, server, tmp_path, "d-expired", env,
                                      ("--capacity", "8"))
        for job_id in ids:
            done = wait_final({"api": api, "key": key}, job_id, timeout=180)
            assert done["status"] == "succeeded" and done["attempts"] == 1, \
                (done.get("error"), done["attempts"], dispatcher.tail())
    finally:
        for process in (dispatcher, api.process if api else None):
            if process is not None:
                process.stop()
        server.stop()
        own.stop()


def test_a_dispatcher_whose_cancel_dir_is_not_the_workers_says_so(stack, dispatchers,
                                                                   tmp_path):
    # Two variables name the one directory (one per container in a pod): pointed elsewhere,
    # the dispatcher's flags would go where no worker looks, and canceled jobs would run to
    # their ends with nothing said.
    stack_env = stack["env"]
    try:
        stack["env"] = {**stack_env, "SDXL_JOBS_CANCEL_DIR": str(tmp_path)}
        dispatcher = dispatchers.start("d-cancel-elsewhere")
    finally:
        stack["env"] = stack_env
    wait_until(lambda: logged(dispatcher, "watches another cancel directory than "
                                          f"SDXL_JOBS_CANCEL_DIR {tmp_path}"), 30,
               "the dispatcher to warn", detail=dispatcher.tail)


def test_a_poison_job_is_dead_lettered_and_others_still_run(stack, dispatchers):
    # A lease longer than the test may take: each start again is the dispatcher's own,
    # within seconds, not a takeover once the claim went stale (the stack's 3 s lease hid
    # a dispatcher that left a failed job to its lease).
    start_with_lease(stack, dispatchers, "d-poison", 120)
    api, key = stack["api"], stack["key"]
    submitted = time.monotonic()
    _, _, poison = api.json("POST", "/v1/jobs", key, {"prompt": "poison", **FAST})
    _, _, fine = api.json("POST", "/v1/jobs", key, {"prompt": "fine", **FAST})
    failed = wait_final(stack, poison["id"], timeout=110)
    assert time.monotonic() - submitted < 110
    assert failed["status"] == "failed" and failed["attempts"] == 3
    assert "3 times" in failed["error"]["message"] and "HTTP 500" in failed["error"]["message"]
    assert wait_final(stack, fine["id"])["status"] == "succeeded"
    client = redis.Redis.from_url(stack["redis"].url)
    dead = [fields[b"id"].decode() for _, fields in client.xrange("sdxl:dead")]
    client.close()
    assert poison["id"] in dead
    # The dispatcher's log says each failed try and why, with TorchServe's request id, and
    # why the job was given up: it said "failed 3 times: dead-lettered" alone.
    said = [line for line in
            (stack["logs"] / "d-poison.log").read_text(errors="replace").splitlines()
            if poison["id"] in line]
    tries = [line for line in said if " WARNING " in line and "(an attempt used)" in line]
    assert len(tries) == 3 and all("HTTP 500: generation failed; quote request id " in line
                                   for line in tries), said
    (given_up,) = [line for line in said if "dead-lettered" in line]
    assert " WARNING " in given_up and "(last error: HTTP 500: " in given_up, given_up
    assert "poison" not in "\n".join(said)


def test_a_job_that_kills_the_engine_fails_at_once_and_others_still_run(stack, dispatchers):
    """TorchServe's worker already ran a request that kills its engine process alone, on
    fresh engines, before it answered 500 `EngineCrashed`: that answer is a verdict, not a
    failure the next start may escape. Started again, the job would kill two or three more
    engine processes per start (each a model load: tens of seconds for SDXL) and rerun the
    jobs batched with it each time."""
    dispatchers.start("d-crasher")
    api, key = stack["api"], stack["key"]
    _, _, crasher = api.json("POST", "/v1/jobs", key, {"prompt": "crasher", **FAST})
    _, _, fine = api.json("POST", "/v1/jobs", key, {"prompt": "fine", **FAST})
    failed = wait_final(stack, crasher["id"])
    assert failed["status"] == "failed" and failed["attempts"] == 1, failed
    assert failed["error"]["type"] == "EngineCrashed", failed["error"]
    assert "not run again" in failed["error"]["message"]
    assert wait_final(stack, fine["id"])["status"] == "succeeded"
    client = redis.Redis.from_url(stack["redis"].url)
    dead = [fields[b"id"].decode() for _, fields in client.xrange("sdxl:dead")]
    client.close()
    assert crasher["id"] not in dead


def torchserve_worker(server) -> psutil.Process:
    """The one worker process of the stack's TorchServe (a child of its Java frontend)."""
    java = psutil.Process(server.java_pid())
    (worker,) = [child for child in java.children()
                 if "model_service_worker" in " ".join(child.cmdline())]
    return worker


def test_a_worker_dying_mid_job_costs_an_attempt(stack, dispatchers):
    """The worker killed under a job whose streamed reply has begun: TorchServe, still up,
    drops the connection after the 200 and the first steps. That start failed, as one
    answered "Worker died." has: it costs an attempt. It is not "TorchServe unavailable",
    waited out at no cost (for ever, for a job that kills its worker every time), which a
    TorchServe stopped altogether mid-reply still is (the restart test below)."""
    start_with_lease(stack, dispatchers, "d-worker-dies", 180)  # its own retry, as above
    job = slow_job_under_way(stack, "worker dies", 12)
    torchserve_worker(stack["server"]).kill()
    done = wait_final(stack, job["id"], timeout=170)
    assert done["status"] == "succeeded" and done["attempts"] == 2, done
    retries = [event["data"]["retry"] for event in sse_events(stack, job["id"])
               if event["data"].get("retry")]
    assert len(retries) == 1 and "broke off" in retries[0], retries


def test_a_job_survives_its_dispatcher_killed_outright(stack, dispatchers):
    """Taken over and run again; and the killed dispatcher's call, left generating in
    TorchServe for nobody, is flagged by the next dispatcher on this host, so the worker
    stops it at its next step (before, it ran all its steps ahead of the job's rerun)."""
    first = dispatchers.start("d-doomed")
    api, key = stack["api"], stack["key"]
    assert api.json("GET", "/v1/health")[0] == 200
    before = answered(stack["server"])
    # 50 steps, SLOW's 30 and more (the most the cost limit lets through at its size): the
    # orphan must still be generating once the heir, a new Python process, has started and
    # flagged it, which on a loaded machine could take most of SLOW's.
    job = slow_job_under_way(stack, "orphan", 5, {**SLOW, "num_inference_steps": 50})
    first.kill(signal.SIGKILL)
    first.process.wait(10)
    heir = dispatchers.start("d-heir")
    wait_until(lambda: logged(heir, "flagged 1 call(s) a killed dispatcher left in flight"),
               60, "the next dispatcher to flag the orphaned call")
    done = wait_final(stack, job["id"])
    assert done["status"] == "succeeded" and done["attempts"] == 2
    # The rerun answered 200 and the orphan 499 (metric lines reach /metrics after the batch).
    wait_until(lambda: answered(stack["server"])["ok"] >= before["ok"] + 1, 30,
               "the rerun's answer counted", detail=lambda: answered(stack["server"]))
    after = answered(stack["server"])
    assert (after["ok"], after["bad_request"]) == (before["ok"] + 1,
                                                   before["bad_request"] + 1), (before, after)
    assert not list(stack["cancel_dir"].glob(".call-*"))
    status, _, data = api.call("GET", done["images"][0], key)
    assert status == 200
    assert data == predictions(stack, done["request"])


def test_a_stopping_dispatcher_finishes_its_jobs_first(stack, dispatchers):
    """SIGTERM (a pod scaled down): no new job is taken, the one in flight is finished."""
    leaving = dispatchers.start("d-leaving")
    api, key = stack["api"], stack["key"]
    job = slow_job_under_way(stack, "last one", 8)
    leaving.kill(signal.SIGTERM)
    # Logged once its loop has ended: no read of the queue is under way any more.
    wait_until(lambda: logged(leaving, "stopping: finishing 1 job(s)"), 60,
               "the dispatcher to stop taking jobs")
    _, _, after = api.json("POST", "/v1/jobs", key, {"prompt": "after", **FAST})
    leaving.process.wait(300)
    done = job_state(stack, job["id"])
    assert done["status"] == "succeeded" and done["attempts"] == 1, done
    assert job_state(stack, after["id"])["status"] == "queued"  # not taken by the leaver
    assert logged(leaving, "stopping: every job in flight finished")
    dispatchers.start("d-next")
    assert wait_final(stack, after["id"])["status"] == "succeeded"


def test_a_dispatcher_stopped_past_its_drain_names_the_jobs_it_leaves(stack, dispatchers):
    """A job still running at the end of SDXL_JOBS_DRAIN_S is left for another dispatcher to
    take over: the log says which and when, at WARNING, where it ended at 'stopping:
    finishing 1 job(s)' with no word of what became of it."""
    stack_env = stack["env"]
    try:
        stack["env"] = {**stack_env, "SDXL_JOBS_DRAIN_S": "1"}
        leaving = dispatchers.start("d-short-drain")
    finally:
        stack["env"] = stack_env
    job = slow_job_under_way(stack, "left behind", 9)
    leaving.kill(signal.SIGTERM)
    leaving.process.wait(120)
    lines = [line for line in leaving.log_path.read_text(errors="replace").splitlines()
             if "unfinished" in line]
    assert len(lines) == 1 and " WARNING " in lines[0] and job["id"] in lines[0], lines
    assert f"SDXL_JOBS_LEASE_S ({LEASE_S:g} s)" in lines[0], lines
    dispatchers.start("d-takes-over")  # the job is not left for the module's later tests
    done = wait_final(stack, job["id"])
    assert done["status"] == "succeeded" and done["attempts"] == 2, done


def test_webhooks_are_signed_retried_and_never_follow_redirects(stack, dispatchers,
                                                                  receivers):
    hook, elsewhere = receivers
    dispatchers.start("d-hooks")
    api, key = stack["api"], stack["key"]
    hook.answers = [(500, {}), (200, {})]  # the first delivery fails, the retry lands
    url = f"http://127.0.0.1:{hook.port}/hook"
    _, _, job = api.json("POST", "/v1/jobs", key, {"prompt": "hooked", **FAST,
                                                     "webhook": url})
    wait_until(lambda: len(hook.received) >= 2, 180, "two deliveries")
    (_, first, body), (_, second, body2) = hook.received[:2]
    assert first["webhook-id"] == second["webhook-id"] == f"{job['id']}.succeeded"
    signed = f"{second['webhook-id']}.{second['webhook-timestamp']}.".encode() + body2
    secret = base64.b64decode(WEBHOOK_SECRET.removeprefix("whsec_"))
    expected = base64.b64encode(hmac.new(secret, signed, hashlib.sha256).digest()).decode()
    assert second["webhook-signature"] == f"v1,{expected}"
    payload = json.loads(body2)
    assert payload["type"] == "job.succeeded" and payload["data"]["id"] == job["id"]
    # A redirect to a host that is not allowed is not followed.
    hook.received.clear()
    hook.answers = [(307, {"Location": f"http://127.0.0.1:{elsewhere.port}/stolen"})]
    _, _, redirected = api.json("POST", "/v1/jobs", key, {"prompt": "hooked", **FAST,
                                                            "webhook": url})
    wait_final(stack, redirected["id"])
    wait_until(lambda: hook.received, 30, "the redirected delivery")
    # Counted once the delivery is given up for good: nothing can follow it.
    wait_until(lambda: 'sdxl_webhook_deliveries_total{outcome="refused"} 1'
               in api.call("GET", "/metrics")[2].decode(), 30, "the refused delivery counted")
    assert len(hook.received) == 1 and elsewhere.received == []


@contextlib.contextmanager
def torchserve_stopped(server: TorchServeProcess):
    """The module's TorchServe stopped for the block and started again after it, even when
    the block fails: left stopped, it failed every test after this one ("connection
    refused") where one wait had timed out on a busy machine."""
    server.stop()
    try:
        yield
    finally:
        server.start()
        server.wait_ready("sdxl", timeout=240)


def test_torchserve_restarting_delays_jobs_and_fails_none(stack, dispatchers):
    dispatcher = dispatchers.start("d-restart")
    api, key, server = stack["api"], stack["key"], stack["server"]
    slow = slow_job_under_way(stack, "interrupted", 9)
    with torchserve_stopped(server):
        _, _, later = api.json("POST", "/v1/jobs", key, {"prompt": "while down", **FAST})
        # The dispatcher has seen TorchServe gone: it holds the job it had and takes no other.
        wait_until(lambda: logged(dispatcher, f"job {slow['id']} waits"), 60,
                   "the dispatcher to see TorchServe unavailable")
        assert job_state(stack, later["id"])["status"] == "queued"
    for job in (slow, later):
        done = wait_final(stack, job["id"])
        assert done["status"] == "succeeded" and done["attempts"] == 1, done


def test_a_job_read_while_torchserve_is_down_stays_queued(stack, dispatchers):
    """TorchServe stopped while its dispatcher had nothing in flight: no call failed, so the
    dispatcher still took it for up, read the next job and started it ("running", an
    attempt counted) to wait there for this TorchServe. Now it checks TorchServe after the
    read and leaves the job queued, handed back to any dispatcher; this one runs it once
    its TorchServe is back, on the first attempt."""
    dispatcher = dispatchers.start("d-idle-down")
    api, key, server = stack["api"], stack["key"], stack["server"]
    with torchserve_stopped(server):
        _, _, job = api.json("POST", "/v1/jobs", key, {"prompt": "while idle and down",
                                                       **FAST})
        client = redis.Redis.from_url(stack["redis"].url)
        try:
            wait_until(lambda: client.xpending_range("sdxl:stream", "dispatchers", "-", "+",
                                                     10, consumername="d-idle-down"), 60,
                       "the job read by the dispatcher")
        finally:
            client.close()
        wait_until(lambda: logged(dispatcher, "TorchServe is down: 1 job(s) read and not "
                                              "started")
                   or job_state(stack, job["id"])["status"] != "queued", 60,
                   "the dispatcher to leave the job queued, or start it")
        waiting = job_state(stack, job["id"])
        assert waiting["status"] == "queued" and waiting["attempts"] == 0, waiting
        assert waiting["queue_position"] >= 1, waiting
    done = wait_final(stack, job["id"], timeout=120)
    assert done["status"] == "succeeded" and done["attempts"] == 1, done


def unloadable_copy(store, name: str):
    """``<name>-1.0.mar``: sdxl-1.0.mar with a handler that fails every load, given up on
    by TorchServe after 1 s of retries (``maxRetryTimeoutInSec``, 300 s by default)."""
    def patch(member: str, data: bytes) -> bytes:
        if member == "sdxl_serve_handler.py":
            data = data.replace(b"    if not _handler.initialized:\n",
                                b"    raise RuntimeError('unloadable on purpose')\n"
                                b"    if not _handler.initialized:\n")
            assert b"unloadable on purpose" in data
        elif member == "model-config.yaml":
            data += b"\nmaxRetryTimeoutInSec: 1\n"
        return data

    return patched_archive(store / "sdxl-1.0.mar", store / f"{name}-1.0.mar", patch)


def test_a_dispatcher_that_cannot_reach_the_inference_address_starts_no_job(stack,
                                                                            dispatchers):
    """The management API answers and the inference address does not (a wrong port, a
    blocked one): the job stays queued, at no attempt's cost, for a dispatcher that can run
    it. Asking the management API alone, a dispatcher started it and held it "running" for
    good, retrying a call that could never connect."""
    nowhere = f"http://127.0.0.1:{free_port()}"
    blind = dispatchers.start("d-no-inference", "--torchserve", nowhere)
    api, key = stack["api"], stack["key"]
    _, _, job = api.json("POST", "/v1/jobs", key, {"prompt": "unreachable", **FAST})
    time.sleep(5)
    waiting = job_state(stack, job["id"])
    assert waiting["status"] == "queued" and waiting["attempts"] == 0, (waiting, blind.tail())
    dispatchers.start("d-reaches-it")
    done = wait_final(stack, job["id"], timeout=120)
    assert done["status"] == "succeeded" and done["attempts"] == 1, done


def test_another_models_broken_worker_does_not_stop_this_models_jobs(stack, dispatchers,
                                                                      model_store):
    """TorchServe answers /ping 500 while any model it serves has fewer healthy workers than
    its minimum (a worker failing to load for ``maxRetryTimeoutInSec``). The dispatcher took
    that for TorchServe down, so a second model on the same server that never loads stopped
    every job of ours. It now checks its own model's workers."""
    server, api, key = stack["server"], stack["api"], stack["key"]
    keys = server.key_file()
    management = server.addresses.management
    mar = unloadable_copy(model_store, "unloadable")
    try:
        status, _, body = keys.call("POST", f"{management}/models?url={mar.name}&model_name="
                                    "unloadable&initial_workers=1&synchronous=false",
                                    "management")
        assert status in (200, 202), body
        wait_until(lambda: keys.call("GET", f"{server.addresses.inference}/ping",
                                     "inference")[0] == 500, 60, "/ping to answer 500")
        dispatchers.start("d-other-model")
        _, _, job = api.json("POST", "/v1/jobs", key, {"prompt": "beside a broken model",
                                                       **FAST})
        done = wait_final(stack, job["id"], timeout=120)
        assert done["status"] == "succeeded" and done["attempts"] == 1, done
        # The condition held all along: the other model never loaded.
        assert keys.call("GET", f"{server.addresses.inference}/ping", "inference")[0] == 500
    finally:
        keys.call("DELETE", f"{management}/models/unloadable", "management")
        mar.unlink()
        wait_until(lambda: keys.call("GET", f"{server.addresses.inference}/ping",
                                     "inference")[0] == 200, 60, "/ping Healthy again")


def test_a_job_refused_by_an_open_circuit_breaker_goes_back_to_the_queue(
        stack, dispatchers, model_store, tmp_path):
    """A pod whose breaker is open (its engine fails every call) answers every request 503
    CircuitOpen while its worker stays READY. Its dispatcher took that for a full queue and
    held the job "running", retrying it for as long as the breaker stayed open, while a
    healthy pod could have run it. Now the job goes back to the queue, unrun and at no
    attempt's cost, and that dispatcher takes no job while the breaker refuses. With no
    other dispatcher live, its estimated start is not before that dispatcher takes jobs
    again: it said a start within seconds, and again at each look, for the breaker's whole
    cool-down."""
    fault = tmp_path / "engine-broken"
    broken = TorchServeProcess(tmp_path / "broken-run", model_store, {"sdxl": "sdxl-1.0.mar"},
                               Addresses.free(),
                               env={"SDXL_FAULT_ENGINE_BROKEN_FILE": str(fault),
                                    "SDXL_CIRCUIT_FAILURE_THRESHOLD": "1",
                                    "SDXL_CIRCUIT_COOLDOWN_S": "60",
                                    "SDXL_WARMUP_SIZES": "32x32", "SDXL_WARMUP_STEPS": "1"})
    api, key = stack["api"], stack["key"]
    try:
        broken.start()
        # A job ended within the throughput's window, so that a queued job has an
        # estimated start at all; its dispatcher then stops (and checks out). Run before
        # the breaker opens, so that the cool-down's 60 s are the refusal's alone.
        before = dispatchers.start("d-before-breaker")
        _, _, ran = api.json("POST", "/v1/jobs", key, {"prompt": "before", **FAST})
        assert wait_final(stack, ran["id"], timeout=120)["status"] == "succeeded"
        before.stop()
        broken.wait_ready("sdxl", timeout=240)
        fault.touch()
        inference = broken.key_file()
        url = f"{broken.addresses.inference}/predictions/sdxl"
        body = json.dumps({"prompt": "opens the breaker", **FAST}).encode()
        assert inference.call("POST", url, "inference", body)[0] == 500
        status, _, answer = inference.call("POST", url, "inference", body)
        assert status == 503 and json.loads(answer)["type"] == "CircuitOpen", answer
        refusing = dispatchers.start("d-breaker-open", server=broken)
        submitted = time.time()
        _, _, job = api.json("POST", "/v1/jobs", key, {"prompt": "refused", **FAST})
        wait_until(lambda: logged(refusing, f"job {job['id']} handed back to the queue"), 120,
                   "the dispatcher to hand the job back", detail=refusing.tail)
        waiting = job_state(stack, job["id"])
        assert waiting["status"] == "queued" and waiting["attempts"] == 0, waiting
        assert waiting["queue_position"] >= 1, waiting
        refused_for = float(re.search(r"no job is taken for ([0-9.]+) s",
                                      refusing.log_path.read_text())[1])
        assert refused_for > 30, refused_for  # the cool-down's 60 s, less the calls before
        estimated = datetime.fromisoformat(
            waiting["estimated_start_at"].replace("Z", "+00:00")).timestamp()
        assert estimated >= submitted + refused_for - 1, (waiting, submitted, refused_for)
        dispatchers.start("d-healthy-pod")
        done = wait_final(stack, job["id"], timeout=120)
        assert done["status"] == "succeeded" and done["attempts"] == 1, done
        # The refusing dispatcher did not take it back meanwhile: one hand-back, and the
        # job's states are that and the healthy pod's run.
        assert refusing.log_path.read_text().count(f"job {job['id']} handed back") == 1
        events = [event for event in sse_events(stack, job["id"]) if event["event"] == "status"]
        assert [event["data"]["status"] for event in events] == \
            ["queued", "running", "queued", "running", "succeeded"], events
    finally:
        broken.stop()


@pytest.mark.timeout(1200)
def test_load_200_jobs_8_clients_dispatchers_killed_engine_recycled(stack, dispatchers):
    """200 jobs from 8 clients; two dispatchers that together send more than TorchServe's
    queue holds (so it refuses some with 503); one killed twice with SIGKILL on the way;
    the engine replaced every 40 requests. Every job succeeds with exactly one result."""
    api, key, server = stack["api"], stack["key"], stack["server"]
    before = json.loads(server.key_file().call(
        "GET", f"{server.addresses.management}/models/sdxl?customized=true",
        "management")[2])[0]["customizedMetadata"]["engines_started"]
    succeeded_before = counter(api, "succeeded")
    steady = dispatchers.start("d-steady", "--capacity", "11")
    victim = dispatchers.start("d-victim", "--capacity", "11")
    requests = [{"prompt": f"load {i}", "seed": 1000 + i, **FAST} for i in range(200)]

    def submit(chunk):
        return [api.json("POST", "/v1/jobs", key, r)[2]["id"] for r in chunk]

    with ThreadPoolExecutor(8) as pool:
        ids = [i for chunk in pool.map(submit, [requests[i::8] for i in range(8)])
               for i in chunk]
    assert len(set(ids)) == 200
    for kill in (1, 2):
        wait_until(lambda: counter(api, "succeeded") - succeeded_before >= 60 * kill, 300,
                   f"{60 * kill} jobs done")
        victim.kill(signal.SIGKILL)
        victim.process.wait(10)
        victim.start()
    wait_until(lambda: counter(api, "succeeded") - succeeded_before >= 200, 600,
               "all 200 jobs done", interval=1.0)
    jobs = [job_state(stack, i) for i in ids]
    assert [j["status"] for j in jobs] == ["succeeded"] * 200
    assert counter(api, "succeeded") - succeeded_before == 200  # one stored result each
    assert steady.running()
    after = json.loads(server.key_file().call(
        "GET", f"{server.addresses.management}/models/sdxl?customized=true",
        "management")[2])[0]["customizedMetadata"]["engines_started"]
    assert after - before >= 4, "the engine was replaced on the way"
    logs = "".join((stack["logs"] / f"{n}.log").read_text() for n in ("d-steady", "d-victim"))
    assert "TorchServe unavailable" in logs, "TorchServe refused some with 503"
    # The same image /predictions gives for the same seed (alone; batched within 2 levels).
    for job in jobs[:3]:
        data = stack["api"].call("GET", job["images"][0], key)[2]
        difference = np.abs(pixels(data) - pixels(predictions(stack, job["request"])))
        assert difference.max() <= 2


def counter(api, state: str) -> float:
    _, _, raw = api.call("GET", "/metrics")
    for line in raw.decode().splitlines():
        if line.startswith(f'sdxl_jobs_total{{state="{state}"}}'):
            return float(line.split()[-1])
    return 0.0

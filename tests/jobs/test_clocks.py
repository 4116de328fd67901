"""The job API's processes with clocks that disagree, as pods on several nodes have them:
real Redis, TorchServe, API replicas and dispatchers, each process's clock shifted for real
by Debian's libfaketime (``LD_PRELOAD``, ``FAKETIME``). What one process wrote with its own
clock and another read against its own went wrong by the skew (docs/jobs.md, "Clocks")."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import time
from datetime import datetime

import pytest
import redis

from jobstack import make_key, start_api, start_dispatcher, with_store
from lifetimes import wait_until

pytestmark = [pytest.mark.jobs, pytest.mark.e2e]

LIBFAKETIME = next(iter(sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))), None)
if LIBFAKETIME is None:
    pytest.skip("Debian's faketime package (libfaketime) is not installed; .ci/run installs "
                "it", allow_module_level=True)

GOOD = {"prompt": "a red fox", "seed": 3, "num_inference_steps": 2, "width": 64, "height": 64}


def shifted(seconds: int) -> dict[str, str]:
    """The environment that sets a child's wall clock ``seconds`` off (time.time(), what a
    node without NTP has) and leaves its monotonic clock alone (asyncio's timers)."""
    return {"LD_PRELOAD": LIBFAKETIME, "FAKETIME": f"{seconds:+d}s",
            "FAKETIME_DONT_FAKE_MONOTONIC": "1"}


@pytest.fixture(scope="module")
def apis(redis_server, tmp_path_factory):
    """Two API replicas on one Redis: one with the right time, one 300 s ahead."""
    logs = tmp_path_factory.mktemp("clock-logs")
    right = start_api(redis_server.url, logs / "right")
    try:
        ahead = start_api(redis_server.url, logs / "ahead", shifted(300))
    except BaseException:
        right.process.stop()
        raise
    yield right, ahead
    ahead.process.stop()
    right.process.stop()


@pytest.fixture
def dispatcher(redis_server, server, tmp_path):
    """Start one dispatcher with a shifted clock (``dispatcher(seconds)``); stopped after."""
    started = []

    def start(seconds: int, name: str = "d1", env: dict[str, str] | None = None):
        process = start_dispatcher(redis_server.url, server, tmp_path, name,
                                   {**(shifted(seconds) if seconds else {}), **(env or {})})
        started.append(process)
        return process
    yield start
    for process in started:
        process.stop()


def metrics(api) -> dict[str, float]:
    status, _, raw = api.call("GET", "/metrics")
    assert status == 200
    return {name: float(value) for name, _, value in
            (line.partition(" ") for line in raw.decode().splitlines())
            if value and not name.startswith("#")}


def bounds_published(redis_url: str) -> None:
    """Wait for a dispatcher to publish the tiny model's bounds: before them a submit is
    checked against SDXL's (512 px at least)."""
    client = redis.Redis.from_url(redis_url)
    try:
        wait_until(lambda: client.exists("sdxl:model"), 60, "the model's bounds published")
    finally:
        client.close()


def submitted(api, key: str, body: dict) -> dict:
    """The job ``body`` submitted to ``api``, again while the API still checks it against
    SDXL's bounds (it reads them again within 5 s, MODEL_INFO_CACHE_S)."""
    status, job = wait_until(lambda: (lambda answer: answer[::2] if answer[0] != 400 else None)(
        api.json("POST", "/v1/jobs", key, body)), 15, "a submit the tiny model's bounds allow")
    assert status == 202, job
    return job


def moment(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def test_libfaketime_shifts_a_childs_wall_clock_and_not_its_timers():
    """What the tests below stand on: a child under ``shifted`` sees its wall clock 300 s
    ahead, and its asyncio sleeps last what they say."""
    code = ("import asyncio, time\n"
            "async def main():\n"
            "    began = time.monotonic(); await asyncio.sleep(0.3)\n"
            "    print(time.time(), time.monotonic() - began)\n"
            "asyncio.run(main())\n")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **shifted(300)},
                         capture_output=True, text=True, timeout=30, check=True).stdout
    wall, slept = map(float, out.split())
    assert 290 < wall - time.time() < 310, out
    assert 0.29 < slept < 5, out


def test_a_dispatcher_whose_clock_is_behind_counts_as_live(apis, dispatcher):
    """A dispatcher checked in with its own clock and an API counted those within 30 s of
    its own: one 120 s behind was never live (`/v1/health?dispatchers=1` 503, the gauge 0,
    SDXLJobsNoDispatcher firing) on either replica, though it took jobs."""
    right, ahead = apis
    dispatcher(-120)
    for api in (right, ahead):
        wait_until(lambda api=api: api.json("GET", "/v1/health?dispatchers=1")[0] == 200, 60,
                   "the dispatcher 120 s behind counted as live",
                   detail=lambda api=api: api.json("GET", "/v1/health?dispatchers=1")[2])
        assert metrics(api)["sdxl_jobs_dispatchers"] == 1


def test_a_dispatcher_whose_clock_is_ahead_keeps_the_others_check_ins(apis, redis_server,
                                                                      dispatcher):
    """A dispatcher pruned the check-ins older than its consumer bound (300 s at least) by
    its own clock: with SDXL_JOBS_CONSUMER_IDLE_S at 300 s or less, one 400 s ahead removed
    every other dispatcher's within 5 s of their check-in, and the API counted them as
    gone."""
    right, _ = apis
    client = redis.Redis.from_url(redis_server.url)
    try:
        dispatcher(400, name="ahead", env={"SDXL_JOBS_CONSUMER_IDLE_S": "60"})

        def its_check_in():
            return client.zscore("sdxl:dispatchers", "ahead")
        wait_until(its_check_in, 60, "the dispatcher 400 s ahead checked in")
        right.json("GET", "/v1/health?dispatchers=0")  # an API replica is up (its own count)
        # Another dispatcher checks in as any does, through the store.
        with_store(redis_server.url, lambda store: store.check_in("other"),
                   fresh_prefix=False)
        # Two more check-ins of the dispatcher ahead: its prune ran after ours at least once.
        seen = [its_check_in()]
        for _ in range(2):
            wait_until(lambda: its_check_in() != seen[-1], 30,
                       "the next check-in of the dispatcher ahead")
            seen.append(its_check_in())
        assert client.zscore("sdxl:dispatchers", "other") is not None, \
            client.zrange("sdxl:dispatchers", 0, -1, withscores=True)
    finally:
        client.close()


def test_times_of_a_job_submitted_to_a_replica_ahead_are_on_one_clock(apis, redis_server,
                                                                       dispatcher):
    """A job's submit time was its API replica's clock, its start the dispatcher's and every
    age the reader's: with a replica 300 s ahead the job waited -300 s (in its view and in
    the wait histogram), the other replica's oldest-queued age (KEDA's, the alert's) was
    -300 s, and its queue had no estimated start (no job had ended in the last 5 minutes by
    that replica's clock)."""
    right, ahead = apis
    key = make_key(redis_server.url, "clocks")
    # The tiny model's bounds published, then no dispatcher: the job waits.
    publisher = dispatcher(0, name="publisher")
    bounds_published(redis_server.url)
    publisher.stop()
    before = metrics(right)
    began = time.monotonic()
    job = submitted(ahead, key, GOOD)
    time.sleep(1.0)  # an age to measure: the job waits a second with no dispatcher
    for api in (right, ahead):
        age = metrics(api)["sdxl_jobs_oldest_queued_age_seconds"]
        assert 0.9 <= age <= time.monotonic() - began + 2, (api.address, age)
    running = dispatcher(0)
    done = wait_until(lambda: (lambda view: view if view["status"] in
                               ("succeeded", "failed") else None)(
        right.json("GET", f"/v1/jobs/{job['id']}", key)[2]), 120, "the job's end")
    elapsed = time.monotonic() - began
    assert done["status"] == "succeeded", done
    assert 0.9 <= done["timings"]["queued_s"] <= elapsed, done
    assert moment(done["created_at"]) <= moment(done["started_at"]) <= \
        moment(done["finished_at"]), done
    after = metrics(right)
    assert after["sdxl_job_wait_seconds_count"] - before["sdxl_job_wait_seconds_count"] == 1
    waited = after["sdxl_job_wait_seconds_sum"] - before["sdxl_job_wait_seconds_sum"]
    assert 0.9 <= waited <= elapsed, waited
    running.stop()
    # The next job's estimated start, from the one that just ended, whatever replica shows it.
    for api in (ahead, right):
        status, _, queued = api.json("POST", "/v1/jobs", key, {**GOOD, "seed": 4})
        assert status == 202 and queued["status"] == "queued", queued
        assert queued["estimated_start_at"] is not None, queued
        # On one clock: the second is behind the first and one run (seconds), not 300 s.
        assert abs(moment(queued["estimated_start_at"]) - moment(queued["created_at"])) < 60, \
            queued


def test_a_job_canceled_on_a_replica_ahead_ran_as_long_as_it_ran(apis, redis_server,
                                                                  dispatcher):
    """A cancel ended a running job with its API replica's clock, where the dispatcher's
    had started it: canceled on a replica 300 s ahead, a job that ran a second showed
    `run_s` 300 and `sdxl_job_run_seconds` counted 300 s."""
    right, ahead = apis
    key = make_key(redis_server.url, "cancels")
    dispatcher(0)
    bounds_published(redis_server.url)
    before = metrics(right)
    began = time.monotonic()
    # Long enough to be caught running on a fast machine (30 steps).
    job = submitted(right, key, {**GOOD, "num_inference_steps": 30, "width": 96, "height": 96})
    wait_until(lambda: right.json("GET", f"/v1/jobs/{job['id']}", key)[2]["status"] != "queued",
               60, "the job's start")
    status, _, canceled = ahead.json("DELETE", f"/v1/jobs/{job['id']}", key)
    elapsed = time.monotonic() - began
    assert status == 200 and canceled["status"] == "canceled", canceled
    assert 0 <= canceled["timings"]["run_s"] <= elapsed, canceled
    assert moment(canceled["started_at"]) <= moment(canceled["finished_at"]), canceled
    after = metrics(right)
    assert after["sdxl_job_run_seconds_count"] - before["sdxl_job_run_seconds_count"] == 1
    ran = after["sdxl_job_run_seconds_sum"] - before["sdxl_job_run_seconds_sum"]
    assert 0 <= ran <= elapsed, ran

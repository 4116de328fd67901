"""The dispatcher's own decisions, most of them needing no TorchServe to show; where Redis or
TorchServe is in one, it is a real redis-server or torchserve."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError

from sdxl_jobs.dispatcher import (REDIS_WAIT_AT_START_S, Dispatcher, Lost, Refused,
                                  Unavailable)
from sdxl_jobs.processes import RedisServer, free_port, python_module
from sdxl_jobs.settings import JobSettings
from sdxl_jobs.store import JobStore, usable_at_start
from sdxl_serve.cancellation import CANCEL_HEADER
from sdxl_serve.management import KeyFile, QueueDepth
from sdxl_serve.server import Addresses, TorchServeProcess

from faulty_link import FaultyLink
from jobstack import LIMITS, REQUEST, refused_start, with_store
from lifetimes import as_pid_1, child_of, wait_until

pytestmark = pytest.mark.jobs


# RFC 2606: a name under .invalid never resolves.
NO_SUCH_HOST = "torchserve.invalid"


def log_of_a_waiting_dispatcher(tmp_path, env: dict[str, str], args: list[str],
                                saying: str) -> str:
    """The log of a dispatcher (``env`` over this process's, logging warnings only) that
    says ``saying`` and then goes on waiting; stopped with SIGTERM, exit 0."""
    log_path = tmp_path / "dispatcher.log"
    env = {**os.environ, "SDXL_JOBS_LOG_LEVEL": "WARNING", **env}
    with log_path.open("wb") as log:
        process = subprocess.Popen(python_module(
            "sdxl_jobs.dispatcher", *args, "--key-file", str(tmp_path / "key_file.json")),
            env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: saying in log_path.read_text() or process.poll() is not None, 30,
                   "the dispatcher saying why it waits", detail=log_path.read_text)
        time.sleep(3)  # its next tries
        assert process.poll() is None, log_path.read_text()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, log_path.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    said = log_path.read_text()
    assert said.count(saying) == 1 and "Traceback" not in said, said
    return said


def test_a_dispatcher_whose_torchserve_name_does_not_resolve_says_so_and_waits(redis_server,
                                                                                tmp_path):
    """TorchServe's host name does not resolve (a typo, or a Service not created yet): the
    dispatcher says so once at WARNING, naming the address, and goes on asking (a name can
    resolve later), where each try was an INFO line with the resolver's words alone, so
    that at SDXL_JOBS_LOG_LEVEL=WARNING it waited for good without a word."""
    management = f"http://{NO_SUCH_HOST}:8081"
    said = log_of_a_waiting_dispatcher(
        tmp_path, {"SDXL_REDIS_URL": redis_server.url},
        ["--torchserve", f"http://{NO_SUCH_HOST}:8080", "--management", management],
        "does not resolve")
    assert (f"WARNING sdxl_jobs.dispatcher: TorchServe at {management} cannot be reached: "
            f"its host name '{NO_SUCH_HOST}' does not resolve (") in said.splitlines()[0], said
    assert "waiting for it, asked again every second" in said


def test_a_dispatcher_whose_redis_name_does_not_resolve_says_so_and_waits(tmp_path):
    """The same for Redis's host name: one WARNING naming the URL (no password) and the
    resolver's reason, and the dispatcher waits for it."""
    said = log_of_a_waiting_dispatcher(
        tmp_path, {"SDXL_REDIS_URL": "redis://:secret@redis.invalid:6379/0"}, [],
        "waiting for it")
    (line,) = said.splitlines()
    assert "WARNING sdxl_jobs.store: the job store at redis://:***@redis.invalid:6379/0 " \
           "cannot be used: ConnectionError: Error " in line, said
    assert "connecting to redis.invalid:6379" in line and "secret" not in said, said


def test_an_inference_address_whose_name_does_not_resolve_is_said_once(redis_server,
                                                                       tmp_path, caplog):
    """The management API answers and the inference address's name does not resolve: the
    dispatcher's check before it takes jobs said so at DEBUG only, so it took no job for
    good without a word. Once at WARNING, naming the address, however often it asks."""
    path = tmp_path / "key_file.json"
    path.write_text(json.dumps({"inference": {"key": "k"}, "API": {"key": "a"}}))
    inference = f"http://{NO_SUCH_HOST}:8080"

    async def ask_twice() -> list[bool]:
        dispatcher = Dispatcher(JobStore.from_url(redis_server.url), JobSettings(),
                                inference, KeyFile(path, f"http://127.0.0.1:{free_port()}"))
        try:
            return [await dispatcher.healthy(), await dispatcher.healthy()]
        finally:
            await dispatcher.client.aclose()
            await dispatcher.store.close()
    caplog.set_level(logging.WARNING, logger="sdxl_jobs.dispatcher")
    assert asyncio.run(ask_twice()) == [False, False]
    assert [r.getMessage() for r in caplog.records] == [
        f"TorchServe at {inference} cannot be reached: its host name '{NO_SUCH_HOST}' does "
        f"not resolve ({caplog.records[0].getMessage().split('(')[1].split(')')[0]}); "
        f"waiting for it, asked again every second"], caplog.text


def test_waiting_for_a_torchserve_that_is_not_up_is_said_once_not_every_second(
        redis_server, tmp_path, caplog):
    """TorchServe not answering yet (loading its model for minutes): the dispatcher says
    why it waits once, then as the reason changes or every WAITING_SAID_S, where it wrote
    the same INFO line every second of the wait."""
    path = tmp_path / "key_file.json"
    path.write_text(json.dumps({"inference": {"key": "k"}, "API": {"key": "a"}}))
    nobody = f"http://127.0.0.1:{free_port()}"  # nothing listens there

    async def wait_a_while() -> dict:
        dispatcher = Dispatcher(JobStore.from_url(redis_server.url), JobSettings(),
                                nobody, KeyFile(path, nobody))
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(3.5, stop.set)
        try:
            return await dispatcher._describe_until_ready(stop)
        finally:
            await dispatcher.client.aclose()
            await dispatcher.store.close()
    caplog.set_level(logging.INFO, logger="sdxl_jobs.dispatcher")
    assert asyncio.run(wait_a_while()) == {}
    said = [r.getMessage() for r in caplog.records if "waiting for TorchServe" in r.getMessage()]
    assert len(said) == 1 and "Connection refused" in said[0], caplog.text


def test_a_key_renewal_that_cannot_reach_torchserve_is_unavailable_not_the_jobs_fault(
        tmp_path):
    """TorchServe refused the expired inference key and its management API is gone too (the
    whole server restarting): the job waits as for any unavailable TorchServe, and uses no
    attempt, instead of failing its call and being taken over after its lease."""
    path = tmp_path / "key_file.json"
    path.write_text(json.dumps({"inference": {"key": "old"}, "API": {"key": "a"}}))
    nobody = f"http://127.0.0.1:{free_port()}"  # nothing listens there

    async def renew_the_refused_key():
        dispatcher = Dispatcher(JobStore.from_url("redis://127.0.0.1:9/0"), JobSettings(),
                                nobody, KeyFile(path, nobody))
        try:
            with pytest.raises(Unavailable, match="renewing the inference key failed"):
                await dispatcher._key(refused="old")
        finally:
            await dispatcher.client.aclose()
    asyncio.run(renew_the_refused_key())


def test_torchserve_is_called_straight_never_through_the_environments_proxy(proxy, tmp_path):
    """With HTTP_PROXY and HTTPS_PROXY set (a pod's egress proxy, for webhooks), the
    dispatcher's calls to TorchServe, our own backend, go straight to it: its health check,
    its model's description and a key's renewal went to the proxy, 127.0.0.1 included, and
    so would every job's prompt and the keys, unless NO_PROXY named TorchServe's host."""
    path = tmp_path / "key_file.json"
    path.write_text(json.dumps({"inference": {"key": "old"}, "management": {"key": "m"},
                                "API": {"key": "a"}}))
    nobody = f"http://127.0.0.1:{free_port()}"  # nothing listens there: only the proxy does

    async def call_torchserve():
        dispatcher = Dispatcher(JobStore.from_url("redis://127.0.0.1:9/0"), JobSettings(),
                                nobody, KeyFile(path, nobody))
        try:
            assert not await dispatcher.healthy()
            for call in (dispatcher.describe(timeout=5.0), dispatcher._key(refused="old")):
                with contextlib.suppress(Exception):  # nothing answers: the proxy's words
                    await call
        finally:
            await dispatcher.client.aclose()
    asyncio.run(call_torchserve())
    assert proxy.asked == []


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
def test_a_dispatcher_waiting_for_its_redis_stops_when_told(tmp_path, name):
    """The pod runs the dispatcher as its PID 1, which gets no signal it has no handler
    for: waiting for a Redis not there yet, it ignored SIGTERM, and the pod's termination
    waited out its grace period (430 s). SIGINT ended it with a traceback."""
    log_path = tmp_path / "dispatcher.log"
    env = {**os.environ, "SDXL_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    with log_path.open("wb") as log:
        process = subprocess.Popen(as_pid_1(python_module(
            "sdxl_jobs.dispatcher", "--key-file", str(tmp_path / "key_file.json"))),
            env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: "waiting for it" in log_path.read_text() or
                   process.poll() is not None, 60, "the dispatcher waiting for Redis",
                   detail=log_path.read_text)
        assert process.poll() is None, log_path.read_text()
        # The dispatcher itself: the child of unshare, where it runs under unshare.
        dispatcher = child_of(process.pid) if process.args[0] == "unshare" else process.pid
        os.kill(dispatcher, signal.Signals[name])
        assert process.wait(timeout=30) == 0, log_path.read_text()
    finally:
        if process.poll() is None:
            process.kill()  # unshare's child with it (--kill-child)
            process.wait()
    said = log_path.read_text()
    assert f"stopped by {name} while waiting for Redis" in said, said
    assert "Traceback" not in said, said


@pytest.mark.parametrize("socket_path, reason", [
    ("a-file/redis.sock", "Not a directory"),   # under a regular file: ENOTDIR
    ("x" * 120 + "/redis.sock", "AF_UNIX path too long"),
])
def test_a_dispatcher_whose_redis_no_wait_can_reach_ends_its_start(tmp_path, socket_path,
                                                                     reason):
    """A unix:// socket no Redis can ever appear at is a setting to fix, as a password is:
    the start ends in one line with its reason, exit 1. Since any socket error but TLS's and
    a reset was taken for a Redis not there yet, such a dispatcher waited for good, asking
    every 2 s, and its pod never showed the error as a restart."""
    (tmp_path / "a-file").write_text("")
    log_path = tmp_path / "dispatcher.log"
    env = {**os.environ, "SDXL_REDIS_URL": f"unix://{tmp_path / socket_path}"}
    with log_path.open("wb") as log:
        process = subprocess.Popen(python_module(
            "sdxl_jobs.dispatcher", "--key-file", str(tmp_path / "key_file.json")),
            env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        returncode = process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        returncode = None
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    said = log_path.read_text()
    assert returncode == 1, said
    assert "waiting for it" not in said, said
    (line,) = [line for line in said.splitlines() if reason in line]
    assert "cannot be used" in line and "exiting" in line, said


def test_a_dispatcher_waits_for_a_redis_that_does_not_answer_and_goes_on_once_it_does(
        tmp_path, caplog):
    """A peer that takes the connection and never answers is a Redis not there yet (one
    stopped or paused, a proxy whose Redis is not up: each answers later without a change
    of ours): the dispatcher's start says so once, within START_PING_S where it took the
    socket timeout (30 s) before the line, asks again, and goes on once a Redis answers on
    that port. Its start's wait, as `main` runs it."""
    mute = socket.create_server(("127.0.0.1", 0))  # listens; never accepts or answers
    redis_server = RedisServer(tmp_path / "redis", port=mute.getsockname()[1])
    (tmp_path / "redis").mkdir()
    caplog.set_level(logging.INFO, logger="sdxl_jobs.store")
    usable = []
    waiting = threading.Thread(target=lambda: usable.append(usable_at_start(
        redis_server.url, "exiting", wait_s=REDIS_WAIT_AT_START_S)), daemon=True)
    waiting.start()
    try:
        wait_until(lambda: "waiting for it" in caplog.text, 15,
                   "the dispatcher saying it waits for Redis", detail=lambda: caplog.text)
        (line,) = [r.getMessage() for r in caplog.records if "waiting for it" in r.message]
        assert "TimeoutError: Redis does not answer (no reply to a PING within 5 s)" in line
        assert waiting.is_alive() and not usable
        mute.close()
        redis_server.start()
        waiting.join(30)
        assert usable == [True], caplog.text
    finally:
        mute.close()
        redis_server.stop()
    assert "job store: redis://:***@" in caplog.text
    assert caplog.text.count("waiting for it") == 1, caplog.text


def test_a_dispatcher_waits_for_a_redis_at_its_maxclients_and_goes_on_once_there_is_room(
        tmp_path, caplog):
    """A Redis whose `maxclients` connections are all taken (browsers' event streams, other
    replicas) refuses each new one, "max number of clients reached": room comes back as
    others leave, with no change of ours. A dispatcher starting then (KEDA scaling from
    zero) took it for a setting to fix and exited 1, to crash-loop back-off for up to 5
    minutes after there was room. Its start's wait, as `main` runs it."""
    redis_server = RedisServer(tmp_path / "redis")
    redis_server.start()
    watcher = redis.Redis.from_url(redis_server.url)
    caplog.set_level(logging.INFO, logger="sdxl_jobs.store")
    usable = []
    try:
        watcher.config_set("maxclients", 1)  # the watcher's own connection, no other
        waiting = threading.Thread(target=lambda: usable.append(usable_at_start(
            redis_server.url, "exiting", wait_s=REDIS_WAIT_AT_START_S)), daemon=True)
        waiting.start()
        wait_until(lambda: "waiting for it" in caplog.text or usable, 15,
                   "the dispatcher saying it waits for Redis", detail=lambda: caplog.text)
        assert waiting.is_alive() and not usable, caplog.text
        (line,) = [r.getMessage() for r in caplog.records if "waiting for it" in r.message]
        assert "max number of clients reached" in line, line
        watcher.config_set("maxclients", 100)
        waiting.join(30)
        assert usable == [True], caplog.text
    finally:
        watcher.close()
        redis_server.stop()
    assert caplog.text.count("waiting for it") == 1, caplog.text


def test_a_dispatcher_started_while_redis_refuses_writes_waits_and_goes_on(tmp_path):
    """A Redis that answers PING but refuses every write (full at `maxmemory`, no eviction;
    a read-only replica after a failover, which refuses the same way) when a dispatcher
    starts: its start's first write, the consumer groups', ended it with a traceback, exit
    1 (crash-loop back-off for up to 5 minutes after Redis took writes again). It says so
    in one WARNING with Redis's words, asks again, and goes on once Redis takes writes:
    the groups made, one line saying Redis answers again; SIGTERM ends it, exit 0."""
    redis_server = RedisServer(tmp_path / "redis")
    redis_server.start()
    watcher = redis.Redis.from_url(redis_server.url)
    (tmp_path / "key_file.json").write_text(json.dumps({"inference": {"key": "k"},
                                                         "API": {"key": "a"}}))
    log_path = tmp_path / "dispatcher.log"
    no_torchserve = f"http://127.0.0.1:{free_port()}"
    process = None
    try:
        watcher.config_set("maxmemory", 1)  # every write refused: OOM
        with log_path.open("wb") as log:
            process = subprocess.Popen(python_module(
                "sdxl_jobs.dispatcher", "--torchserve", no_torchserve, "--management",
                no_torchserve, "--key-file", str(tmp_path / "key_file.json")),
                env={**os.environ, "SDXL_REDIS_URL": redis_server.url,
                     "SDXL_JOBS_LOG_LEVEL": "WARNING"}, stdout=log, stderr=subprocess.STDOUT)
        wait_until(lambda: "consumer groups" in log_path.read_text()
                   or process.poll() is not None, 30, "the dispatcher saying why it waits",
                   detail=log_path.read_text)
        time.sleep(2 * REDIS_WAIT_AT_START_S)  # its next tries, said no more
        assert process.poll() is None, log_path.read_text()
        assert "OutOfMemoryError" in log_path.read_text()
        watcher.config_set("maxmemory", 0)
        wait_until(lambda: "Redis answers again" in log_path.read_text(), 15,
                   "the dispatcher going on", detail=log_path.read_text)
        assert [group["name"] for group in watcher.xinfo_groups("sdxl:stream")] == \
            [b"dispatchers"]
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, log_path.read_text()
    finally:
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()
        watcher.close()
        redis_server.stop()
    said = log_path.read_text()
    assert said.count("consumer groups") == 1 and "Traceback" not in said, said


# --- What ends a start, when Redis fails its writes. ----------------------------------
# TorchServe's answer is given as data (the generation is not what is tested); Redis is
# real and fails for real: full (maxmemory 1, no eviction: every write refused, renewals
# still taken) or an answer lost on its way back (tests/faulty_link.py drops the connection
# carrying it after Redis ran the command).

LEASE_S = 1.0  # renewed every 1/3 s: the outages below outlast it
CRASHED = {"code": 500, "type": "EngineCrashed",
           "message": "the engine process died running this request alone"}


def with_dispatcher(redis_server, tmp_path, body, lose_answer_with: bytes = b"",
                    server: TorchServeProcess | None = None):
    """``body(store, dispatcher, job_id, claim)``: a job started by the dispatcher ``d1``
    under ``claim``; ``store`` reads Redis directly, the dispatcher's own store goes through
    a link that loses the first answer containing ``lose_answer_with`` (when given). Its
    TorchServe is ``server``, else an address where nothing answers."""
    path = tmp_path / "key_file.json"
    path.write_text(json.dumps({"inference": {"key": "k"}, "API": {"key": "a"}}))
    nobody = f"http://127.0.0.1:{free_port()}"  # no TorchServe is called
    inference, keys = (server.addresses.inference, server.key_file()) if server else \
        (nobody, KeyFile(path, nobody))
    link = FaultyLink(redis_server.port, lose_answer_with=lose_answer_with) \
        if lose_answer_with else None

    async def go(store: JobStore):
        job_id = (await store.submit("alice", REQUEST, **LIMITS)).job_id
        [(entry, _)] = await store.next_jobs("d1", 1, 100)
        outcome, claim = await store.start(job_id, entry, "d1", 3, 60)
        assert outcome == "claimed"
        own = JobStore.from_url(redis_server.url.replace(f":{redis_server.port}/",
                                                         f":{link.port}/"),
                                prefix=store.prefix) if link else store
        dispatcher = Dispatcher(own, JobSettings(lease_s=LEASE_S), inference, keys,
                                name="d1")
        try:
            await body(store, dispatcher, job_id, claim)
        finally:
            await dispatcher.client.aclose()
            if own is not store:
                await own.close()
        if link:
            assert link.dropped.is_set(), "no answer was lost: the test tested nothing"
    try:
        with_store(redis_server.url, go)
    finally:
        if link:
            link.close()


def under_claim(dispatcher: Dispatcher, job_id: str, claim: str, end) -> asyncio.Task:
    """``end(holder)`` as a task, its claim renewed beside it as ``run_job`` renews it."""
    holder = {"claim": claim}
    task = asyncio.create_task(end(holder))
    renewing = asyncio.create_task(dispatcher._keep_claim(job_id, holder, task))
    task.add_done_callback(lambda _: renewing.cancel())
    return task


@contextlib.asynccontextmanager
async def full(store: JobStore):
    """Redis full: every write refused with OOM, reads and renewals (XCLAIM) still taken."""
    await store.redis.config_set("maxmemory", 1)
    try:
        yield
    finally:
        await store.redis.config_set("maxmemory", 0)


async def refusals(store: JobStore) -> int:
    """Commands Redis has refused for want of memory, by its own count."""
    return (await store.redis.info("errorstats")).get("errorstat_OOM", {}).get("count", 0)


async def refused_twice(store: JobStore, before: int, task: asyncio.Task) -> None:
    """Until Redis has refused two more writes (the task's first try and a second one)."""
    deadline = time.monotonic() + 10
    while await refusals(store) < before + 2:
        if task.done():
            task.result()  # its error, if it raised
            pytest.fail("the write ended while Redis refused it")
        assert time.monotonic() < deadline, "Redis refused no second try"
        await asyncio.sleep(0.05)


async def held_through_a_lease(store: JobStore, task: asyncio.Task) -> None:
    """The job stays its dispatcher's for longer than a lease: nobody can take it over."""
    await asyncio.sleep(LEASE_S * 1.5)
    assert not task.done()
    assert await store.abandoned_jobs("d2", LEASE_S, 10) == []


async def statuses(store: JobStore, job_id: str) -> list[str]:
    return [event["status"] for _, event in await store.events_after(job_id)
            if event["type"] == "status"]


def test_a_failure_a_full_redis_refuses_is_stored_once_it_has_room_and_not_run_again(
        redis_server, tmp_path):
    """A job whose request killed fresh engine processes (500 EngineCrashed) fails for good,
    and a full Redis refuses that finish. Before, the error ended the start with the job
    still running under its claim: taken over after the lease and run again, killing fresh
    engines again, up to max_attempts. Now the claim is kept (nobody takes the job over)
    and the failure stored once Redis has room: failed, 1 attempt, one final event."""
    async def body(store, dispatcher, job_id, claim):
        async with full(store):
            before = await refusals(store)
            task = under_claim(dispatcher, job_id, claim, lambda holder: dispatcher
                               ._store_outcome(job_id, claim, holder, 500, CRASHED))
            await refused_twice(store, before, task)
            await held_through_a_lease(store, task)
        assert await asyncio.wait_for(task, 5) is True  # this start is over
        job = await store.job(job_id)
        assert (job["status"], job["attempts"]) == ("failed", "1"), job
        assert json.loads(job["error"]) == CRASHED
        assert await statuses(store, job_id) == ["queued", "running", "failed"]
        assert (await store.gauges())["stats"]["jobs_failed"] == 1

    with_dispatcher(redis_server, tmp_path, body)


# Redis's other refusals of its own: the first word of their error replies.
BUSY_SCRIPT = """local t = redis.call('TIME') local stop = t[1] * 1e6 + t[2] + ARGV[1]
while true do t = redis.call('TIME') if t[1] * 1e6 + t[2] > stop then return 1 end end"""


async def refuses_as_busy(redis) -> bool:
    """Whether Redis answers a PING with BUSY (a PING sent while a script runs waits for
    `busy-reply-threshold`, then gets BUSY)."""
    try:
        await redis.ping()
    except Exception as exc:  # noqa: BLE001 - redis-py has no class of its own for BUSY
        if str(exc).startswith("BUSY"):
            return True
        raise
    await asyncio.sleep(0.01)
    return False


@contextlib.asynccontextmanager
async def refusing(store: JobStore, kind: str):
    """Redis refusing the dispatcher's writes as a replicated deployment's can: too few
    replicas to write to (`min-replicas-to-write`), a replica whose primary is gone (after a
    failover that demoted it), or another client's script running past
    `busy-reply-threshold` (every command refused until it ends, here after 1.5 s)."""
    redis = store.redis
    if kind == "NOREPLICAS":
        await redis.config_set("min-replicas-to-write", 1)
    elif kind == "MASTERDOWN":
        await redis.config_set("replica-serve-stale-data", "no")
        await redis.replicaof("127.0.0.1", free_port())  # a primary that is not there
    busy = None
    if kind == "BUSY":
        await redis.config_set("busy-reply-threshold", 50)
        other = redis.client()  # a connection of its own: the script holds it
        busy = asyncio.create_task(other.eval(BUSY_SCRIPT, 0, 1_500_000))
        # Until Redis refuses: a fixed 0.2 s was not always enough for the script's own
        # connection to be made and the script to run past the threshold.
        while not await refuses_as_busy(redis):
            assert not busy.done(), "the script ended before Redis refused as BUSY"
    try:
        yield
    finally:
        if busy:
            await busy
            await other.aclose()
            await redis.config_set("busy-reply-threshold", 5000)
        elif kind == "MASTERDOWN":
            await redis.replicaof("NO", "ONE")
            await redis.config_set("replica-serve-stale-data", "yes")
        else:
            await redis.config_set("min-replicas-to-write", 0)


@pytest.mark.parametrize("kind", ["NOREPLICAS", "MASTERDOWN", "BUSY"])
def test_a_failure_redis_refuses_for_reasons_of_its_own_is_stored_once_it_takes_it(
        redis_server, tmp_path, kind):
    """The same for Redis's other refusals: the write of an EngineCrashed failure waits
    under its claim and is stored once. Before, these were not taken for faults of Redis's:
    the refusal raised out of the start (a ResponseError, or MasterDownError), the job left
    running to be taken over after its lease and run again."""
    async def body(store, dispatcher, job_id, claim):
        async with refusing(store, kind):
            task = under_claim(dispatcher, job_id, claim, lambda holder: dispatcher
                               ._store_outcome(job_id, claim, holder, 500, CRASHED))
            await asyncio.sleep(1.0 if kind != "BUSY" else 0.8)
            if task.done():
                task.result()  # its error, if it raised
                pytest.fail("the write ended while Redis refused it")
        assert await asyncio.wait_for(task, 5) is True
        job = await store.job(job_id)
        assert (job["status"], job["attempts"]) == ("failed", "1"), job
        assert await statuses(store, job_id) == ["queued", "running", "failed"]

    with_dispatcher(redis_server, tmp_path, body)


def test_a_failure_stored_with_its_answer_lost_is_stored_once(redis_server, tmp_path,
                                                               caplog):
    """The finish of a job TorchServe refused (400: trying again cannot help) ran in Redis,
    and its answer was lost on the way back. Before, that raised out of the start (a
    traceback for a job failed as it should be). The try again finds the job failed by
    that very write: nothing stored twice, no error, not run again."""
    caplog.set_level(logging.INFO, logger="sdxl_jobs.dispatcher")
    refused = {"code": 400, "type": "InvalidRequest", "message": "`width` must be ..."}

    async def body(store, dispatcher, job_id, claim):
        assert await dispatcher._store_outcome(job_id, claim, {"claim": claim}, 400,
                                               refused) is True
        job = await store.job(job_id)
        assert (job["status"], job["attempts"]) == ("failed", "1"), job
        assert await statuses(store, job_id) == ["queued", "running", "failed"]
        assert (await store.gauges())["stats"]["jobs_failed"] == 1

    with_dispatcher(redis_server, tmp_path, body, lose_answer_with=b"$6\r\nstored\r\n")
    said = [r.getMessage() for r in caplog.records if r.name == "sdxl_jobs.dispatcher"]
    assert sum("Redis failed the write of its failure (ConnectionError" in line
               for line in said) == 1, said
    assert not any("not stored" in line for line in said), said


def test_an_error_recorded_with_its_answer_lost_is_recorded_once(redis_server, tmp_path):
    """A start that failed and may pass next time (500) records its error; that write ran
    and its answer was lost. Before, that raised out of the start: the job waited out its
    lease to be started again. Now the error is written again at once (one `retry` event,
    not two) and the job is started again; and an error whose claim was taken over in the
    meantime ends this dispatcher's hold (Lost), where it started the job again itself,
    from under the dispatcher that took it over."""
    async def body(store, dispatcher, job_id, claim):
        assert await dispatcher._store_outcome(
            job_id, claim, {"claim": claim}, 500, {"code": 500, "message": "boom"}) is False
        job = await store.job(job_id)
        assert (job["status"], job["last_error"]) == ("running", "HTTP 500: boom"), job
        retries = [event for _, event in await store.events_after(job_id)
                   if event.get("retry")]
        assert retries == [{"type": "status", "status": "running",
                            "retry": "HTTP 500: boom"}]
        # Taken over (an outage longer than the lease): its error is not ours to write.
        [(entry, _)] = await store.abandoned_jobs("d2", 0, 10)
        assert (await store.start(job_id, entry, "d2", 3, 60))[0] == "claimed"
        with pytest.raises(Lost, match="running"):
            await dispatcher._failed_try(job_id, claim, {"claim": claim}, "HTTP 500: late")
        assert (await store.job(job_id))["last_error"] == "HTTP 500: boom"

    with_dispatcher(redis_server, tmp_path, body, lose_answer_with=b"$2\r\nok\r\n")


def test_an_error_a_full_redis_refuses_is_recorded_once_it_has_room(redis_server, tmp_path):
    """A failed start's error refused by a full Redis: the claim is kept and the error
    written once Redis has room, then the job is started again (that start counts)."""
    async def body(store, dispatcher, job_id, claim):
        async with full(store):
            before = await refusals(store)
            task = under_claim(dispatcher, job_id, claim, lambda holder: dispatcher
                               ._store_outcome(job_id, claim, holder, 507,
                                               {"code": 507, "message": "Worker died."}))
            await refused_twice(store, before, task)
            await held_through_a_lease(store, task)
        assert await asyncio.wait_for(task, 5) is False  # to be started again
        job = await store.job(job_id)
        assert (job["status"], job["attempts"], job["last_error"]) == \
            ("running", "1", "HTTP 507: Worker died."), job

    with_dispatcher(redis_server, tmp_path, body)


def test_a_hand_back_a_full_redis_refuses_goes_through_once_it_has_room(redis_server,
                                                                       tmp_path, caplog):
    """A job's progress refused by a full Redis, then its hand-back too, again and again:
    the claim is kept meanwhile, the refusal said once in the log, and once Redis has room
    the job is queued again, its start not counted."""
    caplog.set_level(logging.INFO, logger="sdxl_jobs.dispatcher")

    async def body(store, dispatcher, job_id, claim):
        async with full(store):
            with pytest.raises(OutOfMemoryError) as fault:
                await store.progress(job_id, claim, 1, 3)
            before = await refusals(store)
            task = under_claim(dispatcher, job_id, claim, lambda holder: dispatcher
                               ._hand_back_after_fault(job_id, claim, holder, fault.value))
            await refused_twice(store, before, task)
            await held_through_a_lease(store, task)
        assert await asyncio.wait_for(task, 5) is True
        job = await store.job(job_id)
        assert (job["status"], job["attempts"], job["redis_faults"]) == ("queued", "0", "1")
        events = [event for _, event in await store.events_after(job_id)]
        assert [event["status"] for event in events] == ["queued", "running", "queued"]
        assert events[-1]["reason"] == "Redis failed the job's writes (OutOfMemoryError)"

    with_dispatcher(redis_server, tmp_path, body)
    said = [r.getMessage() for r in caplog.records if r.name == "sdxl_jobs.dispatcher"]
    assert sum("Redis failed its hand-back" in line for line in said) == 1, said
    assert any("handed back to the queue, its start not counted" in line for line in said)


def test_a_job_claimed_again_under_the_task_that_handed_it_back_goes_out_at_once(
        redis_server, tmp_path):
    """A hand-back sets the job's idle time to the lease, so that any dispatcher takes it at
    its next read, this one's too. When this one's read came before the task that handed it
    back had ended, the job was skipped as still running, and the claim had reset its idle
    time: it waited a whole lease more (30 s by default). Now it is handed back again once
    that task has ended."""
    async def body(store, dispatcher, job_id, claim):
        [(entry, _)] = await store.redis.xrange(store.key("stream"))
        entry = entry.decode()
        ending = asyncio.Event()

        async def hand_back_then_end(holder):
            fault = RedisConnectionError("Connection closed by server.")
            handed = await dispatcher._hand_back_after_fault(job_id, claim, holder, fault)
            await ending.wait()  # the task's last moment, before it has ended
            return handed

        task = under_claim(dispatcher, job_id, claim, hand_back_then_end)
        dispatcher.in_flight[job_id] = task  # as the loop started it
        task.add_done_callback(lambda _: dispatcher._ended(job_id))
        await asyncio.wait_for(until_status(store, job_id, "queued"), 5)
        claimed = await store.abandoned_jobs("d1", LEASE_S, 10)  # the loop's next read
        assert claimed == [(entry, job_id)]
        dispatcher._take(claimed)  # still in flight: not started twice
        assert dispatcher.in_flight == {job_id: task}
        ending.set()
        assert await task is True
        assert dispatcher.in_flight == {}
        await dispatcher._release_reclaimed()  # the loop's next round
        # Any dispatcher's next read takes it, not one a lease (1 s here) later.
        assert await store.abandoned_jobs("d2", LEASE_S, 10) == [(entry, job_id)]

    with_dispatcher(redis_server, tmp_path, body)


async def until_status(store: JobStore, job_id: str, status: str) -> None:
    while (await store.job(job_id))["status"] != status:
        await asyncio.sleep(0.01)


def test_a_hand_back_with_its_answer_lost_counts_one_fault(redis_server, tmp_path, caplog):
    """The hand-back ran in Redis and its answer was lost: the try again finds the job
    queued, which that very hand-back did; one fault counted, not two, and it is logged
    as handed back."""
    caplog.set_level(logging.INFO, logger="sdxl_jobs.dispatcher")

    async def body(store, dispatcher, job_id, claim):
        fault = RedisConnectionError("Connection closed by server.")
        assert await dispatcher._hand_back_after_fault(job_id, claim, {"claim": claim},
                                                       fault) is True
        job = await store.job(job_id)
        assert (job["status"], job["attempts"], job["redis_faults"]) == ("queued", "0", "1")
        assert await statuses(store, job_id) == ["queued", "running", "queued"]

    with_dispatcher(redis_server, tmp_path, body, lose_answer_with=b"$2\r\nok\r\n")
    said = [r.getMessage() for r in caplog.records if r.name == "sdxl_jobs.dispatcher"]
    assert any("handed back to the queue, its start not counted" in line for line in said)
    assert not any("not handed back" in line for line in said), said


def test_a_start_redis_fails_is_one_warning_and_taken_over_after_the_lease(redis_server,
                                                                            tmp_path, caplog):
    """A job's start ran in Redis and its answer was lost (Redis killed or restarting as it
    answered): an outage, said in one WARNING line with Redis's reason, where it was an
    ERROR "dispatcher error" with a traceback. The start is not tried again (a second one
    would count two attempts for one); the job is taken over after its lease."""
    caplog.set_level(logging.INFO, logger="sdxl_jobs.dispatcher")

    async def go(store: JobStore):
        link = FaultyLink(redis_server.port, lose_answer_with=b"claimed")
        own = JobStore.from_url(redis_server.url.replace(f":{redis_server.port}/",
                                                         f":{link.port}/"),
                                prefix=store.prefix)
        nobody = f"http://127.0.0.1:{free_port()}"  # no TorchServe is called
        path = tmp_path / "key_file.json"
        path.write_text(json.dumps({"inference": {"key": "k"}, "API": {"key": "a"}}))
        dispatcher = Dispatcher(own, JobSettings(lease_s=LEASE_S), nobody,
                                KeyFile(path, nobody), name="d1")
        try:
            job_id = (await store.submit("alice", REQUEST, **LIMITS)).job_id
            [(entry, _)] = await own.next_jobs("d1", 1, 100)
            await asyncio.wait_for(dispatcher._guarded(entry, job_id), 10)
            assert link.dropped.is_set(), "no answer was lost: the test tested nothing"
            job = await store.job(job_id)
            assert (job["status"], job["attempts"]) == ("running", "1"), job
            await asyncio.sleep(LEASE_S)
            [(entry, taken)] = await store.abandoned_jobs("d2", LEASE_S, 10)
            assert taken == job_id
            assert await store.start(job_id, entry, "d2", 3, 60) == ("claimed", "d2#2")
        finally:
            await dispatcher.client.aclose()
            await own.close()
            link.close()

    with_store(redis_server.url, go)
    said = [r for r in caplog.records if r.name == "sdxl_jobs.dispatcher"]
    assert [(r.levelname, r.exc_info) for r in said] == [("WARNING", None)], said
    assert said[0].getMessage().endswith(
        "Redis failed its start (ConnectionError: Connection closed by server.); it is "
        "taken over after SDXL_JOBS_LEASE_S (1 s) by the first dispatcher that reaches "
        "Redis"), said[0].getMessage()


def test_a_success_stored_with_its_answer_lost_is_not_run_again(redis_server, tmp_path,
                                                                 caplog):
    """A success's finish ran in Redis and its answer was lost: the hand-back that follows
    is refused (the job has ended), so the job keeps its images and is not run again."""
    caplog.set_level(logging.INFO, logger="sdxl_jobs.dispatcher")
    png = b"\x89PNG a picture"
    final = {"image": base64.b64encode(png).decode(), "seed": 7, "format": "png"}

    async def body(store, dispatcher, job_id, claim):
        assert await dispatcher._store_outcome(job_id, claim, {"claim": claim}, 200,
                                               final) is True
        job = await store.job(job_id)
        assert (job["status"], job["attempts"]) == ("succeeded", "1"), job
        assert await store.image(job_id, 0) == png
        assert await statuses(store, job_id) == ["queued", "running", "succeeded"]

    with_dispatcher(redis_server, tmp_path, body, lose_answer_with=b"$6\r\nstored\r\n")
    said = [r.getMessage() for r in caplog.records if r.name == "sdxl_jobs.dispatcher"]
    assert any("not handed back: the job is succeeded" in line for line in said), said


def test_a_breakers_hand_back_a_full_redis_refuses_goes_through_once_it_has_room(
        redis_server, tmp_path):
    """The pod's breaker refused the job (503 CircuitOpen) and a full Redis refused its
    hand-back. Before, that raised out of the start: the job stayed running until its lease
    ran out, and the takeover counted an attempt. Now the claim is kept and the job queued
    again once Redis has room, its start not counted; the dispatcher takes no job meanwhile."""
    async def body(store, dispatcher, job_id, claim):
        refused = Refused("HTTP 503 CircuitOpen: the engine failed 3 calls in a row", 30.0)
        async with full(store):
            before = await refusals(store)
            task = under_claim(dispatcher, job_id, claim, lambda holder: dispatcher
                               ._hand_back_refused(job_id, claim, holder, refused))
            await refused_twice(store, before, task)
            await held_through_a_lease(store, task)
        assert await asyncio.wait_for(task, 5) is True
        job = await store.job(job_id)
        assert (job["status"], job["attempts"]) == ("queued", "0"), job
        assert await statuses(store, job_id) == ["queued", "running", "queued"]
        assert dispatcher.refusing_until > time.monotonic() + 20

    with_dispatcher(redis_server, tmp_path, body)


def test_a_job_whose_torchserve_stays_unavailable_goes_back_to_the_queue(redis_server,
                                                                          tmp_path, caplog):
    """The job's TorchServe went away after its start (its container crash-looping, a model
    that no longer loads) and nothing answers there. Before, the dispatcher waited for it
    for good, the claim renewed: the job stayed `running` on that pod however long the
    outage, and no dispatcher whose TorchServe was up could take it. Now, once it has waited
    a lease, the job goes back to the queue in its place, its start not counted, for any
    dispatcher's next read."""
    caplog.set_level(logging.INFO, logger="sdxl_jobs.dispatcher")

    async def body(store, dispatcher, job_id, claim):
        task = under_claim(dispatcher, job_id, claim,
                           lambda holder: dispatcher._attempt(job_id, claim, holder))
        assert await asyncio.wait_for(task, LEASE_S * 10) is True
        job = await store.job(job_id)
        assert (job["status"], job["attempts"]) == ("queued", "0"), job
        events = [event for _, event in await store.events_after(job_id)]
        assert [e["status"] for e in events if e["type"] == "status"] == \
            ["queued", "running", "queued"]
        assert "TorchServe unreachable" in events[-1]["reason"], events[-1]
        assert not dispatcher.torchserve_up  # no job taken until it is healthy again
        [(_, taken)] = await store.abandoned_jobs("d2", LEASE_S, 10)
        assert taken == job_id

    with_dispatcher(redis_server, tmp_path, body)
    said = [r.getMessage() for r in caplog.records if r.name == "sdxl_jobs.dispatcher"]
    assert any("handed back to the queue" in line for line in said), said


@pytest.fixture
def full_queue_server(model_store, tmp_path):
    """(a real TorchServe whose queue holds one request, its cancel flags' directory); a
    request may cost 100 default ones, so that one can keep the worker busy until flagged."""
    cancel_dir = tmp_path / "cancel"
    cancel_dir.mkdir()
    server = TorchServeProcess(tmp_path / "ts-run", model_store, {"sdxl": "sdxl-1.0.mar"},
                               Addresses.free(), env={
                                   "TS_JOB_QUEUE_SIZE": "1", "SDXL_CANCEL_DIR": str(cancel_dir),
                                   "SDXL_MAX_REQUEST_COST": "100",
                                   "SDXL_MAX_CALL_COST": "100"})
    try:
        server.start()
        server.wait_ready("sdxl", timeout=240)
        yield server, cancel_dir
    finally:
        server.stop()


def batches_received(server: TorchServeProcess) -> int:
    """Batches the server's worker has taken so far (it logs one line as it takes each)."""
    try:
        log = (server.run_dir / "logs" / "model_log.log").read_text(errors="replace")
    except FileNotFoundError:
        return 0
    return log.count("Backend received inference at:")


@pytest.mark.e2e
def test_a_job_whose_torchserve_is_up_with_its_queue_full_waits_there_and_runs(
        redis_server, full_queue_server, tmp_path, caplog):
    """TorchServe is up, its worker READY and busy, its queue full: it answers the job 503
    for longer than a lease. That is no reason to hand the job back (``healthy``): every
    pod's queue is full then, and the job went back and forth between queued and running
    each lease. It waits here, its claim kept, and runs once the queue has room: one start,
    never queued again. (The hand-back of one whose TorchServe is not up:
    test_a_job_whose_torchserve_stays_unavailable_goes_back_to_the_queue.)"""
    caplog.set_level(logging.INFO, logger="sdxl_jobs.dispatcher")
    server, cancel_dir = full_queue_server
    keys = server.key_file()
    token = uuid.uuid4().hex  # the busy request's cancel flag

    def post(body: dict, headers: dict | None = None):
        return keys.call("POST", f"{server.addresses.inference}/predictions/sdxl", "inference",
                         json.dumps(body).encode(), {"Content-Type": "application/json",
                                                     **(headers or {})}, timeout=600)

    def refusals_waited() -> int:
        return sum("TorchServe unavailable" in r.getMessage() for r in caplog.records
                   if r.name == "sdxl_jobs.dispatcher" and "waits" in r.getMessage())

    async def body(store, dispatcher, job_id, claim):
        with ThreadPoolExecutor(2) as pool:
            taken = batches_received(server)
            # Minutes of work on a CPU (cost 53), until its flag stops it.
            busy = pool.submit(post, {"prompt": "busy", "width": 128, "height": 128,
                                      "num_inference_steps": 100, "num_images": 4},
                               {CANCEL_HEADER: token})
            try:
                await asyncio.to_thread(
                    wait_until, lambda: batches_received(server) > taken or busy.done(), 120,
                    "the busy request to reach the worker")
                # Sent once the worker is busy, so that it waits in the queue (of one).
                queued = pool.submit(post, {"prompt": "queued", "num_inference_steps": 1})
                depth = QueueDepth(keys, "sdxl", "1.0")
                await asyncio.to_thread(wait_until, lambda: depth() == 1 or queued.done(), 60,
                                        "a request waiting in TorchServe's queue")
                task = under_claim(dispatcher, job_id, claim,
                                   lambda holder: dispatcher._attempt(job_id, claim, holder))
                # Refused five times: from the fourth on (after 0.25 + 0.5 + 1 s), a lease
                # of refusals, each time with TorchServe healthy.
                deadline = time.monotonic() + 60
                while refusals_waited() < 5:
                    assert not task.done(), await statuses(store, job_id)
                    assert time.monotonic() < deadline, "the job was not refused five times"
                    await asyncio.sleep(0.1)
                assert not busy.done() and not queued.done()  # the queue was full throughout
                assert (await store.job(job_id))["status"] == "running"
            finally:
                (cancel_dir / token).touch()
            assert await asyncio.wait_for(task, 180) is True
            assert busy.result()[0] != 200 and queued.result()[0] == 200
        job = await store.job(job_id)
        assert job["status"] == "succeeded", job
        assert await statuses(store, job_id) == ["queued", "running", "succeeded"]

    with_dispatcher(redis_server, tmp_path, body, server=server)
    said = [r.getMessage() for r in caplog.records if r.name == "sdxl_jobs.dispatcher"]
    assert not any("handed back" in line for line in said), said


@pytest.mark.parametrize("args, env, said", [
    # No scheme: it checked in as a live dispatcher and never started a job, saying nothing.
    (["--torchserve", "127.0.0.1:{port}"], {}, "--torchserve must be http://HOST[:PORT]"),
    (["--management", "http://127.0.0.1:99999"], {}, "--management must be http://HOST[:PORT]"),
    ([], {"TS_INFERENCE_ADDRESS": "localhost:{port}"}, "TS_INFERENCE_ADDRESS must be http://"),
    (["--capacity", "-1"], {}, "--capacity must be 0"),  # a traceback after its start
    # Host names no lookup can ever find: it asked for them for good.
    (["--torchserve", "http://torch serve:{port}"], {}, "--torchserve must be http://"),
    (["--management", "http://ts..local:{port}"], {}, "--management must be http://"),
    # An empty port: it called port 80, another server's or none.
    (["--torchserve", "http://127.0.0.1:"], {}, "--torchserve must be http://HOST[:PORT]"),
    ([], {"TS_MANAGEMENT_ADDRESS": "http://[::1]:"}, "TS_MANAGEMENT_ADDRESS must be http://"),
])
def test_a_dispatcher_given_an_address_or_capacity_it_cannot_use_ends_its_start(
        redis_server, args, env, said):
    port = str(free_port())
    last = refused_start("sdxl_jobs.dispatcher",
                         ["--redis", redis_server.url, "--key-file", "key_file.json",
                          *[arg.format(port=port) for arg in args]],
                         {name: value.format(port=port) for name, value in env.items()})
    assert last.startswith(f"python -m sdxl_jobs.dispatcher: error: {said}"), last



@pytest.mark.parametrize("variable, value, said", [
    # A password in the URL is not repeated.
    ("HTTPS_PROXY", "socks5://user:secret@127.0.0.1:1080", "HTTPS_PROXY names a socks5:// "
     "proxy for webhooks, which needs the socksio package, not installed here"),
    ("all_proxy", "ftp://127.0.0.1:21", "all_proxy names a ftp:// proxy for webhooks, which "
     "they cannot go through"),
])
def test_a_proxy_webhooks_cannot_use_ends_the_dispatchers_start_in_one_line(
        redis_server, monkeypatch, variable, value, said):
    """A proxy httpx cannot use (socks5:// without socksio) ended the start with a traceback
    from deep in httpx; it is one line naming the variable, without its value."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy",
                 "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    last = refused_start("sdxl_jobs.dispatcher",
                         ["--redis", redis_server.url, "--key-file", "key_file.json"],
                         {variable: value})
    assert last.startswith(f"python -m sdxl_jobs.dispatcher: error: {said}"), last
    assert "secret" not in last, last

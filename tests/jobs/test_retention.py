"""An expired job leaves the files of a Redis the job API is told to have rewritten
(``SDXL_JOBS_REDIS_REWRITE_S``, as the Kubernetes overlay sets it for its own Redis): real
redis-servers, the API and a dispatcher as real processes, a real TorchServe."""

from __future__ import annotations

import secrets
import shutil
import threading
import time

import pytest
import redis

from sdxl_jobs.keys import write_private
from sdxl_jobs.processes import Managed, RedisServer, free_port
from sdxl_jobs.retention import RewriteRefused, forget_expired

from jobstack import files_holding, make_key, start_api, start_dispatcher
from lifetimes import wait_until

pytestmark = [pytest.mark.jobs, pytest.mark.e2e]

FAST = {"num_inference_steps": 2, "width": 64, "height": 64}


def job_stack(redis_url: str, server, tmp_path, env: dict):
    """(API, dispatcher, API key) on ``redis_url``, the dispatcher checked in and the
    model's bounds published; the caller stops both."""
    api = start_api(redis_url, tmp_path, env)
    started = time.time()
    dispatcher = start_dispatcher(redis_url, server, tmp_path, "d-retention", env)
    client = redis.Redis.from_url(redis_url)
    try:
        wait_until(lambda: (client.zscore("sdxl:dispatchers", "d-retention") or 0) > started
                   and client.exists("sdxl:model") or not dispatcher.running(), 120,
                   "the dispatcher to check in and publish the model", detail=dispatcher.tail)
    finally:
        client.close()
    assert dispatcher.running(), dispatcher.tail()
    return api, dispatcher, make_key(redis_url, "retention")


def succeeded(api, key: str, prompt: str, dispatcher) -> dict:
    status, _, job = api.json("POST", "/v1/jobs", key, {"prompt": prompt, **FAST})
    assert status == 202, job

    def final():
        seen = api.json("GET", f"/v1/jobs/{job['id']}", key)[2]
        return seen if seen["status"] in ("succeeded", "failed", "canceled") else None
    done = wait_until(final, 120, f"job {job['id']} to end", interval=0.05,
                      detail=dispatcher.tail)
    assert done["status"] == "succeeded", done
    return done


def test_an_expired_jobs_prompt_leaves_the_files_of_a_redis_the_api_has_rewritten(
        server, tmp_path):
    """The Kubernetes overlay's Redis kept an expired job's prompt, request and images in
    its append-only file until Redis rewrote it, which it does once the file has doubled
    and passed 64 MB: on a quiet server, weeks. Nothing there asked for a rewrite. With
    SDXL_JOBS_REDIS_REWRITE_S the API asks, and the prompt leaves within the interval."""
    ttl_s, every_s = 3, 3
    own = RedisServer(tmp_path / "redis")  # configured as the overlay's: appendonly, no RDB
    own.start()
    env = {"SDXL_JOBS_RESULT_TTL_S": str(ttl_s), "SDXL_JOBS_REDIS_REWRITE_S": str(every_s)}
    api = dispatcher = None
    try:
        api, dispatcher, key = job_stack(own.url, server, tmp_path, env)
        prompt = f"a retention canary {secrets.token_hex(8)}"
        job = succeeded(api, key, prompt, dispatcher)
        ended = time.monotonic()
        # What the files hold is seen at all: the search below could not fail otherwise.
        assert files_holding(own.data_dir, prompt.encode())
        # The expiry, then at most the interval, a tenth of it between checks, and a
        # rewrite of a tiny store.
        wait_until(lambda: not files_holding(own.data_dir, prompt.encode()),
                   ttl_s + every_s * 1.1 + 5, "the expired job's prompt to leave Redis's files",
                   interval=0.2, detail=lambda: files_holding(own.data_dir, prompt.encode()))
        assert time.monotonic() - ended >= ttl_s - 0.5, "gone before it expired?"
        assert api.call("GET", f"/v1/jobs/{job['id']}", key)[0] == 404
        assert sorted(path.name for path in own.data_dir.iterdir()) == [
            "appendonlydir", "redis.conf", "redis.log", "redis.pid"]  # no dump.rdb
        assert prompt not in api.process.tail(1000) + dispatcher.tail(1000)
    finally:
        for process in (dispatcher, api and api.process, own):
            if process is not None:
                process.stop()


def configured_redis(folder, *lines: str):
    """(URL, process) of a redis-server with a password and ``lines`` of configuration in
    ``folder``, answering; the caller stops it."""
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    folder.mkdir()
    port, password = free_port(), secrets.token_hex(16)
    write_private(folder / "redis.conf", "\n".join([
        f"port {port}", "bind 127.0.0.1", f"dir {folder}", f"requirepass {password}",
        'save ""', "daemonize no", *lines, ""]))
    process = Managed([binary, str(folder / "redis.conf")], folder / "redis.log")
    process.start()
    url = f"redis://:{password}@127.0.0.1:{port}/0"

    def answers() -> bool:
        try:
            with redis.Redis.from_url(url, socket_timeout=1) as client:
                return bool(client.ping())
        except redis.RedisError:
            return False
    try:
        wait_until(lambda: answers() or not process.running(), 20, "the Redis to answer",
                   detail=process.tail)
        assert process.running(), process.tail()
    except BaseException:
        process.stop()
        raise
    return url, process


@pytest.fixture
def refusing_redis(tmp_path):
    """(URL, process) of a redis-server that refuses BGREWRITEAOF, as managed services
    rename or remove it, append-only as ours."""
    url, process = configured_redis(tmp_path / "refusing", "appendonly yes",
                                    "appendfsync always", 'rename-command BGREWRITEAOF ""')
    yield url, process
    process.stop()


def test_a_redis_that_refuses_the_rewrite_is_one_warning_and_jobs_go_on(
        refusing_redis, server, tmp_path):
    """A Redis of the user's may refuse BGREWRITEAOF: the API says so in one WARNING line,
    however often it asks, and every job still succeeds."""
    url, _ = refusing_redis
    env = {"SDXL_JOBS_RESULT_TTL_S": "2", "SDXL_JOBS_REDIS_REWRITE_S": "1"}
    api = dispatcher = None
    try:
        api, dispatcher, key = job_stack(url, server, tmp_path, env)
        for n in range(2):
            succeeded(api, key, f"a refused rewrite {n}", dispatcher)
        # Keys expired, so each check (every 0.1 s, a lease a second) wants a rewrite.
        time.sleep(4)
        log = api.process.tail(1000)
        warnings = [line for line in log.splitlines() if " WARNING " in line]
        assert len(warnings) == 1, log
        assert "BGREWRITEAOF refused" in warnings[0] and "unknown command" in warnings[0]
        assert "Traceback" not in log
        assert api.json("GET", "/v1/health", None)[0] == 200
        assert api.process.running() and dispatcher.running()
    finally:
        for process in (dispatcher, api and api.process):
            if process is not None:
                process.stop()


def test_several_callers_ask_for_one_rewrite_per_interval(redis_server):
    """Every API replica (and make serve-jobs) calls forget_expired on one Redis: the lease
    lets one of them ask per interval, where each asked every interval, and asks only when
    keys expired since the last rewrite.

    Each ask is timed from before its call to after it: the lease is taken somewhere in
    between. Timed after it alone, two asks a lease apart looked 0.85 s apart on a busy
    2-core machine (the first call held up after taking its lease), a third of runs."""
    every_s, callers, seconds = 1.0, 4, 4.5
    client = redis.Redis.from_url(redis_server.url)
    client.delete("sdxl:aof-rewrite:lease", "sdxl:aof-rewrite:seen")
    stop = threading.Event()
    asked: list[tuple[float, float]] = []  # (called, answered) of each ask

    def caller():
        with redis.Redis.from_url(redis_server.url) as own:
            while not stop.wait(0.02):
                called = time.monotonic()
                if forget_expired(own, every_s):
                    asked.append((called, time.monotonic()))
    try:
        threads = [threading.Thread(target=caller) for _ in range(callers)]
        for thread in threads:
            thread.start()
        started = time.monotonic()
        while time.monotonic() - started < seconds:  # a key expires every 0.1 s
            client.set(f"sdxl:retention-test:{time.monotonic_ns()}", "x", px=50)
            last_set = time.monotonic()
            time.sleep(0.1)
        # Nothing expires now: after the rewrite that takes the last expiries, none.
        time.sleep(2.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    asked.sort()
    # Every key has expired by then: an ask called later finds them all, or none.
    all_expired = last_set + 0.05
    while_expiring = [ask for ask in asked if ask[0] <= all_expired]
    assert len(while_expiring) >= int(seconds / every_s), asked
    # One lease per interval: the next ask's lease is taken a whole interval after the one
    # before (Redis's clock counts whole milliseconds: 0.01 s spare).
    assert all(answered - called >= every_s - 0.01
               for (called, _), (_, answered) in zip(asked, asked[1:])), asked
    # The one that takes the last expiries, and none after it.
    assert len([ask for ask in asked if ask[0] > all_expired]) <= 1, asked
    client.close()


def test_a_redis_without_an_append_only_file_gets_none(tmp_path):
    """BGREWRITEAOF on a Redis whose append-only file is off writes one anyway: a new copy
    of every job on a disk that held none. Refused instead, saying why."""
    url, process = configured_redis(tmp_path / "no-aof", "appendonly no")
    try:
        with redis.Redis.from_url(url) as client:
            client.set("sdxl:retention-test", "x", px=10)
            time.sleep(0.05)
            with pytest.raises(RewriteRefused, match=r"append-only file is off"):
                forget_expired(client, 1.0)
        assert not (tmp_path / "no-aof" / "appendonlydir").exists()
    finally:
        process.stop()


def test_a_redis_that_refuses_scan_is_refused_not_retried_in_silence(tmp_path):
    """An ACL user without SCAN (or a server that renamed it) was a RedisError, logged at
    DEBUG at every check: the documented WARNING never came, and no rewrite either."""
    url, process = configured_redis(tmp_path / "no-scan", 'rename-command SCAN ""')
    try:
        with redis.Redis.from_url(url) as client:
            with pytest.raises(RewriteRefused, match=r"SCAN refused"):
                forget_expired(client, 1.0)
    finally:
        process.stop()

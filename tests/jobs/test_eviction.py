"""A Redis whose ``maxmemory-policy`` evicts keys (``allkeys-lru``, as many managed services
default to), against a real redis-server: the keys it deletes are deleted by its own
eviction, never by a ``DEL`` of ours. What the queue, the dispatcher and the API do when a
job's record is gone, and what the API and a dispatcher say of such a policy."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import secrets

import pytest
import redis
from PIL import Image

from sdxl_jobs.dispatcher import Dispatcher, Lost
from sdxl_jobs.processes import RedisServer, free_port
from sdxl_jobs.settings import JobSettings
from sdxl_jobs.store import JobStore, usable_at_start
from sdxl_serve.management import KeyFile

from jobstack import (LIMITS, REQUEST, finish_as_a_dispatcher, make_key, start_api,
                      with_store)
from test_api import GOOD, metrics
from test_persistence import LOSS_ERROR

pytestmark = pytest.mark.jobs

# Far idler than any key a test touches: the key Redis's LRU evicts first.
IDLEST_S = 100_000


@pytest.fixture(scope="module")
def evicting_server(tmp_path_factory):
    """A redis-server that evicts with ``allkeys-lru`` when full (no ``maxmemory`` until a
    test sets one), its eviction sampling every key: Redis's LRU is exact then, where its
    default 5 samples choose among a few keys at random."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    client = redis.Redis.from_url(server.url)
    client.config_set("maxmemory-policy", "allkeys-lru")
    client.config_set("maxmemory-samples", 64)
    client.close()
    yield server
    server.stop()


@pytest.fixture
def evicting_redis(evicting_server):
    """The evicting server, emptied: another test's keys would be idler than this one's."""
    client = redis.Redis.from_url(evicting_server.url)
    client.flushall()
    client.close()
    return evicting_server


def evict(url: str, key: str) -> None:
    """Have Redis evict ``key`` as it does when full: the key is made the idlest (every
    other touched, its own idle time set by a RESTORE of itself), then ``maxmemory`` is
    lowered 32 bytes at a time below what Redis uses until its LRU evicts one key, and
    raised again. Fails unless that key, and it alone, went. A blocking client: called from
    a test's event loop, it holds the dispatcher's tasks there, so none touches the key
    meanwhile (which would make another key the idlest)."""
    client = redis.Redis.from_url(url)
    try:
        others = [name for name in client.scan_iter(count=1000) if name != key.encode()]
        if others:
            client.touch(*others)
        client.restore(key, max(client.pttl(key), 0), client.dump(key), replace=True,
                       idletime=IDLEST_S)
        evicted = client.info("stats")["evicted_keys"]
        limit = client.info("memory")["used_memory"] + 4096
        try:
            while client.info("stats")["evicted_keys"] == evicted:
                assert limit > 0, "Redis evicted nothing"
                limit -= 32
                client.config_set("maxmemory", limit)
        finally:
            client.config_set("maxmemory", 0)
        left = set(client.scan_iter(count=1000))
        assert client.info("stats")["evicted_keys"] == evicted + 1
        assert key.encode() not in left and set(others) <= left, "Redis evicted another key"
    finally:
        client.close()


def a_dispatcher(store: JobStore, tmp_path, name: str = "d1", lease_s: float = 30.0
                 ) -> Dispatcher:
    """A dispatcher whose TorchServe is never called (the jobs here never reach it)."""
    path = tmp_path / "key_file.json"
    path.write_text(json.dumps({"inference": {"key": "k"}, "API": {"key": "a"}}))
    nobody = f"http://127.0.0.1:{free_port()}"
    return Dispatcher(store, JobSettings(lease_s=lease_s), nobody, KeyFile(path, nobody),
                      name=name)


def test_a_queued_job_redis_evicted_is_dropped_in_one_line_and_leaves_the_queue(
        evicting_redis, tmp_path, caplog):
    """A queued job's record evicted, its queue entry not: the dispatcher that reads the
    entry drops it with one WARNING naming the job (not its prompt), and the job leaves the
    queue's counts. Before, nothing was logged, and the job stayed `queued` on /metrics for
    good, its age growing into SDXLJobsWaitingTooLong (or SDXLJobsNoDispatcher once the
    dispatchers scaled to zero, the stream being empty)."""
    async def body(store: JobStore):
        job_id = (await store.submit("alice", REQUEST, **LIMITS)).job_id
        evict(evicting_redis.url, store.key("job", job_id))
        [(entry, read)] = await store.next_jobs("d1", 1, 100)
        assert read == job_id
        dispatcher = a_dispatcher(store, tmp_path)
        try:
            await dispatcher.run_job(entry, job_id)
        finally:
            await dispatcher.client.aclose()
        gauges = await store.gauges()
        assert (gauges["queued"], gauges["running"], gauges["backlog"]) == (0, 0, 0), gauges
        assert gauges["oldest_age_s"] == 0.0, gauges
        assert (await store.redis.xpending(store.key("stream"), "dispatchers"))["pending"] == 0
        assert await store.job(job_id) is None
        return job_id
    caplog.set_level(logging.INFO, logger="sdxl_jobs")
    job_id = with_store(evicting_redis.url, body)
    said = [r for r in caplog.records if job_id in r.getMessage()]
    assert [(r.levelname, r.getMessage()) for r in said] == [
        ("WARNING", f"job {job_id} dropped: its record is gone from Redis (evicted by a "
                    f"maxmemory-policy other than noeviction, or lost with Redis's data)")]
    assert REQUEST["prompt"] not in caplog.text


def test_a_running_job_redis_evicted_ends_its_start_and_leaves_running(evicting_redis,
                                                                       tmp_path, caplog):
    """A running job's record evicted under its dispatcher: its result's write finds it
    gone, and its start ends at once, its entry out of the queue and the job out of the
    running count, with the one WARNING line. Before, the result's write said only
    "result not stored: the job is gone" (INFO), the entry stayed pending for a lease, and
    the job stayed `running` on /metrics for good (its busy spell never ending, which
    estimated starts divide by)."""
    async def body(store: JobStore):
        job_id = (await store.submit("alice", REQUEST, **LIMITS)).job_id
        [(entry, _)] = await store.next_jobs("d1", 1, 100)
        outcome, claim = await store.start(job_id, entry, "d1", 3, 60)
        assert outcome == "claimed"
        evict(evicting_redis.url, store.key("job", job_id))
        dispatcher = a_dispatcher(store, tmp_path)
        try:
            with pytest.raises(Lost, match="^gone$"):
                await dispatcher._store_outcome(job_id, claim, {"claim": claim}, 200,
                                                {"image": "", "seed": 1})
            # What run_job does with that Lost: start again, which finds the record gone.
            await dispatcher.run_job(entry, job_id)
        finally:
            await dispatcher.client.aclose()
        gauges = await store.gauges()
        assert (gauges["queued"], gauges["running"], gauges["backlog"]) == (0, 0, 0), gauges
        assert (await store.redis.xpending(store.key("stream"), "dispatchers"))["pending"] == 0
        assert await store.redis.get(store.key("busy-since")) is None
        return job_id
    caplog.set_level(logging.INFO, logger="sdxl_jobs")
    job_id = with_store(evicting_redis.url, body)
    said = [(r.levelname, r.getMessage()) for r in caplog.records if job_id in r.getMessage()]
    assert len(said) == 1 and said[0][0] == "WARNING" and "dropped" in said[0][1], said


def test_a_job_whose_record_redis_evicted_while_it_ran_is_dropped_in_one_line(
        evicting_redis, tmp_path, caplog):
    """A job started and waiting for TorchServe (none answers here), its record evicted:
    the claim's next renewal finds it gone, the start ends, and the job leaves the queue at
    once, in one WARNING. Before, the renewal's "gone" ended the start as a cancel
    ("is no longer ours (canceled while generating)", INFO), the entry stayed pending for a
    lease and the job `running` on /metrics for good."""
    async def body(store: JobStore):
        job_id = (await store.submit("alice", REQUEST, **LIMITS)).job_id
        [(entry, _)] = await store.next_jobs("d1", 1, 100)
        dispatcher = a_dispatcher(store, tmp_path, lease_s=1.0)
        try:
            task = asyncio.create_task(dispatcher.run_job(entry, job_id))
            for _ in range(200):
                if await store.status(job_id) == "running":
                    break
                await asyncio.sleep(0.05)
            assert await store.status(job_id) == "running"
            evict(evicting_redis.url, store.key("job", job_id))
            await asyncio.wait_for(task, 10)
        finally:
            await dispatcher.client.aclose()
        gauges = await store.gauges()
        assert (gauges["queued"], gauges["running"], gauges["backlog"]) == (0, 0, 0), gauges
        assert (await store.redis.xpending(store.key("stream"), "dispatchers"))["pending"] == 0
        return job_id
    caplog.set_level(logging.INFO, logger="sdxl_jobs")
    job_id = with_store(evicting_redis.url, body)
    said = [(r.levelname, r.getMessage()) for r in caplog.records if job_id in r.getMessage()
            and "waits" not in r.getMessage()]  # its wait for TorchServe
    assert len(said) == 1 and said[0][0] == "WARNING" and "dropped" in said[0][1], said


def test_a_key_whose_queued_job_redis_evicted_is_not_held_at_its_cap(evicting_redis):
    """A key at its cap of queued and running jobs, one of which Redis evicted: its next
    submit is taken. Before, the evicted job held its place for good (it never ends, so
    nothing took it out), and a key whose jobs were evicted was refused (429) for good."""
    async def body(store: JobStore):
        limits = {**LIMITS, "max_active": 2}
        first = (await store.submit("alice", REQUEST, **limits)).job_id
        await store.submit("alice", REQUEST, **limits)
        assert (await store.submit("alice", REQUEST, **limits)).outcome == "cap"
        evict(evicting_redis.url, store.key("job", first))
        again = await store.submit("alice", REQUEST, **limits)
        assert again.outcome == "created", again
        assert (await store.submit("alice", REQUEST, **limits)).outcome == "cap"
        assert first.encode() not in await store.redis.smembers(store.key("active", "alice"))
    with_store(evicting_redis.url, body)


def test_a_start_warns_once_of_a_policy_that_evicts_and_metrics_says_it(evicting_redis,
                                                                        tmp_path, caplog):
    """The API's and a dispatcher's start say in one WARNING that Redis evicts, naming the
    policy and what it deletes; /metrics has `sdxl_jobs_store_evicts 1` (the alert's
    series), 0 once the policy is `noeviction`, with no restart. Before, nothing anywhere
    said it."""
    caplog.set_level(logging.INFO, logger="sdxl_jobs")
    assert usable_at_start(evicting_redis.url, "exiting")  # as a dispatcher starts
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "evicts keys (maxmemory-policy allkeys-lru)" in warned[0] \
        and "set maxmemory-policy noeviction" in warned[0], warned
    assert evicting_redis.password not in caplog.text
    api = start_api(evicting_redis.url, tmp_path)
    client = redis.Redis.from_url(evicting_redis.url)
    try:
        assert metrics(api)["sdxl_jobs_store_evicts"] == {"": 1}
        client.config_set("maxmemory-policy", "noeviction")
        assert metrics(api)["sdxl_jobs_store_evicts"] == {"": 0}
    finally:
        client.config_set("maxmemory-policy", "allkeys-lru")
        client.close()
        api.process.stop()
    said = api.process.log_path.read_text()
    assert said.count("maxmemory-policy allkeys-lru") == 1, said


def test_a_policy_an_acl_user_may_not_read_is_said_and_asked_once(evicting_redis, tmp_path,
                                                                  caplog):
    """An ACL user without `@dangerous` commands (as the docs advise) may not run INFO: the
    start says that the policy cannot be read (INFO, not an error: nothing is known to be
    wrong), /metrics leaves `sdxl_jobs_store_evicts` out rather than guess, and INFO is
    asked once, not at every scrape (each refusal is counted in Redis's ACL log)."""
    password = secrets.token_hex(16)
    admin = redis.Redis.from_url(evicting_redis.url)
    admin.execute_command("ACL", "SETUSER", "jobs", "on", f">{password}", "~sdxl:*",
                          "resetchannels", "+@all", "-@dangerous")
    url = f"redis://jobs:{password}@127.0.0.1:{evicting_redis.port}/0"
    api = None
    try:
        caplog.set_level(logging.INFO, logger="sdxl_jobs")
        assert usable_at_start(url, "exiting")
        said = [(r.levelname, r.getMessage()) for r in caplog.records
                if "maxmemory-policy" in r.getMessage()]
        assert said == [("INFO", "the job store's maxmemory-policy cannot be read (Redis "
                                 "refuses INFO): it must be noeviction, or a full Redis "
                                 "deletes jobs and API keys without a word")], said
        admin.acl_log_reset()
        api = start_api(url, tmp_path)
        make_key(url)
        for _ in range(3):
            found = metrics(api)
            assert "sdxl_jobs_store_evicts" not in found and \
                found["sdxl_jobs_store_writable"] == {"": 1}, found
        # Once by the API's start, once by its store at the first scrape; none since.
        refused = [entry for entry in admin.acl_log() if entry["object"] == "info"]
        assert len(refused) == 1 and refused[0]["count"] == 2, refused
    finally:
        if api is not None:
            api.process.stop()
        admin.execute_command("ACL", "DELUSER", "jobs")
        admin.close()


def test_queued_jobs_whose_stream_redis_evicted_are_put_back_in_it(evicting_redis, caplog):
    """The queue's stream evicted with its consumer groups, its entries with it: the next
    dispatcher read makes the groups again, as after a Redis that lost its data, and puts
    the queued jobs back in the stream, in submit order, saying how many in the ERROR that
    Redis lost data (``test_persistence.py``); a running job is
    left to its dispatcher (an entry for it would be read by another, which would run it
    twice). Before, the groups were made again and the queued jobs stayed `queued` for
    good, never delivered, the stream empty (KEDA scaled the GPU pods to zero on it)."""
    async def body(store: JobStore):
        running = (await store.submit("alice", REQUEST, **LIMITS)).job_id
        queued = [(await store.submit("alice", REQUEST, **LIMITS)).job_id for _ in range(3)]
        [(entry, _)] = await store.next_jobs("d1", 1, 100)
        assert (await store.start(running, entry, "d1", 3, 60))[0] == "claimed"
        evict(evicting_redis.url, store.key("stream"))
        read = await store.next_jobs("d2", 10, 100)
        assert [job_id for _, job_id in read] == queued
        assert (await store.gauges())["backlog"] == len(queued)
        for entry, job_id in read:
            assert (await store.start(job_id, entry, "d2", 3, 60))[0] == "claimed"
        assert await store.next_jobs("d3", 10, 100) == []  # each put back once
    caplog.set_level(logging.WARNING, logger="sdxl_jobs")
    with_store(evicting_redis.url, body)
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("ERROR", LOSS_ERROR % 3)]


def test_a_dispatcher_start_puts_back_the_queued_jobs_of_a_stream_evicted_meanwhile(
        evicting_redis, tmp_path, caplog):
    """The stream evicted while no dispatcher ran (GPU pods scaled to zero): the next submit
    makes it again (XADD) without its group, and the dispatcher KEDA starts for it makes
    the group at its start, so no read of its ever finds the group gone. That start puts
    the older queued jobs back too, behind the new one, in one WARNING. Before, only the
    new job ran, and the older ones stayed `queued` for good."""
    async def body(store: JobStore):
        older = [(await store.submit("alice", REQUEST, **LIMITS)).job_id for _ in range(2)]
        evict(evicting_redis.url, store.key("stream"))
        newer = (await store.submit("alice", REQUEST, **LIMITS)).job_id
        dispatcher = a_dispatcher(store, tmp_path)
        stop = asyncio.Event()
        stop.set()  # its start only: no TorchServe is waited for
        await dispatcher.run(stop)
        read = await store.next_jobs("d2", 10, 100)
        assert [job_id for _, job_id in read] == [newer, *older]
    caplog.set_level(logging.WARNING, logger="sdxl_jobs")
    with_store(evicting_redis.url, body)
    assert [r.getMessage() for r in caplog.records] == [
        "2 queued job(s) whose stream entries were gone (Redis evicted the stream, or lost "
        "its data) put back in it"]


@pytest.mark.parametrize("preview", ["", "?max_side=16"])
def test_an_image_redis_evicted_is_a_404_naming_the_image_not_the_job(evicting_redis,
                                                                      tmp_path, preview):
    """A finished job's image evicted, the job kept (under volatile-lru the images, large
    and with an expiry, are the first keys to go): its GET, and its preview's, are a 404
    naming the image and why it may be gone, while the job answers `succeeded`. Before, it
    said there was no such job for this key, beside a job that said it had the image. The
    TTL it quotes is the one the job ended with (its dispatcher's), not the reading API's."""
    api = start_api(evicting_redis.url, tmp_path)
    try:
        key = make_key(evicting_redis.url)
        status, _, job = api.json("POST", "/v1/jobs", key, GOOD)
        assert status == 202, job
        image = io.BytesIO()
        Image.new("RGB", (32, 32), "red").save(image, "PNG")
        finish_as_a_dispatcher(evicting_redis.url,
                               {job["id"]: ("png", [image.getvalue(), image.getvalue()])},
                               ttl_s=600)  # the API's is 3600

        evict(evicting_redis.url, f"sdxl:image:{job['id']}:1")
        status, _, body = api.json("GET", f"/v1/jobs/{job['id']}/images/1{preview}", key)
        assert status == 404 and body["field"] == "index", body
        assert body["message"] == (f"image 1 of job {job['id']} is no longer kept: its "
                                   f"results expired (600 s after the job ended), or "
                                   f"Redis evicted it when full"), body
        status, _, shown = api.json("GET", f"/v1/jobs/{job['id']}", key)
        assert status == 200 and shown["status"] == "succeeded", shown
        assert api.call("GET", f"/v1/jobs/{job['id']}/images/0{preview}", key)[0] == 200
    finally:
        api.process.stop()

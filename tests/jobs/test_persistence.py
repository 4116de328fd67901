"""A Redis without an append-only file (``appendonly no``, Debian's default), against a real
redis-server restarted for real: what the API and the dispatchers say of it at their start,
and what a dispatcher says when Redis has lost its data. Before, a restart of such a Redis
lost every job and API key accepted since its last snapshot without a word: ``/v1/health``
stayed 200, clients got 401 and 404, the API logged nothing, the dispatchers one WARNING
each about their consumer groups."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets

import pytest
import redis

from sdxl_jobs.processes import RedisServer, dispatcher_process, free_port
from sdxl_jobs.settings import redacted_url
from sdxl_jobs.store import JobStore, iso, usable_at_start

from jobstack import LIMITS, REQUEST, start_api
from test_api import metrics
from lifetimes import wait_until

pytestmark = pytest.mark.jobs

PERSISTENCE_WARNING = "keeps no append-only file (appendonly no)"
# What the dispatcher that makes the consumer groups again says, with how many queued jobs
# it put back in the stream.
LOSS_ERROR = ("Redis lost its data: the job queue's consumer groups were gone (Redis restarted "
              "without an append-only file, was flushed, or evicted the stream). The jobs and "
              "API keys accepted since its last save are gone (evicted: those it chose): their "
              "clients get 404 and 401 (the API key is not known) until the jobs are submitted "
              "and the keys registered again (python -m sdxl_jobs.keys create). Groups created "
              "again, and %d queued job(s) whose entries went with the stream put back in it. "
              "To keep them: appendonly yes, maxmemory-policy noeviction")
# What an API that finds the store's creation mark changed says, with the two times.
MARK_ERROR = ("Redis lost its data: the job store's creation mark (sdxl:store-created) was "
              "gone (Redis restarted without an append-only file, was flushed, or evicted it). "
              "The jobs and API keys accepted since its last save are gone (evicted: those it "
              "chose): their clients get 404 and 401 (the API key is not known) until the jobs "
              "are submitted and the keys registered again (python -m sdxl_jobs.keys create). "
              "Marked again: the store was set up at %s as this API read it before, at %s now "
              "(sdxl_jobs_store_created_timestamp_seconds). To keep them: appendonly yes, "
              "maxmemory-policy noeviction")
CREATED = "sdxl_jobs_store_created_timestamp_seconds"


@pytest.fixture
def volatile_redis(tmp_path):
    """A redis-server with Debian's default persistence, less its snapshots: no append-only
    file, ``save ""``. Stopped (SIGTERM) and started again, it is empty."""
    server = RedisServer(tmp_path / "redis", appendonly=False)
    server.start()
    yield server
    server.stop()


def restart(server: RedisServer) -> None:
    server.stop()
    server.start()


def test_a_start_warns_once_of_a_redis_that_a_restart_empties(volatile_redis, tmp_path,
                                                              caplog):
    """``appendonly no``: one WARNING at the start naming the loss and the fix; none with
    SDXL_JOBS_REDIS_NO_AOF_OK (the service keeps its data otherwise), none once the file
    is on, none where Redis refuses CONFIG (a managed service: it is not guessed). The
    API's and a dispatcher's own starts say it, each once."""
    caplog.set_level(logging.INFO, logger="sdxl_jobs")
    assert usable_at_start(volatile_redis.url, "exiting")
    said = [(r.levelname, r.getMessage()) for r in caplog.records
            if PERSISTENCE_WARNING in r.getMessage()]
    assert said == [("WARNING", f"the job store at {redacted_url(volatile_redis.url)} keeps "
                     f"no append-only file (appendonly no): restarted, even cleanly, that "
                     f"Redis loses every job and API key (save \"\": no RDB snapshot either), "
                     f"and their clients then get 404 for their jobs and 401 for their keys; "
                     f"set appendonly yes "
                     f"(appendfsync always: nothing accepted is lost), or "
                     f"SDXL_JOBS_REDIS_NO_AOF_OK=1 where it keeps its data otherwise "
                     f"(replication)")], said
    # With snapshots (Redis's default save points), a kill loses what came after the last.
    admin = redis.Redis.from_url(volatile_redis.url)
    admin.config_set("save", "3600 1 300 100 60 10000")
    caplog.clear()
    assert usable_at_start(volatile_redis.url, "exiting")
    assert [r.getMessage().split(": ", 1)[1].split(", and their")[0] for r in caplog.records
            if PERSISTENCE_WARNING in r.getMessage()] == [
        "killed or crashed (SIGKILL, the OOM killer, its machine lost), that Redis loses every "
        "job and API key accepted since its last RDB snapshot (save 3600 1 300 100 60 10000)"]
    caplog.clear()
    assert usable_at_start(volatile_redis.url, "exiting", no_aof_ok=True)
    password = secrets.token_hex(8)
    admin.acl_setuser("jobs", enabled=True, passwords=[f"+{password}"], keys=["*"],
                      channels=["*"], commands=["+@all", "-config"])
    assert usable_at_start(f"redis://jobs:{password}@127.0.0.1:{volatile_redis.port}/0",
                           "exiting")
    assert PERSISTENCE_WARNING not in caplog.text

    # The commands: the API's start, and a dispatcher's (before it waits for TorchServe).
    api = start_api(volatile_redis.url, tmp_path)
    api.process.stop()
    key_file = tmp_path / "key_file.json"
    key_file.write_text(json.dumps({"inference": {"key": "k"}, "API": {"key": "a"}}))
    nobody = f"http://127.0.0.1:{free_port()}"
    dispatcher = dispatcher_process(volatile_redis.url, nobody, nobody, key_file,
                                    tmp_path / "dispatcher.log")
    dispatcher.start()
    try:
        wait_until(lambda: "waiting for TorchServe" in dispatcher.log_path.read_text(), 20,
                   "the dispatcher to wait for TorchServe", detail=dispatcher.tail)
    finally:
        dispatcher.stop()
    for log in (tmp_path / "api.log", dispatcher.log_path):
        assert log.read_text().count(PERSISTENCE_WARNING) == 1, log.read_text()[-2000:]

    admin.config_set("appendonly", "yes")
    caplog.clear()
    assert usable_at_start(volatile_redis.url, "exiting")
    assert PERSISTENCE_WARNING not in caplog.text
    # Turned on, the file is first written by a background rewrite, and until that is done
    # Redis refuses a SIGTERM ("Writing initial AOF, can't exit"): the fixture's stop waited
    # its whole 10 s, then killed it (2 runs in 6 under CPU load).
    def first_file_written() -> bool:
        persistence = admin.info("persistence")
        return not (persistence["aof_rewrite_in_progress"]
                    or persistence["aof_rewrite_scheduled"])
    wait_until(first_file_written, 20, "Redis to write its first append-only file")
    admin.close()


def test_a_dispatcher_says_once_that_redis_lost_its_data(volatile_redis, caplog):
    """Redis restarted without persistence: the job and the API key accepted before are gone,
    and of two dispatchers reading the queue, the one that makes the consumer groups again
    logs one ERROR saying that Redis lost its data, what is gone and what to do; none at
    their next reads. Before: one WARNING per dispatcher that the groups were gone."""
    async def accept(store: JobStore) -> str:
        await store.ensure_groups()
        await store.add_key("token", "alice")
        return (await store.submit("alice", REQUEST, **LIMITS)).job_id

    async def read(store: JobStore, name: str) -> list:
        return await store.next_jobs(name, 10, 100)

    async def scenario() -> None:
        first, second = JobStore.from_url(volatile_redis.url), JobStore.from_url(
            volatile_redis.url)
        try:
            job_id = await accept(first)
            assert len(await read(first, "d1")) == 1
            await asyncio.to_thread(restart, volatile_redis)
            assert await first.owner_of("token") is None
            assert await first.job(job_id) is None
            for _ in range(3):
                assert await asyncio.gather(read(first, "d1"), read(second, "d2")) == [[], []]
        finally:
            await first.close()
            await second.close()
    caplog.set_level(logging.WARNING, logger="sdxl_jobs")
    asyncio.run(scenario())
    said = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert said == [("ERROR", LOSS_ERROR % 0)], said


def test_a_webhooks_stream_lost_alone_is_said_by_its_reader(volatile_redis, caplog):
    """The webhooks' stream alone gone (evicted under an allkeys-* policy; deleted here):
    its reader makes the group again and says so in a WARNING, the deliveries that waited
    in it being gone; no ERROR, the jobs and keys being there. The first version of the
    loss ERROR said nothing at all here (it spoke only for the jobs' group)."""
    async def scenario() -> None:
        store = JobStore.from_url(volatile_redis.url)
        try:
            assert (await store.ensure_groups())[0] == ("stream", "webhooks")
            await store.redis.delete(store.key("webhooks"))
            assert await store.next_jobs("d1", 10, 100) == []  # the jobs' group is there
            assert await store.next_webhooks("d1", 30.0, 10) == []
            assert await store.next_webhooks("d1", 30.0, 10) == []  # said once
        finally:
            await store.close()
    caplog.set_level(logging.WARNING, logger="sdxl_jobs")
    asyncio.run(scenario())
    said = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert said == [("WARNING", "the webhooks' consumer group was gone (Redis evicted their "
                                "stream, or lost its data): created again; the deliveries that "
                                "waited in it went with it. To keep them: maxmemory-policy "
                                "noeviction")], said


def created(api) -> float | None:
    """The API's ``sdxl_jobs_store_created_timestamp_seconds``; None where it is absent."""
    return metrics(api).get(CREATED, {}).get("")


def test_metrics_tells_a_redis_that_lost_its_data_with_no_dispatcher(volatile_redis, tmp_path):
    """The store's creation mark, written by a dispatcher's start (or the first scrape) and
    exported on /metrics, stays the same across an API restart and changes when Redis lost
    its data (FLUSHALL; a restart without persistence) with no dispatcher running (GPU pods
    at zero): what the SDXLJobsStoreLostData alert fires on. The API that read the old mark
    says so in the one ERROR that Redis lost its data, once per loss. Before, with no
    dispatcher nothing said it anywhere."""
    async def dispatcher_start() -> str:
        store = JobStore.from_url(volatile_redis.url)
        try:
            await store.ensure_groups()
            return (await store.redis.get("sdxl:store-created")).decode()
        finally:
            await store.close()
    mark = float(asyncio.run(dispatcher_start()))
    (tmp_path / "first").mkdir()
    api = start_api(volatile_redis.url, tmp_path / "first")
    try:
        assert created(api) == mark
    finally:
        api.process.stop()
    (tmp_path / "second").mkdir()
    api = start_api(volatile_redis.url, tmp_path / "second")
    admin = redis.Redis.from_url(volatile_redis.url)
    try:
        assert created(api) == created(api) == mark  # the same Redis: the same mark
        admin.flushall()
        flushed = created(api)
        assert flushed > mark, (flushed, mark)
        assert created(api) == flushed
        restart(volatile_redis)
        restarted = created(api)
        assert restarted > flushed, (restarted, flushed)
    finally:
        admin.close()
        api.process.stop()
    said = [line.split(" ERROR sdxl_jobs.store: ", 1)[1] for line in
            api.process.log_path.read_text().splitlines() if " ERROR " in line]
    assert said == [MARK_ERROR % (iso(mark), iso(flushed)),
                    MARK_ERROR % (iso(flushed), iso(restarted))], said


def test_metrics_leaves_the_mark_out_while_redis_refuses_to_write_it(volatile_redis,
                                                                     tmp_path):
    """A Redis that lost its data and refuses writes (full: OOM, maxmemory with noeviction)
    cannot be marked again: /metrics answers 200 without the mark (and says Redis refuses
    writes), and has it once Redis takes writes again."""
    api = start_api(volatile_redis.url, tmp_path)
    admin = redis.Redis.from_url(volatile_redis.url)
    try:
        assert created(api)
        admin.flushall()
        admin.config_set("maxmemory", "1")
        found = metrics(api)
        assert CREATED not in found and found["sdxl_jobs_store_writable"] == {"": 0}, found
        admin.config_set("maxmemory", "0")
        assert created(api)
    finally:
        admin.close()
        api.process.stop()

"""The job store's guarantees against a real redis-server: claims, takeover, hand-back,
stale results, dead letters, idempotency, limits, cancel, expiry and a Redis killed outright."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import time
from datetime import datetime
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError

from sdxl_jobs.processes import STREAM_NODE_MAX_BYTES, RedisServer
from sdxl_jobs.store import CHECK_IN_KEPT_S, STATES, JobStore, answered_within, iso
from sdxl_jobs.views import job_view

from jobstack import LIMITS, REQUEST, queue_positions, run, with_store

pytestmark = pytest.mark.jobs

ROOT = Path(__file__).resolve().parents[2]

LEASE_S = 30.0  # the default


def test_a_stale_dispatcher_can_never_store_a_result(redis_server):
    """A dispatcher presumed dead loses its claim to the one that took the job over: its
    late result, progress and renewals are all refused, and only one result is stored."""
    async def body(store: JobStore):
        job_id = (await store.submit("alice", REQUEST, **LIMITS)).job_id
        [(entry, got)] = await store.next_jobs("d1", 10, 100)
        assert got == job_id
        outcome, first = await store.start(job_id, entry, "d1", 3, 60)
        assert (outcome, first) == ("claimed", "d1#1")
        assert await store.abandoned_jobs("d2", 30, 10) == []  # its claim is fresh
        await asyncio.sleep(0.05)
        taken = await store.abandoned_jobs("d2", 0.01, 10)  # d1 went quiet
        assert taken == [(entry, job_id)]
        outcome, second = await store.start(job_id, entry, "d2", 3, 60)
        assert (outcome, second) == ("claimed", "d2#2")
        assert await store.progress(job_id, first, 1, 3) == "running"
        assert await store.renew(job_id, first, "d1") == "running"
        # The late dispatcher finishes first, while its successor still runs the job: its
        # claim alone refuses it (after the successor's finish, the state would too).
        assert await store.finish(job_id, first, 60, "succeeded", {"format": "png"},
                                  seeds=[7, 8], images=[b"late0", b"late1"]) == "running"
        assert await store.image(job_id, 0) is None
        assert (await store.job(job_id))["status"] == "running"
        assert await store.finish(job_id, second, 60, "succeeded", {"format": "png"},
                                  seeds=[7, 8], images=[b"new0", b"new1"]) == "stored"
        assert await store.finish(job_id, first, 60, "succeeded", {"format": "png"},
                                  seeds=[7, 8], images=[b"old0", b"old1"]) == "succeeded"
        assert await store.image(job_id, 0) == b"new0"
        job = await store.job(job_id)
        assert job["status"] == "succeeded" and job["attempts"] == "2"
        gauges = await store.gauges()
        assert gauges["backlog"] == 0 and gauges["stats"]["jobs_succeeded"] == 1
        # The entry is gone from the stream: nothing left to take over or deliver.
        assert await store.abandoned_jobs("d3", 0, 10) == []
    with_store(redis_server.url, body)


def test_repeated_failures_go_to_the_dead_letter_stream(redis_server):
    async def body(store: JobStore):
        job_id = (await store.submit("alice", REQUEST, **LIMITS)).job_id
        [(entry, _)] = await store.next_jobs("d1", 10, 100)
        for attempt in range(1, 4):
            outcome, claim = await store.start(job_id, entry, "d1", 3, 60)
            assert (outcome, claim) == ("claimed", f"d1#{attempt}")
            await store.record_error(job_id, claim, f"HTTP 500: boom {attempt}")
        outcome, reason = await store.start(job_id, entry, "d1", 3, 60)
        assert (outcome, reason) == ("dead", "HTTP 500: boom 3")
        job = await store.job(job_id)
        error = json.loads(job["error"])
        assert job["status"] == "failed" and "3 times" in error["message"]
        assert "boom 3" in error["message"]
        dead = await store.redis.xrange(store.key("dead"))
        assert [fields[b"id"].decode() for _, fields in dead] == [job_id]
        gauges = await store.gauges()
        assert gauges["backlog"] == 0 and gauges["stats"]["jobs_dead_lettered"] == 1
    with_store(redis_server.url, body)


def test_an_error_recorded_again_by_the_same_start_is_one_event(redis_server):
    """A dispatcher writes a failed start's error again when Redis failed the first write,
    which may have run with only its answer lost: the second changes nothing (one `retry`
    event, not two); the next start records its own, and a stale claim none."""
    async def body(store: JobStore):
        job_id = (await store.submit("alice", REQUEST, **LIMITS)).job_id
        [(entry, _)] = await store.next_jobs("d1", 10, 100)
        _, first = await store.start(job_id, entry, "d1", 3, 60)
        assert await store.record_error(job_id, first, "HTTP 500: boom") == "ok"
        assert await store.record_error(job_id, first, "HTTP 500: boom") == "ok"
        _, second = await store.start(job_id, entry, "d1", 3, 60)
        assert await store.record_error(job_id, second, "HTTP 507: Worker died.") == "ok"
        assert await store.record_error(job_id, first, "HTTP 500: late") == "running"
        retries = [event["retry"] for _, event in await store.events_after(job_id)
                   if "retry" in event]
        assert retries == ["HTTP 500: boom", "HTTP 507: Worker died."]
        job = await store.job(job_id)
        assert (job["last_error"], job["attempts"]) == ("HTTP 507: Worker died.", "2")
    with_store(redis_server.url, body)


def test_idempotency_rate_limit_and_cap(redis_server):
    async def body(store: JobStore):
        first = await store.submit("alice", REQUEST, idempotency_key="k1", body_sha="a",
                                   **LIMITS)
        again = await store.submit("alice", REQUEST, idempotency_key="k1", body_sha="a",
                                   **LIMITS)
        other = await store.submit("alice", REQUEST, idempotency_key="k1", body_sha="b",
                                   **LIMITS)
        bob = await store.submit("bob", REQUEST, idempotency_key="k1", body_sha="a", **LIMITS)
        assert first.outcome == "created"
        assert (again.outcome, again.job_id) == ("existing", first.job_id)
        assert (other.outcome, other.job_id) == ("conflict", first.job_id)
        assert bob.outcome == "created" and bob.job_id != first.job_id  # keys are per owner
        capped = [await store.submit("carol", REQUEST, rate_per_minute=100, max_active=2,
                                     ttl_s=60) for _ in range(3)]
        assert [s.outcome for s in capped] == ["created", "created", "cap"]
        await store.cancel(capped[0].job_id, "carol", 60)
        assert (await store.submit("carol", REQUEST, rate_per_minute=100, max_active=2,
                                   ttl_s=60)).outcome == "created"
        rated = [await store.submit("dave", REQUEST, rate_per_minute=2, max_active=10,
                                    ttl_s=60) for _ in range(3)]
        assert [s.outcome for s in rated[:2]] == ["created", "created"]
        assert rated[2].outcome == "rate" and 1 <= int(rated[2].detail) <= 60
        # Submits the cap refused do not count against the rate (they used to: a client
        # waiting as told used up its minute on refusals).
        limits = {"rate_per_minute": 3, "max_active": 1, "ttl_s": 60}
        waited = [await store.submit("erin", REQUEST, **limits) for _ in range(3)]
        assert [s.outcome for s in waited] == ["created", "cap", "cap"]
        await store.cancel(waited[0].job_id, "erin", 60)
        assert (await store.submit("erin", REQUEST, **limits)).outcome == "created"
    with_store(redis_server.url, body)


def test_cancel_queued_is_never_delivered_and_running_refuses_its_result(redis_server):
    async def body(store: JobStore):
        queued = (await store.submit("alice", REQUEST, **LIMITS)).job_id
        assert await store.cancel(queued, "mallory", 60) == "missing"  # not hers
        assert await store.cancel(queued, "alice", 60) == "canceled"
        assert await store.cancel(queued, "alice", 60) == "canceled"  # already final
        assert await store.next_jobs("d1", 10, 100) == []  # never delivered
        running = (await store.submit("alice", REQUEST, **LIMITS)).job_id
        [(entry, _)] = await store.next_jobs("d1", 10, 100)
        _, claim = await store.start(running, entry, "d1", 3, 60)
        assert await store.cancel(running, "alice", 60) == "canceled"
        assert await store.renew(running, claim, "d1") == "canceled"
        assert await store.finish(running, claim, 60, "succeeded", {}, seeds=[7, 8],
                                  images=[b"x", b"y"]) == "canceled"
        assert await store.image(running, 0) is None
    with_store(redis_server.url, body)


def test_jobs_canceled_while_queued_are_not_throughput(redis_server):
    """Estimated starts divide by the jobs that ended in the last 5 minutes: ten jobs
    canceled while queued counted as ten run, so every queued job's start looked ten
    times nearer. One that ran and one canceled while running still count."""
    async def body(store: JobStore):
        for _ in range(10):
            job_id = (await store.submit("alice", REQUEST, **LIMITS)).job_id
            assert await store.cancel(job_id, "alice", 60) == "canceled"
        assert (await store.throughput(live_s=30))[1] == 0
        ran = []
        for end in ("succeeded", "canceled"):
            job_id = (await store.submit("alice", REQUEST, **LIMITS)).job_id
            ran.append(job_id)
            [(entry, _)] = await store.next_jobs("d1", 10, 100)
            _, claim = await store.start(job_id, entry, "d1", 3, 60)
            if end == "canceled":
                assert await store.cancel(job_id, "alice", 60) == "canceled"
            else:
                await store.finish(job_id, claim, 60, "succeeded", {}, seeds=[7, 8],
                                   images=[b"x", b"y"])
        # Per second that a job ran (test_a_start_estimated_after_a_quiet_spell...).
        assert (await store.throughput(live_s=30))[1] > 0
        assert set(await store.redis.zrange(store.key("finished"), 0, -1)) == \
            {job_id.encode() for job_id in ran}
    with_store(redis_server.url, body)


async def started(store: JobStore, job_id: str) -> str:
    """The claim of ``job_id`` started as dispatcher d1 starts it."""
    [entry] = [entry for entry, taken in await store.next_jobs("d1", 10, 100)
               if taken == job_id]
    return (await store.start(job_id, entry, "d1", 3, 60))[1]


def test_a_start_estimated_after_a_quiet_spell_counts_the_time_jobs_ran(redis_server):
    """Estimated starts divided the last 5 minutes' ends by all 300 s, the quiet ones
    too: two jobs run after a quiet spell made 2/300 a second, and the tenth queued job's
    start looked 20 minutes away where it came in seconds. Now only the time a job ran
    counts (a spell going on too), quiet spells between the ends neither; back-to-back
    jobs are one spell."""
    async def body(store: JobStore):
        began = time.monotonic()
        for _ in range(2):  # back to back: one spell
            job_id = (await store.submit("alice", REQUEST, **LIMITS)).job_id
            await store.finish(job_id, await started(store, job_id), 60, "succeeded", {},
                               seeds=[7, 8], images=[b"x", b"y"])
        await asyncio.sleep(2)  # a quiet spell between the ends
        job_id = (await store.submit("alice", REQUEST, **LIMITS)).job_id
        claim = await started(store, job_id)
        await asyncio.sleep(0.5)  # the spell going on counts
        ran = time.monotonic() - began - 2
        rate = (await store.throughput(live_s=30))[1]
        assert rate >= 2 / ran, (rate, ran)  # it was 2 / 300
        await store.finish(job_id, claim, 60, "succeeded", {}, seeds=[7, 8],
                           images=[b"x", b"y"])
        assert (await store.throughput(live_s=30))[1] >= \
            3 / (time.monotonic() - began - 2)
        assert await store.redis.zcard(store.key("busy")) == 2
        assert not await store.redis.exists(store.key("busy-since"))
    with_store(redis_server.url, body)


def test_a_job_given_back_is_queued_in_its_place_its_queued_age_from_then(redis_server):
    """A job handed back (its TorchServe refused it, Redis failed its writes) is queued
    again in its submit's place, and was as old a queued job as its submit: the oldest
    queued age (what SDXLJobsWaitingTooLong alerts on) jumped by the whole time it had
    waited and run, where the queue moved. Now its age counts from the hand-back; a job
    queued since before then is still the oldest."""
    async def body(store: JobStore):
        first = (await store.submit("alice", REQUEST, **LIMITS)).job_id
        await asyncio.sleep(1.5)
        assert await store.requeue(first, await started(store, first), "d1", 1,
                                   "TorchServe is not ready") == "ok"
        assert (await store.gauges())["oldest_age_s"] < 1  # it was 1.5 and more
        second = (await store.submit("alice", REQUEST, **LIMITS)).job_id
        second_since = time.monotonic()
        assert await queue_positions(store, [first, second]) == [1, 2]
        # Handed back again after the second waited: the second is the oldest queued.
        await asyncio.sleep(1)
        [(entry, _)] = await store.abandoned_jobs("d1", 1, 10)
        _, claim = await store.start(first, entry, "d1", 3, 60)
        assert await store.requeue(first, claim, "d1", 1, "TorchServe is not ready") == "ok"
        oldest = (await store.gauges())["oldest_age_s"]
        assert oldest == pytest.approx(time.monotonic() - second_since, abs=0.5)
        assert await queue_positions(store, [first, second]) == [1, 2]
    with_store(redis_server.url, body)


def test_finished_jobs_expire(redis_server):
    async def body(store: JobStore):
        job_id = (await store.submit("alice", REQUEST, rate_per_minute=100, max_active=10,
                                     ttl_s=60)).job_id
        [(entry, _)] = await store.next_jobs("d1", 10, 100)
        _, claim = await store.start(job_id, entry, "d1", 3, 1)
        await store.finish(job_id, claim, 1, "succeeded", {}, seeds=[7, 8],
                           images=[b"x", b"y"])
        assert await store.job(job_id) is not None
        await asyncio.sleep(2.2)
        assert await store.job(job_id) is None
        assert await store.image(job_id, 0) is None
        assert await store.redis.exists(store.key("events", job_id)) == 0
    with_store(redis_server.url, body)


def test_nothing_of_a_keys_jobs_is_left_once_they_expire(redis_server):
    """Once a key's jobs have all ended and expired, nothing of them is left: its listing
    (`owned:<key>`) kept their ids for good on a server gone quiet, unlisted only by the
    key's next submit or listing, and the throughput's window (`finished`) the last ten
    minutes' ids, trimmed only at the next job's end. A submit keeps the listing again for
    as long as its job waits."""
    async def body(store: JobStore):
        limits = {**LIMITS, "ttl_s": 1}
        ran = await store.submit("alice", REQUEST, idempotency_key="k", body_sha="a", **limits)
        canceled = await store.submit("alice", REQUEST, **limits)
        [(entry, _), _] = await store.next_jobs("d1", 10, 100)
        _, claim = await store.start(ran.job_id, entry, "d1", 3, 1)
        await store.finish(ran.job_id, claim, 1, "succeeded", {}, seeds=[7, 8],
                           images=[b"x", b"y"])
        assert await store.cancel(canceled.job_id, "alice", 1) == "canceled"
        # Filtered listings made its listings by state and marked them checked: they go too.
        for state in STATES:
            await store.owned_jobs("alice", statuses=frozenset({state}))
        await asyncio.sleep(1.5)
        left = {name.decode()[len(store.prefix):]: await store.redis.ttl(name)
                async for name in store.redis.scan_iter(match=store.prefix + "*")}
        # The store's own keys, and those that expire on their own: the minute's submits
        # (120 s) and the throughput's window and busy spells (600 s, as long as they count).
        assert {name.split(":")[0] for name in left} == {"stream", "webhooks", "stats",
                                                         "store-created", "rate", "finished",
                                                         "busy"}, left
        assert all(0 < ttl <= 600 for name, ttl in left.items()
                   if name.split(":")[0] in ("rate", "finished", "busy")), left
        # A job submitted as the key's last one ends is listed for as long as it waits.
        ended = await store.submit("alice", REQUEST, **limits)
        assert await store.cancel(ended.job_id, "alice", 1) == "canceled"
        waiting = await store.submit("alice", REQUEST, **limits)
        await asyncio.sleep(1.5)
        assert await listed(store, "alice") == [waiting.job_id]
    with_store(redis_server.url, body)


def test_a_listing_lasts_as_long_as_its_longest_kept_job_whatever_ttl_ended_each(
        redis_server):
    """An API and a dispatcher with different SDXL_JOBS_RESULT_TTL_S: the listing expired
    with the TTL of the key's last job to end, so a cancel by an API keeping jobs 1 s
    dropped from `GET /v1/jobs` a job a dispatcher had ended to be kept 60 s, while it
    lived; so did such a cancel after a submit had kept the listing again."""
    async def body(store: JobStore):
        async def run_to_end(ttl_s: int) -> str:
            job_id = (await store.submit("alice", REQUEST, **LIMITS)).job_id
            [(entry, _)] = [job for job in await store.next_jobs("d1", 10, 100)
                            if job[1] == job_id]
            _, claim = await store.start(job_id, entry, "d1", 3, 1)
            await store.finish(job_id, claim, ttl_s, "succeeded", {}, seeds=[7],
                               images=[b"x"])
            return job_id

        # Ended while another job of the key still waits, then that one canceled.
        waiting = (await store.submit("alice", REQUEST, **LIMITS)).job_id
        kept = await run_to_end(60)
        assert await store.cancel(waiting, "alice", 1) == "canceled"
        # Ended alone (the listing set to expire), then a submit and its cancel.
        kept_too = await run_to_end(60)
        canceled = (await store.submit("alice", REQUEST, **LIMITS)).job_id
        assert await store.cancel(canceled, "alice", 1) == "canceled"
        await asyncio.sleep(1.5)
        assert await store.job(kept) and await store.job(kept_too)
        assert await listed(store, "alice") == [kept_too, kept]
        # It still expires with them, not later.
        assert 0 < await store.redis.ttl(store.key("owned", "alice")) <= 60
    with_store(redis_server.url, body)


def test_a_jobs_expires_at_is_told_by_the_ttl_it_ended_with_not_the_readers(redis_server):
    """While a rollout changes SDXL_JOBS_RESULT_TTL_S, an API kept jobs an hour and told
    `expires_at` by its own TTL of jobs a dispatcher ended to be kept a minute (and the
    other way round): a client that trusted it fetched a 404. Now each job keeps the TTL
    it ended with."""
    async def body(store: JobStore):
        job_id = (await store.submit("alice", REQUEST, **LIMITS)).job_id
        [(entry, _)] = await store.next_jobs("d1", 10, 100)
        _, claim = await store.start(job_id, entry, "d1", 3, 1)
        await store.finish(job_id, claim, 60, "succeeded", {}, seeds=[7], images=[b"x"])
        canceled = (await store.submit("alice", REQUEST, **LIMITS)).job_id
        assert await store.cancel(canceled, "alice", 7200) == "canceled"
        for ended, kept_s in ((job_id, 60), (canceled, 7200)):
            job = await store.job(ended)
            view = job_view(job, ttl_s=3600)  # the reader's own TTL
            expires = datetime.fromisoformat(view["expires_at"].replace("Z", "+00:00"))
            finished = datetime.fromisoformat(view["finished_at"].replace("Z", "+00:00"))
            assert (expires - finished).total_seconds() == kept_s, view
            assert kept_s - 2 <= await store.redis.ttl(store.key("job", ended)) <= kept_s
        # A job an older release ended (no TTL kept): the reader's, as before.
        older = dict(job, kept_s="")
        assert job_view(older, ttl_s=3600)["expires_at"] == iso(float(job["finished_at"]) + 3600)
    with_store(redis_server.url, body)


def test_a_queued_jobs_events_take_what_they_hold_not_a_whole_stream_node(redis_server):
    """Each job has an event stream of its own, whose first node Redis allocates at
    `stream-node-max-bytes` (4096 by default): 4.7 KB of a queued job's 6.2 KB, so a backlog
    of 20,000 took 124 MB of Redis. Ours, and the Kubernetes overlay's, set it to 512."""
    async def body(store: JobStore):
        job_id = (await store.submit("alice", REQUEST, **LIMITS)).job_id
        assert await store.redis.memory_usage(store.key("events", job_id), samples=0) < 2048
    with_store(redis_server.url, body)
    conf = (ROOT / "k8s/overlays/keda-jobs/redis.conf").read_text().splitlines()
    assert f"stream-node-max-bytes {STREAM_NODE_MAX_BYTES}" in conf


def test_redis_killed_outright_loses_no_accepted_job(tmp_path):
    """appendfsync always: what a submit wrote is on disk before the submit is answered."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        async def submit(store: JobStore):
            return [(await store.submit("alice", REQUEST, **LIMITS)).job_id for _ in range(20)]
        store_prefix = "durable:"

        async def go(body):
            store = JobStore.from_url(server.url, prefix=store_prefix)
            await store.ensure_groups()
            try:
                return await body(store)
            finally:
                await store.close()
        ids = run(go(submit))
        server.kill(signal.SIGKILL)
        server.process.wait(10)
        server.start()

        async def after(store: JobStore):
            jobs = [await store.job(i) for i in ids]
            delivered = await store.next_jobs("d1", 100, 100)
            return jobs, delivered
        jobs, delivered = run(go(after))
        assert all(job is not None and job["status"] == "queued" for job in jobs)
        assert [job_id for _, job_id in delivered] == ids
    finally:
        server.stop()


def test_commands_after_redis_restarts_find_it_on_pooled_connections(tmp_path):
    """Connections pooled before a restart are to a process that is gone: each is replaced
    before a command is sent on it (the first command used to fail with "Connection closed
    by server", a 503 from the API; a CI run's webhook test failed on it)."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        async def body(store: JobStore):
            job_ids = await asyncio.gather(*(store.submit(f"user{i}", REQUEST, **LIMITS)
                                             for i in range(4)))
            await asyncio.to_thread(server.stop)
            await asyncio.to_thread(server.start)
            for submitted in job_ids:
                assert (await store.job(submitted.job_id))["status"] == "queued"
            again = await store.submit("alice", REQUEST, **LIMITS)
            assert (await store.job(again.job_id))["status"] == "queued"
        with_store(server.url, body)
    finally:
        server.stop()


def test_an_idempotency_key_and_the_listing_last_as_long_as_the_job(redis_server):
    """Kept while the job waits or runs, however long, and a TTL after it ends: a retry of
    a submit whose job has queued for longer than the TTL finds that job, not a new one."""
    async def body(store: JobStore):
        limits = {**LIMITS, "ttl_s": 1}
        first = await store.submit("alice", REQUEST, idempotency_key="k", body_sha="a", **limits)
        await asyncio.sleep(1.3)  # a TTL after the submit: the job still waits
        again = await store.submit("alice", REQUEST, idempotency_key="k", body_sha="a", **limits)
        assert (again.outcome, again.job_id) == ("existing", first.job_id)
        other = await store.submit("alice", REQUEST, **limits)  # trims the listing
        assert await listed(store, "alice") == [other.job_id, first.job_id]
        [(entry, _), _] = await store.next_jobs("d1", 10, 100)
        _, claim = await store.start(first.job_id, entry, "d1", 3, 1)
        await store.finish(first.job_id, claim, 1, "succeeded", {}, seeds=[7, 8],
                           images=[b"x", b"y"])
        again = await store.submit("alice", REQUEST, idempotency_key="k", body_sha="a", **limits)
        assert (again.outcome, again.job_id) == ("existing", first.job_id)
        # From the end on, the key expires with the job: a key kept for good would pile up.
        idem_keys = [k async for k in store.redis.scan_iter(match=store.key("idem:*"))]
        assert len(idem_keys) == 1
        assert 0 < await store.redis.ttl(idem_keys[0]) <= 1
        await asyncio.sleep(1.3)  # a TTL after the end: the job is gone, and so are both
        assert await store.job(first.job_id) is None
        new = await store.submit("alice", REQUEST, idempotency_key="k", body_sha="a", **limits)
        assert new.outcome == "created" and new.job_id != first.job_id
        assert first.job_id not in await listed(store, "alice")
    with_store(redis_server.url, body)


async def listed(store: JobStore, owner: str, **page) -> list[str]:
    jobs, _ = await store.owned_jobs(owner, **page)
    return [job["id"] for job in jobs]


def test_the_listing_pages_on_where_it_ended_through_ties_and_unlisted_jobs(redis_server):
    """Pages follow one another without a job seen twice or missed: with jobs of the same
    submit time (Redis orders those by id), with jobs unlisted between two pages (an offset
    would skip as many), and with a status filter that reads a bounded number of jobs."""
    async def body(store: JobStore):
        ids = [(await store.submit("alice", REQUEST, **LIMITS)).job_id for _ in range(7)]
        await store.submit("bob", REQUEST, **LIMITS)  # another key's: never listed
        owned = store.key("owned", "alice")
        # Three of them share a submit time, as jobs submitted within a clock tick do.
        tie = await store.redis.zscore(owned, ids[3])
        for job_id in ids[1:3]:
            await store.redis.zadd(owned, {job_id: tie})
        scores = {job_id: await store.redis.zscore(owned, job_id) for job_id in ids}
        newest_first = sorted(ids, key=lambda job_id: (scores[job_id], job_id), reverse=True)
        seen, after = [], None
        while True:
            jobs, after = await store.owned_jobs("alice", 2, after)
            seen += [job["id"] for job in jobs]
            assert len(jobs) == 2 or after is None
            if after is None:
                break
        assert seen == newest_first
        # A job unlisted between two pages: the next page still starts where one ended.
        first, after = await store.owned_jobs("alice", 3)
        await store.redis.zrem(owned, first[0]["id"], first[1]["id"])
        rest, end = await store.owned_jobs("alice", 10, after)
        assert [job["id"] for job in rest] == newest_first[3:] and end is None
        # A filter: only the matches, page after page, the jobs between them not read.
        kept = newest_first[2:]
        for job_id in (kept[0], kept[4]):
            await store.cancel(job_id, "alice", 60)
        canceled = frozenset({"canceled"})
        assert await listed(store, "alice", statuses=canceled) == [kept[0], kept[4]]
        page, after = await store.owned_jobs("alice", 1, statuses=canceled, scan=2)
        assert [job["id"] for job in page] == [kept[0]] and after is not None
        page, after = await store.owned_jobs("alice", 1, after, statuses=canceled, scan=2)
        assert [job["id"] for job in page] == [kept[4]] and after is None
        # An expired job (its hash gone) is skipped, and unlisted as it is read.
        await store.redis.delete(store.key("job", kept[1]))
        assert kept[1] not in await listed(store, "alice")
        assert await store.redis.zscore(owned, kept[1]) is None
    with_store(redis_server.url, body)


async def hash_reads(store: JobStore) -> int:
    """Redis's count of HGETALL calls so far (INFO commandstats): one per job a listing reads."""
    return (await store.redis.info("commandstats")).get("cmdstat_hgetall", {}).get("calls", 0)


def test_a_filtered_listing_reads_its_matches_not_the_keys_ended_jobs(redis_server):
    """A key's few live jobs behind many ended ones (a backend key's thousands an hour):
    `?status=running` read each of its jobs newest first until it found them, up to 1000 a
    page (about 100 ms), and a page of 100 such reads was empty, with a next cursor. It
    reads its state's listing: one read per job listed, the ended ones never."""
    async def body(store: JobStore):
        live = [(await store.submit("alice", REQUEST, **LIMITS)).job_id for _ in range(3)]
        [(entry, _), *_] = await store.next_jobs("d1", 10, 100)
        await store.start(live[0], entry, "d1", 3, 60)
        for _ in range(300):
            ended = (await store.submit("alice", REQUEST, **LIMITS)).job_id
            assert await store.cancel(ended, "alice", 60) == "canceled"

        async def page(**query) -> tuple[list[str], object, int]:
            before = await hash_reads(store)
            jobs, after = await store.owned_jobs("alice", 20, **query)
            return [job["id"] for job in jobs], after, await hash_reads(store) - before

        # The key's first filtered listing checks its listings by state (no hash read).
        assert await page(statuses=frozenset({"running"})) == ([live[0]], None, 1)
        assert await page(statuses=frozenset({"queued", "running"})) == \
            (live[::-1], None, 3)
        assert await page(statuses=frozenset({"running"}), scan=100) == ([live[0]], None, 1)
        ids, after, reads = await page(statuses=frozenset({"canceled"}))
        assert len(ids) == 20 and after is not None and reads == 20
    with_store(redis_server.url, body)


def test_every_change_of_state_keeps_the_listings_by_state_right(redis_server):
    """Random runs of submits, starts, takeovers, hand-backs (free and counted), dead
    letters, finishes and cancels: after each, a key's listing of each state holds exactly
    its jobs in that state, under their scores in its listing, and a filtered listing of
    any states lists what the whole listing filtered would."""
    async def body(store: JobStore):
        rng = random.Random(51)
        entries: dict[str, str] = {}
        claims: dict[str, str] = {}
        reached: set[str] = set()
        for _ in range(160):
            for entry, job_id in await store.next_jobs("d1", 100, 1):
                entries[job_id] = entry
            states = {job_id: (await store.job(job_id))["status"] for job_id in entries}
            live = [job_id for job_id, state in states.items() if state in ("queued", "running")]
            queued = [job_id for job_id in live if states[job_id] == "queued"]
            running = [job_id for job_id in live if states[job_id] == "running"]
            move = rng.choice(["submit", "submit", "start", "start", "take over", "hand back",
                               "finish", "cancel"])
            if move == "submit" or not live:
                await store.submit("alice", REQUEST, **LIMITS)
            elif move == "start" and queued:
                job_id = rng.choice(queued)
                outcome, claim = await store.start(job_id, entries[job_id], "d1", 2, 60)
                claims[job_id] = claim  # or, past 2 starts, dead-lettered (failed)
            elif move == "take over" and running:
                job_id = rng.choice(running)
                claims[job_id] = (await store.start(job_id, entries[job_id], "d2", 9, 60))[1]
            elif move == "hand back" and running:
                job_id = rng.choice(running)
                await store.requeue(job_id, claims[job_id], "d1", LEASE_S, "refused",
                                    free_redis_faults=rng.choice([None, 0]))
            elif move == "finish" and running:
                job_id = rng.choice(running)
                assert await store.finish(job_id, claims[job_id], 60,
                                          rng.choice(["succeeded", "failed"]), {},
                                          seeds=[7], images=[b"x"]) == "stored"
            elif move == "cancel":
                await store.cancel(rng.choice(live), "alice", 60)
            owned = {m.decode(): score for m, score in await store.redis.zrange(
                store.key("owned", "alice"), 0, -1, withscores=True)}
            states = {job_id: (await store.job(job_id))["status"] for job_id in owned}
            reached |= set(states.values())
            for state in STATES:
                in_state = {m.decode(): score for m, score in await store.redis.zrange(
                    store.key(f"owned-{state}", "alice"), 0, -1, withscores=True)}
                assert in_state == {job_id: owned[job_id] for job_id, job_state in
                                  states.items() if job_state == state}, (move, state)
            wanted = frozenset(rng.sample(STATES, rng.randint(1, 3)))
            newest_first = sorted(owned, key=lambda job_id: (owned[job_id], job_id),
                                  reverse=True)
            assert await listed(store, "alice", limit=100, statuses=wanted) == \
                [job_id for job_id in newest_first if states[job_id] in wanted]
        assert reached == set(STATES)
    with_store(redis_server.url, body)


def test_no_blocking_read_outlasts_the_socket_timeout(redis_server):
    """Redis answers a blocking read only when it ends: one longer than the client's socket
    timeout failed as "Redis unavailable" (a `Prefer: wait=60` submit got 503 after 30 s).
    The store reads for less and says so with an empty answer; its caller reads again."""
    async def body(store: JobStore):
        job_id = (await store.submit("alice", REQUEST, **LIMITS)).job_id
        [(last, _)] = await store.events_after(job_id)
        impatient = JobStore(aioredis.from_url(redis_server.url, socket_timeout=0.6),
                             store.prefix)
        try:
            started = time.monotonic()
            assert await impatient.events_after(job_id, last, block_ms=3000) == []
            assert time.monotonic() - started < 0.6
            assert await impatient.next_jobs("d1", 10, block_ms=3000) != []
            assert await impatient.next_jobs("d1", 10, block_ms=3000) == []
        finally:
            await impatient.close()
    with_store(redis_server.url, body)


def test_consumers_of_gone_dispatchers_are_removed_and_none_that_owns_an_entry(
        redis_server):
    """Redis keeps a consumer until it is deleted, so every dispatcher that ever took a job
    (each restart has a new name) stayed in `XINFO CONSUMERS` for good. Those that own no
    entry and have not read for the bound go; one that owns an entry stays until its jobs
    are taken over (deleting it would drop them from the group), and so do live ones."""
    async def consumers(store: JobStore, stream: str, group: str) -> dict[str, int]:
        return {info["name"].decode(): info["pending"]
                for info in await store.redis.xinfo_consumers(store.key(stream), group)}

    async def run_one(store: JobStore, dispatcher: str, finish: bool = True) -> str:
        job_id = (await store.submit("alice", REQUEST, webhook="http://127.0.0.1:9/h",
                                     webhook_events=("succeeded",), **LIMITS)).job_id
        [(entry, _)] = await store.next_jobs(dispatcher, 1, 100)
        _, claim = await store.start(job_id, entry, dispatcher, 3, 60)
        if finish:
            await store.finish(job_id, claim, 60, "succeeded", {}, seeds=[7], images=[b"x"])
        return job_id

    async def body(store: JobStore):
        assert await store.prune_consumers(0, "me") == []  # nothing read yet: no error
        await run_one(store, "gone-done")  # killed after its job ended
        await run_one(store, "gone-mid-job", finish=False)  # killed mid-job
        await run_one(store, "me")
        for hook_entry, _, _ in await store.next_webhooks("gone-webhook", 60, 8):
            await store.webhook_done(hook_entry, "delivered")
        await asyncio.sleep(1.0)  # on purpose: the idle time the bound is about
        await run_one(store, "live")  # read just now
        assert set(await store.prune_consumers(0.8, "me")) == {"gone-done", "gone-webhook"}
        assert await consumers(store, "stream", "dispatchers") == {
            "gone-mid-job": 1, "me": 0, "live": 0}
        assert await consumers(store, "webhooks", "webhooks") == {}
        # Its job taken over (nothing lost), the dead one owns nothing and goes too.
        [(entry, job_id)] = await store.abandoned_jobs("me", 0.5, 10)
        assert (await store.start(job_id, entry, "me", 3, 60))[0] == "claimed"
        assert await store.prune_consumers(0.8, "me") == ["gone-mid-job"]
        assert await consumers(store, "stream", "dispatchers") == {"me": 1, "live": 0}
    with_store(redis_server.url, body)


def test_check_ins_of_dispatchers_gone_are_removed(redis_server):
    """A dispatcher killed outright (SIGKILL, the OOM killer) never checks out: its check-in
    stayed in `dispatchers` for good, one more at each such death (a dispatcher's name is
    new with every start). Those as old as a consumer's bound go with the consumers, but
    none a live dispatcher may still renew, however short that bound."""
    async def body(store: JobStore):
        await store.redis.zadd(store.key("dispatchers"),
                               {"gone": await store.clock() - CHECK_IN_KEPT_S - 1})
        await store.check_in("quiet")  # checks in every 5 s: live for the API for 30 s
        await asyncio.sleep(1.0)
        await store.check_in("me")
        await store.prune_consumers(0.8, "me")
        assert await store.redis.zrange(store.key("dispatchers"), 0, -1) == [b"quiet", b"me"]
    with_store(redis_server.url, body)


# Jobs a dispatcher read while its TorchServe was down (the dispatcher end to end:
# test_jobs_e2e.py, test_a_job_read_while_torchserve_is_down_stays_queued).

def test_a_job_handed_back_is_any_dispatchers_at_once_and_still_queued(redis_server):
    """Without the hand-back, a job read and not started stays pending with the reader for
    a whole lease before anyone may take it."""
    async def body(store: JobStore):
        job_id = (await store.submit("alice", REQUEST, **LIMITS)).job_id
        [(entry, _)] = await store.next_jobs("down", 10, 100)
        assert await store.abandoned_jobs("up", LEASE_S, 10) == []
        assert await store.release("down", [entry], LEASE_S) == 1
        assert await store.abandoned_jobs("up", LEASE_S, 10) == [(entry, job_id)]
        job = await store.job(job_id)
        assert (job["status"], job["attempts"]) == ("queued", "0")
        assert await queue_positions(store, [job_id]) == [1]
        outcome, claim = await store.start(job_id, entry, "up", 3, 60)
        assert (outcome, claim) == ("claimed", "up#1")

    with_store(redis_server.url, body)


def test_a_started_job_given_back_is_queued_in_its_place_and_its_start_not_counted(
        redis_server):
    """A job its pod's breaker refused (503 CircuitOpen): queued again, ahead of later jobs,
    any dispatcher's at once; only under its own claim."""
    async def body(store: JobStore):
        job_id = (await store.submit("alice", REQUEST, **LIMITS)).job_id
        later = (await store.submit("alice", REQUEST, **LIMITS)).job_id
        [(entry, _)] = await store.next_jobs("refused", 1, 100)
        outcome, claim = await store.start(job_id, entry, "refused", 3, 60)
        assert (outcome, claim) == ("claimed", "refused#1")
        assert await store.requeue(job_id, "other#1", "refused", LEASE_S, "no") == "running"
        assert await store.requeue(job_id, claim, "refused", LEASE_S, "CircuitOpen") == "ok"
        job = await store.job(job_id)
        assert (job["status"], job["attempts"]) == ("queued", "0") and "claim" not in job
        assert await queue_positions(store, [job_id]) == [1]
        assert await queue_positions(store, [later]) == [2]
        assert (await store.gauges())["running"] == 0
        assert await store.abandoned_jobs("up", LEASE_S, 10) == [(entry, job_id)]
        # Its own claim: not the one given back, though the attempt is the first again.
        assert await store.start(job_id, entry, "up", 3, 60) == ("claimed", "up#2")
        # The stale claim changes nothing now.
        assert await store.requeue(job_id, claim, "refused", LEASE_S, "late") == "running"
        statuses = [event["status"] for _, event in await store.events_after(job_id)
                    if event["type"] == "status"]
        assert statuses == ["queued", "running", "queued", "running"]

    with_store(redis_server.url, body)


def test_dispatchers_refusing_jobs_put_off_the_estimated_start_while_every_live_one_does(
        redis_server):
    """A dispatcher whose pod's breaker refused a job hands it back and takes no job for
    the reply's ``retry_after_s``; nothing in Redis said so, and the job's estimated start
    was counted from now at each look. The hand-back records it (expiring with it), and
    the throughput read says when a live dispatcher takes jobs again: the soonest of their
    refusals while every live one refuses, none while any takes jobs or none is live."""
    async def body(store: JobStore):
        async def hand_back(dispatcher: str, refusing_s: float, canceled: bool = False
                            ) -> None:
            job_id = (await store.submit("alice", REQUEST, **LIMITS)).job_id
            [entry] = [entry for entry, taken in await store.next_jobs(dispatcher, 10, 100)
                       if taken == job_id]
            _, claim = await store.start(job_id, entry, dispatcher, 3, 60)
            if canceled:
                assert await store.cancel(job_id, "alice", 60) == "canceled"
            assert await store.requeue(job_id, claim, dispatcher, LEASE_S, "CircuitOpen",
                                       refusing_s=refusing_s) == \
                ("canceled" if canceled else "ok")

        async def takes_jobs_in() -> float | None:
            now, _, refusing_until = await store.throughput(live_s=30)
            return None if refusing_until is None else refusing_until - now

        await hand_back("broken", 20)
        assert await takes_jobs_in() is None  # none checked in: nothing known of any
        await store.check_in("broken")
        assert 19 < await takes_jobs_in() <= 20
        await store.check_in("healthy")
        assert await takes_jobs_in() is None  # it takes the job now
        await hand_back("healthy", 5)
        assert 4 < await takes_jobs_in() <= 5  # the first of them to take jobs again
        await store.check_out("healthy")
        assert 18 < await takes_jobs_in() <= 20
        await hand_back("broken", 0.3)  # the refusal is its latest hand-back's, and expires
        await asyncio.sleep(0.4)
        assert await takes_jobs_in() is None
        assert not await store.redis.exists(store.key("refusing", "broken"))
        # A hand-back for other reasons (TorchServe unavailable, Redis's faults) says none.
        await hand_back("broken", None)
        assert await takes_jobs_in() is None
        # The refusal is the dispatcher's: recorded though its job was canceled meanwhile.
        await hand_back("broken", 20, canceled=True)
        assert 19 < await takes_jobs_in() <= 20

    with_store(redis_server.url, body)


def test_a_hand_back_leaves_a_job_another_dispatcher_took_meanwhile(redis_server):
    """The reader's TorchServe check outlasted a lease and another dispatcher took the job
    over and started it: handing it back then would make it claimable under its runner."""
    async def body(store: JobStore):
        job_id = (await store.submit("alice", REQUEST, **LIMITS)).job_id
        [(entry, _)] = await store.next_jobs("slow", 10, 100)
        await asyncio.sleep(0.05)
        assert await store.abandoned_jobs("up", 0.01, 10) == [(entry, job_id)]
        await store.start(job_id, entry, "up", 3, 60)
        assert await store.release("slow", [entry], LEASE_S) == 0
        assert await store.abandoned_jobs("other", LEASE_S, 10) == []
        [pending] = await store.redis.xpending_range(store.key("stream"), "dispatchers",
                                                     "-", "+", 10)
        assert pending["consumer"] == b"up" and pending["time_since_delivered"] < 5000

    with_store(redis_server.url, body)


def test_a_job_handed_back_behind_many_running_jobs_is_found_first(redis_server):
    """One XAUTOCLAIM looks at no more than 10 x COUNT pending entries: with 12 older jobs
    running (renewed, so never idle) ahead of a handed-back one, a dispatcher with room for
    one found nothing and took a newer job instead."""
    async def body(store: JobStore):
        for _ in range(12):
            await store.submit("alice", REQUEST, **LIMITS)
        for entry, job_id in await store.next_jobs("busy", 12, 100):
            assert (await store.start(job_id, entry, "busy", 3, 60))[0] == "claimed"
        left = (await store.submit("alice", REQUEST, **LIMITS)).job_id
        [(entry, _)] = await store.next_jobs("down", 1, 100)
        await store.submit("alice", REQUEST, **LIMITS)  # newer, still undelivered
        assert await store.release("down", [entry], LEASE_S) == 1
        assert await store.abandoned_jobs("up", LEASE_S, 1) == [(entry, left)]

    with_store(redis_server.url, body)


def test_a_job_handed_back_after_redis_failed_its_writes_still_runs_out_of_attempts(
        redis_server):
    """Each start that ended on a fault of Redis's goes back free, up to max_attempts of them
    per job; past those each counts as a failed start does, so a job whose own writes make
    Redis fail (a result too large for it) is dead-lettered, not run again for ever."""
    async def body(store: JobStore):
        job_id = (await store.submit("alice", REQUEST, **LIMITS)).job_id
        [(entry, _)] = await store.next_jobs("d1", 10, 100)
        for fault in range(3):
            outcome, claim = await store.start(job_id, entry, "d1", 3, 60)
            # Each start its own claim, though each is the first attempt again.
            assert (outcome, claim) == ("claimed", f"d1#{fault + 1}")
            assert await store.requeue(job_id, claim, "d1", LEASE_S, f"Redis down {fault}",
                                       free_redis_faults=3) == "ok"
            job = await store.job(job_id)
            assert (job["status"], job["attempts"]) == ("queued", "0")
            assert await store.abandoned_jobs("d1", LEASE_S, 10) == [(entry, job_id)]
        for attempt in range(1, 4):
            outcome, claim = await store.start(job_id, entry, "d1", 3, 60)
            assert (outcome, claim) == ("claimed", f"d1#{3 + attempt}")
            assert await store.requeue(job_id, claim, "d1", LEASE_S, f"OOM {attempt}",
                                       free_redis_faults=3) == "counted"
            assert (await store.job(job_id))["attempts"] == str(attempt)
            assert await store.abandoned_jobs("d1", LEASE_S, 10) == [(entry, job_id)]
        assert await store.start(job_id, entry, "d1", 3, 60) == ("dead", "OOM 3")
        assert (await store.job(job_id))["status"] == "failed"

    with_store(redis_server.url, body)


def test_a_full_redis_keeps_the_claim_and_takes_the_hand_back_whole_once_it_has_room(
        redis_server):
    """A full Redis (maxmemory, noeviction) refuses a running job's progress and its
    hand-back as a whole (nothing half written), and still takes its renewals, so no other
    dispatcher takes the job over meanwhile; with room again the hand-back goes through. One
    that follows a finish Redis ran (its answer lost) is refused: a stored job is not rerun."""
    async def body(store: JobStore):
        job_id = (await store.submit("alice", REQUEST, **LIMITS)).job_id
        [(entry, _)] = await store.next_jobs("d1", 10, 100)
        _, claim = await store.start(job_id, entry, "d1", 3, 60)
        before = await store.job(job_id)
        await store.redis.config_set("maxmemory", 1)
        try:
            with pytest.raises(OutOfMemoryError):
                await store.progress(job_id, claim, 1, 3)
            with pytest.raises(OutOfMemoryError):
                await store.requeue(job_id, claim, "d1", LEASE_S, "full",
                                    free_redis_faults=3)
            assert await store.job(job_id) == before
            assert await store.renew(job_id, claim, "d1") == "ok"
            # Another dispatcher's takeover cannot start it either.
            with pytest.raises(OutOfMemoryError):
                await store.start(job_id, entry, "d2", 3, 60)
            assert await store.job(job_id) == before
        finally:
            await store.redis.config_set("maxmemory", 0)
        assert await store.requeue(job_id, claim, "d1", LEASE_S, "full",
                                   free_redis_faults=3) == "ok"
        job = await store.job(job_id)
        assert (job["status"], job["attempts"]) == ("queued", "0")
        # A finish Redis ran whose answer was lost: the hand-back that follows changes nothing.
        assert await store.abandoned_jobs("d1", LEASE_S, 10) == [(entry, job_id)]
        _, claim = await store.start(job_id, entry, "d1", 3, 60)
        assert await store.finish(job_id, claim, 60, "succeeded", images=[b"png"]) == "stored"
        assert await store.requeue(job_id, claim, "d1", LEASE_S, "answer lost",
                                   free_redis_faults=3) == "succeeded"
        job = await store.job(job_id)
        assert (job["status"], job["attempts"]) == ("succeeded", "1")

    with_store(redis_server.url, body)


def test_abandoned_webhook_events_behind_a_held_head_are_found(redis_server):
    """A look for abandoned webhook events reads at most ten times `count` pending entries
    (Redis's XAUTOCLAIM), and it began at the list's start each time: a head of events
    held in a dispatcher (waiting for a slot, their claims renewed) hid every event behind
    it that a dead dispatcher left, for as long as the head lasted. Each look now goes on
    where the last one stopped."""
    async def body(store: JobStore):
        stream = store.key("webhooks")
        entries = [(await store.redis.xadd(stream, {"id": f"job{i}", "event": "succeeded"}))
                   .decode() for i in range(15)]
        assert len(await store.next_webhooks("dead", 60, 15)) == 15  # all read by "dead"
        await asyncio.sleep(0.6)  # its claims now older than the lease below
        found = []
        for _ in range(3):
            # The live dispatcher renews the head it holds, as renew_webhooks does.
            await store.redis.xclaim(stream, "webhooks", "me", 0, entries[:12], justid=True)
            found += [entry for entry, _, _ in await store.next_webhooks("me", 0.5, 1)]
        assert found and set(found) <= set(entries[12:]), found

    with_store(redis_server.url, body)


def test_a_write_to_a_connection_redis_just_closed_is_a_connection_error():
    """Under uvloop, redis-py's write to a connection a killed Redis had just closed raises
    uvloop's RuntimeError as it is (seen once in a run of
    test_waits_whose_clients_hang_up_as_redis_dies_leave_no_unretrieved_error): the API
    answered that submit 500 with a traceback, where the outage is a 503. The error is
    uvloop's own words, raised here; other RuntimeErrors stay what they are."""
    async def write_to(closed: bool):
        raise RuntimeError("unable to perform operation on <TCPTransport closed=True "
                           "reading=False 0x5558cf0f8080>; the handler is closed" if closed
                           else "something else")

    with pytest.raises(RedisConnectionError, match="the read of the job"):
        asyncio.run(answered_within(5.0, write_to(True), "the read of the job"))
    with pytest.raises(RuntimeError, match="something else"):
        asyncio.run(answered_within(5.0, write_to(False), "the read of the job"))

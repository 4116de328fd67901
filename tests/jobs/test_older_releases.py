"""Jobs an older release left in Redis, driven by this one's store, against a real
redis-server: a rolling upgrade finds jobs queued, running and ended by the release before,
and old and new dispatchers run side by side for a while.

Each job is written with plain Redis commands, field for field as the release named leaves
it (as read from the Redis of a real API and dispatcher of that release, docs/jobs.md,
"Upgrading with jobs in flight"). What changed between them: 0c557e9 added `starts` (the
count a claim is numbered by; d54bf6a numbered it by `attempts`) and `redis_faults`; the
release after it added `error_claim`. No field was renamed or removed.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time

import pytest

from sdxl_jobs.store import GROUP, JobStore
from sdxl_jobs.views import job_view

from jobstack import LIMITS, REQUEST, queue_positions, with_store

pytestmark = pytest.mark.jobs

RELEASES = ("d54bf6a", "0c557e9")
OWNER = hashlib.sha256(b"an API key").hexdigest()
OLD = "gpu-0-7"  # the old dispatcher, named `<host>-<pid>` as a dispatcher names itself
HOOK = "http://127.0.0.1:9/hook"


async def leave_job(store: JobStore, release: str, status: str, *, attempts: int = 0,
                    webhook: str = "", webhook_events: str = "", idempotency_key: str = "",
                    body_sha: str = "", ttl_s: int = 0) -> tuple[str, str]:
    """Write a job as ``release`` leaves it in ``status`` after ``attempts`` starts by the
    dispatcher ``OLD`` (each but the last failed with "HTTP 500: boom"), which owns the
    stream entry of a running job; ended ones expire in ``ttl_s``. (job id, entry)"""
    r, p = store.redis, store.prefix
    job_id = hashlib.sha256(f"{release}{status}{time.time_ns()}".encode()).hexdigest()[:32]
    now = time.time()
    idem = hashlib.sha256(idempotency_key.encode()).hexdigest() if idempotency_key else ""
    entry = (await r.xadd(p + "stream", {"id": job_id})).decode()
    # What `_SUBMIT` writes, the same in both releases.
    fields = {"id": job_id, "owner": OWNER, "status": "queued", "request": json.dumps(REQUEST),
              "created_at": repr(now - 5), "attempts": 0, "step": 0,
              "total": REQUEST["num_inference_steps"], "webhook": webhook,
              "webhook_events": webhook_events, "num_images": REQUEST["num_images"],
              "idem": idem, "entry": entry}
    events = [{"type": "status", "status": "queued"}]
    if attempts:
        # `_START`: d54bf6a claims as `<dispatcher>#<attempts>`; 0c557e9 counts `starts`.
        fields.update(status="running", attempts=attempts, claim=f"{OLD}#{attempts}",
                      first_started_at=repr(now - 4), started_at=repr(now - 3), step=1)
        if release != "d54bf6a":
            fields["starts"] = attempts
        for attempt in range(1, attempts + 1):
            events.append({"type": "status", "status": "running", "attempt": attempt})
            if attempt < attempts:  # `_RECORD_ERROR`
                events.append({"type": "status", "status": "running",
                               "retry": "HTTP 500: boom"})
                fields["last_error"] = "HTTP 500: boom"
        events.append({"type": "progress", "step": 1, "total": fields["total"]})
    if status in ("succeeded", "failed", "canceled"):
        fields.update(status=status, finished_at=repr(now - 1))
        if status == "succeeded":
            fields.update(result=json.dumps({"format": "png", "width": 64, "height": 64}),
                          seeds="[7, 8]")
            for index in range(REQUEST["num_images"]):
                await r.set(f"{p}image:{job_id}:{index}", b"png", ex=ttl_s)
        elif status == "failed":
            fields.update(result="{}", seeds="[]", num_images=0, error=json.dumps(
                {"code": 500, "type": "EngineCrashed", "message": "the engine died"}))
        events.append({"type": "status", "status": status})
    await r.hset(f"{p}job:{job_id}", mapping=fields)
    for event in events:
        await r.xadd(f"{p}events:{job_id}", {"data": json.dumps(event)})
    await r.zadd(f"{p}owned:{OWNER}", {job_id: now - 5})
    if idem:
        await r.set(f"{p}idem:{OWNER}:{idem}", f"{job_id}|{body_sha}")
    if status in ("succeeded", "failed", "canceled"):  # `finalize`
        await r.xdel(p + "stream", entry)
        for key in (f"{p}job:{job_id}", f"{p}events:{job_id}", f"{p}idem:{OWNER}:{idem}"):
            await r.expire(key, ttl_s)
    elif status == "queued":
        await r.zadd(p + "queued", {job_id: now - 5})
        await r.sadd(f"{p}active:{OWNER}", job_id)
    else:
        await r.sadd(p + "running", job_id)
        await r.sadd(f"{p}active:{OWNER}", job_id)
        # Delivered to the old dispatcher, pending there: the entry is the oldest unread.
        read = await r.xreadgroup(GROUP, OLD, {p + "stream": ">"}, count=1)
        assert read[0][1][0][0].decode() == entry
    return job_id, entry


async def statuses(store: JobStore, job_id: str) -> list[str]:
    return [event["status"] for _, event in await store.events_after(job_id)
            if event["type"] == "status" and "retry" not in event]


async def webhooks(store: JobStore) -> list[tuple[str, str]]:
    return [(fields[b"id"].decode(), fields[b"event"].decode())
            for _, fields in await store.redis.xrange(store.key("webhooks"))]


@pytest.mark.parametrize("release", RELEASES)
def test_a_job_an_older_release_left_running_is_taken_over_and_stored_once(redis_server,
                                                                           release):
    """The old dispatcher died mid-job (or its drain ran out): this release takes the job
    over after the lease and stores it once, 2 attempts, under a claim of its own even
    under the old one's name (a StatefulSet's pod, or a container's pid 1 again on the
    same host). Before, a job d54bf6a had started got its old claim back (`gpu-0-7#1`):
    a late write of the old start passed for the new one's."""
    async def body(store: JobStore):
        job_id, entry = await leave_job(store, release, "running", attempts=1, webhook=HOOK,
                                        webhook_events="running,succeeded",
                                        idempotency_key="k1", body_sha="sha1")
        old_claim = f"{OLD}#1"
        assert await store.abandoned_jobs("new-1", 30, 10) == []  # its lease still holds
        await asyncio.sleep(0.05)
        assert await store.abandoned_jobs(OLD, 0.01, 10) == [(entry, job_id)]
        outcome, claim = await store.start(job_id, entry, OLD, 3, 60)
        assert outcome == "claimed" and claim == f"{OLD}#2", claim
        assert await store.progress(job_id, old_claim, 2, 3) == "running"
        assert await store.finish(job_id, old_claim, 60, "succeeded", seeds=[7, 8],
                                  images=[b"late"]) == "running"
        assert await store.progress(job_id, claim, 1, 3) == "ok"
        assert await store.finish(job_id, claim, 60, "succeeded", {"format": "png"},
                                  seeds=[7, 8], images=[b"new0", b"new1"]) == "stored"
        job = await store.job(job_id)
        assert (job["status"], job["attempts"]) == ("succeeded", "2")
        assert await store.image(job_id, 0) == b"new0"
        assert await statuses(store, job_id) == ["queued", "running", "running", "succeeded"]
        # The `running` webhook went at the first start, under the old release.
        assert await webhooks(store) == [(job_id, "succeeded")]
        assert (await store.submit(OWNER, REQUEST, idempotency_key="k1", body_sha="sha1",
                                   **LIMITS)).job_id == job_id
        for key in (store.key("job", job_id), store.key("events", job_id),
                    store.key("image", job_id, "1"),
                    store.key("idem", OWNER, hashlib.sha256(b"k1").hexdigest())):
            assert 0 < await store.redis.ttl(key) <= 60, key
        gauges = await store.gauges()
        assert (gauges["backlog"], gauges["queued"], gauges["running"]) == (0, 0, 0)
        assert await store.redis.scard(store.key("active", OWNER)) == 0
    with_store(redis_server.url, body)


@pytest.mark.parametrize("release", RELEASES)
def test_a_job_an_older_release_left_queued_runs_once_with_its_webhooks_and_key(
        redis_server, release):
    """Queued under the old release, with a webhook and an idempotency key: the key still
    answers that job (and refuses another body), the job keeps its place, runs on its
    first attempt and sends its `running` and `succeeded` webhooks once each."""
    async def body(store: JobStore):
        job_id, entry = await leave_job(store, release, "queued", webhook=HOOK,
                                        webhook_events="running,succeeded",
                                        idempotency_key="k2", body_sha="sha2")
        again = await store.submit(OWNER, REQUEST, idempotency_key="k2", body_sha="sha2",
                                   **LIMITS)
        other = await store.submit(OWNER, REQUEST, idempotency_key="k2", body_sha="sha3",
                                   **LIMITS)
        assert (again.outcome, again.job_id) == ("existing", job_id)
        assert (other.outcome, other.job_id) == ("conflict", job_id)
        assert await queue_positions(store, [job_id]) == [1]
        assert await store.next_jobs("new-1", 10, 100) == [(entry, job_id)]
        outcome, claim = await store.start(job_id, entry, "new-1", 3, 60)
        assert (outcome, claim) == ("claimed", "new-1#1")
        assert await store.finish(job_id, claim, 60, "succeeded", {"format": "png"},
                                  seeds=[7, 8], images=[b"a", b"b"]) == "stored"
        job = await store.job(job_id)
        assert (job["status"], job["attempts"]) == ("succeeded", "1")
        assert await webhooks(store) == [(job_id, "running"), (job_id, "succeeded")]
        listed, _ = await store.owned_jobs(OWNER)
        assert [listed_job["id"] for listed_job in listed] == [job_id]
    with_store(redis_server.url, body)


@pytest.mark.parametrize("release", RELEASES)
def test_a_retry_an_older_release_recorded_counts_toward_the_dead_letter(redis_server,
                                                                         release):
    """Left running on its second start, its first error recorded by the old release (no
    `error_claim`): this release's start is the third, its own error is recorded (not
    taken for the old one's), and the next start dead-letters the job with that error."""
    async def body(store: JobStore):
        job_id, entry = await leave_job(store, release, "running", attempts=2,
                                        webhook=HOOK, webhook_events="failed")
        await asyncio.sleep(0.05)
        assert await store.abandoned_jobs("new-1", 0.01, 10) == [(entry, job_id)]
        outcome, claim = await store.start(job_id, entry, "new-1", 3, 60)
        assert outcome == "claimed"
        assert await store.record_error(job_id, claim, "HTTP 500: boom 3") == "ok"
        retries = [event["retry"] for _, event in await store.events_after(job_id)
                   if "retry" in event]
        assert retries == ["HTTP 500: boom", "HTTP 500: boom 3"]
        assert await store.start(job_id, entry, "new-1", 3, 60) == ("dead", "HTTP 500: boom 3")
        job = await store.job(job_id)
        assert (job["status"], job["attempts"]) == ("failed", "3")
        assert "started 3 times" in json.loads(job["error"])["message"]
        dead = await store.redis.xrange(store.key("dead"))
        assert [fields[b"id"].decode() for _, fields in dead] == [job_id]
        assert await webhooks(store) == [(job_id, "failed")]
    with_store(redis_server.url, body)


@pytest.mark.parametrize("release", RELEASES)
def test_jobs_an_older_release_left_are_read_listed_canceled_and_expire(redis_server,
                                                                        release):
    """Ended jobs read as they were and expire at the time the old release set; queued and
    running ones are canceled (their entries gone, so no dispatcher takes one over); the
    listing and its filter hold them all, and lose the ended ones once they expire."""
    async def body(store: JobStore):
        ended = {status: (await leave_job(store, release, status, attempts=1, ttl_s=2))[0]
                 for status in ("succeeded", "failed")}
        ended["canceled"], _ = await leave_job(store, release, "canceled", ttl_s=2)
        running, _ = await leave_job(store, release, "running", attempts=1)
        queued, _ = await leave_job(store, release, "queued")
        for status, job_id in ended.items():
            view = job_view(await store.job(job_id, OWNER), ttl_s=60)
            assert view["status"] == status and view["expires_at"], view
        assert job_view(await store.job(ended["succeeded"]))["images"] == \
            [f"/v1/jobs/{ended['succeeded']}/images/{index}" for index in (0, 1)]
        assert job_view(await store.job(ended["failed"]))["error"]["type"] == "EngineCrashed"
        # In no listing by state (the older release kept none): found all the same.
        live, _ = await store.owned_jobs(OWNER, statuses=frozenset({"queued", "running"}))
        assert [job["id"] for job in live] == [queued, running]
        assert await store.cancel(ended["succeeded"], OWNER, 60) == "succeeded"
        assert await store.cancel(running, OWNER, 60) == "canceled"
        assert await store.cancel(queued, OWNER, 60) == "canceled"
        await asyncio.sleep(0.05)
        assert await store.abandoned_jobs("new-1", 0.01, 10) == []
        assert await store.next_jobs("new-1", 10, 100) == []
        failed, _ = await store.owned_jobs(OWNER, statuses=frozenset({"failed"}))
        assert [job["id"] for job in failed] == [ended["failed"]]
        listed, _ = await store.owned_jobs(OWNER)
        assert {job["id"] for job in listed} == {*ended.values(), running, queued}
        await asyncio.sleep(2.1)
        for job_id in ended.values():
            assert await store.job(job_id) is None
            assert await store.image(job_id, 1) is None
        listed, _ = await store.owned_jobs(OWNER)
        assert {job["id"] for job in listed} == {running, queued}
    with_store(redis_server.url, body)


def test_a_job_an_older_release_moves_is_listed_under_its_new_state_after_the_check(
        redis_server):
    """During a rollout, a job submitted by this release is started, then ended, by a
    dispatcher of the release before, whose scripts change the job's status and keep no
    listing by state. The filter misses it under its new state until the key's listings
    are checked again (``owned-indexed`` gone: within the hour), and never lists it under a
    state it left: read there, it is skipped and moved to its state's listing."""
    async def body(store: JobStore):
        r, p = store.redis, store.prefix
        running = frozenset({"running"})
        job_id = (await store.submit(OWNER, REQUEST, **LIMITS)).job_id
        assert [job["id"] for job in (await store.owned_jobs(OWNER, statuses=running))[0]] \
            == []  # the key's first filtered listing: its listings are checked now
        # The older release's `_START`, as plain commands: no `owned-<status>` listing.
        [(entry, _)] = await store.redis.xreadgroup(GROUP, OLD, {p + "stream": ">"}, count=1)
        await r.hset(f"{p}job:{job_id}", mapping={
            "status": "running", "attempts": 1, "starts": 1, "claim": f"{OLD}#1",
            "first_started_at": repr(time.time()), "started_at": repr(time.time())})
        await r.zrem(p + "queued", job_id)
        await r.sadd(p + "running", job_id)

        async def listed(*states: str) -> list[str]:
            jobs, _ = await store.owned_jobs(OWNER, statuses=frozenset(states))
            return [job["id"] for job in jobs]
        assert await listed("running") == []  # the rollout's gap: not checked again yet
        await r.delete(f"{p}owned-indexed:{OWNER}")  # as if the hour had passed
        assert await listed("running") == [job_id]
        # Ended by the older release's `finalize`: listed as running, it is running no more.
        await r.hset(f"{p}job:{job_id}", mapping={"status": "succeeded",
                                                  "finished_at": repr(time.time())})
        await r.srem(p + "running", job_id)
        await r.srem(f"{p}active:{OWNER}", job_id)
        assert await r.zscore(f"{p}owned-running:{OWNER}", job_id) is not None
        assert await listed("running") == []  # skipped, not listed under a state it left
        assert await r.zscore(f"{p}owned-running:{OWNER}", job_id) is None  # and mended
        assert await listed("succeeded") == [job_id]
    with_store(redis_server.url, body)

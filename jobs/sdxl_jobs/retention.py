"""How long Redis's files keep an expired job: rewrites of its append-only file.

Redis's append-only file holds every command since its last rewrite, an expired job's
prompt, request and images included, and Redis rewrites it on its own only once the file
has doubled and passed 64 MB: on a quiet server, weeks. ``forget_expired`` asks for a
rewrite at most every so often, when keys expired since the last one. ``make serve-jobs``
calls it for the Redis it starts (``RedisServer.forget_expired``); the job API calls it
(``keep_forgetting``) for a Redis of yours when ``SDXL_JOBS_REDIS_REWRITE_S`` is set, as the
Kubernetes overlay sets it for its own ``sdxl-redis``. The API, not the dispatchers: its
replicas run always, where the GPU pods scale to zero before the last jobs expire.

Example (needs a running Redis):
    forget_expired(redis.Redis.from_url(url), every_s=900)
"""

from __future__ import annotations

import logging
import time
from typing import NoReturn

import redis
from redis.exceptions import RedisError, ResponseError

from sdxl_jobs.store import reason_to_log

log = logging.getLogger("sdxl_jobs.retention")

# Under the store's prefix, which an ACL user of the stack may write (``~sdxl:*``).
LEASE_KEY = "sdxl:aof-rewrite:lease"
# "<Redis's run id> <its count of expired keys>" at the last rewrite asked for.
SEEN_KEY = "sdxl:aof-rewrite:seen"


class RewriteRefused(Exception):
    """Redis refuses INFO or BGREWRITEAOF (a managed service, an ACL user without them),
    or has no append-only file to rewrite."""


def forget_expired(client: redis.Redis, every_s: float) -> bool:
    """Have Redis rewrite its append-only file, at most every ``every_s`` across all the
    processes that call this on it, when keys expired since the last rewrite asked for, or
    Redis started since. True when a rewrite was asked for.

    Expired jobs leave the files within ``every_s``, the caller's time between calls and a
    rewrite's time after they expire; files Redis has deleted may still be on the disk's free
    blocks.

    Raises:
        RewriteRefused: with Redis's words, or why there is nothing to rewrite.
        RedisError: Redis unreachable or failing; ask again later.
    """
    # A lease, so that of several callers (the API's replicas, make serve-jobs beside an
    # API told to) one asks per interval. A key with NX and an expiry: nobody hands it back,
    # so a caller killed while holding it holds up the others for one interval at most.
    if not client.set(LEASE_KEY, "1", nx=True, px=max(1, round(every_s * 1000))):
        return False
    # A key past its expiry stays in memory, and in a rewrite's file (its RDB part keeps
    # expired keys), until Redis samples it; a SCAN deletes every expired key it meets, so
    # none is left for the rewrite to keep.
    try:
        for _ in client.scan_iter(count=1000):
            pass
    except ResponseError as exc:  # an ACL user without SCAN: as refused as BGREWRITEAOF
        raise RewriteRefused(f"SCAN refused: {exc}") from None
    try:
        info = client.info()
    except ResponseError as exc:
        raise RewriteRefused(f"INFO refused: {exc}") from None
    if not info.get("aof_enabled"):
        # BGREWRITEAOF would write a new copy of every job to disk.
        raise RewriteRefused("its append-only file is off (appendonly no): nothing to rewrite")
    run_id, expired = info["run_id"], int(info["expired_keys"])
    # The lease taken before this one expired once since: one expired key is ours. A start
    # is a change too: a file loaded with expired jobs in it counts none of them as expired.
    nothing_new = (client.get(SEEN_KEY) or b"").decode() == f"{run_id} {expired - 1}"
    if nothing_new and info["aof_last_bgrewrite_status"] == "ok":
        client.set(SEEN_KEY, f"{run_id} {expired}")
        return False
    if info["aof_rewrite_in_progress"] or info["aof_rewrite_scheduled"]:
        # The one running may have missed the latest expiries: the next call asks again.
        # Deleted, not expired, the lease adds nothing to the count (SEEN_KEY is kept).
        client.delete(LEASE_KEY)
        return False
    try:
        client.bgrewriteaof()
    except ResponseError as exc:
        raise RewriteRefused(f"BGREWRITEAOF refused: {exc}") from None
    client.set(SEEN_KEY, f"{run_id} {expired}")
    return True


def keep_forgetting(redis_url: str, every_s: float) -> NoReturn:
    """``forget_expired`` every tenth of ``every_s`` (every 30 s at most), for good: the job
    API's thread with ``SDXL_JOBS_REDIS_REWRITE_S``. A Redis that refuses is one
    WARNING line, then asked on quietly (a refusal fails no job: the jobs go on); one that
    does not answer is asked again at the next check."""
    client = redis.Redis.from_url(redis_url, socket_timeout=30, socket_connect_timeout=5)
    warned = failed = False
    while True:
        time.sleep(min(every_s / 10, 30.0))
        try:
            forget_expired(client, every_s)
        except RewriteRefused as exc:
            if not warned:
                log.warning("Redis does not rewrite its append-only file for us (%s): an "
                            "expired job stays in its files until Redis rewrites them on its "
                            "own; unset SDXL_JOBS_REDIS_REWRITE_S, or see docs/security.md for "
                            "what to set on it", str(exc)[:200])
                warned = True
        except RedisError as exc:
            log.debug("no rewrite asked for now: %s", reason_to_log(exc))
        except Exception:  # noqa: BLE001
            # Anything else (a Redis-compatible server whose INFO lacks a field) would end
            # this thread with a traceback and no rewrite again, with nothing in health or
            # metrics to show it: said once, as a refusal is, and asked again later.
            if not failed:
                log.exception("asking Redis to rewrite its append-only file failed; asked "
                              "again at each check, logged at DEBUG from now on")
                failed = True
            else:
                log.debug("asking Redis to rewrite its append-only file failed", exc_info=True)

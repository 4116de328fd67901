"""Jobs in Redis: every state change is one Lua script, so no race can lose or double a job.

Layout (all keys under one prefix, ``sdxl:`` by default):

- ``stream``: a Redis stream with one entry per job not yet finished, read by the consumer
  group ``dispatchers``. An entry is delivered to one dispatcher and stays *pending* (owned
  by that dispatcher) until the job ends; a dispatcher renews its claim while it works, and
  a claim not renewed for ``lease_s`` is taken over by another dispatcher (XAUTOCLAIM).
  Finished entries are acknowledged and deleted, so the stream's length is the backlog
  (queued plus running): what KEDA scales on.
- ``job:<id>``: the job (a hash); ``events:<id>``: its state changes and denoising steps
  (a stream, so a reconnecting client resumes after the last event id it saw);
  ``image:<id>:<i>``: the image bytes. All three expire ``result_ttl_s`` after the end
  (that of the process that ended the job, kept as the job's ``kept_s``).
- ``queued``: queued job ids by submit time (queue position); ``running``: running ids;
  ``active:<owner>``: an API key's queued and running ids (its cap); ``owned:<owner>``: its
  jobs by submit time, each listed until the job itself expires (the listing expires with
  the key's longest-kept ended job, when none is queued or running; ``owned-ttl:<owner>``,
  empty, expires then, whichever TTL each job ended with); ``owned-<status>:<owner>``: the
  same listing, one per state, so that a filtered listing reads its matches alone (an ended
  state's expires with its longest-kept job; ``owned-indexed:<owner>``: they were checked
  against the jobs within the last hour, as jobs of an older release are in none);
  ``idem:<owner>:<key>``: an
  idempotency key's job, kept while the job lives and as long as its results (it expires
  with the job, not ``result_ttl_s`` after the submit); ``dead``: the dead-letter stream;
  ``webhooks``: deliveries to make; ``finished``: the ids of the last ten minutes' ends
  (estimated starts), gone ten minutes after the last; ``busy``: the last ten minutes'
  spells with a job running (start, end), and ``busy-since``: the start of the one going
  on, which estimated starts divide those ends by; ``refusing:<dispatcher>``: that
  dispatcher takes no job until it expires (its pod's breaker refused one: ``requeue``),
  which estimated starts wait for while every live dispatcher has one.
- ``stats``: counters and histogram buckets the API exports on ``/metrics``.
- ``store-created``: when the store was set up, by Redis's clock (``mark_created``): the
  first dispatcher start or API scrape of ``/metrics`` that finds it missing writes it, so
  another value later means that Redis lost its data (``say_lost_data``).

Who may write a result: each start of a job gets a claim (``<dispatcher>#<n>``, its nth
start: a hand-back gives its attempt back, never its start number); a result, a progress
event or a renewal with any other claim is refused. So a dispatcher that was presumed dead
and comes back late can never overwrite what its successor did.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import logging
import re
import secrets
import socket
import ssl
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Awaitable, Callable

import redis.asyncio as aioredis
from redis.asyncio import BlockingConnectionPool
from redis.exceptions import AuthenticationError, AuthorizationError, BusyLoadingError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import MasterDownError, OutOfMemoryError, ReadOnlyError, RedisError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.maint_notifications import MaintNotificationsConfig

from sdxl_jobs.settings import redacted_url

log = logging.getLogger(__name__)

GROUP = "dispatchers"
WEBHOOK_GROUP = "webhooks"
FINAL_STATES = ("succeeded", "failed", "canceled")
STATES = ("queued", "running", *FINAL_STATES)
JOB_ID = re.compile(r"[0-9a-f]{32}")  # fullmatch: "$" would let a final "\n" through


def iso(seconds: float | str | None) -> str | None:
    """RFC 3339 UTC time with milliseconds, or None: how a job's times and the store's
    creation mark are told to people.

    >>> iso(0), iso("")
    ('1970-01-01T00:00:00.000Z', None)
    """
    if seconds in (None, ""):
        return None
    moment = datetime.fromtimestamp(float(seconds), timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


# Seconds; submit-to-start spans queueing under load, start-to-finish one generation.
WAIT_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
RUN_BUCKETS = (0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)
# Jobs one listing call reads at most (each a hash read): a key's listing of jobs expired
# since its last submit answers a short page with a cursor rather than read thousands at once.
LIST_SCAN = 1000
# A key's listings by state are read as complete for this long after they were last checked
# against its jobs (``_index_owned``): what a release before this one, still running during
# a rollout, did to jobs meanwhile is in none of them. Checked INDEX_STEP jobs per script.
INDEX_TRUSTED_S = 3600.0
INDEX_STEP = 1000
Place = tuple[float, str]  # a job's place in a key's listing: (its submit time, its id)
EVENTS_KEPT = 2000  # a 100-step, 4-image job makes about 110 events
# A dispatcher's check-in is kept at least this long, whatever a short consumer bound says:
# well past the 30 s within which the API counts a live one (each checks in every 5 s).
CHECK_IN_KEPT_S = 300.0
# Redis answers a blocking read only when it ends, so a block as long as the connection's
# socket timeout makes the client give up on a healthy connection (a `Prefer: wait=60`
# submit answered 503 after 30 s): no block is longer than this, or a third of that timeout.
LONGEST_BLOCK_MS = 10_000
# How long a blocking read waits for a connection of the bounded pool (``from_url``'s
# ``max_waiting``) when all are taken. The API admits no more waits than connections, so
# this covers only a wait just ended whose connection is not back yet.
WAITING_CONNECTION_S = 5.0
# How long any other call waits for a connection of its bounded pool (``from_url``'s
# ``max_calls``) when all are taken: a call holds one for milliseconds, so one that is not
# free by then is a burst this replica cannot serve now. Under the health check's 3 s, so
# it says why (``NO_CONNECTION_FREE``) rather than that Redis does not answer.
CALL_CONNECTION_S = 2.0
# redis-py's words when a bounded pool has no connection free within its timeout.
NO_CONNECTION_FREE = "No connection available."


def no_connection_free(exc: BaseException) -> bool:
    """Whether ``exc`` is this process's own bounded pool having no connection free (a
    burst of calls), not Redis being away: redis-py raises both as ConnectionError."""
    return isinstance(exc, RedisConnectionError) and str(exc) == NO_CONNECTION_FREE


def _lua_list(values: tuple[float, ...]) -> str:
    return "{" + ", ".join(repr(float(v)) for v in values) + "}"


# Redis's clock: the one every process of the job API shares (docs/jobs.md, "Clocks"). The
# submitting replica's clock stamped a job's submit and the dispatcher's its start and end,
# and a node whose clock was off by minutes made waits negative and ages wrong by as much.
# Redis 7 replicates a script by its effects, so a script may read it. Its text, to the
# microsecond, as the stored fields were written.
_REDIS_NOW = """
local function redis_now()
  local t = redis.call('TIME')
  return t[1] .. '.' .. string.format('%06d', tonumber(t[2]))
end
"""

# KEYS[1]: the store's creation mark; written (Redis's time) when missing. The mark as it
# stands: of the processes that find it missing at once, the first one's.
_MARK_CREATED = _REDIS_NOW + """
local mark = redis.call('GET', KEYS[1])
if not mark then
  mark = redis_now()
  redis.call('SET', KEYS[1], mark)
end
return mark
"""

# Shared by the scripts below: ARGV[1] is always the key prefix, ARGV[2] the job id.
_LUA_COMMON = _REDIS_NOW + ("""
local P, id = ARGV[1], ARGV[2]
local jk = P .. 'job:' .. id
local function event(data)
  return redis.call('XADD', P .. 'events:' .. id, 'MAXLEN', '~', %(events)d, '*',
                    'data', cjson.encode(data))
end
local function observe(name, bounds, value)
  for _, le in ipairs(bounds) do
    if value <= le then redis.call('HINCRBY', P .. 'stats', name .. '_bucket:' .. le, 1) end
  end
  redis.call('HINCRBY', P .. 'stats', name .. '_bucket:+Inf', 1)
  redis.call('HINCRBYFLOAT', P .. 'stats', name .. '_sum', value)
  redis.call('HINCRBY', P .. 'stats', name .. '_count', 1)
end
-- The time a job runs anywhere, which estimated starts divide the recent ends by: over the
-- whole 5 minutes, a quiet spell before (or between) them made a queue's start look many
-- times later than it came. `busy`: the spells that ended (member: start, score: end);
-- `busy-since`: the start of the spell going on, while `running` holds a job.
local function began_running(now)
  if redis.call('SCARD', P .. 'running') > 0 then return end
  local since = now
  -- A spell that ended under a second ago goes on (one dispatcher's next job): an entry
  -- per quiet spell, not one per job.
  local last = redis.call('ZRANGE', P .. 'busy', -1, -1, 'WITHSCORES')
  if #last > 0 and now - tonumber(last[2]) < 1 then
    since = last[1]
    redis.call('ZREM', P .. 'busy', last[1])
  end
  redis.call('SET', P .. 'busy-since', since)
end
local function left_running(now)
  if redis.call('SCARD', P .. 'running') > 0 then return end
  local since = redis.call('GET', P .. 'busy-since')
  if not since then return end
  redis.call('DEL', P .. 'busy-since')
  redis.call('ZADD', P .. 'busy', now, since)
  redis.call('ZREMRANGEBYSCORE', P .. 'busy', '-inf', now - 600)
  redis.call('EXPIRE', P .. 'busy', 600)
end
-- A key's listing of one state, `owned-<status>:<owner>`: the ids of its jobs in that state
-- under the same scores as `owned:<owner>`, so that a filtered listing reads its matches
-- alone, where it read each of the key's jobs until it found them (a backend key's few
-- running jobs among thousands ended: up to 1000 reads a page, and empty pages).
local STATES = {%(states)s}
local function listed_as(owner, status) return P .. 'owned-' .. status .. ':' .. owner end
-- Move the job from its listing of `from` (if any) to that of `to`; the latter's key.
local function relist(owner, from, to)
  if from then redis.call('ZREM', listed_as(owner, from), id) end
  local score = redis.call('ZSCORE', P .. 'owned:' .. owner, id) or
                redis.call('HGET', jk, 'created_at')
  local key = listed_as(owner, to)
  redis.call('ZADD', key, score, id)
  return key
end
-- End a job: state, timings, counters, webhook, expiry; its stream entry goes.
local function finalize(status, now, ttl, error_json)
  local job = redis.call('HMGET', jk, 'owner', 'entry', 'started_at', 'webhook',
                         'webhook_events', 'num_images', 'idem', 'status')
  -- kept_s: the TTL it ends with, this process's; its expires_at is told from it, where
  -- a reader's own TTL was wrong by the difference while a rollout changes the setting.
  redis.call('HSET', jk, 'status', status, 'finished_at', now, 'kept_s', ttl)
  local ended_list = relist(job[1], job[8], status)
  if error_json and error_json ~= '' then redis.call('HSET', jk, 'error', error_json) end
  redis.call('ZREM', P .. 'queued', id)
  redis.call('SREM', P .. 'running', id)
  left_running(now)
  redis.call('SREM', P .. 'active:' .. job[1], id)
  -- owned-ttl's own expiry is the longest an ended job of the key has left: an API and a
  -- dispatcher may end jobs with different TTLs, and the listing expired with the last
  -- end's, dropping jobs kept longer while they lived.
  local owned_ttl = P .. 'owned-ttl:' .. job[1]
  if redis.call('PTTL', owned_ttl) < ttl * 1000 then
    redis.call('SET', owned_ttl, '', 'PX', math.ceil(ttl * 1000))
  end
  -- Its state's listing lasts as long as the longest kept of the jobs in it, as `owned`
  -- (only ever longer: one an older release ended may be kept longer than `owned-ttl`).
  if redis.call('PTTL', ended_list) < redis.call('PTTL', owned_ttl) then
    redis.call('PEXPIRE', ended_list, redis.call('PTTL', owned_ttl))
  end
  -- The key's last job to end: every job it lists has ended, and the listing expires with
  -- the longest kept (a submit keeps it again). The ids of a key gone quiet stayed listed
  -- for good, unlisted only by its next submit or listing.
  if redis.call('SCARD', P .. 'active:' .. job[1]) == 0 then
    local kept_ms = redis.call('PTTL', owned_ttl)
    redis.call('PEXPIRE', P .. 'owned:' .. job[1], kept_ms)
    -- Empty by now (each job left them as it ended); any id left there goes with `owned`.
    redis.call('PEXPIRE', listed_as(job[1], 'queued'), kept_ms)
    redis.call('PEXPIRE', listed_as(job[1], 'running'), kept_ms)
    local indexed = P .. 'owned-indexed:' .. job[1]
    if redis.call('PTTL', indexed) > kept_ms then redis.call('PEXPIRE', indexed, kept_ms) end
  end
  redis.call('XACK', P .. 'stream', '%(group)s', job[2])
  redis.call('XDEL', P .. 'stream', job[2])
  redis.call('HINCRBY', P .. 'stats', 'jobs_' .. status, 1)
  if job[3] then observe('run_seconds', %(run_buckets)s, now - tonumber(job[3])) end
  -- The throughput estimated starts are made from: a job canceled while queued took no
  -- dispatcher's time, and a burst of cancels made every start look minutes nearer.
  if not (status == 'canceled' and job[8] == 'queued') then
    redis.call('ZADD', P .. 'finished', now, id)
    redis.call('ZREMRANGEBYSCORE', P .. 'finished', '-inf', now - 600)
    -- Trimmed at each end only, the last ten minutes' ids stayed for good once jobs stopped.
    redis.call('EXPIRE', P .. 'finished', 600)
  end
  event({type = 'status', status = status})
  redis.call('EXPIRE', jk, ttl)
  redis.call('EXPIRE', P .. 'events:' .. id, ttl)
  for i = 0, tonumber(job[6] or '1') - 1 do
    redis.call('EXPIRE', P .. 'image:' .. id .. ':' .. i, ttl)
  end
  -- A retry with the job's idempotency key finds the job for as long as the job is kept.
  if job[7] and job[7] ~= '' then
    local idem_key = P .. 'idem:' .. job[1] .. ':' .. job[7]
    local held = redis.call('GET', idem_key)
    if held and string.sub(held, 1, #id + 1) == id .. '|' then
      redis.call('EXPIRE', idem_key, ttl)
    end
  end
  if job[4] and job[4] ~= '' and string.find(',' .. job[5] .. ',', ',' .. status .. ',', 1, true) then
    redis.call('XADD', P .. 'webhooks', '*', 'id', id, 'event', status)
  end
end
""" % {"events": EVENTS_KEPT, "group": GROUP, "run_buckets": _lua_list(RUN_BUCKETS),
         "states": ", ".join(repr(state) for state in STATES)})

# ARGV: prefix, id, owner, request, idempotency key, body sha, rate per minute,
# max active, result ttl, webhook, webhook events, images, steps
_SUBMIT = _LUA_COMMON + """
local owner, created_at = ARGV[3], redis_now()
local now = tonumber(created_at)
local idem = ARGV[5]
if idem ~= '' then
  local previous = redis.call('GET', P .. 'idem:' .. owner .. ':' .. idem)
  if previous then
    local sep = string.find(previous, '|', 1, true)
    local first = string.sub(previous, 1, sep - 1)
    if string.sub(previous, sep + 1) ~= ARGV[6] then return {'conflict', first} end
    if redis.call('EXISTS', P .. 'job:' .. first) == 1 then return {'existing', first} end
  end
end
-- The cap first: a submit it refuses is not counted against the rate, so a client that
-- waits as told (Retry-After) and submits again has not used up its minute meanwhile.
local active_key = P .. 'active:' .. owner
local active = redis.call('SCARD', active_key)
if active >= tonumber(ARGV[8]) then
  -- Jobs whose record is gone (evicted by a Redis whose maxmemory-policy deletes keys when
  -- full) never end, so nothing else takes them out: each held a place of the cap for good,
  -- until every submit of the key was a 429. At most the cap's few ids, read only at it.
  for _, held in ipairs(redis.call('SMEMBERS', active_key)) do
    if redis.call('EXISTS', P .. 'job:' .. held) == 0 then
      redis.call('SREM', active_key, held)
    end
  end
  active = redis.call('SCARD', active_key)
  if active >= tonumber(ARGV[8]) then return {'cap', tostring(active)} end
end
local rate_key = P .. 'rate:' .. owner .. ':' .. math.floor(now / 60)
local count = redis.call('INCR', rate_key)
if count == 1 then redis.call('EXPIRE', rate_key, 120) end
if count > tonumber(ARGV[7]) then
  return {'rate', tostring(math.max(1, math.ceil(60 - now % 60)))}
end
redis.call('HSET', jk, 'id', id, 'owner', owner, 'status', 'queued', 'request', ARGV[4],
           'created_at', created_at, 'attempts', 0, 'step', 0, 'total', ARGV[13],
           'webhook', ARGV[10], 'webhook_events', ARGV[11], 'num_images', ARGV[12],
           'idem', idem)
local entry = redis.call('XADD', P .. 'stream', '*', 'id', id)
redis.call('HSET', jk, 'entry', entry)
redis.call('ZADD', P .. 'queued', now, id)
redis.call('SADD', P .. 'active:' .. owner, id)
local owned = P .. 'owned:' .. owner
redis.call('ZADD', owned, now, id)
redis.call('PERSIST', owned)  -- listed while the job lives, however long (finalize)
redis.call('PERSIST', relist(owner, nil, 'queued'))
-- Unlist jobs that are gone. Only those submitted more than a TTL ago can be: a job is kept
-- until a TTL after it ends, however long it waited or ran before.
for _, old in ipairs(redis.call('ZRANGEBYSCORE', owned, '-inf', now - tonumber(ARGV[9]),
                                'LIMIT', 0, 50)) do
  if redis.call('EXISTS', P .. 'job:' .. old) == 0 then
    redis.call('ZREM', owned, old)
    for _, state in ipairs(STATES) do redis.call('ZREM', listed_as(owner, state), old) end
  end
end
redis.call('HINCRBY', P .. 'stats', 'jobs_submitted', 1)
event({type = 'status', status = 'queued'})
if idem ~= '' then
  -- No expiry while the job lives: finalize gives it the job's own (a TTL after the end).
  redis.call('SET', P .. 'idem:' .. owner .. ':' .. idem, id .. '|' .. ARGV[6])
end
return {'created', id}
"""

# ARGV: prefix, id, dispatcher, max attempts, entry, ttl
_START = _LUA_COMMON + """
local status = redis.call('HGET', jk, 'status')
if not status then
  -- Its record is gone while it was queued or running: evicted by a Redis whose
  -- maxmemory-policy deletes keys when full, or lost with Redis's data. Out of the queue's
  -- sets too, or it was counted queued (or running) for good, its age growing into alerts.
  redis.call('XACK', P .. 'stream', '%(group)s', ARGV[5])
  redis.call('XDEL', P .. 'stream', ARGV[5])
  redis.call('ZREM', P .. 'queued', id)
  if redis.call('SREM', P .. 'running', id) == 1 then left_running(tonumber(redis_now())) end
  return {'gone', ''}
end
if status ~= 'queued' and status ~= 'running' then
  redis.call('XACK', P .. 'stream', '%(group)s', ARGV[5])
  redis.call('XDEL', P .. 'stream', ARGV[5])
  return {'done', status}
end
local started_at = redis_now()
local now = tonumber(started_at)
local attempts = redis.call('HINCRBY', jk, 'attempts', 1)
if attempts > tonumber(ARGV[4]) then
  local reason = redis.call('HGET', jk, 'last_error') or 'its dispatcher stopped answering'
  redis.call('HSET', jk, 'attempts', attempts - 1)  -- the starts that happened
  redis.call('XADD', P .. 'dead', 'MAXLEN', '~', 10000, '*', 'id', id,
             'attempts', attempts - 1, 'reason', reason)
  -- Counted too: the trimmed stream's length stops growing, so it cannot say how many.
  redis.call('HINCRBY', P .. 'stats', 'jobs_dead_lettered', 1)
  finalize('failed', now, tonumber(ARGV[6]), cjson.encode({code = 500, type = 'JobFailed',
    message = 'the job was started ' .. (attempts - 1) .. ' times without finishing; ' ..
              'last error: ' .. reason}))
  return {'dead', reason}
end
local first_start = not redis.call('HGET', jk, 'first_started_at')
if first_start then
  redis.call('HSET', jk, 'first_started_at', started_at)
  observe('wait_seconds', %(wait_buckets)s, now - tonumber(redis.call('HGET', jk, 'created_at')))
end
-- Its own per start, from a count that never goes down (`attempts` does, at a hand-back):
-- a late command of an earlier start must not pass for this one's. A job started before
-- `starts` existed (releases up to d54bf6a) was claimed as `<dispatcher>#<attempts>`: the
-- count goes on from there, or a dispatcher of the same name would take the claim back.
redis.call('HSETNX', jk, 'starts', attempts - 1)
local claim = ARGV[3] .. '#' .. redis.call('HINCRBY', jk, 'starts', 1)
redis.call('HSET', jk, 'status', 'running', 'claim', claim, 'started_at', started_at, 'step', 0)
redis.call('PERSIST', relist(redis.call('HGET', jk, 'owner'), status, 'running'))
redis.call('ZREM', P .. 'queued', id)
began_running(now)
redis.call('SADD', P .. 'running', id)
event({type = 'status', status = 'running', attempt = attempts})
-- The `running` webhook is sent once, on the first start: a later start (after a failure or
-- a takeover) would have the same webhook-id, which receivers drop as a duplicate.
local hook = redis.call('HMGET', jk, 'webhook', 'webhook_events')
if first_start and hook[1] and hook[1] ~= '' and
    string.find(',' .. (hook[2] or '') .. ',', ',running,', 1, true) then
  redis.call('XADD', P .. 'webhooks', '*', 'id', id, 'event', 'running')
end
return {'claimed', claim}
""" % {"group": GROUP, "wait_buckets": _lua_list(WAIT_BUCKETS)}

# ARGV: prefix, id, claim, step, total
_PROGRESS = _LUA_COMMON + """
local job = redis.call('HMGET', jk, 'status', 'claim')
if job[1] ~= 'running' or job[2] ~= ARGV[3] then return job[1] or 'gone' end
redis.call('HSET', jk, 'step', ARGV[4], 'total', ARGV[5])
event({type = 'progress', step = tonumber(ARGV[4]), total = tonumber(ARGV[5])})
return 'ok'
"""

# ARGV: prefix, id, claim, dispatcher; renews the claim (resets the entry's idle time).
_RENEW = _LUA_COMMON + """
local job = redis.call('HMGET', jk, 'status', 'claim', 'entry')
if job[1] ~= 'running' or job[2] ~= ARGV[3] then return job[1] or 'gone' end
redis.call('XCLAIM', P .. 'stream', '%(group)s', ARGV[4], 0, job[3], 'JUSTID')
return 'ok'
""" % {"group": GROUP}

# ARGV: prefix, id, claim, error message (a failed try that will be started again). Once per
# start: a try again after Redis failed one that ran (its answer lost) adds no second event.
_RECORD_ERROR = _LUA_COMMON + """
local job = redis.call('HMGET', jk, 'status', 'claim', 'error_claim')
if job[1] ~= 'running' or job[2] ~= ARGV[3] then return job[1] or 'gone' end
if job[3] == ARGV[3] then return 'ok' end
redis.call('HSET', jk, 'last_error', ARGV[4], 'error_claim', ARGV[3])
event({type = 'status', status = 'running', retry = ARGV[4]})
return 'ok'
"""

# ARGV: prefix, id, claim, dispatcher, idle ms, reason, free faults, refusing ms (the caller
# takes no job for that long; '' for none). A started job given back
# unrun (its TorchServe refused it for reasons of its own, or Redis failed its writes):
# queued again in its place, the start not counted, its entry any dispatcher's at the next
# `abandoned_jobs` (as `_RELEASE` does). With "free faults" (a number, not ''), the hand-back
# follows a fault of Redis's and only that many of those per job are free: a job whose own
# writes make Redis fail (a result too large for it, or one that gets it killed) must still
# run out of attempts, not be run again for ever. Past them the start counts, as a failed
# one does (`last_error` the reason). 'ok', 'counted', or the state that refused it.
_REQUEUE = _LUA_COMMON + """
local job = redis.call('HMGET', jk, 'status', 'claim', 'entry', 'created_at', 'owner')
local now = redis_now()
-- The first write refuses the whole script on a full Redis (OOM), so it is all or nothing.
-- The caller takes no job for ARGV[8] ms (its pod's breaker is open): what estimated starts
-- read (`_THROUGHPUT`), written with the hand-back, so that no view shows the job queued
-- again without it; and written where the job is no longer the caller's (canceled, taken
-- over), since the refusal is the dispatcher's, not the job's.
if ARGV[8] ~= '' then
  redis.call('SET', P .. 'refusing:' .. ARGV[4], 1, 'PX', math.max(1, tonumber(ARGV[8])))
end
if job[1] ~= 'running' or job[2] ~= ARGV[3] then return job[1] or 'gone' end
local counted = ARGV[7] ~= '' and
                redis.call('HINCRBY', jk, 'redis_faults', 1) > tonumber(ARGV[7])
if counted then
  redis.call('HSET', jk, 'last_error', ARGV[6])
else
  redis.call('HINCRBY', jk, 'attempts', -1)
end
redis.call('HSET', jk, 'status', 'queued', 'step', 0, 'requeued_at', now)
redis.call('HDEL', jk, 'claim', 'started_at')
redis.call('PERSIST', relist(job[5], 'running', 'queued'))
redis.call('SREM', P .. 'running', id)
left_running(tonumber(now))
-- Its place in the queue is its submit's (it is taken again next), its queued age counts
-- from now (`_OLDEST_QUEUED`).
redis.call('ZADD', P .. 'queued', tonumber(job[4]), id)
event({type = 'status', status = 'queued', reason = ARGV[6]})
-- Its entry, if still the caller's (as `_RELEASE`): one another dispatcher took over
-- meanwhile stays with it, which starts the job next.
local owned = redis.call('XPENDING', P .. 'stream', '%(group)s', job[3], job[3], 1, ARGV[4])
if #owned > 0 then
  redis.call('XCLAIM', P .. 'stream', '%(group)s', ARGV[4], 0, job[3], 'IDLE', ARGV[5], 'JUSTID')
end
return counted and 'counted' or 'ok'
""" % {"group": GROUP}

# ARGV: prefix, id, claim, ttl, status, result json, error json, seeds json, images...
_FINISH = _LUA_COMMON + """
local job = redis.call('HMGET', jk, 'status', 'claim')
if job[1] ~= 'running' or job[2] ~= ARGV[3] then return job[1] or 'gone' end
local ttl = tonumber(ARGV[4])
for i = 9, #ARGV do
  redis.call('SET', P .. 'image:' .. id .. ':' .. (i - 9), ARGV[i], 'EX', ttl)
end
redis.call('HSET', jk, 'result', ARGV[6], 'seeds', ARGV[8], 'num_images', #ARGV - 8)
finalize(ARGV[5], tonumber(redis_now()), ttl, ARGV[7])
return 'stored'
"""

# ARGV: prefix, id, owner, ttl
_CANCEL = _LUA_COMMON + """
local job = redis.call('HMGET', jk, 'status', 'owner')
if not job[1] or job[2] ~= ARGV[3] then return 'missing' end
if job[1] ~= 'queued' and job[1] ~= 'running' then return job[1] end
finalize('canceled', tonumber(redis_now()), tonumber(ARGV[4]), '')
return 'canceled'
"""

# ARGV: prefix, owner, then (job id, its score in `owned:<owner>`) pairs. Each listed job
# is put in its state's listing alone, and out of every listing once it is gone (expired):
# what a listing read found stale (a job an older release moved, submitted or ended, whose
# state's listing it is not in) is mended as it is read.
_LUA_MEND = """
local P, owner = ARGV[1], ARGV[2]
local owned = P .. 'owned:' .. owner
local function mend(job_id, score)
  local jk = P .. 'job:' .. job_id
  local status = redis.call('HGET', jk, 'status')
  if not status then redis.call('ZREM', owned, job_id) end
  for _, state in ipairs({%(states)s}) do
    local key = P .. 'owned-' .. state .. ':' .. owner
    if state ~= status then
      redis.call('ZREM', key, job_id)
    elseif redis.call('ZADD', key, score, job_id) == 1 then
      -- Kept as `finalize` keeps it: a live job's while it lives, an ended one's at least
      -- as long as the job.
      if state == 'queued' or state == 'running' then
        redis.call('PERSIST', key)
      elseif redis.call('PTTL', key) < redis.call('PTTL', jk) then
        redis.call('PEXPIRE', key, redis.call('PTTL', jk))
      end
    end
  end
end
""" % {"states": ", ".join(repr(state) for state in STATES)}

_MEND = _LUA_MEND + """
for i = 3, #ARGV, 2 do mend(ARGV[i], ARGV[i + 1]) end
"""

# ARGV: prefix, owner, lowest score (exclusive: '(<score>'; '-inf' first), count, trusted ms.
# One step of indexing a key's listing by state (`owned_jobs`), oldest first: up to `count`
# of its jobs and every other of the last one's score; the next step's lowest score, or
# false once all were, and `owned-indexed:<owner>` then says so for `trusted ms` at most
# (never past `owned` itself). Those submitted meanwhile were listed by their submits.
_INDEX_OWNED = _LUA_MEND + """
local step = redis.call('ZRANGEBYSCORE', owned, ARGV[3], '+inf', 'WITHSCORES', 'LIMIT', 0,
                        tonumber(ARGV[4]))
if #step == 0 then
  local kept = redis.call('PTTL', owned)
  if kept ~= -2 then
    local trusted = tonumber(ARGV[5])
    redis.call('SET', P .. 'owned-indexed:' .. owner, '', 'PX',
               (kept > 0 and kept < trusted) and kept or trusted)
  end
  return false
end
local last = step[#step]
for i = 1, #step, 2 do mend(step[i], step[i + 1]) end
for _, job_id in ipairs(redis.call('ZRANGEBYSCORE', owned, last, last)) do mend(job_id, last) end
return '(' .. last
"""

# ARGV: prefix. When the queued job that has waited longest was queued: its submit, or its
# last hand-back (`requeued_at`), which does not move it from its submit's place in
# `queued`. So it is the first job there never handed back or one before it; a bound on
# those read (100) stands for hand-backs that are rare.
_OLDEST_QUEUED = """
local P = ARGV[1]
local oldest = false
local queue = redis.call('ZRANGE', P .. 'queued', 0, 99, 'WITHSCORES')
for i = 1, #queue, 2 do
  local submitted = tonumber(queue[i + 1])
  local since = tonumber(redis.call('HGET', P .. 'job:' .. queue[i], 'requeued_at') or submitted)
  if not oldest or since < oldest then oldest = since end
  if since == submitted then break end
end
return oldest and tostring(oldest)
"""

# ARGV: prefix, then for each job as it was read: id, status, starts ('' for none). Its place
# in the queue (0 for the next to start, -1 for none) and, where its status or starts are no
# longer those read, its fields as they are now (none when it is gone): {{place}, {place,
# {field, value, ...}}, ...}. Every way out of the queue changes the status (a start, a
# cancel, a failure) and every way back follows a start, which changes starts: where both are
# as read, so is every field a view shows.
_QUEUE_POSITIONS = """
local P, placed = ARGV[1], {}
for i = 2, #ARGV, 3 do
  local jk = P .. 'job:' .. ARGV[i]
  local place = redis.call('ZRANK', P .. 'queued', ARGV[i]) or -1
  local now = redis.call('HMGET', jk, 'status', 'starts')
  if (now[1] or '') == ARGV[i + 1] and (now[2] or '') == ARGV[i + 2] then
    placed[#placed + 1] = {place}
  else
    placed[#placed + 1] = {place, redis.call('HGETALL', jk)}
  end
end
return placed
"""

# ARGV: prefix, lowest score (exclusive: '(<score>'; '-inf' first), count. One step of
# putting back in the stream the queued jobs whose entries went with it (`_in_groups`: the
# stream was evicted, or Redis lost it): up to `count` of `queued` by submit time, and every
# other of the last one's score. A job whose entry is in the stream is left as it is, so two
# dispatchers doing this at once add none twice. Not the running ones: an entry added for
# one is delivered to the next dispatcher that reads (its group's place is before it), which
# would take the job over and run it twice. {next lowest score or false, how many}.
_ENTER_AGAIN = """
local P = ARGV[1]
local stream = P .. 'stream'
local step = redis.call('ZRANGEBYSCORE', P .. 'queued', ARGV[2], '+inf', 'WITHSCORES',
                        'LIMIT', 0, tonumber(ARGV[3]))
if #step == 0 then return {false, 0} end
local last = step[#step]
local seen, entered = {}, 0
local function enter(id)  -- in submit order, each once
  if seen[id] then return end
  seen[id] = true
  local job = redis.call('HMGET', P .. 'job:' .. id, 'status', 'entry')
  -- Its record gone too: no entry will ever start it, which would take it out (`_START`).
  if not job[1] then redis.call('ZREM', P .. 'queued', id) end
  if job[1] ~= 'queued' then return end
  if job[2] and #redis.call('XRANGE', stream, job[2], job[2]) > 0 then return end
  redis.call('HSET', P .. 'job:' .. id, 'entry', redis.call('XADD', stream, '*', 'id', id))
  entered = entered + 1
end
for i = 1, #step, 2 do enter(step[i]) end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', P .. 'queued', last, last)) do enter(id) end
return {'(' .. last, entered}
"""

# Writes nothing, yet Redis refuses it wherever it refuses writes: a script with Redis 7's
# flags line and without `no-writes` and `allow-oom` is refused full (OOM), on a read-only
# replica (READONLY), short of replicas (NOREPLICAS) and unable to persist (MISCONF). A
# PING is refused only for the last, and a real write would add to the append-only file.
_MAY_WRITE = """#!lua
return 1
"""

# ARGV: the dispatcher's name; KEYS[1]: the check-ins. Its time is Redis's, as the jobs'.
_CHECK_IN = _REDIS_NOW + """
redis.call('ZADD', KEYS[1], redis_now(), ARGV[1])
"""

# ARGV: seconds; KEYS[1]: the check-ins. Those of the last ARGV[1] seconds by Redis's clock,
# read here: by the caller's, a round trip more.
_LIVE_DISPATCHERS = _REDIS_NOW + """
return redis.call('ZCOUNT', KEYS[1], tonumber(redis_now()) - tonumber(ARGV[1]), '+inf')
"""

# ARGV: the window in seconds, how recent a live dispatcher's check-in is, the key prefix;
# KEYS: finished, busy, busy-since, the check-ins. Redis's time then what
# `JobStore.throughput` counts over the window before it, and the ms until a live
# dispatcher takes jobs again where every live one refuses them (`refusing:<name>`,
# `_REQUEUE`), else false, in one round trip.
_THROUGHPUT = _REDIS_NOW + """
local now = redis_now()
local begin = tonumber(now) - tonumber(ARGV[1])
local refusing = false
local live = redis.call('ZRANGEBYSCORE', KEYS[4], tonumber(now) - tonumber(ARGV[2]), '+inf')
for _, name in ipairs(live) do
  local left = redis.call('PTTL', ARGV[3] .. 'refusing:' .. name)
  if left < 0 then refusing = false break end  -- this one takes jobs now
  if not refusing or left < refusing then refusing = left end
end
return {now, redis.call('ZCOUNT', KEYS[1], begin, now),
        redis.call('ZRANGEBYSCORE', KEYS[2], begin, '+inf', 'WITHSCORES'),
        redis.call('GET', KEYS[3]), refusing}
"""

# ARGV: group, idle ms, the caller's own name; KEYS[1]: the stream. Check and delete in one
# script: a consumer that read an entry between an XINFO and a DELCONSUMER would lose it
# from the group's pending list (DELCONSUMER drops its pending entries), and a job would be
# neither delivered again nor taken over.
_PRUNE_CONSUMERS = """
local ok, consumers = pcall(redis.call, 'XINFO', 'CONSUMERS', KEYS[1], ARGV[1])
if not ok then return {} end  -- no stream or no group yet (Redis came back empty)
local removed = {}
for _, consumer in ipairs(consumers) do
  local info = {}
  for i = 1, #consumer, 2 do info[consumer[i]] = consumer[i + 1] end
  if info['pending'] == 0 and info['idle'] >= tonumber(ARGV[2]) and info['name'] ~= ARGV[3] then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], info['name'])
    removed[#removed + 1] = info['name']
  end
end
return removed
"""

# ARGV: group, the caller's name, idle ms, entries...; KEYS[1]: the stream. Only entries the
# caller still owns: one another dispatcher took over meanwhile (the caller's TorchServe
# check outlasted a lease) must stay with it, not be made claimable again under it.
_RELEASE = """
local released = 0
for i = 4, #ARGV do
  local owned = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1, ARGV[2])
  if #owned > 0 then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'IDLE', ARGV[3], 'JUSTID')
    released = released + 1
  end
end
return released
"""


@dataclass(frozen=True)
class Submitted:
    """What a submit did: ``created``, ``existing`` (same idempotency key), ``conflict``
    (same key, other body), ``rate`` (detail: seconds to wait) or ``cap`` (detail: count)."""

    outcome: str
    job_id: str = ""
    detail: str = ""


def hash_key(token: str) -> str:
    """How an API key is stored: SHA-256 of the token. The tokens are 256 random bits, so a
    slow password hash would add nothing but latency to every call."""
    return hashlib.sha256(token.encode()).hexdigest()


def new_job_id() -> str:
    return secrets.token_hex(16)


def _text(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


# Error replies (their first word) with which Redis refuses a command for reasons of its own
# without running it, that redis-py gives no class of their own (ResponseError).
REFUSALS_OF_ITS_OWN = ("MISCONF", "NOREPLICAS", "BUSY ")


def refused_unrun(exc: BaseException) -> bool:
    """Whether Redis refused a command for reasons of its own without running it, nothing
    written: full (``maxmemory``: OOM), a read-only replica, a replica cut off from its
    primary (MASTERDOWN), unable to persist (MISCONF), short of the replicas it must write to
    (NOREPLICAS), busy with another client's long script (BUSY). In a script each is raised
    at its first command that may not run, its first write at the latest: Redis checks them
    only until a script has written (measured with Redis 7.0: a full Redis's, a read-only
    replica's and NOREPLICAS name the submit's INCR, after its GET and SCARD; MASTERDOWN,
    MISCONF and BUSY refuse the script before it starts). A refusal in other words (a Redis
    before 7 wraps a script's errors in its own) is not one: taken for a command that may
    have run.

    >>> from redis.exceptions import ConnectionError, OutOfMemoryError, ResponseError
    >>> refused_unrun(OutOfMemoryError("OOM")), refused_unrun(ConnectionError("reset"))
    (True, False)
    >>> refused_unrun(ResponseError("NOREPLICAS Not enough good replicas to write."))
    True
    """
    return isinstance(exc, (OutOfMemoryError, ReadOnlyError, MasterDownError)) or \
        (isinstance(exc, ResponseError) and str(exc).startswith(REFUSALS_OF_ITS_OWN))


def redis_fault(exc: BaseException) -> bool:
    """Whether Redis failed a command for reasons of its own, not the job's: unreachable,
    restarting or loading (the answer may be lost: the command may have run), or a refusal
    of its own (``refused_unrun``). An error of a script's own is not one, nor a password
    or ACL refused (ours to fix).

    >>> from redis.exceptions import AuthenticationError, ConnectionError, ResponseError
    >>> redis_fault(ConnectionError("Connection refused")), redis_fault(ValueError())
    (True, False)
    >>> redis_fault(ResponseError("MISCONF Errors writing to the AOF file"))
    True
    >>> redis_fault(ResponseError("ERR user_script:3: bad argument"))
    False
    >>> redis_fault(AuthenticationError("invalid username-password pair"))
    False
    """
    if isinstance(exc, (AuthenticationError, AuthorizationError)):
        # ConnectionErrors to redis-py, but ours to fix (a rotated password): handed back,
        # such a job would be tried again four times a second for as long as it lasts.
        return False
    return isinstance(exc, (RedisConnectionError, RedisTimeoutError)) or refused_unrun(exc)


def reason_to_log(exc: BaseException) -> str:
    """What to log of an error: a Redis error's own words (they name no URL, password or
    prompt: ``AuthenticationError: invalid username-password pair``, ``ConnectionError:
    ... CERTIFICATE_VERIFY_FAILED ...``); for anything else only its type, since an HTTP
    client's message may quote the URL, whose query can hold a receiver's token."""
    return f"{type(exc).__name__}: {exc}"[:200] if isinstance(exc, RedisError) \
        else type(exc).__name__


# A WARNING that a Redis fault brings with every call or every turn of a loop (refusing
# writes on a full disk, away) is logged at once, then the same line at most this often: one
# line per refused call filled the API's log while it lasted (each client retrying every 5 s,
# each page polling), and a dispatcher's queue read, once a second, did the same.
REPEATED_WARNING_EVERY_S = 60.0


class RepeatedWarnings:
    """WARNING lines said to ``logger`` once, then each same line at most every ``every_s``,
    with how many of it were not logged meanwhile; ``ended`` says once that the fault is
    over, or the log of an outage had a start and no end.

    >>> import logging
    >>> faults = RepeatedWarnings(logging.getLogger("example"))
    >>> faults.warning("queue unreachable: ConnectionError: ...")  # logged
    >>> faults.warning("queue unreachable: ConnectionError: ...")  # counted
    >>> faults.ended("Redis answers again")  # logged, with the 1 line not logged
    >>> faults.ended("Redis answers again")  # nothing: no fault since
    """

    def __init__(self, logger: logging.Logger, every_s: float = REPEATED_WARNING_EVERY_S):
        self.log = logger
        self.every_s = every_s
        self.lines: dict[str, tuple[float, int]] = {}
        self.since: float | None = None  # monotonic, the first line since the last end

    def warning(self, line: str) -> None:
        now = time.monotonic()
        if self.since is None:
            self.since = now
        said_at, unsaid = self.lines.get(line, (None, 0))
        if said_at is not None and now - said_at < self.every_s:
            self.lines[line] = (said_at, unsaid + 1)
            return
        if len(self.lines) > 1000:  # lines of faults long over: this is all they cost
            self.lines.clear()
        self.lines[line] = (now, 0)
        self.log.warning("%s%s", line,
                         f" ({unsaid} more since it was last logged)" if unsaid else "")

    def ended(self, line: str) -> None:
        """Say ``line`` (a WARNING, as visible as the fault's own lines) if any fault was
        warned of since the last end, with how long it lasted and how many of its lines
        were not logged; then the next fault is said at once again."""
        if self.since is None:
            return
        unsaid = sum(count for _, count in self.lines.values())
        self.log.warning("%s after %.0f s%s", line, time.monotonic() - self.since,
                         f" ({unsaid} line(s) of it not logged)" if unsaid else "")
        self.lines.clear()
        self.since = None


# How long the PING of a command's start may take, its connection included. A Redis that
# answers at all answers it in milliseconds (still loading, it says so at once); a peer
# that takes the connection and never answers (a Redis stopped or paused, a proxy with
# nothing behind it) held the start for the connection's socket timeout, 30 s, before the
# line that says so. As long as a connection alone may take (``from_url``'s
# ``socket_connect_timeout``).
START_PING_S = 5.0


async def answered_within(seconds: float, call: Awaitable[Any], asked: str) -> Any:
    """``call``'s answer, or redis-py's own TimeoutError saying that Redis does not answer
    ``asked`` within ``seconds``: a peer that takes the connection and never answers holds a
    command for the socket timeout (30 s), longer than whoever asked waits for it. The
    connection given up on is closed (redis-py does so on a cancelled read), so its late
    answer never reaches the next command."""
    try:
        return await asyncio.wait_for(call, seconds)
    except asyncio.TimeoutError:
        # As redis-py's own class, so that `not_there_yet` and the API's handler of Redis
        # errors read it as a timeout.
        raise RedisTimeoutError(f"Redis does not answer (no reply to {asked} within "
                                f"{seconds:g} s)") from None
    except RuntimeError as exc:
        # uvloop's words for a write to a connection Redis closed a moment before, which
        # redis-py passes on as they are: as Redis was killed, one submit among those of the
        # same moment was a 500 with a traceback where the others got the outage's 503.
        if "handler is closed" not in str(exc):
            raise
        raise RedisConnectionError(f"Connection closed by server ({asked}: {exc})") from exc


def usable_at_start(url: str, otherwise: str, wait_s: float = 0.0,
                    no_aof_ok: bool = False) -> bool:
    """Whether the Redis at ``url`` answers a PING within START_PING_S, said in one log line
    naming it without its password: the API and the dispatcher ask once at their start, so
    that a wrong password, an untrusted certificate, no Redis at all or one that does not
    answer shows there with its reason (``reason_to_log``'s words), followed by
    ``otherwise``: what the command does then.
    With ``wait_s``, a Redis not there yet (refused, no such host yet, timed out, loading
    its data, not answering) is asked again every ``wait_s`` until it answers, said once: on
    Kubernetes a dispatcher that exited instead waits out its restart back-off, up to 5
    minutes, after Redis is back. A refusal of ours to fix (password, certificate) still
    ends the wait. Once it answers, what Redis's ``maxmemory-policy`` and persistence risk
    is said too (``say_eviction_policy``; ``say_persistence`` unless ``no_aof_ok``)."""
    policy: list[str | None] = []
    persistence: list[tuple[str, str] | None] = [None]

    async def ping() -> RedisError | None:
        store = JobStore.from_url(url)
        try:
            await answered_within(START_PING_S, store.redis.ping(), "a PING")
            policy[:] = [await answered_within(START_PING_S, store.eviction_policy(),
                                               "an INFO memory")]
            persistence[:] = [await answered_within(START_PING_S, store.persistence(),
                                                    "a CONFIG GET")]
            return None
        except RedisError as exc:
            return exc
        finally:
            await store.close()
    said = False
    while (exc := asyncio.run(ping())) is not None and wait_s and not_there_yet(exc):
        if not said:
            log.warning("%s; waiting for it, asked again every %g s",
                        unusable(url, reason_to_log(exc)), wait_s)
            said = True
        time.sleep(wait_s)
    if exc is None:
        log.info("job store: %s", redacted_url(url))
        say_eviction_policy(url, policy[0])
        if not no_aof_ok:
            say_persistence(url, persistence[0])
    else:
        log.error("%s; %s", unusable(url, reason_to_log(exc)), otherwise)
    return exc is None


# Redis's one ``maxmemory-policy`` that never deletes a key of the store: full, it refuses
# writes (a submit is a 503 "not accepted"), where every other policy deletes keys of its
# choosing, jobs and API keys among them, without a word to anyone.
NO_EVICTION = "noeviction"


def say_eviction_policy(url: str, policy: str | None) -> None:
    """Say at a start what Redis's ``maxmemory-policy`` risks: one WARNING when it evicts
    (managed services often default to ``volatile-lru`` or ``allkeys-lru``), an INFO line
    when Redis refuses to tell (an ACL user without ``INFO``), nothing more for
    ``noeviction``. Not a refused start: a policy that evicts deletes nothing until Redis is
    full, and a job API that would not start took every submit and read down with it."""
    if policy is None:
        log.info("the job store's maxmemory-policy cannot be read (Redis refuses INFO): it "
                 "must be %s, or a full Redis deletes jobs and API keys without a word",
                 NO_EVICTION)
    elif policy != NO_EVICTION:
        log.warning("the job store at %s evicts keys (maxmemory-policy %s): when it is full "
                    "it deletes keys of its choosing without a word, and with them queued "
                    "or running jobs (dropped, then 404), idempotency keys (a retried submit "
                    "makes a second job) and API keys (401 until registered again); set "
                    "maxmemory-policy %s", redacted_url(url), policy, NO_EVICTION)


def say_persistence(url: str, persistence: tuple[str, str] | None) -> None:
    """Say at a start, in one WARNING, what a Redis without an append-only file
    (``appendonly no``, Debian's default) loses, without a word to anyone (its clients get
    404 and 401 for what they were given): killed or crashed, every job and API key
    accepted since its last RDB snapshot; with no snapshots (``save ""``), all of them at
    any restart. Nothing when it keeps the file, or where Redis refuses CONFIG (managed
    services do): those keep their data their own way, which the docs say to check."""
    if persistence is None or persistence[0] != "no":
        return
    appendonly, save = persistence
    loss = (f"killed or crashed (SIGKILL, the OOM killer, its machine lost), that Redis "
            f"loses every job and API key accepted since its last RDB snapshot (save {save})"
            if save else 'restarted, even cleanly, that Redis loses every job and API key '
                         '(save "": no RDB snapshot either)')
    log.warning("the job store at %s keeps no append-only file (appendonly no): %s, and "
                "their clients then get 404 for their jobs and 401 for their keys; set "
                "appendonly yes (appendfsync always: nothing accepted is lost), or "
                "SDXL_JOBS_REDIS_NO_AOF_OK=1 where it keeps its data otherwise "
                "(replication)", redacted_url(url), loss)


def say_lost_data(found: str, evicted: str, done: str) -> None:
    """The one ERROR that Redis lost its data, in the same words whichever process finds
    out: ``found``, what told it (the consumer groups, the store's creation mark, gone);
    ``evicted``, what Redis may have evicted alone instead; ``done``, what it mended."""
    log.error("Redis lost its data: %s (Redis restarted without an append-only file, was "
              "flushed, or evicted %s). The jobs and API keys accepted since its last save "
              "are gone (evicted: those it chose): their clients get 404 and 401 (the API "
              "key is not known) until the jobs are submitted and the keys registered again "
              "(python -m sdxl_jobs.keys create). %s. To keep them: appendonly yes, "
              "maxmemory-policy noeviction", found, evicted, done)


# Redis's refusal of a connection past its `maxclients`, as redis-py raises it (a
# ConnectionError of these words, from Redis's "-ERR max number of clients reached").
MAXCLIENTS_REACHED = "max number of clients reached"
# A connection's socket errors that a Redis not there yet gives: its port refused, its
# unix socket not made yet (Redis makes it at its start, as it opens its port), its network
# or address not up yet, no answer in time. Any other (a permission, a path that can never
# be a socket, too many open files, a reset) stays as it is however long one waits.
NOT_THERE_YET = frozenset({errno.ECONNREFUSED, errno.ENOENT, errno.ENETUNREACH,
                           errno.EHOSTUNREACH, errno.EADDRNOTAVAIL, errno.ETIMEDOUT})
SOCKET_ERRNO = re.compile(r"\[Errno (\d+)\]")


def not_there_yet(exc: RedisError) -> bool:
    """Whether a connection failed because Redis is not there yet (its port refused, its
    name not yet in DNS, its network not yet routed, its unix socket not yet made, no answer
    in time, its data still loading, every connection it serves taken), not because it
    refused us or cannot be reached this way (a password, an ACL, a certificate, a reset, a
    socket path we may not use: ours to fix, and not by waiting). A name with several
    addresses that all failed is an ``OSError`` of its own ("Multiple exceptions"), with no
    errno: each of its errors must be one of a Redis not there yet.

    >>> import ssl
    >>> from redis.exceptions import AuthenticationError, ConnectionError
    >>> refused, untrusted = ConnectionError("Error 111"), ConnectionError("Error 1")
    >>> refused.__context__ = OSError("Multiple exceptions: [Errno 111] Connect call failed "
    ...                               "('::1', 6379, 0, 0), [Errno 111] Connect call failed "
    ...                               "('127.0.0.1', 6379)")
    >>> untrusted.__context__ = ssl.SSLCertVerificationError("certificate verify failed")
    >>> not_there_yet(refused), not_there_yet(untrusted)
    (True, False)
    >>> denied = ConnectionError("Error 13")
    >>> denied.__context__ = PermissionError(13, "Permission denied")
    >>> not_there_yet(denied), not_there_yet(AuthenticationError("invalid password"))
    (False, False)
    >>> not_there_yet(ConnectionError("max number of clients reached"))
    True
    """
    if isinstance(exc, (BusyLoadingError, RedisTimeoutError)):
        # No answer in time, from a peer that took the connection (START_PING_S) or not:
        # waited for too. Such a Redis is stopped, paused or busy (a slow disk, a long
        # script), or a proxy's Redis is not up yet: each answers later without a change of
        # ours, as a refused port does. Something that is no Redis and swallows what it is
        # sent (a wrong port) is waited for as well: the one WARNING line names its URL.
        return True
    if not isinstance(exc, RedisConnectionError) or \
            isinstance(exc, (AuthenticationError, AuthorizationError)):
        return False
    if str(exc) == MAXCLIENTS_REACHED:
        # Every connection Redis serves is taken (`maxclients`): room comes back as other
        # clients leave, without a change of ours. Taken for a setting to fix, a dispatcher
        # starting then (scaling up from zero) exited, to crash-loop back-off.
        return True
    cause = exc.__context__
    if isinstance(cause, (socket.gaierror, TimeoutError)):
        return True
    if not isinstance(cause, OSError) or isinstance(cause, ssl.SSLError):
        return False  # TLS's errors number their own kinds, not the socket's
    if cause.errno is not None:
        return cause.errno in NOT_THERE_YET
    said = str(cause)
    errnos = [int(number) for number in SOCKET_ERRNO.findall(said)] \
        if said.startswith("Multiple exceptions:") else []
    return bool(errnos) and all(number in NOT_THERE_YET for number in errnos)


def unusable(url: str, reason: str) -> str:
    """What a command says when the Redis at ``url`` failed it: its URL without the
    password, and ``reason_to_log``'s words."""
    return f"the job store at {redacted_url(url)} cannot be used: {reason}"


class JobStore:
    """The one place that reads and writes jobs in Redis (API and dispatchers alike).

    Example (needs a running Redis):
        store = JobStore(redis.asyncio.from_url(url))
        outcome = await store.submit(owner, request, ...)
    """

    def __init__(self, client: aioredis.Redis, prefix: str = "sdxl:",
                 waiting: aioredis.Redis | None = None):
        self.redis = client
        # Blocking reads of job events (event streams, `Prefer: wait`) hold a connection
        # while they wait: on a pool of their own, however many wait, every other command
        # still gets a connection (one key's streams made the whole API answer 503).
        self.waiting = waiting or client
        self.prefix = prefix
        scripts = {"submit": _SUBMIT, "start": _START, "progress": _PROGRESS,
                   "renew": _RENEW, "record_error": _RECORD_ERROR, "finish": _FINISH,
                   "cancel": _CANCEL, "requeue": _REQUEUE, "queue_positions": _QUEUE_POSITIONS}
        self._scripts = {name: client.register_script(body) for name, body in scripts.items()}
        self._prune_consumers = client.register_script(_PRUNE_CONSUMERS)
        self._check_in = client.register_script(_CHECK_IN)
        self._may_write = client.register_script(_MAY_WRITE)
        self._live_dispatchers = client.register_script(_LIVE_DISPATCHERS)
        self._throughput = client.register_script(_THROUGHPUT)
        self._release = client.register_script(_RELEASE)
        self._oldest_queued = client.register_script(_OLDEST_QUEUED)
        self._mend = client.register_script(_MEND)
        self._index_owned_step = client.register_script(_INDEX_OWNED)
        self._enter_again_step = client.register_script(_ENTER_AGAIN)
        self._mark_created = client.register_script(_MARK_CREATED)
        # The store's creation mark as this store last read it (``_store_created``).
        self._created_seen: str | None = None
        # Where the last look for abandoned webhook events stopped in the pending list.
        self._webhook_cursor = "0-0"
        # Redis refused INFO (``eviction_policy``): not asked again.
        self._policy_refused = False

    @classmethod
    def from_url(cls, url: str, prefix: str = "sdxl:", max_waiting: int | None = None,
                 max_calls: int | None = None) -> "JobStore":
        """A store on the Redis at ``url``. ``max_waiting`` (the API's): at most that many
        connections for blocking reads, where one was opened for each read waiting at once:
        Redis's ``maxclients`` is shared with the dispatchers, and a replica's event
        streams took it all (a dispatcher could not connect, and the queue stopped). The
        API holds its waits to the same number, so a wait always finds its connection; a
        read that still finds none waits WAITING_CONNECTION_S for one, then fails as any
        other Redis error does (``ConnectionError``). ``max_calls`` (the API's): at most
        that many for every other command, where as many were opened as calls reached
        Redis at once, and kept; a call that finds none free within CALL_CONNECTION_S fails
        with ``ConnectionError(NO_CONNECTION_FREE)``. None (a dispatcher, the scripts):
        unbounded, their calls at once being as many as their own tasks."""
        # redis-py 8 skips its check of a pooled connection before use while its
        # "maintenance notifications" (a Redis Enterprise feature) may be on, as their
        # default "auto" counts: after Redis restarted, a connection to the old process then
        # failed its next command (a 503). Off, a closed connection is replaced before
        # a command is sent on it, so no command is ever sent twice.
        options = {"socket_timeout": 30, "socket_connect_timeout": 5,
                   "health_check_interval": 15,
                   "maint_notifications_config": MaintNotificationsConfig(enabled=False)}

        def client(bound: int | None, wait_s: float) -> aioredis.Redis:
            return aioredis.from_url(url, **options) if bound is None else \
                aioredis.Redis.from_pool(BlockingConnectionPool.from_url(
                    url, max_connections=bound, timeout=wait_s, **options))
        return cls(client(max_calls, CALL_CONNECTION_S), prefix,
                   waiting=client(max_waiting, WAITING_CONNECTION_S))

    def key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    async def _run(self, name: str, *args: Any) -> Any:
        result = await self._scripts[name](keys=[], args=[self.prefix, *args])
        if isinstance(result, list):
            return [_text(part) for part in result]
        return _text(result)

    async def close(self) -> None:
        await self.redis.aclose()
        if self.waiting is not self.redis:
            await self.waiting.aclose()

    # --- API keys. -------------------------------------------------------------------
    async def add_key(self, token: str, name: str) -> None:
        await self.redis.hset(self.key("apikey", hash_key(token)),
                              mapping={"name": name, "created_at": time.time()})

    async def keys(self) -> list[dict]:
        """Every API key: its id (the SHA-256 it is stored as), name and creation time."""
        found = []
        async for name in self.redis.scan_iter(match=self.key("apikey", "*"), count=500):
            entry = {_text(k): _text(v) for k, v in (await self.redis.hgetall(name)).items()}
            found.append({"id": _text(name).rsplit(":", 1)[1], "name": entry.get("name", ""),
                          "created_at": float(entry.get("created_at") or 0)})
        return sorted(found, key=lambda key: key["created_at"])

    async def revoke_key(self, owner: str) -> bool:
        """Remove the key stored as ``owner``: every call with it is 401 from now on, and it
        is remembered as revoked, so that no key file brings it back (``is_revoked``)."""
        await self.redis.sadd(self.key("apikeys", "revoked"), owner)
        return bool(await self.redis.delete(self.key("apikey", owner)))

    async def is_revoked(self, token: str) -> bool:
        return bool(await self.redis.sismember(self.key("apikeys", "revoked"),
                                               hash_key(token)))

    async def owner_of(self, token: str) -> str | None:
        """The owner id (the key's hash) of a known API key, else None."""
        owner = hash_key(token)
        return owner if await self.redis.exists(self.key("apikey", owner)) else None

    # --- Submit, read, cancel (the API). ---------------------------------------------
    async def submit(self, owner: str, request: dict, *, idempotency_key: str = "",
                     body_sha: str = "", rate_per_minute: int, max_active: int,
                     ttl_s: int, webhook: str = "", webhook_events: tuple[str, ...] = ()
                     ) -> Submitted:
        job_id = new_job_id()
        idem = hashlib.sha256(idempotency_key.encode()).hexdigest() if idempotency_key else ""
        outcome, detail = await self._run(
            "submit", job_id, owner, json.dumps(request), idem, body_sha,
            rate_per_minute, max_active, ttl_s, webhook, ",".join(webhook_events),
            request["num_images"], request["num_inference_steps"])
        if outcome in ("created", "existing", "conflict"):
            return Submitted(outcome, detail)
        return Submitted(outcome, "", detail)

    async def job(self, job_id: str, owner: str | None = None) -> dict[str, Any] | None:
        """The job's fields, or None when unknown, expired or (``owner`` given) not its."""
        if not JOB_ID.fullmatch(job_id):
            return None
        raw = await self.redis.hgetall(self.key("job", job_id))
        job = {_text(k): _text(v) for k, v in raw.items()}
        if not job or (owner is not None and job.get("owner") != owner):
            return None
        return job

    async def status(self, job_id: str) -> str | None:
        """The job's status alone (``queued``, ``running``, ``canceled``...), or None."""
        return _text(await self.redis.hget(self.key("job", job_id), "status"))

    async def with_queue_positions(self, jobs: list[dict[str, Any]]
                                   ) -> list[tuple[dict[str, Any], int | None]]:
        """Each of ``jobs`` (read queued) as it is now, and its place in the queue (1 for the
        next to start, None when not queued), read at one instant, in one round trip (a
        page of a listing): the job as read where it has not changed since, else as it is
        now (no fields when it is gone). Read apart, a job started between its read and
        its place's had no place while its fields said queued."""
        placed = await self._scripts["queue_positions"](keys=[], args=[
            self.prefix, *(part for job in jobs
                           for part in (job["id"], job["status"], job.get("starts", "")))])
        now = []
        for job, (place, *changed) in zip(jobs, placed):
            if changed:
                fields = [_text(part) for part in changed[0]]
                job = dict(zip(fields[::2], fields[1::2]))
            now.append((job, None if place < 0 else place + 1))
        return now

    async def clock(self) -> float:
        """Redis's time: the clock the jobs' times are on (docs/jobs.md, "Clocks"), which
        every API replica and dispatcher reads alike, whatever its own node's says."""
        seconds, micros = await self.redis.time()
        return seconds + micros / 1e6

    async def throughput(self, live_s: float, window_s: float = 300.0
                         ) -> tuple[float, float, float | None]:
        """(Redis's time, the recent throughput of all dispatchers together, when one takes
        jobs again) for estimated starts. The throughput: the jobs that ended after a
        start, not those canceled while queued, per second of the window that a job ran in
        (`busy`): the quiet part of it made no job end. The time is the clock the ends were
        written with (``clock``). When one takes jobs again: None while any dispatcher that
        checked in within ``live_s`` takes them, or none checked in; else the end of the
        shortest refusal of theirs (``requeue``'s ``refusing_s``)."""
        raw_now, count, spells, since, refusing_ms = await self._throughput(
            keys=[self.key("finished"), self.key("busy"), self.key("busy-since"),
                  self.key("dispatchers")],
            args=[window_s, live_s, self.prefix])
        now = float(raw_now)
        begin = now - window_s
        busy = sum(max(0.0, float(end) - max(float(start), begin))
                   for start, end in zip(spells[::2], spells[1::2]))
        if since is not None:
            busy += max(0.0, now - max(float(since), begin))
        # No spell measured (jobs run by a release before this one): the whole window.
        return (now, count / (busy if busy > 0 else window_s),
                None if refusing_ms is None else now + refusing_ms / 1000)

    async def image(self, job_id: str, index: int) -> bytes | None:
        return await self.redis.get(self.key("image", job_id, str(index)))

    def _block_ms(self, wanted_ms: int) -> int:
        """How long one blocking read may wait: ``wanted_ms``, at most LONGEST_BLOCK_MS and a
        third of the connection's socket timeout (callers wanting longer read again)."""
        timeout = self.waiting.connection_pool.connection_kwargs.get("socket_timeout")
        longest = min(LONGEST_BLOCK_MS, int(timeout * 1000 / 3)) if timeout \
            else LONGEST_BLOCK_MS
        return max(1, min(wanted_ms, longest))

    async def events_after(self, job_id: str, after: str = "0-0", block_ms: int = 1,
                           count: int = 200) -> list[tuple[str, dict]]:
        """Events after the stream id ``after``; waits up to ``block_ms`` for new ones, or
        less (see ``_block_ms``): an empty answer is not the end of the wait."""
        # A read that does not wait (block_ms 1: a look at a finished job's events before
        # any wait is held) on the pool of short commands: it must not take a connection
        # that a held wait counts on.
        client = self.waiting if block_ms > 1 else self.redis
        answer = await client.xread({self.key("events", job_id): after}, count=count,
                                    block=self._block_ms(block_ms))
        entries = answer[0][1] if answer else []
        return [(_text(entry_id), json.loads(_text(fields[b"data"])))
                for entry_id, fields in entries]

    async def cancel(self, job_id: str, owner: str, ttl_s: int) -> str:
        """``canceled``, the final state it already had, or ``missing``."""
        return await self._run("cancel", job_id, owner, ttl_s)

    async def owned_jobs(self, owner: str, limit: int = 20, after: Place | None = None,
                         statuses: frozenset[str] | None = None,
                         scan: int = LIST_SCAN) -> tuple[list[dict[str, Any]], Place | None]:
        """A page of ``owner``'s jobs, newest first: up to ``limit`` whose status is one of
        ``statuses`` (any when None), from those submitted before ``after`` (where an
        earlier page ended), reading at most ``scan`` of them; and where the next page
        starts, None when no job is left. With ``statuses`` only the key's listings of
        those states are read (``owned-<status>:<owner>``, merged newest first), so a page
        reads its matches, not every job of the key until it finds them. A page can hold
        fewer than ``limit`` jobs and still have a next one (jobs expired since the key
        last submitted, unlisted as they are read)."""
        if statuses is None:
            listings: dict[str, str | None] = {self.key("owned", owner): None}
        else:
            await self._index_owned(owner)
            listings = {self.key(f"owned-{state}", owner): state for state in sorted(statuses)}
        jobs: list[dict[str, Any]] = []
        read = 0
        while len(jobs) < limit and read < scan:
            # The whole listing may be jobs expired since the key's last submit: read on by
            # twenties; those of a state are its jobs, expired ones aside.
            want = limit - len(jobs) if statuses else max(limit - len(jobs), 20)
            entries = await self._listed_before(listings, after, min(want, scan - read))
            if not entries:
                return jobs, None
            async with self.redis.pipeline(transaction=False) as pipe:
                for job_id, _, _ in entries:
                    pipe.hgetall(self.key("job", job_id))
                raws = [{_text(k): _text(v) for k, v in raw.items()}
                        for raw in await pipe.execute()]
            stale = [(job_id, score) for (job_id, score, state), job in zip(entries, raws)
                     if not job or (state and job.get("status") != state)]
            if stale:
                # Expired, or listed in a state it left under an older release: mended here
                # (a submit unlists only 50 at a time), so that it is read once, not on
                # every page.
                await self._mend(keys=[], args=[self.prefix, owner,
                                                 *(part for pair in stale for part in pair)])
            for (job_id, score, _), job in zip(entries, raws):
                read += 1
                after = (score, job_id)
                # Gone (expired, not yet unlisted) or, if ever, not this owner's: skipped.
                if job and job.get("owner") == owner and (statuses is None
                                                          or job.get("status") in statuses):
                    jobs.append(job)
                    if len(jobs) == limit:
                        break
        return jobs, after if await self._listed_before(listings, after, 1) else None

    async def _index_owned(self, owner: str) -> None:
        """List each of ``owner``'s jobs in its state's listing, unless that was done within
        INDEX_TRUSTED_S (``owned-indexed:<owner>``): jobs an older release submitted or moved
        are in none, and those of a release before this one, running beside it during a
        rollout, go on being so until that release is gone. Steps of INDEX_STEP jobs."""
        if await self.redis.exists(self.key("owned-indexed", owner)):
            return
        lowest = "-inf"
        while lowest:
            lowest = _text(await self._index_owned_step(
                keys=[], args=[self.prefix, owner, lowest, INDEX_STEP,
                               int(INDEX_TRUSTED_S * 1000)]))

    async def _listed_before(self, listings: dict[str, str | None], after: Place | None,
                             count: int) -> list[tuple[str, float, str | None]]:
        """Up to ``count`` (id, score, state listed in) of the ``listings`` (key: its state,
        None for ``owned``) that come after ``after`` newest first, merged; a job listed in
        two (a state it left) once."""
        found = {job_id: (job_id, score, state) for key, state in listings.items()
                 for job_id, score in await self._owned_before(key, after, count)}
        return sorted(found.values(), key=lambda entry: (entry[1], entry[0]),
                      reverse=True)[:count]

    async def _owned_before(self, key: str, after: Place | None,
                            count: int) -> list[tuple[str, float]]:
        """Up to ``count`` (id, score) of the listing ``key`` that come after ``after`` in
        newest-first order: a lower score, or the same score and a lower id (Redis orders
        equal scores by member, backwards here). Those of ``after``'s own score that come
        before it are read too and dropped, so the page goes on where it ended even when
        jobs were unlisted in between (an offset would then skip some)."""
        if after is None:
            raw = await self.redis.zrevrangebyscore(key, "+inf", "-inf", start=0, num=count,
                                                    withscores=True)
            return [(_text(member), score) for member, score in raw]
        score, last = after
        ties = await self.redis.zcount(key, repr(score), repr(score))
        raw = await self.redis.zrevrangebyscore(key, repr(score), "-inf", start=0,
                                                num=count + ties, withscores=True)
        return [(member, s) for member, s in ((_text(m), s) for m, s in raw)
                if s < score or member < last][:count]

    # --- Dispatchers. ----------------------------------------------------------------
    async def ensure_groups(self) -> tuple[tuple[str, ...], int]:
        """Create the consumer groups that are missing: the streams whose group this call
        made ("stream", "webhooks"; XGROUP CREATE is atomic, so of the dispatchers that found
        one gone at once, one makes it) and how many queued jobs it put back. Where the jobs'
        group was missing (a new Redis, or one that evicted or lost the stream), the queued
        jobs whose entries went with the stream are put back in it (``enter_again``). A
        dispatcher's start does this too, so a stream lost while no dispatcher ran (scaled
        to zero) is mended when one starts, not only by a read that finds the group gone.
        The store's creation mark is written first where missing (``mark_created``): on a
        new Redis, the time it was set up."""
        made: list[str] = []
        entered = 0
        await self.mark_created()
        for stream, group in (("stream", GROUP), ("webhooks", WEBHOOK_GROUP)):
            try:
                await self.redis.xgroup_create(self.key(stream), group, id="0", mkstream=True)
            except aioredis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
                continue
            made.append(stream)
            if group == GROUP:
                entered = await self.enter_again()
        return tuple(made), entered

    async def _in_groups(self, read: Callable[[], Awaitable[Any]], stream: str = "stream"
                         ) -> Any:
        """``read()`` of ``stream``'s consumer group, again after recreating the groups if
        they are gone. Redis that came back empty (data lost) has no group, and the API's
        next submit recreates the stream without one (XADD): without this every read would
        fail with NOGROUP for good, while the dispatchers still check in as healthy."""
        try:
            return await read()
        except aioredis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
        made, entered = await self.ensure_groups()
        # Said by the one dispatcher that made the jobs' group again, so once per loss: the
        # others' reads that found it gone meanwhile are no news.
        if "stream" in made:
            say_lost_data("the job queue's consumer groups were gone", "the stream",
                          f"Groups created again, and {entered} queued job(s) whose entries "
                          f"went with the stream put back in it")
        # The webhooks' stream alone (evicted under an allkeys-* policy): said by the reader
        # of that stream only, since in a whole loss another dispatcher's read of the jobs
        # may make this group after the one that said the above made the jobs' group.
        elif stream == "webhooks" and "webhooks" in made:
            log.warning("the webhooks' consumer group was gone (Redis evicted their stream, "
                        "or lost its data): created again; the deliveries that waited in it "
                        "went with it. To keep them: maxmemory-policy noeviction")
        return await read()

    async def enter_again(self) -> int:
        """Put the queued jobs whose stream entries are gone back in the stream
        (``_ENTER_AGAIN``), in steps of INDEX_STEP: a stream evicted (or lost) with its
        entries left them ``queued`` for good, never delivered (and with an empty stream
        KEDA scaled the GPU pods to zero). How many."""
        lowest, entered = "-inf", 0
        while lowest:
            lowest, more = await self._enter_again_step(keys=[], args=[self.prefix, lowest,
                                                                       INDEX_STEP])
            lowest = _text(lowest)
            entered += more
        return entered

    async def next_jobs(self, dispatcher: str, count: int, block_ms: int
                        ) -> list[tuple[str, str]]:
        """(stream entry, job id) of new jobs delivered to this dispatcher."""
        answer = await self._in_groups(lambda: self.redis.xreadgroup(
            GROUP, dispatcher, {self.key("stream"): ">"}, count=count,
            block=self._block_ms(block_ms)))
        return [(_text(entry), _text(fields[b"id"])) for entry, fields in
                (answer[0][1] if answer else [])]

    async def abandoned_jobs(self, dispatcher: str, lease_s: float, count: int
                             ) -> list[tuple[str, str]]:
        """Jobs whose dispatcher has not renewed its claim for ``lease_s``, now this one's."""
        found: list[tuple[str, str]] = []
        cursor = "0-0"
        # One XAUTOCLAIM looks at no more than 10 x COUNT pending entries, and the jobs
        # running elsewhere (renewed, never idle) are older than the one a dead or TorchServe-
        # less dispatcher left: with 10 of them ahead, a count of 1 found nothing, and a
        # newer job went first. So follow the cursor through the whole pending list, which
        # holds no more than the jobs in flight.
        while len(found) < count:
            cursor, entries, _ = await self._in_groups(
                lambda after=cursor: self.redis.xautoclaim(
                    self.key("stream"), GROUP, dispatcher, int(lease_s * 1000), after,
                    count=count - len(found)))
            found += [(_text(entry), _text(fields[b"id"])) for entry, fields in entries
                      if fields]
            if _text(cursor) == "0-0":
                break
        return found

    async def release(self, dispatcher: str, entries: list[str], lease_s: float) -> int:
        """Hand entries delivered to ``dispatcher`` and not started back to every
        dispatcher: their idle time is set to ``lease_s``, so the next ``abandoned_jobs`` of
        any dispatcher (this one's too) takes them, where they would otherwise wait a lease
        pending here. Their jobs are untouched (not started here, no attempt counted). How
        many were still this dispatcher's."""
        if not entries:
            return 0
        return await self._release(keys=[self.key("stream")],
                                   args=[GROUP, dispatcher, int(lease_s * 1000), *entries])

    async def start(self, job_id: str, entry: str, dispatcher: str, max_attempts: int,
                    ttl_s: int) -> tuple[str, str]:
        """``("claimed", claim)``, ``("done", state)``, ``("gone", "")`` or
        ``("dead", reason)`` after ``max_attempts`` starts."""
        outcome, detail = await self._run("start", job_id, dispatcher, max_attempts, entry,
                                          ttl_s)
        return outcome, detail

    async def progress(self, job_id: str, claim: str, step: int, total: int) -> str:
        return await self._run("progress", job_id, claim, step, total)

    async def renew(self, job_id: str, claim: str, dispatcher: str) -> str:
        """``ok`` while the claim holds; else the job's state (``canceled``...) or ``gone``."""
        return await self._run("renew", job_id, claim, dispatcher)

    async def record_error(self, job_id: str, claim: str, message: str) -> str:
        """Record why the start under ``claim`` failed (it will be started again): its
        ``last_error`` and a ``running`` event saying so, once per start (a second call,
        after a first whose answer was lost, changes nothing). ``ok`` while the claim
        holds; else the job's state or ``gone``."""
        return await self._run("record_error", job_id, claim, message[:500])

    async def requeue(self, job_id: str, claim: str, dispatcher: str, lease_s: float,
                      reason: str, free_redis_faults: int | None = None,
                      refusing_s: float | None = None) -> str:
        """Give a job started under ``claim`` back unrun: ``queued`` again in its place in
        the queue, its start not counted, for any dispatcher to take. ``ok``, or the state
        that refused it (a stale claim changes nothing: a job taken over, finished after
        all, canceled). With ``free_redis_faults`` the hand-back follows a fault of Redis's,
        and only that many of those leave a job's start uncounted: past them ``counted``,
        queued again with the start counted (the job's own writes may be what fails).
        With ``refusing_s`` the dispatcher takes no job for that long (its pod's breaker
        is open), recorded with the hand-back, for estimated starts (``throughput``)."""
        return await self._run("requeue", job_id, claim, dispatcher, int(lease_s * 1000),
                               reason[:300],
                               "" if free_redis_faults is None else free_redis_faults,
                               "" if refusing_s is None else int(refusing_s * 1000))

    async def finish(self, job_id: str, claim: str, ttl_s: int, status: str,
                     result: dict | None = None, error: dict | None = None,
                     seeds: list[int] | None = None, images: list[bytes] = ()) -> str:
        """``stored``, or the state that refused it (a stale claim never writes)."""
        return await self._run("finish", job_id, claim, ttl_s, status,
                               json.dumps(result or {}), json.dumps(error) if error else "",
                               json.dumps(seeds or []), *images)

    async def check_in(self, dispatcher: str) -> None:
        """Say that ``dispatcher`` is alive now, by Redis's clock: a dispatcher's own, on a
        node a minute behind, was never counted live by an API that counts those of the
        last 30 s by its own."""
        await self._check_in(keys=[self.key("dispatchers")], args=[dispatcher])

    async def check_out(self, dispatcher: str) -> None:
        await self.redis.zrem(self.key("dispatchers"), dispatcher)

    async def prune_consumers(self, idle_s: float, dispatcher: str) -> list[str]:
        """Remove the consumers of both groups that own no entry and have not read for
        ``idle_s``: those of dispatchers that are gone (killed, scaled down, restarted with
        a new name). Redis never removes a consumer by itself, so each dispatcher that ever
        ran stayed one for good (``XINFO CONSUMERS`` grew with every restart). One with
        entries pending is kept: deleting it would drop them from the group, and its jobs
        are taken over by the live dispatchers (XAUTOCLAIM), which empties it first.
        Check-ins that old go too (CHECK_IN_KEPT_S at least): a dispatcher killed outright
        never checks out, and each such death left one in ``dispatchers`` for good. The
        consumers' names removed."""
        # By Redis's clock, that the check-ins are on: by its own, a dispatcher 5 minutes
        # ahead removed every other's check-in.
        await self.redis.zremrangebyscore(self.key("dispatchers"), "-inf",
                                          await self.clock() - max(idle_s, CHECK_IN_KEPT_S))
        removed = []
        for stream, group in (("stream", GROUP), ("webhooks", WEBHOOK_GROUP)):
            removed += [_text(name) for name in await self._prune_consumers(
                keys=[self.key(stream)], args=[group, int(idle_s * 1000), dispatcher])]
        return removed

    async def refuses_writes(self) -> str | None:
        """Redis's own words when it refuses every write: full (``maxmemory``, no eviction:
        OOM), a read-only replica (a failover's demoted primary), short of the replicas it
        must write to (NOREPLICAS), unable to persist (MISCONF: its disk full, a failed
        snapshot with ``stop-writes-on-bgsave-error``); else None. Read off a script that
        writes nothing but is refused as a write (``_MAY_WRITE``): one round trip of
        microseconds, no ``INFO`` (``@dangerous``, restricted by managed services). It read
        a PING, which only MISCONF refuses: a full Redis refused every submit while this
        said it took writes. Any other error is raised: Redis away, as any read."""
        try:
            await self._may_write()
        except (OutOfMemoryError, ReadOnlyError) as exc:
            # redis-py drops the reply's first word for the errors it has a class for.
            return f"{'OOM' if isinstance(exc, OutOfMemoryError) else 'READONLY'} {exc}"
        except ResponseError as exc:
            if not str(exc).startswith(("MISCONF", "NOREPLICAS")):
                raise
            return str(exc)
        return None

    async def eviction_policy(self) -> str | None:
        """Redis's ``maxmemory-policy`` (``INFO memory``), or None where Redis refuses
        ``INFO``: it is ``@dangerous``, so an ACL user without those commands (as the docs
        advise) may not read it, and managed services may rename it. Once refused it is not
        asked again by this store: Redis's ACL log counts each refusal, and a scrape every
        30 s kept adding to it."""
        if self._policy_refused:
            return None
        try:
            info = await self.redis.info("memory")
        except ResponseError:
            self._policy_refused = True
            return None
        return _text(info.get("maxmemory_policy"))

    async def persistence(self) -> tuple[str, str] | None:
        """Redis's ``appendonly`` and ``save`` (``CONFIG GET``), or None where Redis refuses
        ``CONFIG`` (``@dangerous`` too, and renamed or absent on managed services)."""
        try:
            config = {**await self.redis.config_get("appendonly"),
                      **await self.redis.config_get("save")}
        except ResponseError:
            return None
        if "appendonly" not in config:
            return None
        return _text(config["appendonly"]), _text(config.get("save", ""))

    async def live_dispatchers(self, within_s: float) -> int:
        """Dispatchers that checked in within ``within_s`` by Redis's clock (``check_in``)."""
        return await self._live_dispatchers(keys=[self.key("dispatchers")], args=[within_s])

    async def publish_model(self, info: dict, if_missing: bool = False) -> bool:
        """What the served model allows (size bounds), for the API's validation; with
        ``if_missing`` only when no bounds are published (Redis lost them). Whether it
        wrote them."""
        return bool(await self.redis.set(self.key("model"), json.dumps(info),
                                         nx=if_missing))

    async def model(self) -> dict | None:
        raw = await self.redis.get(self.key("model"))
        return json.loads(raw) if raw else None

    # --- Webhooks. -------------------------------------------------------------------
    async def next_webhooks(self, dispatcher: str, lease_s: float, count: int
                            ) -> list[tuple[str, str, str]]:
        """(entry, job id, event) to deliver: abandoned ones first, then new ones.

        The look for abandoned ones goes on where the last one stopped: Redis reads at
        most ten times ``count`` pending entries per look, and from the list's start each
        time, a head of events held in this dispatcher (waiting for a slot, their claims
        renewed: thousands when one receiver is slow) hid every abandoned one behind it."""
        stream = self.key("webhooks")
        cursor, entries, _ = await self._in_groups(lambda: self.redis.xautoclaim(
            stream, WEBHOOK_GROUP, dispatcher, int(lease_s * 1000), self._webhook_cursor,
            count=count), "webhooks")
        self._webhook_cursor = _text(cursor)  # "0-0" at the list's end: from the start again
        if not entries:
            answer = await self._in_groups(lambda: self.redis.xreadgroup(
                WEBHOOK_GROUP, dispatcher, {stream: ">"}, count=count,
                block=self._block_ms(1000)), "webhooks")
            entries = answer[0][1] if answer else []
        return [(_text(e), _text(f[b"id"]), _text(f[b"event"])) for e, f in entries if f]

    async def webhook_done(self, entry: str, outcome: str) -> None:
        stream = self.key("webhooks")
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(stream, WEBHOOK_GROUP, entry).xdel(stream, entry)
            pipe.hincrby(self.key("stats"), f"webhooks_{outcome}", 1)
            await pipe.execute()

    async def renew_webhooks(self, entries: list[str], dispatcher: str) -> None:
        """Claim ``entries`` afresh for ``dispatcher`` (one that was acknowledged since is
        left out by Redis)."""
        if entries:
            await self.redis.xclaim(self.key("webhooks"), WEBHOOK_GROUP, dispatcher, 0,
                                    entries, justid=True)

    # --- Metrics. --------------------------------------------------------------------
    async def mark_created(self) -> str:
        """The store's creation mark (``store-created``: Redis's time, in seconds), written
        now where it is missing (``_MARK_CREATED``). Kept without an expiry, so no
        ``volatile-*`` policy evicts it; read at every scrape, so an ``allkeys-lru`` one
        keeps it too."""
        return _text(await self._mark_created(keys=[self.key("store-created")]))

    async def _store_created(self, mark: Any) -> float | None:
        """The creation mark for ``/metrics``: ``mark`` as read, or, where it was missing,
        written now; None while Redis refuses that write (full, read-only: a later scrape
        writes it), so a scrape never fails for it. A mark other than the one this store
        read before means that Redis lost its data: said once (``say_lost_data``), by the
        API, where with no dispatcher running (GPU pods at zero) nothing else would."""
        if mark is None:
            try:
                mark = await self.mark_created()
            except RedisError as exc:
                if not refused_unrun(exc):
                    raise
                return None
        mark, seen = _text(mark), self._created_seen
        self._created_seen = mark
        if seen is not None and mark != seen:
            say_lost_data(f"the job store's creation mark ({self.key('store-created')}) was "
                          f"gone", "it", f"Marked again: the store was set up at {iso(seen)} "
                          f"as this API read it before, at {iso(mark)} now "
                          f"(sdxl_jobs_store_created_timestamp_seconds)")
        return float(mark)

    async def gauges(self) -> dict[str, Any]:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zcard(self.key("queued")).scard(self.key("running"))
            await self._oldest_queued(keys=[], args=[self.prefix], client=pipe)
            pipe.hgetall(self.key("stats")).xlen(self.key("dead"))
            pipe.xlen(self.key("stream"))
            # Webhook events not yet ended; the oldest one's age from its entry id (the
            # milliseconds of Redis's clock when it was queued), against that clock, as the
            # oldest queued job's (its submit, on Redis's clock too).
            pipe.xlen(self.key("webhooks")).xrange(self.key("webhooks"), count=1).time()
            pipe.get(self.key("store-created"))
            (queued, running, oldest, stats, dead, backlog, webhooks, first_webhook,
             (seconds, micros), created) = await pipe.execute()
        queued_at_ms = int(_text(first_webhook[0][0]).split("-")[0]) if first_webhook else 0
        now = seconds + micros / 1e6
        return {"queued": queued, "running": running,
                "oldest_age_s": max(0.0, now - float(oldest)) if oldest else 0.0,
                "stats": {_text(k): float(v) for k, v in stats.items()},
                "dead": dead, "backlog": backlog, "webhooks": webhooks,
                "oldest_webhook_age_s": max(0.0, now - queued_at_ms / 1e3)
                if first_webhook else 0.0,
                "created": await self._store_created(created)}

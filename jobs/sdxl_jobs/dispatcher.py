"""The dispatcher: takes jobs from Redis to one TorchServe and their results back.

It pulls a job only when its TorchServe has room (no more jobs in flight than the model's
batch capacity) and is up, so waiting happens in Redis, durable and visible, not in
TorchServe's in-memory queue, and a job goes to a pod that can run it. Each job is one
streamed ``/predictions`` call: the per-step JSON lines become progress events, the final
object becomes the stored images.

What it guarantees (each proved by tests/jobs against real Redis and TorchServe):
- jobs read while its TorchServe is down (stopped while nothing was in flight, so no call
  failed) are not started: they stay queued, no attempt counted, and are handed back to
  every dispatcher, this one included once its TorchServe is back;
- a job it started and then died on (SIGKILL) is taken over by another dispatcher once its
  claim is ``lease_s`` old, and finished there; its late result, if it ever comes, is
  refused (store.py's claims);
- TorchServe refusing with 503 (queue full) or unreachable (restarting) delays the job, it
  does not fail it, and costs no attempt; past ``lease_s`` of that, with TorchServe then
  unreachable or without a READY worker, the job goes back to the queue, ``queued`` again
  in its place, for a dispatcher whose TorchServe is up;
- a job its worker refuses with 503 ``CircuitOpen`` (the breaker open: the engine fails
  every call) goes back to the queue, ``queued`` again in its place, no attempt counted,
  for a dispatcher whose pod can run it; this one takes no job for the reply's
  ``retry_after_s``;
- a job whose run ended because Redis failed its writes (unreachable, restarting, or
  refusing them for a reason of its own: full, a read-only or cut-off replica, too few
  replicas, unable to persist, another client's long script: ``store.redis_fault``)
  goes back to the queue the same way once Redis answers, no attempt counted (up to
  ``max_attempts`` such faults per job; past them each counts): its generation was
  stopped, as its progress or result could not be stored;
- a 500 or a worker that died ("Worker died.", 507, or a streamed reply that broke off
  while TorchServe itself went on answering) costs an attempt: after ``max_attempts``
  starts the job goes to the dead-letter stream, failed with the reason;
- a failed run whose error or failure Redis could not take (the same faults) keeps its
  claim and writes it once Redis takes it: it is not run again for that, nor counted twice;
- a request TorchServe refuses (4xx, or 507 for an image too large even alone) fails at
  once with TorchServe's own error: trying again cannot help; so does one its worker
  answered 500 ``EngineCrashed``: it killed fresh engine processes alone already, and
  each start again would kill more and rerun the jobs batched with it.

Canceling a running job stops its result being stored and closes the stream to TorchServe.
TorchServe never tells a worker that its client went away, so with a directory shared with
TorchServe's workers (``cancel_dir``, their ``SDXL_CANCEL_DIR``) each call carries a cancel
token, and a call it gives up (the job canceled or taken over, the dispatcher stopping, Redis
gone mid-job) gets a flag file of that name there: its generation stops at the next step (a
batch whose other requests are still wanted goes on for them). A call in flight is marked
there too, so the calls of a dispatcher killed outright are flagged by the next one to start
on the same host.

Usage: python -m sdxl_jobs.dispatcher --redis URL --torchserve URL --management URL
       --key-file build/run/8080/key_file.json [--model sdxl] [--capacity 0]
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
import urllib.parse
import uuid
from http.client import HTTPException
from pathlib import Path
from typing import Awaitable, Callable, NoReturn

import httpx
from redis.exceptions import RedisError

from sdxl_serve.cancellation import CANCEL_HEADER, cancel_flag, flag_orphaned_calls, mark_call
from sdxl_serve.contract import CIRCUIT_OPEN, ENGINE_CRASHED, OUT_OF_MEMORY
from sdxl_serve.management import KeyFile, customized_metadata, ready_workers, \
    refused_key
from sdxl_serve.server import server_address
from sdxl_jobs.settings import JobSettings, command_parser
from sdxl_jobs.store import (NO_EVICTION, JobStore, RepeatedWarnings, reason_to_log, redis_fault,
                              usable_at_start)
from sdxl_jobs.webhooks import delivery_loop, unusable_proxy

log = logging.getLogger("sdxl_jobs.dispatcher")

CHECK_IN_EVERY_S = 5.0
# How often a dispatcher whose Redis is not there yet at its start asks again.
REDIS_WAIT_AT_START_S = 2.0
# How soon a canceled job that is not relaying progress (queued in TorchServe) is let go.
CANCEL_CHECK_S = 1.0
# A full queue clears within a batch; a restarting TorchServe takes seconds.
RETRY_UNAVAILABLE_S = (0.25, 0.5, 1, 2, 4)
# No job taken for this long after a breaker's 503 without a usable `retry_after_s`.
CIRCUIT_RETRY_S = 5.0
# Between tries of a start's last write (its hand-back, its failure or error) that Redis
# failed. Short: once an outage has outlasted the lease, the first dispatcher to reach Redis
# again decides whether the start counts (this one's write, or another's takeover, which
# counts and runs the job again).
RETRY_REDIS_S = 0.25


def final_failure(status: int, final: dict) -> bool:
    """Whether TorchServe's answer fails the job for good: the next start would get it too.

    >>> final_failure(400, {"type": "InvalidRequest"}), final_failure(500, {}), final_failure(502, {})
    (True, False, False)
    >>> final_failure(507, {"type": "OutOfMemory"}), final_failure(507, {"message": "Worker died."})
    (True, False)
    >>> final_failure(500, {"type": "EngineCrashed"}), final_failure(500, {"type": "EngineStalled"})
    (True, False)
    """
    if 400 <= status < 500:
        return True
    # Too large even alone (507): the worker split the batch down to this request already.
    # A poison request (500 EngineCrashed): the worker ran it alone on fresh engine
    # processes, which it killed each time. A stalled engine (EngineStalled) is not the
    # request's doing for sure, so its job is started again, as after any other 500.
    return (status, final.get("type")) in ((507, OUT_OF_MEMORY), (500, ENGINE_CRASHED))


class Unavailable(Exception):
    """TorchServe cannot take the request now (503, restarting): try again later."""


class Lost(Exception):
    """The job is no longer ours: canceled, expired or taken over."""


class StaysUnavailable(Exception):
    """TorchServe has not taken the job for ``lease_s`` (unreachable, or answering 503): the
    job goes back to the queue for any dispatcher, at no attempt's cost, where it waited
    here for good, ``running``, while pods whose TorchServe was up stood idle."""


class Refused(Exception):
    """The model's worker refuses every request for a while (its circuit breaker is open:
    503 ``CircuitOpen``): the job goes back to the queue for any dispatcher, at no
    attempt's cost, and this one takes no job for ``retry_after_s``."""

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s


# How often the same reason for waiting on TorchServe is said again (_not_ready).
WAITING_SAID_S = 30.0


class BrokenOff(Exception):
    """TorchServe's reply began and then broke off (its worker died under the job): a
    failed start, which costs an attempt, unlike TorchServe being unreachable."""


def resolver_error(exc: BaseException | None) -> socket.gaierror | None:
    """The resolver's error ``exc`` (urllib's or httpx's) came of, if a host name did not
    resolve."""
    for _ in range(8):  # the chain: httpx's error, httpcore's, the resolver's
        if exc is None or isinstance(exc, socket.gaierror):
            return exc
        if isinstance(getattr(exc, "reason", None), socket.gaierror):  # urllib's URLError
            return exc.reason
        exc = exc.__cause__ or exc.__context__
    return None


class Dispatcher:
    """One dispatcher process's work loop (see the module docstring)."""

    def __init__(self, store: JobStore, settings: JobSettings, inference: str,
                 keys: KeyFile, model: str = "sdxl", capacity: int = 0,
                 name: str | None = None):
        self.store = store
        self.settings = settings
        self.inference = inference.rstrip("/")
        self.keys = keys
        keys.direct = True  # its management calls too: below
        self.model = model
        self.capacity = capacity
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self.in_flight: dict[str, asyncio.Task] = {}  # by job id
        # Entries this loop claimed again while their job's task still ran (by job id), and
        # those of tasks since ended: handed back once more at the next read (``_take``).
        self.reclaimed: dict[str, str] = {}
        self.to_release: list[str] = []
        # Checked before reading again after a failed call, and after each read that returned
        # jobs: with nothing in flight, no call fails when TorchServe goes away.
        self.torchserve_up = False
        # Until then (monotonic) no job is taken: the worker's breaker refuses them all.
        self.refusing_until = 0.0
        self.stopping_now = False  # the process is ending: cancellations are not Lost
        self.said_unresolved = ""  # the last host name said not to resolve (_not_ready)
        self.said_waiting, self.say_waiting_at = "", 0.0  # why TorchServe is not used yet
        self.renewing = asyncio.Lock()  # one renewal of an expired key at a time (_key)
        # The lines each turn of a loop brings while Redis is away (its queue read every
        # second, its check-in, its webhook read, a job's renewal): once a minute each, and
        # one line when Redis answers again. Each was logged every time: an hour's outage
        # was thousands of the same WARNING per dispatcher.
        self.redis_faults = RepeatedWarnings(log)
        # TorchServe is our own backend, never reached through the environment's proxy
        # (HTTP_PROXY and the like are for webhooks: webhooks.Outbound): with one set, every
        # job's prompt and TorchServe's keys went to the proxy, 127.0.0.1 included, unless
        # NO_PROXY named TorchServe's host. trust_env off also keeps a ~/.netrc out; the
        # certificates still come from SSL_CERT_FILE or SSL_CERT_DIR when set.
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(900.0, connect=5.0),
                                        limits=httpx.Limits(max_connections=64),
                                        trust_env=False, verify=httpx.create_ssl_context())

    # --- TorchServe. -----------------------------------------------------------------
    async def _key(self, refused: str | None = None) -> str | None:
        """The inference key; a ``refused`` one renewed first. Jobs that find the expired
        key together renew it once: the others wait for that renewal and read its key (not
        waiting, they read the old key again, and their second try was refused too)."""
        if refused is None:
            return self.keys.key("inference")
        async with self.renewing:
            key = self.keys.key("inference")
            if key == refused:
                try:
                    await asyncio.to_thread(self.keys.renew, "inference")
                except (OSError, HTTPException) as exc:
                    # The management API is restarting with the rest of TorchServe: the
                    # job is not at fault and waits like any other (no attempt used).
                    raise Unavailable(f"renewing the inference key failed: "
                                      f"{type(exc).__name__}") from None
                key = self.keys.key("inference")
        return key

    async def describe(self, customized: bool = False, timeout: float = 30.0) -> dict:
        """TorchServe's description of the model's default version; ``customized`` adds our
        handler's own (the model's bounds), which a worker answers only between batches."""
        url = f"{self.keys.management_address}/models/{self.model}"
        if customized:
            url += "?customized=true"
        status, _, body = await asyncio.to_thread(self.keys.call, "GET", url, "management",
                                                  None, None, timeout)
        if status != 200:
            raise Unavailable(f"describe answered {status}")
        version = json.loads(body)[0]
        workers = max(1, len(version.get("workers", [])))
        metadata = customized_metadata(version)
        return {"capacity": int(version.get("batchSize", 1)) * workers,
                "ready_workers": ready_workers(version),
                "limits": metadata.get("limits"),
                "cancel_flags": metadata.get("cancel_flags"),
                "cancel_probe": metadata.get("cancel_probe"),
                "version": version.get("modelVersion")}

    async def healthy(self) -> bool:
        """Whether TorchServe can take this model's requests now: its inference address
        answers, with any status, and a worker of the model's default version is READY.
        ``/ping``'s status is not the test: TorchServe answers it 500 while any model it
        serves has fewer healthy workers than its minimum, so another model's broken worker
        would stop this model's jobs. Any failure to find out (a reply cut short included)
        is "not now", never the end of the dispatcher. Nor while the worker's circuit
        breaker said it refuses every request (``Refused``): the readiness probe takes the
        pod out of its Service then, but this dispatcher reads jobs from Redis, not through
        the Service, and would start jobs that healthy pods could run."""
        if time.monotonic() < self.refusing_until:
            return False
        asked = self.inference
        try:
            key = await self._key()
            response = await self.client.get(f"{self.inference}/ping", timeout=5.0,
                                              headers={"Authorization": f"Bearer {key}"})
            if refused_key(response.status_code, response.content):
                await self._key(refused=key)  # renewed for the jobs' calls
            asked = self.keys.management_address
            ready = (await self.describe(timeout=5.0))["ready_workers"] > 0
        except Exception as exc:  # noqa: BLE001 - see the docstring
            self._not_ready(asked, exc, logging.DEBUG, "TorchServe not ready for jobs")
            return False
        self._resolved()
        return ready

    def _not_ready(self, address: str, exc: Exception, level: int, what: str) -> None:
        """Why TorchServe at ``address`` cannot be used now, at ``level``; but a host name
        that does not resolve once at WARNING, naming the address: a typo, or a Service
        not created yet (so asked again: names can resolve later), where each try was an
        INFO or DEBUG line with the resolver's words alone, and a dispatcher logging
        warnings only waited for good without a word."""
        unresolved = resolver_error(exc)
        if unresolved is None:
            said = f"{what}: {type(exc).__name__}: {exc}"
            # Once, then again as it changes or every WAITING_SAID_S: a model that loads for
            # minutes (SDXL's 395 s) was a line a second of the same words.
            if said != self.said_waiting or time.monotonic() >= self.say_waiting_at:
                log.log(level, "%s", said)
                self.said_waiting = said
                self.say_waiting_at = time.monotonic() + WAITING_SAID_S
            return
        said = (f"TorchServe at {address} cannot be reached: its host name "
                f"{urllib.parse.urlsplit(address).hostname!r} does not resolve "
                f"({unresolved.strerror}); waiting for it, asked again every second")
        if said != self.said_unresolved:
            log.warning("%s", said)
            self.said_unresolved = said

    def _resolved(self) -> None:
        if self.said_unresolved:
            log.info("TorchServe answers now: its host names resolve")
            self.said_unresolved = ""

    async def generate(self, job_id: str, claim: str, request: dict) -> tuple[int, dict]:
        """(status, final JSON object) of one streamed prediction; progress goes to Redis.
        With a cancel directory the call is marked there while in flight: should this
        process be killed, the next dispatcher on this host flags it (``run``)."""
        token = uuid.uuid4().hex
        flag = cancel_flag(self.settings.cancel_dir, token)
        marker = None
        if flag:
            try:
                marker = mark_call(self.settings.cancel_dir, token)
            except OSError as exc:  # read-only: the call is only not flagged if we die
                log.debug("no in-flight marker for job %s: %s", job_id, exc)
        try:
            return await self._generate(job_id, claim, request, token, flag)
        finally:
            if marker is not None:
                marker.unlink(missing_ok=True)

    async def _generate(self, job_id: str, claim: str, request: dict, token: str,
                        flag: str) -> tuple[int, dict]:
        body = json.dumps({**request, "stream": True}).encode()
        url = f"{self.inference}/predictions/{self.model}"
        key = await self._key()
        for _ in range(2):  # once more with a renewed key
            headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
            if flag:
                headers[CANCEL_HEADER] = token
            answered = False
            try:
                async with self.client.stream("POST", url, content=body,
                                              headers=headers) as response:
                    answered = True
                    if response.status_code == 200:
                        final = await self._relay(response, job_id, claim)
                    else:
                        # TorchServe's own errors (503, 507 "Worker died.", a refused key)
                        # are one JSON object over several lines.
                        raw = await response.aread()
                        try:
                            final = json.loads(raw)
                        except ValueError:
                            final = {"message": raw[:300].decode(errors="replace")}
            except (httpx.TransportError, json.JSONDecodeError) as exc:
                self.torchserve_up = False
                if flag and isinstance(exc, httpx.ReadTimeout):
                    # A call given up while it waited is still queued or running in
                    # TorchServe (it keeps a request whose client left): the job's next try
                    # is another call, and this one's result would be nobody's. Only then:
                    # a flag is removed by the worker that serves its call, and a call that
                    # never arrived, or whose worker died, would leave it for good.
                    self._stop_generation(job_id, flag)
                if not answered:  # nothing came back: TorchServe is down or restarting
                    raise Unavailable(f"TorchServe unreachable: {type(exc).__name__}") \
                        from None
                await self._broken_off(f"broke off mid-way ({type(exc).__name__})")
            except BaseException:
                # Canceled, taken over, this dispatcher stopping, or Redis failing a progress
                # write (the job then goes back to the queue and runs again): nobody will
                # store this call's result, so the GPU should not go on making it.
                if flag:
                    self._stop_generation(job_id, flag)
                raise
            status = response.status_code
            if status == 200 and not final:
                await self._broken_off("ended without a result")
            if refused_key(status, json.dumps(final).encode()):
                key = await self._key(refused=key)
                continue
            # A streamed reply's status is sent with its first step; a later error is
            # only in the final object.
            if isinstance(final.get("code"), int) and "image" not in final:
                status = final["code"]
            return status, final
        # Refused twice, the key renewed between: the job is not at fault (no attempt used).
        raise Unavailable("TorchServe refused the inference key, renewed or not")

    @staticmethod
    def _stop_generation(job_id: str, flag: str) -> None:
        """Have TorchServe's worker stop the job's generation at its next step."""
        try:
            Path(flag).touch()
        except OSError as exc:
            log.warning("job %s: its generation could not be stopped (%s); its batch runs "
                        "to its end", job_id, exc)

    async def _broken_off(self, how: str) -> NoReturn:
        """Raise for a reply that began and did not end with a result. TorchServe still
        answering means its worker died under the job (TorchServe resets the connection
        after the 200 and the first steps, where a reply not begun would be a 507 "Worker
        died."): that start failed, ``BrokenOff``. TorchServe gone altogether (stopped,
        restarting) is ``Unavailable``: the job waits for it and loses no attempt."""
        try:
            await self.client.get(f"{self.inference}/ping", timeout=5.0)
        except httpx.HTTPError:
            raise Unavailable(f"TorchServe went away: its reply {how}") from None
        raise BrokenOff(f"TorchServe's reply {how} while TorchServe went on: its worker "
                        "died?")

    async def _relay(self, response: httpx.Response, job_id: str, claim: str) -> dict:
        """Relay the streamed JSON lines' steps to Redis; return the final object."""
        final: dict = {}
        async for line in response.aiter_lines():
            if not line.strip():
                continue
            message = json.loads(line)
            if "step" in message and "image" not in message and "code" not in message:
                answer = await self.store.progress(job_id, claim, message["step"],
                                                   message["total"])
                if answer != "ok":
                    raise Lost(answer)
            else:
                final = message
        return final

    # --- One job. --------------------------------------------------------------------
    async def run_job(self, entry: str, job_id: str) -> None:
        """Start the job (again after a failure that may pass) until it ends or is lost.

        The claim is renewed for the whole time, pauses between attempts included, so no
        dispatcher (this one neither) takes over a job that is still being worked on.
        """
        settings = self.settings
        holder: dict[str, str] = {}
        renewing = asyncio.create_task(self._keep_claim(job_id, holder, asyncio.current_task()))
        try:
            while True:
                # Restarted after a failed try: a renewal of the old claim that runs while
                # this start does would find the claim changed and cancel this task.
                holder.pop("claim", None)
                try:
                    outcome, claim = await self.store.start(job_id, entry, self.name,
                                                            settings.max_attempts,
                                                            settings.result_ttl_s)
                except RedisError as exc:
                    if not redis_fault(exc):
                        raise
                    # Not tried again: a start whose answer was lost ran, and a second one
                    # would count two attempts. An outage, said as the rest of this log
                    # says one, where it was an ERROR "dispatcher error" with a traceback.
                    log.warning("job %s: Redis failed its start (%s); it is taken over "
                                "after SDXL_JOBS_LEASE_S (%g s) by the first dispatcher "
                                "that reaches Redis", job_id, reason_to_log(exc),
                                settings.lease_s)
                    return
                if outcome != "claimed":
                    if outcome == "dead":
                        # claim is the reason here: the last try's error, with the server's
                        # request id when our handler answered it.
                        log.warning("job %s failed %d times: dead-lettered (last error: %s)",
                                    job_id, settings.max_attempts, claim)
                    elif outcome == "gone":
                        # Its entry is gone from the queue with it (the start removed it):
                        # said, where the job vanished without a word in any log.
                        log.warning("job %s dropped: its record is gone from Redis (evicted "
                                    "by a maxmemory-policy other than %s, or lost with "
                                    "Redis's data)", job_id, NO_EVICTION)
                    return
                holder["claim"] = claim
                try:
                    done = await self._attempt(job_id, claim, holder)
                except Lost as exc:
                    if str(exc) == "gone":
                        # Its record went mid-run: started again, the start finds it gone,
                        # takes its entry out of the queue and says so, where its entry
                        # stayed pending until a takeover after the lease.
                        continue
                    log.info("job %s is no longer ours (%s)", job_id, exc)
                    return
                if done:
                    return
                await asyncio.sleep(1.0)  # a failed try: give a restarting worker a moment
        finally:
            renewing.cancel()

    async def _attempt(self, job_id: str, claim: str, holder: dict[str, str]) -> bool:
        """One start of a job; False when it should be started again (an attempt used).
        ``holder`` holds the claim ``_keep_claim`` renews."""
        try:
            job = await self.store.job(job_id)
            if job is None:
                raise Lost("gone")
            status, final = await self._generate_when_possible(
                job_id, claim, json.loads(job["request"]))
        except asyncio.CancelledError:
            if self.stopping_now:
                raise
            raise Lost(holder.get("lost") or "canceled while generating") from None
        except RedisError as exc:  # a progress write (the generation was stopped: _generate)
            if not redis_fault(exc):
                raise
            return await self._hand_back_after_fault(job_id, claim, holder, exc)
        except BrokenOff as exc:
            log.warning("job %s: %s (an attempt used)", job_id, exc)
            return await self._failed_try(job_id, claim, holder, str(exc))
        except Refused as exc:
            return await self._hand_back_refused(job_id, claim, holder, exc)
        except StaysUnavailable as exc:
            return await self._hand_back_unavailable(job_id, claim, holder, exc)
        return await self._store_outcome(job_id, claim, holder, status, final)

    async def _store_outcome(self, job_id: str, claim: str, holder: dict[str, str],
                             status: int, final: dict) -> bool:
        """Store what TorchServe answered a start (``status``, its final object): the images,
        the job's failure, or the error of a try that may pass next time (False: start it
        again). A success whose finish Redis fails goes back to the queue (the hand-back).
        A failure whose writing Redis fails is written again once Redis takes it, the claim
        kept meanwhile: the run failed on its own and is over (counted once, by its start),
        where taken over after the lease it ran again, killing fresh engines again for an
        ``EngineCrashed`` request, and for nothing for one the contract refuses."""
        ttl = self.settings.result_ttl_s
        if status == 200 and "image" in final:
            images = [base64.b64decode(data) for data in final.get("images") or
                      [final["image"]]]
            result = {k: v for k, v in final.items() if k not in ("image", "images")}
            seeds = final.get("seeds") or [final.get("seed")]
            try:
                answer = await self.store.finish(job_id, claim, ttl, "succeeded", result,
                                                 seeds=seeds, images=images)
            except RedisError as exc:
                if not redis_fault(exc):
                    raise
                # Refused (nothing stored), or run with its answer lost: the hand-back, under
                # the claim, leaves a job that was stored as it is and reruns one that was not.
                return await self._hand_back_after_fault(job_id, claim, holder, exc)
        elif final_failure(status, final):
            answer, retried = await self._write_under_claim(
                job_id, claim, holder, "the write of its failure",
                lambda: self.store.finish(job_id, claim, ttl, "failed", error=final))
            if answer == "failed" and retried:
                answer = "stored"  # a try before ran, its answer lost: stored once
        else:
            # 500, or 507 "Worker died.": the next start may well succeed. Said as a broken
            # reply is, with the server's words (and our handler's request id): nothing
            # in the log told of a try that failed this way.
            message = f"HTTP {status}: {final.get('message', '')}"[:300]
            log.warning("job %s: %s (an attempt used)", job_id, message)
            return await self._failed_try(job_id, claim, holder, message)
        if answer == "gone":
            raise Lost(answer)  # its record went meanwhile: run_job says so, once
        if answer != "stored":
            log.info("job %s result not stored: the job is %s", job_id, answer)
        return True

    async def _failed_try(self, job_id: str, claim: str, holder: dict[str, str],
                          message: str) -> bool:
        """Record the error of a start that failed and may pass next time; False: start
        the job again (that start counts the attempt). ``Lost`` once the job is not ours:
        its next start is another's, or none (canceled)."""
        answer, _ = await self._write_under_claim(
            job_id, claim, holder, "the write of its error",
            lambda: self.store.record_error(job_id, claim, message))
        if answer != "ok":
            raise Lost(answer)
        return False

    async def _hand_back_refused(self, job_id: str, claim: str, holder: dict[str, str],
                                 refused: Refused) -> bool:
        """Give a job the pod's breaker refused back to the queue, its start not counted;
        take no job for ``retry_after_s``, which the hand-back records for estimated
        starts (the time left when it runs). Always True (this start is over). A
        hand-back Redis fails is tried again under the claim, as every last write of a
        start is: raised, it left the job running until its lease ran out, and the takeover
        counted."""
        self.refusing_until = time.monotonic() + refused.retry_after_s
        self.torchserve_up = False
        answer, _ = await self._write_under_claim(
            job_id, claim, holder, "its hand-back",
            lambda: self.store.requeue(
                job_id, claim, self.name, self.settings.lease_s, str(refused),
                refusing_s=max(0.0, self.refusing_until - time.monotonic())))
        log.warning("job %s handed back to the queue (%s); no job is taken for %g s",
                    job_id, refused, refused.retry_after_s)
        if answer not in ("ok", "queued"):  # queued: a try before ran, its answer lost
            log.info("job %s not handed back: the job is %s", job_id, answer)
        return True

    async def _hand_back_unavailable(self, job_id: str, claim: str, holder: dict[str, str],
                                     unavailable: StaysUnavailable) -> bool:
        """Give a job whose TorchServe stayed unavailable back to the queue, its start not
        counted; always True (this start is over). This dispatcher takes no job until its
        TorchServe is healthy again (``torchserve_up`` is off), so the job goes to one
        whose TorchServe is up, or back here once this one is."""
        self.torchserve_up = False
        answer, retried = await self._write_under_claim(
            job_id, claim, holder, "its hand-back",
            lambda: self.store.requeue(job_id, claim, self.name, self.settings.lease_s,
                                       str(unavailable)))
        if answer == "gone":
            raise Lost(answer)  # its record went meanwhile: run_job says so, once
        if answer == "ok" or (answer == "queued" and retried):
            log.warning("job %s handed back to the queue, its start not counted: %s",
                        job_id, unavailable)
        else:  # canceled or taken over meanwhile
            log.info("job %s not handed back: the job is %s", job_id, answer)
        return True

    async def _hand_back_after_fault(self, job_id: str, claim: str, holder: dict[str, str],
                                     exc: RedisError) -> bool:
        """Give a job whose start ended on a fault of Redis's back to the queue, its start not
        counted (``store.requeue``), as soon as Redis takes it; always True (this start is
        over). Meanwhile the claim is still renewed (a full Redis takes renewals, which
        write nothing new), so the job is taken over only after an outage longer than the
        lease, whoever reaches Redis first: that takeover counts, as before, and this
        hand-back is then refused (its claim is stale)."""
        # The job's events and error reach its client: the exception's type only (its
        # words name Redis's host and port); the whole of it goes to this log.
        reason = f"Redis failed the job's writes ({type(exc).__name__})"
        log.warning("job %s: %s: %s; it goes back to the queue once Redis takes it", job_id,
                    reason, exc)
        answer, retried = await self._write_under_claim(
            job_id, claim, holder, "its hand-back",
            lambda: self.store.requeue(job_id, claim, self.name, self.settings.lease_s,
                                       reason, free_redis_faults=self.settings.max_attempts))
        if answer == "ok" or (answer == "queued" and retried):
            # 'queued' after a failed try: that try ran, its answer lost (no second count).
            log.info("job %s handed back to the queue, its start not counted", job_id)
        elif answer == "counted":
            log.warning("job %s handed back to the queue with its start counted: Redis "
                        "failed its writes more than %d times", job_id,
                        self.settings.max_attempts)
        else:  # finished after all (a finish whose answer was lost), taken over, canceled
            log.info("job %s not handed back: the job is %s", job_id, answer)
        return True

    async def _write_under_claim(self, job_id: str, claim: str, holder: dict[str, str],
                                 what: str, write: Callable[[], Awaitable[str]]
                                 ) -> tuple[str, bool]:
        """``write()``'s answer (a script that ends the start under ``claim``), tried again
        every ``RETRY_REDIS_S`` while Redis fails it for reasons of its own
        (``redis_fault``), and whether an earlier try failed: that try may have run with
        only its answer lost, so the answer is then the state it left. The claim is kept
        meanwhile: renewals go on, so no dispatcher takes the job over unless the outage
        outlasts the lease; a takeover or a cancel is not this task's end but the write's
        answer (its claim is refused). Said once, then about once a minute, in this log
        alone: Redis's message names its host and port."""
        # Once the write ran, a renewal finds the job ended or queued again and would cancel
        # this task mid-write: renewals go on, cancels do not.
        holder["ending"] = claim
        tries = 0
        while True:
            tries += 1
            try:
                return await write(), tries > 1
            except RedisError as exc:
                if not redis_fault(exc):
                    raise
                if tries == 1:
                    log.warning("job %s: Redis failed %s (%s: %s); tried again until "
                                "Redis takes it", job_id, what, type(exc).__name__, exc)
                elif tries % 240 == 0:  # about once a minute while Redis stays away
                    log.warning("job %s: Redis still fails %s (%s)", job_id, what, exc)
            await asyncio.sleep(RETRY_REDIS_S)

    async def _generate_when_possible(self, job_id: str, claim: str, request: dict
                                      ) -> tuple[int, dict]:
        """Generate, waiting while TorchServe cannot take the request (503 or
        unreachable): that delays the job, it does not fail it or cost an attempt. Past a
        lease of it, with TorchServe not ``healthy``, ``StaysUnavailable``: the job is
        handed back for another dispatcher."""
        delays = iter(RETRY_UNAVAILABLE_S)
        unavailable_since = None  # monotonic: the first answer of this outage
        while True:
            try:
                status, final = await self.generate(job_id, claim, request)
            except Unavailable as exc:
                status, final = 503, {"message": str(exc)}
            if status != 503:
                return status, final
            if final.get("type") == CIRCUIT_OPEN:
                retry = final.get("retry_after_s")
                raise Refused(f"HTTP 503 {CIRCUIT_OPEN}: {final.get('message', '')}"[:300],
                              float(retry) if isinstance(retry, (int, float)) and
                              0 < retry < 3600 else CIRCUIT_RETRY_S)
            self.torchserve_up = False
            unavailable_since = unavailable_since or time.monotonic()
            waited = time.monotonic() - unavailable_since
            # Another pod may run it sooner: a TorchServe that crash-loops, or whose model
            # no longer loads, never takes it, and a restart of real SDXL takes minutes.
            # Not one that is up with its queue full (503, READY workers): every pod's is
            # then, and the job went back and forth between queued and running each lease.
            if waited >= self.settings.lease_s and not await self.healthy():
                raise StaysUnavailable(f"TorchServe has not taken the job for {waited:.0f} s "
                                       f"({final.get('message', '')[:100]})")
            delay = next(delays, RETRY_UNAVAILABLE_S[-1])
            log.info("job %s waits %.1f s: TorchServe unavailable (%s)", job_id, delay,
                     final.get("message", "")[:100])
            await asyncio.sleep(delay)

    async def _keep_claim(self, job_id: str, holder: dict[str, str],
                          worker: asyncio.Task) -> None:
        """Renew the job's current claim every ``lease_s / 3``; cancel the work once the job
        is not ours. Between renewals, look every ``CANCEL_CHECK_S`` for a cancel: a job
        waiting in TorchServe's queue relays no progress step, where a cancel is otherwise
        seen, so its flag would wait for the next renewal (10 s at the default lease) and
        its batch could start it meanwhile."""
        every = self.settings.lease_s / 3
        renew_at = time.monotonic() + every
        while True:
            await asyncio.sleep(max(0.0, min(CANCEL_CHECK_S, renew_at - time.monotonic())))
            claim = holder.get("claim")
            if claim is None:  # not started yet: nothing to renew or cancel
                renew_at = time.monotonic() + every
                continue
            if time.monotonic() >= renew_at:
                renew_at = time.monotonic() + every
                try:
                    answer = await self.store.renew(job_id, claim, self.name)
                except Exception as exc:  # noqa: BLE001 - Redis restarting: renew next time
                    self.redis_faults.warning(f"could not renew job {job_id}: "
                                              f"{reason_to_log(exc)}")
                    continue
            else:
                try:
                    answer = await self.store.status(job_id)
                except Exception:  # noqa: BLE001 - Redis restarting: the renewal says it
                    continue
                if answer != "canceled":
                    continue
            if answer != "ok" and holder.get("claim") == claim and \
                    holder.get("ending") != claim:
                if answer == "gone":
                    holder["lost"] = answer  # its record went: run_job says so, once
                worker.cancel()
                return

    # --- The loop. -------------------------------------------------------------------
    async def _groups_at_start(self, stop: asyncio.Event) -> int | None:
        """``store.ensure_groups`` (how many queued jobs were put back in the stream), asked
        again every REDIS_WAIT_AT_START_S while Redis fails it for reasons of its own, said
        once (``redis_faults``); None when told to stop while Redis fails it. Its first
        write: a Redis that answers PING but refuses writes (full: OOM; a read-only replica
        after a failover; MISCONF) or went away since, ended the start with a traceback,
        exit 1, and a pod in crash-loop back-off for up to 5 minutes after Redis took writes
        again. Asked at least once, as before: a dispatcher told to stop as it starts still
        mends the queue a lost stream left (``enter_again``)."""
        while True:
            try:
                _, entered = await self.store.ensure_groups()
            except Exception as exc:  # noqa: BLE001 - redis_fault sorts them
                if not redis_fault(exc):
                    raise
                self.redis_faults.warning(f"the job queue's consumer groups cannot be checked "
                                          f"at the start: {reason_to_log(exc)}; asked again "
                                          f"every {REDIS_WAIT_AT_START_S:g} s")
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), REDIS_WAIT_AT_START_S)
                if stop.is_set():
                    return None
                continue
            self.redis_faults.ended("Redis answers again")
            return entered

    async def run(self, stop: asyncio.Event) -> None:
        entered = await self._groups_at_start(stop)
        if entered is None:
            log.info("stopped while Redis refused the start, before taking any job")
            return
        if entered:
            log.warning("%d queued job(s) whose stream entries were gone (Redis evicted the "
                        "stream, or lost its data) put back in it", entered)
        if self.settings.cancel_dir:
            # A dispatcher of this host killed mid-call (SIGKILL, OOM) left its calls
            # generating in TorchServe for nobody: their jobs are taken over and run again.
            try:
                orphaned = flag_orphaned_calls(self.settings.cancel_dir)
            except OSError as exc:  # unwritable: said at the first call's flag too
                log.warning("the calls a killed dispatcher left in flight could not be "
                            "flagged: %s", exc)
                orphaned = 0
            if orphaned:
                log.warning("flagged %d call(s) a killed dispatcher left in flight: their "
                            "generation stops at its next step", orphaned)
        # Webhooks need no TorchServe: they are sent from the start, while the model loads
        # (minutes), so a pod KEDA brought up for webhook events alone sends them at once,
        # and a model that never loads does not hold them.
        background = [asyncio.create_task(delivery_loop(self.store, self.settings, self.name,
                                                        stop, self.redis_faults))]
        try:
            described = await self._describe_until_ready(stop)
            capacity = self.capacity or described.get("capacity") or 4
            log.info("dispatcher %s: capacity %d jobs in flight", self.name, capacity)
            background += [asyncio.create_task(self._check_in_loop(stop)),
                           asyncio.create_task(self._publish_model(stop))]
            while not stop.is_set():
                room = capacity - len(self.in_flight)
                if room <= 0:
                    await asyncio.wait(self.in_flight.values(), timeout=1.0,
                                       return_when=asyncio.FIRST_COMPLETED)
                    continue
                if not self.torchserve_up:
                    self.torchserve_up = await self.healthy()
                    if not self.torchserve_up:
                        await asyncio.sleep(1.0)
                        continue
                try:
                    await self._release_reclaimed()
                    jobs = await self.store.abandoned_jobs(self.name, self.settings.lease_s,
                                                           room)
                    if not jobs:
                        jobs = await self.store.next_jobs(self.name, room, block_ms=1000)
                except Exception as exc:  # noqa: BLE001 - Redis restarting: keep trying
                    self.redis_faults.warning(f"queue unreachable: {reason_to_log(exc)}")
                    await asyncio.sleep(1.0)
                    continue
                self.redis_faults.ended("Redis answers again")
                # Started now, a job would wait in this dispatcher for this TorchServe,
                # "running" with an attempt counted, while other pods could run it.
                if jobs and not await self.healthy():
                    self.torchserve_up = False
                    await self._hand_back(jobs)
                    continue
                self._take(jobs)
            if self.in_flight:
                # Told to stop: finish what is in flight (TorchServe drains alongside),
                # for up to drain_s; whatever is left then stays pending (below).
                log.info("stopping: finishing %d job(s) for up to %.0f s", len(self.in_flight),
                         self.settings.drain_s)
                await asyncio.wait(self.in_flight.values(), timeout=self.settings.drain_s)
                # Said, or the log ended at "stopping" with no word of the jobs left.
                if self.in_flight:
                    log.warning("stopping with %d job(s) unfinished after SDXL_JOBS_DRAIN_S "
                                "(%g s): %s; each is taken over by a dispatcher after "
                                "SDXL_JOBS_LEASE_S (%g s) and generated again from the start",
                                len(self.in_flight), self.settings.drain_s,
                                ", ".join(self.in_flight), self.settings.lease_s)
                else:
                    log.info("stopping: every job in flight finished")
        finally:
            stop.set()  # an error ended the loop: every loop of this process ends too
            for task in background:
                task.cancel()
            # Jobs still in flight stay pending in Redis: another dispatcher takes them over.
            self.stopping_now = True
            tasks = list(self.in_flight.values())
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, *background, return_exceptions=True)
            try:
                await self.store.check_out(self.name)
            except Exception:  # noqa: BLE001 - Redis gone too: its entry just ages out
                pass
            await self.client.aclose()

    def _take(self, jobs: list[tuple[str, str]]) -> None:
        """Start a task for each job read, but for those whose task still runs here."""
        for entry, job_id in jobs:
            if job_id in self.in_flight:
                # Its idle time ran out under us: still ours while its task runs. But that
                # task may have just handed it back (idle set to the lease, for any
                # dispatcher): this claim reset its idle time, and it would wait a whole
                # lease more. So it is handed back again once the task has ended.
                self.reclaimed[job_id] = entry
                continue
            task = asyncio.create_task(self._guarded(entry, job_id))
            self.in_flight[job_id] = task
            task.add_done_callback(lambda _, done=job_id: self._ended(done))

    def _ended(self, job_id: str) -> None:
        # _take starts no second task for a job in flight: the one ended was the job's.
        self.in_flight.pop(job_id, None)
        entry = self.reclaimed.pop(job_id, None)
        if entry is not None:
            self.to_release.append(entry)

    async def _release_reclaimed(self) -> None:
        """Hand back the entries claimed again under a task that has since ended. Those the
        task finished or lost are no longer this dispatcher's pending ones: untouched."""
        if self.to_release:
            entries, self.to_release = self.to_release, []
            try:
                await self.store.release(self.name, entries, self.settings.lease_s)
            except Exception:
                self.to_release = entries + self.to_release  # at the next read
                raise

    async def _hand_back(self, jobs: list[tuple[str, str]]) -> None:
        """Leave jobs read while TorchServe is down unstarted and make them any
        dispatcher's at its next read."""
        entries = [entry for entry, job_id in jobs if job_id not in self.in_flight]
        if not entries:
            return
        try:
            await self.store.release(self.name, entries, self.settings.lease_s)
        except Exception as exc:  # noqa: BLE001 - still pending: taken over after lease_s
            log.warning("TorchServe is down and %d job(s) read could not be handed back "
                        "(%s): another dispatcher takes them after lease_s", len(entries), exc)
            return
        log.info("TorchServe is down: %d job(s) read and not started, handed back for a "
                 "dispatcher whose TorchServe is up", len(entries))

    async def _guarded(self, entry: str, job_id: str) -> None:
        try:
            await self.run_job(entry, job_id)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - the job stays pending; another start retries
            log.exception("job %s: dispatcher error", job_id)

    async def _describe_until_ready(self, stop: asyncio.Event) -> dict:
        while not stop.is_set():
            try:
                described = await self.describe()
            except Exception as exc:  # noqa: BLE001 - starting or restarting: wait for it
                self._not_ready(self.keys.management_address, exc, logging.INFO,
                                "waiting for TorchServe")
                await asyncio.sleep(1.0)
                continue
            self._resolved()
            return described
        return {}

    async def _publish_model(self, stop: asyncio.Event) -> None:
        """Publish the served model's bounds for the API's validation, then keep them
        published: Redis that lost its data (restarted without persistence, flushed) has
        none, and the API would validate against SDXL's default bounds until a dispatcher
        restarted. Put back only when missing, so the latest dispatcher to start (a new
        model version rolling out) still has the last word."""
        info = None
        while not stop.is_set():
            try:
                if info is None:
                    described = await self.describe(customized=True)
                    if described.get("limits"):
                        info = {"limits": described["limits"],
                                "version": described["version"]}
                        await self.store.publish_model(info)
                        self._check_cancel_dir(described)
                elif await self.store.publish_model(info, if_missing=True):
                    log.warning("the model's bounds were gone from Redis (it lost its "
                                "data?): published again")
            except RedisError as exc:
                # Once a minute, as the outage's other lines: at INFO every 5 s it went on
                # for the whole outage, beside the one line each of the others says.
                self.redis_faults.warning(f"model bounds not published: "
                                          f"{reason_to_log(exc)}")
            except Exception as exc:  # noqa: BLE001 - TorchServe busy or restarting: ask again
                log.info("model bounds not published: %s", exc)
            await asyncio.sleep(2.0 if info is None else CHECK_IN_EVERY_S)

    def _check_cancel_dir(self, described: dict) -> None:
        """Warn when this dispatcher's cancel flags would go where no worker looks."""
        if not self.settings.cancel_dir:
            return
        probe = described.get("cancel_probe")
        if not described.get("cancel_flags"):
            log.warning("TorchServe's worker watches no cancel directory (SDXL_CANCEL_DIR): "
                        "a canceled job's generation runs to its end")
        elif probe and not os.path.exists(os.path.join(self.settings.cancel_dir, probe)):
            log.warning("TorchServe's worker watches another cancel directory than "
                        "SDXL_JOBS_CANCEL_DIR %s (its file %s is not there): a canceled "
                        "job's generation runs to its end", self.settings.cancel_dir, probe)

    async def _check_in_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.store.check_in(self.name)
                # Gone dispatchers' consumers: any live dispatcher removes them.
                gone = await self.store.prune_consumers(self.settings.consumer_idle_s,
                                                        self.name)
                if gone:
                    log.info("removed %d consumer(s) of dispatchers gone for over %.0f s: "
                             "%s", len(gone), self.settings.consumer_idle_s,
                             ", ".join(gone)[:300])
            except Exception as exc:  # noqa: BLE001
                self.redis_faults.warning(f"check-in failed: {reason_to_log(exc)}")
            else:
                self.redis_faults.ended("Redis answers again")
            await asyncio.sleep(CHECK_IN_EVERY_S)


class StoppedWaiting(BaseException):
    """SIGTERM or SIGINT while the dispatcher waits for its Redis at its start. Not an
    ``Exception``: redis-py turns those into connection errors, which the wait retries."""


def _stop_waiting(signum: int, _frame: object) -> NoReturn:
    raise StoppedWaiting(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("sdxl_jobs.dispatcher", __doc__)
    parser.add_argument("--torchserve", help="TorchServe's inference address "
                                             "(TS_INFERENCE_ADDRESS, else http://127.0.0.1:8080)")
    parser.add_argument("--management", help="its management address (TS_MANAGEMENT_ADDRESS, "
                                             "else http://127.0.0.1:8081)")
    parser.add_argument("--key-file", required=True, help="TorchServe's key_file.json")
    parser.add_argument("--model", default="sdxl")
    parser.add_argument("--capacity", type=int, default=0,
                        help="jobs in flight; 0: TorchServe's batchSize x workers")
    parser.add_argument("--name", default=None, help="consumer name (default host-pid)")
    args = parser.parse_args(argv)
    args.torchserve = server_address(parser, "--torchserve", args.torchserve,
                                     "TS_INFERENCE_ADDRESS", "http://127.0.0.1:8080")
    args.management = server_address(parser, "--management", args.management,
                                     "TS_MANAGEMENT_ADDRESS", "http://127.0.0.1:8081")
    if args.capacity < 0:
        parser.error(f"--capacity must be 0 (TorchServe's batchSize x workers) or more, got "
                     f"{args.capacity}")
    settings = JobSettings.of_command(parser, args.redis)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per call is noise
    if problem := unusable_proxy():
        parser.error(problem)  # webhooks alone: TorchServe is called without a proxy
    if settings.cancel_dir and not os.path.isdir(settings.cancel_dir):
        # Its flags would go nowhere: canceled jobs would seem to stop and run to their end.
        parser.error(f"SDXL_JOBS_CANCEL_DIR {settings.cancel_dir!r} is not a directory")
    # Until serve() takes them over. The pod runs python as its PID 1 (dispatcher.yaml),
    # which gets no signal it has no handler for: waiting for Redis, the dispatcher ignored
    # SIGTERM and held the pod's termination for its grace period (Ctrl-C ended it with a
    # traceback). It has taken no job yet: it just ends.
    previous = {signum: signal.signal(signum, _stop_waiting)
                for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        usable = usable_at_start(settings.redis_url, "exiting", wait_s=REDIS_WAIT_AT_START_S,
                                 no_aof_ok=settings.redis_no_aof_ok)
    except StoppedWaiting as stopped:
        log.info("stopped by %s while waiting for Redis, before taking any job", stopped)
        return 0
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if not usable:
        return 1  # as before, when its first command failed with a traceback
    store = JobStore.from_url(settings.redis_url)
    dispatcher = Dispatcher(store, settings, args.torchserve,
                            KeyFile(args.key_file, args.management), args.model,
                            args.capacity, args.name)

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        try:
            await dispatcher.run(stop)
        finally:
            await store.close()

    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())

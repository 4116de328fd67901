#!/usr/bin/env python3
"""Serve the job API in the foreground: Redis, TorchServe, a dispatcher and the API.

Ctrl-C (or SIGTERM) stops all of them, Java included; killed outright (SIGKILL), it takes
them with it (each is started from this main thread, the only one, so the kernel SIGTERMs
it when this process dies: ``ended_with_this_process``). Redis is our own private one under
build/run/jobs/redis (append-only, password in a mode-600 file; jobs survive a restart)
unless SDXL_REDIS_URL names yours, on 127.0.0.1 at SDXL_REDIS_PORT (a free port when
unset). TorchServe starts as `make serve` starts it (the same archive, TS_* addresses,
TMPDIR); the dispatcher runs as its own process (`python -m sdxl_jobs.dispatcher ...`), so
it can be killed alone, and it, the API and our Redis are started again when they exit (our
Redis on the same port; three exits within a minute stop everything, and so does our Redis
failing to start again, at once, but our Redis exited on a full disk waits for room; a
TorchServe that exits stops everything at once); the API
listens on SDXL_JOBS_ADDRESS (default http://127.0.0.1:8090). An API key is made on the
first start into build/run/jobs/api-key (mode 600) and kept.

Usage: python scripts/serve_jobs.py [--model-dir DIR] [--name sdxl] [--version 1.0]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shlex
import sys
import time
from pathlib import Path
from typing import Mapping

REPO = Path(__file__).resolve().parents[1]
# This checkout's code first, not the checkout a shared venv's editable install names.
sys.path[:0] = [str(REPO / "handler"), str(REPO / "jobs"), str(REPO / "scripts")]
from sdxl_serve.server import (TORCHSERVE_PACKAGES, cancel_on_signals,  # noqa: E402
                               refuse_missing_packages)

if __name__ == "__main__":
    cancel_on_signals("start")  # before the imports of torch below (seconds)
    # TorchServe's, and the job API's (it runs this Python too).
    refuse_missing_packages({**TORCHSERVE_PACKAGES, "redis": "redis", "fastapi": "fastapi",
                             "uvicorn": "uvicorn", "httpx": "httpx"})

from redis.exceptions import RedisError  # noqa: E402

from sdxl_jobs.keys import KeyFileError, ensure_key, write_private  # noqa: E402
from sdxl_jobs.processes import (  # noqa: E402
    REWRITE_EVERY_S, Managed, RedisServer, StartError, api_process, dispatcher_process,
    wait_http)
from sdxl_jobs.settings import JobSettings, redacted_url  # noqa: E402
from sdxl_jobs.store import JobStore, reason_to_log, unusable  # noqa: E402
from sdxl_serve.server import (HTTP_ADDRESS, Addresses, ServerError, StartCancelled,  # noqa: E402
                               address_setting, check_distinct_ports, listen_setting,
                               listen_settings, port_setting, private_folder)
from build_archive import add_archive_arguments  # noqa: E402
from serve import (drop_previous_record, prepare_archive, refuse_taken,  # noqa: E402
                   refuse_taken_ports, refuse_unloadable_settings, run_dir_of, say,
                   say_last_default, stop_on_signals, torchserve_process)

ENVIRONMENT = ("TS_INFERENCE_ADDRESS / TS_MANAGEMENT_ADDRESS / TS_METRICS_ADDRESS as for "
               "serve.py; SDXL_JOBS_ADDRESS: the job API (default http://127.0.0.1:8090); "
               "SDXL_REDIS_URL: your Redis instead of ours; SDXL_REDIS_PORT: our Redis's port "
               "on 127.0.0.1 (default a free one); SDXL_REDIS_REWRITE_S: how often at most our Redis "
               "rewrites its append-only file to drop expired jobs (default 900). See "
               "docs/jobs.md.")


def forget_empty_secret(path: Path) -> None:
    """Remove ``path`` where it holds nothing but blanks, so that the secret is made again
    as at a first start: an older make serve-jobs on a full disk left its secret files made
    and empty, and an empty password was read as ours (Redis then got a new random one at
    each start, kept nowhere) and an empty key file was refused at every start."""
    try:
        if path.exists() and not path.read_text(errors="replace").strip():
            path.unlink()
    except OSError as exc:
        raise StartError(f"cannot replace the empty {path}: {exc.strerror or exc}") from None


def secret_file(path: Path) -> str:
    """A random secret kept in a mode-600 file, made on first use (and again where the file
    is empty: ``forget_empty_secret``); ``StartError`` naming the file when it cannot be (a
    full disk), where that was a traceback."""
    forget_empty_secret(path)
    try:
        if not path.exists():
            write_private(path, secrets.token_hex(24) + "\n")
    except OSError as exc:
        raise StartError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise StartError(f"cannot read {path}: {exc.strerror or exc}") from None


async def serve_jobs_key(redis_url: str, key_file: Path) -> None:
    """The API key in ``key_file``, registered on the Redis at ``redis_url``; a new one
    where there is none (or the file is empty: ``forget_empty_secret``). ``StartError``
    naming the file when it cannot be written (a full disk: no key registered then)."""
    forget_empty_secret(key_file)
    store = JobStore.from_url(redis_url)
    try:
        await ensure_key(store, "serve-jobs", key_file)
    except OSError as exc:
        raise StartError(f"the API key file {key_file}: {exc.strerror or exc}") from None
    finally:
        await store.close()


def own_redis_port(env: Mapping[str, str]) -> int | None:
    """The port of the Redis this script starts itself, on 127.0.0.1: ``SDXL_REDIS_PORT``, or
    None for a free one. A fixed port is for what finds Redis from outside (a firewall rule,
    redis-cli, a dashboard) and for a URL that stays the same from one start to the next.

    Raises:
        ValueError: naming the variable, its value and the rule; also when SDXL_REDIS_URL is
            set, where no Redis of ours starts and the port would be ignored without a word.
    """
    port = port_setting(env, "SDXL_REDIS_PORT")
    if port is not None and env.get("SDXL_REDIS_URL"):
        raise ValueError(f"SDXL_REDIS_PORT={port} is the port of the Redis make serve-jobs "
                         f"starts, and with SDXL_REDIS_URL set it starts none: unset one of "
                         f"them")
    return port


def own_redis_rewrite_s(env: Mapping[str, str]) -> float:
    """How often at most our Redis rewrites its append-only file, dropping expired jobs:
    ``SDXL_REDIS_REWRITE_S`` (seconds), ``REWRITE_EVERY_S`` when unset.

    Raises:
        ValueError: naming the variable, its value and the rule; also beside SDXL_REDIS_URL,
            where no Redis of ours starts and it would be ignored without a word.
    """
    text = env.get("SDXL_REDIS_REWRITE_S", "").strip()
    if not text:
        return REWRITE_EVERY_S
    try:
        seconds = float(text)
    except ValueError:
        seconds = 0.0
    if not 1 <= seconds <= 86400:
        raise ValueError(f"SDXL_REDIS_REWRITE_S must be a number of seconds from 1 to 86400, "
                         f"got {text!r}")
    if env.get("SDXL_REDIS_URL"):
        raise ValueError(f"SDXL_REDIS_REWRITE_S={text} is for the Redis make serve-jobs "
                         f"starts, and with SDXL_REDIS_URL set it starts none: unset one of "
                         f"them (SDXL_JOBS_REDIS_REWRITE_S has the job API ask a Redis of "
                         f"yours)")
    return seconds


def job_listen_settings(addresses: Addresses, address: str, redis_port: int | None
                        ) -> list[tuple[str, str, int]]:
    """What this start listens on, as (what to call it, host, port): TorchServe's three, the
    job API's and, when set, our Redis's."""
    return [*listen_settings(addresses), listen_setting("SDXL_JOBS_ADDRESS", address),
            *redis_setting(redis_port)]


def redis_setting(redis_port: int | None) -> list[tuple[str, str, int]]:
    return [(f"SDXL_REDIS_PORT {redis_port}", "127.0.0.1", redis_port)] if redis_port else []


def refuse_taken_job_ports(address: str, redis_port: int | None) -> bool:
    """Say so, and True, when the job API's address or the port asked for our Redis is taken
    (a system Redis on 6379, another serve-jobs) or not ours to listen on: each would exit
    at once, the reason only in its log (the API's after TorchServe had started)."""
    return any([refuse_taken([listen_setting("SDXL_JOBS_ADDRESS", address)],
                             "SDXL_JOBS_ADDRESS"),
                refuse_taken(redis_setting(redis_port),
                             "SDXL_REDIS_PORT (unset, our Redis takes a free port)")])


def curl_lines(address: str, key_file: Path) -> str:
    """Lines that work as printed, pasted one after another into a shell."""
    # Quoted: a checkout under a folder with a space (`My Projects`) split the path, and
    # every line went out without a key.
    key_path = shlex.quote(str(key_file))
    # The key reaches curl on its standard input (`-H @-`, docs/security.md), not in its
    # arguments, where every user of the machine reads it (`ps`).
    curl = f"sed 's/^/Authorization: Bearer /' {key_path} | curl"
    return "\n".join([
        "submit (answers 202 with the job; JOB keeps its id):",
        f"  JOB=$({curl} -s -H @- -H 'Content-Type: application/json' "
        f"-d '{{\"prompt\": \"a lighthouse at dawn\", \"seed\": 42}}' {address}/v1/jobs "
        f"| python3 -c 'import json,sys;print(json.load(sys.stdin)[\"id\"])'); echo $JOB",
        "watch (Server-Sent Events until it ends):",
        f"  {curl} -sN -H @- {address}/v1/jobs/$JOB/events",
        "the job, then its image:",
        f"  {curl} -s -H @- {address}/v1/jobs/$JOB",
        f"  {curl} -s -H @- -o out.png {address}/v1/jobs/$JOB/images/0",
        "cancel (a queued or running job):",
        f"  {curl} -s -X DELETE -H @- {address}/v1/jobs/$JOB",
        "the command-line client:",
        f"  python3 scripts/generate.py --async --jobs-url {address} --api-key-file "
        f"{key_path} 'a lighthouse at dawn'",
    ])


def keys_lines(redis_port: int | None, password_file: Path) -> str:
    """The line that makes another API key, for our Redis (``redis_port``, its password read
    from ``password_file`` as the line runs: not on the screen, nor on a command line), or
    for the one SDXL_REDIS_URL names (None): the URL changes with each start of ours (a free
    port), and without it a person had to piece it together to make a key."""
    python = shlex.quote(sys.executable)
    if redis_port is None:
        return ("another API key (SDXL_REDIS_URL set in your shell, as for this start):\n"
                f"  {python} -m sdxl_jobs.keys create --name team-a")
    url = f"redis://:$(cat {shlex.quote(str(password_file))})@127.0.0.1:{redis_port}/0"
    return ("another API key (for a person or a client of its own; `list`, `revoke`: "
            "docs/jobs.md):\n"
            f'  SDXL_REDIS_URL="{url}" {python} -m sdxl_jobs.keys create --name team-a')


class Restarts:
    """The parts that serve-jobs starts again when they exit (``look``, each second).

    Three exits of one within a minute is a part that cannot run, and our Redis failing to
    start again needs a person (its port taken, its append-only file damaged): either stops
    everything. Our Redis exited on a full disk (``RedisServer.short_of_room``) waits for
    room instead, said once, that exit not counted: it exits at the first write its disk
    refuses (``appendfsync always``), so it was started again only to die at the next
    write, and the third exit stopped everything, TorchServe and the running jobs included.
    """

    def __init__(self, watched: list[tuple[str, Managed]], redis: RedisServer | None):
        self.watched = watched
        self.redis = redis
        self.exits: dict[str, list[float]] = {name: [] for name, _ in watched}
        self.waiting_for_room = False

    def look(self) -> int | None:
        """Start again what exited; the exit code to stop everything with, or None."""
        for name, process in self.watched:
            if process.running():
                continue
            if process is self.redis:
                short = self.redis.short_of_room()
                if short:
                    if not self.waiting_for_room:
                        print(f"Redis exited: {short}. Every job it accepted is kept in its "
                              f"append-only file; meanwhile the API answers 503 and running "
                              f"jobs wait to be written. It is started again once there is "
                              f"room", file=sys.stderr, flush=True)
                        self.waiting_for_room = True
                    continue
            now = time.monotonic()
            if not (process is self.redis and self.waiting_for_room):  # the disk's exit
                self.exits[name] = [at for at in self.exits[name] if now - at < 60] + [now]
            if len(self.exits[name]) >= 3:
                print(f"{name} exited 3 times within a minute; see "
                      f"{process.log_path}", file=sys.stderr)
                return 1
            process.stop(timeout=5)  # what is left of its process group
            try:
                process.start()
            except StartError as exc:
                # What keeps it from starting (its port taken, its append-only file
                # damaged) needs a person, not a wait, and without Redis the API answers
                # only 503s: stop, saying what is kept.
                kept = (f" (every job it accepted is in its append-only file in "
                        f"{process.data_dir}, for the next start)"
                        if process is self.redis else "")
                print(f"error: {name} exited and could not be started again, so "
                      f"everything stops{kept}: {exc}", file=sys.stderr)
                return 1
            if process is self.redis and self.waiting_for_room:
                self.waiting_for_room = False
                print(f"Redis started again: its disk has room (pid {process.pid})",
                      file=sys.stderr, flush=True)
                continue
            print(f"{name} exited; started it again (pid {process.pid}; see "
                  f"{process.log_path})", file=sys.stderr, flush=True)
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog=ENVIRONMENT)
    add_archive_arguments(parser)
    parser.add_argument("--run-dir", type=Path, default=REPO / "build" / "run")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the archive")
    args = parser.parse_args(argv)
    # Ctrl-C and SIGTERM end any wait below at once; everything started is stopped.
    stopping = stop_on_signals()

    try:
        addresses = Addresses.from_env()
        address = address_setting(os.environ, "SDXL_JOBS_ADDRESS", "http://127.0.0.1:8090",
                                  HTTP_ADDRESS)
        redis_port = own_redis_port(os.environ)
        rewrite_s = own_redis_rewrite_s(os.environ)
        check_distinct_ports(job_listen_settings(addresses, address, redis_port))
        # The API's and the dispatcher's settings (SDXL_REDIS_URL, SDXL_JOBS_*), as each
        # checks them at its start, in its own log, started again and again: there a bad
        # one was found after Redis and TorchServe had started (a model's load) and said
        # as 30 lines of the API's log. Here once, before anything is built. An empty
        # SDXL_REDIS_URL is unset: they get our Redis's URL.
        JobSettings.from_env({**os.environ, "SDXL_REDIS_URL": os.environ.get("SDXL_REDIS_URL")
                              or JobSettings.redis_url})
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # Before anything is built or made: a server already there would only fail to bind.
    # All said at once, so one start names every port to move.
    if any([refuse_taken_ports(addresses), refuse_taken_job_ports(address, redis_port)]):
        return 2
    # 1. The archive, as `make serve` builds it.
    say_last_default(run_dir_of(addresses, None, args.run_dir), args.name,
                     args.version, "make serve-jobs")
    mar = prepare_archive(args.name, args.version, args.model_dir, args.model_store,
                          args.rebuild)
    if mar is None:
        return 2
    jobs_dir = args.run_dir / "jobs"
    server = torchserve_process(args.name, mar, args.model_store, runs=args.run_dir)
    addresses, ts_run = server.addresses, server.run_dir
    # Where the dispatcher drops a canceled job's flag for TorchServe's worker to see. Its
    # names are request ids (flags, calls in flight): the owner's alone, as the run dirs.
    cancel_dir = jobs_dir / "cancel"
    private_folder(cancel_dir)
    server.extra_env["SDXL_CANCEL_DIR"] = str(cancel_dir)
    if refuse_unloadable_settings(mar, server.env):  # with this cancel_dir, not the shell's
        return 2
    redis = None
    redis_url = os.environ.get("SDXL_REDIS_URL")
    children = []
    # Again, after a build that may have taken minutes.
    if any([refuse_taken_ports(addresses), refuse_taken_job_ports(address, redis_port)]):
        return 2
    try:
        # 2. Redis (ours unless SDXL_REDIS_URL), and the API key.
        if not redis_url:
            # Started again on the same port when it exits (below): the API and the
            # dispatcher keep their URL.
            redis = RedisServer(jobs_dir / "redis", port=redis_port,
                                password=secret_file(jobs_dir / "redis-password"),
                                stop=stopping, rewrite_every_s=rewrite_s)
            print(f"starting Redis on 127.0.0.1:{redis.port} (data in {redis.data_dir}) ...",
                  flush=True)
            redis.start()
            redis_url = redis.url
        else:
            print(f"using Redis at {redacted_url(redis_url)} (SDXL_REDIS_URL) ...", flush=True)
        key_file = jobs_dir / "api-key"
        asyncio.run(serve_jobs_key(redis_url, key_file))
        # 3. TorchServe, then the dispatcher that feeds it and the API.
        print(f"starting TorchServe (logs in {ts_run}/logs) ...", flush=True)
        server.start()
        # The first failed load ends the start with the worker's exception, as make serve.
        # Its version too: a failed load of a version with a `_` (2_0) went unseen
        # for the whole timeout by the model's name alone (LoadWatch).
        server.wait_ready(f"{args.name}/{args.version}", timeout=900, stop=stopping)
        drop_previous_record(ts_run)
        dispatcher = dispatcher_process(redis_url, addresses.inference, addresses.management,
                                        ts_run / "key_file.json",
                                        jobs_dir / "dispatcher.log", model=args.name,
                                        env={"SDXL_JOBS_CANCEL_DIR": str(cancel_dir),
                                             # Within the 10 s its stop waits before SIGKILL:
                                             # its log's "finishing N job(s) for up to X s"
                                             # would promise 120 s (the pods' default).
                                             "SDXL_JOBS_DRAIN_S": os.environ.get(
                                                 "SDXL_JOBS_DRAIN_S", "8")})
        api = api_process(redis_url, address, jobs_dir / "api.log")
        children = [dispatcher, api]
        for child in children:
            child.start()
        wait_http(f"{address}/v1/health", 120, api, stop=stopping)
        print(f"\nREADY: job API at {address} (TorchServe {addresses.inference}, model "
              f"{args.name} v{args.version})\nAPI key: {key_file}\n"
              f"{curl_lines(address, key_file)}\n"
              f"{keys_lines(redis.port if redis else None, jobs_dir / 'redis-password')}\n"
              f"dispatcher: pid {dispatcher.pid}, log {dispatcher.log_path}\n"
              f"playground: {address}/ (in a browser; paste the API key once)\n"
              f"metrics: {address}/metrics\nCtrl-C stops everything.", flush=True)
        # 4. Foreground until Ctrl-C. The dispatcher, the API and our Redis are started
        # again when they exit (a crash, or a person who killed one): jobs wait in Redis
        # meanwhile (its append-only file has every accepted one), and a running one is
        # taken over once its lease ends. Three exits within a minute is a part that cannot
        # run: stop everything. Our Redis rewrites its append-only file now and then, so an
        # expired job's prompt and images leave the disk too (RedisServer.forget_expired).
        watched = [("the dispatcher", dispatcher), ("the API", api)]
        if redis is not None:
            watched.append(("Redis", redis))
        restarts = Restarts(watched, redis)
        while not stopping.wait(1.0):
            code = restarts.look()
            if code is not None:
                return code
            if server.process.poll() is not None:
                print(f"TorchServe exited; see {server.log_path}", file=sys.stderr)
                return 1
            if redis is not None:
                redis.forget_expired()
    except StartCancelled:
        print("start cancelled", file=sys.stderr, flush=True)
        return 130
    except (ServerError, StartError, KeyFileError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except RedisError as exc:  # the API key's: a wrong password or CA, no Redis there
        print(f"error: {unusable(redis_url, reason_to_log(exc))}", file=sys.stderr)
        return 1
    finally:
        say("stopping ...")
        for child in children:
            child.stop()
        server.stop()
        if redis is not None:
            redis.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

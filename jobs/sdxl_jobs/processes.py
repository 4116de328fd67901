"""Start and stop the job stack's processes: Redis, the API, dispatchers.

Used by ``scripts/serve_jobs.py``, the tests and the benchmark. Each process runs in its
own session and is stopped with its whole process group (SIGTERM, then SIGKILL), so nothing
outlives its owner, even after a failed start; an owner killed outright (SIGKILL, the OOM
killer) has the kernel SIGTERM them, as TorchServe's Java is (``ended_with_this_process``).

Example:
    redis = RedisServer(Path("build/run/jobs/redis"))
    redis.start(); ...; redis.stop()
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Mapping, Sequence

import redis
from redis.exceptions import RedisError

from sdxl_jobs.keys import write_private
from sdxl_jobs.retention import RewriteRefused, forget_expired
from sdxl_serve.management import KEY_UMASK
from sdxl_serve.server import (StartCancelled, ended_with_this_process, free_port,
                               last_lines, private_folder, private_log)


class StartError(RuntimeError):
    """A process did not start, or did not answer in time."""


class Managed:
    """One child process in its own session, stopped with its whole group."""

    def __init__(self, command: Sequence[str], log_path: Path,
                 env: Mapping[str, str] | None = None, cwd: Path | None = None):
        self.command = list(command)
        self.log_path = log_path
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.process: subprocess.Popen | None = None
        # Where this start's lines begin in the log, which every start appends to.
        self.logged_from = 0

    def start(self) -> None:
        # The owner's alone, as TorchServe's run directory is: the job store's data (every
        # job's prompt and images, kept in Redis's append-only file after the job expires,
        # until Redis rewrites it) and the logs beside it were readable by every local user.
        private_folder(self.log_path.parent)
        with private_log(self.log_path) as log:
            self.logged_from = log.seek(0, os.SEEK_END)
            # Its own session keeps a Ctrl-C at the owner's terminal from reaching it (the
            # owner stops it in order); so nothing but the kernel would end it when the
            # owner is killed outright. Umask 077: what it writes is the owner's too.
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT,
                                            env=self.env, cwd=self.cwd,
                                            start_new_session=True, umask=KEY_UMASK,
                                            preexec_fn=ended_with_this_process())

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self, signum: int = signal.SIGKILL) -> None:
        """Signal the whole group (a crash, for tests) without waiting."""
        if self.process is not None:
            try:
                os.killpg(self.process.pid, signum)
            except ProcessLookupError:
                pass

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the group, SIGKILL what is left after ``timeout``; safe to call twice."""
        if self.process is None:
            return
        self.kill(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        self.kill(signal.SIGKILL)  # stragglers in the group, or a process that ignored TERM
        self.process.wait(timeout=timeout)
        self.process = None

    def tail(self, lines: int = 30) -> str:
        """The last ``lines`` of what this start logged: the log's lines before it, an
        earlier start's error among them, would read as this one's."""
        return "\n".join(last_lines(self.log_path, lines, self.logged_from))


# How often at most our Redis rewrites its append-only file to drop what expired (its
# owner calls ``RedisServer.forget_expired`` every second or so). A rewrite writes the whole
# store again: measured on 2 cores (Redis 7.0, 1.5 MB images), 5.6 s and a 13 ms fork per GB,
# a submit's write 0.28 ms on average during it instead of 0.09 ms. One GPU's hour of 1024 px
# images (the default TTL, about 5 GB) is then a 30 s rewrite; every 15 minutes that writes
# about as much again as the jobs themselves do, and an expired prompt stays on disk 15
# minutes at most, where Redis's own trigger (the file doubled and over 64 MB) never comes
# on a quiet server.
REWRITE_EVERY_S = 900.0


# Our Redis, exited on a disk with less room than this, waits for it before it is started
# again. Its `appendfsync always` has it exit at the first write its disk refuses (Redis's
# own rule: the write's reply is already owed), so started again on a full disk it died at
# the next write (a dispatcher's check-in, within seconds), three exits within a minute
# stopped everything, and a start whose own config write was refused was a traceback. A
# job's images are a few MB; a rewrite of the append-only file needs the whole store again.
REDIS_ROOM_BYTES = 64 * 1024 * 1024


# What Redis puts before each line it logs: `pid:role day month year time level `.
REDIS_LOG_HEAD = re.compile(r"^\d+:[A-Z] \d+ \w+ \d+ [\d:.]+ [.*#-] ")


# Redis allocates a stream's first node at this size (its default, 4096 bytes, up to 4096),
# and each job has a stream of its own (its events): at the default that stream, 4.7 KB, was
# most of a queued job's 6.2 KB, so 20,000 queued jobs took 124 MB. At 512 it takes 1.2 KB
# (docs/jobs-kubernetes.md, "Sizing Redis").
STREAM_NODE_MAX_BYTES = 512


class RedisServer(Managed):
    """A private ``redis-server`` on loopback with a password and append-only persistence
    (``appendfsync always``: a job is on disk before its submit is answered, so a Redis
    killed outright loses no accepted job). Its owner calls ``forget_expired`` now and then,
    which keeps expired jobs from staying in that file."""

    def __init__(self, data_dir: Path, port: int | None = None, password: str | None = None,
                 stop: threading.Event | None = None, rewrite_every_s: float = REWRITE_EVERY_S,
                 room_bytes: int = REDIS_ROOM_BYTES, appendonly: bool = True):
        """``stop`` (Ctrl-C) ends a start that waits for Redis to answer (``StartCancelled``):
        loading a large append-only file may take most of the start's timeout.
        ``rewrite_every_s``: how often at most ``forget_expired`` has Redis rewrite its file.
        ``room_bytes``: the free space ``short_of_room`` asks of its disk.
        ``appendonly``: False keeps no file at all (no snapshots either), so a restart
        empties it: the Redis whose loss the job API must say (its tests)."""
        self.data_dir = Path(data_dir).resolve()
        self.stop_event = stop
        self.rewrite_every_s = rewrite_every_s
        self.room_bytes = room_bytes
        self.appendonly = appendonly
        self.port = port or free_port()
        self.password = password or secrets.token_hex(16)
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        config = self.data_dir / "redis.conf"
        super().__init__([binary, str(config)], self.data_dir / "redis.log")
        self.config = config

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    @property
    def pid_file(self) -> Path:
        return self.data_dir / "redis.pid"

    def other_instance(self) -> int | None:
        """The pid of a redis-server that runs on this data directory already (one started
        by hand, or left by a run killed outright), from the pid file Redis keeps there."""
        try:
            pid = int(self.pid_file.read_text().strip())
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
            # Redis works in its `dir`: a pid taken since by another redis-server is not it.
            where = Path(os.readlink(f"/proc/{pid}/cwd"))
        except (OSError, ValueError):
            return None  # none, or gone (Redis removes its file at a clean exit)
        return pid if (b"redis-server" in command and where == self.data_dir
                       and pid != self.pid) else None

    def start(self, timeout: float = 20.0) -> None:
        if not Path(self.command[0]).exists():
            raise StartError("redis-server is not installed (Debian: apt-get install "
                             "redis-server), or set SDXL_REDIS_URL to a Redis of yours")
        # Two on one append-only file both append to it: its next load mixes two histories
        # (a job's state from one, its images from the other).
        other = self.other_instance()
        if other is not None:
            raise StartError(f"a redis-server (pid {other}) already runs on {self.data_dir}; "
                             f"two on one data directory mix their histories: stop it "
                             f"(kill {other}) and start again")
        # A rewrite of the append-only file writes a copy of the whole store (every job's
        # prompt and images) to temp-rewriteaof-<pid>.aof here, which Redis removes only for
        # a rewrite it ends itself: killed outright mid-rewrite (SIGKILL, the OOM killer),
        # it left that copy for good, one more at each such kill, expired jobs and all. No
        # Redis runs on this directory now (above): any such file is a dead rewrite's.
        for partial in self.data_dir.glob("temp-rewriteaof-*.aof"):
            partial.unlink(missing_ok=True)
        # The password goes in a file of mode 600, not on a command line others can read.
        try:
            write_private(self.config, f"bind 127.0.0.1\nport {self.port}\nrequirepass "
                                       f"{self.password}\ndir {self.data_dir}\nappendonly "
                                       f"{'yes' if self.appendonly else 'no'}\nappendfsync "
                                       f"always\nsave \"\"\ndaemonize no\n"
                                       f"pidfile {self.pid_file}\nprotected-mode yes\n"
                                       f"stream-node-max-bytes {STREAM_NODE_MAX_BYTES}\n",
                          replace=True)
        except OSError as exc:  # a full disk: said as Redis's own refusals are
            raise StartError(f"its config {self.config} could not be written: "
                             f"{exc.strerror or exc}") from None
        super().start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.stop_event is not None and self.stop_event.is_set():
                self.stop()
                raise StartCancelled("stopped before Redis answered")
            if not self.running():
                raise StartError(f"redis-server exited: {self.last_words()}")
            if self.ping():
                return
            time.sleep(0.05)
        self.stop()
        raise StartError(f"redis-server did not answer within {timeout:.0f} s: {self.tail()}")

    def short_of_room(self) -> str | None:
        """Why this Redis should not be started again yet: its disk has less than
        ``room_bytes`` free (said with how much it has), or None."""
        try:
            free = shutil.disk_usage(self.data_dir).free
        except OSError:
            return None  # not there: the start says why
        if free >= self.room_bytes:
            return None
        return (f"its disk is full ({self.data_dir} has {free // 1024} KiB free, under the "
                f"{self.room_bytes // 2 ** 20} MiB it is started again with)")

    def last_words(self, lines: int = 2) -> str:
        """The last ``lines`` of what this start logged, on one line, without Redis's pid
        and time: its reason for exiting, where 30 lines of the log buried it."""
        said = last_lines(self.log_path, lines, self.logged_from)
        return "; ".join(REDIS_LOG_HEAD.sub("", line) for line in said) or "(its log is empty)"

    def forget_expired(self) -> bool:
        """``retention.forget_expired`` on this Redis, every ``rewrite_every_s`` at most:
        True when a rewrite was asked for; False too when Redis does not answer (asked
        again later) or refuses (ours is started to take it)."""
        try:
            with redis.Redis(host="127.0.0.1", port=self.port, password=self.password,
                             socket_timeout=5) as client:
                return forget_expired(client, self.rewrite_every_s)
        except (RedisError, RewriteRefused):
            return False

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(f"AUTH {self.password}\r\nPING\r\n".encode())
                answer = b""
                while b"PONG" not in answer and len(answer) < 200:
                    chunk = sock.recv(100)
                    if not chunk:
                        break
                    answer += chunk
                return b"PONG" in answer
        except OSError:
            return False


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def same_code(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` with PYTHONPATH led by the folders this process imported ``sdxl_jobs`` and
    ``sdxl_serve`` from, so that a child started with ``python_module`` runs the same code
    as its parent: without it the child imports whatever the venv's editable install
    names, another checkout's code where two share a venv."""
    own = [str(Path(sys.modules[name].__file__).resolve().parents[1])
           for name in ("sdxl_jobs", "sdxl_serve")]
    rest = [part for part in env.get("PYTHONPATH", "").split(os.pathsep) if part]
    return {**env, "PYTHONPATH": os.pathsep.join(dict.fromkeys(own + rest))}


def wait_http(url: str, timeout: float, process: Managed | None = None,
              stop: threading.Event | None = None) -> None:
    """Wait until ``url`` answers 200; ``StartCancelled`` once ``stop`` is set (Ctrl-C)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if stop is not None and stop.is_set():
            raise StartCancelled(f"stopped before {url} answered")
        if process is not None and not process.running():
            raise StartError(f"{process.command[2:4]} exited: {process.tail()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:  # not listening yet, or an error status (HTTPError)
            pass
        time.sleep(0.1)
    raise StartError(f"{url} did not answer within {timeout:.0f} s"
                     + (f": {process.tail()}" if process else ""))


def api_process(redis_url: str, address: str, log_path: Path,
                env: Mapping[str, str] | None = None) -> Managed:
    """The job API (``python -m sdxl_jobs.api``)."""
    full_env = same_code({**os.environ, **(env or {}), "SDXL_REDIS_URL": redis_url})
    return Managed(python_module("sdxl_jobs.api", "--address", address), log_path, full_env)


def dispatcher_process(redis_url: str, inference: str, management: str, key_file: Path,
                       log_path: Path, name: str | None = None, model: str = "sdxl",
                       env: Mapping[str, str] | None = None) -> Managed:
    """One dispatcher (``python -m sdxl_jobs.dispatcher``); its command line names it."""
    args = ["--torchserve", inference, "--management", management, "--key-file",
            str(key_file), "--model", model]
    if name:
        args += ["--name", name]
    full_env = same_code({**os.environ, **(env or {}), "SDXL_REDIS_URL": redis_url})
    return Managed(python_module("sdxl_jobs.dispatcher", *args), log_path, full_env)

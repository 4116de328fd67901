"""The job stack for tests: a small HTTP client of the API, starting the API and
dispatchers as real processes, and a real HTTP server receiving webhooks (imported by the
tests; fixtures are in conftest.py)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import select
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import redis

from lifetimes import wait_until
from sdxl_jobs.keys import ensure_key
from sdxl_jobs.processes import (Managed, api_process, dispatcher_process, free_port,
                                 python_module, same_code, wait_http)
from sdxl_jobs.store import JobStore
from sdxl_serve.management import http

# A small job for tests of the store and the dispatcher, and the limits it is submitted under.
REQUEST = {"prompt": "a red fox", "negative_prompt": "", "num_inference_steps": 3,
           "guidance_scale": 5.0, "width": 64, "height": 64, "seed": 7, "num_images": 2,
           "scheduler": "euler", "output_format": "png"}
LIMITS = {"rate_per_minute": 1000, "max_active": 100, "ttl_s": 60}


def run(coroutine):
    """Run one coroutine against Redis with a store of its own (the test's event loop)."""
    return asyncio.run(coroutine)


def with_store(url: str, body, fresh_prefix: bool = True):
    """``body(store)`` on a store of its own, groups created: under a fresh key prefix, or
    with ``fresh_prefix`` false under the one the API and dispatchers use."""
    async def go():
        store = JobStore.from_url(url, **({"prefix": f"t{time.monotonic_ns()}:"}
                                          if fresh_prefix else {}))
        await store.ensure_groups()
        try:
            return await body(store)
        finally:
            await store.close()
    return run(go())


async def queue_positions(store: JobStore, job_ids: list[str]) -> list[int | None]:
    """Each job's place in the queue, 1 for the next to start, None when not queued."""
    jobs = [await store.job(job_id) for job_id in job_ids]
    return [position for _, position in await store.with_queue_positions(jobs)]


def make_key(redis_url: str, name: str = "test") -> str:
    async def create() -> str:
        store = JobStore.from_url(redis_url)
        try:
            return await ensure_key(store, name, None)
        finally:
            await store.close()
    return run(create())


def finish_as_a_dispatcher(redis_url: str, jobs: dict[str, tuple[str, list[bytes]]],
                           ttl_s: int = 600) -> None:
    """Finish the queued jobs ``{id: (format, images)}`` as a dispatcher finishes them (taken
    from the stream, started, their images stored, kept ``ttl_s``), their seeds 3, 4, ...:
    the only jobs queued on that Redis."""
    async def finish():
        store = JobStore.from_url(redis_url)
        try:
            taken = {job_id: entry for entry, job_id in await store.next_jobs("d1", 10, 100)}
            assert set(taken) == set(jobs)
            for job_id, (fmt, images) in jobs.items():
                _, claim = await store.start(job_id, taken[job_id], "d1", 3, 600)
                seeds = list(range(3, 3 + len(images)))
                assert await store.finish(job_id, claim, ttl_s, "succeeded", {"format": fmt},
                                          seeds=seeds, images=images) == "stored"
        finally:
            await store.close()
    run(finish())


def slow_preview_png() -> bytes:
    """A PNG slow to preview and small to send (8192 px: 84 KB, 64 MB decoded, 0.2 s of
    CPU where a 2048 px one takes 0.1): a burst of its previews fills the API's queue of
    them before its threads drain it."""
    from PIL import Image

    slow = io.BytesIO()
    Image.new("L", (8192, 8192), 128).save(slow, "PNG")
    return slow.getvalue()

def files_holding(folder: Path, data: bytes) -> list[str]:
    """The files under ``folder`` (a Redis's directory) that hold ``data``, by their path."""
    return sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*")
                  if path.is_file() and data in path.read_bytes())


class Api:
    """A running job API process and a small client for it (standard library HTTP)."""

    def __init__(self, process, address: str):
        self.process = process
        self.address = address

    def call(self, method: str, path: str, key: str | None = None, body=None,
             headers: dict | None = None, timeout: float = 60.0):
        """(status, headers, body bytes); a body that is not bytes is sent as JSON."""
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        return http(method, self.address + path, key, data, headers, timeout)

    def json(self, method: str, path: str, key: str | None = None, body=None, **kwargs):
        status, headers, raw = self.call(method, path, key, body, **kwargs)
        return status, headers, json.loads(raw) if raw else None


def hold_until_closed(raw: socket.socket, trickle: bool, seconds: float) -> tuple[bytes, float]:
    """Send one more byte every 0.2 s (``trickle``) or nothing, as a slowloris does, reading
    what the API sends, until it closes the connection: (what it sent, seconds to the close).
    Fails if it is still open after ``seconds``."""
    answer = b""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        try:
            if select.select([raw], [], [], 0.2)[0]:
                chunk = raw.recv(65536)
                if not chunk:
                    return answer, time.monotonic() - started
                answer += chunk
            elif trickle:
                raw.sendall(b"a")  # a header's value or a body that never ends
        except (ConnectionResetError, BrokenPipeError):  # closed while we sent
            return answer, time.monotonic() - started
    raise AssertionError(f"the connection was still open after {seconds} s of a request that "
                         f"never ends; it answered {answer[-200:]!r}")


def refused_start(module: str, args: list[str], env: dict[str, str]) -> str:
    """The last line a job command (``python -m module args``, ``env`` over this process's)
    wrote when it ended its start, exit 2; fails if it is still running after 20 s (it
    went on serving what it was given) or ends otherwise."""
    command = subprocess.Popen(python_module(module, *args), env=same_code({**os.environ, **env}),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, err = command.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        command.kill()
        _, err = command.communicate()
        raise AssertionError(f"{module} ran with {args} {env}: {err[-500:]}") from None
    assert command.returncode == 2, err
    return err.splitlines()[-1]


@contextlib.contextmanager
def redis_on_disk(folder: Path, log: Path):
    """A redis-server of its own whose append-only file is in ``folder`` (a full_disk
    fixture's mount: its writes fail when that is full), answering: yields (its URL, a
    client of it); stopped after."""
    port = free_port()
    config = folder / "redis.conf"
    config.write_text(f"bind 127.0.0.1\nport {port}\ndir {folder}\nappendonly yes\n"
                      f"appendfsync everysec\nsave \"\"\ndaemonize no\n")
    server = Managed(["redis-server", str(config)], log)
    server.start()
    try:
        client = redis.Redis.from_url(f"redis://127.0.0.1:{port}/0")

        def answers() -> bool:
            assert server.running(), server.tail()
            with contextlib.suppress(redis.ConnectionError):
                return client.ping()
            return False
        wait_until(answers, 10, "redis-server to answer")
        yield f"redis://127.0.0.1:{port}/0", client
    finally:
        server.stop()


def start_api(redis_url: str, log_dir: Path, env: dict | None = None) -> Api:
    address = f"http://127.0.0.1:{free_port()}"
    process = api_process(redis_url, address, log_dir / "api.log", env)
    process.start()
    try:
        wait_http(address + "/v1/health?dispatchers=0", 30, process)
    except BaseException:
        process.stop()
        raise
    return Api(process, address)


def start_dispatcher(redis_url: str, server, log_dir: Path, name: str,
                     env: dict | None = None, extra: tuple[str, ...] = ()):
    process = dispatcher_process(redis_url, server.addresses.inference,
                                 server.addresses.management,
                                 server.run_dir / "key_file.json", log_dir / f"{name}.log",
                                 name=name, env=env)
    process.command += list(extra)
    process.start()
    return process


class Receiver:
    """A real HTTP server that records webhook POSTs and answers from a script, on
    ``host``: loopback, IPv4's or IPv6's (``::1``)."""

    def __init__(self, host: str = "127.0.0.1"):
        self.received: list[tuple[str, dict, bytes]] = []
        self.answers: list[tuple[int, dict]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                receiver.received.append((self.path, dict(self.headers), body))
                status, headers = receiver.answers.pop(0) if receiver.answers else (200, {})
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        ipv6 = ":" in host
        server = type("Server", (ThreadingHTTPServer,),
                      {"address_family": socket.AF_INET6 if ipv6 else socket.AF_INET})
        self.server = server((host, 0 if ipv6 else free_port()), Handler)
        self.port = self.server.server_address[1]
        self.host = f"[{host}]" if ipv6 else host
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}{path}"

    def posts_to(self, path: str) -> list[tuple[dict, bytes]]:
        """(headers, body) of each POST received on ``path``, in order."""
        return [(headers, body) for got, headers, body in list(self.received) if got == path]

    def close(self):
        self.server.shutdown()
        self.server.server_close()

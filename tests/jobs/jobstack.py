"""The job stack for tests: a small HTTP client of the API, and starting the API and
dispatchers as real processes (imported by the tests; fixtures are in conftest.py)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from sdxl_jobs.keys import ensure_key
from sdxl_jobs.processes import api_process, dispatcher_process, free_port, wait_http
from sdxl_jobs.store import JobStore
from sdxl_serve.management import http


def run(coroutine):
    """Run one coroutine against Redis with a store of its own (the test's event loop)."""
    return asyncio.run(coroutine)


def make_key(redis_url: str, name: str = "test") -> str:
    async def create() -> str:
        store = JobStore.from_url(redis_url)
        try:
            return await ensure_key(store, name, None)
        finally:
            await store.close()
    return run(create())


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

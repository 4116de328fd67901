"""Fixtures of the job API tests: a real redis-server per test module (password, temp
directory, append-only persistence), always stopped."""

from __future__ import annotations

import pytest

from sdxl_jobs.processes import RedisServer

from forward_proxy import ForwardProxy


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()



@pytest.fixture
def proxy(monkeypatch):
    """A real forward proxy, named by HTTP_PROXY and HTTPS_PROXY as an operator names one
    (NO_PROXY unset: a test sets it)."""
    running = ForwardProxy()
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(name, running.address)
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    yield running
    running.close()

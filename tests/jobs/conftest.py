"""Fixtures of the job API tests: a real redis-server per test module (password, temp
directory, append-only persistence), always stopped."""

from __future__ import annotations

import pytest

from sdxl_jobs.processes import RedisServer


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


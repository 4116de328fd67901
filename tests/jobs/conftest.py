"""Fixtures of the job API tests: a real redis-server per test module (password, temp
directory, append-only persistence), always stopped."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from sdxl_jobs.processes import RedisServer  # noqa: E402


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


"""Fixtures of the playground's browser tests: one job stack per module (real redis-server,
real TorchServe with the tiny model, a dispatcher and the API as real processes on loopback)
and Debian's chromium, headless, driven by Playwright. Nothing mocked, always stopped."""

from __future__ import annotations

import importlib.util
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis

from lifetimes import wait_until
from sdxl_jobs.processes import api_process, wait_http
from sdxl_serve.server import Addresses, TorchServeProcess

JOB_TESTS = Path(__file__).resolve().parents[1] / "jobs"


def job_test_module(name: str, path: Path):
    """A module of the job tests, shared rather than copied. Loaded by its file, not by
    putting tests/jobs on sys.path, where its conftest.py would shadow this one; the same
    module object as the job tests' when they were collected first."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


jobstack = job_test_module("jobstack", JOB_TESTS / "jobstack.py")
Api, make_key, start_api, start_dispatcher = (jobstack.Api, jobstack.make_key,
                                              jobstack.start_api, jobstack.start_dispatcher)
# The job tests' real redis-server fixture (pytest finds fixtures by name in a conftest).
redis_server = job_test_module("job_test_fixtures", JOB_TESTS / "conftest.py").redis_server

CHROMIUM = shutil.which("chromium")


class Stack:
    """The job stack of one module: Redis, TorchServe, the API, a dispatcher; the
    dispatcher and the API can be stopped and started again by a test."""

    def __init__(self, redis_server, server, logs: Path, env: dict[str, str]):
        self.redis, self.server, self.logs, self.env = redis_server, server, logs, env
        self.api: Api | None = None
        self.dispatcher = None
        self.dispatchers_started = 0

    def start_api(self) -> None:
        self.api = start_api(self.redis.url, self.logs, self.env)

    def restart_api(self) -> None:
        """The API again on the same address (a browser's connection drops meanwhile)."""
        process = api_process(self.redis.url, self.api.address, self.logs / "api-again.log",
                              self.env)
        process.start()
        try:
            wait_http(self.api.address + "/v1/health?dispatchers=0", 30, process)
        except BaseException:
            process.stop()
            raise
        self.api = Api(process, self.api.address)

    def start_dispatcher(self) -> None:
        """A dispatcher, once it has checked in and the model's bounds are published."""
        self.dispatchers_started += 1
        name = f"d-browser-{self.dispatchers_started}"
        started = time.time()
        self.dispatcher = start_dispatcher(self.redis.url, self.server, self.logs, name,
                                           self.env)
        client = redis.Redis.from_url(self.redis.url)

        def checked_in() -> bool:
            if not self.dispatcher.running():
                pytest.fail(f"dispatcher {name} exited: {self.dispatcher.tail()}",
                            pytrace=False)
            return (client.zscore("sdxl:dispatchers", name) or 0) > started \
                and bool(client.exists("sdxl:model"))

        try:
            wait_until(checked_in, 120, f"dispatcher {name} to check in",
                       detail=self.dispatcher.tail)
        finally:
            client.close()

    def stop_dispatcher(self) -> None:
        if self.dispatcher is not None:
            self.dispatcher.stop()
            self.dispatcher = None

    @contextmanager
    def dispatcher_stopped(self):
        """No dispatcher inside the block: a job submitted there waits in the queue until
        the test lets it go, so the test orders events, not the machine's speed. One is
        started again on every way out, or the module's later tests would wait forever."""
        self.stop_dispatcher()
        try:
            yield
        finally:
            self.start_dispatcher()

    def stop(self) -> None:
        try:
            self.stop_dispatcher()
        finally:  # the API is stopped even if the dispatcher's stop failed
            if self.api is not None:
                self.api.process.stop()


@pytest.fixture(scope="module")
def stack(redis_server, model_store, tmp_path_factory):
    """One job stack for the module, with its own TorchServe. The dispatcher and the worker
    share a cancel directory, as in `make serve-jobs`: a canceled job's denoising stops."""
    cancel_dir = tmp_path_factory.mktemp("playground-cancel")
    server = TorchServeProcess(tmp_path_factory.mktemp("playground-ts"), model_store,
                               {"sdxl": "sdxl-1.0.mar"}, Addresses.free(),
                               env={"SDXL_CANCEL_DIR": str(cancel_dir)})
    stack = Stack(redis_server, server, tmp_path_factory.mktemp("playground-logs"),
                  {"SDXL_JOBS_RATE_PER_MINUTE": "1000", "SDXL_JOBS_MAX_ACTIVE_PER_KEY": "50",
                   "SDXL_JOBS_CANCEL_DIR": str(cancel_dir)})
    try:
        server.start()
        server.wait_ready("sdxl", timeout=240)
        stack.start_api()
        stack.start_dispatcher()
        stack.key = make_key(redis_server.url, "browser")
        # For a test that breaks what belongs to its key. Made here: asyncio.run cannot
        # run inside a test once Playwright's event loop is running.
        stack.spare_key = make_key(redis_server.url, "browser-spare")
        # For the test that revokes its key mid-session.
        stack.key_to_revoke = make_key(redis_server.url, "browser-revoked")
        yield stack
    finally:
        stack.stop()
        server.stop()


@pytest.fixture(scope="module")
def browser(stack):  # after the stack: Playwright holds an event loop while it runs
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium); "
                    "the browser tests drive it headless")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        running = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield running
        finally:
            running.close()


@pytest.fixture
def page(browser, stack):
    """A fresh browser context (its own session storage) on the API's address; an uncaught
    error in the page or a request to another host fails the test."""
    context = browser.new_context(base_url=stack.api.address, viewport={"width": 1280,
                                                                        "height": 900})
    context.set_default_timeout(30_000)
    opened = context.new_page()
    problems: list[str] = []
    opened.on("pageerror", lambda e: problems.append(str(e)))
    opened.on("request", lambda r: None if r.url.startswith((stack.api.address, "blob:",
                                                             "data:"))
              else problems.append(f"request to another host: {r.url}"))
    yield opened
    context.close()
    assert not problems, problems

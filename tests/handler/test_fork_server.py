"""The fork server that starts engine processes, dying under a start: a failed start like
any other (``EngineProcessError``), so each request of the batch gets its own JSON reply.

Python's fork server ends when its ``os.fork()`` fails (EAGAIN at a container's pid limit,
ENOMEM), and the start waiting for the child's pid then read the end of its pipe: an
``EOFError`` that no handler of ours caught, so it left the handler and TorchServe answered
the whole batch 503 "Prediction failed". Here the fork server is stopped (SIGSTOP) while a
start waits on it, then killed, as such a failure ends it. This module's own: every engine
process of the test process dies with the fork server.
"""

from __future__ import annotations

import multiprocessing.forkserver
import os
import signal
import sys
import threading
import traceback

import pytest

from lifetimes import wait_until
from sdxl_serve.engine_process import EngineProcess, EngineProcessError, EngineSpec

pytestmark = pytest.mark.handler
CONFIG = {"device": "cpu", "warmup_steps": 1}


def fork_server_pid() -> int:
    """The fork server multiprocessing started for this process, by its own record: among
    this process's children, in a whole test run, are zombies (orphans come back to pytest,
    a subreaper, and are reaped at its end) whose command line cannot be read."""
    return multiprocessing.forkserver._forkserver._forkserver_pid


def waiting_for_its_pid(thread: threading.Thread) -> bool:
    """Whether ``thread`` is inside multiprocessing's read of the new child's pid."""
    frame = sys._current_frames().get(thread.ident)
    return frame is not None and any(entry.name == "read_signed"
                                     for entry in traceback.extract_stack(frame))


def test_a_fork_server_that_dies_under_a_start_is_a_failed_start(tiny_model_dir):
    spec = EngineSpec(str(tiny_model_dir), CONFIG, None, "1.0")
    first = EngineProcess(spec, 60.0)
    first.start()  # the fork server runs from here on
    first.wait_ready(300)
    first.stop()
    server = fork_server_pid()
    raised: list[BaseException] = []

    def start() -> None:
        try:
            EngineProcess(spec, 60.0).start()
        except BaseException as exc:  # noqa: BLE001 - what the start raised, for the test
            raised.append(exc)

    os.kill(server, signal.SIGSTOP)
    try:
        starting = threading.Thread(target=start, daemon=True)
        starting.start()
        wait_until(lambda: waiting_for_its_pid(starting), 30,
                   "the start to wait for its child's pid")
    finally:
        os.kill(server, signal.SIGKILL)
    starting.join(30)
    assert not starting.is_alive(), "the start still waits on a dead fork server"
    assert len(raised) == 1 and isinstance(raised[0], EngineProcessError), raised
    assert str(raised[0]) == ("could not start an engine process: multiprocessing's fork "
                              "server ended under the start (a fork that failed: a pid "
                              "limit, or out of memory)")
    # The next start gets a fresh fork server, and an engine that serves its health check.
    again = EngineProcess(spec, 60.0)
    again.start()
    try:
        again.wait_ready(300)
        assert again.health().healthy
    finally:
        again.stop()
    assert fork_server_pid() != server

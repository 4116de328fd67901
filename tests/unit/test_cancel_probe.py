"""The cancel directory's files named by host and pid: a worker's probe (one per live
worker, not one per worker that ever started: TorchServe kills its workers, so none removes
its own) and a dispatcher's in-flight calls (a killed dispatcher's are flagged by the next
one, so the worker stops generating results nobody will store)."""

import os
import socket
import subprocess
import sys

import pytest

from sdxl_serve.cancellation import (CALL_PREFIX, PROBE_PREFIX, cancel_flag,
                                     flag_orphaned_calls, leave_cancel_probe, mark_call)

pytestmark = pytest.mark.unit
HOST = socket.gethostname().replace("-", "_")


def gone_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.fixture
def alive():
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield process.pid
    process.kill()
    process.wait()


def test_a_starting_worker_removes_the_probes_of_this_hosts_workers_that_are_gone(
        tmp_path, alive):
    dead = [tmp_path / f"{PROBE_PREFIX}{HOST}-{gone_pid()}-{n}" for n in range(3)]
    # Its own pid from before: a container started again gets the same pid.
    dead.append(tmp_path / f"{PROBE_PREFIX}{HOST}-{os.getpid()}-before")
    kept = [tmp_path / f"{PROBE_PREFIX}{HOST}-{alive}-a",  # a live worker's
            tmp_path / f"{PROBE_PREFIX}{HOST}-{os.getppid()}-b",  # also live
            tmp_path / f"{PROBE_PREFIX}otherhost-{gone_pid()}-c",  # another host's
            tmp_path / f"{PROBE_PREFIX}0123456789abcdef",  # the old form: no pid
            tmp_path / "0123456789abcdef0123456789abcdef"]  # a job's flag is not a probe
    for path in dead + kept:
        path.touch()
    mine = leave_cancel_probe(str(tmp_path))
    assert mine.startswith(f"{PROBE_PREFIX}{HOST}-{os.getpid()}-")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mine] +
                                                                [p.name for p in kept])


def test_a_host_name_with_dashes_still_names_the_pid(tmp_path, monkeypatch):
    monkeypatch.setattr(socket, "gethostname", lambda: "sdxl-serve-7d9f-x2")
    stale = tmp_path / f"{PROBE_PREFIX}sdxl_serve_7d9f_x2-{gone_pid()}-0"
    stale.touch()
    mine = leave_cancel_probe(str(tmp_path))
    assert [p.name for p in tmp_path.iterdir()] == [mine]


def test_the_calls_a_killed_dispatcher_left_in_flight_are_flagged(tmp_path, alive):
    tokens = [f"{n:032x}" for n in range(5)]
    left = [tmp_path / f"{CALL_PREFIX}{HOST}-{gone_pid()}-{tokens[0]}",
            tmp_path / f"{CALL_PREFIX}{HOST}-{os.getpid()}-{tokens[1]}"]  # this pid, before
    running = [tmp_path / f"{CALL_PREFIX}{HOST}-{alive}-{tokens[2]}",  # a live dispatcher's
               tmp_path / f"{CALL_PREFIX}otherhost-{gone_pid()}-{tokens[3]}"]
    hostile = tmp_path / f"{CALL_PREFIX}{HOST}-{gone_pid()}-..-..-x"  # names no flag
    for path in left + running + [hostile]:
        path.touch()
    assert flag_orphaned_calls(str(tmp_path)) == 2
    flags = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("."))
    assert flags == tokens[:2]
    assert sorted(p for p in tmp_path.iterdir() if p.name.startswith(".")) == sorted(running)
    # A call of this process: its marker until the call ends, and nothing flagged.
    marker = mark_call(str(tmp_path), tokens[4])
    assert marker.exists() and not os.path.exists(cancel_flag(str(tmp_path), tokens[4]))

"""The worker's probe file in the cancel directory: one per live worker, not one per worker
that ever started (TorchServe kills its workers, so none removes its own)."""

import os
import socket
import subprocess
import sys

from sdxl_serve.service import PROBE_PREFIX, leave_cancel_probe


def gone_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_starting_worker_removes_the_probes_of_this_hosts_workers_that_are_gone(tmp_path):
    host = socket.gethostname().replace("-", "_")
    dead = [tmp_path / f"{PROBE_PREFIX}{host}-{gone_pid()}-{n}" for n in range(3)]
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        kept = [tmp_path / f"{PROBE_PREFIX}{host}-{alive.pid}-a",  # a live worker's
                tmp_path / f"{PROBE_PREFIX}{host}-{os.getppid()}-b",  # also live
                tmp_path / f"{PROBE_PREFIX}otherhost-{gone_pid()}-c",  # another host's
                tmp_path / f"{PROBE_PREFIX}0123456789abcdef",  # the old form: no pid
                tmp_path / "a-cancel-flag"]  # a job's flag is not a probe
        for path in dead + kept:
            path.touch()
        mine = leave_cancel_probe(str(tmp_path))
        assert mine.startswith(f"{PROBE_PREFIX}{host}-{os.getpid()}-")
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            [mine] + [p.name for p in kept])
        # A second worker of the same process tree keeps the first's probe: it is alive.
        second = leave_cancel_probe(str(tmp_path))
        assert (tmp_path / mine).exists() and (tmp_path / second).exists()
    finally:
        alive.kill()
        alive.wait()


def test_a_host_name_with_dashes_still_names_the_pid(tmp_path, monkeypatch):
    monkeypatch.setattr(socket, "gethostname", lambda: "sdxl-serve-7d9f-x2")
    stale = tmp_path / f"{PROBE_PREFIX}sdxl_serve_7d9f_x2-{gone_pid()}-0"
    stale.touch()
    mine = leave_cancel_probe(str(tmp_path))
    assert [p.name for p in tmp_path.iterdir()] == [mine]

"""What TorchServe's workers, and a TorchServe killed, leave in the server's temp directory.

A pod's worker is replaced at every rollout (its version scaled to 0, the new one up) and
whenever one dies, and its container may be killed and started again, while the pod and its
/tmp volume stay: a file left per worker or per kill grows for the pod's life.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from conftest import start_server
from lifetimes import wait_until
from test_operations import management, worker_pid

pytestmark = pytest.mark.e2e


def test_workers_ended_by_torchserve_leave_no_fork_server_socket_behind(tmp_path, model_store):
    server = start_server(tmp_path / "run", model_store, {"sdxl": "sdxl-1.0.mar"},
                          env={"SDXL_WARMUP_SIZES": "32x32", "SDXL_WARMUP_STEPS": "1"})
    try:
        # 1. One worker scaled down and up (as a rollout does), one killed (as the kernel's
        # OOM killer does): neither exits cleanly, so neither removes its temp files.
        first = worker_pid(server)
        for scale in (0, 1):
            status, _, body = management(
                server, "PUT", f"/models/sdxl?min_worker={scale}&max_worker={scale}"
                               f"&synchronous={'true' if scale == 0 else 'false'}")
            assert status in (200, 202), body
        second = wait_until(lambda: ready_worker_other_than(server, first), 120,
                            "a worker after scaling to 0 and back to 1")
        os.kill(second, signal.SIGKILL)
        third = wait_until(lambda: ready_worker_other_than(server, second), 120,
                           "a worker after the last one was killed")
        # 2. Only the live worker's fork server socket is left (multiprocessing's
        # listener-*, in a pymp-* folder); each worker before left its own for good. In the
        # server's temp dir, or in /tmp where that path is too long for a socket's (as
        # pytest's own temp dirs are).
        bases = (server.tmp_dir, Path("/tmp"))
        left = {pid: [path for base in bases
                      for path in base.glob(f"sdxl-mp-{pid}/pymp-*/listener-*")]
                for pid in (first, second, third)}
        assert not left[first] and not left[second] and len(left[third]) == 1, left
        assert not list(server.tmp_dir.glob("pymp-*"))
    finally:
        server.stop()


def test_a_server_killed_leaves_no_unpacked_archive_to_the_next_start(tmp_path, model_store):
    env = {"SDXL_WARMUP_SIZES": "32x32", "SDXL_WARMUP_STEPS": "1"}
    killed = start_server(tmp_path / "run", model_store, {"sdxl": "sdxl-1.0.mar"}, env=env)
    try:
        # Killed at once, as the kubelet does past a pod's grace period: TorchServe never
        # removes the archive it unpacked.
        os.killpg(killed.java_pid(), signal.SIGKILL)
    finally:
        killed.stop()
    [left] = list((killed.tmp_dir / "models").iterdir())
    again = start_server(tmp_path / "run", model_store, {"sdxl": "sdxl-1.0.mar"}, env=env)
    try:
        unpacked = list((again.tmp_dir / "models").iterdir())
        assert len(unpacked) == 1 and unpacked != [left], unpacked
    finally:
        again.stop()


def ready_worker_other_than(server, pid: int) -> int | None:
    status, _, body = management(server, "GET", "/models/sdxl")
    workers = json.loads(body)[0]["workers"] if status == 200 else []
    return next((worker["pid"] for worker in workers
                 if worker["status"] == "READY" and worker["pid"] != pid), None)

"""What a server leaves in /dev/shm once its engine processes were replaced and it was killed.

A pod's /dev/shm is small (64 MB under Docker by default, at least a 4 KiB page a file) and
torch uses it, so a file left per engine process or per stop would, over weeks of
recycling, fail a server that never restarts its pod.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

import psutil
import pytest

from conftest import start_server
from test_operations import predict

pytestmark = pytest.mark.e2e
SHM = Path("/dev/shm")


def named_semaphores(java_pid: int) -> set[str]:
    """The named semaphores in /dev/shm that TorchServe's process group (Java, its workers,
    their fork servers and engine processes) has mapped. Told apart from other programs'
    files by inode: a process maps the file under glibc's temporary name, which sem_open
    renames (links) to the semaphore's own."""
    by_inode = {}
    for path in SHM.glob("sem.*"):
        with contextlib.suppress(OSError):
            by_inode[path.stat().st_ino] = path.name
    names = set()
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) != java_pid:
                continue
            maps = Path(f"/proc/{process.pid}/maps").read_text()
        except (OSError, psutil.Error):
            continue  # gone meanwhile
        for line in maps.splitlines():
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith(f"{SHM}/sem."):
                names.add(by_inode.get(int(fields[4]), ""))
    names.discard("")  # mapped, but its name is gone already: nothing can be left
    return names


def test_a_server_killed_with_its_process_group_leaves_no_semaphore_in_dev_shm(
        tmp_path, model_store):
    server = start_server(tmp_path / "run", model_store, {"sdxl": "sdxl-1.0.mar"},
                          env={"SDXL_MAX_REQUESTS_PER_WORKER": "2",
                               "SDXL_WARMUP_SIZES": "32x32", "SDXL_WARMUP_STEPS": "1"})
    held: set[str] = set()
    engines = set()
    try:
        for seed in range(5):  # three engine processes: two replaced at their budget
            status, headers, body = predict(server, {"prompt": "shm", "seed": seed,
                                                     "width": 32, "height": 32,
                                                     "num_inference_steps": 1})
            assert status == 200, body
            engines.add(headers["X-Worker-Pid"])
            held |= named_semaphores(server.java_pid())
        assert len(engines) == 3, engines
        # Killed at once, resource tracker included, as TorchServeProcess.stop does past
        # its polite wait and as the kubelet does past a pod's grace period.
        os.killpg(server.java_pid(), signal.SIGKILL)
    finally:
        server.stop()
    left = sorted(name for name in held if (SHM / name).exists())
    for name in left:  # ours: this run's processes held them
        (SHM / name).unlink()
    assert not left, f"left in {SHM}: {left}"

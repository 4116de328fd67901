"""The Triton launcher on a full disk (a real tmpfs filled to its last byte): its upkeep
goes on, and a start says what is wrong. Neither starts a Triton: the roll and the
layout fail before Triton would matter."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sdxl_serve.server import ServerError
from sdxl_serve.triton_server import TritonPorts, TritonServerProcess

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.triton


def test_a_log_that_cannot_be_rolled_on_a_full_disk_keeps_the_upkeep_going(full_disk):
    """The roll's copy failed with ENOSPC out of ``upkeep``, which serve_triton.py calls
    every second: the launcher ended with a traceback and stopped Triton, and the copy had
    already emptied the log before."""
    said = []
    server = TritonServerProcess(full_disk.path / "run", ports=TritonPorts.free(),
                                 report=said.append)
    server.run_dir.mkdir()
    log = b"a line Triton wrote\n" * 50_000  # 1 MB: more than the disk has left, once full
    server.log_path.write_bytes(log)
    rolled = server.log_path.with_name("tritonserver.log.1")
    rolled.write_bytes(b"the roll before\n")
    server.log_roll_bytes = len(log) - 1
    full_disk.fill()
    for _ in range(3):  # as the launcher's loop, each second
        server.upkeep()
    assert len(said) == 1 and "No space left on device" in said[0] \
        and "could not be rolled" in said[0], said
    assert server.log_path.read_bytes() == log
    assert rolled.read_bytes() == b"the roll before\n"
    assert sorted(path.name for path in server.run_dir.iterdir()) == \
        ["tritonserver.log", "tritonserver.log.1"]  # no partial copy holding the disk
    # Room again: the next try (a minute later; here at once) rolls it, and says so.
    full_disk.free()
    server.log_roll_retry_s = 0
    server.upkeep()
    assert rolled.read_bytes() == log and server.log_path.stat().st_size == 0
    assert len(said) == 2 and "rolled to tritonserver.log.1 again" in said[1], said


def test_triton_started_on_a_full_disk_says_so_and_leaves_no_partial_copy(full_disk):
    """It asked whether a Triton was running from the run directory, after a list of every
    file it could not copy (4 KB in one line), and the part of the server copied before the
    disk filled stayed there."""
    server = TritonServerProcess(full_disk.path / "run", ports=TritonPorts.free())
    full_disk.fill()
    with pytest.raises(ServerError) as refused:
        server.start()
    message = str(refused.value)
    assert "No space left on device" in message and "free space there" in message, message
    assert "is a Triton running" not in message and len(message) < 600, message
    assert server.process is None
    assert not (server.run_dir / "tritonserver").exists()


def test_serve_triton_on_a_full_disk_says_only_its_error(full_disk, tiny_model_dir, tmp_path):
    """`starting Triton on ... (log: ...) ...` came before the one `error:` line: the
    layout, which the disk refuses, ran after it. Nothing is said to start now."""
    ports = TritonPorts.free()
    (tmp_path / "tmp").mkdir()
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp"), "SDXL_MODEL_DIR": str(tiny_model_dir),
           "SDXL_TRITON_HTTP_PORT": str(ports.http), "SDXL_TRITON_GRPC_PORT": str(ports.grpc),
           "SDXL_TRITON_METRICS_PORT": str(ports.metrics)}
    full_disk.fill()
    # Refused before any Triton starts (the layout comes first), so no server to stop.
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "serve_triton.py"),
                           "--run-dir", str(full_disk.path / "run")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "starting Triton" not in done.stdout and "stopping" not in done.stdout, done.stdout
    assert done.stderr.startswith(f"error: could not lay out Triton in "
                                  f"{full_disk.path / 'run'}: ") and \
        "No space left on device" in done.stderr and len(done.stderr.splitlines()) == 1, \
        done.stderr

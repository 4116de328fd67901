"""What a Triton killed leaves in its run directory's temp dir for the next start.

`serve_triton.py` serves from the same run directory at each start (one per HTTP port),
and a pod's is kept across container restarts: a folder left per stub killed grows for good.
"""

from __future__ import annotations

import os
import signal

import pytest

from conftest import start_triton, stop_and_check
from lifetimes import wait_until
from test_triton_serving import infer, stub_pid

pytestmark = pytest.mark.triton


def test_a_stub_killed_leaves_no_cancel_folder_to_the_next_start(tmp_path, tiny_model_dir):
    run_dir = tmp_path / "run"
    env = {"SDXL_WARMUP_STEPS": "1"}
    # 1. A stub killed outright (as a Triton killed, or past its exit timeout, kills them)
    # runs no finalize, so it does not remove its folder of cancel flags. The stub alone:
    # a tritonserver killed leaves a folder of its own in /tmp (docs/triton.md).
    first = start_triton(run_dir, tiny_model_dir, ["sdxl"], env)
    os.kill(stub_pid(first), signal.SIGKILL)
    first.stop()
    assert list((run_dir / "tmp").glob("sdxl-cancel-*"))
    # 2. The next start on the same run directory keeps only its live stub's; each killed
    # stub's stayed (named at random, so nothing could tell whose it was).
    second = start_triton(run_dir, tiny_model_dir, ["sdxl"], env)
    try:
        left = sorted(path.name for path in (run_dir / "tmp").glob("sdxl-cancel-*"))
        assert left == [f"sdxl-cancel-{stub_pid(second)}"], left
    finally:
        stop_and_check(second)


def test_the_log_is_rolled_and_triton_writes_on_into_it(tmp_path, tiny_model_dir):
    # Each start appended to tritonserver.log and nothing rolled it: it grew for good.
    server = start_triton(tmp_path / "run", tiny_model_dir, ["sdxl"], {"SDXL_WARMUP_STEPS": "1"})
    try:
        started = server.log_path.read_text()
        server.log_roll_bytes = len(started) - 1
        server.upkeep()  # as serve_triton.py's, every second
        rolled = server.log_path.with_name("tritonserver.log.1")
        assert rolled.read_text() == started
        assert server.log_path.stat().st_size == 0
        # Triton's processes write on into the file they were started with, from its start.
        status, _, _ = infer(server, {"prompt": "x", "width": 1})
        assert status == 400
        wait_until(lambda: "refused: field 'width'" in server.log_path.read_text(), 10,
                   "the stub's line in the rolled log")
        assert not server.log_path.read_bytes().startswith(b"\0")
        server.log_roll_bytes = 10 ** 9
        server.upkeep()
        assert rolled.read_text() == started
    finally:
        stop_and_check(server)

"""What a Triton killed leaves in its run directory's temp dir for the next start.

`serve_triton.py` serves from the same run directory at each start (one per HTTP port),
and a pod's is kept across container restarts: a folder left per stub killed grows for good.
"""

from __future__ import annotations

import os
import signal

import pytest

from conftest import start_triton, stop_and_check
from test_triton_serving import stub_pid

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

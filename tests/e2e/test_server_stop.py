"""TorchServeProcess.stop ends the whole server, Java included, even when the polite
SIGTERM runs out of time."""

from __future__ import annotations

import pytest

from sdxl_serve.contract import process_running
from sdxl_serve.server import Addresses, TorchServeProcess

pytestmark = pytest.mark.e2e


def test_a_stop_whose_polite_part_times_out_still_kills_java(tmp_path):
    # No model: Java starts in seconds, and that is all this needs.
    server = TorchServeProcess(tmp_path / "run", tmp_path / "store", {}, Addresses.free())
    (tmp_path / "store").mkdir()
    server.start()
    try:
        server.wait_ready(None, timeout=120)
        java = server.java_pid()
        assert java and process_running(java)
        # Java cannot stop in a millisecond: the TimeoutExpired must not skip the kill of
        # the process group that follows.
        server.stop(timeout=0.001)
        assert server.process is None
        assert not process_running(java)
    finally:
        server.stop()


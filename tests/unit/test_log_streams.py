"""Our records by level to stdout or stderr, in a process set up as TorchServe's worker is."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.unit

WORKER = textwrap.dedent("""
    import logging, sys
    # As ts/model_service_worker.py sets up its process (TorchServe 0.12).
    logging.basicConfig(stream=sys.stdout, format="%(message)s", level=logging.INFO)
    from sdxl_serve.log_streams import split_by_level
    split_by_level(logging.getLogger("sdxl_serve"), "%(message)s")
    ours = logging.getLogger("sdxl_serve.recycling")
    ours.debug("ours at debug")
    ours.info("ours at info")
    ours.warning("ours at warning")
    ours.error("ours at error")
    logging.getLogger("ts.metrics.caching_metric").info("[METRICS]Requests.Count:1|#x|")
    logging.getLogger("ts.metrics.caching_metric").error("[METRICS]Failed to update metric")
    logging.warning("the worker's own warning")
""")


def test_our_warnings_go_to_stderr_once_and_the_rest_as_before():
    done = subprocess.run([sys.executable, "-c", WORKER], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    # TorchServe writes stderr at WARN: ours from WARNING up, each line once.
    assert done.stderr.splitlines() == ["ours at warning", "ours at error"]
    # INFO stays on stdout at the worker's level, and TorchServe's records where they were:
    # its metric lines, parsed on stdout, and its own warnings.
    assert done.stdout.splitlines() == [
        "ours at info", "[METRICS]Requests.Count:1|#x|", "[METRICS]Failed to update metric",
        "the worker's own warning"]


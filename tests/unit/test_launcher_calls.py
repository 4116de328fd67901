"""The Triton launcher's own calls to the server it started go straight to it, never
through the environment's proxy, as the TorchServe launcher's, the rollout's and the pod's
do (docs/security.md)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from forward_proxy import ForwardProxy
from sdxl_serve.server import free_port

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]
# In a process of its own: urllib's default opener reads the proxy variables once, at its
# first call, so this process's (the suite's, no proxy) would hide the bug.
ASK = """
import sys
from sdxl_serve.triton_server import TritonPorts, TritonServerProcess
port = int(sys.argv[1])
server = TritonServerProcess(sys.argv[2], ports=TritonPorts(port, port + 1, port + 2))
print(server.ready(), server.ready("sdxl"))
try:
    server.metadata()
except OSError as exc:
    print("metadata:", type(exc).__name__)
"""


def test_the_triton_launchers_readiness_checks_do_not_go_through_the_proxy(tmp_path):
    # With HTTP_PROXY set and NO_PROXY unset (an egress proxy), each readiness poll of
    # `make serve-triton` went to the proxy: one that cannot reach the pod's loopback kept
    # Triton from ever being READY, and one that can saw every poll.
    proxy = ForwardProxy()
    env = {name: value for name, value in os.environ.items()
           if name.lower() not in ("no_proxy", "all_proxy")}
    env.update({name: proxy.address for name in ("HTTP_PROXY", "http_proxy")},
               PYTHONPATH=os.pathsep.join([str(REPO / "handler"), env.get("PYTHONPATH", "")]))
    try:
        done = subprocess.run([sys.executable, "-c", ASK, str(free_port()),
                               str(tmp_path / "run")],
                              env=env, capture_output=True, text=True, timeout=60)
    finally:
        proxy.close()
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["False False", "metadata: URLError"], done.stdout
    assert proxy.asked == []

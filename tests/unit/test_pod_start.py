"""`pod start`'s hold on Java (sdxl_serve.pod.serve_java), with a real child process in
Java's place: what it does with the stop signals, whatever the child does with them."""

from __future__ import annotations

import signal
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from lifetimes import Started

pytestmark = pytest.mark.unit

# In Java's place: a process that drops the first SIGTERM it gets, as the JVM did once in
# CI while it started, and ends at the second as the JVM does (143).
DROPS_ONE = textwrap.dedent("""
    import signal, sys, time
    got = []
    def on_term(signum, frame):
        got.append(signum)
        if len(got) > 1:
            sys.exit(143)
    signal.signal(signal.SIGTERM, on_term)
    print("listening", flush=True)
    time.sleep(120)
""")
SLEEPS = "import time; time.sleep(60)"


def start(tmp_path: Path, java: str, patch: str = "") -> Started:
    """`start` from where it runs Java (``java``: the child's Python code), with no models,
    so its watcher ends at once; ``patch``: code run first, in the module's place."""
    script = "\n".join([
        "import os, sys",
        "from pathlib import Path",
        "from sdxl_serve import pod",
        "from sdxl_serve.server import Addresses, LoadWatch",
        textwrap.dedent(patch),
        "run = Path(sys.argv[1])",
        "sys.exit(pod.serve_java([sys.executable, '-c', sys.argv[2]], dict(os.environ),",
        "                        pod.PodServer(Addresses.free(), run), LoadWatch(run), [], 60))",
    ])
    return Started([sys.executable, "-c", script, str(tmp_path), java],
                   tmp_path / "out").start()


def test_start_signals_java_again_until_it_ends(tmp_path):
    # A kubelet sends SIGTERM once; a Java that dropped it ran on, serving (once in CI,
    # where `start` execed Java).
    started = start(tmp_path, DROPS_ONE)
    try:
        deadline = time.monotonic() + 30
        while "listening" not in started.tail():
            assert started.process.poll() is None and time.monotonic() < deadline, \
                started.tail()
            time.sleep(0.05)
        started.process.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        code = started.wait(10, "start, sent SIGTERM")
        assert code == 143, started.tail()
        assert time.monotonic() - sent < 3
        # Said once, not at each signal again.
        assert started.tail().count("start: SIGTERM: stopping TorchServe") == 1
    finally:
        started.stop(grace_s=0)  # its whole group: a child left running goes too


def test_a_stop_signal_while_java_starts_is_passed_on(tmp_path):
    # Recorded from before Java's pid is known and passed on once it is: one that comes
    # then is neither lost nor the end of `start` alone (Java left running).
    started = start(tmp_path, SLEEPS, """
        import signal, subprocess
        popen = subprocess.Popen
        def signalled_popen(*args, **kwargs):
            child = popen(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGTERM)  # at once, before any handler knows it
            return child
        pod.subprocess.Popen = signalled_popen
    """)
    try:
        assert started.wait(20, "start, sent SIGTERM as Java started") == 128 + signal.SIGTERM
        assert "start: SIGTERM: stopping TorchServe" in started.tail()
    finally:
        started.stop(grace_s=0)


def test_a_watcher_that_cannot_start_takes_java_with_it(tmp_path):
    # A fork refused (a container's pids limit) raised with Java running: outside a
    # container's end, Java was left, orphaned, holding the ports.
    started = start(tmp_path, SLEEPS, """
        def no_fork():
            raise BlockingIOError(11, "Resource temporarily unavailable")
        pod.os.fork = no_fork
    """)
    try:
        assert started.wait(20, "start, its watcher refused a fork") == 1
        assert "Resource temporarily unavailable" in started.tail()
        assert not [p for p in started.tree() if p.is_running()
                    and p.status() != psutil.STATUS_ZOMBIE], started.tail()
    finally:
        started.stop(grace_s=0)

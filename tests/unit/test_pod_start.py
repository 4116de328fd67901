"""`pod start`'s hold on Java (sdxl_serve.pod.serve_java), with a real child process in
Java's place: what it does with the stop signals, whatever the child does with them."""

from __future__ import annotations

import signal
import sys
import textwrap
import time

import psutil
import pytest

from lifetimes import Started

pytestmark = pytest.mark.unit

# In Java's place: a process that drops the first SIGTERM it gets, as a JVM can while it
# starts (its handler is set before the table it dispatches from is filled), and ends at
# the second as the JVM does (143).
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

# `start` from where it runs Java: no models, so its watcher ends at once.
START = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from sdxl_serve.pod import PodServer, serve_java
    from sdxl_serve.server import Addresses, LoadWatch
    run = Path(sys.argv[1])
    sys.exit(serve_java([sys.executable, "-c", sys.argv[2]], dict(os.environ),
                        PodServer(Addresses.free(), run), LoadWatch(run), [], 60))
""")


def test_start_signals_java_again_until_it_ends(tmp_path):
    # A kubelet sends SIGTERM once; a Java that dropped it ran on, serving (once in CI,
    # where `start` execed Java).
    log = tmp_path / "out"
    start = Started([sys.executable, "-c", START, str(tmp_path), DROPS_ONE], log).start()
    try:
        deadline = time.monotonic() + 30
        while "listening" not in start.tail():
            assert start.process.poll() is None and time.monotonic() < deadline, start.tail()
            time.sleep(0.05)
        start.process.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        code = start.wait(10, "start, sent SIGTERM")
        assert code == 143, start.tail()
        assert time.monotonic() - sent < 3
        # Said once, not at each signal again.
        assert log.read_text().count("start: SIGTERM: stopping TorchServe") == 1
    finally:
        start.stop(grace_s=0)  # its whole group: a child left running goes too


def test_a_stop_signal_while_java_starts_is_passed_on(tmp_path):
    # Recorded from before Java's pid is known and passed on once it is: one that comes
    # then is neither lost nor the end of `start` alone (Java left running).
    code = textwrap.dedent("""
        import os, signal, subprocess, sys
        from pathlib import Path
        from sdxl_serve import pod
        from sdxl_serve.pod import PodServer, serve_java
        from sdxl_serve.server import Addresses, LoadWatch
        started = subprocess.Popen
        def popen(*args, **kwargs):
            child = started(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGTERM)  # at once, before any handler knows it
            return child
        pod.subprocess.Popen = popen
        run = Path(sys.argv[1])
        sys.exit(serve_java([sys.executable, "-c", "import time; time.sleep(60)"],
                            dict(os.environ), PodServer(Addresses.free(), run),
                            LoadWatch(run), [], 60))
    """)
    start = Started([sys.executable, "-c", code, str(tmp_path)], tmp_path / "out").start()
    try:
        assert start.wait(20, "start, sent SIGTERM as Java started") == 128 + signal.SIGTERM
        assert "start: SIGTERM: stopping TorchServe" in start.tail()
    finally:
        start.stop(grace_s=0)


def test_a_watcher_that_cannot_start_takes_java_with_it(tmp_path):
    # A fork refused (a container's pids limit) raised with Java running: outside a
    # container's end, Java was left, orphaned, holding the ports.
    code = textwrap.dedent("""
        import os, sys
        from pathlib import Path
        from sdxl_serve import pod
        from sdxl_serve.pod import PodServer, serve_java
        from sdxl_serve.server import Addresses, LoadWatch
        def no_fork():
            raise BlockingIOError(11, "Resource temporarily unavailable")
        pod.os.fork = no_fork
        run = Path(sys.argv[1])
        serve_java([sys.executable, "-c", "import time; print('java', flush=True); "
                    "time.sleep(60)"], dict(os.environ), PodServer(Addresses.free(), run),
                   LoadWatch(run), [], 60)
    """)
    start = Started([sys.executable, "-c", code, str(tmp_path)], tmp_path / "out").start()
    try:
        assert start.wait(20, "start, its watcher refused a fork") == 1
        assert "Resource temporarily unavailable" in start.tail()
        assert not [p for p in start.tree() if p.is_running()
                    and p.status() != psutil.STATUS_ZOMBIE], start.tail()
    finally:
        start.stop(grace_s=0)

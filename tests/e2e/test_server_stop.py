"""TorchServeProcess.stop ends the whole server, Java included, even when the polite
SIGTERM runs out of time or is ignored."""

from __future__ import annotations

import pytest

from sdxl_serve.cancellation import process_running
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


@pytest.mark.parametrize("java_home", ["/nonexistent/jdk", None])
def test_no_java_to_run_is_one_line_naming_it_not_a_traceback(tmp_path, java_home):
    """A JAVA_HOME that names no JDK, or no `java` on PATH: make serve ended with a
    FileNotFoundError traceback from inside subprocess, after building the archive."""
    from sdxl_serve.server import ServerError

    env = {"JAVA_HOME": java_home} if java_home else {"JAVA_HOME": "", "PATH": str(tmp_path)}
    server = TorchServeProcess(tmp_path / "run", tmp_path / "store", {}, Addresses.free(),
                               env=env)
    (tmp_path / "store").mkdir()
    try:
        with pytest.raises(ServerError) as refused:
            server.start()
    finally:
        server.stop()
    expected = (f"JAVA_HOME={java_home} has no runnable bin/java" if java_home
                else "no `java` on PATH")
    assert expected in str(refused.value) and "Java 17" in str(refused.value)
    assert server.process is None


def test_a_java_that_ignores_sigterm_is_killed_with_its_whole_group(tmp_path):
    """The real Java stops at SIGTERM within the wait, so the test above passes without the
    kill; a `java` that ignores it (and a child of its, as a worker is) shows the kill."""
    import os
    import signal
    import time

    java_home = tmp_path / "jdk"
    (java_home / "bin").mkdir(parents=True)
    stub = java_home / "bin" / "java"
    # Ignores SIGTERM, as does the child it starts (ignored signals are inherited).
    stub.write_text("#!/bin/sh\ntrap '' TERM\nsleep 600 &\nwait\n")
    stub.chmod(0o755)
    (tmp_path / "store").mkdir()
    server = TorchServeProcess(tmp_path / "run", tmp_path / "store", {}, Addresses.free(),
                               env={"JAVA_HOME": str(java_home)})
    server.start()
    try:
        java = server.java_pid()
        deadline = time.monotonic() + 10
        while not [p for p in os.listdir("/proc") if p.isdigit() and _group_of(int(p)) == java
                   and int(p) != java] and time.monotonic() < deadline:
            time.sleep(0.05)  # its child started
        server.stop(timeout=0.5)
        assert server.process is None and not process_running(java)
        assert not [p for p in os.listdir("/proc") if p.isdigit()
                    and _group_of(int(p)) == java and process_running(int(p))]
    finally:
        server.stop()
        try:
            os.killpg(java, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _group_of(pid: int) -> int | None:
    import os

    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None

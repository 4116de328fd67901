"""How long the processes and waits of a test live: one way to start and end a process
tree, deadlines that nest inside pytest's timeout, and the leak check's process scan.

Every process the suite starts carries ``SDXL_TEST_RUN=<this run>`` in its environment
(tests/conftest.py sets it in pytest's own environment at the start of the run, so any
``subprocess``/``Popen`` inherits it, whoever calls it), and the pytest process is a child
subreaper, so an orphan (an engine process after its worker died, a daemon) is re-parented
to pytest instead of init. At the end of the run, every live process carrying the mark is a
leak (``leftovers``).

``Started`` adds a tag of its own to one command, so ``stop`` ends everything that command
started, in whatever process group or session it ended up (TorchServe puts Java in a
session of its own, tini puts its child in a group of its own), even after the command
itself has died.

Example:
    server = Started([sys.executable, "scripts/bench.py"], log_path=tmp_path / "bench.out")
    with server:  # stop() on the way out, however the block ends
        server.wait(deadline.left())
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import psutil
import pytest

RUN_VAR = "SDXL_TEST_RUN"
TAG_VAR = "SDXL_TEST_TAG"
PR_SET_CHILD_SUBREAPER = 36
PF_KTHREAD = 0x00200000
# A process caught mid-exec shows its environment within a millisecond (measured: 169 of 300
# Popens read empty at once, none 1 ms later); 0.1 s is far beyond that, and bounds the cost
# of a process whose environment is empty for good.
EXEC_LOOKS, EXEC_LOOK_S = 6, 0.02


def become_subreaper() -> bool:
    """Make this process inherit its descendants' orphans (Linux); False elsewhere."""
    if not sys.platform.startswith("linux"):
        return False
    return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def marked(name: str, value: str) -> list[psutil.Process]:
    """Live processes (zombies aside) of this user whose environment has ``name=value``."""
    needle = f"{name}={value}".encode()
    found, blank = [], list(psutil.process_iter())
    for attempt in range(EXEC_LOOKS):
        if attempt:
            time.sleep(EXEC_LOOK_S)
        pending, blank = blank, []
        for process in pending:
            environ = environment(process.pid)
            try:
                if environ == b"" and not kernel_thread(process.pid) \
                        and process.status() != psutil.STATUS_ZOMBIE:
                    # Right after exec the new program's memory is there before its
                    # environment is (Popen returns in between): empty for a moment.
                    blank.append(process)
                elif environ and needle in environ.split(b"\0") \
                        and process.status() != psutil.STATUS_ZOMBIE:
                    found.append(process)
            except psutil.Error:
                continue  # ended meanwhile
        if not blank:
            break
    return found


def environment(pid: int) -> bytes | None:
    """/proc/<pid>/environ, raw (psutil's parse is slow for a scan of every process); None
    for a process that ended or is another user's."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as environ:
            return environ.read()
    except OSError:
        return None


def kernel_thread(pid: int) -> bool:
    """A kernel thread has no environment, ever (PF_KTHREAD in /proc/<pid>/stat's flags)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            flags = int(stat.read().rsplit(b")", 1)[1].split()[6])
    except (OSError, IndexError, ValueError):
        return True  # ended meanwhile: nothing to look at again
    return bool(flags & PF_KTHREAD)


def end_all(processes: Sequence[psutil.Process], timeout: float = 10.0) -> list[psutil.Process]:
    """SIGKILL each process and its process group; those still alive after ``timeout``."""
    me = os.getpgrp()
    for process in processes:
        try:
            group = os.getpgid(process.pid)
            if group != me:
                os.killpg(group, signal.SIGKILL)
            process.kill()
        except (OSError, psutil.Error):
            pass
    _, alive = psutil.wait_procs(list(processes), timeout=timeout)
    return [process for process in alive if _live(process)]


def reap_zombies() -> None:
    """Collect exited children nobody waits for (orphans re-parented to us, a subreaper)."""
    for child in psutil.Process().children():
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                os.waitpid(child.pid, os.WNOHANG)
        except (OSError, psutil.Error):
            pass


def _live(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class Started:
    """One command in a session of its own, tagged so that ``stop`` ends all it started.

    ``stop`` sends SIGTERM to the command's process group and gives it ``grace_s`` to end
    (a server's own shutdown runs), then SIGKILLs the group and every process that carries
    the tag, whichever group or session it is in. Safe to call twice, and after a failed
    start; ``with`` calls it.
    """

    def __init__(self, command: Sequence[str], log_path: Path | None = None,
                 env: Mapping[str, str] | None = None, cwd: Path | str | None = None,
                 **popen: object):
        self.command = list(command)
        self.log_path = log_path
        self.tag = uuid.uuid4().hex
        self.env = {**(os.environ if env is None else env), TAG_VAR: self.tag}
        self.cwd = cwd
        self.popen = popen
        self.process: subprocess.Popen | None = None

    def start(self) -> "Started":
        output = {}
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            output = {"stdout": open(self.log_path, "ab"), "stderr": subprocess.STDOUT}
        try:
            self.process = subprocess.Popen(self.command, env=self.env, cwd=self.cwd,
                                            start_new_session=True, **output, **self.popen)
        finally:
            if output:
                output["stdout"].close()
        return self

    def __enter__(self) -> "Started":
        if self.process is None:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        return self.process.pid

    def tree(self) -> list[psutil.Process]:
        """Every live process this command started, wherever it is now."""
        return marked(TAG_VAR, self.tag)

    def wait(self, timeout: float, what: str = "") -> int:
        """The exit code; a test failure naming the command and its output's tail if it
        runs longer than ``timeout`` (the caller's ``stop`` ends it)."""
        try:
            return self.process.wait(timeout=max(0.0, timeout))
        except subprocess.TimeoutExpired:
            pytest.fail(f"{what or ' '.join(self.command[:3])} still running after "
                        f"{timeout:.0f} s; its output ends:\n{self.tail()}", pytrace=False)

    def tail(self, lines: int = 40) -> str:
        if self.log_path is None:
            return ""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, grace_s: float = 10.0) -> None:
        if self.process is None:
            return
        try:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
        finally:
            # Whatever happened above (even a second timeout), the rest goes.
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            left = end_all(self.tree())
            self.process.wait(timeout=30)
            assert not left, f"still alive after SIGKILL: {left}"


def as_pid_1(command: list[str]) -> list[str]:
    """``command`` as PID 1 of a PID namespace of its own, as a container's command runs,
    where unshare can make one here (a user namespace too, so no root is needed); else as
    it is, which tests the rest."""
    wrapped = ["unshare", "--user", "--map-root-user", "--pid", "--fork", "--kill-child"]
    if shutil.which("unshare") and subprocess.run(
            [*wrapped, "true"], capture_output=True, timeout=30).returncode == 0:
        return [*wrapped, *command]
    return command


def child_of(pid: int) -> int:
    """The pid of ``pid``'s one child process."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        if parent == pid:
            return int(stat.parent.name)
    raise AssertionError(f"process {pid} has no child")


def run(command: Sequence[str], timeout: float, log_path: Path, what: str = "",
        grace_s: float = 10.0, **kwargs: object) -> tuple[int, str]:
    """(exit code, output) of ``command`` run to its end within ``timeout`` s; a test
    failure with the output's tail when it takes longer. Everything it started is ended
    before this returns, on every path (a pytest timeout included), after ``grace_s`` for
    its own cleanup."""
    started = Started(command, log_path, **kwargs).start()
    try:
        code = started.wait(timeout, what)
    finally:
        started.stop(grace_s)
    return code, log_path.read_text(errors="replace")


class Deadline:
    """A point in time that waits inside a test share, so an inner wait fails first, with
    its own message, instead of pytest's timeout killing the test mid-wait."""

    def __init__(self, seconds: float):
        self.at = time.monotonic() + seconds

    def left(self, reserve: float = 0.0) -> float:
        """Seconds until the deadline, less ``reserve`` kept for what comes after."""
        return max(0.0, self.at - time.monotonic() - reserve)

    def passed(self) -> bool:
        return time.monotonic() >= self.at


def timeout_of(item: pytest.Item) -> float | None:
    """The pytest-timeout limit that applies to ``item`` (its marker, else the option or
    setup.cfg's ``timeout``); None when there is none."""
    marker = item.get_closest_marker("timeout")
    if marker is not None:
        seconds = marker.args[0] if marker.args else marker.kwargs.get("timeout")
    else:
        seconds = item.config.getoption("timeout", None) or item.config.getini("timeout")
    try:
        seconds = float(seconds)
    except (TypeError, ValueError):
        return None
    return seconds if seconds > 0 else None


def wait_until(condition, deadline: float, what: str, interval: float = 0.1, detail=None):
    """Poll ``condition`` until it returns something true and return that; a test failure
    saying ``what`` was awaited (and ``detail()``, if given) once ``deadline`` seconds have
    passed."""
    give_up = time.monotonic() + deadline
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > give_up:
            pytest.fail(f"waited {deadline:.0f} s for {what}"
                        + (f": {detail()}" if detail else ""), pytrace=False)
        time.sleep(interval)


def started_and_ready(server, models: Iterable[str], timeout: float):
    """``server.start()``, then ``server.wait_ready(model, timeout=timeout)`` for each model;
    a server that does not get ready is stopped before the error goes on. For any server
    class with ``start``, ``wait_ready`` and ``stop`` (TorchServe's, Triton's)."""
    server.start()
    try:
        for model in models:
            server.wait_ready(model, timeout=timeout)
    except BaseException:
        server.stop()
        raise
    return server


def cpu_seconds(pid: int) -> float:
    """CPU time a process has used (user + system), from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def live_cpu_seconds(pids) -> float:
    """CPU time the processes of ``pids`` still alive have used, together."""
    total = 0.0
    for pid in pids:
        try:
            total += cpu_seconds(pid)
        except (OSError, IndexError):
            continue  # ended since it was listed
    return total


def killed_mid_rewrite(redis_process, url: str, data_dir: Path, data: bytes) -> None:
    """Have the Redis at ``url`` (``redis_process``, a ``Managed``, whose `dir` is
    ``data_dir``) rewrite its append-only file, 20 keys of 256 KiB beginning with ``data``
    in it (``sdxl:image:*``, expiring in 3 s), and kill its group with SIGKILL once the
    rewrite's partial copy holds ``data``: as kill -9 or the OOM killer would."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        for index in range(20):  # a job's prompt beside its images, as large
            client.set(f"sdxl:image:{index}", data + os.urandom(256 << 10), ex=3)
        # Each key then takes 0.1 s to copy: the rewrite is still under way when killed.
        client.config_set("rdb-key-save-delay", 100_000)
        client.bgrewriteaof()
        wait_until(lambda: any(data in path.read_bytes()
                               for path in data_dir.glob("temp-rewriteaof-*")), 15,
                   "the rewrite to copy a key",
                   detail=lambda: sorted(path.name for path in data_dir.iterdir()))
    finally:
        client.close()
    redis_process.kill(signal.SIGKILL)
    redis_process.process.wait(10)

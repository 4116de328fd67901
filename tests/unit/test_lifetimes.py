"""The suite's own process and file hygiene (tests/lifetimes.py, tests/leak_check.py), with
real processes: a tree spread over sessions is ended whole, a command past its deadline
fails with its output and leaves nothing, and the session-end check names what was left."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

import psutil
import pytest

import leak_check
from lifetimes import RUN_VAR, Deadline, Started, run, wait_until

pytestmark = pytest.mark.unit

# A shell that ignores SIGTERM and starts a sleeper in a session of its own (as TorchServe
# starts Java): neither the group's SIGTERM nor its SIGKILL reaches that one.
STUBBORN = "trap '' TERM; setsid sleep {0} & echo started; sleep {0}"


def sleepers(seconds: str) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if process.info["cmdline"] == ["sleep", seconds] and \
                    process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except psutil.Error:
            pass
    return found


def unique_seconds() -> str:
    return f"{300 + time.monotonic_ns() % 10**6 / 10**6:.6f}"


def test_stop_ends_a_tree_spread_over_sessions(tmp_path):
    seconds = unique_seconds()
    started = Started(["bash", "-c", STUBBORN.format(seconds)], tmp_path / "out.log").start()
    wait_until(lambda: len(sleepers(seconds)) == 2, 10, "both sleepers")
    sessions = {os.getsid(p.pid) for p in sleepers(seconds)}
    assert len(sessions) == 2  # one escaped the command's session
    assert {p.pid for p in sleepers(seconds)} <= {p.pid for p in started.tree()}
    began = time.monotonic()
    started.stop(grace_s=1)
    assert time.monotonic() - began < 10
    assert sleepers(seconds) == [] and started.tree() == []


def test_a_command_past_its_deadline_fails_with_its_output_and_leaves_nothing(tmp_path):
    seconds = unique_seconds()
    with pytest.raises(pytest.fail.Exception) as failed:
        run(["bash", "-c", STUBBORN.format(seconds)], 1.0, tmp_path / "out.log", "the sleeper",
            grace_s=1)
    assert "the sleeper still running after 1 s" in str(failed.value)
    assert "started" in str(failed.value)  # the output's tail
    assert sleepers(seconds) == []


def test_run_gives_the_exit_code_and_output(tmp_path):
    code, output = run([sys.executable, "-c", "print('hello'); raise SystemExit(3)"], 30,
                       tmp_path / "out.log")
    assert code == 3 and output == "hello\n"


def test_a_deadline_counts_down_and_keeps_a_reserve():
    deadline = Deadline(100)
    assert 99 < deadline.left() <= 100 and 39 < deadline.left(reserve=60) <= 40
    assert deadline.left(reserve=200) == 0 and not deadline.passed()
    assert Deadline(-1).passed() and Deadline(-1).left() == 0


def test_the_session_check_names_a_left_process_and_file_then_ends_the_process(tmp_path):
    run_id = uuid.uuid4().hex
    state = {"run": run_id, "repo": tmp_path, "files": leak_check.listing(tmp_path)}
    (tmp_path / "kept.txt").write_text("x")
    state["files"] = leak_check.listing(tmp_path)
    left = subprocess.Popen(["sleep", "300"], env={**os.environ, RUN_VAR: run_id},
                            start_new_session=True)
    (tmp_path / "build").mkdir()
    (tmp_path / "build" / "written.txt").write_text("by a test")
    (tmp_path / "kept.txt").write_text("changed")
    try:
        # Only the marked process: pytest's other children (fixtures' servers) are not
        # this check's business here.
        problems = "\n".join(leak_check.finish(state, settle_s=0.5, descendants=False))
        assert f"pid {left.pid} " in problems and "sleep 300" in problems
        assert "build/written.txt" in problems and "kept.txt" in problems
        # Killed by the check (psutil reaped it: its exit status is gone with it).
        left.wait(timeout=10)
        assert leak_check.leftovers(run_id, descendants=False) == []
    finally:
        left.kill()
        left.wait()
    assert leak_check.finish({**state, "files": leak_check.listing(tmp_path)},
                             settle_s=0, descendants=False) == []

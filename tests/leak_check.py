"""The session-end check: a run that leaves a process alive or a new file in the checkout
fails, naming what it left (tests/conftest.py calls ``begin`` and ``finish``).

Processes: everything the tests started carries ``SDXL_TEST_RUN`` (lifetimes.py) or
descends from pytest (a subreaper: orphans come back to it). Multiprocessing's fork server
and resource tracker are pytest's own helpers, ended when pytest exits; what *they* started
(engine processes) counts. Whatever is found is reported, then killed, so a failed check
leaves nothing behind either.

Files: the checkout is listed before and after (size and modification time), without
.git, the venv and the caches Python and pytest keep (__pycache__, .pytest_cache). A file
that appeared, vanished or changed is a failure, ignored by .gitignore or not; a tracked
file that changed is not (a person may edit code while the tests run).
"""

from __future__ import annotations

import multiprocessing.forkserver
import multiprocessing.resource_tracker
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import psutil

from lifetimes import RUN_VAR, become_subreaper, end_all, marked, reap_zombies

SKIPPED_DIRS = {".git", ".venv", "__pycache__", ".pytest_cache"}
SETTLE_S = 10.0  # for processes that were killed a moment ago to be gone


def begin(repo: Path) -> dict:
    """Mark this run's processes and list the checkout; the state ``finish`` needs."""
    run = uuid.uuid4().hex
    os.environ[RUN_VAR] = run  # putenv: every child inherits it
    # Hypothesis keeps its example database and caches in ./.hypothesis unless told; it
    # reads this when it first writes (collection included).
    hypothesis_home = tempfile.mkdtemp(prefix="sdxl-test-hypothesis-")
    os.environ["HYPOTHESIS_STORAGE_DIRECTORY"] = hypothesis_home
    return {"run": run, "repo": repo, "subreaper": become_subreaper(),
            "files": listing(repo), "hypothesis_home": hypothesis_home}


def listing(repo: Path) -> dict[str, tuple[int, int]]:
    found = {}
    for root, dirs, files in os.walk(repo):
        dirs[:] = [d for d in dirs if d not in SKIPPED_DIRS]
        for name in files:
            path = os.path.join(root, name)
            try:
                stat = os.lstat(path)
            except OSError:
                continue
            found[os.path.relpath(path, repo)] = (stat.st_size, stat.st_mtime_ns)
    return found


def tracked(repo: Path) -> set[str] | None:
    try:
        done = subprocess.run(["git", "ls-files", "-z"], cwd=repo, capture_output=True,
                              timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return set(done.stdout.decode().split("\0")) if done.returncode == 0 else None


def own_helpers() -> set[int]:
    """Pids of multiprocessing's helpers that live exactly as long as pytest."""
    pids = {os.getpid()}
    server = getattr(multiprocessing.forkserver, "_forkserver", None)
    tracker = getattr(multiprocessing.resource_tracker, "_resource_tracker", None)
    for pid in (getattr(server, "_forkserver_pid", None), getattr(tracker, "_pid", None)):
        if pid:
            pids.add(pid)
    return pids


def leftovers(run: str, descendants: bool = True) -> list[psutil.Process]:
    """Live processes marked with ``run`` and (``descendants``) pytest's own children's
    trees, multiprocessing's helpers aside."""
    helpers = own_helpers()
    found = {p.pid: p for p in marked(RUN_VAR, run)}
    for child in psutil.Process().children(recursive=True) if descendants else ():
        found.setdefault(child.pid, child)
    live = []
    for pid, process in found.items():
        try:
            if pid not in helpers and process.status() != psutil.STATUS_ZOMBIE:
                live.append(process)
        except psutil.Error:
            pass
    return live


def describe(process: psutil.Process) -> str:
    try:
        return (f"pid {process.pid} (parent {process.ppid()}, group "
                f"{os.getpgid(process.pid)}): {' '.join(process.cmdline())[:160]}")
    except (OSError, psutil.Error):
        return f"pid {process.pid} (ended meanwhile)"


def finish(state: dict, settle_s: float = SETTLE_S, descendants: bool = True) -> list[str]:
    """The check's complaints (empty: nothing was left behind).

    ``descendants``: count pytest's whole tree and reap its zombies (at the session's end);
    False looks only at the marked processes and reaps nothing, so that a ``Popen`` still
    in use keeps its exit status (the check's own tests).
    """
    reap = reap_zombies if descendants else (lambda: None)
    problems = []
    shutil.rmtree(state.get("hypothesis_home", ""), ignore_errors=True)
    deadline = time.monotonic() + settle_s
    while True:
        reap()
        left = leftovers(state["run"], descendants)
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if left:
        problems.append(f"{len(left)} process(es) started by the tests were still alive "
                        f"{settle_s:.0f} s after the last test (now killed):")
        problems += ["  " + describe(process) for process in left]
        end_all(left)
        reap()
    before, after = state["files"], listing(state["repo"])
    ours = tracked(state["repo"]) or set()
    new = sorted(set(after) - set(before))
    gone = sorted(set(before) - set(after))
    changed = sorted(path for path in set(before) & set(after)
                     if before[path] != after[path] and path not in ours)
    for label, paths in (("new", new), ("removed", gone), ("changed", changed)):
        if paths:
            problems.append(f"the tests left {len(paths)} {label} file(s) in the checkout "
                            f"(tests write only under tmp_path):")
            problems += [f"  {path}" for path in paths[:20]]
    return problems

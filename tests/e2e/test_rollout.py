"""Rollouts end to end: scripts/rollout.py against a real TorchServe while clients keep calling.

The server has its own model store with three archives: 2.0 (the tiny model, built by
build_archive.py), 1.0, a copy of 2.0 whose worker holds a request with the prompt
`slow-on-purpose` while the file ``hold_file`` exists and serves the others as 2.0 does,
and 3.0, built from a copy of the tiny model with a weight file cut short, which fails the
manifest check when the model loads; and copies of 2.0 broken after the build (see
``broken_copy``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import psutil
import pytest

from archives import patched_archive
from conftest import start_server
from lifetimes import Deadline, timeout_of, wait_until
from sdxl_serve.management import http
from sdxl_serve.metrics import scraped_max

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
CLIENTS = 4
# 3.0's UNet weights, cut to this many bytes after the manifest recorded their size.
TRUNCATED_TO = 1024
# Kept after the test's deadline (its pytest timeout less this) for the clients to stop
# (each call has a 120 s timeout) and the checks: the deadline fails first, saying where.
RESERVE_S = 180
# How long a batch with the prompt `slow-on-purpose` sleeps in a ``broken_copy(...,
# slow_requests=True)``: longer than a rollout takes to reach its drain.
SLOW_S = 20
# What such a copy's worker prints as it takes a `slow-on-purpose` request.
SLOW_TAKEN = "taken: slow-on-purpose"


@pytest.fixture
def deadline(request) -> Deadline:
    """Where the rollouts and the clients give up: inside pytest's timeout, not at it."""
    return Deadline(timeout_of(request.node) - RESERVE_S)


@pytest.fixture(scope="module")
def hold_file(tmp_path_factory) -> Path:
    """While it exists, 1.0's worker holds a request with the prompt `slow-on-purpose`."""
    return tmp_path_factory.mktemp("hold") / "hold-1.0"


@pytest.fixture(scope="module")
def rollout_store(tmp_path_factory, tiny_model_dir, hold_file) -> Path:
    from build_archive import build_archive

    store = tmp_path_factory.mktemp("rollout_store")
    build_archive("sdxl", "2.0", None, store, tiny_model=tiny_model_dir)
    # A drain of 1.0 that cannot finish in time, for sure, however long a load takes.
    broken_copy(store, "1.0", hold_requests_while=hold_file)
    # Fails at load in a way the build cannot see (it refuses a bad setting itself): a
    # weight file cut short, as an interrupted copy leaves it. The worker's manifest check
    # refuses it before any weight is read.
    truncated = tmp_path_factory.mktemp("truncated_model") / "tiny-sdxl"
    shutil.copytree(tiny_model_dir, truncated)
    unet = truncated / "unet" / "diffusion_pytorch_model.safetensors"
    unet.write_bytes(unet.read_bytes()[:TRUNCATED_TO])
    build_archive("sdxl", "3.0", None, store, tiny_model=truncated)
    return store


def serving_1_0(run_dir: Path, store: Path):
    """A started server of ``store``'s archives, serving its 1.0 as model ``sdxl``."""
    env = {
        # One thread per worker: the busy old version must leave a core for the new one
        # to load on a two-core machine.
        "OMP_NUM_THREADS": "1",
        # As a shell that exported it has it: the workers still run their archive's code,
        # which the broken copies below (broken_copy) change (server.archive_code_path).
        "PYTHONPATH": str(REPO / "handler"),
    }
    return start_server(run_dir, store, {"sdxl": "sdxl-1.0.mar"}, env=env)


@pytest.fixture(scope="module")
def rollout_server(tmp_path_factory, rollout_store):
    server = serving_1_0(tmp_path_factory.mktemp("rollout_run"), rollout_store)
    yield server
    server.stop()


@dataclass
class Outcome:
    started: float
    ended: float
    status: int
    version: str | None
    header_version: str | None


class Load:
    """``clients`` threads calling the default version without pause, until stopped."""

    def __init__(self, server, deadline: Deadline, clients: int = CLIENTS):
        self.server = server
        self.deadline = deadline
        self.outcomes: list[Outcome] = []
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self.client, args=(i,)) for i in range(clients)]

    def client(self, index: int) -> None:
        url = f"{self.server.addresses.inference}/predictions/sdxl"
        # The cheapest real generation: smallest size, 2 steps, no classifier-free guidance.
        body = json.dumps({"prompt": "rollout load", "seed": index, "width": 32, "height": 32,
                           "num_inference_steps": 2, "guidance_scale": 1.0}).encode()
        while not self.stopping.is_set() and not self.deadline.passed():
            started = time.monotonic()
            try:
                status, headers, data = http("POST", url, self.server.keys()["inference"], body,
                                             timeout=120)
            except OSError as exc:
                status, headers, data = -1, {}, str(exc).encode()
            try:
                version = json.loads(data).get("model_version")
            except ValueError:
                version = None
            self.outcomes.append(Outcome(started, time.monotonic(), status, version,
                                         headers.get("X-Model-Version")))

    def wait_for_answers_since(self, since: float, count: int = 4,
                               timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while sum(o.started >= since for o in list(self.outcomes)) < count:
            assert time.monotonic() < deadline, "the clients got no answers"
            time.sleep(0.1)

    def __enter__(self) -> "Load":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=150)


def rollout_command(server, store: Path, *args: str) -> dict:
    """subprocess arguments of rollout.py on ``server`` with ``args``."""
    env = dict(os.environ, TS_INFERENCE_ADDRESS=server.addresses.inference,
               TS_MANAGEMENT_ADDRESS=server.addresses.management,
               TS_METRICS_ADDRESS=server.addresses.metrics)
    return {"args": [sys.executable, "scripts/rollout.py", "--model-store", str(store),
                     "--key-file", str(server.run_dir / "key_file.json"),
                     "--load-timeout", "240", "--drain-timeout", "120", *args],
            "cwd": REPO, "env": env, "text": True}


def slow_request(server, version: str) -> threading.Thread:
    """A request to ``version`` (a ``slow_requests`` copy) that its worker holds ``SLOW_S``
    (1.0: while ``hold_file`` exists), sent in a thread; returned once the worker has taken
    it."""
    taken = slow_requests_taken(server, version)
    slow = threading.Thread(target=http, args=(
        "POST", f"{server.addresses.inference}/predictions/sdxl/{version}",
        server.keys()["inference"], b'{"prompt": "slow-on-purpose"}'), kwargs={"timeout": 120})
    slow.start()
    # Taken by the worker when its line is in the log: a fixed second was not always
    # enough on two busy cores, and the request could still be queued.
    wait_until(lambda: slow_requests_taken(server, version) > taken, 60,
               f"{version}'s worker to take the slow request")
    return slow


def slow_requests_taken(server, version: str) -> int:
    """How many `slow-on-purpose` requests the workers of ``version`` have taken (each says
    ``SLOW_TAKEN`` as it takes one)."""
    log = (server.run_dir / "logs" / "model_log.log").read_text(errors="replace")
    return len(re.findall(rf"W-\d+-sdxl_{re.escape(version)}-stdout MODEL_LOG - "
                          rf"{SLOW_TAKEN}$", log, re.MULTILINE))


@contextlib.contextmanager
def holding(server, hold_file: Path) -> Iterator[None]:
    """1.0's worker holds a request (``slow_request``) for the block, released after it."""
    hold_file.touch()
    held = slow_request(server, "1.0")
    try:
        yield
    finally:
        hold_file.unlink()
        held.join(timeout=120)


def interrupted_at(server, store: Path, args: list[str], marker: str, then) -> tuple[int, str]:
    """rollout.py with ``args``, sent Ctrl-C once it has printed ``marker`` and ``then()``
    has returned: (its exit code, all it printed)."""
    run = subprocess.Popen(**rollout_command(server, store, *args), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT)
    try:
        said = []
        for line in run.stdout:
            said.append(line)
            if marker in line:
                break
        assert marker in said[-1], "".join(said)
        then()
        run.send_signal(signal.SIGINT)
        said.append(run.communicate(timeout=120)[0])
    finally:
        run.kill()
        run.wait()
    return run.returncode, "".join(said)


def rollout(server, store: Path, *args: str, deadline: Deadline
            ) -> subprocess.CompletedProcess:
    try:
        result = subprocess.run(**rollout_command(server, store, *args), capture_output=True,
                                timeout=deadline.left())
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"rollout.py {' '.join(args)} was still running at the test's deadline "
                    f"({RESERVE_S} s before its pytest timeout); its output:\n{exc.stdout}\n"
                    f"{exc.stderr}", pytrace=False)
    print(result.stdout, result.stderr)
    return result


def described(server) -> dict[str, dict]:
    status, _, body = http("GET", f"{server.addresses.management}/models/sdxl/all",
                           server.keys()["management"])
    assert status == 200, body
    return {entry["modelVersion"]: entry for entry in json.loads(body)}


def default_version(server) -> str:
    status, _, body = http("GET", f"{server.addresses.management}/models/sdxl",
                           server.keys()["management"])
    assert status == 200, body
    return json.loads(body)[0]["modelVersion"]


def worker_pids(server) -> set[int]:
    """Pids of the live backend worker processes this server has started."""
    pids = set()
    for process in psutil.Process(server.process.pid).children(recursive=True):
        try:
            if (process.status() != psutil.STATUS_ZOMBIE
                    and any("model_service_worker" in part for part in process.cmdline())):
                pids.add(process.pid)
        except psutil.NoSuchProcess:
            pass
    return pids


def worker_starts(server, version: str) -> int:
    """How many worker processes of ``version`` TorchServe has started so far."""
    log = (server.run_dir / "logs" / "ts_log.log").read_text(errors="replace")
    return len(re.findall(rf"W-\d+-sdxl_{re.escape(version)} State change \S+ -> "
                          rf"WORKER_STARTED$", log, re.MULTILINE))


def described_pids(server) -> dict[str, set[int]]:
    return {version: {w["pid"] for w in entry["workers"]}
            for version, entry in described(server).items()}


def test_rollout_and_rollback_under_load_lose_no_request(rollout_server, rollout_store,
                                                          hold_file, deadline):
    server, store = rollout_server, rollout_store
    assert default_version(server) == "1.0"
    first_pids = described_pids(server)["1.0"]
    with Load(server, deadline) as load:
        load.wait_for_answers_since(0)
        # 1.0 -> 2.0, with 1 s to drain 1.0 while its worker holds a request: the switch
        # is undone, 2.0 stays loaded.
        with holding(server, hold_file):
            cut_short = rollout(server, store, "--version", "2.0", "--drain-timeout", "1",
                                deadline=deadline)
        assert cut_short.returncode == 1
        assert "step 4 failed: 1.0 still has" in cut_short.stderr, cut_short.stderr
        assert waited_s(cut_short.stderr, "1") >= 1, cut_short.stderr
        assert "1.0 is the default version again" in cut_short.stderr
        assert default_version(server) == "1.0" and described_pids(server)["2.0"]
        # 1.0 -> 2.0, finishing what the first run left.
        result = rollout(server, store, "--version", "2.0", deadline=deadline)
        assert result.returncode == 0, result.stderr
        rolled_out = time.monotonic()
        assert "2.0 is already registered" in result.stdout
        assert "[4/5] drain 1.0" in result.stdout
        # Its summary counts as a person reads: "(1 workers)" before.
        assert "registered: 1.0 (0 workers), 2.0 (1 worker)" in result.stdout, result.stdout
        v2_pids = described_pids(server)["2.0"]
        assert v2_pids and not described_pids(server)["1.0"]
        # The drained old version stays registered without workers: TorchServe refuses a
        # call to it by version with a 503 (the rollback loads it again).
        status, _, body = http("POST", f"{server.addresses.inference}/predictions/sdxl/1.0",
                               server.keys()["inference"], b'{"prompt": "old"}', timeout=60)
        assert status == 503, (status, body)
        # Again: harmless, every step already done.
        again = rollout(server, store, "--version", "2.0", deadline=deadline)
        assert again.returncode == 0, again.stderr
        assert "already registered" in again.stdout and "already the default" in again.stdout
        assert "nothing to drain" in again.stdout
        load.wait_for_answers_since(rolled_out)
        # 2.0 -> back to 1.0.
        rolling_back = time.monotonic()
        back = rollout(server, store, "--rollback", deadline=deadline)
        assert back.returncode == 0, back.stderr
        assert "the previous kept version is 1.0" in back.stdout
        rolled_back = time.monotonic()
        load.wait_for_answers_since(rolled_back)
    outcomes = load.outcomes

    failed = [o for o in outcomes if o.status != 200]
    assert not failed, f"{len(failed)} of {len(outcomes)} requests failed: {failed[:3]}"
    assert all(o.version == o.header_version for o in outcomes)
    after_rollout = [o.version for o in outcomes
                     if o.started >= rolled_out and o.ended <= rolling_back]
    after_rollback = [o.version for o in outcomes if o.started >= rolled_back]
    assert after_rollout and set(after_rollout) == {"2.0"}
    assert after_rollback and set(after_rollback) == {"1.0"}
    assert default_version(server) == "1.0"
    # Kept versions hold no workers: only the default's worker processes run.
    pids = described_pids(server)
    assert len(pids) <= 3 and pids["2.0"] == set() and pids["1.0"]
    assert worker_pids(server) == pids["1.0"]
    assert not (first_pids | v2_pids) & worker_pids(server)

    # Keeping one version unregisters 2.0; the default stays and serves.
    pruned = rollout(server, store, "--version", "1.0", "--keep", "1", deadline=deadline)
    assert pruned.returncode == 0, pruned.stderr
    assert "unregister 2.0" in pruned.stdout
    assert set(described(server)) == {"1.0"}
    assert worker_pids(server) == described_pids(server)["1.0"]
    # Again, with one version registered: its count reads as a person reads ("1 versions").
    alone = rollout(server, store, "--version", "1.0", deadline=deadline)
    assert alone.returncode == 0, alone.stderr
    assert "[5/5] 1 version registered, at most 3 kept: nothing to unregister" in \
        alone.stdout, alone.stdout


def test_a_broken_version_stops_before_the_switch(rollout_server, rollout_store, deadline):
    server, store = rollout_server, rollout_store
    serving = default_version(server)
    with Load(server, deadline) as load:
        load.wait_for_answers_since(0)
        result = rollout(server, store, "--version", "3.0", deadline=deadline)
        failed_at = time.monotonic()
        load.wait_for_answers_since(failed_at)
    assert result.returncode != 0
    assert "[3/5]" not in result.stdout  # it never reached set-default
    assert "step 1 failed: 3.0 did not load" in result.stderr
    assert (f"unet/diffusion_pytorch_model.safetensors: {TRUNCATED_TO} bytes, the manifest "
            "says") in result.stderr
    assert f"{serving} is still the default version" in result.stderr
    assert [o for o in load.outcomes if o.status != 200] == []
    assert {o.version for o in load.outcomes} == {serving}
    assert default_version(server) == serving and "3.0" not in described(server)
    # TorchServe does not keep retrying the failed worker: nothing of 3.0 runs or restarts.
    time.sleep(2.5)  # past the first two retry back-offs (1 s each)
    assert worker_pids(server) == set().union(*described_pids(server).values())
    # One load attempt: the rollout unregisters it before TorchServe's first retry (1 s).
    log = (server.run_dir / "logs" / "ts_log.log").read_text(errors="replace")
    assert len([line for line in log.splitlines()
                if "sdxl_3.0 State change" in line and line.endswith("-> WORKER_STARTED")]) == 1


def test_an_archive_missing_from_the_store_is_refused(rollout_server, rollout_store,
                                                     deadline):
    serving = default_version(rollout_server)
    result = rollout(rollout_server, rollout_store, "--version", "9.9", deadline=deadline)
    assert result.returncode != 0
    assert "no archive" in result.stderr and "sdxl-9.9.mar" in result.stderr
    assert default_version(rollout_server) == serving


def test_a_damaged_archive_is_named_as_such(rollout_server, rollout_store, deadline):
    """A byte changed in a member's stored data, as a bad disk or copy leaves it: TorchServe
    answers only 'Failed to save model'."""
    server, store = rollout_server, rollout_store
    serving = default_version(server)
    mar = broken_copy(store, "7.0")
    with zipfile.ZipFile(mar) as archive:
        member = archive.getinfo("model/unet/diffusion_pytorch_model.safetensors")
    data = bytearray(mar.read_bytes())
    data[member.header_offset + 100 + member.compress_size // 2] ^= 0xFF
    mar.write_bytes(data)
    result = rollout(server, store, "--version", "7.0", deadline=deadline)
    assert result.returncode == 1
    assert ("sdxl-7.0.mar is damaged: model/unet/diffusion_pytorch_model.safetensors fails "
            "its check; build it again with `make archive VERSION=7.0`") in result.stderr
    assert f"{serving} is still the default version" in result.stderr
    assert default_version(server) == serving and "7.0" not in described(server)


def broken_copy(store: Path, version: str, name: str = "sdxl", fail_requests: bool = False,
                flip_weight_byte: bool = False, hang_at_load: bool = False,
                slow_requests: bool = False, fail_checks_while: Path | None = None,
                fail_loads_while: Path | None = None, fail_load_once: Path | None = None,
                load_fails_after_s: int = 0,
                hold_requests_while: Path | None = None) -> Path:
    """``<name>-<version>.mar``: 2.0's archive with its manifest saying ``version``, and a
    handler that raises on every request (it loads fine) or never finishes loading, or a unet
    file changed by one byte (its load fails the sdxl-manifest.json check), or a handler
    that sleeps ``SLOW_S`` before a batch holding the prompt ``slow-on-purpose`` (or while the
    file ``hold_requests_while`` exists), printing ``SLOW_TAKEN`` as it takes it, or one that
    fails the rollout's check generation while the file ``fail_checks_while`` exists, or one
    that fails its load while the file ``fail_loads_while`` exists (sleeping
    ``load_fails_after_s`` first), or once when the file ``fail_load_once`` exists (it
    removes the file as it fails: the retry loads)."""
    def patch(member: str, data: bytes) -> bytes:
        if member == "MAR-INF/MANIFEST.json":
            manifest = json.loads(data)
            manifest["model"]["modelVersion"] = version
            return json.dumps(manifest).encode()
        if member == "sdxl_serve_handler.py" and fail_requests:
            data = data.replace(b"    return _handler.handle(data, context)",
                                b"    raise RuntimeError('broken on purpose')")
            assert b"broken on purpose" in data
        elif member == "sdxl_serve_handler.py" and (slow_requests or fail_checks_while or
                                                    hold_requests_while):
            # Code put before the entry point's call of the handler, for some requests.
            taken = (b"    if 'slow-on-purpose' in repr(data):\n"
                     b"        print('%s', flush=True)\n" % SLOW_TAKEN.encode())
            guard = (taken + b"        import time\n"
                     b"        time.sleep(%d)\n" % SLOW_S) if slow_requests else (
                     taken + b"    import os, time\n"
                     b"    while 'slow-on-purpose' in repr(data) and os.path.exists(%r):\n"
                     b"        time.sleep(0.1)\n"
                     % str(hold_requests_while).encode()) if hold_requests_while else (
                     b"    import os\n"
                     b"    if 'rollout check' in repr(data) and os.path.exists(%r):\n"
                     b"        raise RuntimeError('check failed on purpose')\n"
                     % str(fail_checks_while).encode())
            call = b"    return _handler.handle(data, context)"
            assert call in data
            data = data.replace(call, guard + call)
        elif member == "sdxl_serve_handler.py" and (fail_loads_while or fail_load_once):
            flag = str(fail_loads_while or fail_load_once).encode()
            before = (b"        os.remove(%r)\n" % flag if fail_load_once else
                      b"        time.sleep(%d)\n" % load_fails_after_s)
            data = data.replace(b"    if not _handler.initialized:\n",
                                b"    import os, time\n"
                                b"    if not _handler.initialized and os.path.exists(%r):\n"
                                % flag + before +
                                b"        raise RuntimeError('load failed on purpose')\n"
                                b"    if not _handler.initialized:\n")
            assert b"load failed on purpose" in data
        elif member == "sdxl_serve_handler.py" and hang_at_load:
            data = data.replace(b"    if not _handler.initialized:\n",
                                b"    import time\n    time.sleep(3600)\n"
                                b"    if not _handler.initialized:\n")
            assert b"time.sleep(3600)" in data
        elif member == "model/unet/diffusion_pytorch_model.safetensors" and flip_weight_byte:
            flipped = bytearray(data)
            flipped[len(flipped) // 2] ^= 0xFF
            data = bytes(flipped)
        return data

    return patched_archive(store / "sdxl-2.0.mar", store / f"{name}-{version}.mar", patch)


def register(server, mar: Path, name: str = "sdxl") -> None:
    """What an interrupted earlier rollout leaves: the version registered with its workers."""
    status, _, body = http("POST", f"{server.addresses.management}/models?url={mar.name}"
                           f"&model_name={name}&initial_workers=1&synchronous=true",
                           server.keys()["management"], timeout=240)
    assert status == 200, body


def registered(server, name: str) -> bool:
    status, _, _ = http("GET", f"{server.addresses.management}/models/{name}",
                        server.keys()["management"])
    return status == 200


def test_a_version_left_registered_that_fails_its_check_is_unregistered(
        rollout_server, rollout_store, deadline):
    server, store = rollout_server, rollout_store
    serving = default_version(server)
    register(server, broken_copy(store, "4.0", fail_requests=True))
    result = rollout(server, store, "--version", "4.0", deadline=deadline)
    assert result.returncode == 1
    assert "step 2 failed" in result.stderr and "unregister 4.0" in result.stdout
    assert f"{serving} is the default version" in result.stderr
    # Not kept: a rollback must not find it as the previous version, and it holds no worker.
    assert "4.0" not in described(server) and default_version(server) == serving
    assert worker_pids(server) == set().union(*described_pids(server).values())


@contextlib.contextmanager
def nothing_started(server, version: str, said: str) -> Iterator[None]:
    """No worker process of ``version`` starts from the block on, past TorchServe's first
    retry back-offs, and none runs then but the described ones (``said``: the rollout's
    output, for a failure)."""
    starts = worker_starts(server, version)
    yield
    time.sleep(3)  # past the first two retry back-offs (1 s each)
    assert worker_starts(server, version) == starts, said
    wait_until(lambda: worker_pids(server) == set().union(
        *described_pids(server).values()), 30, "no worker but the described ones")


def serve_again(server, store: Path, serving: str, version: str, keep: tuple[str, ...],
                deadline: Deadline) -> None:
    """A test's end: ``serving`` the default version again, ``version`` unregistered."""
    if default_version(server) != serving:
        assert rollout(server, store, "--version", serving, *keep,
                       deadline=deadline).returncode == 0
    http("DELETE", f"{server.addresses.management}/models/sdxl/{version}",
         server.keys()["management"], timeout=120)


def rollback_to_it_failing(server, store: Path, serving: str, version: str, failing: Path,
                           keep: tuple[str, ...], deadline: Deadline
                           ) -> subprocess.CompletedProcess:
    """``version`` served, then ``serving`` again; then, with ``failing`` there, a rollback to
    ``version`` that fails (its output)."""
    assert rollout(server, store, "--version", version, *keep,
                   deadline=deadline).returncode == 0
    assert rollout(server, store, "--version", serving, *keep,
                   deadline=deadline).returncode == 0
    failing.touch()
    back = rollout(server, store, "--rollback", *keep, deadline=deadline)
    assert back.returncode == 1
    assert f"the previous kept version is {version}" in back.stdout
    return back


def told_the_load_failed(stderr: str) -> bool:
    """Whether a rollout said a broken copy's load failed: the worker's traceback, or
    TorchServe's state change where TorchServe lost it (it stops reading a worker's output
    once the worker disconnects, and the traceback comes after the failed load's answer:
    unread once in four runs on a loaded machine)."""
    return "load failed on purpose" in stderr or ("W-" in stderr and "WORKER_ERROR" in stderr)


@pytest.mark.parametrize("stage", ["check", "load"])
def test_a_rollback_whose_target_fails_keeps_the_version_to_go_back_to(
        rollout_server, rollout_store, deadline, tmp_path, stage):
    """A version that served fails on the way back (out of GPU memory beside the serving
    one, say), at its check, or first at its load: it was unregistered and forgotten, so
    the next `make rollback` went past it to an older version or said "nothing to roll back
    to", and the good build could only come back by its number."""
    server, store = rollout_server, rollout_store
    serving = default_version(server)
    failing = tmp_path / f"fail-the-{stage}"
    version = {"check": "8.0", "load": "8.1"}[stage]
    broken_copy(store, version, **{f"fail_{stage}s_while": failing})
    said = {"check": ["step 2 failed", f"{serving} is the default version"],
            "load": [f"step 1 failed: {version} did not load",
                     f"{serving} is still the default version"]}[stage]
    keep = ("--keep", "9")  # nothing of the other tests' versions is pruned here
    try:
        back = rollback_to_it_failing(server, store, serving, version, failing, keep, deadline)
        assert all(words in back.stderr for words in said), back.stderr
        assert stage == "check" or told_the_load_failed(back.stderr), back.stderr
        assert f"unregister {version}" not in back.stdout
        # Kept as a drained version is: registered, no worker, and TorchServe does not go
        # on retrying a failed load. A retry it had planned before the scale-down started
        # one more worker, unlisted, after the rollout had ended (its load holding GPU
        # memory beside the serving one): the rollout now waits it out, so nothing of the
        # version starts or runs once it has ended.
        with nothing_started(server, version, back.stdout):
            assert default_version(server) == serving
            assert described_pids(server)[version] == set()
        # A rollout between keeps it (the record keeps registered versions only).
        assert rollout(server, store, "--version", serving, *keep,
                       deadline=deadline).returncode == 0
        failing.unlink()
        back = rollout(server, store, "--rollback", *keep, deadline=deadline)
        assert back.returncode == 0, back.stderr
        assert f"the previous kept version is {version}" in back.stdout
        assert default_version(server) == version
    finally:
        failing.unlink(missing_ok=True)
        serve_again(server, store, serving, version, keep, deadline)


def test_a_retry_that_loads_after_the_scale_down_is_stopped(rollout_server, rollout_store,
                                                            deadline, tmp_path):
    """A rollback's target fails its first load, and TorchServe's retry, planned before the
    scale-down, loads it: that worker is listed nowhere, and no scale or unregister
    reaches it. It stayed, a whole pipeline beside the next version's until the server
    restarted; the rollout now ends its process with a SIGTERM."""
    server, store = rollout_server, rollout_store
    serving = default_version(server)
    failing, version = tmp_path / "fail-the-first-load", "8.3"
    broken_copy(store, version, fail_load_once=failing)
    keep = ("--keep", "9")  # nothing of the other tests' versions is pruned here
    try:
        back = rollback_to_it_failing(server, store, serving, version, failing, keep, deadline)
        assert not failing.exists(), "the first load did not fail"
        assert told_the_load_failed(back.stderr), back.stderr
        # Right as it returns: no wait_until, the rollout waited for the end itself.
        assert worker_pids(server) == set().union(*described_pids(server).values()), \
            back.stdout
        assert described_pids(server)[version] == set()
        assert "retry loaded the model" in back.stdout, back.stdout
        assert "ended at the SIGTERM" in back.stdout, back.stdout
        assert f"no process of {version} is left" in back.stdout, back.stdout
        with nothing_started(server, version, back.stdout):
            assert default_version(server) == serving
    finally:
        failing.unlink(missing_ok=True)
        serve_again(server, store, serving, version, keep, deadline)


def test_a_default_version_that_fails_to_load_again_leaves_no_worker_behind(
        rollout_server, rollout_store, deadline, tmp_path):
    """The default version, scaled to 0 workers, fails its load when a rollout of it scales
    it up again: it goes back to 0 workers (TorchServe unregisters no default version).
    A retry TorchServe had planned before that scale-down started one more worker, unlisted,
    after the rollout had ended: the rollout waits it out. Its load takes seconds to fail
    here, as a real pipeline's does, so the rollout finds it still loading."""
    server, store = rollout_server, rollout_store
    serving = default_version(server)
    failing, version = tmp_path / "fail-the-load", "8.2"
    broken_copy(store, version, fail_loads_while=failing, load_fails_after_s=3)
    keep = ("--keep", "9")  # nothing of the other tests' versions is pruned here
    try:
        assert rollout(server, store, "--version", version, *keep,
                       deadline=deadline).returncode == 0
        status, _, body = http("PUT", f"{server.addresses.management}/models/sdxl/{version}"
                               f"?min_worker=0&max_worker=0&synchronous=false",
                               server.keys()["management"], timeout=120)
        assert status in (200, 202), body
        wait_until(lambda: described_pids(server)[version] == set(), 60, "no worker of 8.2")
        failing.touch()
        again = rollout(server, store, "--version", version, *keep, deadline=deadline)
        assert again.returncode == 1
        assert f"{version} is the default version with 0 workers: scale it to 1" in \
            again.stdout, again.stdout
        assert f"scale {version} to 0 workers again" in again.stdout, again.stdout
        assert told_the_load_failed(again.stderr), again.stderr
        # Right as it returns: no wait_until, the rollout waited for the retry's end itself.
        assert worker_pids(server) == set().union(*described_pids(server).values()), \
            again.stdout
        waited = re.search(r"it ended after ([\d.]+) s", again.stdout)
        assert waited and float(waited.group(1)) >= 1.0, again.stdout  # it was loading
        with nothing_started(server, version, again.stdout):
            assert default_version(server) == version
            assert described_pids(server)[version] == set()
    finally:
        failing.unlink(missing_ok=True)
        serve_again(server, store, serving, version, keep, deadline)


def test_a_first_version_that_fails_its_check_is_unregistered(rollout_server, rollout_store,
                                                              deadline):
    """TorchServe makes a model's first version the default: it must not stay serving."""
    server, store = rollout_server, rollout_store
    broken_copy(store, "4.0", name="other", fail_requests=True)
    result = rollout(server, store, "--name", "other", "--version", "4.0", deadline=deadline)
    assert result.returncode == 1
    assert "step 2 failed" in result.stderr
    assert "nothing (model not registered) is the default version" in result.stderr
    assert not registered(server, "other")


def test_a_load_failure_names_the_workers_own_exception(rollout_server, rollout_store,
                                                        deadline):
    server, store = rollout_server, rollout_store
    broken_copy(store, "5.0", flip_weight_byte=True)
    result = rollout(server, store, "--version", "5.0", deadline=deadline)
    assert result.returncode == 1
    assert "step 1 failed: 5.0 did not load" in result.stderr
    # Not TorchServe's generic "500 - Unknown exception" that the worker raises last.
    assert "does not match its sdxl-manifest.json" in result.stderr
    assert "Unknown exception" not in result.stderr
    assert "5.0" not in described(server)


def test_a_version_whose_handler_fails_every_request_drains(rollout_server, rollout_store,
                                                            deadline):
    """Its customized describe gets a bare 503: answered by its worker all the same."""
    server, store = rollout_server, rollout_store
    serving = default_version(server)
    register(server, broken_copy(store, "4.0", fail_requests=True))
    started = time.monotonic()
    result = rollout(server, store, "--version", serving, "--drain-timeout", "30",
                     deadline=deadline)
    assert result.returncode == 0, result.stderr
    assert "[1/5] drain 4.0 first" in result.stdout and time.monotonic() - started < 30
    assert described_pids(server)["4.0"] == set()
    http("DELETE", f"{server.addresses.management}/models/sdxl/4.0",
         server.keys()["management"], timeout=120)


def test_a_drain_past_its_timeout_names_the_busy_worker(rollout_server, rollout_store,
                                                        deadline):
    """The drain's barrier to a busy worker timed out with the end of --drain-timeout, and
    the rollout said only 'GET http://... failed: timed out'."""
    server, store = rollout_server, rollout_store
    serving = default_version(server)
    register(server, broken_copy(store, "6.0", slow_requests=True))
    (busy,) = described_pids(server)["6.0"]
    slow = slow_request(server, "6.0")
    try:
        result = rollout(server, store, "--version", serving, "--drain-timeout", "3",
                         deadline=deadline)
        assert result.returncode == 1
        assert "timed out" not in result.stderr, result.stderr
        # A version that never served is drained before anything changes (step 1).
        assert (f"rollout failed: step 1 failed: 6.0 still has workers not known to be idle "
                f"(pids [{busy}]) after ") in result.stderr, result.stderr
        assert waited_s(result.stderr, "3") >= 3, result.stderr
        assert (f" s (--drain-timeout 3); nothing changed, {serving} is the default version: "
                f"run this again once its requests are answered") in result.stderr
    finally:
        slow.join(timeout=120)
    assert default_version(server) == serving
    http("DELETE", f"{server.addresses.management}/models/sdxl/6.0",
         server.keys()["management"], timeout=120)


def test_a_drain_timeout_of_0_drains_a_version_that_is_idle_now(rollout_server, rollout_store,
                                                                deadline):
    """`--drain-timeout 0` failed step 4 whenever another version had workers, idle ones
    too: its deadline had passed before the drain asked them once whether they were idle."""
    server, store = rollout_server, rollout_store
    serving = default_version(server)
    other = "2.0" if serving == "1.0" else "1.0"
    result = rollout(server, store, "--version", other, "--drain-timeout", "0",
                     deadline=deadline)
    assert result.returncode == 0, result.stderr
    assert f"{serving} is idle; scale it to 0 workers" in result.stdout, result.stdout
    assert described_pids(server)[serving] == set()
    back = rollout(server, store, "--rollback", "--drain-timeout", "0", deadline=deadline)
    assert back.returncode == 0, back.stderr
    assert default_version(server) == serving and described_pids(server)[other] == set()


def waited_s(said: str, drain_timeout: str) -> float:
    """The seconds a failed drain says it waited, with --drain-timeout ``drain_timeout``."""
    found = re.search(r" after (\d+\.\d) s \(--drain-timeout " + re.escape(drain_timeout) +
                      r"\)", said)
    assert found, said
    return float(found[1])


def test_a_drain_timeout_of_0_fails_at_once_with_a_request_queued(rollout_server,
                                                                  rollout_store, hold_file,
                                                                  deadline):
    """Not idle now: a request queued (behind a held one) fails the drain at once, said as
    a person reads it, where it said "1 queued requests"."""
    server, store = rollout_server, rollout_store
    assert default_version(server) == "1.0"
    queued = threading.Thread(target=http, args=(
        "POST", f"{server.addresses.inference}/predictions/sdxl/1.0",
        server.keys()["inference"], b'{"prompt": "queued", "num_inference_steps": 2}'),
        kwargs={"timeout": 120})
    try:
        with holding(server, hold_file):
            queued.start()
            wait_until(lambda: described(server)["1.0"]["jobQueueStatus"]["pendingRequests"]
                       == 1, 60, "a request queued behind the held one")
            wait_until(lambda: queue_gauge(server, "1.0") >= 1, 60, "the queue on /metrics")
            result = rollout(server, store, "--version", "2.0", "--drain-timeout", "0",
                             deadline=deadline)
    finally:
        if queued.is_alive():
            queued.join(timeout=120)
    assert result.returncode == 1
    assert "step 4 failed: 1.0 still has 1 queued request after " in result.stderr
    assert waited_s(result.stderr, "0") < 1, result.stderr
    assert "s (--drain-timeout 0); 1.0 is the default version again" in result.stderr
    # 2.0 stays loaded: the next run finishes it, 1.0 now idle. The queue gauge 1.0 wrote
    # while a request was queued still shows on /metrics: the drain waits for its next
    # sample, where 0 s left none and it scaled 1.0 down with the 1 kept there for good.
    assert queue_gauge(server, "1.0") >= 1
    finished = rollout(server, store, "--version", "2.0", "--drain-timeout", "0",
                       deadline=deadline)
    assert finished.returncode == 0, finished.stderr
    assert "queue gauge still shows" not in finished.stdout, finished.stdout
    assert described_pids(server)["1.0"] == set() and queue_gauge(server, "1.0") == 0
    back = rollout(server, store, "--rollback", "--drain-timeout", "0", deadline=deadline)
    assert back.returncode == 0, back.stderr
    assert default_version(server) == "1.0" and described_pids(server)["2.0"] == set()


def test_a_drain_timeout_of_0_with_a_worker_busy_says_the_second_it_waited(
        rollout_server, rollout_store, hold_file, deadline):
    """A worker running a batch, nothing queued: its barrier is waited for 1 s, which the
    failure said as "after 0 s (--drain-timeout)"."""
    server, store = rollout_server, rollout_store
    assert default_version(server) == "1.0"
    with holding(server, hold_file):
        result = rollout(server, store, "--version", "2.0", "--drain-timeout", "0",
                         deadline=deadline)
    assert result.returncode == 1
    assert "step 4 failed: 1.0 still has workers not known to be idle" in result.stderr
    assert waited_s(result.stderr, "0") >= 1, result.stderr
    assert "1.0 is the default version again" in result.stderr
    finished = rollout(server, store, "--version", "2.0", "--drain-timeout", "0",
                       deadline=deadline)
    assert finished.returncode == 0, finished.stderr
    back = rollout(server, store, "--rollback", "--drain-timeout", "0", deadline=deadline)
    assert back.returncode == 0, back.stderr
    assert default_version(server) == "1.0" and described_pids(server)["2.0"] == set()


def queue_gauge(server, version: str) -> float:
    """The highest ``sdxl_queue_pending_requests`` of ``version`` on /metrics now; 0 when
    it has none."""
    status, _, text = http("GET", server.addresses.metrics + "/metrics")
    assert status == 200
    return scraped_max(text.decode(), "sdxl_queue_pending_requests", "sdxl", version) or 0.0


def test_new_connections_do_not_stall_while_a_version_loads(rollout_server, rollout_store,
                                                            deadline):
    """A synchronous register holds one of TorchServe's Netty event loops for the whole load:
    about one new connection in four, inference ones included, waited that long."""
    server, store = rollout_server, rollout_store
    broken_copy(store, "2.0", name="probe")  # a fine copy of 2.0: a model of its own
    latencies: list[float] = []
    loading = threading.Event()

    def probe() -> None:
        url = f"{server.addresses.inference}/ping"
        while not loading.is_set():
            started = time.monotonic()
            try:
                http("GET", url, server.keys()["inference"], timeout=60)
            finally:
                latencies.append(time.monotonic() - started)
            time.sleep(0.3)

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        result = rollout(server, store, "--name", "probe", "--version", "2.0",
                         deadline=deadline)
    finally:
        loading.set()
        prober.join(timeout=90)
        http("DELETE", f"{server.addresses.management}/models/probe/2.0",
             server.keys()["management"], timeout=120)
    assert result.returncode == 0, result.stderr
    assert len(latencies) > 10 and max(latencies) < 3, sorted(latencies)[-5:]


def test_a_version_that_does_not_load_in_time_is_unregistered(rollout_server, rollout_store,
                                                              deadline):
    server, store = rollout_server, rollout_store
    serving = default_version(server)
    broken_copy(store, "6.0", hang_at_load=True)
    # Not a whole number of seconds: said as given, where it read "after 4 s".
    result = rollout(server, store, "--version", "6.0", "--load-timeout", "4.5",
                     deadline=deadline)
    assert result.returncode == 1
    assert "step 1 failed: 6.0 did not load: its workers are not READY after 4.5 s" in \
        result.stderr
    assert "6.0" not in described(server) and default_version(server) == serving
    time.sleep(1)  # its worker process is stopped, not left loading
    assert worker_pids(server) == set().union(*described_pids(server).values())


def test_prune_keeps_the_versions_that_served_not_a_leftover(rollout_server, rollout_store,
                                                            deadline):
    """A version a killed run registered, numbered above the others, never served: it is
    drained before the new version loads (it was drained at step 4, after: three pipelines
    on the GPU meanwhile), it goes first at the prune, and the version that served before
    the new one stays for the rollback."""
    server, store = rollout_server, rollout_store
    assert default_version(server) == "1.0"
    register(server, broken_copy(store, "9.0"))  # a fine copy of 2.0, left registered
    result = rollout(server, store, "--version", "2.0", "--keep", "2", deadline=deadline)
    assert result.returncode == 0, result.stderr
    steps = [line for line in result.stdout.splitlines() if line.startswith("[")]
    assert steps[0].startswith("[1/5] drain 9.0 first: it has not served since it was "
                              "registered"), result.stdout
    assert steps[1].startswith("[1/5]") and "9.0" not in steps[1], result.stdout
    assert not [line for line in steps if line.startswith("[4/5] drain 9.0")], result.stdout
    assert "unregister 9.0 (beyond the last 2 kept versions: not served since it was " \
        "registered)" in result.stdout
    assert set(described(server)) == {"1.0", "2.0"}
    back = rollout(server, store, "--rollback", "--keep", "2", deadline=deadline)
    assert back.returncode == 0, back.stderr
    assert "the previous kept version is 1.0" in back.stdout
    assert default_version(server) == "1.0" and set(described(server)) == {"1.0", "2.0"}


def test_a_failed_load_is_seen_without_the_logs_before_the_timeout(rollout_server,
                                                                 rollout_store, deadline,
                                                                 tmp_path):
    """No TorchServe logs beside the key file: describe shows the worker's process replaced
    by TorchServe's retry, long before --load-timeout."""
    server, store = rollout_server, rollout_store
    serving = default_version(server)
    elsewhere = tmp_path / "key_file.json"  # the same keys, no logs/ beside them
    elsewhere.symlink_to(server.run_dir / "key_file.json")
    started = time.monotonic()
    result = rollout(server, store, "--version", "3.0", "--key-file", str(elsewhere),
                     "--load-timeout", "150", deadline=deadline)
    assert result.returncode == 1
    assert "step 1 failed: 3.0 did not load: its worker failed to load: worker" in \
        result.stderr
    assert "ended before it was READY" in result.stderr
    assert time.monotonic() - started < 100, result.stderr
    assert "3.0" not in described(server) and default_version(server) == serving


def register_left_loading(server, mar: str) -> None:
    """What a rollout interrupted in step 1 leaves: the version registered, its worker
    loading (3.0's: failing, and retried by TorchServe for as long as it runs)."""
    status, _, body = http("POST", f"{server.addresses.management}/models?url={mar}"
                           f"&model_name=sdxl&initial_workers=1&synchronous=false",
                           server.keys()["management"], timeout=60)
    assert status == 202, body


def test_a_rerun_of_a_rollout_interrupted_in_step_1_unregisters_a_failing_version(
        rollout_server, rollout_store, deadline):
    """Before, the rerun waited for the whole --load-timeout, failed "step 2", and left the
    version registered with TorchServe retrying its worker."""
    server, store = rollout_server, rollout_store
    serving = default_version(server)
    register_left_loading(server, "sdxl-3.0.mar")
    started = time.monotonic()
    result = rollout(server, store, "--version", "3.0", deadline=deadline)
    assert result.returncode == 1
    assert "step 1 failed: 3.0 did not load" in result.stderr, result.stderr
    assert time.monotonic() - started < 120
    assert "3.0" not in described(server) and default_version(server) == serving


def test_a_leftover_version_that_never_loads_does_not_fail_the_next_rollout(
        rollout_server, rollout_store, deadline):
    """Before, step 4 tried to drain it: its barrier waited for a worker that never comes,
    and the rollout, switched already, failed with a bare timeout."""
    server, store = rollout_server, rollout_store
    other = "2.0" if default_version(server) == "1.0" else "1.0"
    register_left_loading(server, "sdxl-3.0.mar")
    result = rollout(server, store, "--version", other, deadline=deadline)
    assert result.returncode == 0, result.stderr
    assert "[4/5] unregister 3.0: it has not served since it was registered and has no " \
        "READY worker" in result.stdout
    assert "3.0" not in described(server) and default_version(server) == other


def test_a_rollback_interrupted_while_its_version_loads_can_be_run_again(
        rollout_server, rollout_store, deadline):
    """The rollback unregisters the kept version to register it again; before, that also
    forgot that it had served, so after a Ctrl-C there was "nothing to roll back to"."""
    server, store = rollout_server, rollout_store
    if default_version(server) != "2.0":
        assert rollout(server, store, "--version", "2.0", deadline=deadline).returncode == 0
    assert described_pids(server)["1.0"] == set()  # kept, with no worker

    def loading() -> None:  # Ctrl-C while 1.0 loads
        while "1.0" not in described(server):
            assert not deadline.passed()
            time.sleep(0.05)
    code, said = interrupted_at(server, store, ["--rollback"], "[1/5] register sdxl-1.0.mar",
                                loading)
    # It says what serves now (the rollback had not switched yet).
    assert code == 130 and "rollout interrupted: the server is left as it was at this point " \
        "(sdxl 2.0 is the default version); run the same command again to finish it" in said, \
        said
    back = rollout(server, store, "--rollback", deadline=deadline)
    assert back.returncode == 0, back.stderr
    assert "the previous kept version is 1.0" in back.stdout
    assert default_version(server) == "1.0"
    # Stopped a moment earlier, between the two calls: 1.0 is not registered at all. It
    # served in this server run and its archive is in the store: still the target.
    assert rollout(server, store, "--version", "2.0", deadline=deadline).returncode == 0
    status, _, body = http("DELETE", f"{server.addresses.management}/models/sdxl/1.0",
                           server.keys()["management"], timeout=120)
    assert status == 200, body
    back = rollout(server, store, "--rollback", deadline=deadline)
    assert back.returncode == 0, back.stderr
    assert "the previous kept version is 1.0" in back.stdout
    assert "[1/5] register sdxl-1.0.mar" in back.stdout
    assert default_version(server) == "1.0"


def test_a_rollback_stopped_in_its_drain_says_how_to_finish_it(rollout_server, rollout_store,
                                                               deadline):
    """Stopped after its switch, a rollback run again would go one version further back (the
    version it left is one a rollback skips): the message named that command."""
    server, store = rollout_server, rollout_store
    serving = default_version(server)
    broken_copy(store, "7.0", slow_requests=True)
    assert rollout(server, store, "--version", "7.0", deadline=deadline).returncode == 0
    slow = slow_request(server, "7.0")
    try:
        # Ctrl-C while its barrier waits behind the slow request.
        code, said = interrupted_at(server, store, ["--rollback"], "[4/5] drain 7.0",
                                    lambda: time.sleep(1))
        assert code == 130 and (f"(sdxl {serving} is the default version); `make rollout "
                                f"VERSION={serving}` finishes it") in said, said
    finally:
        slow.join(120)
    finished = rollout(server, store, "--version", serving, deadline=deadline)
    assert finished.returncode == 0, finished.stderr
    assert default_version(server) == serving
    assert described_pids(server).get("7.0", set()) == set()  # drained (or pruned)

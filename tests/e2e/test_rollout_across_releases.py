"""Rollouts across releases of this package, against a real TorchServe: the model store
holds a version an older release built, as it does after an upgrade, and this release's
rollout.py rolls the new version out, back to the old build and forward again.

The older archive is built from this checkout's git history by that release's own
build_archive.py (its handler package, model config and tiny model); where the history
does not hold it (a shallow clone, a copy without .git) the tests skip, saying so.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from lifetimes import Deadline, run, started_and_ready, timeout_of, wait_until
from sdxl_serve.management import http
from sdxl_serve.metrics import scraped_max
from test_rollout import (default_version, described_pids, register, rollout, serving_1_0,
                          worker_pids)

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
# The oldest release the tests name (tests/jobs/test_older_releases.py): its handler differs
# the most from this one's (its contract, service, server and recycling modules).
OLDER_RELEASE = "d54bf6aacd78f4d6e7cb23753ed256f98c794109"
RESERVE_S = 120


def older_release_tree(into: Path) -> Path:
    """``OLDER_RELEASE``'s handler, config and scripts, taken from git history into ``into``;
    a skip, with git's reason, where the history does not hold it."""
    try:
        found = subprocess.run(["git", "-C", str(REPO), "cat-file", "-e",
                                f"{OLDER_RELEASE}^{{commit}}"],
                               capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        pytest.skip(f"no git command: release {OLDER_RELEASE[:7]}'s archive is built from "
                    f"this checkout's git history")
    if found.returncode != 0:
        pytest.skip(f"release {OLDER_RELEASE[:7]} is not in this checkout's git history (a "
                    f"shallow clone, or a copy without .git: {found.stderr.strip()}); "
                    f"`git fetch --unshallow` brings it")
    partial = subprocess.run(["git", "-C", str(REPO), "config", "--get-regexp",
                              r"^(remote\..*\.promisor|extensions\.partialclone)$"],
                             capture_output=True, text=True, timeout=60).stdout.split()
    if partial:
        # A partial clone: the release's files would be fetched from its remote, and a test
        # reaches no network.
        pytest.skip(f"a partial clone ({' '.join(partial)}): release {OLDER_RELEASE[:7]}'s "
                    f"files may not be here, and git would fetch them; `git fetch --refetch "
                    f"--no-filter` brings them")
    tree = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", OLDER_RELEASE,
                           "handler", "config", "scripts"],
                          capture_output=True, check=True, timeout=120)
    subprocess.run(["tar", "-x", "-C", str(into)], input=tree.stdout, check=True, timeout=120)
    return into


@pytest.fixture(scope="module")
def releases_store(tmp_path_factory, tiny_model_dir) -> Path:
    """A model store with 1.0 built by ``OLDER_RELEASE`` and 2.0 by this checkout."""
    from build_archive import archive_differences, build_archive

    old = older_release_tree(tmp_path_factory.mktemp("older_release"))
    store = tmp_path_factory.mktemp("releases_store")
    # As a user ran it then (`make archive`): that release's script, its own package first.
    code, output = run([sys.executable, "scripts/build_archive.py", "--version", "1.0",
                        "--model-store", str(store)], 300, old / "build_archive.out",
                       env=dict(os.environ, PYTHONPATH=str(old / "handler")), cwd=old)
    assert code == 0, output
    # Not vacuous: the worker runs the code packed in the archive, and this is the old code.
    assert archive_differences(store / "sdxl-1.0.mar"), "1.0 packs this checkout's code"
    build_archive("sdxl", "2.0", None, store, tiny_model=tiny_model_dir)
    return store


@pytest.fixture(scope="module")
def releases_server(tmp_path_factory, releases_store):
    server = serving_1_0(tmp_path_factory.mktemp("releases_run"), releases_store)
    yield server
    server.stop()


def generated_by(server) -> str:
    """The version that made an image on the default address, after checking the reply."""
    status, headers, data = http(
        "POST", f"{server.addresses.inference}/predictions/sdxl", server.keys()["inference"],
        json.dumps({"prompt": "across releases", "seed": 1, "num_inference_steps": 2}).encode(),
        timeout=120)
    assert status == 200, data[:300]
    reply = json.loads(data)
    assert base64.b64decode(reply["image"]).startswith(b"\x89PNG\r\n\x1a\n")
    assert headers.get("X-Model-Version") == reply["model_version"]
    return reply["model_version"]


def bom_body_status(server) -> int:
    """The status of a generation whose body starts with a UTF-8 byte order mark: 400 from
    ``OLDER_RELEASE``'s code (its contract refused it, naming field `body`), 200 from this
    release's (9d7c60f). What tells the code that answers, not only its version number."""
    body = b"\xef\xbb\xbf" + json.dumps({"prompt": "marked", "num_inference_steps": 2}).encode()
    status, _, data = http("POST", f"{server.addresses.inference}/predictions/sdxl",
                           server.keys()["inference"], body, timeout=120)
    assert status == 200 or json.loads(data)["field"] == "body", data[:300]
    return status


def requests_counted(server, version: str) -> float:
    """``version``'s ``sdxl_requests_total`` on /metrics now (0 when absent)."""
    text = http("GET", f"{server.addresses.metrics}/metrics")[2].decode()
    return scraped_max(text, "sdxl_requests_total", "sdxl", version) or 0.0


def test_a_rollback_to_an_older_releases_build_serves_it_again(releases_server, releases_store,
                                                               request):
    server, store = releases_server, releases_store
    deadline = Deadline(timeout_of(request.node) - RESERVE_S)
    assert default_version(server) == "1.0" and generated_by(server) == "1.0"
    # This release's 2.0 out; the older release's worker drains (our describe answers it).
    forward = rollout(server, store, "--version", "2.0", deadline=deadline)
    assert forward.returncode == 0, forward.stderr
    assert "1.0 is idle; scale it to 0 workers" in forward.stdout
    assert generated_by(server) == "2.0"
    # Back: the store's 1.0, the older release's build, registered and checked again.
    counted = requests_counted(server, "1.0")
    back = rollout(server, store, "--rollback", deadline=deadline)
    assert back.returncode == 0, back.stderr
    assert "the previous kept version is 1.0" in back.stdout
    assert "[1/5] register sdxl-1.0.mar" in back.stdout
    assert generated_by(server) == "1.0" and bom_body_status(server) == 400
    pids = described_pids(server)
    assert pids["1.0"] and pids["2.0"] == set() and worker_pids(server) == pids["1.0"]
    # Deep health, as the readiness probe asks it, answered by the older release's worker.
    probe = subprocess.run(
        [sys.executable, "scripts/health_probe.py", "--url", server.addresses.inference,
         "--management", server.addresses.management, "--run-dir", str(server.run_dir)],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stdout + probe.stderr
    engine = psutil.Process(json.loads(probe.stdout)["worker_pid"])  # forked below the worker
    assert {parent.pid for parent in engine.parents()} & pids["1.0"], probe.stdout
    # Its metrics: the check generation and ours counted under 1.0 (the refused one too);
    # 2.0's queue gauge, frozen now that it has no worker, reads 0.
    wait_until(lambda: requests_counted(server, "1.0") >= counted + 2, 30,
               "1.0's requests since the rollback on /metrics")
    text = http("GET", f"{server.addresses.metrics}/metrics")[2].decode()
    assert scraped_max(text, "sdxl_queue_pending_requests", "sdxl", "2.0") in (None, 0.0)
    # And forward again.
    again = rollout(server, store, "--version", "2.0", deadline=deadline)
    assert again.returncode == 0, again.stderr
    assert generated_by(server) == "2.0" and bom_body_status(server) == 200
    assert described_pids(server)["1.0"] == set()


def test_a_version_that_served_before_a_restart_is_not_said_never_to_have_served(
        releases_server, releases_store, request):
    """The record of the versions that served is one server run's. After a restart (an
    upgrade's, say), 2.0, registered again by an interrupted rollout, has not served in
    this run, but it did before the restart: the rollout said it "never served"."""
    server, store = releases_server, releases_store
    deadline = Deadline(timeout_of(request.node) - RESERVE_S)
    if default_version(server) != "2.0":
        assert rollout(server, store, "--version", "2.0", deadline=deadline).returncode == 0
    server.stop()
    started_and_ready(server, ["sdxl"], 240)  # serves 1.0 again, as configured
    register(server, store / "sdxl-2.0.mar")
    result = rollout(server, store, "--version", "1.0", "--keep", "1", deadline=deadline)
    assert result.returncode == 0, result.stderr
    assert "[1/5] drain 2.0 first: it has not served since it was registered" in \
        result.stdout, result.stdout
    assert "[5/5] unregister 2.0 (beyond the last 1 kept versions: not served since it was " \
        "registered)" in result.stdout, result.stdout
    assert "never served" not in result.stdout

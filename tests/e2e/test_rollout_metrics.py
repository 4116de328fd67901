"""The queue gauge the autoscalers read, after scripts/rollout.py switched versions under load.

TorchServe 0.12 keeps every label set of a metric on ``/metrics`` for as long as it runs:
the series of a version whose workers were scaled to 0 (or that was unregistered) stays
with the last value its worker wrote. The autoscalers take ``max by (pod)`` of
``sdxl_queue_pending_requests``, so that last value must be true (0) once the old version
has drained, or a pod with no queue looks busy for the rest of its life.

The stopped worker's own gauges (age, requests, circuit state) stay too, frozen, and no
last write can make them true: the alert rules and the dashboard count a worker only while
its ``sdxl_worker_age_seconds`` moves, which a live worker rewrites even when idle.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import yaml

from conftest import start_server
from lifetimes import Deadline, timeout_of, wait_until
from sdxl_serve.management import http
from sdxl_serve.metrics import scraped_max
from test_rollout import Load, described, queue_gauge, rollout  # clients, describe, gauge, run

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
# More clients than a batch (batchSize 4) holds, so requests wait in 1.0's queue while it
# serves, up to the moment the default moves to 2.0.
CLIENTS = 8
RESERVE_S = 120
# How often a worker rewrites its gauges, idle or busy (the archive's handler config).
METRICS_INTERVAL_S = yaml.safe_load(
    (REPO / "config" / "model-config.yaml").read_text())["handler"]["metrics_interval_s"]
WORKER_GAUGES = ("sdxl_worker_age_seconds", "sdxl_worker_requests", "sdxl_circuit_state")


@pytest.fixture(scope="module")
def two_version_store(tmp_path_factory, model_store, tiny_model_dir) -> Path:
    from build_archive import build_archive

    store = tmp_path_factory.mktemp("rollout_metrics_store")
    shutil.copy(model_store / "sdxl-1.0.mar", store)
    build_archive("sdxl", "2.0", None, store, tiny_model=tiny_model_dir)
    return store


@pytest.fixture(scope="module")
def two_version_server(tmp_path_factory, two_version_store):
    # One thread per worker: the busy old version must leave a core for the new one to load.
    server = start_server(tmp_path_factory.mktemp("rollout_metrics_run"), two_version_store,
                          {"sdxl": "sdxl-1.0.mar"}, env={"OMP_NUM_THREADS": "1"})
    yield server
    server.stop()


def scraped(server) -> str:
    """The server's /metrics now."""
    status, _, body = http("GET", server.addresses.metrics + "/metrics")
    assert status == 200
    return body.decode()


def worker_gauges(server, version: str) -> dict[str, float | None]:
    """``version``'s per-worker gauges on /metrics now, by name (None: absent)."""
    text = scraped(server)
    return {name: scraped_max(text, name, "sdxl", version) for name in WORKER_GAUGES}


def pending(server, version: str) -> int:
    return described(server)[version]["jobQueueStatus"]["pendingRequests"]


def test_a_drained_version_leaves_its_queue_gauge_at_zero(two_version_server,
                                                           two_version_store, request):
    server, store = two_version_server, two_version_store
    deadline = Deadline(timeout_of(request.node) - RESERVE_S)
    # 2.0 loads before the clients start, so it does not share the CPU with them; the
    # rollout then finds it registered and goes on from its check.
    status, _, body = http("POST", f"{server.addresses.management}/models?url=sdxl-2.0.mar"
                           f"&model_name=sdxl&initial_workers=1&synchronous=false",
                           server.keys()["management"], timeout=60)
    assert status in (200, 202), body
    wait_until(lambda: [w["status"] for w in described(server)["2.0"]["workers"]]
               == ["READY"], 240, "2.0's worker READY")
    with Load(server, deadline, CLIENTS) as clients:
        # 1.0 has had requests waiting, and its worker has written that on /metrics.
        wait_until(lambda: queue_gauge(server, "1.0") > 0, 60,
                   "a non-zero queue gauge of 1.0 on /metrics")
        result = rollout(server, store, "--version", "2.0", deadline=deadline)
        assert result.returncode == 0, result.stderr
        assert not described(server)["1.0"]["workers"]
    assert clients.outcomes and {o.status for o in clients.outcomes} == {200}
    # Everything idle. 1.0 has no worker left to write: what /metrics shows now stays.
    wait_until(lambda: pending(server, "2.0") == 0, 60, "2.0's queue empty")
    assert queue_gauge(server, "1.0") == 0, "1.0's queue gauge when idle"
    # Unregistered, 1.0 keeps its series (TorchServe drops none): still the true 0.
    pruned = rollout(server, store, "--version", "2.0", "--keep", "1", deadline=deadline)
    assert pruned.returncode == 0, pruned.stderr
    assert set(described(server)) == {"2.0"}
    assert queue_gauge(server, "1.0") == 0, "1.0's queue gauge after unregistering it"


def test_a_stopped_workers_gauges_freeze_while_an_idle_live_ones_age_moves(
        two_version_server, two_version_store, request):
    # What the rules' `and changes(sdxl_worker_age_seconds[2m]) > 0` relies on.
    server, store = two_version_server, two_version_store
    deadline = Deadline(timeout_of(request.node) - RESERVE_S)
    if "1.0" in described(server):  # run on its own: the rollout is not done yet
        result = rollout(server, store, "--version", "2.0", "--keep", "1", deadline=deadline)
        assert result.returncode == 0, result.stderr
    assert set(described(server)) == {"2.0"}
    before = {version: worker_gauges(server, version) for version in ("1.0", "2.0")}
    # No requests: 2.0 is idle, and two of its rewrites fall in this wait.
    time.sleep(2 * METRICS_INTERVAL_S + 1)
    after = {version: worker_gauges(server, version) for version in ("1.0", "2.0")}
    assert None not in before["1.0"].values(), before
    assert after["1.0"] == before["1.0"], "1.0's worker is gone: its series stay, frozen"
    assert after["2.0"]["sdxl_worker_age_seconds"] > before["2.0"]["sdxl_worker_age_seconds"]

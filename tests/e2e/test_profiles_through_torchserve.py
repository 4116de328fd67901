"""Scheduled profiling through a real TorchServe: traces land in ``profiles/`` of the server's
run directory (TorchServe's working directory) when no directory is set, and the command
finds them there."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import start_server
from lifetimes import wait_until
from sdxl_serve.management import http

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def profiling_server(tmp_path_factory, model_store):
    running = start_server(tmp_path_factory.mktemp("profiling_run"), model_store,
                           {"sdxl": "sdxl-1.0.mar"},
                           env={"SDXL_PROFILE_EVERY_N_REQUESTS": "2", "SDXL_PROFILE_KEEP": "1",
                                "SDXL_WARMUP_SIZES": "32x32", "SDXL_WARMUP_STEPS": "1"})
    yield running
    running.stop()


def test_traces_go_to_the_run_directory_by_default(profiling_server):
    server = profiling_server
    profiles = server.run_dir / "profiles"
    url = f"{server.addresses.inference}/predictions/sdxl"
    seen: set[str] = set()
    for seed in range(4):  # requests 2 and 4 are profiled; one trace is kept
        body = {"prompt": "a lighthouse", "seed": seed, "width": 32, "height": 32,
                "num_inference_steps": 2}
        status, _, reply = http("POST", url, server.keys()["inference"],
                                json.dumps(body).encode(), timeout=240)
        assert status == 200, reply
        if seed % 2:  # written just after the reply: wait for it
            traces = wait_until(lambda: [t for t in profiles.glob("profile-*.txt")
                                         if t.stem not in seen], 60,
                                "the profile of the request just answered")
            assert len(traces) == 1, traces
            seen.add(traces[0].stem)
    assert len(seen) == 2
    # One kept: the newest. The engine process prunes the older one just after it wrote
    # the newest's summary (what the wait above saw), so the prune may trail it.

    def only_the_newest() -> bool:
        names = [t.name for t in profiles.iterdir()]
        return bool(names) and {name.split(".")[0] for name in names} == {traces[0].stem}

    wait_until(only_the_newest, 10, "the older profile pruned",
               detail=lambda: sorted(t.name for t in profiles.iterdir()))
    traces = sorted(profiles.glob("profile-*.json.gz"))
    listed = subprocess.run([sys.executable, "-m", "sdxl_serve.profiling", "list", "--dir",
                             str(profiles)], capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0 and str(traces[0]) in listed.stdout
    log = (server.run_dir / "logs" / "model_log.log").read_text(errors="replace")
    assert f"into {profiles}" in log  # the worker says where they go

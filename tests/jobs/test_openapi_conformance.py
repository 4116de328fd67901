"""The job API against its own OpenAPI document (docs/jobs-openapi.json), with schemathesis:
clients generated from the document (openapi-generator, openapi-python-client) must send
nothing the server refuses and get nothing the document does not describe.

A real Redis and the API process, with jobs in every state a client can find (queued,
running, succeeded with an image, failed), finished as a dispatcher finishes them: no
TorchServe is needed for the API's answers. Schemathesis runs every phase and every check
(tests/jobs/schemathesis.toml) derandomized and seeded, so a run is the same on every
machine; a change that makes the document and the server disagree fails it, with the
failing requests as curl lines.
"""

from __future__ import annotations

import io
import json
import os
import re
import sys
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from jobstack import make_key, run, start_api
from lifetimes import run as run_to_end
from schemathesis_hooks import SERVED_LIMITS
from sdxl_jobs.store import JobStore

pytestmark = pytest.mark.jobs

HERE = Path(__file__).resolve().parent


def png(width: int, height: int) -> bytes:
    """A real PNG: the API serves an image as stored, and makes its previews from it."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (40, 90, 160)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def api(redis_server, tmp_path_factory):
    # Limits high enough that the run's few hundred submits are read, not rate-limited; a
    # short Prefer wait (a generated `wait=N` holds a submit that long); webhooks allowed to
    # the document's example host, where nothing is sent (no dispatcher runs here). The
    # model's bounds published first, as its dispatchers publish them: the hooks' wide ones.
    async def publish():
        store = JobStore.from_url(redis_server.url)
        try:
            await store.publish_model({"version": "1.0", "limits": SERVED_LIMITS})
        finally:
            await store.close()
    run(publish())
    running = start_api(redis_server.url, tmp_path_factory.mktemp("api"),
                        {"SDXL_JOBS_RATE_PER_MINUTE": "100000",
                         "SDXL_JOBS_MAX_ACTIVE_PER_KEY": "100000", "SDXL_JOBS_MAX_WAIT_S": "1",
                         "SDXL_JOBS_WEBHOOK_ALLOW": "hooks.example.com",
                         "SDXL_JOBS_WEBHOOK_SECRET": "whsec_c2VjcmV0LWtleS1vZi0xNi1ieXRlcw=="})
    yield running
    running.process.stop()


def jobs_in_every_state(api, redis_url: str, key: str) -> str:
    """Four jobs of ``key``: one left queued, one running, one succeeded with as many images
    as a job may have (so that any index the document allows is one) and one failed, moved
    on as a dispatcher moves them, so that the generated calls that find them (schemathesis
    reuses the ids it reads) get every shape of the job. The id of the one that succeeded."""
    ids = []
    for seed in range(4):
        status, _, job = api.json("POST", "/v1/jobs", key, {
            "prompt": "a red fox", "seed": seed, "num_images": 4 if seed == 2 else 1})
        assert status == 202, job
        ids.append(job["id"])

    async def move_on():
        store = JobStore.from_url(redis_url)
        try:
            taken = {job_id: entry for entry, job_id in
                     await store.next_jobs("conformance", 10, 100)}
            claims = {}
            for job_id in ids[1:]:
                outcome, claims[job_id] = await store.start(job_id, taken[job_id],
                                                            "conformance", 3, 600)
                assert outcome == "claimed", (job_id, outcome)
            assert await store.progress(ids[1], claims[ids[1]], 3, 30) == "ok"
            result = {"format": "png", "width": 1024, "height": 1024, "model_version": "1.0",
                      "timings_s": {"generate": 1.5}, "seeds": [2, 3, 4, 5]}
            assert await store.finish(ids[2], claims[ids[2]], 600, "succeeded", result,
                                      seeds=[2, 3, 4, 5], images=[png(1024, 1024)] * 4) == "stored"
            error = {"code": 507, "type": "OutOfMemory", "message": "out of GPU memory",
                     "request_id": "0123456789abcdef"}
            assert await store.finish(ids[3], claims[ids[3]], 600, "failed",
                                      error=error) == "stored"
        finally:
            await store.close()
    run(move_on())
    return ids[2]


def test_the_api_answers_as_its_openapi_document_says(api, redis_server, tmp_path):
    key = make_key(redis_server.url, "conformance")
    succeeded = jobs_in_every_state(api, redis_server.url, key)
    config = tmp_path / "schemathesis.toml"
    config.write_text((HERE / "schemathesis.toml").read_text()
                      + f'\n[dictionaries.succeeded]\nvalues = ["{succeeded}"]\n')
    # Run where it may write (Hypothesis' directory, its report): tmp_path, not the checkout.
    har = tmp_path / "run.har"
    code, output = run_to_end(
        [sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run",
         f"{api.address}/openapi.json", "--no-color", "--report", "har",
         "--report-har-path", str(har)],
        120, tmp_path / "schemathesis.log", "schemathesis", cwd=tmp_path,
        env={**os.environ, "JOBS_API_KEY": key,
             "SCHEMATHESIS_HOOKS": str(HERE / "schemathesis_hooks.py")})
    assert code == 0, output[-12000:]
    generated = re.search(r"(\d+) generated, \1 passed", output)
    assert generated and int(generated[1]) > 0, output[-3000:]
    # The run tried the server on bodies it must take: a size, a seed or num_images that the
    # server refused at a bound the document does not state would be seen here. At SDXL's
    # bounds not one submit that set one was taken (every one refused at width 8, the
    # excuse hiding it), and the run passed having proved nothing of them.
    taken = Counter()
    for entry in json.loads(har.read_text())["log"]["entries"]:
        sent = entry["request"]
        if sent["method"] == "POST" and urlsplit(sent["url"]).path == "/v1/jobs" \
                and entry["response"]["status"] == 202:
            body = json.loads(sent.get("postData", {}).get("text") or "null")
            taken.update(name for name, value in (body or {}).items() if value is not None)
    assert all(taken[name] >= 5 for name in ("width", "height", "seed", "num_images")), taken

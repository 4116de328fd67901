"""What a job looks like to its owner: the JSON of ``GET /v1/jobs/{id}`` and of webhooks.

Links are relative to the API's root, so the same object is right behind any proxy and in a
webhook, which has no request to take a host from.
"""

from __future__ import annotations

import json
from typing import Any

from sdxl_jobs.store import FINAL_STATES, iso
from sdxl_serve.contract import image_seeds


def retention_s(job: dict[str, Any], ttl_s: float | None) -> float | None:
    """Seconds a stored job is kept after it ends: the TTL it ended with (its ``kept_s``,
    that of the process that ended it); one an older release ended has none stored: the
    reader's ``ttl_s``. What ``expires_at`` is told from, and a gone image's 404 says.

    >>> retention_s({"kept_s": "60"}, 3600), retention_s({"kept_s": ""}, 3600)
    (60.0, 3600)
    >>> retention_s({"kept_s": "1.5"}, 3600)  # written by no release, read all the same
    1.5
    """
    return float(job["kept_s"]) if job.get("kept_s") else ttl_s


def job_view(job: dict[str, Any], queue_position: int | None = None,
             estimated_start_s: float | None = None, ttl_s: int | None = None
             ) -> dict[str, Any]:
    """The public form of a stored job (see ``store.JobStore.job``)."""
    job_id, status = job["id"], job["status"]
    request = json.loads(job["request"])
    created = float(job["created_at"])
    started = float(job["first_started_at"]) if job.get("first_started_at") else None
    finished = float(job["finished_at"]) if job.get("finished_at") else None
    base = f"/v1/jobs/{job_id}"
    view: dict[str, Any] = {
        "id": job_id,
        "status": status,
        "created_at": iso(created),
        "started_at": iso(started),
        "finished_at": iso(finished),
        "queue_position": queue_position,
        "estimated_start_at": iso(estimated_start_s),
        "progress": {"step": int(job.get("step") or 0), "total": int(job.get("total") or 0)},
        "attempts": int(job.get("attempts") or 0),
        "request": request,
        "seeds": image_seeds(request["seed"], request["num_images"]),
        "timings": {
            "queued_s": round((started or finished or 0) - created, 3) if (started or finished)
            else None,
            "run_s": round(finished - started, 3) if finished and started else None,
        },
        "links": {"self": base, "events": f"{base}/events"},
    }
    kept_s = retention_s(job, ttl_s)
    if status in FINAL_STATES and finished is not None and kept_s:
        view["expires_at"] = iso(finished + kept_s)
    if status == "succeeded":
        result = json.loads(job.get("result") or "{}")
        count = int(job.get("num_images") or 0)
        view["images"] = [f"{base}/images/{i}" for i in range(count)]
        # request_id: TorchServe's, of the run that made the images, which its logs name
        # (ts_log.log's "Sending response for jobId <id>"): how a job is followed there.
        view["result"] = {name: result.get(name) for name in
                          ("format", "width", "height", "model_version", "timings_s",
                           "request_id")}
    if job.get("error"):
        view["error"] = json.loads(job["error"])
    if job.get("webhook"):
        view["webhook"] = job["webhook"]
        view["webhook_events"] = job.get("webhook_events", "").split(",")
    return view

"""TorchServe's keys, its HTTP APIs and its queue depth, as the worker, the pod probes, our
scripts and the tests use them: the one place that authenticates to TorchServe.

Standard library only, so that scripts and probes (pod.py, health_probe.py) run on any
python3, and a probe run every few seconds does not import numpy, PIL or torch.

The queue depth is known only to TorchServe's frontend; a handler never sees its queue.
The management API's describe call (``GET /models/<name>/<version>``) reports it as
``jobQueueStatus.pendingRequests``, so the worker polls that for the
``sdxl_queue_pending_requests`` gauge.

Keys: TorchServe 0.12 writes ``key_file.json`` in its working directory: it creates the
file with the process's umask and only then narrows it to 0600, so every TorchServe we start
runs with umask 077 (server.py, pod.py) and the keys are never readable by others, not even
for that moment. The management
and inference keys expire after ``token_expiration_min``; nothing renews them by itself.
The API key does not expire and renews the others (``GET <management>/token?type=...``),
which rewrites the key file. ``KeyFile.call`` does exactly that when a key was refused,
after re-reading the file in case someone else already renewed it.

Example:
    keys = KeyFile("build/run/8080/key_file.json", "http://127.0.0.1:8081")
    status, headers, body = keys.call("GET", "http://127.0.0.1:8081/models/sdxl", "management")
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import time
import urllib.error
import urllib.request
from http.client import HTTPException
from pathlib import Path
from typing import Mapping

log = logging.getLogger(__name__)

DEFAULT_MANAGEMENT_ADDRESS = "http://127.0.0.1:8081"  # config/config.properties
# Asking for a deep check: `X-Health-Check: deep` on a predictions call of the model. Here,
# not in health.py, so that the probes that send it do not import numpy and PIL.
HEALTH_HEADER = "x-health-check"
HEALTH_VALUE = "deep"
RENEW_AT_MOST_EVERY_S = 10.0
# The umask every TorchServe we start runs with: its files (the key file first) are the
# owner's alone from the moment they exist.
KEY_UMASK = 0o077


def torchserve_key_file() -> Path:
    """``key_file.json`` in the working directory of the TorchServe frontend that started
    this worker process (its parent), which is where TorchServe writes it."""
    return Path(f"/proc/{os.getppid()}/cwd") / "key_file.json"


# For a caller whose server is its own backend (the job dispatcher, a pod's probes, a
# worker's calls to its frontend, a launcher's to the server it started): no proxy the
# environment names (HTTP_PROXY and the like), which urlopen follows for 127.0.0.1 too.
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http(method: str, url: str, token: str | None = None, body: bytes | None = None,
         headers: Mapping[str, str] | None = None, timeout: float = 30.0,
         direct: bool = False) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one HTTP call, 4xx and 5xx included; a body is JSON unless
    ``headers`` say otherwise; ``direct``: never through the environment's proxy."""
    request = urllib.request.Request(url, data=body, method=method,
                                     headers=dict(headers or {}))
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    # urllib keeps header names as str.capitalize() makes them: "Content-type".
    if body is not None and not request.has_header("Content-type"):
        request.add_header("Content-Type", "application/json")
    try:
        with (DIRECT.open if direct else urllib.request.urlopen)(request,
                                                                 timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers or {}), error.read()


def time_left(deadline: float, floor: float = 0.1) -> float:
    """Seconds until ``deadline`` (a ``time.monotonic()``), as the timeout of one more call:
    at least ``floor``, since a socket timeout of 0 would not even wait for the connection.
    """
    return max(floor, deadline - time.monotonic())


def ready_workers(described: list | dict) -> int:
    """READY workers in a management describe reply: the whole reply (a list, one entry per
    version asked for) or one version's entry. A worker that is starting, retrying a failed
    load or stopping cannot take a request."""
    return len(ready_worker_ids(described))


def ready_worker_ids(described: list | dict) -> list[str]:
    """The ids of ``ready_workers`` (``9000`` for W-9000), as our metrics' ``worker`` label
    has them."""
    versions = described if isinstance(described, list) else [described]
    return [str(worker.get("id")) for version in versions
            for worker in version.get("workers", []) if worker.get("status") == "READY"]


def customized_metadata(version: dict) -> dict:
    """Our handler's own part of one version's entry in a customized describe reply
    (``GET /models/<name>/<version>?customized=true``: ``SDXLHandler.describe``, the worker's
    pid, the model's limits, ...); ``{}`` where there is none (a plain describe, or an
    archive whose handler has no describe answer).

    TorchServe 0.12 keeps ``customizedMetadata`` as a JSON object (a handler answer that is
    not one becomes ``{}``, with a warning in its log), so nothing else needs reading.

    Example:
        >>> customized_metadata({"modelVersion": "1.0", "customizedMetadata": {"pid": 7}})
        {'pid': 7}
        >>> customized_metadata({"modelVersion": "1.0"})
        {}
    """
    metadata = version.get("customizedMetadata")
    return metadata if isinstance(metadata, dict) else {}


def refused_key(status: int, body: bytes) -> bool:
    """TorchServe 0.12 answers a missing, wrong or expired key with 400 InvalidKeyException."""
    return status == 400 and b"InvalidKeyException" in body


def refusal_text(body: bytes) -> str:
    """TorchServe's error answer on one line, ``<type>: <message>``: its JSON printed as
    bytes was `b'{\\n  "code": 400,\\n  "type": ...`. Any other answer as its text, cut.

    Example:
        >>> refusal_text(b'{"code": 400, "type": "InvalidKeyException", "message": "no"}')
        'InvalidKeyException: no'
        >>> refusal_text(b"<html>bad gateway</html>")
        '<html>bad gateway</html>'
    """
    try:
        answer = json.loads(body)
        return f"{answer['type']}: {answer['message']}"
    except (ValueError, LookupError, TypeError):
        return body[:200].decode("utf-8", "replace").strip()


def read_keys(path: str | Path, attempts: int = 5, pause_s: float = 0.05) -> dict[str, str]:
    """The keys in a ``key_file.json`` by kind: management, inference, api.

    TorchServe 0.12 writes the file in place (create, then truncate and write) at start and
    at every renewal, so a reader can find it empty or half written: such a read is tried
    again a few times, ``pause_s`` apart, before its error is raised.

    Raises:
        OSError: no file. ValueError, LookupError: still not whole after ``attempts`` reads.
    """
    for _ in range(attempts - 1):
        try:
            return _parse_keys(path)
        except (ValueError, LookupError, TypeError, AttributeError):
            time.sleep(pause_s)
    return _parse_keys(path)


def _parse_keys(path: str | Path) -> dict[str, str]:
    data = json.loads(Path(path).read_text())
    return {name.lower(): entry["key"] for name, entry in data.items()}


class KeyRenewalFailed(OSError):
    """A renewal of an expired key that got no answer from the management API. Raised as
    itself, not as the connection's error, so that a caller names the renewal as what
    failed: a probe blamed the inference address when the management API was slow."""


class KeyFile:
    """TorchServe's keys, read fresh for each call and renewed when expired: the one place
    our code (worker, scripts, pod probes, tests) authenticates to TorchServe."""

    def __init__(self, path: str | Path, management_address: str, direct: bool = False):
        self.path = Path(path)
        self.management_address = management_address.rstrip("/")
        self.direct = direct  # never through the environment's proxy (``http``)
        self._renewed_at: dict[str, float] = {}

    def key(self, kind: str) -> str | None:
        """The current ``management``, ``inference`` or ``api`` key; None without a file
        (TorchServe still starting, or token authorization off)."""
        try:
            return read_keys(self.path).get(kind)
        except (OSError, ValueError, LookupError, TypeError, AttributeError):
            return None

    def renew(self, kind: str, timeout: float = 30.0) -> bool:
        """Have TorchServe issue a new ``kind`` key with the API key (rewrites the file),
        waiting at most ``timeout`` s for the management API.

        At most once every RENEW_AT_MOST_EVERY_S per kind: callers that all find the same
        expired key renew it once, not once each. Raises ``KeyRenewalFailed`` when the
        management API does not answer."""
        now = time.monotonic()
        if now - self._renewed_at.get(kind, -RENEW_AT_MOST_EVERY_S) < RENEW_AT_MOST_EVERY_S:
            return False
        self._renewed_at[kind] = now
        url = f"{self.management_address}/token?type={kind}"
        try:
            status, _, body = http("GET", url, self.key("api"), timeout=timeout,
                                   direct=self.direct)
        except (OSError, HTTPException) as exc:
            raise KeyRenewalFailed(f"no answer renewing the expired {kind} key at {url}: "
                                   f"{exc}") from exc
        if status != 200:
            log.warning("could not renew the %s key at %s: %s %s", kind, url, status,
                        refusal_text(body))
            return False
        log.info("renewed TorchServe's expired %s key", kind)
        return True

    def call(self, method: str, url: str, kind: str, body: bytes | None = None,
             headers: Mapping[str, str] | None = None, timeout: float = 30.0
             ) -> tuple[int, dict[str, str], bytes]:
        """One call with the ``kind`` key; once more after renewing it if it was refused.

        ``timeout`` is for all of it, the renewal and the second call included, so that a
        caller with a budget (a probe, below the kubelet's timeoutSeconds) keeps to it."""
        deadline = time.monotonic() + timeout
        key = self.key(kind)
        status, answer_headers, answer = http(method, url, key, body, headers, timeout,
                                              self.direct)
        if not refused_key(status, answer) or key is None:
            return status, answer_headers, answer
        # Someone else (another probe, the worker) may have renewed it already.
        if self.key(kind) == key and not self.renew(kind, time_left(deadline)):
            return status, answer_headers, answer
        return http(method, url, self.key(kind), body, headers, time_left(deadline),
                    self.direct)


class QueueDepth:
    """``pendingRequests`` of one model version, from the management API's describe call."""

    def __init__(self, keys: KeyFile, model_name: str, model_version: str):
        self.keys = keys
        self.url = f"{keys.management_address}/models/{model_name}/{model_version}"

    def __call__(self) -> int | None:
        try:
            status, _, body = self.keys.call("GET", self.url, "management", timeout=5.0)
            if status != 200:
                log.debug("describe answered %s: %s", status, body[:200])
                return None
            return int(json.loads(body)[0]["jobQueueStatus"]["pendingRequests"])
        except (OSError, ValueError, LookupError, TypeError) as exc:
            log.debug("no queue depth: %s", exc)
            return None


def archive_part(text: str) -> str:
    """A model name or version as an archive's file name and the management API's paths
    take it: 1 to 64 letters, digits and . _ - (torch-model-archiver refuses "+" and
    spaces; a very long one is a file name the system refuses)."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", text) or ".." in text:
        raise argparse.ArgumentTypeError(
            f"must be 1 to 64 letters, digits and . _ - (got {text[:80]!r})")
    return text

#!/usr/bin/env python3
"""Roll a model version out on a running TorchServe, or roll back, without losing requests.

Uses the management API (token from the server's key file) in five steps:

1. register ``<model store>/<name>-<version>.mar`` (the local model store only) as
   model ``<name>`` with its workers, and wait for them to load (or fail to);
2. wait until its workers are READY and a real generation on
   ``/predictions/<name>/<version>`` answers 200 with that version;
3. make it the default version;
4. drain every other version that still has workers (no queued request, and each worker
   has finished what it took), wait until its queue gauge on ``/metrics`` reads 0 (TorchServe
   keeps a stopped worker's last value), then scale it to 0 workers: it stays registered,
   its GPU is free, and a rollback loads it again;
5. unregister versions beyond the last ``--keep`` (3): never the default, and first the
   ones that have not served since they were registered, then those that served longest
   ago (``ServedVersions``).

``--rollback`` does the same for the version that served last before the default one,
among those kept, skipping the ones earlier rollbacks left (so rolling back twice goes two
versions back, and a version a rollback left is not brought back by the next one). A
failure before step 3 unregisters the new version and leaves the old one the default; a
drain that does not finish makes the old version the default again. Running it twice is
harmless: a step that is already done says so and is skipped.

Usage:
    python scripts/rollout.py --version 2.0        # make sdxl 2.0 the default version
    python scripts/rollout.py --rollback           # back to the version that served before
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shlex
import signal
import sys
import threading
import time
import urllib.parse
import zipfile
from http.client import HTTPException
from pathlib import Path
from typing import Iterable

import psutil

REPO = Path(__file__).resolve().parents[1]
# This checkout's code first, not the checkout a shared venv's editable install names.
sys.path[:0] = [str(REPO / "handler"), str(REPO / "jobs"), str(REPO / "scripts")]
from sdxl_serve.contract import SDXL_LIMITS, RequestError, parse_field  # noqa: E402
from sdxl_serve.management import (KeyFile, archive_part, customized_metadata, http,  # noqa: E402
                                   ready_workers)
from sdxl_serve.metrics import scraped_max  # noqa: E402
from sdxl_serve.model_files import describe_weights, packed_model_dir  # noqa: E402
from sdxl_serve.server import Addresses, LoadWatch, run_dir_for, seconds, \
    seconds_from_zero  # noqa: E402
from sdxl_serve.writable import unwritable  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# A 0 on /metrics must hold this long: ten times the worker's 0.1 s deferral, so no sample
# of the drained version's last busy moments is still on its way (``settle_queue_gauge``).
GAUGE_SETTLE_S = 1.0
# The gauge may take this long whatever --drain-timeout is left (0 leaves none): the
# worker's next sample comes within its metrics_interval_s (5 s by default), and the
# version, idle and no longer the default, keeps no client waiting meanwhile.
GAUGE_WAIT_S = 5.0 + 2 * GAUGE_SETTLE_S
# A worker process sent SIGTERM ends within a second (its Python dies at once, TorchServe
# logs its end); past this it is named with its pid for a `kill -KILL`.
UNLISTED_STOP_S = 30.0


def counted(count: int, noun: str) -> str:
    """``count`` ``noun``s as a person says it: "1 worker", "0 workers", "2 workers"."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


class RolloutError(RuntimeError):
    """A step failed; the message says which one and what is serving now."""


def version_key(version: str) -> tuple:
    """Order versions numerically where they are numbers: 1.10 comes after 1.9."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part)
                 for part in re.split(r"[.\-+_]", version))


def archive_version(mar: Path, version: str) -> str:
    """The version torch-model-archiver wrote into the archive's manifest (of ``version``,
    by its name)."""
    # A copy cut short or another file under the archive's name: say so, not a traceback.
    try:
        with zipfile.ZipFile(mar) as archive:
            manifest = json.loads(archive.read("MAR-INF/MANIFEST.json"))
        return str(manifest["model"]["modelVersion"])
    except (zipfile.BadZipFile, KeyError, ValueError, TypeError) as exc:
        raise RolloutError(f"{mar} is not a model archive with a version in "
                           f"MAR-INF/MANIFEST.json ({type(exc).__name__}: {exc}): build it "
                           f"again with `make archive VERSION={version}`") from None


def damaged_member(mar: Path) -> str | None:
    """The first member of ``mar`` whose bytes fail their CRC check, or None.

    Read only after TorchServe refused the archive, whose answer for one it cannot unpack
    is "Failed to save model": this names the cause, reading the whole archive once."""
    try:
        with zipfile.ZipFile(mar) as archive:
            return archive.testzip()
    except Exception as exc:  # noqa: BLE001 - zlib.error and the like: it only names a cause
        return f"a member ({type(exc).__name__}: {exc})"


def say(message: str) -> None:
    print(message, flush=True)


class ModelServer:
    """The management and inference calls a rollout makes, against one TorchServe."""

    def __init__(self, addresses: Addresses, key_file: Path, name: str):
        self.addresses = addresses
        self.key_file = key_file
        # Straight to the server, never through the environment's HTTP_PROXY (urllib's
        # default, 127.0.0.1 included): the proxy was sent every call with the management
        # and API keys, and one that cannot reach the server's loopback failed the rollout
        # with its own words ("Remote end closed connection").
        self.keys = KeyFile(key_file, addresses.management, direct=True)
        self.name = name

    def call(self, method: str, path: str, timeout: float = 30.0, inference: bool = False,
             body: bytes | None = None) -> tuple[int, dict, bytes]:
        """One call with the current key (read every time, renewed once if it expired)."""
        base = self.addresses.inference if inference else self.addresses.management
        kind = "inference" if inference else "management"
        if self.keys.key(kind) is None:
            raise RolloutError(f"cannot read the {kind} key from {self.key_file}; is "
                               f"TorchServe running with this run directory?")
        try:
            status, headers, data = self.keys.call(method, base + path, kind, body,
                                                   timeout=timeout)
        # HTTPException: a server that died mid-reply (IncompleteRead) or answered no HTTP
        # (BadStatusLine) is no OSError, and was a traceback.
        except (OSError, HTTPException) as exc:
            refused = isinstance(getattr(exc, "reason", exc), ConnectionRefusedError)
            raise RolloutError(f"{method} {base}{path} failed: {cause(exc)}" + (
                "; is TorchServe running on these addresses? (a key file of a server that "
                "was killed stays behind)" if refused else "")) from None
        return status, {k.lower(): v for k, v in headers.items()}, data

    def management(self, method: str, path: str, timeout: float = 30.0) -> tuple[int, object]:
        status, _, data = self.call(method, path, timeout)
        try:
            return status, json.loads(data)
        except ValueError:
            return status, data.decode(errors="replace")

    def versions(self) -> dict[str, dict]:
        """Every registered version of the model, by version, as ``describe`` reports it."""
        status, answer = self.management("GET", f"/models/{self.name}/all")
        if status == 404:
            return {}
        if status != 200:
            raise RolloutError(f"describe {self.name} answered {status}: {message(answer)}")
        return {entry["modelVersion"]: entry for entry in answer}

    def default_version(self, timeout: float = 30.0) -> str | None:
        status, answer = self.management("GET", f"/models/{self.name}", timeout)
        if status == 404:
            return None
        if status != 200:
            raise RolloutError(f"describe {self.name} answered {status}: {message(answer)}")
        return answer[0]["modelVersion"]

    def describe(self, version: str) -> dict | None:
        status, answer = self.management("GET", f"/models/{self.name}/{version}")
        if status == 404:
            return None
        if status != 200:
            raise RolloutError(f"describe {self.name} {version} answered {status}: "
                               f"{message(answer)}")
        return answer[0]

    # register and scale: never synchronous=true. TorchServe 0.12 then waits for the
    # workers in the Netty event loop thread that took the call (ApiUtils.updateModelWorkers),
    # and every new connection that loop is given, inference ones included, stalls for the
    # whole model load. The callers wait for the workers by polling describe instead.
    def register(self, mar: str, workers: int, timeout: float = 60.0) -> tuple[int, str]:
        query = urllib.parse.urlencode({"url": mar, "model_name": self.name,
                                        "initial_workers": workers, "synchronous": "false"})
        status, answer = self.management("POST", f"/models?{query}", timeout)
        return status, message(answer)

    def unregister(self, version: str, timeout: float = 120.0) -> None:
        status, answer = self.management("DELETE", f"/models/{self.name}/{version}", timeout)
        if status not in (200, 404):
            raise RolloutError(f"unregister {self.name} {version} answered {status}: "
                               f"{message(answer)}")

    def set_default(self, version: str) -> None:
        status, answer = self.management("PUT", f"/models/{self.name}/{version}/set-default")
        if status != 200:
            raise RolloutError(f"set-default {self.name} {version} answered {status}: "
                               f"{message(answer)}")

    def queue_gauge(self, version: str) -> float | None:
        """The highest ``sdxl_queue_pending_requests`` of ``version`` on ``/metrics`` (no
        token); None when the series is absent (the version's worker never wrote it)."""
        try:
            status, _, data = http("GET", self.addresses.metrics + "/metrics", timeout=10.0,
                                   direct=True)
        except (OSError, HTTPException) as exc:
            raise RolloutError(f"GET {self.addresses.metrics}/metrics failed: "
                               f"{cause(exc)}") from None
        if status != 200:
            raise RolloutError(f"GET {self.addresses.metrics}/metrics answered {status}")
        return scraped_max(data.decode(errors="replace"), "sdxl_queue_pending_requests",
                           self.name, version)

    def scale(self, version: str, workers: int, timeout: float = 60.0) -> None:
        status, answer = self.management(
            "PUT", f"/models/{self.name}/{version}?min_worker={workers}&max_worker={workers}"
                   f"&synchronous=false", timeout)
        if status not in (200, 202):
            raise RolloutError(f"scaling {self.name} {version} to {workers} workers answered "
                               f"{status}: {message(answer)}")


def process_runs(pid: int) -> bool:
    """Whether the process ``pid`` runs (a zombie, ended but not yet reaped, does not)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:  # there, but not ours to read: it runs
        return True


def cause(exc: BaseException) -> str:
    """A failed call's error on one line: http.client's own (a reply cut short, a line that
    is no HTTP status) with its name, the line it read quoted, its CR LF not printed."""
    if isinstance(exc, HTTPException):
        return f"the reply was cut short or not HTTP: {exc!r}"
    return str(exc)


def message(answer: object) -> str:
    if isinstance(answer, dict):
        return str(answer.get("message") or answer.get("status") or answer)
    return str(answer)


def replaced_worker(first_pids: dict[str, int], workers: list[dict]) -> str | None:
    """Which worker's process was replaced before it was READY, as ``describe`` shows it;
    None while none was. ``first_pids`` remembers each worker's first process across calls.

    A worker that fails to load looks like one still loading (not READY), but TorchServe
    starts a new process for each try and ``describe`` shows the new pid (it keeps the pid
    of the process that failed until the next one has started): a worker's pid that changes
    before it was ever READY is a load that failed and is being retried. The logs tell it at
    once, with the cause; this tells it one retry later, without them.
    """
    for worker in workers:
        pid = worker.get("pid")
        if not isinstance(pid, int) or pid <= 0:  # -1 until its first process has started
            continue
        first = first_pids.setdefault(str(worker.get("id")), pid)
        if pid != first and worker.get("status") != "READY":
            return (f"worker {worker.get('id')}'s process {first} ended before it was READY "
                    f"and TorchServe started {pid} in its place")
    return None


def load_cause(failure: str) -> str:
    """The handler's own exception from ``LoadWatch.failure``'s tracebacks, on one line.

    TorchServe's worker catches the handler's error and raises its own generic
    ``500 - Unknown exception`` (or ``507 - System out of memory``) last, which
    ``LoadWatch`` leaves out when the cause is there. Empty when that is all there is;
    without a traceback, TorchServe's line itself.
    """
    causes = []
    for block in failure.split("\n\n"):
        lines = block.splitlines()
        start = next((i for i, line in enumerate(lines) if i and line[:1].strip()), None)
        cause = " ".join(line.strip() for line in lines[start:]) if start else ""
        if cause and not LoadWatch.CAUGHT.match(cause):
            causes.append(cause)
    if causes:
        return causes[-1]
    return "" if LoadWatch.TRACEBACK in failure else " ".join(failure.split())


class ServedVersions:
    """The versions that served, in the order they became the default, of one server run.

    TorchServe does not keep this: ``describe`` shows the default version and nothing of
    the ones before it, and the config snapshots it could write are off (``--ncs``). So the
    rollout records each switch in a small JSON file beside the key file (the server's run
    directory), with a fingerprint of the server's API key, which TorchServe draws anew at
    every start: the history of an earlier run of the server is not taken for this one's.
    Only versions still registered count, and the rollout forgets each version it
    unregisters: an archive built again under the same number has not served yet. It also
    keeps the versions a rollback left (``rolled_back``): a later rollback skips them, until
    a rollout makes one the default again.

    Example:
        served = ServedVersions(Path("build/run/8080/served_versions.json"), api_key)
        served.record("sdxl", {"1.0", "2.0"}, "1.0", "2.0")
        served.order("sdxl", {"1.0", "2.0"})  # ["1.0", "2.0"], the latest last
    """

    def __init__(self, path: Path, api_key: str | None):
        self.path = path
        self.server = hashlib.sha256(api_key.encode()).hexdigest()[:16] if api_key else None

    def order(self, name: str, registered: Iterable[str]) -> list[str]:
        """The registered versions of ``name`` that served, the latest last."""
        registered = set(registered)
        return [v for v in self.history(name) if v in registered]

    def history(self, name: str) -> list[str]:
        """The versions of ``name`` that served in this run of the server, the latest last,
        registered now or not (a rollback stopped while it loads one again leaves that one
        unregistered)."""
        return self._read().get(name, [])

    def record(self, name: str, registered: Iterable[str], *serving: str) -> None:
        """``serving`` served, in that order, after every version recorded before."""
        models = self._read()
        history = [v for v in self.order(name, registered) if v not in serving]
        models[name] = history + list(dict.fromkeys(serving))
        self._write(models)

    def forget(self, name: str, version: str) -> None:
        """``version`` was unregistered: an archive registered later under its number is
        another model that has not served yet."""
        models = self._read()
        left = self.rolled_back(name)
        if version in models.get(name, []) or version in left:
            models[name] = [v for v in models.get(name, []) if v != version]
            self._write(models, {name: [v for v in left if v != version]})

    def rolled_back(self, name: str) -> list[str]:
        """The versions of ``name`` that a rollback left, in this run of the server."""
        return self._read(section="rolled_back").get(name, [])

    def mark_rolled_back(self, name: str, version: str, left: bool = True) -> None:
        """A rollback left ``version`` (``left``), or a rollout made it the default again."""
        others = [v for v in self.rolled_back(name) if v != version]
        self._write(self._read(), {name: others + [version] if left else others})

    def drop_other_runs(self) -> None:
        """Remove a record written by another run of the server: read once at a restart
        (``last_default``), it must not speak for the runs after it."""
        state = self._state()
        if state is not None and (not isinstance(state, dict)
                                  or state.get("server") != self.server):
            self.path.unlink(missing_ok=True)

    def last_default(self, name: str) -> str | None:
        """The version of ``name`` that a rollout made the default last, in whichever run
        of the server wrote the record: what a restart on the same run directory would
        serve if it did not take its version from the command line."""
        history = self._read(any_run=True).get(name)
        return history[-1] if history else None

    def _state(self) -> object | None:
        """The record file's JSON; None when there is none or it is not JSON."""
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def _read(self, any_run: bool = False, section: str = "served") -> dict[str, list[str]]:
        """The record's ``section`` (``served`` or ``rolled_back``) by model: this run's,
        or whichever run wrote it (``any_run``)."""
        state = self._state()
        if not isinstance(state, dict) or (not any_run and state.get("server") != self.server):
            return {}
        models = state.get(section)
        if not isinstance(models, dict):
            return {}
        return {name: [str(v) for v in history] for name, history in models.items()
                if isinstance(history, list)}

    def _write(self, models: dict[str, list[str]],
               rolled_back: dict[str, list[str]] | None = None) -> None:
        if self.server is None:  # no key to tell this server run from another
            return
        left = self._read(section="rolled_back")
        left.update(rolled_back or {})
        text = json.dumps({"server": self.server, "served": models,
                           "rolled_back": {k: v for k, v in left.items() if v}}, indent=1)
        # Whole or not at all: a rollout stopped mid-write must not leave half a file.
        partial = self.path.with_name(self.path.name + ".partial")
        try:
            partial.write_text(text + "\n")
            os.replace(partial, self.path)
        except OSError as exc:
            # A full disk leaves the file made and cut short: the next write starts afresh.
            partial.unlink(missing_ok=True)
            say(f"      could not record the served versions in {self.path}: {exc}")


def prune_order(default: str, registered: Iterable[str], served: list[str]) -> list[str]:
    """The versions other than the default, those to keep first: the ones that served, the
    latest first, then the ones that have not served since they were registered (left by a
    run that was killed, or one that could not unregister a failed version), the highest
    first."""
    others = [v for v in registered if v != default]
    latest = [v for v in reversed(served) if v in others]
    never = sorted((v for v in others if v not in served), key=version_key, reverse=True)
    return latest + never


def rollback_choice(default: str, kept: Iterable[str], served: list[str],
                    rolled_back: Iterable[str]) -> str | None:
    """Where a rollback from ``default`` goes: the version that served last before it
    (``served``, the latest last), not one a rollback left; with no record, the highest
    ``kept`` version below it. None: nowhere.

    Example:
        >>> rollback_choice("2.0", {"1.0", "2.0"}, ["1.0", "2.0"], [])
        '1.0'
        >>> # 1.0, 2.0, a rollback to 1.0 (2.0 left), then 3.0: back to 1.0, not 2.0
        >>> rollback_choice("3.0", {"1.0", "2.0", "3.0"}, ["2.0", "1.0", "3.0"], ["2.0"])
        '1.0'
        >>> rollback_choice("2.0", {"1.0", "2.0"}, ["1.0", "2.0"], ["1.0"]) is None
        True
        >>> rollback_choice("3.0", {"1.0", "2.0", "3.0"}, [], [])  # no record
        '2.0'
    """
    if served:
        rejected = set(rolled_back)
        earlier = [v for v in reversed(served) if v != default and v not in rejected]
        return earlier[0] if earlier else None
    older = sorted((v for v in kept if version_key(v) < version_key(default)), key=version_key)
    return older[-1] if older else None


class Rollout:
    """Makes one version of one model the default, following the module's five steps."""

    def __init__(self, server: ModelServer, model_store: Path, keep: int = 3,
                 workers: int = 1, load_timeout: float = 900.0, drain_timeout: float = 600.0,
                 check_steps: int = 2, model_dir: Path | None = None):
        self.server = server
        self.model_dir = model_dir
        """The weights the version must serve (MODEL_DIR), when the caller says."""
        self.name = server.name
        self.model_store = model_store
        self.keep = keep
        self.workers = workers
        self.load_timeout = load_timeout
        self.drain_timeout = drain_timeout
        self.check_steps = check_steps
        self.served = ServedVersions(server.key_file.parent / "served_versions.json",
                                     server.keys.key("api"))

    def archive(self, version: str) -> Path:
        """``version``'s archive in the local model store (build_archive.py's name)."""
        return self.model_store / f"{self.name}-{version}.mar"

    def rollback_target(self) -> str:
        """The version that served last before the default one, among those kept, skipping
        the ones a rollback left (without a record of this server run's switches: the
        highest kept version below the default one)."""
        default = self.server.default_version()
        if default is None:
            raise RolloutError(f"model {self.name} is not registered: nothing to roll back")
        registered = set(self.server.versions())
        # A version that served and is not registered now, its archive still in the store:
        # a rollback was stopped (Ctrl-C) after unregistering it to register it again.
        candidates = registered | {v for v in self.served.history(self.name)
                                   if self.archive(v).is_file()}
        target = rollback_choice(default, candidates, self.served.order(self.name, candidates),
                                 self.served.rolled_back(self.name))
        if target is None:
            raise RolloutError(f"{self.name} {default} is serving and no version that served "
                               f"before it is kept: nothing to roll back to")
        return target

    def check_weights(self, mar: Path, version: str) -> None:
        """Say which weights ``mar`` serves; refuse other weights than ``model_dir`` (an
        archive built without MODEL_DIR packs the tiny random model, which would then
        serve under the version's number) and weights that are gone."""
        try:
            weights = packed_model_dir(mar)
        except KeyError:  # no model-config.yaml: not one of our builds; its load will tell
            if self.model_dir is not None:
                raise RolloutError(f"{mar.name} has no model-config.yaml: cannot tell which "
                                   f"weights it serves") from None
            return
        except (OSError, ValueError, AttributeError, zipfile.BadZipFile) as exc:
            raise RolloutError(f"{mar.name}: cannot read its model-config.yaml ({exc})") \
                from None
        if self.model_dir is not None and (weights is None or weights.resolve()
                                           != self.model_dir.resolve()):
            raise RolloutError(
                f"{mar.name} serves {describe_weights(weights)}, not the weights in "
                f"{self.model_dir}: build it with `make archive VERSION={version} "
                f"MODEL_DIR={shlex.quote(str(self.model_dir))}`")
        if weights is not None and not weights.is_dir():
            raise RolloutError(f"{mar.name} serves the weights in {weights}, which are gone")
        say(f"{mar.name} serves {describe_weights(weights)}")

    def run(self, version: str, rollback: bool = False) -> None:
        """Make ``version`` the default (steps 0 to 5); ``rollback``: the default it replaces
        is one a later rollback skips."""
        name = self.name
        mar = self.archive(version)
        # 0. The archive: in the local model store, and really of this version.
        if not mar.is_file():
            if rollback:
                # A new build from this checkout is not the one that served.
                raise RolloutError(
                    f"no archive {mar}: put back the build of {version} that served (earlier "
                    f"builds are kept in {self.model_store / 'replaced'}/); "
                    f"{self.server.default_version()} is still the default version")
            weights = f" MODEL_DIR={shlex.quote(str(self.model_dir))}" if self.model_dir \
                else ""
            raise RolloutError(f"no archive {mar}: build it first with "
                               f"`make archive VERSION={version}{weights}`")
        packed = archive_version(mar, version)
        if packed != version:
            raise RolloutError(f"{mar.name} holds version {packed}, not {version}")
        self.check_weights(mar, version)
        previous = self.server.default_version()
        say(f"rollout {name} {version}: serving now: "
            f"{previous if previous else 'nothing (model not registered)'}")
        # 1. Register it with its workers (a kept version with 0 workers is registered again),
        # once no version that has not served holds a pipeline beside the default one.
        self.drain_leftovers(version, previous)
        self.register(version, mar, previous)
        # 2. READY, and a real generation answered by this version.
        try:
            self.check(version)
            # 3. The switch.
            if previous == version:
                say(f"[3/5] {version} is already the default version")
            else:
                say(f"[3/5] set {version} as the default version")
                self.server.set_default(version)
        except RolloutError as exc:
            # Whether this run registered it or an interrupted earlier one did, a version
            # that failed its check must not stay loaded beside the default one, nor be
            # found later by --rollback as a kept version: it never served. Nor may a
            # first version (TorchServe makes it the default at once) serve unchecked.
            default = self.server.default_version()
            if default != version and previous is not None and \
                    version in self.served.history(name):
                # It served in this server run (a rollback's target): a check that fails
                # now (out of GPU memory beside the default, say) must not cost the
                # operator the version to go back to. Kept as step 4 leaves one.
                say(f"      scale {version} to 0 workers: it failed its check; it stays "
                    f"kept, as it served before")
                self.server.scale(version, 0)
            elif default != version or previous is None:
                say(f"      unregister {version}: it failed its check")
                self.unregister(version)
                default = self.server.default_version()
            raise RolloutError(f"{exc}; {default or 'nothing (model not registered)'} is "
                               f"the default version") from None
        # For step 5 and --rollback: the version that served until now (whoever made it
        # the default) served before this one.
        self.served.record(name, self.server.versions(), *([previous] if previous else []),
                           version)
        # A rollback left the version it replaced: the next rollback goes further back, not
        # to it. A rollout chose its version: a rollback may go back to it again.
        self.served.mark_rolled_back(name, version, left=False)
        if rollback and previous and previous != version:
            self.served.mark_rolled_back(name, previous)
        # 4. Drain and scale down every other version that still has workers.
        registered = self.server.versions()
        served = self.served.order(name, registered)
        busy = [other for other, entry in sorted(registered.items())
                if other != version and entry.get("workers")]
        if not busy:
            say("[4/5] no other version has workers: nothing to drain")
        for other in busy:
            if other != previous and other not in served and \
                    not ready_workers(registered[other]):
                # Left by an interrupted run and not loaded (TorchServe retries it for as
                # long as it runs): no worker to drain, nor ever one to answer a barrier.
                say(f"[4/5] unregister {other}: it has not served since it was registered "
                    f"and has no READY worker")
                self.unregister(other)
                continue
            try:
                self.drain(other)
            except RolloutError as exc:
                if other == previous:
                    say(f"      set {previous} as the default version again")
                    self.server.set_default(previous)
                    self.served.record(name, self.server.versions(), previous)
                    self.served.mark_rolled_back(name, previous, left=False)
                    raise RolloutError(f"{exc}; {previous} is the default version again, "
                                       f"{version} stays registered with its workers: "
                                       f"run this again to finish") from None
                step = "" if str(exc).startswith("step 4") else f"step 4 failed: {other}: "
                raise RolloutError(f"{step}{exc}; {version} is the default version and "
                                   f"serves: run this again to finish") from None
        # 5. Keep the default and those that served last, up to --keep versions.
        self.prune(version)
        kept = ", ".join(f"{v} ({counted(len(e.get('workers', [])), 'worker')})"
                         for v, e in sorted(self.server.versions().items(),
                                            key=lambda item: version_key(item[0])))
        say(f"done: {name} {self.server.default_version()} is the default version; "
            f"registered: {kept}")

    def drain_leftovers(self, version: str, previous: str | None) -> None:
        """Step 1, first: drain the versions an interrupted run left READY that never
        served (nor are the default; only a client that names their version reaches them).
        Drained at step 4, after the new version's load, they made a GPU hold three
        pipelines, and the new one could fail to load for memory. Drained, not unregistered:
        they stay registered with 0 workers, as step 4 leaves them, until the prune."""
        registered = self.server.versions()
        served = self.served.order(self.name, registered)
        for other, entry in sorted(registered.items()):
            if other not in (version, previous) and other not in served and \
                    ready_workers(entry):
                try:
                    self.drain(other, step=1)
                except RolloutError as exc:
                    raise RolloutError(f"{exc}; nothing changed, "
                                       f"{previous or 'nothing (model not registered)'} is "
                                       f"the default version: run this again once its "
                                       f"requests are answered") from None

    def register(self, version: str, mar: Path, previous: str | None) -> None:
        """Step 1: register ``version`` from ``mar`` with its workers, or see to it that a
        registration already there (a kept version, an interrupted run's) gets READY ones."""
        entry = self.server.versions().get(version)
        if entry is not None and ready_workers(entry):
            ready = ready_workers(entry)
            say(f"[1/5] {version} is already registered with {ready} READY "
                f"worker{'s' if ready > 1 else ''}")
            return
        if entry is not None and not entry.get("workers") and version != previous:
            # Scaling a kept version up again would leave TorchServe retrying a worker that
            # fails to load for minutes; a synchronous register unregisters it at once.
            # Its place among the versions that served stays: a rollback interrupted while
            # it loads again must find it again, as must one after its load failed.
            say(f"[1/5] unregister kept {version} (0 workers) to register it again")
            self.server.unregister(version)
            entry = None
        if entry is not None and not entry.get("workers"):
            say(f"[1/5] {version} is the default version with 0 workers: scale it to "
                f"{self.workers}")
            watch = self.load_watch()
            self.server.scale(version, self.workers)
            self.wait_ready(version, watch, previous)
            return
        if entry is not None and version == previous:
            say(f"[1/5] {version} is the default version; waiting for its workers")
            self.wait_ready(version)
            return
        if entry is not None:
            # Registered by an interrupted earlier run, and loading still, or failing and
            # retried by TorchServe for as long as it runs: watched as a load of this run's,
            # so a failure unregisters it now, not after --load-timeout.
            say(f"[1/5] {version} is registered (by an interrupted run?); waiting for its "
                f"workers")
            self.wait_ready(version, self.load_watch(), previous)
            return
        say(f"[1/5] register {mar.name} from the model store as {self.name} {version} "
            f"with its workers (loading and warm-up can take minutes)")
        watch = self.load_watch()
        started = time.monotonic()
        try:
            status, answer = self.server.register(mar.name, self.workers)
        except RolloutError as exc:
            status, answer = 0, str(exc)
        if status not in (200, 202):
            left = ""
            if version in self.server.versions():  # our call timed out after registering
                left = self.unload(version, previous, watch)
            damaged = damaged_member(mar) if status else None
            cause = (f" ({mar.name} is damaged: {damaged} fails its check; build it again "
                     f"with `make archive VERSION={version}`)" if damaged else "")
            # TorchServe says only "Failed to save model" when it cannot unpack the archive
            # in its temp directory; a local server's (the launcher's <run dir>/tmp) is
            # probed here for the reason.
            temp_dir = self.server.key_file.parent / "tmp"
            full = unwritable([temp_dir]) if status and temp_dir.is_dir() else None
            cause += f" ({full}, where TorchServe unpacks the archive)" if full else ""
            raise RolloutError(f"step 1 failed: {version} did not register: {answer}{cause}; "
                               f"{previous or 'nothing'} is still the default version{left}")
        self.wait_ready(version, watch, previous)
        say(f"      registered and loaded in {time.monotonic() - started:.1f} s")

    def unregister(self, version: str) -> None:
        self.server.unregister(version)
        self.served.forget(self.name, version)

    def load_watch(self) -> LoadWatch:
        """TorchServe's logs from now on: serve.py and the tests keep them in ``<run
        dir>/logs``, beside the key file (none there: nothing is read from them)."""
        return LoadWatch(self.server.key_file.parent / "logs")

    def wait_ready(self, version: str, load: LoadWatch | None = None,
                   previous: str | None = None) -> None:
        """Until every worker of ``version`` is READY, for at most ``--load-timeout``.

        With ``load`` (step 1, a load this run started): TorchServe retries a worker that
        failed to load for as long as it runs, showing it as loading, so the failure is read
        from its logs (``load``, with the worker's exception) or from ``describe`` (its
        process replaced, ``replaced_worker``); then, or at the timeout, the version is
        unloaded and step 1 fails. Without: step 2 fails at the timeout.
        """
        deadline = time.monotonic() + self.load_timeout
        first_pids: dict[str, int] = {}
        while True:
            entry = self.server.describe(version)
            workers = (entry or {}).get("workers", [])
            if workers and ready_workers(entry) == len(workers):
                return
            if load is None:
                if time.monotonic() > deadline:
                    raise RolloutError(f"step 2 failed: {version}'s workers are not READY "
                                       f"after {self.load_timeout:g} s")
            elif problem := self.failed_load(version, entry, load, first_pids, deadline):
                logged = entry is not None and load.failure(f"{self.name}/{version}", 0.0)
                # Scaled down first, the worker's traceback read after: TorchServe retries
                # a failed load 1 s after it, and a scale-down within that second leaves the
                # retry unlisted, which `unload` waits out; waiting for the traceback first
                # (2 s where TorchServe lost it) let the retry start, listed, and load beside
                # the serving version until the scale-down ended it. (Only a failure read
                # from the logs: the unload's own lines would be taken for another's.)
                left = self.unload(version, previous, load)
                if logged:
                    problem = self.failed_load(version, entry, load, first_pids, deadline,
                                               settle_s=2.0)
                raise RolloutError(f"step 1 failed: {version} did not load: {problem}; "
                                   f"{previous or 'nothing'} is still the default version"
                                   f"{left}")
            time.sleep(0.5)

    def failed_load(self, version: str, entry: dict | None, load: LoadWatch,
                    first_pids: dict[str, int], deadline: float,
                    settle_s: float = 0.0) -> str | None:
        """Why the load of ``version`` that ``entry`` describes has failed; None while it
        may still succeed. ``settle_s``: how long to wait for the worker's traceback after
        TorchServe's line (``LoadWatch.failure``)."""
        if entry is None:
            return "it is no longer registered"
        if failure := load.failure(f"{self.name}/{version}", settle_s=settle_s):
            cause = load_cause(failure)
            return (f"its worker failed to load ({cause + '; ' if cause else ''}see "
                    f"{load.model_log})")
        if replaced := replaced_worker(first_pids, entry.get("workers", [])):
            why = "" if load.ts_log.exists() else (" (no TorchServe logs beside the key file "
                                                   "to say why)")
            return f"its worker failed to load: {replaced}{why}"
        if time.monotonic() > deadline:
            return f"its workers are not READY after {self.load_timeout:g} s (--load-timeout)"
        return None

    def unload(self, version: str, previous: str | None, load: LoadWatch | None = None) -> str:
        """Stop TorchServe retrying a version that failed to load (minutes of restarts).
        What is left of it afterwards, for the failure's message: "" when nothing."""
        if version == previous:  # the default with others kept: it stays, with 0 workers
            say(f"      scale {version} to 0 workers again")
            self.server.scale(version, 0)
        elif version not in self.server.versions():
            return ""
        elif previous is not None and version in self.served.history(self.name):
            # It served in this server run (a rollback's target, whose load can fail for
            # want of GPU memory beside the serving one): kept as a failed check keeps it,
            # registered with 0 workers, or the next rollback went past it to an older
            # version. (Unregistered, it would leave the record at the next switch, which
            # keeps registered versions only; with no other version registered it is not
            # kept: alone, it would be the default.)
            say(f"      scale {version} to 0 workers: it failed to load; it stays kept, as it "
                f"served before")
            self.server.scale(version, 0)
        else:
            say(f"      unregister {version}")
            self.unregister(version)
            return ""
        return self.wait_out_unlisted_retry(version, load) if load else ""

    def wait_out_unlisted_retry(self, version: str, load: LoadWatch) -> str:
        """After a scale to 0 of ``version``, whose load failed: wait until the retry of its
        load that TorchServe had planned before the scale-down has ended, for at most
        ``--load-timeout``. TorchServe lists no worker of the version by then, yet runs that
        retry (``LoadWatch.unlisted_retries``): a process that loads the model beside the
        serving one, its GPU memory held for as long as the load takes. Said before the
        rollout ends, so that a rollback run again at once does not load beside it.

        A retry whose load succeeds keeps its process, which no scale or unregister reaches:
        it is sent SIGTERM (``stop_unlisted_worker``), which TorchServe takes as the end of
        a scaled-down worker and starts no other. "" once every retry ended (or none was
        planned); else what is left, for the failure's message."""
        model = f"{self.name}/{version}"
        time.sleep(0.5)  # the worker thread's `Retry worker` line may follow the scale-down's
        retries = load.unlisted_retries(model)
        if not retries:
            return ""
        workers = ", ".join(sorted(retries))
        say(f"      wait for TorchServe's retry of {version}'s load ({workers}), planned before "
            f"the scale-down: it loads the model though no worker is listed")
        started = time.monotonic()
        deadline = started + self.load_timeout
        # A loaded worker's pid and when it was sent SIGTERM, or why it could not be.
        signalled: dict[str, tuple[int, float]] = {}
        unstoppable: dict[str, str] = {}
        # A signalled process that has exited has ended, its thread's line in the log or not.
        while retries := {worker: state for worker, state in
                          load.unlisted_retries(model).items()
                          if worker not in signalled or process_runs(signalled[worker][0])}:
            if gone := self.server_gone(version):
                say(f"      TorchServe no longer answers ({gone}): the wait ends; its worker "
                    f"processes end with it")
                return (f"; TorchServe stopped answering while its retry of {version}'s load "
                        f"ran ({gone})")
            for worker, state in sorted(retries.items()):
                if state == "loaded" and worker not in signalled | unstoppable:
                    stopped = self.stop_unlisted_worker(model, worker, load)
                    if isinstance(stopped, int):
                        signalled[worker] = (stopped, time.monotonic())
                    else:
                        unstoppable[worker] = stopped
            now = time.monotonic()
            if all(worker in unstoppable or now > (
                    signalled[worker][1] + UNLISTED_STOP_S if worker in signalled
                    else deadline) for worker in retries):
                break
            time.sleep(0.5)
        ended = ", ".join(f"{worker}'s process {pid}" for worker, (pid, _) in
                          sorted(signalled.items()) if worker not in retries)
        if ended:
            say(f"      {ended} ended at the SIGTERM")
        if not retries:
            say(f"      it ended after {time.monotonic() - started:.1f} s: no process of "
                f"{version} is left")
            return ""
        left = []
        for worker, state in sorted(retries.items()):
            if worker in unstoppable:
                left.append(f"{worker} loaded it all the same and is listed nowhere, where "
                            f"no scale or unregister reaches it: {unstoppable[worker]}")
            elif worker in signalled:
                pid = signalled[worker][0]
                left.append(f"{worker} loaded it all the same and is listed nowhere; its "
                            f"process {pid} had not ended {UNLISTED_STOP_S:g} s after a "
                            f"SIGTERM: `kill -KILL {pid}` frees its memory")
            else:
                left.append(f"{worker} was still loading after {self.load_timeout:g} s "
                            f"(--load-timeout): see {load.ts_log}")
        return (f"; TorchServe's retry of {version}'s load, planned before the scale-down: "
                + "; ".join(left))

    def server_gone(self, version: str) -> str | None:
        """Why TorchServe no longer answers a describe of ``version``; None while it does
        (any status: only a call that gets no answer counts). A server stopped in a wait
        for its logs was waited on until the wait's timeout, its logs saying nothing more."""
        try:
            self.server.management("GET", f"/models/{self.name}/{version}", timeout=10.0)
        except RolloutError as exc:
            return str(exc)
        return None

    def stop_unlisted_worker(self, model: str, worker: str, load: LoadWatch) -> int | str:
        """Send SIGTERM to the process of ``worker`` (``W-9003``) of ``model``, a retried
        load that succeeded after a scale-down left it unlisted; its pid, or why it was
        not sent one (for the failure's message).

        The pid is the one that worker's last process logged (``LoadWatch.worker_pid``),
        read beside the key file, so the server is on this machine; it is signalled only
        while it is still a TorchServe worker on that worker's socket, as a pid can be
        taken again by another process once its own has ended."""
        pid = load.worker_pid(model, worker)
        if pid is None:
            return f"no pid of it in {load.model_log}: find its model_service_worker process"
        port = worker.removeprefix("W-")
        try:
            command = psutil.Process(pid).cmdline()
        except psutil.NoSuchProcess:
            return pid  # it ended on its own: the wait sees it gone
        except psutil.Error as exc:
            return f"its process {pid} could not be read ({cause(exc)}): `kill {pid}` frees it"
        on_its_socket = any(part.endswith(f".ts.sock.{port}") for part in command) or \
            any(a == "--port" and b == port for a, b in zip(command, command[1:]))
        if not (any(part.endswith("model_service_worker.py") for part in command)
                and on_its_socket):
            return (f"process {pid}, its pid in {load.model_log}, is no TorchServe worker on "
                    f"port {port} now ({shlex.join(command)[:200]}): find its process")
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return pid  # it ended on its own: the wait sees it gone
        except OSError as exc:
            return f"its process {pid} could not be sent SIGTERM ({cause(exc)}): `kill {pid}` " \
                   f"frees it"
        say(f"      {worker}'s retry loaded the model, though no worker of it is listed and no "
            f"scale or unregister reaches it: SIGTERM to its process {pid}")
        return pid

    def check(self, version: str) -> None:
        """Step 2: READY workers and one real generation made by this version."""
        say(f"[2/5] wait until {version} is READY and generates on "
            f"/predictions/{self.name}/{version}")
        self.wait_ready(version)
        body = json.dumps({"prompt": "rollout check", "seed": 0,
                           "num_inference_steps": self.check_steps}).encode()
        started = time.monotonic()
        status, headers, data = self.server.call(
            "POST", f"/predictions/{self.name}/{version}", timeout=self.load_timeout,
            inference=True, body=body)
        problem = None
        try:
            reply = json.loads(data)
        except ValueError:
            reply = {}
        if status != 200:
            problem = f"answered {status}: {data[:300].decode(errors='replace')}"
        elif reply.get("model_version") != version or headers.get("x-model-version") != version:
            problem = (f"was made by version {reply.get('model_version')!r} "
                       f"(X-Model-Version {headers.get('x-model-version')!r}), not {version!r}")
        elif not base64.b64decode(reply.get("image", "")).startswith(PNG_MAGIC):
            problem = "carried no PNG image"
        if problem:
            raise RolloutError(f"step 2 failed: the check generation on {version} {problem}")
        say(f"      generated a {reply.get('width')}x{reply.get('height')} image in "
            f"{time.monotonic() - started:.1f} s, made by {version}")

    def drain(self, version: str, step: int = 4) -> None:
        """Step 4 (or ``step``): no queued request and every worker done with its batch, then
        0 workers.

        ``describe`` shows queued requests (``jobQueueStatus.pendingRequests``) but not the
        batch a worker is running. A customized describe is queued like a request and taken
        by a worker only after the batch it runs, so its answer, which names the worker's
        pid, proves that worker has finished: once every worker has answered one after the
        queue was empty, none is busy and scaling down kills nothing.
        """
        # "Since it was registered", not "never": the record is this server run's, and a
        # version that served before a restart (or before it was unregistered) is in it no
        # more.
        why = "" if step == 4 else " first: it has not served since it was registered, and " \
                                   "its pipeline would stay loaded beside the old and the " \
                                   "new one"
        say(f"[{step}/5] drain {version}{why}: wait for its queued and running requests to "
            f"finish")
        started = time.monotonic()
        deadline = started + self.drain_timeout
        answered: set[int] = set()
        # Only a round of barriers shows that a worker is idle: with --drain-timeout 0 the
        # deadline had passed before one was asked, and even an idle version failed.
        asked = False
        while True:
            entry = self.server.describe(version)
            if entry is None:
                return
            pending = entry["jobQueueStatus"]["pendingRequests"]
            pids = {w["pid"] for w in entry.get("workers", [])}
            if pending == 0 and pids <= answered:
                break
            if time.monotonic() > deadline and (pending or asked):
                raise self.still_busy(version, pending, pids - answered, step, started)
            if pending:
                answered.clear()  # a request queued after a worker answered may still run
                time.sleep(0.1)
                continue
            replies = self.barriers(version, len(pids - answered), deadline)
            asked = True
            answered.update(pid for pid in replies if pid is not None)
            if len(pids) == 1 and any(pid == 0 for pid in replies):
                answered.update(pids)  # an archive without our describe: the sole worker
            if not pids <= answered:
                if time.monotonic() > deadline:
                    # A barrier not answered in time is still queued: the next describe
                    # would count it as a queued request of the clients'.
                    raise self.still_busy(version, 0, pids - answered, step, started)
                # An idle worker took the barrier meant for a busy one. Paced: describes
                # without pause for the whole --drain-timeout would load the frontend.
                time.sleep(0.25)
        self.settle_queue_gauge(version, max(deadline, time.monotonic() + GAUGE_WAIT_S))
        say(f"      {version} is idle; scale it to 0 workers (it stays registered)")
        self.server.scale(version, 0)
        stopping = time.monotonic() + 120
        while (self.server.describe(version) or {}).get("workers"):
            if time.monotonic() > stopping:
                raise RolloutError(f"step {step} failed: {version} still lists workers "
                                   f"120 s after scaling it to 0")
            time.sleep(0.25)

    def barriers(self, version: str, count: int, deadline: float) -> list[int | None]:
        """``count`` barriers at once (``barrier``). In daemon threads, joined in short
        waits: Ctrl-C ends the run at once, where a thread pool held the exit until each
        barrier's answer came, after the batch a worker was running (tens of seconds with
        SDXL)."""
        replies: list = [None] * count
        errors: list[BaseException] = []

        def ask(index: int) -> None:
            try:
                replies[index] = self.barrier(version, deadline)
            except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread
                errors.append(exc)
        threads = [threading.Thread(target=ask, args=(i,), daemon=True) for i in range(count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            while thread.is_alive():
                thread.join(0.2)
        if errors:
            raise errors[0]
        return replies

    def still_busy(self, version: str, pending: int, busy: set[int], step: int,
                   started: float) -> RolloutError:
        """The drain's failure, with the time it waited since ``started``: not
        --drain-timeout's, which a barrier outlasts (it waits 1 s at least, so --drain-timeout
        0 said "after 0 s" after 1 s)."""
        what = (counted(pending, "queued request") if pending else
                f"workers not known to be idle (pids {sorted(busy)})")
        return RolloutError(f"step {step} failed: {version} still has {what} after "
                            f"{time.monotonic() - started:.1f} s (--drain-timeout "
                            f"{self.drain_timeout:g})")

    def settle_queue_gauge(self, version: str, deadline: float) -> None:
        """Wait until ``version``'s queue gauge on ``/metrics`` has read 0 (or is absent) for
        ``GAUGE_SETTLE_S``, before its workers stop.

        TorchServe keeps a series on ``/metrics`` with the last value written for as long
        as it runs, and the worker samples its queue only every ``metrics_interval_s``: the
        last sample before the switch, taken with requests waiting, would stay after the
        scale-down, and ``max by (pod)`` of it (the autoscalers, the queue alert) would
        read a queue that is gone. The drained worker's next sample reads 0. A sample taken
        during the last batches may still be on its way (held while a batch ran, written
        0.1 s after the last one, then parsed by the frontend): hence a 0 must hold for
        ``GAUGE_SETTLE_S`` before it counts."""
        try:
            started = time.monotonic()
            gauge, zero_since, waited = self.server.queue_gauge(version), started, False
            while gauge or time.monotonic() - zero_since < GAUGE_SETTLE_S:
                if gauge and not waited:
                    waited = True
                    say(f"      wait until {version}'s worker writes its queue gauge as 0 "
                        f"(it shows {gauge:g} on /metrics)")
                if gauge and time.monotonic() > deadline:
                    say(f"      warning: {version}'s queue gauge still shows {gauge:g} at "
                        f"the end of --drain-timeout; /metrics keeps that value after the "
                        f"scale-down, until the server restarts")
                    return
                time.sleep(0.25)
                was, gauge = gauge, self.server.queue_gauge(version)
                if was and not gauge:
                    zero_since = time.monotonic()
            if waited:
                say(f"      its queue gauge reads 0 (written after "
                    f"{zero_since - started:.1f} s)")
        except RolloutError as exc:
            say(f"      warning: cannot read {version}'s queue gauge ({exc}); if it was "
                f"not 0, /metrics keeps its last value after the scale-down")

    def barrier(self, version: str, deadline: float) -> int | None:
        """The pid of the worker that answered a customized describe; 0 if it named none.

        An archive whose handler has no describe answer gets an error status here, with
        TorchServe's description still in the body: a worker took it all the same. A handler
        that fails every request answers a bare error (a 503 without the description): a
        worker took that one too, so it is not busy with the requests queued before it.
        None when no worker answered: refused, or not answered by ``deadline``.
        """
        try:
            status, answer = self.server.management(
                "GET", f"/models/{self.name}/{version}?customized=true",
                timeout=max(1.0, deadline - time.monotonic()))
        except RolloutError:
            if time.monotonic() < deadline:
                raise
            # Not answered by the end of --drain-timeout: the worker is still busy, which
            # drain() says in its words ("GET ... timed out" said nothing of step 4).
            return None
        if not isinstance(answer, list) or not answer:
            return 0 if status >= 500 else None
        pid = customized_metadata(answer[0]).get("pid")
        return pid if status == 200 and isinstance(pid, int) else 0

    def prune(self, version: str) -> None:
        """Step 5: unregister versions beyond the last ``keep``; never the default.

        Kept are the default and the versions that served before it, the latest first:
        a rollback needs a version that worked. A version that has not served since it was
        registered goes first, whatever its number."""
        registered = self.server.versions()
        served = self.served.order(self.name, registered)
        others = prune_order(version, registered, served)
        extra = others[max(0, self.keep - 1):]
        if not extra:
            say(f"[5/5] {counted(1 + len(others), 'version')} registered, at most "
                f"{self.keep} kept: nothing to unregister")
            return
        for old in extra:
            entry = self.server.describe(old)
            if entry and entry.get("workers"):
                self.drain(old)
            why = "served before the last kept ones" if old in served else \
                "not served since it was registered"
            say(f"[5/5] unregister {old} (beyond the last {self.keep} kept versions: {why})")
            self.unregister(old)


def hold_run_lock(run_dir: Path, name: str):
    """An open lock file of this server's run directory, held until the process ends: one
    rollout or rollback of a model at a time. Two at once each drained the version the
    other had made the default, leaving every version without workers (every request 503,
    queued ones hanging), and both said done."""
    if not run_dir.is_dir():
        raise RolloutError(f"no directory {run_dir} for the key file: is the server started "
                           f"(make serve), or --key-file wrong?")
    lock = open(run_dir / f"rollout-{name}.lock", "a+")  # noqa: SIM115 - held for the run
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        lock.close()
        raise RolloutError(f"another rollout or rollback of {name} is running on this server "
                           f"({holder}); wait for it to end, then run this again") from None
    lock.seek(0)
    lock.truncate()
    # The pid only names the holder in the message above; the lock is the flock. Unbuffered
    # and let go: on a full disk the write fails (ENOSPC), and a buffered one raised here
    # and again when the file was closed at exit.
    with contextlib.suppress(OSError):
        os.write(lock.fileno(), f"pid {os.getpid()}".encode())
    return lock


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Addresses come from TS_INFERENCE_ADDRESS / TS_MANAGEMENT_ADDRESS / "
               "TS_METRICS_ADDRESS as for "
               "serve.py; the key file is build/run/<inference port>/key_file.json.")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--version", type=archive_part, help="the version to roll out, e.g. 2.0")
    what.add_argument("--rollback", action="store_true",
                      help="make the kept version that served before the default one the "
                           "default again")
    parser.add_argument("--name", default="sdxl", type=archive_part)
    parser.add_argument("--model-store", type=Path, default=REPO / "model_store",
                        help="the server's model store, where <name>-<version>.mar is")
    parser.add_argument("--key-file", type=Path, default=None,
                        help="TorchServe's key_file.json (default: serve.py's run directory)")
    parser.add_argument("--model-dir", type=lambda text: Path(text).expanduser(), default=None,
                        help="refuse an archive that serves other weights than these "
                             "(make rollout MODEL_DIR=...)")
    parser.add_argument("--keep", type=int, default=3,
                        help="versions kept registered, the default one included (3)")
    parser.add_argument("--workers", type=int, default=1,
                        help="workers of the new version when its archive does not say (1)")
    parser.add_argument("--load-timeout", type=seconds, default=900.0,
                        help="seconds a version may take to load and warm up (900)")
    parser.add_argument("--drain-timeout", type=seconds_from_zero, default=600.0,
                        help="seconds the old version may take to finish its requests "
                             "(600; 0: drain it only if it is idle now)")
    parser.add_argument("--check-steps", type=int, default=2,
                        help="denoising steps of the check generation (2)")
    args = parser.parse_args(argv)
    if args.keep < 1:
        parser.error("--keep must be at least 1")
    # Refused here, not by the server's answer to the check, after the version has loaded
    # (minutes with SDXL), nor by a traceback from the socket a timeout is given to.
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    try:
        parse_field("num_inference_steps", args.check_steps, SDXL_LIMITS)
    except RequestError as exc:
        parser.error(f"--check-steps: {exc}")
    try:
        addresses = Addresses.from_env()
    except ValueError as exc:
        parser.error(str(exc))
    key_file = args.key_file or run_dir_for(addresses.inference) / "key_file.json"
    server = ModelServer(addresses, key_file, args.name)
    rollout = Rollout(server, args.model_store, args.keep, args.workers, args.load_timeout,
                      args.drain_timeout, args.check_steps, args.model_dir)
    # SIGTERM (a CI job cancelled, `timeout`, `kill`) and SIGHUP (a lost terminal) end the
    # run as Ctrl-C does, saying what is serving and what to run: by default they ended it
    # without a word (exit 143), the server left half way with nothing said.
    stopped_by = [signal.SIGINT]

    def interrupt(signum, frame):
        stopped_by[0] = signum
        raise KeyboardInterrupt

    # Not one ignored: `nohup make rollout` must outlive its terminal. Restored at the
    # end, for a caller that runs main() in its own process (the tests).
    previous = {stop: signal.getsignal(stop) for stop in (signal.SIGTERM, signal.SIGHUP)}
    for stop, handler in previous.items():
        if handler is not signal.SIG_IGN:
            signal.signal(stop, interrupt)
    try:
        return run_or_explain(args, server, rollout, key_file, stopped_by)
    finally:
        for stop, handler in previous.items():
            signal.signal(stop, handler)


def run_or_explain(args: argparse.Namespace, server: ModelServer, rollout: Rollout,
                   key_file: Path, stopped_by: list[int]) -> int:
    """The rollout or rollback ``args`` ask for: 0 when done, 1 with the reason when it
    failed, 128 + the signal when stopped, saying what is serving and what to run."""
    version = None
    try:
        lock = hold_run_lock(key_file.parent, args.name)  # noqa: F841 - held until exit
        version = rollout.rollback_target() if args.rollback else args.version
        if args.rollback:
            say(f"rollback: the previous kept version is {version}")
        rollout.run(version, rollback=args.rollback)
    except RolloutError as exc:
        print(f"rollout failed: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        # Every step can be taken again (docs/rollouts.md, "Interrupted runs"): a traceback
        # here would read as a crash and say nothing of what to do. Not `make rollback`: it
        # is no undo of a run stopped halfway (it goes to what served before the default).
        try:
            serving = server.default_version(timeout=3)
        except (RolloutError, KeyboardInterrupt, LookupError, TypeError):
            serving = None
        now = f" ({args.name} {serving} is the default version)" if serving else ""
        # A rollback stopped after its switch (in the drain): run again, it would go one
        # version further back; the rollout of its target finishes it.
        again = (f"`make rollout VERSION={version}` finishes it" if args.rollback and
                 version is not None and serving == version else
                 "run the same command again to finish it")
        with contextlib.suppress(OSError):  # no terminal left after a SIGHUP
            print(f"rollout interrupted: the server is left as it was at this point{now}; "
                  f"{again}", file=sys.stderr, flush=True)
        return 128 + stopped_by[0]
    return 0


if __name__ == "__main__":
    sys.exit(main())

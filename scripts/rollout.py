#!/usr/bin/env python3
"""Roll a model version out on a running TorchServe, or roll back, without losing requests.

Uses the management API (token from the server's key file) in five steps:

1. register ``<model store>/<name>-<version>.mar`` (the local model store only) as
   model ``<name>`` with its workers, and wait for them to load (or fail to);
2. wait until its workers are READY and a real generation on
   ``/predictions/<name>/<version>`` answers 200 with that version;
3. make it the default version;
4. drain every other version that still has workers (no queued request, and each worker
   has finished what it took), then scale it to 0 workers: it stays registered, its GPU is
   free, and a rollback loads it again;
5. unregister versions beyond the last ``--keep`` (3): never the default.

``--rollback`` does the same for the highest kept version below the default one. A failure
before step 3 unregisters the new version and leaves the old one the default; a drain that
does not finish makes the old version the default again. Running it twice is harmless: a
step that is already done says so and is skipped.

Usage:
    python scripts/rollout.py --version 2.0        # make sdxl 2.0 the default version
    python scripts/rollout.py --rollback           # back to the previous kept version
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import sys
import time
import urllib.parse
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sdxl_serve.management import KeyFile
from sdxl_serve.server import Addresses, LoadWatch, port_of

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class RolloutError(RuntimeError):
    """A step failed; the message says which one and what is serving now."""


def version_key(version: str) -> tuple:
    """Order versions numerically where they are numbers: 1.10 comes after 1.9."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part)
                 for part in re.split(r"[.\-+_]", version))


def archive_version(mar: Path) -> str:
    """The version torch-model-archiver wrote into the archive's manifest."""
    # A copy cut short or another file under the archive's name: say so, not a traceback.
    try:
        with zipfile.ZipFile(mar) as archive:
            manifest = json.loads(archive.read("MAR-INF/MANIFEST.json"))
        return str(manifest["model"]["modelVersion"])
    except (zipfile.BadZipFile, KeyError, ValueError, TypeError) as exc:
        raise RolloutError(f"{mar} is not a model archive with a version in "
                           f"MAR-INF/MANIFEST.json ({type(exc).__name__}: {exc}): build it "
                           f"again with `make archive`") from None


def say(message: str) -> None:
    print(message, flush=True)


class ModelServer:
    """The management and inference calls a rollout makes, against one TorchServe."""

    def __init__(self, addresses: Addresses, key_file: Path, name: str):
        self.addresses = addresses
        self.key_file = key_file
        self.keys = KeyFile(key_file, addresses.management)
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
        except OSError as exc:
            raise RolloutError(f"{method} {base}{path} failed: {exc}") from None
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

    def default_version(self) -> str | None:
        status, answer = self.management("GET", f"/models/{self.name}")
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

    def scale(self, version: str, workers: int, timeout: float = 60.0) -> None:
        status, answer = self.management(
            "PUT", f"/models/{self.name}/{version}?min_worker={workers}&max_worker={workers}"
                   f"&synchronous=false", timeout)
        if status not in (200, 202):
            raise RolloutError(f"scaling {self.name} {version} to {workers} workers answered "
                               f"{status}: {message(answer)}")


def message(answer: object) -> str:
    if isinstance(answer, dict):
        return str(answer.get("message") or answer.get("status") or answer)
    return str(answer)


def ready_workers(entry: dict | None) -> list[dict]:
    return [w for w in (entry or {}).get("workers", []) if w.get("status") == "READY"]


class VersionLoadWatch(LoadWatch):
    """LoadWatch's reading of worker tracebacks, limited to the workers of one version.

    serve.py and the tests keep TorchServe's logs in ``<run dir>/logs`` beside the key file.
    While a new version loads, the old one keeps serving and logging into the same
    model_log.log: its lines between the new worker's traceback lines would be taken for
    the exception, so only the lines of ``<name>_<version>``'s workers are read.
    """

    def __init__(self, key_file: Path, name: str, version: str):
        super().__init__(key_file.parent / "logs")
        self.worker = f"-{name}_{version}"  # in the worker threads' names, W-9000-sdxl_2.0
        self.name = name

    def _new_text(self, path: Path) -> str:
        text = super()._new_text(path)
        if path != self.model_log:
            return text
        return "\n".join(line for line in text.splitlines()
                         if f"{self.worker}-std" in line)

    def failed(self) -> bool:
        """Whether a worker of this version failed to load since the watch began: its
        thread's state change, or (a worker process that died) TorchServe's line for the
        model with a traceback of this version's worker."""
        text = self._new_text(self.ts_log)
        return (any(f"{self.worker} State change WORKER_STARTED -> WORKER_{end}" in text
                    for end in ("ERROR", "STOPPED"))
                or (f"Load model failed: {self.name}," in text
                    and bool(self.worker_exception())))

    def reason(self, settle_s: float = 2.0) -> str:
        """`` (<the worker's exception>; see <log>)``, or `` (see <log>)`` without one.

        TorchServe's worker catches the handler's error and raises its own generic
        ``500 - Unknown exception`` last: the cause is the exception before it.
        """
        deadline = time.monotonic() + settle_s  # the traceback may land after the answer
        while not (tracebacks := self.worker_exception()) and time.monotonic() < deadline:
            time.sleep(0.1)
        causes = []
        for block in tracebacks.split("\n\n") if tracebacks else []:
            lines = block.splitlines()
            start = next((i for i, line in enumerate(lines) if i and line[:1].strip()), None)
            cause = " ".join(line.strip() for line in lines[start:]) if start else ""
            if cause and "Unknown exception" not in cause:
                causes.append(cause)
        return f" ({causes[-1]}; see {self.model_log})" if causes else f" (see {self.model_log})"


class Rollout:
    """Makes one version of one model the default, following the module's five steps."""

    def __init__(self, server: ModelServer, model_store: Path, keep: int = 3,
                 workers: int = 1, load_timeout: float = 900.0, drain_timeout: float = 600.0,
                 check_steps: int = 2):
        self.server = server
        self.name = server.name
        self.model_store = model_store
        self.keep = keep
        self.workers = workers
        self.load_timeout = load_timeout
        self.drain_timeout = drain_timeout
        self.check_steps = check_steps

    def rollback_target(self) -> str:
        """The highest kept version below the default one."""
        default = self.server.default_version()
        if default is None:
            raise RolloutError(f"model {self.name} is not registered: nothing to roll back")
        older = sorted((v for v in self.server.versions() if version_key(v) < version_key(default)),
                       key=version_key)
        if not older:
            raise RolloutError(f"{self.name} {default} is serving and no older version is "
                               f"kept: nothing to roll back to")
        return older[-1]

    def run(self, version: str) -> None:
        name = self.name
        mar = self.model_store / f"{name}-{version}.mar"
        # 0. The archive: in the local model store, and really of this version.
        if not mar.is_file():
            raise RolloutError(f"no archive {mar}: build it first with "
                               f"`make archive VERSION={version}`")
        if archive_version(mar) != version:
            raise RolloutError(f"{mar.name} holds version {archive_version(mar)}, not {version}")
        previous = self.server.default_version()
        say(f"rollout {name} {version}: serving now: "
            f"{previous if previous else 'nothing (model not registered)'}")
        # 1. Register it with its workers (a kept version with 0 workers is registered again).
        fresh = self.register(version, mar, previous)
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
            if default != version or previous is None:
                say(f"      unregister {version}: it failed its check")
                self.server.unregister(version)
                default = self.server.default_version()
            raise RolloutError(f"{exc}; {default or 'nothing (model not registered)'} is "
                               f"the default version") from None
        # 4. Drain and scale down every other version that still has workers.
        busy = [other for other, entry in sorted(self.server.versions().items())
                if other != version and entry.get("workers")]
        if not busy:
            say("[4/5] no other version has workers: nothing to drain")
        for other in busy:
            try:
                self.drain(other)
            except RolloutError as exc:
                if other == previous:
                    say(f"      set {previous} as the default version again")
                    self.server.set_default(previous)
                    raise RolloutError(f"{exc}; {previous} is the default version again, "
                                       f"{version} stays registered with its workers: "
                                       f"run this again to finish") from None
                raise
        # 5. Keep the default and the newest others, up to --keep versions.
        self.prune(version)
        kept = ", ".join(f"{v} ({len(e.get('workers', []))} workers)"
                         for v, e in sorted(self.server.versions().items(),
                                            key=lambda item: version_key(item[0])))
        say(f"done: {name} {self.server.default_version()} is the default version; "
            f"registered: {kept}")

    def register(self, version: str, mar: Path, previous: str | None) -> bool:
        """Step 1. Returns whether this run registered the version."""
        entry = self.server.versions().get(version)
        if entry is not None and ready_workers(entry):
            say(f"[1/5] {version} is already registered with "
                f"{len(ready_workers(entry))} READY workers")
            return False
        if entry is not None and not entry.get("workers") and version != previous:
            # Scaling a kept version up again would leave TorchServe retrying a worker that
            # fails to load for minutes; a synchronous register unregisters it at once.
            say(f"[1/5] unregister kept {version} (0 workers) to register it again")
            self.server.unregister(version)
            entry = None
        if entry is not None and not entry.get("workers"):
            say(f"[1/5] {version} is the default version with 0 workers: scale it to "
                f"{self.workers}")
            watch = VersionLoadWatch(self.server.key_file, self.name, version)
            self.server.scale(version, self.workers)
            self.wait_loaded(version, watch, previous)
            return False
        if entry is not None:
            say(f"[1/5] {version} is registered; waiting for its workers")
            self.wait_ready(version)
            return False
        say(f"[1/5] register {mar.name} from the model store as {self.name} {version} "
            f"with its workers (loading and warm-up can take minutes)")
        watch = VersionLoadWatch(self.server.key_file, self.name, version)
        started = time.monotonic()
        try:
            status, answer = self.server.register(mar.name, self.workers)
        except RolloutError as exc:
            status, answer = 0, str(exc)
        if status not in (200, 202):
            if version in self.server.versions():  # our call timed out after registering
                self.unload(version, previous)
            raise RolloutError(f"step 1 failed: {version} did not register: {answer}; "
                               f"{previous or 'nothing'} is still the default version")
        self.wait_loaded(version, watch, previous)
        say(f"      registered and loaded in {time.monotonic() - started:.1f} s")
        return True

    def wait_loaded(self, version: str, watch: VersionLoadWatch, previous: str | None) -> None:
        """Step 1's end: every worker of ``version`` READY, or it is unloaded and this fails.

        TorchServe retries a worker that failed to load for as long as it runs, showing it
        as loading: the failure is read from its logs, as serve.py's start does.
        """
        deadline = time.monotonic() + self.load_timeout
        while True:
            entry = self.server.describe(version)
            workers = (entry or {}).get("workers", [])
            if workers and len(ready_workers(entry)) == len(workers):
                return
            if entry is None:
                problem = "it is no longer registered"
            elif watch.failed():
                problem = f"its worker failed to load{watch.reason()}"
            elif time.monotonic() > deadline:
                problem = (f"its workers are not READY after {self.load_timeout:.0f} s "
                           f"(--load-timeout)")
            else:
                time.sleep(0.5)
                continue
            self.unload(version, previous)
            raise RolloutError(f"step 1 failed: {version} did not load: {problem}; "
                               f"{previous or 'nothing'} is still the default version")

    def unload(self, version: str, previous: str | None) -> None:
        """Stop TorchServe retrying a version that failed to load (minutes of restarts)."""
        if version == previous:  # the default with others kept: it stays, with 0 workers
            say(f"      scale {version} to 0 workers again")
            self.server.scale(version, 0)
        elif version in self.server.versions():
            say(f"      unregister {version}")
            self.server.unregister(version)

    def wait_ready(self, version: str) -> None:
        deadline = time.monotonic() + self.load_timeout
        while time.monotonic() < deadline:
            entry = self.server.describe(version)
            workers = (entry or {}).get("workers", [])
            if workers and len(ready_workers(entry)) == len(workers):
                return
            time.sleep(0.5)
        raise RolloutError(f"step 2 failed: {version}'s workers are not READY after "
                           f"{self.load_timeout:.0f} s")

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

    def drain(self, version: str) -> None:
        """Step 4: no queued request and every worker done with its batch, then 0 workers.

        ``describe`` shows queued requests (``jobQueueStatus.pendingRequests``) but not the
        batch a worker is running. A customized describe is queued like a request and taken
        by a worker only after the batch it runs, so its answer, which names the worker's
        pid, proves that worker has finished: once every worker has answered one after the
        queue was empty, none is busy and scaling down kills nothing.
        """
        say(f"[4/5] drain {version}: wait for its queued and running requests to finish")
        deadline = time.monotonic() + self.drain_timeout
        answered: set[int] = set()
        while True:
            entry = self.server.describe(version)
            if entry is None:
                return
            pending = entry["jobQueueStatus"]["pendingRequests"]
            pids = {w["pid"] for w in entry.get("workers", [])}
            if pending == 0 and pids <= answered:
                break
            if time.monotonic() > deadline:
                busy = (f"{pending} queued requests" if pending else
                        f"workers not known to be idle (pids {sorted(pids - answered)})")
                raise RolloutError(f"step 4 failed: {version} still has {busy} after "
                                   f"{self.drain_timeout:.0f} s (--drain-timeout)")
            if pending:
                answered.clear()  # a request queued after a worker answered may still run
                time.sleep(0.1)
                continue
            waiting = pids - answered
            with ThreadPoolExecutor(len(waiting)) as pool:
                replies = list(pool.map(lambda _: self.barrier(version, deadline), waiting))
            answered.update(pid for pid in replies if pid is not None)
            if len(pids) == 1 and any(pid == 0 for pid in replies):
                answered.update(pids)  # an archive without our describe: the sole worker
            if not pids <= answered:
                # An idle worker took the barrier meant for a busy one. Paced: describes
                # without pause for the whole --drain-timeout would load the frontend.
                time.sleep(0.25)
        say(f"      {version} is idle; scale it to 0 workers (it stays registered)")
        self.server.scale(version, 0)
        stopping = time.monotonic() + 120
        while (self.server.describe(version) or {}).get("workers"):
            if time.monotonic() > stopping:
                raise RolloutError(f"step 4 failed: {version} still lists workers 120 s "
                                   f"after scaling it to 0")
            time.sleep(0.25)

    def barrier(self, version: str, deadline: float) -> int | None:
        """The pid of the worker that answered a customized describe; 0 if it named none.

        An archive whose handler has no describe answer gets an error status here, with
        TorchServe's description still in the body: a worker took it all the same. A handler
        that fails every request answers a bare error (a 503 without the description): a
        worker took that one too, so it is not busy with the requests queued before it.
        """
        status, answer = self.server.management(
            "GET", f"/models/{self.name}/{version}?customized=true",
            timeout=max(1.0, deadline - time.monotonic()))
        if not isinstance(answer, list) or not answer:
            return 0 if status >= 500 else None
        metadata = answer[0].get("customizedMetadata")
        pid = metadata.get("pid") if isinstance(metadata, dict) else None
        return pid if status == 200 and isinstance(pid, int) else 0

    def prune(self, version: str) -> None:
        """Step 5: unregister versions beyond the last ``keep``; never the default."""
        others = sorted((v for v in self.server.versions() if v != version),
                        key=version_key, reverse=True)
        extra = others[max(0, self.keep - 1):]
        if not extra:
            say(f"[5/5] {1 + len(others)} versions registered, at most {self.keep} kept: "
                f"nothing to unregister")
            return
        for old in extra:
            entry = self.server.describe(old)
            if entry and entry.get("workers"):
                self.drain(old)
            say(f"[5/5] unregister {old} (beyond the last {self.keep} kept versions)")
            self.server.unregister(old)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Addresses come from TS_INFERENCE_ADDRESS / TS_MANAGEMENT_ADDRESS as for "
               "serve.py; the key file is build/run/<inference port>/key_file.json.")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--version", help="the version to roll out, e.g. 2.0")
    what.add_argument("--rollback", action="store_true",
                      help="make the highest kept version below the default one the default")
    parser.add_argument("--name", default="sdxl")
    parser.add_argument("--model-store", type=Path, default=REPO / "model_store",
                        help="the server's model store, where <name>-<version>.mar is")
    parser.add_argument("--key-file", type=Path, default=None,
                        help="TorchServe's key_file.json (default: serve.py's run directory)")
    parser.add_argument("--keep", type=int, default=3,
                        help="versions kept registered, the default one included (3)")
    parser.add_argument("--workers", type=int, default=1,
                        help="workers of the new version when its archive does not say (1)")
    parser.add_argument("--load-timeout", type=float, default=900.0,
                        help="seconds a version may take to load and warm up")
    parser.add_argument("--drain-timeout", type=float, default=600.0,
                        help="seconds the old version may take to finish its requests")
    parser.add_argument("--check-steps", type=int, default=2,
                        help="denoising steps of the check generation")
    args = parser.parse_args(argv)
    if args.keep < 1:
        parser.error("--keep must be at least 1")
    # Both end up in a file name and in management API paths.
    for flag, value in (("--name", args.name), ("--version", args.version or "1")):
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", value) or ".." in value:
            parser.error(f"{flag} must be letters, digits and . _ + - (got {value!r})")
    addresses = Addresses.from_env()
    key_file = args.key_file or (REPO / "build" / "run" / str(port_of(addresses.inference))
                                 / "key_file.json")
    server = ModelServer(addresses, key_file, args.name)
    rollout = Rollout(server, args.model_store, args.keep, args.workers, args.load_timeout,
                      args.drain_timeout, args.check_steps)
    try:
        version = rollout.rollback_target() if args.rollback else args.version
        if args.rollback:
            say(f"rollback: the previous kept version is {version}")
        rollout.run(version)
    except RolloutError as exc:
        print(f"rollout failed: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

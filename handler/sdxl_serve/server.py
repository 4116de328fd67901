"""Start, watch and stop a real TorchServe process (used by serve, tests, bench, rollout).

We start the Java frontend ourselves (``java_command``, as ``torchserve --start`` builds
it), not through TorchServe's ``torchserve`` wrapper: that is a Python parent that passes
no signal on, so killing it left Java and its workers running. Java runs in a session of
its own (a Ctrl-C at our terminal is ours to handle), and the kernel SIGTERMs it when the
process that started it dies, a SIGKILL included (``ended_with_this_process``); ``stop``
SIGTERMs it, which stops its workers, and then ends whatever is left of its process
group. Each server gets its own run directory (key file, logs), its own TMPDIR/TEMP
(unpacked archives, worker sockets) and its own ports, so several can run side by side.

Example:
    server = TorchServeProcess("build/run/x", "model_store", {"sdxl": "sdxl-1.0.mar"})
    server.start(); server.wait_ready("sdxl"); server.stop()
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import importlib.util
import ipaddress
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from sdxl_serve.management import KEY_UMASK, KeyFile, read_keys, ready_workers
from sdxl_serve.settings import absolute_path_overrides
from sdxl_serve.writable import errno_name, unwritable

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "config" / "config.properties"
METRICS_CONFIG = REPO / "config" / "metrics.yaml"
# What the JVM prints before it exits on an error a flag in vmargs makes fatal
# (-XX:+ExitOnOutOfMemoryError).
JVM_LAST_WORD = "Terminating due to "
# TorchServe's log configuration without its echo of every metric line (config/log4j2.xml).
LOG_CONFIG = REPO / "config" / "log4j2.xml"


class ServerError(RuntimeError):
    """TorchServe did not start, or did not become ready, in time."""


class LoadFailed(ServerError):
    """A model's worker failed to load; the message holds the worker's own exception."""


class StartCancelled(ServerError):
    """The start was stopped (Ctrl-C, SIGTERM) before the model was ready."""


# What `make serve` needs of its Python before it builds anything, by import name, with the
# name pip installs (requirements.txt); serve_jobs.py and serve_triton.py add their own.
TORCHSERVE_PACKAGES = {"ts": "torchserve", "model_archiver": "torch-model-archiver",
                       "torch": "torch", "diffusers": "diffusers", "yaml": "pyyaml"}


def missing_packages(needed: Mapping[str, str]) -> str | None:
    """Why this Python cannot run a launcher, in one line, or None: the ones of ``needed``
    (import name: the name pip installs) that it lacks. Found, not imported, before the
    launcher imports them: a Python without them (the system's python3, a venv installed
    halfway) was a ModuleNotFoundError traceback, for `ts` only after the archive's build."""
    lacking = [package for module, package in needed.items()
               if importlib.util.find_spec(module) is None]
    if not lacking:
        return None
    return (f"this Python ({sys.executable}) lacks {', '.join(lacking)}: `make venv` installs "
            f"them (requirements*.txt) into .venv, which the Makefile's targets run (or run the "
            f"script with .venv/bin/python)")


def stop_signals() -> tuple[signal.Signals, ...]:
    """The signals a launcher takes as "stop": Ctrl-C (SIGINT), SIGTERM and SIGHUP (a
    closed terminal), but not a SIGHUP this process was started with ignored, which stays
    ignored, as rollout.py keeps it: `nohup make serve` must outlive its terminal (a
    handler put over the ignored SIGHUP stopped the server with it). SIGTERM is always
    ours: an ignored one passes on to the server through exec, and TorchServe's Java then
    ignores the SIGTERM the kernel sends it when its launcher dies
    (``ended_with_this_process``) and the one ``stop`` asks it to end with."""
    hangup = signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN
    return (signal.SIGINT, signal.SIGTERM, *((signal.SIGHUP,) if hangup else ()))


def refuse_missing_packages(needed: Mapping[str, str]) -> None:
    """End a launcher (one ``error:`` line, exit 2) when this Python lacks a package of
    ``needed`` (``missing_packages``); called before it imports them."""
    if lacking := missing_packages(needed):
        print(f"error: {lacking}", file=sys.stderr)
        sys.exit(2)


def cancel_on_signals(what: str) -> None:
    """Until a launcher installs its own handlers: Ctrl-C, SIGTERM or SIGHUP
    (``stop_signals``) end it with ``<what> cancelled`` and exit 130, through every
    ``finally`` on the way (a half-built archive's folder removed, the archiver process
    killed). Called first thing, before the imports of torch and diffusers (seconds) and the
    archive's build (minutes with real weights): Ctrl-C there printed a KeyboardInterrupt
    traceback from inside whatever was importing or building, and SIGTERM left the build's
    ``.building-*`` folder in the model store for good."""
    stops = stop_signals()

    def cancel(signum, frame):
        for each in stops:  # a second Ctrl-C must not break the unwinding
            signal.signal(each, signal.SIG_IGN)
        with contextlib.suppress(OSError):  # no terminal after a SIGHUP
            print(f"{what} cancelled", file=sys.stderr, flush=True)
        raise SystemExit(130)

    for each in stops:
        signal.signal(each, cancel)


class LoadWatch:
    """Finds a failed model load in TorchServe's logs, from where they ended when it began.

    TorchServe 0.12 never gives up on a model that fails to load: it starts the worker again
    with a growing pause, for as long as it runs, while the management API shows the worker
    as loading. What it logs (ts_log.log) depends on how the load failed: an exception that
    kills the worker process gives ``Load model failed: <name>, error: Worker died.``; one the
    worker catches and answers with a 500 gives only the worker thread's state change
    ``W-9000-<name>_<version> State change WORKER_STARTED -> WORKER_ERROR`` (or ``->
    WORKER_STOPPED``), at DEBUG level, which TorchServe's default log configuration writes.
    A worker process that ends before it even started (it could not read its metrics
    config, failed at import, was killed) is never sent the model: the frontend logs only
    ``Backend worker error ... Backend stream closed.`` and ``State change null ->
    WORKER_STOPPED`` (``WORKER_STOPPED -> WORKER_STOPPED`` on each retry). So any change to
    STOPPED or ERROR counts, except from ``WORKER_MODEL_LOADED`` (it loaded, then died: a
    restart, not a failed load) and from ``WORKER_SCALED_DOWN`` (stopped on purpose). The
    worker's traceback reaches model_log.log line by line (``MODEL_LOG - ``, from its stdout
    or stderr). A start that waits for READY reads both, so the first failure ends it with
    the cause.

    Every one of those lines carries the worker thread's name, ``W-9000-<name>_<version>``
    (``-stdout``/``-stderr`` in model_log.log), so a watch can be kept to one version: while
    a rollout loads a new version, the old one keeps serving and logging into the same files,
    and its lines between the new worker's traceback lines would be taken for the exception.

    Example:
        watch = LoadWatch(Path("build/run/8080/logs"))
        ...
        cause = watch.failure("sdxl")  # None while nothing failed
        cause = watch.failure("sdxl/2.0")  # only the workers of version 2.0
    """

    FAILED = re.compile(r"Load model failed: (?P<model>\S+?), error: .*"
                        r"|W-\d+-(?P<worker_model>\S+)_[^_\s]+ State change "
                        r"(?:null|WORKER_STARTED|WORKER_STOPPED|WORKER_ERROR) "
                        r"-> WORKER_(?:ERROR|STOPPED)")
    TRACEBACK = "Traceback (most recent call last):"
    WORKER_LINE = re.compile(r"-(?P<stream>std(?:out|err)) MODEL_LOG - (?P<text>.*)")
    WORKER_STARTED = "Torch worker started."
    # TorchServe's worker (model_service_worker.handle_connection) after a failed load.
    CAUGHT = re.compile(r"RuntimeError: \d{3} - ")

    def __init__(self, log_dir: str | Path):
        self.ts_log = Path(log_dir) / "ts_log.log"
        self.model_log = Path(log_dir) / "model_log.log"
        # A run directory is reused: earlier runs' lines are not this start's.
        self._offsets = {path: _size(path) for path in (self.ts_log, self.model_log)}

    def failure(self, model: str | None = None, settle_s: float = 1.0) -> str | None:
        """The worker's exception (or TorchServe's line) once a load has failed since the
        watch began; None otherwise.

        Args:
            model: ``<name>`` (any of its versions), ``<name>/<version>`` (only that
                version's workers, their tracebacks included), or None (any model).
            settle_s: how long to wait for the traceback after TorchServe's line.
        """
        name, _, version = (model or "").partition("/")
        worker = self._worker(name, version)
        for line in self._new_text(self.ts_log).splitlines():
            found = self.FAILED.search(line)
            if not found:
                continue
            if worker is not None:
                # The thread's name, whole: read apart at its last `_`, a version with
                # one (2_0) gave the model `sdxl_2` and its failures went unseen.
                if worker.search(line) and found.group("model") in (None, name):
                    break
            elif not name or (found.group("model") or found.group("worker_model")) == name:
                break
        else:
            return None
        # The frontend may log the failure a moment before the last traceback lines land.
        deadline = time.monotonic() + settle_s
        while not (exception := self.worker_exception(model)) and time.monotonic() < deadline:
            time.sleep(0.1)
        return exception or found.group(0)

    def unlisted_retries(self, model: str) -> dict[str, str]:
        """The workers of ``model`` (``<name>/<version>``) whose retried load TorchServe
        runs unlisted since the watch began: ``{"W-9003": state}``, state ``"planned"``,
        ``"loading"`` or ``"loaded"``; a retry that ended is not in it.

        A worker whose load failed is retried by its own thread after a back-off (``Retry
        worker: 9003 in 1 seconds.``). Scaled down during that back-off (``State change
        WORKER_STOPPED -> WORKER_SCALED_DOWN``), it leaves the version's list of workers,
        but TorchServe 0.12 still runs the retry: it starts a process that loads the model
        (``WORKER_SCALED_DOWN -> WORKER_STARTED``) and ends at its load
        (``WORKER_SCALED_DOWN -> WORKER_STOPPED``), or, if that load succeeds, keeps it
        (``-> WORKER_MODEL_LOADED``) unlisted, where no scale or unregister reaches it.
        Either of the two lines that set it up may come first: the thread plans its retry
        while the scale-down marks it.
        """
        name, _, version = model.partition("/")
        worker = re.compile(rf"\bW-(\d+)-{re.escape(name)}_{re.escape(version)}\s")
        change = re.compile(r"State change (\S+) -> (\S+)")
        planned: dict[str, bool] = {}
        scaled_down: dict[str, bool] = {}
        states: dict[str, str] = {}
        for line in self._new_text(self.ts_log).splitlines():
            found = worker.search(line)
            if not found:
                continue
            port = found.group(1)
            if (retry := line.find("Retry worker: ")) >= 0:
                planned[port] = line[retry:].startswith(f"Retry worker: {port} ")
            elif moved := change.search(line):
                before, after = moved.groups()
                if after == "WORKER_SCALED_DOWN":
                    scaled_down[port] = before == "WORKER_STOPPED"
                elif before == "WORKER_SCALED_DOWN" and port in states:
                    if after == "WORKER_STARTED":
                        states[port] = "loading"
                    elif after == "WORKER_MODEL_LOADED":
                        states[port] = "loaded"
                    elif after == "WORKER_STOPPED":
                        del states[port]
                        planned[port] = scaled_down[port] = False
                    continue
                elif after == "WORKER_STARTED":  # a retry of a listed worker: no longer due
                    planned[port] = False
            if planned.get(port) and scaled_down.get(port) and port not in states:
                states[port] = "planned"
        return {f"W-{port}": state for port, state in states.items()}

    def worker_pid(self, model: str, worker: str) -> int | None:
        """The pid of the last process that ``worker`` (``W-9003``) of ``model``
        (``<name>/<version>``) started since the watch began, from the ``[PID]<n>`` line
        every TorchServe worker process prints first; None when there is none."""
        name, _, version = model.partition("/")
        line = re.compile(rf"\b{re.escape(worker)}-{re.escape(name)}_{re.escape(version)}"
                          rf"-stdout MODEL_LOG - \[PID\](\d+)\s*$", re.MULTILINE)
        pids = line.findall(self._new_text(self.model_log))
        return int(pids[-1]) if pids else None

    def worker_exception(self, model: str | None = None) -> str:
        """The tracebacks the last worker process printed since the watch began, each up to
        its exception line; empty when there is none yet. With ``<name>/<version>``, only
        that version's workers' lines are read.

        All of them but TorchServe's own report of a load its worker caught (``RuntimeError:
        500 - Unknown exception``, or ``507 - System out of memory`` for any whose message
        says CUDA, as "setting device=cuda, but torch sees no CUDA device" does: its guess
        at an out of memory), which ended the output as if it were the cause; it is given
        only when no other traceback is there.
        Each only once: processes that die before ``Torch worker started.`` leave no line
        between them, and TorchServe's retries print the same traceback again and again.
        Read stream by stream: the frontend copies the worker's stdout and stderr from a
        thread each, so a traceback on one (our errors go to stderr) may have lines of the
        other between its own.
        """
        name, _, version = (model or "").partition("/")
        worker = self._worker(name, version, stream=True)
        found = map(self.WORKER_LINE.search, self._new_text(self.model_log).splitlines())
        lines = [line.group("stream", "text") for line in found
                 if line and (worker is None or worker.search(line.string))]
        started = [i for i, (_, line) in enumerate(lines)
                   if line.startswith(self.WORKER_STARTED)]
        lines = lines[started[-1]:] if started else lines
        blocks = []
        for stream in ("stdout", "stderr"):
            blocks += self._tracebacks([(number, text) for number, (each, text)
                                        in enumerate(lines) if each == stream])
        causes = [(number, block) for number, block in blocks
                  if not self.CAUGHT.match(block[-1])]
        unique = dict.fromkeys("\n".join(block) for _, block in sorted(causes or blocks))
        return "\n\n".join(unique)

    def _tracebacks(self, lines: list[tuple[int, str]]) -> list[tuple[int, list[str]]]:
        """Each traceback in ``lines`` (one stream's, numbered) up to its exception's
        message, with the number of its first line."""
        blocks, block, message = [], None, False
        for number, line in lines:
            if line.startswith(self.TRACEBACK):
                block, message = (number, [line]), False
            elif block is None:
                continue
            elif not message:
                block[1].append(line)
                # The first line that is not indented is the exception's; indented lines
                # after it continue its message (ours name one file per line).
                message = bool(line) and not line[0].isspace()
                if message:
                    blocks.append(block)
            elif line[:1].isspace():
                block[1].append(line)
            else:
                block = None
        return blocks

    @staticmethod
    def _worker(name: str, version: str, stream: bool = False) -> re.Pattern | None:
        """The thread name of ``name``'s workers of ``version`` as TorchServe logs it
        (``W-9000-sdxl_2.0``; ``W-9000-sdxl_2.0-stdout`` for a worker's output); None when
        no version is asked for."""
        if not version:
            return None
        suffix = r"-std(?:out|err)" if stream else ""
        return re.compile(rf"\bW-\d+-{re.escape(name)}_{re.escape(version)}{suffix}\s")

    def _new_text(self, path: Path) -> str:
        return text_since(path, self._offsets[path])


def text_since(path: Path, offset: int) -> str:
    """What ``path`` holds past ``offset`` (its size when a watch began); all of it when it
    is shorter now (replaced: log rotation); "" when it cannot be read."""
    try:
        with open(path, "rb") as log:
            log.seek(offset if _size(path) >= offset else 0)
            return log.read().decode("utf-8", "replace")
    except OSError:
        return ""


def last_lines(path: Path, lines: int, offset: int = 0) -> list[str]:
    """The last ``lines`` lines of what ``path`` holds past ``offset`` (``text_since``): what
    a failed start or an ended server is told by."""
    return text_since(path, offset).splitlines()[-lines:]


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


# Ports this process has handed out: two servers set up before either binds must not get
# the same one.
_handed_out: set[int] = set()
_handed_out_lock = threading.Lock()
# Its own generator: a test that seeds ``random`` must not make two processes pick alike.
_port_picker = random.SystemRandom()


def ephemeral_ports() -> tuple[int, int]:
    """The range the kernel takes outgoing connections' local ports from."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


@functools.lru_cache(maxsize=1)
def port_candidates() -> tuple[int, ...]:
    """Where ``free_port`` draws from: up to 12,000 ports below the ephemeral range and all
    above it. Empty on a machine whose ephemeral range is everything above 1024."""
    low, high = ephemeral_ports()
    return (*range(max(1024, low - 12000), low), *range(high + 1, 65536))


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now, outside the ephemeral range.

    Not ``bind(0)``: that answers with a port of the ephemeral range, which every outgoing
    connection on the machine draws from too, so between our check and the server's own bind
    a client's connection can take it (seen: TorchServe's gRPC port taken while a second test
    suite ran beside the first, and the server exited with "Address already in use").
    Where there are no candidates, the kernel's choice (port 0) is all there is.
    """
    candidates = port_candidates()
    with _handed_out_lock:
        for _ in range(200):
            port = _port_picker.choice(candidates) if candidates else 0
            if port in _handed_out:
                continue
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    continue
                port = sock.getsockname()[1]
            _handed_out.add(port)
            return port
    raise ServerError("no free loopback port outside the ephemeral range after 200 tries")


def venv_tool(name: str) -> str:
    """A console script of the running Python's environment (the model archiver)."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else (shutil.which(name) or name)


# An address a server of ours listens on, as a pattern matched whole and the form an error
# names. A TS_*_ADDRESS as TorchServe 0.12 reads it (its ConfigManager's pattern, matched
# whole, any case: no path, and no IPv6 literal, whose colons it cannot tell from the
# port's), with the port we need: the run directory and the key file's clients are found
# by it.
TORCHSERVE_ADDRESS = (re.compile(r"(?i)https?://[^:^/\s]+:[0-9]{1,5}"),
                      "http://HOST:PORT or https://HOST:PORT (no path; TorchServe takes no "
                      "IPv6 literal)")
# The job API's (uvicorn, plain HTTP): an IPv6 host in brackets too.
HTTP_ADDRESS = (re.compile(r"http://(\[[0-9A-Fa-f:.]+\]|[^\s/:\[\]]+):[0-9]{1,5}/?"),
                "http://HOST:PORT")


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1].strip("/"))


RUNS = REPO / "build" / "run"


# A label of a host name a resolver can look up: letters (any script: clients encode them
# as IDNA), digits, `-` inside and `_` (Docker's service names), 63 at most.
HOST_LABEL = re.compile(r"\w(?:[\w-]{0,61}\w)?")


def is_host(host: str) -> bool:
    """Whether ``host`` (as ``urlsplit`` gives it: lower case, an IPv6 address without its
    brackets) is one a name lookup can ever find: an IP address, or a name of labels. One
    that is not (a space, an empty label) would be looked up, and waited for, for good.

    >>> [is_host(h) for h in ("torchserve.ns.svc", "ts_1", "10.0.0.5", "::1", "a..b",
    ...                       "torch serve", "-ts", "fe80::1::2")]
    [True, True, True, True, False, False, False, False]
    """
    if ":" in host:
        try:
            ipaddress.IPv6Address(host.split("%")[0])  # a zone (%eth0) is the host's own
        except ValueError:
            return False
        return True
    name = host.removesuffix(".")
    return 0 < len(name) <= 253 and all(HOST_LABEL.fullmatch(label)
                                        for label in name.split("."))


def seconds(text: str) -> float:
    """An option's number of seconds above 0 (an argparse type): 0 made a socket
    non-blocking ("Operation now in progress"), a negative one was a traceback, and NaN or
    infinity waited for ever or not at all.

    >>> seconds("2.5")
    2.5
    """
    value = _number(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0, got {text!r}")
    return value


def seconds_from_zero(text: str) -> float:
    """An option's number of seconds from 0 (an argparse type), for a wait that may be
    skipped: a negative one or NaN was taken as a wait of nothing said as one of -5 s."""
    value = _number(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a number of seconds from 0, got {text!r}")
    return value


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


def is_base_url(address: str) -> bool:
    """Whether ``address`` is a server's base URL a client can call: ``http(s)://HOST``, a
    port from 1 to 65535 if any, no path but ``/``. ``127.0.0.1:8080``, without its scheme,
    is none (urllib reads ``127.0.0.1`` as the scheme), nor is a host no lookup can find
    (``is_host``).

    >>> [is_base_url(a) for a in ("http://h:8080", "https://[::1]/", "h:8080",
    ...                           "http://h:99999", "http://h:8080/x", "http://a b:8080")]
    [True, True, False, False, False, False]
    >>> is_base_url("http://h"), is_base_url("http://h:"), is_base_url("http://[::1]:")
    (True, False, False)
    """
    parts = urllib.parse.urlsplit(address)
    try:
        # None: the scheme's (80, 443); past 65535, ValueError. None too after a ":" with
        # no digits, which was taken for the scheme's: a port left out by mistake.
        port_ok = parts.port != 0 and not parts.netloc.endswith(":")
    except ValueError:
        return False
    return (parts.scheme.lower() in ("http", "https") and is_host(parts.hostname or "")
            and port_ok and parts.path in ("", "/") and not parts.query
            and not parts.fragment)


def server_address(parser: argparse.ArgumentParser, option: str, given: str | None,
                   variable: str = "", default: str = "") -> str:
    """The server address ``option`` gives (else the environment's ``variable``, else
    ``default``), or the parser's one-line error naming where it came from: a base URL,
    ``http(s)://HOST[:PORT]`` (``is_base_url``). ``127.0.0.1:8080`` without ``http://`` made
    a dispatcher that checked in as healthy and never started a job, saying nothing; an
    option given empty is refused, not taken for the default."""
    name, address = (option, given) if given is not None else \
        (variable, os.environ.get(variable) or default)
    if not is_base_url(address):
        parser.error(f"{name} must be http://HOST[:PORT] or https://HOST[:PORT], the port "
                     f"from 1 to 65535, got {address!r}")
    return address


def run_dir_for(inference: str, runs: Path = RUNS) -> Path:
    """The run directory `make serve` gives the server at the ``inference`` address (key
    file, logs, rollout record): ``runs/<its port>``; the scripts that talk to that
    server find its key file there.

    Raises:
        ValueError: a port that is not one (an address without a port is on its scheme's:
        80, or 443 for https).
    """
    parts = urllib.parse.urlsplit(inference)
    return runs / str(parts.port or (443 if parts.scheme.lower() == "https" else 80))


def listen_settings(addresses: "Addresses") -> list[tuple[str, str, int]]:
    """Each ``TS_*_ADDRESS`` variable with its address, as (what to call it, host, port):
    TorchServe fails to bind a port it cannot have after its start (its log says "Address
    already in use"; the launcher sees only an exit), so launchers check them first."""
    return [listen_setting(variable, address)
            for variable, address in (("TS_INFERENCE_ADDRESS", addresses.inference),
                                      ("TS_MANAGEMENT_ADDRESS", addresses.management),
                                      ("TS_METRICS_ADDRESS", addresses.metrics))]


def listen_setting(variable: str, address: str) -> tuple[str, str, int]:
    """The setting ``variable`` = ``address`` as (what to call it, host, port)."""
    return (f"{variable} {address}", urllib.parse.urlsplit(address).hostname or "127.0.0.1",
            port_of(address))


def address_setting(env: Mapping[str, str], name: str, default: str,
                    form: tuple[re.Pattern, str] = TORCHSERVE_ADDRESS) -> str:
    """The address a server is to listen on that the environment variable ``name`` sets
    (``default`` when unset or empty), of the ``form`` that server takes.

    Raises:
        ValueError: naming the variable, its value and the rule.
    """
    address = env.get(name) or default
    pattern, described = form
    if not pattern.fullmatch(address) or not 1 <= port_of(address) <= 65535:
        raise ValueError(f"{name} must be {described}, the port from 1 to 65535, got "
                         f"{address!r}")
    return address


def port_setting(env: Mapping[str, str], name: str) -> int | None:
    """The port the environment variable ``name`` sets; None when it is unset or empty.

    Raises:
        ValueError: naming the variable, its value and the rule (a launcher prints it as one
            line: int() of "abc" was a traceback).
    """
    text = env.get(name, "").strip()
    if not text:
        return None
    if not re.fullmatch(r"[0-9]{1,5}", text) or not 1 <= int(text) <= 65535:
        raise ValueError(f"{name} must be a port number from 1 to 65535, got {text!r}")
    return int(text)


def check_distinct_ports(settings: Sequence[tuple[str, str, int]]) -> None:
    """Refuse two listen ``settings`` (what to call it, host, port) of one start on one
    port: each is free when checked, and the second server to start fails to bind it, its
    reason only in its log. Hosts that cannot overlap (two addresses of their own) may.

    Raises:
        ValueError: naming both settings and the port.

    Example:
        >>> check_distinct_ports([("A 0.0.0.0:8080", "0.0.0.0", 8080),
        ...                       ("B 127.0.0.1:8080", "127.0.0.1", 8080)])
        Traceback (most recent call last):
        ...
        ValueError: A 0.0.0.0:8080 and B 127.0.0.1:8080 share port 8080: give each its own
    """
    anywhere = ("0.0.0.0", "::", "")
    for index, (name, host, port) in enumerate(settings):
        for other, other_host, other_port in settings[index + 1:]:
            if port == other_port and (host == other_host or host in anywhere
                                       or other_host in anywhere):
                raise ValueError(f"{name} and {other} share port {port}: give each its own")


def bind_error(host: str, port: int) -> OSError | None:
    """What binding ``host``:``port`` as a server binds raises (``errno.EADDRINUSE``:
    something listens there; ``EACCES``: a port below 1024 without the right to it;
    ``EADDRNOTAVAIL``: an address of no interface here), or None when it binds.
    SO_REUSEADDR, as servers bind, so a port left in TIME_WAIT by a server just stopped
    binds."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            return exc
    return None


@dataclass(frozen=True)
class Addresses:
    """Where the three TorchServe APIs listen."""

    inference: str
    management: str
    metrics: str
    # TorchServe 0.12 always starts gRPC servers (we do not use them) on 7070/7071 unless
    # told otherwise: None picks free loopback ports, so servers can run side by side.
    grpc_inference_port: int | None = None
    grpc_management_port: int | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Addresses":
        """The ``TS_*`` addresses from the environment, else config.properties' defaults.

        Raises:
            ValueError: a setting that is no ``http(s)://HOST:PORT`` (or, for the gRPC
                ports, no port), named with its value and the rule: a launcher prints it as
                one line, where it was a traceback from int() or, after the archive's
                build, Java's "Invalid binding address".
        """
        env = os.environ if env is None else env
        return cls(*(address_setting(env, f"TS_{api}_ADDRESS", f"http://127.0.0.1:{port}")
                     for api, port in (("INFERENCE", 8080), ("MANAGEMENT", 8081),
                                       ("METRICS", 8082))),
                   *(port_setting(env, f"TS_GRPC_{api}_PORT")
                     for api in ("INFERENCE", "MANAGEMENT")))

    @classmethod
    def free(cls) -> "Addresses":
        """Three free loopback ports (for tests and benchmarks)."""
        return cls(*(f"http://127.0.0.1:{free_port()}" for _ in range(3)))


def java_command(config: Path, model_store: Path, models: Sequence[str],
                 env: Mapping[str, str] | None = None, python: str = sys.executable,
                 log_config: Path | None = LOG_CONFIG) -> list[str]:
    """The Java frontend's command line, built as ``torchserve --start`` builds it.

    Kept to what 0.12's wrapper does for our flags: TorchServe's home, ``TEMP`` as Java's
    temp directory, a log configuration (ours unless given, as ``--log-config``), ``vmargs``
    from the config, the frontend jar, this Python for the workers, no config snapshots;
    but no ``.`` on the class path.
    """
    env = os.environ if env is None else env
    spec = importlib.util.find_spec("ts")  # located, not imported: only the adapter imports it
    if spec is None or not spec.submodule_search_locations:
        raise ServerError(missing_packages({"ts": "torchserve"})
                          or f"the `ts` found ({spec.origin}) is no TorchServe")
    ts_home = Path(list(spec.submodule_search_locations)[0]).parent
    java = str(Path(env["JAVA_HOME"], "bin", "java")) if env.get("JAVA_HOME") else "java"
    command = [java, f"-Dmodel_server_home={ts_home}"]
    if env.get("TEMP"):
        command.append(f"-Djava.io.tmpdir={env['TEMP']}")
    if log_config:
        # First: a -Dlog4j.configurationFile in the config's vmargs comes later and wins.
        command.append(f"-Dlog4j.configurationFile=file://{log_config}")
    command += _vmargs(config)
    # The frontend's jars only: TorchServe's launcher (ts/model_server.py) puts `.` first on
    # Linux, which would load any class file found in the working directory (the run
    # directory, writable by the server itself) before TorchServe's own.
    command += ["-cp", f"{ts_home / 'ts' / 'frontend'}/*", "org.pytorch.serve.ModelServer",
                "--python", python, "-f", str(config), "-s", str(model_store), "-ncs"]
    if models:
        command += ["-m", *models]
    return command


def _vmargs(config: Path) -> list[str]:
    for line in config.read_text().splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "vmargs":
            return value.split()
    return []


def ended_with_this_process():
    """A ``preexec_fn`` that has the kernel SIGTERM the child when this process dies, a
    SIGKILL included: a server runs in a session of its own, so nothing else would stop
    it, and it would go on holding its ports and the GPU. Only from a process with one
    thread (the kernel ties it to the thread that started the child); None elsewhere."""
    # Code run between fork and exec may deadlock on a lock another thread held at the
    # fork: a process with other threads (a test's fixtures) does without.
    if not sys.platform.startswith("linux") or threading.active_count() > 1:
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here, not after the fork
    launcher = os.getpid()

    def end_with_launcher() -> None:
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != launcher:  # it died before that took effect
            os._exit(1)
    return end_with_launcher


def private_folder(path: Path) -> None:
    """Make ``path`` (with any missing parents) and narrow it, not them, to the owner's
    alone, 0700, one made before with the umask's bits included; a directory given by a
    user who is not its owner is said so."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        path.chmod(0o700)
    except PermissionError:
        print(f"warning: {path} is not ours to make private; its files are (umask 077), its "
              f"listing is not", file=sys.stderr, flush=True)


def remove_unpacked_archives(temp_dir: str | Path) -> None:
    """Remove the model archives a TorchServe unpacked in ``temp_dir`` (``models/``) and
    was killed before it could remove; only for a temp directory no live TorchServe uses.

    A stop removes its own, but a TorchServe killed (a pod past its grace period or
    OOM-killed, its launcher killed) left each for good, and every start unpacks its
    archives again: 11 MB more per kill with the tiny model's archive, 0.4 MB with one
    whose weights are outside it.
    """
    shutil.rmtree(Path(temp_dir) / "models", ignore_errors=True)


def private_log(path: Path):
    """``path`` opened to append, 0600 (one made before with the umask's bits narrowed)."""
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.fchmod(descriptor, 0o600)
    return os.fdopen(descriptor, "ab")


def archive_code_path(pythonpath: str) -> str:
    """``pythonpath`` without the folders that hold our handler's entry point
    (``sdxl_serve_handler.py``: a checkout's ``handler/``), for TorchServe's workers.

    TorchServe puts its own PYTHONPATH before the archive's folder on a worker's path, so a
    checkout's ``handler/`` there (a shell that exported it) took the place of the archive's
    code: the worker ran that checkout's entry point and adapter beside some of the
    archive's modules, a version built by an older release did not run as built (a rollback
    to it ran a mix), and a broken build answered as if fine. Each archive packs all of our
    code it needs. A folder our package was installed into (site-packages, ``pip install
    --target``) has no entry point and stays: it holds torch and diffusers too.

    Example:
        >>> archive_code_path(os.pathsep.join(["/nowhere/lib", ""]))
        '/nowhere/lib'
    """
    return os.pathsep.join(folder for folder in pythonpath.split(os.pathsep)
                           if folder and not Path(folder, "sdxl_serve_handler.py").is_file())


def with_archive_code_path(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` for a TorchServe frontend: its PYTHONPATH through ``archive_code_path``,
    left out when nothing of it is kept (the launcher's and the pod's start alike).

    Example:
        >>> with_archive_code_path({"PYTHONPATH": "", "HOME": "/tmp"})
        {'HOME': '/tmp'}
    """
    env = dict(env)
    pythonpath = archive_code_path(env.pop("PYTHONPATH", ""))
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return env


class TorchServeProcess:
    """One TorchServe server with its own run directory, temp directory and ports."""

    def __init__(self, run_dir: str | Path, model_store: str | Path,
                 models: Mapping[str, str] | None = None, addresses: Addresses | None = None,
                 config: str | Path = CONFIG, env: Mapping[str, str] | None = None,
                 tmp_dir: str | Path | None = None, log_config: str | Path | None = LOG_CONFIG,
                 owns_tmp_dir: bool | None = None):
        self.run_dir = Path(run_dir).resolve()
        self.model_store = Path(model_store).resolve()
        self.models = dict(models or {})
        self.addresses = addresses or Addresses.from_env()
        self.grpc_ports = (self.addresses.grpc_inference_port or free_port(),
                           self.addresses.grpc_management_port or free_port())
        self.config = Path(config).resolve()
        self.tmp_dir = Path(tmp_dir).resolve() if tmp_dir else self.run_dir / "tmp"
        self.owns_tmp_dir = self.tmp_dir.is_relative_to(self.run_dir) \
            if owns_tmp_dir is None else owns_tmp_dir
        """No other server's: what a killed one left there is removed at the start."""
        self.extra_env = dict(env or {})
        self.log_config = Path(log_config).resolve() if log_config else None
        self.process: subprocess.Popen | None = None
        self.log_path = self.run_dir / "torchserve.out"
        self._keys = self.key_file()
        self._load_watch: LoadWatch | None = None
        self._log_offsets: dict[Path, int] = {}

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            "TS_INFERENCE_ADDRESS": self.addresses.inference,
            "TS_MANAGEMENT_ADDRESS": self.addresses.management,
            "TS_METRICS_ADDRESS": self.addresses.metrics,
            "TS_GRPC_INFERENCE_PORT": str(self.grpc_ports[0]),
            "TS_GRPC_MANAGEMENT_PORT": str(self.grpc_ports[1]),
            "TS_METRICS_CONFIG": str(METRICS_CONFIG),
            # Our processes' and the workers' temp files; Java takes its temp dir from TEMP.
            "TMPDIR": str(self.tmp_dir),
            "TEMP": str(self.tmp_dir),
            "LOG_LOCATION": str(self.run_dir / "logs"),
            "METRICS_LOCATION": str(self.run_dir / "logs"),
            # Java's output goes to torchserve.out, which nothing rolls: warnings and errors
            # only (config/log4j2.xml); every line is in ts_log.log, which rolls.
            "SDXL_CONSOLE_LOG_LEVEL": "warn",
        })
        # The workers' tools (this venv's console scripts) first, wherever we were called.
        env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
        env.update(self.extra_env)
        # The workers run in their unpacked archive's directory, not this one.
        return with_archive_code_path(absolute_path_overrides(env))

    def start(self) -> None:
        """Start TorchServe in the foreground of its own process session.

        Raises:
            ServerError: its run or temp directory cannot be made or written (a full disk),
                said in one line naming the directory, before Java is started; or Java
                cannot be run (none on PATH, a JAVA_HOME without it), said in one line.
        """
        try:
            # The owner's alone, as TorchServe's own files are (umask below): its output
            # names the key file, the config and every path, and the directory holds the keys.
            for private in (self.run_dir, self.run_dir / "logs"):
                private_folder(private)
            # A temp directory of its own (serve.py's in a TMPDIR given) too: its listing
            # names the workers' sockets, the unpacked archives and the engines' pids. One
            # given to share (a TMPDIR itself) is not ours to narrow.
            if self.owns_tmp_dir:
                private_folder(self.tmp_dir)
            else:
                self.tmp_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ServerError(f"cannot make {exc.filename}: {exc.strerror}"
                              f"{errno_name(exc)}") from None
        # On a full disk Java exits 1 without a word: it cannot write the key file, and
        # torchserve.out, where it would say so, is on the same disk.
        cannot_write = unwritable([self.run_dir, self.run_dir / "logs", self.tmp_dir])
        if cannot_write:
            raise ServerError(cannot_write)
        key_file = self.run_dir / "key_file.json"
        if key_file.exists():
            key_file.unlink()  # a stale file from a killed server holds dead keys
        if self.owns_tmp_dir:
            remove_unpacked_archives(self.tmp_dir)
        env = self.env
        command = java_command(self.config, self.model_store,
                               [f"{name}={mar}" for name, mar in self.models.items()], env,
                               log_config=self.log_config)
        self._load_watch = LoadWatch(self.run_dir / "logs")
        # Every file appends across starts in one run directory: a failed start shows its own.
        self._log_offsets = {path: _size(path) for path in self._tailed()}
        log = private_log(self.log_path)
        # umask 077: TorchServe creates key_file.json (and its logs) with the umask and only
        # then narrows the key file to 0600 (management.py).
        try:
            self.process = subprocess.Popen(command, cwd=self.run_dir, env=env, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True,
                                            umask=KEY_UMASK,
                                            preexec_fn=ended_with_this_process())
        except OSError as exc:
            # No Java, or a JAVA_HOME that names none: it was a FileNotFoundError traceback
            # from inside subprocess, after the archive's build.
            where = (f"JAVA_HOME={env['JAVA_HOME']} has no runnable bin/java"
                     if env.get("JAVA_HOME") else "no `java` on PATH")
            raise ServerError(f"cannot run Java ({command[0]}: {exc.strerror}): {where}; "
                              f"TorchServe's frontend needs Java 17 (README.md)") from None
        finally:
            log.close()

    def keys(self) -> dict[str, str]:
        return read_keys(self.run_dir / "key_file.json")

    def wait_ready(self, model: str | None = None, timeout: float = 180.0,
                   poll: float = 0.25, stop: threading.Event | None = None) -> None:
        """Wait until the key file exists and ``model`` (if given) has a READY worker.

        ``model`` is ``<name>``, or ``<name>/<version>``: then a failed load is that
        version's workers' alone, told by their whole thread name (``LoadWatch``), and the
        READY worker is still the model's, whichever version its archive says it is.

        ``poll`` is the pause between checks; the benchmark shortens it to time phases.

        Raises:
            LoadFailed: a worker failed to load a model since ``start``, with the worker's
                exception.
            StartCancelled: ``stop`` was set.
            ServerError: TorchServe exited, or was not ready within ``timeout``.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if stop is not None and stop.is_set():
                raise StartCancelled("stopped before the model was ready")
            if self.process is not None and self.process.poll() is not None:
                # A disk that filled during the start: the logs named are empty.
                cannot_write = unwritable([self.run_dir, self.tmp_dir])
                raise ServerError(f"TorchServe (java) exited with {self.process.returncode}"
                                  + (f": {cannot_write}" if cannot_write else "")
                                  + f"; see {self.log_path} and {self.run_dir / 'logs'}"
                                  f"\n{self.tail()}")
            failure = self._load_watch.failure(model) if self._load_watch else None
            if failure:
                raise LoadFailed(f"model {(model or '').replace('/', ' ')} failed to load "
                                 f"(TorchServe would retry "
                                 f"it for as long as it runs); the worker said:\n{failure}\n"
                                 f"logs: {self.run_dir / 'logs'}")
            if self._ready(model.partition("/")[0] if model else model):
                return
            if stop is not None:
                stop.wait(poll)
            else:
                time.sleep(poll)
        raise ServerError(f"torchserve not ready after {timeout:.0f} s; see {self.log_path} "
                          f"and {self.run_dir / 'logs'}\n{self.tail()}")

    def key_file(self) -> KeyFile:
        """The keys, renewed with the API key when they have expired (a slow start can
        outlast ``token_expiration_min``)."""
        return KeyFile(self.run_dir / "key_file.json", self.addresses.management, direct=True)

    def _ready(self, model: str | None) -> bool:
        if not (self.run_dir / "key_file.json").exists():
            return False
        try:
            url = self.addresses.management + "/models" + (f"/{model}" if model else "")
            status, _, body = self._keys.call("GET", url, "management", timeout=5)
        except (OSError, KeyError, ValueError):
            return False
        if status != 200:
            return False
        if model is None:
            return True
        return ready_workers(json.loads(body)) > 0

    def _tailed(self) -> list[Path]:
        """What a failed start is read from: torchserve.out (Java's own output, and the
        frontend's warnings and errors only), ts_log.log (every frontend line, what it was
        doing) and model_log.log (the workers')."""
        return [self.log_path, self.run_dir / "logs" / "ts_log.log",
                self.run_dir / "logs" / "model_log.log"]

    def tail(self, lines: int = 40) -> str:
        """The last ``lines`` each of those files got since this start."""
        text = []
        for path in self._tailed():
            text += last_lines(path, lines, self._log_offsets.get(path, 0))
        return "\n".join(text)

    def last_word(self) -> str | None:
        """Java's own line for why it ended itself since this start, from torchserve.out:
        ``Terminating due to java.lang.OutOfMemoryError: Java heap space`` (config.properties'
        vmargs); None when it said none."""
        said = [line for line in text_since(self.log_path, self._log_offsets.get(
            self.log_path, 0)).splitlines() if line.startswith(JVM_LAST_WORD)]
        return said[-1] if said else None

    def java_pid(self) -> int | None:
        """The Java frontend's pid while it runs (it is our child)."""
        return self.process.pid if self.process is not None else None

    def stop(self, timeout: float = 30.0) -> None:
        """Stop Java and its workers; safe to call twice or after a failed start.

        ``timeout`` bounds the polite stop (SIGTERM, which Java answers by stopping its
        workers, as ``torchserve --stop`` has it do); whatever is left after it, or after
        any error on the way, is killed with the whole process group, always.
        """
        if self.process is None:
            return
        try:
            self.process.terminate()
            self.process.wait(timeout=timeout)
        except (subprocess.TimeoutExpired, OSError):
            pass  # killed below
        finally:
            # Whatever is left of the session (workers, their engine processes) goes too.
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            # SIGKILL cannot be refused: this wait is short whatever ``timeout`` was.
            self.process.wait(timeout=60)
            self.process = None
            # As `torchserve --stop` does: its keys are dead, and a client reading them
            # would take the refused connection for a wrong key.
            (self.run_dir / "key_file.json").unlink(missing_ok=True)

#!/usr/bin/env python3
"""Serve SDXL with TorchServe in the foreground until Ctrl-C, then stop Java too.

Builds the tiny model and archive if missing (or if the archive serves other weights than
asked for), says which weights it serves, starts TorchServe with config/, waits until the
model is READY and prints where the token key file is and a curl line that works. A model
that fails to load ends the start at once with the worker's exception (exit 1); Ctrl-C
stops it at any time.

Honours TS_INFERENCE_ADDRESS / TS_MANAGEMENT_ADDRESS / TS_METRICS_ADDRESS and TMPDIR, so
two servers can run side by side; each gets its own run directory (key file, logs),
build/run/<inference port> unless --run-dir says otherwise.

Usage: python scripts/serve.py [--model-dir DIR] [--name sdxl] [--version 1.0]
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import shlex
import signal
import sys
import threading
import zipfile
from pathlib import Path
from typing import Callable, Mapping

REPO = Path(__file__).resolve().parents[1]
# This checkout's code first, not the checkout a shared venv's editable install names.
sys.path[:0] = [str(REPO / "handler"), str(REPO / "jobs"), str(REPO / "scripts")]
from sdxl_serve.management import read_keys  # noqa: E402
from sdxl_serve.model_files import (  # noqa: E402
    describe_weights, packed_handler_section, packed_model_dir)
from sdxl_serve.server import (  # noqa: E402
    RUNS, TORCHSERVE_PACKAGES, Addresses, ServerError, StartCancelled, TorchServeProcess,
    bind_error, cancel_on_signals, check_distinct_ports, listen_settings,
    refuse_missing_packages, run_dir_for, stop_signals)
from sdxl_serve.settings import Settings, SettingsError, absolute_path_overrides  # noqa: E402

if __name__ == "__main__":
    cancel_on_signals("start")  # before torch's import and the archive's build
    refuse_missing_packages(TORCHSERVE_PACKAGES)

from build_archive import (ARCHIVE_REFUSALS, KEEP_REPLACED, add_archive_arguments,  # noqa: E402
                           archive_differences, archive_path, check_archive_owner,
                           check_weights, replace_archive)
from rollout import ServedVersions  # noqa: E402

# Passed through to the workers: TorchServe hands its environment to them (every SDXL_*
# setting works this way); these are shown at start because they change how workers live.
PASSED_ENV = ("SDXL_MAX_REQUESTS_PER_WORKER", "SDXL_MAX_WORKER_AGE_S")


def curl_line(addresses: Addresses, key_file: Path, name: str, raw: bool = False) -> str:
    """A curl command that works as printed: JSON with base64, or raw PNG bytes."""
    # The key reaches curl on its standard input (`-H @-`, docs/security.md), not in its
    # arguments, where every user of the machine reads it (`ps`). The path is an argument,
    # quoted for the shell: written into the Python source, a checkout under a folder with
    # a quote in its name (`Bob's projects`) broke the line.
    header = (f"python3 -c 'import json,sys;print(\"Authorization: Bearer \" + json.load("
              f"open(sys.argv[1]))[\"inference\"][\"key\"])' {shlex.quote(str(key_file))}")
    accept = "-H 'Accept: image/png' -o out.png " if raw else ""
    return (f"{header} | curl -s -H @- {accept}"
            f"-H 'Content-Type: application/json' "
            f"-d '{{\"prompt\": \"a lighthouse at dawn\", \"seed\": 42}}' "
            f"{addresses.inference}/predictions/{name}")


def ready_lines(addresses: Addresses, run_dir: Path, name: str) -> str:
    """What a READY server prints: lines that work as printed, pasted into a shell in the
    checkout's root, wherever the checkout is."""
    key_file = run_dir / "key_file.json"
    # Quoted: a checkout under a folder with a space (`My Projects`) split these paths, so
    # the client read a key file that is not there and the probe a run directory that is not.
    return (f"token keys: {key_file}\n"
            f"JSON with a base64 PNG:\n  {curl_line(addresses, key_file, name)}\n"
            f"raw PNG bytes into out.png:\n"
            f"  {curl_line(addresses, key_file, name, raw=True)}\n"
            f"the command-line client:\n  python3 scripts/generate.py --key-file "
            f"{shlex.quote(str(key_file))} --url {addresses.inference} --management-url "
            f"{addresses.management} 'a lighthouse at dawn'\n"
            f"deep health (readiness):\n  python3 scripts/health_probe.py --url "
            f"{addresses.inference} --management {addresses.management} --run-dir "
            f"{shlex.quote(str(run_dir))}\n"
            f"metrics: {addresses.metrics}/metrics")


def prepare_archive(name: str, version: str, model_dir: Path | None, model_store: Path,
                    rebuild: bool = False) -> Path | None:
    """The archive to serve, built when missing, when asked, or when this checkout would pack
    it otherwise (``archive_differences``: other code, another model-config.yaml, other
    weights than asked for; no ``model_dir`` asks for the embedded tiny model); says which
    weights it serves. None, with the reason printed, when the archive is refused (weights
    missing or not safetensors, a setting the worker or TorchServe would refuse, another
    model's or version's archive under its file name). Shared by serve.py and
    serve_jobs.py."""
    mar = archive_path(model_store, name, version)
    try:
        # Reused, it never registers the version asked for: the start waited for it; built
        # over, another model's archive went to replaced/ (replace_archive leaves this to us).
        check_archive_owner(mar, name, version)
    except ARCHIVE_REFUSALS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None
    gone = False
    if model_dir is None and mar.exists():
        # No MODEL_DIR: the archive's own weights, while they are there. Rebuilt for "other
        # weights" (the tiny model), a real SDXL's version served random noise under its
        # number, and the restart note's `make serve VERSION=...` did just that. Weights
        # that are gone still give the tiny model, as asked (fail-fast-start.md).
        try:
            packed = packed_model_dir(mar)
        except (OSError, KeyError, ValueError, AttributeError, zipfile.BadZipFile):
            packed = None  # unreadable: built again below, as asked
        if packed is not None and packed.is_dir():
            model_dir = packed
            print(f"archive {mar} was built for the weights in {packed}: serving those "
                  f"(MODEL_DIR=... serves others)", flush=True)
        elif packed is not None:
            gone = True
            print(f"archive {mar} was built for the weights in {packed}, which are gone: "
                  f"building it again for {describe_weights(None)}", flush=True)
    wanted = model_dir.resolve() if model_dir is not None else None
    try:
        changed = archive_differences(mar, wanted) if mar.exists() else []
        stale = rebuild or not mar.exists() or bool(changed)
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        changed, stale = [], True  # unreadable: build it again
    # Weights gone: the packed config differs in the weights it names, which the line
    # above said; "differs from this checkout (model-config.yaml)" read as an edit.
    if changed and not rebuild and not gone:
        # The worker runs the code and settings packed in the archive, not the checkout's.
        shown = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more"
                                          if len(changed) > 3 else "")
        print(f"archive {mar} differs from this checkout ({shown}): building it again",
              flush=True)
    if stale:
        try:
            mar, kept = replace_archive(name, version, model_dir, model_store)
        except ARCHIVE_REFUSALS as exc:  # a bad setting or weights: said, not a traceback
            print(f"error: {exc}", file=sys.stderr)
            return None
        if kept is not None:
            print(f"the archive it replaces is kept as {kept} (the last {KEEP_REPLACED} "
                  f"are)", flush=True)
    print(f"archive {mar} serves {describe_weights(wanted)}"
          + ("" if stale else " (built before; --rebuild builds it again, "
                              "SERVE_ARGS=--rebuild under make)"), flush=True)
    if os.environ.get("SDXL_MODEL_DIR"):
        # The workers read it over the archive's: the line above named weights not served.
        print(f"SDXL_MODEL_DIR overrides that: the workers load the weights in "
              f"{absolute_path_overrides(os.environ)['SDXL_MODEL_DIR']}", flush=True)
    return mar


def refuse_unloadable_settings(mar: Path, env: Mapping[str, str]) -> bool:
    """Say so, and True, when no worker could load ``mar``'s handler section with ``env``
    (the environment TorchServe hands its workers: ``TorchServeProcess.env``). The build
    checked the section alone, as any machine may serve it; this is the machine that serves,
    and its SDXL_* overrides and directories (a missing SDXL_VAE_DIR) failed every worker's
    load, a traceback after TorchServe's start. The weights an SDXL_MODEL_DIR names are
    checked as a build checks its own (``check_weights``); the archive's own weights,
    removed after its build, stay the worker's to refuse (docs/fail-fast-start.md)."""
    try:
        section = packed_handler_section(mar)
        Settings.check_serving(section, env)
    except SettingsError as exc:
        # The cause only: an error of SDXL_* variables alone names them, and the archive's
        # section, fine as written, is no part of it.
        where = "" if exc.overridden else f"{mar} (its handler section): "
        print(f"error: {where}{exc}", file=sys.stderr)
        return True
    if env.get("SDXL_MODEL_DIR"):
        try:
            check_weights(Path(env["SDXL_MODEL_DIR"]),
                          section.get("model_file_check", Settings.model_file_check))
        except ARCHIVE_REFUSALS as exc:
            print(f"error: SDXL_MODEL_DIR, which the workers load over the archive's "
                  f"weights: {exc}", file=sys.stderr)
            return True
    return False


def run_dir_of(addresses: Addresses, run_dir: Path | None, runs: Path = RUNS) -> Path:
    """The server's own directory: ``run_dir``, else ``run_dir_for`` its address."""
    return run_dir or run_dir_for(addresses.inference, runs)


def say_last_default(run_dir: Path, name: str, version: str,
                     command: str = "make serve") -> None:
    """Tell a restart that serves another version than the one a rollout left serving:
    TorchServe remembers no default version (its config snapshots are off), so a restart
    serves ``--version`` (``make serve``'s VERSION, 1.0 unless given)."""
    last = ServedVersions(run_dir / "served_versions.json", None).last_default(name)
    if last and last != version:
        print(f"note: the server that ran here before served {name} {last} (made the "
              f"default by scripts/rollout.py); this one serves {version}. To serve {last}: "
              f"{command} VERSION={last}", flush=True)


def drop_previous_record(run_dir: Path) -> None:
    """Once this server is READY: the rollout record of the server before it has been
    read (``say_last_default``) and would otherwise be said again at every start."""
    try:
        api_key = read_keys(run_dir / "key_file.json").get("api")
    except (OSError, ValueError, LookupError):
        return
    ServedVersions(run_dir / "served_versions.json", api_key).drop_other_runs()


def torchserve_process(name: str, mar: Path, model_store: Path,
                       run_dir: Path | None = None, runs: Path = RUNS
                       ) -> TorchServeProcess:
    """TorchServe on the ``TS_*`` addresses with its own run directory (``runs/<inference
    port>`` unless ``run_dir``) and temp directory (``tmp/`` there, or a folder of its own
    in a ``TMPDIR`` given: ``sdxl-torchserve-<inference port>``), serving ``mar`` as model
    ``name``."""
    addresses = Addresses.from_env()
    run_dir = run_dir_of(addresses, run_dir, runs)  # made by its start, the owner's alone
    given = os.environ.get("TMPDIR")
    # TorchServe keeps its pid file and its workers' sockets (.ts.sock.9000) in its temp
    # directory: two servers side by side given one TMPDIR clashed there.
    port = run_dir_for(addresses.inference, Path()).name
    tmp_dir = Path(given) / f"sdxl-torchserve-{port}" if given else run_dir / "tmp"
    # Its own, either way: what a killed server left there is removed at the next start.
    return TorchServeProcess(run_dir, model_store, {name: mar.name}, addresses,
                             tmp_dir=tmp_dir, owns_tmp_dir=True)


def refuse_taken_ports(addresses: Addresses) -> bool:
    """Say so, and True, when a port TorchServe needs is taken (a server already running)
    or not ours to listen on: TorchServe would start, fail to bind it and exit, its reason
    only in its log."""
    return refuse_taken(listen_settings(addresses),
                        "all three TS_*_ADDRESS ports (docs/configuration.md)")


# What the errno of a failed bind means here, where its words alone mislead.
BIND_HINTS = {errno.EACCES: "a port below 1024 needs root or CAP_NET_BIND_SERVICE",
              errno.EADDRNOTAVAIL: "no interface of this machine has that address"}


def refuse_taken(settings: list[tuple[str, str, int]], ports: str) -> bool:
    """Say which of a server's listen ``settings`` (what to call it, host, port) it could
    not bind, and how to move them (``ports``); True when any. Something listening there
    is one line for all; any other reason (a port below 1024, an address not of this
    machine) one line each, with its own words: "already listens" sent people looking for
    a server that was never there."""
    errors = [(name, bind_error(host, port)) for name, host, port in settings]
    taken = [name for name, error in errors
             if error is not None and error.errno == errno.EADDRINUSE]
    if taken:
        print(f"error: something already listens on {', '.join(taken)}: another server? "
              f"Stop it, or move {ports}", file=sys.stderr)
    unusable = [(name, error) for name, error in errors
                if error is not None and error.errno != errno.EADDRINUSE]
    for name, error in unusable:
        hint = f" ({BIND_HINTS[error.errno]})" if error.errno in BIND_HINTS else ""
        print(f"error: cannot listen on {name}: {error.strerror}{hint}: move {ports}",
              file=sys.stderr)
    return bool(taken or unusable)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_archive_arguments(parser)
    parser.add_argument("--run-dir", type=Path, default=None)
    parser.add_argument("--rebuild", action="store_true",
                        help="rebuild the archive (for MODEL_DIR, else its own weights)")
    args = parser.parse_args(argv)

    try:
        addresses = Addresses.from_env()
        check_distinct_ports(listen_settings(addresses))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # Before anything is built or made: a server already there would only fail to bind.
    if refuse_taken_ports(addresses):
        return 2
    say_last_default(run_dir_of(addresses, args.run_dir), args.name, args.version)
    # 1. The archive, for the weights asked for.
    mar = prepare_archive(args.name, args.version, args.model_dir, args.model_store,
                          args.rebuild)
    if mar is None:
        return 2
    # 2. Where this server keeps its state.
    server = torchserve_process(args.name, mar, args.model_store, args.run_dir)
    run_dir, addresses = server.run_dir, server.addresses
    if refuse_unloadable_settings(mar, server.env):
        return 2
    stopping = stop_on_signals()
    # 3. Start and wait for a READY worker (model load and warm-up included). The first
    # failed load ends the start (TorchServe alone would retry it for as long as it runs),
    # and Ctrl-C or SIGTERM end the wait at once. The ports again: the build may have
    # taken minutes.
    if refuse_taken_ports(addresses):
        return 2
    print(f"starting TorchServe (logs in {run_dir}/logs) ...", flush=True)
    try:
        server.start()
    except ServerError as exc:  # its directories cannot be written (a full disk)
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1

    def ready() -> None:
        # Its version too: a failed load of a version with a `_` (2_0) went unseen
        # for the whole timeout by the model's name alone (LoadWatch).
        server.wait_ready(f"{args.name}/{args.version}", timeout=900, stop=stopping)
        drop_previous_record(run_dir)
        print(f"\nREADY: model {args.name} v{args.version} at {addresses.inference}\n"
              f"{ready_lines(addresses, run_dir, args.name)}\n"
              + "".join(f"{name}={os.environ[name]} (from the environment)\n"
                        for name in PASSED_ENV if os.environ.get(name)) +
              "Ctrl-C stops the server.", flush=True)

    return serve_in_foreground("TorchServe", server, stopping, ready,
                               last_word=server.last_word)


def stop_on_signals() -> threading.Event:
    """An event that Ctrl-C (SIGINT), SIGTERM or SIGHUP sets instead of raising, but a
    SIGHUP ignored when this process started (``stop_signals``: `nohup make serve`). SIGHUP is
    a closed terminal or a lost ssh session: its default, to exit at once, left the server
    (in a session of its own) running with nobody to stop it."""
    stopping = threading.Event()

    def stop(signum, frame):
        stopping.set()

    for signum in stop_signals():
        signal.signal(signum, stop)
    return stopping


def say(line: str) -> None:
    """Print, unless the terminal is gone (after a SIGHUP): the stop must still happen."""
    with contextlib.suppress(OSError):
        print(line, flush=True)


def serve_in_foreground(name: str, server, stopping: threading.Event,
                        ready: Callable[[], None],
                        watch: Callable[[], None] | None = None,
                        last_word: Callable[[], str | None] | None = None) -> int:
    """Wait for ``server`` (``ready`` waits and prints what to call), then stay in the
    foreground until ``stopping`` is set or the server dies, calling ``watch`` every second;
    the server is always stopped. ``last_word`` gives the server's own line for why it
    ended itself, if it said one.

    Returns the exit code: 0 after Ctrl-C, 1 when the server failed or died, 130 when the
    start itself was cancelled.
    """
    try:
        ready()
        while not stopping.wait(1.0):
            if server.process.poll() is not None:
                # Not "exited (N)" alone: that reads as a clean end, and a Java (or Triton)
                # that stops by itself has crashed or was killed.
                said = last_word() if last_word is not None else None
                why = f"it said \"{said}\"" if said else "it crashed or was killed"
                print(f"{name} stopped on its own (exit code {server.process.returncode}), "
                      f"not by Ctrl-C: {why}; see {server.log_path}", file=sys.stderr)
                return 1
            if watch is not None:
                watch()
    except StartCancelled:
        print("start cancelled", file=sys.stderr, flush=True)
        return 130
    except ServerError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        if server.process is not None:  # not said of a start refused before it ran
            say(f"stopping {name} ...")
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

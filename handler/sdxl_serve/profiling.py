"""Scheduled profiling: now and then one real pipeline call runs under ``torch.profiler``.

A regression that only production shows (a driver update, a slower kernel, memory that grows
with some sizes) is found by comparing profiles of real calls over time. With
``profile_every_n_requests`` set, the worker marks every N-th request's pipeline call, and the
engine process runs that one call under ``torch.profiler`` with memory profiling
(``profile_memory``, ``record_shapes``). Each profile leaves two files in ``profile_dir``:

- ``profile-<UTC time>-<pid>.json.gz``: the Chrome trace (open it in https://ui.perfetto.dev
  or chrome://tracing; memory allocations are its ``[memory]`` events);
- ``profile-<UTC time>-<pid>.txt``: what the call was, and the operator table sorted by the
  memory each operator allocated, readable in a terminal.

Only the newest ``profile_keep`` profiles are kept, so the directory stays bounded. The served
image is the same with or without profiling (the profiler observes, it changes no numbers).

The command line lists and shows them::

    python -m sdxl_serve.profiling list  [--dir DIR]
    python -m sdxl_serve.profiling show  [NAME] [--dir DIR]   # the summary (newest by default)
    python -m sdxl_serve.profiling path  [NAME] [--dir DIR]   # the trace file, for a viewer

Example:
    store = TraceStore("/tmp/profiles", keep=3)
    with store.recording("one call", torch.device("cpu")):
        engine.generate([request])
    [trace.name for trace in store.traces()]
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, ContextManager, Iterator, Mapping

from sdxl_serve.cancellation import left_by_gone_process, this_host
from sdxl_serve.writable import unwritable

log = logging.getLogger(__name__)

PREFIX = "profile-"
TRACE_SUFFIX = ".json.gz"
SUMMARY_SUFFIX = ".txt"
SUMMARY_ROWS = 30
# A profile is written in a folder of its writer's, ``.writing-<host>-<pid>-<random>``, and
# moved into place whole: a write ended half-way (its engine process killed by a recycle's
# stop) leaves that folder alone, which the next engine process removes.
WRITING_PREFIX = ".writing-"


def default_profile_dir(env: Mapping[str, str] | None = None, parent_pid: int | None = None
                        ) -> Path:
    """``profiles/`` in the run directory, else in the temp directory.

    The run directory is ``$SDXL_RUN_DIR`` (the pod sets it), else the working directory of
    the TorchServe frontend that started this worker (where its logs and key file are:
    ``build/run/<port>`` under ``make serve``). Outside TorchServe (the command line, a
    test), the temp directory.
    """
    env = os.environ if env is None else env
    if env.get("SDXL_RUN_DIR"):
        return Path(env["SDXL_RUN_DIR"]) / "profiles"
    if parent_pid is not None:
        cwd = Path(f"/proc/{parent_pid}/cwd")
        with contextlib.suppress(OSError):
            return cwd.resolve(strict=True) / "profiles"
    return Path(tempfile.gettempdir()) / "sdxl-profiles"


def announced_profile_dir(every_n: int, profile_dir: str | Path,
                          parent_pid: int | None = None) -> str:
    """Where a server's profiles go (``profile_dir``, else ``default_profile_dir``), logged
    at the model's start: under Triton it was said nowhere but in each profile's line."""
    chosen = str(profile_dir or default_profile_dir(parent_pid=parent_pid))
    log.info("profiling one pipeline call every %d requests into %s", every_n, chosen)
    return chosen


@dataclass(frozen=True)
class Trace:
    """One profile on disk: its trace and its summary."""

    name: str
    trace: Path
    summary: Path
    written_at: float
    size: int


class TraceStore:
    """A directory of the newest ``keep`` profiles.

    Args:
        directory: where the files go (made when the first one is written).
        keep: how many profiles to keep.
        defer: keep a finished profile in memory until ``flush``: exporting it takes
            several times as long as the call itself (measured: docs/profiling.md), and the
            engine process flushes only after the profiled request has its reply.
        keep_alive: given the profiled call's seconds and the stage (``"stop"``, the
            profiler's, or ``"write"``), a context manager around it: both take seconds
            with no step, and the engine process tells its worker it is busy
            (``engine_process.busy``).
    """

    def __init__(self, directory: str | Path, keep: int, defer: bool = False,
                 keep_alive: Callable[[float, str], ContextManager] =
                 lambda seconds, stage: contextlib.nullcontext()):
        self.directory = Path(directory)
        self.keep = keep
        self.defer = defer
        self.keep_alive = keep_alive
        self._pending: tuple | None = None

    @contextlib.contextmanager
    def recording(self, label: str, device) -> Iterator[None]:
        """Profile what runs inside; write the trace if it ran through.

        A trace that cannot be written (full disk, no permission) is logged, never raised:
        profiling must not fail the request it watched.
        """
        import torch

        activities = [torch.profiler.ProfilerActivity.CPU]
        if getattr(device, "type", "cpu") == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        started = time.perf_counter()
        profile = torch.profiler.profile(activities=activities, profile_memory=True,
                                         record_shapes=True)
        profile.__enter__()
        try:
            yield
        finally:
            # The stop gathers the call's events: seconds.
            with self.keep_alive(time.perf_counter() - started, "stop"):
                profile.__exit__(None, None, None)
        self._pending = (profile, label, time.perf_counter() - started, device)
        if not self.defer:
            self.flush()

    def flush(self) -> Trace | None:
        """Write the finished profile, if one waits; None when none did or writing failed."""
        if self._pending is None:
            return None
        pending, self._pending = self._pending, None
        try:
            with self.keep_alive(pending[2], "write"):
                return self.write(*pending)
        except OSError as exc:
            # On a full disk the profiler's own write of trace.json fails without a word,
            # and what is raised is our read of it: "No such file or directory".
            reason = unwritable([self.directory]) or f"{self.directory}: {exc}"
            log.warning("profile of one pipeline call not written: %s", reason)
            return None

    def write(self, profile, label: str, seconds: float, device) -> Trace:
        """Write trace and summary in a folder of this process's (``WRITING_PREFIX``), move
        them into place, then delete all but the newest ``keep``. A reader never sees half
        a file, and a write ended half-way leaves nothing that looks like a profile."""
        self.directory.mkdir(parents=True, exist_ok=True)
        now = datetime.now(timezone.utc)
        name = f"{PREFIX}{now:%Y%m%dT%H%M%S%fZ}-{os.getpid()}"
        trace = self.directory / (name + TRACE_SUFFIX)
        summary = self.directory / (name + SUMMARY_SUFFIX)
        with tempfile.TemporaryDirectory(
                dir=self.directory, prefix=f"{WRITING_PREFIX}{this_host()}-{os.getpid()}-"
        ) as scratch:
            # 1. The Chrome trace, gzipped: a 30-step SDXL call is tens of MB of JSON.
            raw = Path(scratch) / "trace.json"
            profile.export_chrome_trace(str(raw))
            packed = Path(scratch) / trace.name
            with raw.open("rb") as source, gzip.open(packed, "wb", compresslevel=6) as target:
                while chunk := source.read(1 << 20):
                    target.write(chunk)
            # 2. The summary a person reads first.
            sort_by = ("self_device_memory_usage" if getattr(device, "type", "cpu") == "cuda"
                       else "self_cpu_memory_usage")
            table = profile.key_averages().table(sort_by=sort_by, row_limit=SUMMARY_ROWS)
            written = Path(scratch) / summary.name
            written.write_text(f"profile {name}\n"
                               f"call: {label}\n"
                               f"device: {device}\n"
                               f"seconds under the profiler: {seconds:.3f}\n"
                               f"trace: {trace.name} (open in https://ui.perfetto.dev or "
                               f"chrome://tracing)\n"
                               f"operators by {sort_by}:\n{table}\n")
            # 3. Into place, the trace last: a profile is listed by its trace.
            os.replace(written, summary)
            os.replace(packed, trace)
        log.info("profile of one pipeline call (%s) written: %s", label, trace)
        self.prune()
        return self.find(name)

    def remove_unfinished(self) -> None:
        """Remove the folders of writes that ended half-way (``WRITING_PREFIX``) whose
        process, of this host, is gone: a recycle's stop kills an engine process that has
        not exited in 30 s, a profile's write included. Another host's and a live
        process's (a write under way in another worker's engine) stay. Run before this
        process writes one: its own folder counts as a gone process's (``_gone``)."""
        with contextlib.suppress(OSError):
            for folder, _ in left_by_gone_process(str(self.directory), WRITING_PREFIX):
                shutil.rmtree(folder, ignore_errors=True)

    def traces(self) -> list[Trace]:
        """Profiles on disk, newest first (names sort by their UTC time)."""
        if not self.directory.is_dir():
            return []
        found = []
        for trace in self.directory.glob(f"{PREFIX}*{TRACE_SUFFIX}"):
            name = trace.name[:-len(TRACE_SUFFIX)]
            summary = self.directory / (name + SUMMARY_SUFFIX)
            with contextlib.suppress(OSError):  # pruned by another process meanwhile
                stat = trace.stat()
                found.append(Trace(name, trace, summary, stat.st_mtime, stat.st_size))
        return sorted(found, key=lambda t: t.name, reverse=True)

    def find(self, name: str | None = None) -> Trace:
        """The profile called ``name`` (or a unique prefix of it); the newest if None."""
        traces = self.traces()
        if not traces:
            raise LookupError(f"no profiles in {self.directory}")
        if name is None:
            return traces[0]
        name = Path(name).name.removesuffix(TRACE_SUFFIX).removesuffix(SUMMARY_SUFFIX)
        matches = [t for t in traces if t.name.startswith(name)]
        if len(matches) != 1:
            raise LookupError(f"{len(matches)} profiles in {self.directory} match {name!r}")
        return matches[0]

    def prune(self) -> None:
        """Delete all but the newest ``keep`` profiles."""
        for old in self.traces()[self.keep:]:
            for path in (old.trace, old.summary):
                path.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sdxl_serve.profiling",
        description="List and show the profiles that scheduled profiling wrote.")
    parser.add_argument("command", choices=("list", "show", "path"),
                        help="list: every profile, newest first; show: print one's summary; "
                             "path: print one's trace file (for Perfetto or chrome://tracing)")
    parser.add_argument("name", nargs="?", help="a profile name or prefix (default: newest)")
    parser.add_argument("--dir", type=Path,
                        help="the profile directory (default: $SDXL_PROFILE_DIR, else "
                             "profiles/ in $SDXL_RUN_DIR, else sdxl-profiles/ in the temp "
                             "directory)")
    args = parser.parse_args(argv)
    directory = args.dir or (Path(os.environ["SDXL_PROFILE_DIR"])
                             if os.environ.get("SDXL_PROFILE_DIR") else default_profile_dir())
    store = TraceStore(directory, keep=10**9)  # reading only: never prunes
    if args.command == "list":
        traces = store.traces()
        if not traces:
            print(f"no profiles in {directory}", file=sys.stderr)
            return 1
        for trace in traces:
            written = datetime.fromtimestamp(trace.written_at, timezone.utc)
            print(f"{trace.name}  {written:%Y-%m-%d %H:%M:%S}Z  {trace.size / 1024:.0f} KiB  "
                  f"{trace.trace}")
        return 0
    try:
        trace = store.find(args.name)
    except LookupError as exc:
        print(exc, file=sys.stderr)
        return 1
    if args.command == "path":
        print(trace.trace)
    else:
        try:
            print(trace.summary.read_text(), end="")
        except OSError as exc:
            print(f"no summary for {trace.name}: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

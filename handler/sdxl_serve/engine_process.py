"""The engine in a process of its own, so it can be replaced by a fresh one at will.

PyTorch services grow in memory over days (allocator fragmentation, caches, leaks in
libraries); only ending the process gives all of it back. TorchServe kills a busy backend
with a 500 for its requests, so we never let TorchServe end ours: its worker process stays
and holds the frontend's socket, and the pipeline lives in an engine process that the
worker replaces between batches (see ``recycling``).

Engine processes are forked by a fork server (``multiprocessing``'s ``forkserver``): a
process started from scratch once per worker that has imported torch, diffusers and this
package and done nothing else. It never touches CUDA or a model, so each engine process
starts as a pristine interpreter, loads the model itself, and gives everything back when it
exits; it only skips the ten seconds of imports a new interpreter would repeat each time.
As with any ``multiprocessing`` child, the parent's main module is imported in the engine
process, so it must do nothing at import (TorchServe's ``model_service_worker.py`` and
pytest's are guarded by ``if __name__ == "__main__"``).

Parent and child talk over a ``multiprocessing`` pipe (pickles; both ends are our code).
Messages, parent to child: ``("start", spec)``, ``("serve", items, profile)``, ``("health",)``,
``("sample",)``, ``("stop",)``; child to parent: ``("ready", info)`` or ``("failed",
message)`` once, then ``("progress", index, event)`` and ``("alive",)`` (a heartbeat, at
most every ``HEARTBEAT_S``, between steps) while serving, ``("busy", seconds, stage)``
before work with no step in it (a profile's ``"stop"`` in its batch, and its ``"write"``
after the batch's answer, before the next message is read), with the seconds it may take,
and ``("alive",)`` after it, and one answer per request. An engine that sends nothing for
``engine_stall_s`` while it owes an answer is taken for hung (a stuck CUDA kernel or driver
call): it is killed and its batch answered ``EngineStalled``; one that said it is busy is
hung only where it also used (almost) no CPU in that time (``BUSY_CPU_SHARE``) or is past
the seconds it gave. Hung or dead in a write, it never read what it was then sent
(``EngineLostBeforeTaking``).
The child dies with the fork server (``PR_SET_PDEATHSIG``), which ends when the worker
ends, so a worker that TorchServe kills leaves no engine holding GPU memory.

Example:
    engine = EngineProcess(EngineSpec(model_dir="build/tiny-sdxl", config={"device": "cpu"}))
    engine.start(); engine.wait_ready()
    replies, stats, gauges = engine.serve([Incoming(b'{"prompt": "x"}')])
    engine.stop()
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.util
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Callable, Mapping, Sequence

from sdxl_serve.cancellation import own_folder
from sdxl_serve.log_streams import split_by_level

log = logging.getLogger(__name__)

# What the fork server imports once (the slow part of starting Python for SDXL), none of
# which initialises CUDA: CUDA must be first touched in the engine process itself. The
# libraries through pipeline_libraries, which keeps their notes about themselves out of
# the model log.
PRELOAD = ("sdxl_serve.pipeline_libraries", "sdxl_serve.engine", "sdxl_serve.service",
           "sdxl_serve.health", "sdxl_serve.engine_process")
_context = None
# The engine's heartbeat while it serves: often enough for a stall deadline of a few
# seconds, rare enough to cost nothing (one small pipe message a second).
HEARTBEAT_S = 1.0
# An engine busy without a heartbeat (a profile's stop and write: torch holds Python's lock
# through seconds of it, 1.3 s for 32 steps of the tiny model on 2 cores, more for SDXL, so
# no heartbeat thread could run) is judged by its CPU time: that work keeps a core busy,
# a hung one (a stuck disk, a stopped process) uses none. A tenth leaves room for a
# machine whose cores it shares with other busy processes.
BUSY_CPU_SHARE = 0.1
# A hang that keeps a core busy (a CUDA synchronize spins by default) must end too: a busy
# engine has at most this many times the profiled call's seconds (or engine_stall_s, if
# more). The stop and the write took 6 times the call (the tiny model on 2 cores; not
# measured on a GPU with SDXL).
BUSY_S_PER_CALL_S = 30
KILL_WAIT_S = 30.0  # for a killed engine process to be gone


# A Unix socket path holds at most 107 bytes. The fork server listens on one in
# multiprocessing's temp dir (below), made the first time it is needed; TorchServe's
# per-server TMPDIRs can be long enough to make that fail ("AF_UNIX path too long").
_MAX_TEMP_DIR_CHARS = 107 - len("/sdxl-mp-4194304/pymp-XXXXXXXX/listener-XXXXXXXX")
# Multiprocessing removes its temp dir (the fork server's socket) only at a clean exit, and
# TorchServe ends a worker with SIGKILL (scaled down, unregistered, stopped, died): each
# worker left one for good. So it goes in a folder named by the worker's pid, and the next
# worker to start its fork server removes those of workers gone.
FORK_SERVER_DIR_PREFIX = "sdxl-mp-"


_fork_server_dir: str | None = None


@contextlib.contextmanager
def fork_server_temp_dir():
    """Have multiprocessing make its temp dir in this process's ``FORK_SERVER_DIR_PREFIX``
    folder, under /tmp when TMPDIR is too long for a socket path; it keeps the dir it made
    for the life of the process."""
    global _fork_server_dir
    saved = tempfile.tempdir
    if _fork_server_dir is None:  # this process's first fork server
        base = tempfile.gettempdir()
        if len(base) > _MAX_TEMP_DIR_CHARS and os.access("/tmp", os.W_OK):
            base = "/tmp"
        _fork_server_dir = own_folder(base, FORK_SERVER_DIR_PREFIX)
        # A clean exit removes it too, after multiprocessing's own dir inside (-100).
        multiprocessing.util.Finalize(None, shutil.rmtree, args=(_fork_server_dir,),
                                      kwargs={"ignore_errors": True}, exitpriority=-101)
    tempfile.tempdir = _fork_server_dir
    try:
        yield
    finally:
        tempfile.tempdir = saved


def fork_server():
    """The multiprocessing context whose fork server starts engine processes.

    The fork server preloads PRELOAD only with a CPU-only torch. With a CUDA build, an
    import there may ask CUDA for its devices (seen on an H200: every engine process then
    failed with "Cannot re-initialize CUDA in forked subprocess"), and what asked cannot be
    pinned down across torch, diffusers and transformers versions; so each engine process
    imports them itself, after the fork, and pays the imports (seconds) at each replacement.
    """
    global _context
    if _context is None:
        import torch

        _context = multiprocessing.get_context("forkserver")
        cpu_only = torch.version.cuda is None and getattr(torch.version, "hip", None) is None
        _context.set_forkserver_preload(list(PRELOAD) if cpu_only else [])
    return _context


class EngineProcessError(RuntimeError):
    """The engine process failed to start, or died while serving."""


class EngineDied(EngineProcessError):
    """The engine process ended under a message (killed, crashed): what it was doing is
    lost, but the same work on a fresh engine process gives the same result."""


class EngineStalled(EngineProcessError):
    """The engine process sent nothing for ``stall_s`` while it owed an answer (between
    two denoising steps, or a whole health check): hung, so it was ended. Not run again: a
    stuck GPU or driver would take the next ``stall_s`` too (unless it was never taken:
    ``EngineStalledBeforeTaking``)."""

    kind = "EngineStalled"
    """The error's ``type`` in the JSON body (nothing acts on it by name)."""

    def __init__(self, pid: int, stall_s: float):
        super().__init__(self.describe(pid, stall_s))
        self.pid = pid
        self.for_client = (f"generation stopped making progress for {stall_s:.0f} s (a stuck "
                           "GPU or driver call?), so the engine process was replaced and the "
                           "request not run again")

    @staticmethod
    def describe(pid: int, stall_s: float) -> str:
        return (f"engine process {pid} sent nothing for {stall_s:.0f} s (engine_stall_s) "
                "while it owed an answer; it was ended")


class EngineLostBeforeTaking(EngineProcessError):
    """The engine process hung or died writing the profile of the batch before (a write
    stuck on a disk, the OOM killer in the trace's export), which it does after that batch's
    answer and before it reads the next message: so it never took what it was sent. That
    work ran nowhere, and runs on a fresh engine process as if sent now, its first run
    (``recycling``)."""

    lost = ""
    """What became of which engine process, for the worker's log line."""


class EngineStalledBeforeTaking(EngineStalled, EngineLostBeforeTaking):
    """Hung writing a profile (``EngineLostBeforeTaking``); ended all the same."""

    def __init__(self, pid: int, stall_s: float):
        super().__init__(pid, stall_s)
        self.lost = f"engine process {pid} hung writing a profile"
        # ``recycling`` runs the request again, so no client of a worker reads this; one
        # that uses EngineProcess alone would, and "not run again" is false for it.
        self.for_client = (f"the engine process hung for {stall_s:.0f} s writing an earlier "
                           "request's profile, before it took this request, so it was "
                           "replaced; this request did not run and may be sent again")

    @staticmethod
    def describe(pid: int, stall_s: float) -> str:
        return (f"engine process {pid} hung writing a profile (no CPU used for "
                f"{stall_s:.0f} s, engine_stall_s, or past its time) before it took what it "
                "was sent; it was ended")


class EngineDiedBeforeTaking(EngineDied, EngineLostBeforeTaking):
    """Died writing a profile (``EngineLostBeforeTaking``)."""

    def __init__(self, died: str):
        super().__init__(f"{died} writing a profile, before it took what it was sent")
        self.lost = f"{died} writing a profile"


@dataclass(frozen=True)
class EngineSpec:
    """Everything a fresh engine process needs to load the same pipeline."""

    model_dir: str
    config: Mapping[str, Any] = field(default_factory=dict)
    """The model config's ``handler:`` section; SDXL_* variables apply in the child too."""
    gpu_id: int | None = None
    model_version: str = ""


class EngineProcess:
    """The parent's handle on one engine process."""

    def __init__(self, spec: EngineSpec, stall_s: float = 0.0):
        self.spec = spec
        self.stall_s = stall_s  # 0: wait for an answer however long it takes
        self.process: multiprocessing.process.BaseProcess | None = None
        self.connection: Connection | None = None
        self.started_at = 0.0  # time.monotonic() at start
        self.info: dict = {}
        self.ended_why: str | None = None  # when this worker killed it (its replacement's log)
        # While the child says it is busy (no heartbeat): its CPU seconds when last judged,
        # and the time.monotonic() past which it is hung all the same.
        self._busy_cpu: float | None = None
        self._busy_until = 0.0
        self._writing = False  # busy writing a profile: it has not read what follows

    @property
    def pid(self) -> int:
        return (self.process.pid or 0) if self.process else 0

    def start(self) -> None:
        """Fork a new engine process; ``wait_ready`` waits for its load and warm-up."""
        context = fork_server()
        try:
            ours, theirs = context.Pipe()
        except OSError as exc:  # out of file descriptors, say: a failure to start, no crash
            raise EngineProcessError(f"could not start an engine process: {exc}") from exc
        # Daemonic: should the worker exit normally, multiprocessing ends it too.
        self.process = context.Process(target=engine_main, args=(theirs,),
                                       name="sdxl-engine", daemon=True)
        try:
            with fork_server_temp_dir():
                self.process.start()
        # EOFError: the fork server ended under the start (its own os.fork() failed: EAGAIN
        # at a container's pid limit, ENOMEM), and the wait for the child's pid read the end
        # of its pipe; the next start makes a fresh fork server.
        except (OSError, EOFError) as exc:
            ours.close()
            why = exc if isinstance(exc, OSError) else (
                "multiprocessing's fork server ended under the start (a fork that failed: "
                "a pid limit, or out of memory)")
            raise EngineProcessError(f"could not start an engine process: {why}") from exc
        finally:
            theirs.close()
        self.connection = ours
        self._busy_cpu = None
        self.started_at = time.monotonic()
        self._send(("start", self.spec))

    def wait_ready(self, timeout: float | None = None) -> dict:
        """Block until the child has loaded and warmed up the pipeline; its ``info``.

        ``timeout`` (None or 0: none) bounds the whole start; past it the child is killed.
        """
        try:
            kind, payload = self._receive(timeout)
        except EngineDied:
            raise
        except EngineProcessError as exc:  # no answer in time: a load or warm-up that hangs
            pid = self.pid
            self.process.kill()  # not `stop`: a hung child never reads its "stop"
            self.stop()
            raise EngineProcessError(
                f"engine process {pid} did not load and warm up the model within "
                f"{timeout:g} s (engine_start_s); it was ended") from exc
        if kind == "failed":
            self.stop()
            raise EngineProcessError(f"the engine process could not load the model: {payload}")
        # Time to READY as the worker sees it: fork, imports, load, warm-up (compile).
        payload["ready_s"] = time.monotonic() - self.started_at
        self.info = payload
        return payload

    def serve(self, items: Sequence, progress: Callable[[int, dict], None] | None = None,
              profile: bool = False):
        """Send one batch; relay progress events; return (replies, stats, gauges).

        ``profile``: run the batch's first pipeline call under torch.profiler (``profiling``).
        """
        self._send(("serve", list(items), profile))
        failed: set[int] = set()  # requests whose progress sink raised: not called again
        with self._answer_owed():
            while True:
                kind, *payload = self._receive(self.stall_s, stall=True)
                if kind == "alive":
                    continue
                if kind == "progress":
                    index = payload[0]
                    if progress is not None and index not in failed:
                        try:
                            progress(index, payload[1])
                        except Exception as exc:  # noqa: BLE001 - one client's stream
                            # Its stream is gone (a closed sender, a broken connection), but
                            # the batch goes on: leaving now would leave this batch's answer
                            # in the pipe for the next batch to read as its own.
                            failed.add(index)
                            log.warning("progress for request %d of the batch failed (%s: "
                                        "%s); no more progress is sent to it", index,
                                        type(exc).__name__, exc)
                    continue
                if kind != "served":
                    raise EngineProcessError(f"engine process {self.pid} answered {kind!r} "
                                             "to a batch")
                return tuple(payload)

    def health(self):
        """Run the deep check in the child; a ``health.HealthResult``."""
        self._send(("health",))
        with self._answer_owed():
            return self._answer("health")

    def sample(self) -> dict[str, float]:
        """GPU gauges measured in the child (empty on CPU)."""
        self._send(("sample",))
        with self._answer_owed():
            return self._answer("sample")

    def _answer(self, expected: str):
        kind, *payload = self._receive(self.stall_s, stall=True)
        while kind == "alive":  # sent while it wrote a profile, before it read this request
            kind, *payload = self._receive(self.stall_s, stall=True)
        if kind != expected:
            raise EngineProcessError(f"engine process {self.pid} answered {kind!r} to "
                                     f"{expected!r}")
        return payload[0]

    @contextlib.contextmanager
    def _answer_owed(self):
        """While the child owes an answer: should we stop reading before it arrives (an
        exception of ours, an interrupt, an answer out of step), the pipe is out of step
        for good, and the next message would take that late answer for its own (another
        batch's images). So the process is ended, and the next use replaces it."""
        try:
            yield
        except EngineDied:
            raise
        except BaseException as exc:
            if self.process is not None and self.process.is_alive():
                why = ("hung" if isinstance(exc, EngineStalled)
                       else "stopped being read before its answer")
                log.error("engine process %d %s; ending it", self.pid, why)
                self.ended_why = f"it {why} and was ended"
                self.process.kill()
                # A process stuck in a GPU driver call may not end even for SIGKILL: the
                # worker goes on (the next use starts a fresh engine) instead of waiting.
                self.process.join(KILL_WAIT_S)
                if self.process.is_alive():
                    log.error("engine process %d still alive %.0f s after SIGKILL", self.pid,
                              KILL_WAIT_S)
            raise

    def alive(self) -> bool:
        return self.process is not None and self.process.is_alive()

    def stop(self, timeout: float = 30.0) -> None:
        """Ask the (idle) child to exit, then make sure it has; safe to call twice.

        One this worker already killed (``ended_why``) and that is still alive is stuck
        in the kernel (a driver call): it is not asked, nor waited for again, where its
        replacement waited ``timeout`` for an answer it could not read and ``KILL_WAIT_S``
        for a second SIGKILL (a minute, on top of the first kill's wait)."""
        if self.process is None or self.connection is None or self.connection.closed:
            return
        killed = self.ended_why is not None
        try:
            if self.alive() and not killed:
                self.connection.send(("stop",))
                self.process.join(timeout)
        except OSError:
            pass
        if self.process.is_alive() and not killed:
            self.process.kill()
            self.process.join(KILL_WAIT_S)  # stuck in a driver call, it may not end at all
        self.connection.close()
        if self.process.is_alive():
            log.warning("engine process %d still alive after SIGKILL (stuck in the kernel?); "
                        "not waited for again", self.pid)
        else:
            log.info("engine process %d ended (exit code %s)", self.pid,
                     self.process.exitcode)

    def _send(self, message: tuple) -> None:
        try:
            self.connection.send(message)
        except OSError as exc:
            raise self._died() from exc

    def _receive(self, timeout: float | None = None, stall: bool = False) -> tuple:
        """The child's next message but ``("busy",)``; ``timeout`` (None or 0: none) bounds
        the wait, and ``stall`` says that passing it means a hung engine (``EngineStalled``)
        unless the child said it is busy and used the CPU meanwhile (``BUSY_CPU_SHARE``)."""
        deadline = time.monotonic() + timeout if timeout else None
        try:
            while True:
                while not self.connection.poll(min(1.0, timeout) if timeout else 1.0):
                    if not self.alive():
                        raise self._died()
                    if deadline is not None and time.monotonic() > deadline:
                        if stall and self._worked(time.monotonic() - deadline + timeout):
                            deadline = time.monotonic() + timeout
                            continue
                        if stall:
                            raise (EngineStalledBeforeTaking if self._writing
                                   else EngineStalled)(self.pid, timeout)
                        raise EngineProcessError(f"engine process {self.pid} gave no answer "
                                                 f"in {timeout:.0f} s")
                message = self.connection.recv()
                if message[0] != "busy":
                    self._busy_cpu = None
                    self._writing = False
                    return message
                self._writing = message[2] == "write"
                self._busy_cpu = self._cpu_seconds()
                self._busy_until = time.monotonic() + max(timeout or 0, message[1])
                deadline = time.monotonic() + timeout if timeout else None
        except (EOFError, OSError) as exc:
            raise self._died() from exc

    def _worked(self, seconds: float) -> bool:
        """Whether the child, busy since it said so and within the time it gave, used at
        least ``BUSY_CPU_SHARE`` of the last ``seconds`` on the CPU (and so is not hung)."""
        if self._busy_cpu is None or time.monotonic() > self._busy_until:
            return False
        now = self._cpu_seconds()
        if now is None:
            return False
        used, self._busy_cpu = now - self._busy_cpu, now
        return used >= BUSY_CPU_SHARE * seconds

    def _cpu_seconds(self) -> float | None:
        """The child's CPU time so far, all its threads (Linux's /proc); None elsewhere, or
        once it is gone: an engine busy without a heartbeat is then judged by the deadline
        alone."""
        try:
            with open(f"/proc/{self.pid}/stat", "rb") as stat:
                # After the command's name in parentheses (which may hold spaces): the
                # state, then fields 4 to 13, then utime and stime in clock ticks.
                fields = stat.read().rsplit(b")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return None

    def _died(self) -> EngineDied:
        """``EngineDiedBeforeTaking`` where it said it was writing a profile, which it does
        after its last answer and before it reads what it is sent next."""
        self.process.join(5)
        died = f"engine process {self.pid} died (exit code {self.process.exitcode})"
        return EngineDiedBeforeTaking(died) if self._writing else EngineDied(died)


# --- The child side. ----------------------------------------------------------------------

def _die_with_parent() -> None:
    """Have the kernel kill us when our parent (the fork server) dies, however it dies."""
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent:  # it died before the line above took effect
        os._exit(1)


def gpu_gauges(device) -> dict[str, float]:
    """GPU memory (torch.cuda) and utilisation (NVML, where installed) of our device.

    Empty on CPU: the gauges are then absent, not zero.
    """
    if device.type != "cuda":
        return {}
    import torch

    index = device.index or 0
    gauges = {
        "sdxl_gpu_memory_allocated_bytes": torch.cuda.memory_allocated(index),
        "sdxl_gpu_memory_reserved_bytes": torch.cuda.memory_reserved(index),
        "sdxl_gpu_memory_total_bytes": torch.cuda.get_device_properties(index).total_memory,
    }
    try:
        import pynvml

        pynvml.nvmlInit()
        # NVML numbers GPUs ignoring CUDA_VISIBLE_DEVICES; the UUID names ours exactly.
        uuid = str(torch.cuda.get_device_properties(index).uuid)
        handle = pynvml.nvmlDeviceGetHandleByUUID(
            uuid if uuid.startswith("GPU-") else "GPU-" + uuid)
        gauges["sdxl_gpu_utilization_ratio"] = \
            pynvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0
    except Exception as exc:  # noqa: BLE001 - no NVML: the gauge is absent
        log.debug("no GPU utilisation from NVML: %s", exc)
    return gauges


def engine_gauges(engine) -> dict[str, float]:
    """Every gauge the engine process measures: GPU ones, and the compiled UNet's."""
    return {**gpu_gauges(engine.device), **engine.speed_gauges()}


@contextlib.contextmanager
def busy(send: Callable[[tuple], None], call_s: float, stage: str, hold_s: float = 0.0):
    """Tell the worker that work with no step in it follows (a profile's ``stage``, its
    ``"stop"`` or ``"write"``, of a call of ``call_s`` seconds), which it may already wait
    on: it judges the engine by its CPU time until the next message
    (``EngineProcess._receive``), for at most ``BUSY_S_PER_CALL_S`` times the call. A
    heartbeat thread cannot cover this: torch holds Python's lock through seconds of it.
    ``hold_s``: a fault to inject (``fault_busy_hold_s``)."""
    with contextlib.suppress(OSError):  # the worker is gone: so is this process, soon
        send(("busy", BUSY_S_PER_CALL_S * call_s, stage))
    if hold_s:
        hold_python_lock(hold_s)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            send(("alive",))


def hold_python_lock(seconds: float) -> None:
    """Keep a core busy for about ``seconds`` in one C call, which holds Python's lock as
    torch's profiler stop does: no other thread of the process runs meanwhile."""
    sample = 1_000_000
    fastest = float("inf")
    for _ in range(3):  # the fastest of three: a sample slowed by another process is not
        started = time.perf_counter()
        sum(range(sample))
        fastest = min(fastest, time.perf_counter() - started)
    sum(range(int(seconds / max(fastest / sample, 1e-12))))


def serve_forever(connection: Connection) -> int:
    """The child's life: load, warm up, report ready, answer messages until told to stop."""
    from sdxl_serve.engine import load_engine
    from sdxl_serve.health import check_pipeline
    from sdxl_serve.profiling import TraceStore, default_profile_dir
    from sdxl_serve.service import GenerationService
    from sdxl_serve.settings import Settings

    # 1. Load and warm up every size bucket before saying ready.
    _, spec = connection.recv()
    try:
        settings = Settings.from_mapping(spec.config)
        engine = load_engine(spec.model_dir, settings, spec.gpu_id)
        warm_up_s = engine.warm_up()
    except Exception as exc:  # noqa: BLE001 - the parent reports it and fails the load
        log.exception("engine process %d could not load the model", os.getpid())
        connection.send(("failed", f"{type(exc).__name__}: {exc}"))
        return 1
    last_sent = [time.monotonic()]

    def send(message: tuple) -> None:
        connection.send(message)
        last_sent[0] = time.monotonic()

    def heartbeat() -> None:
        if time.monotonic() - last_sent[0] >= HEARTBEAT_S:
            send(("alive",))

    service = GenerationService(engine, spec.model_version, heartbeat)
    # Stopping the profiler and writing its profile take seconds with no step between, more
    # than engine_stall_s after a long call: the worker judges us by our CPU time then, and
    # only then (a profiled pipeline call that hangs must still be ended at the deadline).
    traces = TraceStore(settings.profile_dir or default_profile_dir(), settings.profile_keep,
                        defer=True,
                        keep_alive=lambda call_s, stage: busy(send, call_s, stage,
                                                              settings.fault_busy_hold_s))
    traces.remove_unfinished()  # an engine process before us killed while it wrote one
    connection.send(("ready", {"pid": os.getpid(), "warm_up_s": warm_up_s,
                               "warm_up_sizes": settings.warmup_sizes or
                               ((engine.limits.default_size,) * 2,),
                               "default_size": engine.limits.default_size,
                               "limits": asdict(engine.limits),
                               "pipeline_calls": engine.pipeline_calls,
                               "compile": settings.compile,
                               "compiled_buckets": len(engine.compiled_unet.buckets)
                               if engine.compiled_unet else 0,
                               "gauges": engine.speed_gauges(),
                               "device": str(engine.device)}))
    # 2. Serve.
    while True:
        try:
            message = connection.recv()
        except EOFError:
            return 0  # the worker is gone
        kind = message[0]
        if kind == "serve":
            engine.profile_next = traces if len(message) > 2 and message[2] else None
            last_sent[0] = time.monotonic()
            replies, stats = service.serve(
                message[1], lambda index, event: send(("progress", index, event)))
            engine.profile_next = None  # a batch without a pipeline call used none
            for reply in replies:
                reply.headers["X-Worker-Pid"] = str(os.getpid())
            send(("served", replies, stats, engine_gauges(engine)))
            # Written once its request has the reply: a batch or check sent meanwhile waits
            # for it.
            traces.flush()
        elif kind == "health":
            connection.send(("health", check_pipeline(engine)))
        elif kind == "sample":
            connection.send(("sample", engine_gauges(engine)))
        elif kind == "stop":
            return 0


def _release_fork_server() -> None:
    """Close our copy of the fork server's "a client is alive" pipe.

    multiprocessing gives every forked child that pipe's write end, and the fork server
    only exits once all copies are closed. Kept open here, a busy engine would keep the
    fork server (and so itself) alive after the worker died; an engine starts no processes.
    """
    from multiprocessing import forkserver

    server = forkserver._forkserver
    if server._forkserver_alive_fd is not None:
        os.close(server._forkserver_alive_fd)
        server._forkserver_alive_fd = None


def engine_main(connection: Connection) -> None:
    """The engine process's entry point (run by the fork server)."""
    _release_fork_server()
    _die_with_parent()
    # Lines go where the worker's go (TorchServe's model log), marked with our pid; its
    # warnings to stderr, which TorchServe writes at WARN (log_streams).
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    split_by_level(root, f"[engine {os.getpid()}] %(levelname)s %(name)s: %(message)s")
    try:
        # Preloaded by the fork server with a CPU torch; imported here with a CUDA one.
        import sdxl_serve.pipeline_libraries  # noqa: F401
        from diffusers.utils import logging as diffusers_logging
        from tqdm import tqdm
        from transformers.utils import logging as transformers_logging

        # No loading bars in the model log: on stderr, each would be a WARN line there.
        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
        # Even a disabled bar takes tqdm's write lock, made at first use as a
        # multiprocessing RLock: in a process the fork server started, a named semaphore
        # (/dev/shm/sem.mp-*) whose name only a clean exit or multiprocessing's resource
        # tracker removes, so each engine killed (a crash, a stall, a whole process group
        # killed, tracker included) left a file behind. No other process shares our bars.
        tqdm.set_lock(threading.RLock())
        code = serve_forever(connection)
    finally:
        connection.close()
    sys.exit(code)

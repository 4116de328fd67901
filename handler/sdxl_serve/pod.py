"""What Kubernetes runs in a pod: TorchServe under an init, its probes, and the drain before a stop.

- ``start`` runs TorchServe's Java frontend as its one child and stays its parent
  (``serve_java``): it passes the kubelet's SIGTERM (and Ctrl-C) on to Java, and again
  each second until Java has ended, because the JVM can drop a signal that comes while it
  starts; as a container's PID 1 (an entry point without the image's init, tini), it also
  reaps the orphans a killed worker leaves, as tini would (Java reaps only its own
  children). It stops at SIGTERM or Ctrl-C from its first line: PID 1 gets no signal it
  has no handler for. The ``torchserve`` wrapper is not used in a container: it is a
  Python parent that does not pass SIGTERM on, and killing it leaves Java running.
- ``start`` also leaves a watcher behind (reaped by the init): until every model is READY it
  reads TorchServe's logs, and the first failed load prints the worker's exception and
  stops TorchServe, so the container exits non-zero at once instead of TorchServe
  retrying the worker with a growing pause until the startup probe gives up.
- ``live`` passes while the frontend answers ``/ping`` at all. A worker being replaced
  (recycling, a crash TorchServe restarts) makes ``/ping`` say Unhealthy for a while; that is
  no reason to restart the container, so any HTTP answer counts.
- ``ready`` passes when ``/ping`` says Healthy (every model has its workers loaded) and the
  deep health check passes (a real generation, at most ``health_interval_s`` old), or
  requests are queued for the model (the check would only queue behind them); it prints
  the check's answer, so a person can run it too (``--url``, ``--run-dir``).
- ``drain`` (the preStop hook) returns once every request this pod accepted has been answered:
  TorchServe stops at SIGTERM by unregistering its models, which fails whatever is still
  queued or running, so nothing may be left by then. It first lets proxies stop sending
  (``--settle``) only if a ``ready`` has passed since the start: before, the pod was in no
  Service's endpoints.

Token authorization stays on: TorchServe writes random keys to ``key_file.json`` in its
working directory (the run directory) at start. The probes run inside the container and read
them there; an expired key is renewed with the API key (``/token``), as a client would.

Usage: python -m sdxl_serve.pod {start,live,ready,drain} [options] (``--help`` on each)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from http.client import HTTPException
from pathlib import Path
from typing import Mapping, Sequence

from sdxl_serve.cancellation import process_running
from sdxl_serve.contract import CIRCUIT_OPEN
from sdxl_serve.management import (HEALTH_HEADER, HEALTH_VALUE, KEY_UMASK, KeyFile,
                                   KeyRenewalFailed, http, ready_worker_ids, ready_workers,
                                   refusal_text, time_left)
from sdxl_serve.metrics import scraped_max
from sdxl_serve.server import Addresses, LoadWatch, address_setting, java_command, \
    remove_unpacked_archives, seconds, seconds_from_zero, with_archive_code_path

# The barrier of a drain: a request every version of our handler rejects at once (400, no
# prompt) after it has gone through the same queue as real requests. Not rollout.py's
# barrier, a customized describe whose answer names the worker's pid
# (``customized_metadata``): rollout drains one version with however many workers it has
# and must see each worker answer, while a pod runs one worker per version (one per GPU),
# so one answered request per version is enough (``drain``).
_BARRIER_BODY = b"{}"


def dialable(address: str) -> str:
    """An address to connect to: a server bound to all interfaces is reached on loopback."""
    return address.replace("://0.0.0.0", "://127.0.0.1")


class PodServer:
    """The TorchServe of this pod, seen from inside the container.

    Example:
        >>> PodServer(Addresses("http://0.0.0.0:8080", "http://127.0.0.1:8081",
        ...                     "http://0.0.0.0:8082"), "/run/sdxl").inference
        'http://127.0.0.1:8080'
    """

    def __init__(self, addresses: Addresses, run_dir: str | Path):
        self.inference = dialable(addresses.inference)
        self.management = dialable(addresses.management)
        self.metrics = dialable(addresses.metrics)
        self.run_dir = Path(run_dir)
        # Its own TorchServe, on the pod's loopback: never through an egress proxy a cluster
        # sets in the pod's environment (urllib follows HTTP_PROXY for 127.0.0.1 too).
        self.keys = KeyFile(self.run_dir / "key_file.json", self.management, direct=True)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "PodServer":
        env = os.environ if env is None else env
        return cls(Addresses.from_env(env), env.get("SDXL_RUN_DIR") or os.getcwd())

    @property
    def ready_mark(self) -> Path:
        """The file the first passing ``ready`` probe leaves (``mark_ready``)."""
        return self.run_dir / "was-ready"

    def mark_ready(self) -> None:
        """Note that a readiness probe passed: from then on the pod may be in a Service's
        endpoints, and a drain must wait for proxies to take it out (``was_ready``)."""
        self.ready_mark.touch()

    def was_ready(self) -> bool:
        """Whether a ``ready`` probe has passed since this container's start."""
        return self.ready_mark.exists()

    def key(self, kind: str) -> str | None:
        """The current ``kind`` key (inference, management, api); None before the file exists."""
        return self.keys.key(kind)

    def call(self, kind: str, method: str, url: str, body: bytes | None = None,
             timeout: float = 30.0, headers: Mapping[str, str] | None = None
             ) -> tuple[int, dict[str, str], bytes]:
        """A call with the current ``kind`` key, renewed once if TorchServe says it expired."""
        return self.keys.call(method, url, kind, body, headers, timeout)

    def ping(self, timeout: float = 5.0) -> tuple[int, str]:
        """(HTTP status, TorchServe's health word) of ``/ping``; the key renewed if expired."""
        status, _, body = self.call("inference", "GET", f"{self.inference}/ping",
                                    timeout=timeout)
        try:
            return status, json.loads(body).get("status", "")
        except ValueError:
            return status, ""

    def queue(self, model: str, timeout: float = 5.0) -> tuple[int, str, list[str]]:
        """(requests queued, version, ids of the READY workers) of ``model`` (``name`` for its
        default version, or ``name/version``): the queue a request to
        ``/predictions/<model>`` joins."""
        status, _, body = self.call("management", "GET", f"{self.management}/models/{model}",
                                    timeout=timeout)
        if status != 200:
            raise RuntimeError(f"describing {model} failed: {status} {refusal_text(body)}")
        (described,) = json.loads(body)
        return (int(described.get("jobQueueStatus", {}).get("pendingRequests", 0)),
                str(described.get("modelVersion", "")),
                ready_worker_ids(described))

    def model_versions(self, timeout: float = 30.0) -> list[tuple[str, str, int, int]]:
        """(model, version, queued requests, READY workers) for every registered version;
        each call waits at most ``timeout`` s."""
        status, _, body = self.call("management", "GET", f"{self.management}/models",
                                    timeout=timeout)
        if status != 200:
            raise RuntimeError(f"listing models failed: {status} {refusal_text(body)}")
        found = []
        for model in json.loads(body).get("models", []):
            name = model["modelName"]
            status, _, body = self.call("management", "GET",
                                        f"{self.management}/models/{name}/all",
                                        timeout=timeout)
            if status != 200:
                raise RuntimeError(f"describing {name} failed: {status} {refusal_text(body)}")
            for version in json.loads(body):
                queued = version.get("jobQueueStatus", {}).get("pendingRequests", 0)
                found.append((name, version["modelVersion"], int(queued),
                              ready_workers(version)))
        return found


def is_alive(server: PodServer, timeout: float = 5.0) -> bool:
    """True while the frontend answers ``/ping`` with any HTTP status.

    Any answer, even a refused key, shows the frontend's event loop is serving; the key is
    sent when there is one so that probes do not count as client errors.
    """
    try:
        http("GET", f"{server.inference}/ping", server.key("inference"), timeout=timeout,
             direct=True)
    except OSError:
        return False
    return True


def readiness(server: PodServer, timeout: float = 5.0, model: str | None = None
              ) -> tuple[bool, str]:
    """(ready, why): ``/ping`` says Healthy (every model has its minimum workers loaded) and
    the deep health check of ``model`` (SDXL_MODEL_NAME, default sdxl) passes: a real
    generation at most ``health_interval_s`` old (docs/operations.md, "Health and
    readiness"). ``why`` is the deep check's JSON answer when there is one. All of it
    within ``timeout`` s: the kubelet counts a probe that outlasts its ``timeoutSeconds``
    as failed, without the reason.

    A pod with requests queued for ``model`` is ready without a deep check: the check goes
    through that queue like any request, and TorchServe keeps a request whose client gave
    up, so each probe that timed out behind a long batch would leave one more request
    queued (filling ``job_queue_size``, so clients get 503, and inflating the queue depth
    the autoscaler reads). The worker is taking requests; the check runs again once the
    queue is empty, so at most one abandoned check is ever queued. Without a READY worker
    the pod is not ready and nothing is sent.
    """
    model = model or os.environ.get("SDXL_MODEL_NAME", "sdxl")
    deadline = time.monotonic() + timeout
    # The address each step calls, so that a failure names the one that did not answer.
    calling = server.inference
    try:
        status, health = server.ping(time_left(deadline))
        if status != 200 or health != "Healthy":
            why = f"/ping answered {status} {health or '(no status)'}"
            # TorchServe's 400 is its refusal of the key: said as such, it no longer reads
            # as a server that is not healthy when the probe has the wrong run directory.
            if status == 400 and server.key("inference") is None:
                why += (f": no inference key in {server.keys.path} (the server's run "
                        f"directory: --run-dir or SDXL_RUN_DIR)")
            elif status == 400:
                why += (f": TorchServe refused the inference key in {server.keys.path} "
                        f"(a key file of another run of the server?)")
            return False, why
        calling = server.management
        queued, version, workers = server.queue(model, time_left(deadline))
        if not workers:
            # /ping can say Healthy while the only worker is dying at start; a check sent
            # now would wait in the queue for a worker that may never come.
            return False, f"no READY worker for {model} ({queued} request(s) queued)"
        if queued:
            # The circuit breaker's state still shows a broken worker: its gauge is written
            # by the worker's upkeep thread while batches run (metrics_interval_s).
            calling = server.metrics
            _, _, text = http("GET", f"{server.metrics}/metrics", timeout=time_left(deadline),
                              direct=True)
            state = circuit_state(text.decode("utf-8", "replace"), model.split("/")[0],
                                  version, workers)
            if state:
                return False, (f"busy: {queued} request(s) queued for {model}, and its "
                               f"circuit breaker is not closed (sdxl_circuit_state {state:g})")
            return True, (f"busy: {queued} request(s) queued for {model}; deep check "
                          f"skipped (it would wait behind them)")
        calling = server.inference
        status, _, body = server.call("inference", "GET",
                                      f"{server.inference}/predictions/{model}",
                                      timeout=time_left(deadline),
                                      headers={HEALTH_HEADER: HEALTH_VALUE})
    except KeyRenewalFailed as exc:
        return False, str(exc)  # the management API's renewal, not the call it was for
    except (OSError, HTTPException) as exc:
        return False, f"no answer from {calling}: {exc}"
    except (RuntimeError, ValueError, TypeError, AttributeError) as exc:
        return False, str(exc)
    return status == 200, body.decode("utf-8", "replace").strip() or f"status {status}"


def circuit_state(metrics_text: str, model: str, version: str | None,
                  workers: Sequence[str] | None = None) -> float:
    r"""The highest ``sdxl_circuit_state`` of ``model`` at ``version`` (any, when None) in
    Prometheus text, TorchServe's or Triton's (0 closed, 1 half-open, 2 open), among
    ``workers`` (ids; all when None); 0 when none has written one yet. TorchServe serves a
    stopped worker's last values for good: a worker that died with its breaker open,
    replaced under another id, would keep a busy pod out of its Service.

    Example:
        >>> text = ('sdxl_circuit_state{model_name="sdxl",model_version="1.0",'
        ...         'worker="9000",Hostname="h",} 2.0\n')
        >>> circuit_state(text, "sdxl", "1.0"), circuit_state(text, "sdxl", "1.0", ["9001"])
        (2.0, 0.0)
    """
    return scraped_max(metrics_text, "sdxl_circuit_state", model, version, workers) or 0.0


def barrier_shut_out(status: int, body: bytes) -> bool:
    """Whether TorchServe refused the barrier at its queue (503, the queue full).

    Our handler's own 503, an open circuit breaker, answers the barrier once the worker has
    taken it: it went through. (Read as "queue full", a broken idle pod drained until its
    timeout, more than six minutes in the manifests.)

    Example:
        >>> barrier_shut_out(503, b'{"code": 503, "type": "ServiceUnavailableException"}')
        True
        >>> barrier_shut_out(503, b'{"code": 503, "type": "CircuitOpen"}')
        False
        >>> barrier_shut_out(400, b'{"field": "prompt"}')
        False
    """
    if status != 503:
        return False
    try:
        return json.loads(body).get("type") != CIRCUIT_OPEN
    except (ValueError, AttributeError):
        return True


# Rounds in a row that may fail on a connection error before the drain gives up.
DRAIN_TRIES = 3


def _drain_round(server: PodServer, deadline: float) -> tuple[bool, int]:
    """One barrier through each version's queue: (whether every barrier went through,
    requests queued after them). No call outlasts ``deadline`` by more than a second: the
    grace period allows TorchServe's stop only the margin after it."""
    def left() -> float:
        return time_left(deadline, floor=1.0)

    through = True
    for name, version, queued, ready in server.model_versions(min(30.0, left())):
        if not ready and not queued:
            # Nothing accepted and nothing running: no workers (TorchServe would refuse the
            # barrier), or a model still loading (a pod deleted while it starts), whose
            # barrier would wait for the whole load, up to the drain's timeout.
            continue
        status, _, body = server.call("inference", "POST",
                                      f"{server.inference}/predictions/{name}/{version}",
                                      _BARRIER_BODY, timeout=left())
        through = through and not barrier_shut_out(status, body)
    return through, sum(version[2] for version in server.model_versions(min(30.0, left())))


def drain(server: PodServer, settle_s: float = 10.0, timeout_s: float = 400.0,
          poll_s: float = 0.5, linger_s: float = 1.0, log=print) -> bool:
    """Wait until every request the pod accepted has been answered; False on timeout. A
    round whose calls fail is tried again; ``DRAIN_TRIES`` failed rounds in a row raise
    that round's ``OSError`` or ``HTTPException``.

    TorchServe 0.12 shows queued requests (``pendingRequests``) but not the batch a worker
    is running, so queue length alone would let SIGTERM kill a running generation. A worker
    takes jobs from its model version's queue in order and runs one batch at a time, so a
    request sent now is answered only after everything queued or running before it on that
    worker. With one worker per model version (one per GPU, our configuration) an answered
    barrier plus an empty queue proves the version idle. Each round repeats that for every
    version until a round finds nothing queued.

    Args:
        server: this pod's TorchServe.
        settle_s: seconds to wait first, while the endpoint controller and proxies stop
            sending new requests to a pod that is terminating; none for a pod whose
            readiness never passed (``PodServer.was_ready``).
        timeout_s: give up after this long (stay inside terminationGracePeriodSeconds).
        poll_s: pause between rounds.
        linger_s: pause after the last barrier, for the answers of its batch to be written.
        log: where progress lines go.
    """
    deadline = time.monotonic() + timeout_s
    # 1. Requests may still arrive until every proxy has seen this pod leave its endpoints.
    #    A pod never ready was never in them (one deleted while it starts): none can come.
    if server.was_ready():
        log(f"drain: waiting {settle_s:g} s for new requests to stop")
        time.sleep(max(0.0, min(settle_s, deadline - time.monotonic())))
    else:
        log("drain: never ready, so in no Service's endpoints: no settle")
    rounds = failed = 0
    while time.monotonic() < deadline:
        rounds += 1
        try:
            through, queued = _drain_round(server, deadline)
            failed = 0
        except (OSError, HTTPException) as exc:
            # One reset connection or timed-out call must not end the drain (SIGTERM would
            # follow at once, killing what runs); a TorchServe that keeps failing does.
            failed += 1
            if failed >= DRAIN_TRIES:
                raise
            log(f"drain: round {rounds} failed ({exc!r}); trying again")
            time.sleep(poll_s)
            continue
        # 3. Idle when every barrier went through and nothing queued behind them.
        if through and queued == 0:
            time.sleep(linger_s)
            log(f"drain: idle after {rounds} round(s)")
            return True
        log(f"drain: {queued} request(s) still queued")
        time.sleep(poll_s)
    log(f"drain: gave up after {timeout_s:g} s; what still runs is lost at SIGTERM")
    return False


# What stops a start: the kubelet's SIGTERM, a terminal's Ctrl-C.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def start(config: Path, model_store: Path, models: Sequence[str], run_dir: Path,
          start_timeout_s: float = 880.0) -> int:
    """Run TorchServe, with a watcher that ends it if a model fails to load. Returns Java's
    exit status (``serve_java``)."""
    # 1. SIGTERM and Ctrl-C stop the start from here on. A container's PID 1 without an init
    #    gets no signal it has no handler for: a pod deleted now ran on until SIGKILL.
    for stop in STOP_SIGNALS:
        signal.signal(stop, _stopped_before_java)
    # 2. TorchServe's run directory and command.
    run_dir.mkdir(parents=True, exist_ok=True)
    # A container restart keeps the run directory (an emptyDir): the old key file holds
    # dead keys and would fool the probes until the new server writes its own.
    (run_dir / "key_file.json").unlink(missing_ok=True)
    # Likewise the mark of a readiness passed: this container has not been ready yet.
    server = PodServer(Addresses.from_env(), run_dir)
    server.ready_mark.unlink(missing_ok=True)
    if os.environ.get("TEMP"):
        Path(os.environ["TEMP"]).mkdir(parents=True, exist_ok=True)
        # The container's own emptyDir, which a restart keeps as it keeps the run
        # directory: a killed server's unpacked archives would stay in it for good.
        remove_unpacked_archives(os.environ["TEMP"])
    command = java_command(config.resolve(), model_store.resolve(), models)
    # The workers run each archive's own code, not a checkout's handler/ on PYTHONPATH
    # (the launcher drops it the same way).
    env = with_archive_code_path(os.environ)
    os.chdir(run_dir)  # TorchServe writes key_file.json to its working directory
    # TorchServe creates the key file with the umask before it narrows it to 0600.
    os.umask(KEY_UMASK)
    names = [model.split("=", 1)[0] for model in models]
    watch = LoadWatch(Path(os.environ.get("LOG_LOCATION") or run_dir / "logs"))
    return serve_java(command, env, server, watch, names, start_timeout_s)


def _stopped_before_java(signum: int, frame) -> None:
    print(f"start: stopped by {signal.Signals(signum).name} before TorchServe started",
          file=sys.stderr, flush=True)
    raise SystemExit(128 + signum)


# How often a stop signal goes to Java again until it has ended.
RESIGNAL_S = 1.0


def serve_java(command: Sequence[str], env: Mapping[str, str], server: PodServer,
               watch: LoadWatch, models: Sequence[str], start_timeout_s: float) -> int:
    """Run Java as a child and stay its parent: pass SIGTERM and SIGINT on to it, again
    every ``RESIGNAL_S`` until it has ended, and reap every orphan that comes here (as
    PID 1), as tini would. Returns Java's exit status (128 + the signal that ended it).

    Java execed in this process's place (as this did under tini) had the stop signal
    once, and a JVM can drop a SIGTERM that comes while it starts: a pod deleted then ran
    on, serving (once in CI, under load: still 20 s later), where the kubelet waits for
    the grace period before SIGKILL. A second SIGTERM to a JVM already stopping does
    nothing. Java execed as PID 1 dropped a SIGTERM that came before the JVM installed its
    handler, even one left pending, and left the orphans of killed workers as zombies.
    When this process exits as PID 1, the kernel ends every process left in the container,
    workers included.
    """
    java: subprocess.Popen | None = None
    asked: list[int] = []  # the stop signal, once one came; passed on once Java has a pid
    stopping: list[bool] = []

    def pass_on(signum: int, frame) -> None:
        if not asked:
            asked.append(signum)
            if java is not None:
                begin_stop()

    def begin_stop() -> None:
        if stopping or java.returncode is not None:
            return
        stopping.append(True)
        print(f"start: {signal.Signals(asked[0]).name}: stopping TorchServe "
              f"(java {java.pid})", file=sys.stderr, flush=True)
        signal.signal(signal.SIGALRM, signal_again)
        signal.setitimer(signal.ITIMER_REAL, RESIGNAL_S, RESIGNAL_S)
        signal_again()

    def signal_again(*_) -> None:
        if java.returncode is not None:
            return  # reaped: its pid may be another process's by now
        try:
            os.kill(java.pid, asked[0])
        except ProcessLookupError:
            pass  # Java has ended, and this process is about to

    for stop in STOP_SIGNALS:
        signal.signal(stop, pass_on)
    java = subprocess.Popen(command, env=env)
    if asked:  # one came while Java started
        begin_stop()
    try:
        _spawn_start_watch(server, watch, models, start_timeout_s, java.pid)
    except OSError:  # no fork (a pids limit): Java must not outlive this process
        java.kill()
        java.wait()
        raise
    while True:
        pid, status = os.wait()  # the watcher and, as PID 1, any orphan too
        if pid == java.pid:
            java.returncode = code = os.waitstatus_to_exitcode(status)
            signal.setitimer(signal.ITIMER_REAL, 0)
            return code if code >= 0 else 128 - code


def _spawn_start_watch(server: PodServer, watch: LoadWatch, models: Sequence[str],
                       timeout_s: float, frontend: int) -> None:
    """Watch the start of Java (pid ``frontend``) from a grandchild, orphaned at once so
    that the init (tini, or this process as PID 1) reaps it, not this process's wait for
    Java."""
    sys.stdout.flush()
    sys.stderr.flush()
    child = os.fork()
    if child:
        os.waitpid(child, 0)
        return
    try:
        for stop in (*STOP_SIGNALS, signal.SIGALRM):
            signal.signal(stop, signal.SIG_DFL)  # the start's handlers are not the watcher's
        if os.fork() == 0:
            code = 1
            try:
                code = watch_start(server, watch, models, frontend, timeout_s)
            finally:
                os._exit(code)
    finally:
        os._exit(0)


def watch_start(server: PodServer, watch: LoadWatch, models: Sequence[str], frontend: int,
                timeout_s: float = 880.0, poll_s: float = 0.5) -> int:
    """Until every model has a READY worker: on the first failed load, print the worker's
    exception and SIGTERM the frontend, so the container exits non-zero at once.

    TorchServe 0.12 would retry the worker for as long as it runs, with a growing pause,
    and the startup probe would wait out its whole budget (15 minutes) before Kubernetes
    restarts the container. Failing now shows the cause in the container's log and the
    pod's restarts (CrashLoopBackOff) instead. A failure after the start is TorchServe's
    to handle (a worker restart; readiness fails meanwhile).

    Returns:
        0 once ready or when the frontend is gone, 1 after a failed load or a timeout.
    """
    deadline = time.monotonic() + timeout_s
    while process_running(frontend):
        failure = watch.failure()
        if failure:
            print(f"start failed: a model could not load (TorchServe would retry it for as "
                  f"long as it runs); the worker said:\n{failure}\nstopping TorchServe",
                  file=sys.stderr, flush=True)
            os.kill(frontend, signal.SIGTERM)
            return 1
        if all(model_ready(server, name) for name in models):
            return 0
        if time.monotonic() > deadline:
            print(f"start failed: not ready after {timeout_s:g} s; stopping TorchServe",
                  file=sys.stderr, flush=True)
            os.kill(frontend, signal.SIGTERM)
            return 1
        time.sleep(poll_s)
    return 0


def model_ready(server: PodServer, name: str) -> bool:
    """Whether model ``name`` has a READY worker (False while TorchServe starts)."""
    try:
        status, _, body = server.call("management", "GET",
                                      f"{server.management}/models/{name}", timeout=5.0)
        return status == 200 and ready_workers(json.loads(body)) > 0
    except (OSError, HTTPException, ValueError, AttributeError, TypeError):
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdxl_serve.pod",
                                     description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run_dir_default = os.environ.get("SDXL_RUN_DIR") or os.getcwd()
    started = commands.add_parser("start", help="run TorchServe's Java frontend (the "
                                                "container's entry point)")
    started.add_argument("--config", type=Path, default=Path(
        os.environ.get("SDXL_TS_CONFIG", Path(__file__).resolve().parents[2]
                       / "config" / "config.properties")))
    started.add_argument("--model-store", type=Path,
                         default=Path(os.environ.get("SDXL_MODEL_STORE", "model_store")))
    started.add_argument("--models", nargs="*",
                         default=os.environ.get("SDXL_MODELS", "sdxl=sdxl-1.0.mar").split())
    started.add_argument("--run-dir", type=Path, default=Path(run_dir_default))
    # Under the startup probe's 900 s (90 x 10 s): the kubelet's ticker can place the
    # first probe right at the start, so its 90th failure can come at 890 s; the
    # watcher must say why before that restart.
    started.add_argument("--start-timeout", type=seconds, default=880.0,
                         help="seconds until every model is READY, else TorchServe is "
                              "stopped (under the startup probe's budget)")
    for name, text in (("live", "exit 0 while /ping answers at all"),
                       ("ready", "exit 0 when /ping says Healthy and the deep health check "
                                 "passes; prints its answer")):
        probe = commands.add_parser(name, help=text)
        probe.add_argument("--timeout", type=seconds, default=5.0,
                           help="seconds for the whole check, all its calls together (below "
                                "the probe's timeoutSeconds)")
        probe.add_argument("--url", help="inference address (default: $TS_INFERENCE_ADDRESS)")
        probe.add_argument("--management",
                           help="management address, to renew an expired key "
                                "(default: $TS_MANAGEMENT_ADDRESS)")
        probe.add_argument("--run-dir", type=Path,
                           help="TorchServe's directory, where key_file.json is "
                                "(default: $SDXL_RUN_DIR, else here)")
        probe.add_argument("--model", help="model name, or name/version "
                                           "(default: $SDXL_MODEL_NAME, else sdxl)")
    drained = commands.add_parser("drain", help="preStop: wait until no request is left")
    drained.add_argument("--settle", type=seconds_from_zero, default=10.0)
    drained.add_argument("--timeout", type=seconds_from_zero, default=400.0)
    args = parser.parse_args(argv)

    try:
        # Checked before anything starts: a TS_*_ADDRESS that is no http(s)://HOST:PORT was a
        # traceback from the probes and, for `start`, from the start's watcher.
        server = PodServer.from_env()
        # The options by the same rule: `--url 127.0.0.1:8080` was "no answer from
        # 127.0.0.1:8080: <urlopen error unknown url type: 127.0.0.1>".
        for flag in ("--url", "--management"):
            value = getattr(args, flag[2:], None)
            if value is not None:
                address_setting({flag: value}, flag, value)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    if args.command == "start":
        return start(args.config, args.model_store, args.models, args.run_dir,
                     args.start_timeout)
    if args.command in ("live", "ready") and (args.url or args.management or args.run_dir):
        server = PodServer(Addresses(args.url or server.inference,
                                     args.management or server.management, server.metrics),
                           args.run_dir or server.run_dir)
    if args.command == "live":
        return 0 if is_alive(server, args.timeout) else 1
    if args.command == "ready":
        ready, why = readiness(server, args.timeout, args.model)
        print(why, flush=True)
        if ready and not server.was_ready():
            try:
                server.mark_ready()
            except OSError as exc:  # the drain then skips its settle: say so
                print(f"ready: could not note it in {server.ready_mark}: {exc}",
                      file=sys.stderr, flush=True)
        return 0 if ready else 1
    # A drain that gives up or fails still exits 0: the kubelet sends SIGTERM either way,
    # and a failed hook only adds an event.
    try:
        drain(server, args.settle, args.timeout, log=lambda line: print(line, flush=True))
    except (OSError, HTTPException, RuntimeError, ValueError) as exc:
        print(f"drain: failed: {exc!r}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Start, watch and stop a real Triton Inference Server on our model repository (triton-models/).

The server is the ``tritonserver`` binary that the ``nvidia-pytriton`` wheel bundles (with
the python backend and one backend stub per Python version); we use the binary alone, not
the PyTriton API. Laid out as Triton expects it (docs/triton.md, "Facts"):

1. the wheel's ``pytriton/tritonserver/`` is copied into the server's run directory, and the
   backend stub of the running Python goes into its ``backends/python/`` (the wheel ships
   the stubs apart);
2. ``LD_LIBRARY_PATH`` names the wheel's ``nvidia_pytriton.libs`` (the binary's RPATH is
   relative to where the wheel put it) and the directory of our ``libpython3.X.so``, which
   the stub links;
3. the venv's ``bin`` comes first on ``PATH``: the stub's embedded Python then finds the
   venv (``pyvenv.cfg``), so ``model.py`` imports torch and sdxl_serve from it;
4. but the Python on that ``PATH`` is a small venv of the run directory's, layered on ours:
   numpy 1.26 (``<venv>/triton-stub-site``, requirements-triton-stub.txt) first, then our
   venv's site-packages. The stub of Triton 2.51 reads numpy's dtype structure with numpy
   1's layout: under numpy 2 every BYTES input arrives as its first byte repeated and the
   stub dies (checked). It runs Python with PYTHON* variables ignored, so PYTHONPATH cannot
   do this. Engine processes start from the same Python; everything but numpy comes from
   our venv, as under TorchServe.

The server runs in its own session; ``stop`` sends SIGTERM (Triton then runs each model's
``finalize``) and kills the whole process group (backend stubs, fork servers, engine
processes) if anything of it is still there after the grace period.

Example:
    server = TritonServerProcess("build/triton-run", env={"SDXL_MODEL_DIR": "build/tiny-sdxl"})
    server.start(); server.wait_ready("sdxl"); server.stop()
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.error
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

from sdxl_serve.cancellation import process_running
from sdxl_serve.circuit import HALF_OPEN, OPEN, STATES as CIRCUIT_STATES
from sdxl_serve.management import DIRECT, http
from sdxl_serve.pod import circuit_state
from sdxl_serve.server import (REPO, ServerError, StartCancelled, ended_with_this_process,
                               free_port, last_lines, port_setting)
from sdxl_serve.settings import absolute_path_overrides

MODEL_REPOSITORY = REPO / "triton-models"
RESTRICTED_APIS = "model-repository,shared-memory,trace,logging"
# How long Triton has after SIGTERM (it waits for in-flight requests, runs `finalize`,
# which stops the engine process) before the process group is killed.
STOP_GRACE_S = 30.0
# The shared memory through which Triton's python backend and a stub pass tensors: one
# region per stub, named on the stub's command line, in /dev/shm (shm_open's directory).
SHM_REGION = re.compile(r"triton_python_backend_shm_region_[\w-]+")
SHM_DIR = Path("/dev/shm")
# The header the restricted APIs need; its value is drawn at each start (restricted_arguments).
ADMIN_HEADER = "sdxl-admin-key"
# Triton's own wait at its stop for models to unload (its --exit-timeout-secs default).
EXIT_TIMEOUT_S = 30
# tritonserver.log past this is moved to tritonserver.log.1 (the one before is dropped).
LOG_ROLL_BYTES = 64 * 1024 * 1024
# After a roll that failed (a full disk), the next try waits this long: each try writes a
# copy until the disk refuses, taking its last bytes from Triton and everything beside it.
LOG_ROLL_RETRY_S = 60.0


@dataclass(frozen=True)
class TritonPorts:
    """Where Triton's three endpoints listen, on loopback unless ``host`` says otherwise."""

    http: int
    grpc: int
    metrics: int
    host: str = "127.0.0.1"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "TritonPorts":
        """``SDXL_TRITON_HTTP_PORT``, ``_GRPC_PORT``, ``_METRICS_PORT`` (Triton's defaults,
        8000 to 8002, when unset).

        Raises:
            ValueError: a setting that is no port, named with its value.
        """
        env = os.environ if env is None else env
        return cls(*(port_setting(env, f"SDXL_TRITON_{name}_PORT") or default
                     for name, default in (("HTTP", 8000), ("GRPC", 8001), ("METRICS", 8002))))

    @classmethod
    def free(cls) -> "TritonPorts":
        """Three free loopback ports (tests, benchmarks)."""
        return cls(free_port(), free_port(), free_port())

    def listen_settings(self) -> list[tuple[str, str, int]]:
        """Each ``SDXL_TRITON_*_PORT`` setting, as (what to call it, host, port)."""
        return [(f"SDXL_TRITON_{name}_PORT {port}", self.host, port)
                for name, port in (("HTTP", self.http), ("GRPC", self.grpc),
                                   ("METRICS", self.metrics))]

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics}/metrics"


def bundled_server() -> tuple[Path, Path]:
    """(the wheel's ``tritonserver`` directory, its shared libraries' directory)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ServerError("Triton is not installed: `make venv` installs nvidia-pytriton "
                          "(requirements-triton.txt)")
    package = Path(list(spec.submodule_search_locations)[0])
    return package / "tritonserver", package.parent / "nvidia_pytriton.libs"


def lay_out_server(target: Path) -> Path:
    """Copy the bundled server to ``target`` with this Python's backend stub in place.

    A copy made from another install (``nvidia-pytriton`` upgraded, another venv) is
    replaced: it would serve the old binary and backends, the stub alone renewed."""
    source, _ = bundled_server()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = source / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise ServerError(f"the bundled Triton has no python backend stub for Python {version}")
    made_from = f"{source}\n{(source / 'bin' / 'tritonserver').stat().st_mtime_ns}\n"
    stamp = target / ".sdxl-laid-out-from"
    if (target / "bin" / "tritonserver").exists() and \
            (not stamp.exists() or stamp.read_text() != made_from):
        shutil.rmtree(target)
    if not (target / "bin" / "tritonserver").exists():
        try:
            shutil.copytree(source, target, ignore=shutil.ignore_patterns(
                "python_backend_stubs", "__pycache__"), dirs_exist_ok=True)
            stamp.write_text(made_from)
        except OSError:
            # Cut short (a full disk): what was copied would hold the disk's last bytes
            # from everything beside it until the next start.
            shutil.rmtree(target, ignore_errors=True)
            raise
    shutil.copy2(stub, target / "backends" / "python" / stub.name)
    return target


def stub_site() -> Path:
    """Where ``make venv`` installs the numpy the backend stub can read (see above)."""
    site = Path(sys.prefix) / "triton-stub-site"
    if not (site / "numpy").is_dir():
        raise ServerError(f"{site} is missing: `make venv` installs numpy 1.26 there "
                          "(requirements-triton-stub.txt) for Triton's backend stub")
    return site


def layered_venv(target: Path) -> Path:
    """A venv at ``target`` that sees numpy 1.26 first, then everything of ours."""
    python = target / "bin" / "python3"
    config = target / "pyvenv.cfg"
    home = f"home = {Path(sys._base_executable).parent}\n"  # the interpreter it runs
    if python.exists() and (not config.exists() or home not in config.read_text()):
        shutil.rmtree(target)  # made by another Python
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(target)],
                       check=True)
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; "
                                "print(sysconfig.get_paths()['purelib'])"], check=True,
                               capture_output=True, text=True).stdout.strip())
    ours = sysconfig.get_paths()["purelib"]
    # The sdxl_serve this launcher runs comes before the venv's: an editable install names
    # one checkout, and another checkout sharing the venv served that one's model code.
    package = Path(__file__).resolve().parents[1]
    # A plain line adds a directory; an import line runs, so our site-packages' own .pth
    # files (the editable sdxl_serve) are read too.
    (site / "sdxl-triton.pth").write_text(
        f"{stub_site()}\n{package}\nimport site; site.addsitedir({ours!r})\n")
    return target


def library_path() -> str:
    """``LD_LIBRARY_PATH`` for the binary and the stub: the wheel's libraries and the
    directory of this Python's ``libpython`` (absent for a static Python: then the system's
    ``libpython3.X`` package must provide it)."""
    _, libs = bundled_server()
    paths = [str(libs)]
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir and sysconfig.get_config_var("LDLIBRARY") and \
            (Path(libdir) / sysconfig.get_config_var("LDLIBRARY")).exists():
        paths.append(libdir)
    if os.environ.get("LD_LIBRARY_PATH"):
        paths.append(os.environ["LD_LIBRARY_PATH"])
    return os.pathsep.join(paths)


def own_run_dir(run_dir: Path) -> None:
    """Make ``run_dir`` ours alone (0700), or refuse one that is not ours: its default name
    in the temp directory is predictable, and the server binary, the Python and the
    libraries run from it are taken as they are found there."""
    if run_dir.is_symlink():  # planted at the predictable name, to a directory of ours
        raise ServerError(f"{run_dir} is a symbolic link: Triton would be laid out, and "
                          f"its files replaced, wherever it points; choose another with "
                          f"--run-dir")
    try:
        run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:  # a file there, a parent we may not write: a traceback before
        raise ServerError(f"{run_dir} cannot be Triton's run directory: "
                          f"{exc.strerror or exc}; choose another with --run-dir") from None
    owner = run_dir.lstat().st_uid
    if owner != os.getuid():
        raise ServerError(f"{run_dir} belongs to another user (uid {owner}): Triton would "
                          f"run the server and the Python found in it; choose another "
                          f"with --run-dir")
    os.chmod(run_dir, 0o700)


class TritonServerProcess:
    """One ``tritonserver`` with its own run directory (server copy, log, temp) and ports."""

    def __init__(self, run_dir: str | Path, model_repository: str | Path = MODEL_REPOSITORY,
                 ports: TritonPorts | None = None, env: Mapping[str, str] | None = None,
                 models: list[str] | None = None,
                 report: Callable[[str], None] | None = None):
        self.models = list(models or [])
        """Load only these models of the repository (all of them when empty)."""
        self.given_run_dir = Path(run_dir).absolute()  # checked as given: not resolved
        self.run_dir = self.given_run_dir.resolve()
        self.model_repository = Path(model_repository).resolve()
        self.ports = ports or TritonPorts.from_env()
        self.extra_env = dict(env or {})
        self.process: subprocess.Popen | None = None
        self.laid_out = False
        self.log_path = self.run_dir / "tritonserver.log"
        self.tmp_dir = self.run_dir / "tmp"
        self.shm_regions: set[str] = set()
        """The stubs' shared-memory regions seen so far (``stop`` removes what is left)."""
        self.stubs: dict[int, str] = {}
        """Each backend stub seen running, by pid: the model it serves."""
        self.dead_stubs: dict[int, str] = {}
        """The stubs that died while Triton ran (their models Triton cannot unload)."""
        self.reloading: dict[str, threading.Thread] = {}
        self.report = report or to_stderr
        """Where the lines about dead stubs go (the launcher's stderr by default)."""
        self.admin_key = ""
        self.stopping = False
        self.log_roll_bytes = LOG_ROLL_BYTES
        self.log_roll_retry_s = LOG_ROLL_RETRY_S
        self.log_roll_failed_at: float | None = None
        """When the last roll failed (monotonic), until one succeeds."""

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            "LD_LIBRARY_PATH": library_path(),
            # The stub's embedded Python takes the venv from the first python on PATH.
            "PATH": str(self.run_dir / "python" / "bin") + os.pathsep + env.get("PATH", ""),
            "TMPDIR": str(self.tmp_dir),
        })
        env.update(self.extra_env)
        return absolute_path_overrides(env)  # Triton runs in the run directory

    def command(self) -> list[str]:
        server = self.run_dir / "tritonserver"
        host = self.ports.host
        return [str(server / "bin" / "tritonserver"),
                f"--model-repository={self.model_repository}",
                f"--backend-directory={server / 'backends'}",
                f"--cache-directory={server / 'caches'}",
                f"--http-address={host}", f"--http-port={self.ports.http}",
                f"--grpc-address={host}", f"--grpc-port={self.ports.grpc}",
                f"--metrics-address={host}", f"--metrics-port={self.ports.metrics}",
                "--allow-metrics=true", "--allow-cpu-metrics=true",
                "--log-verbose=0", *self.restricted_arguments()] + self.control_arguments()

    def restricted_arguments(self) -> list[str]:
        """Refuse the APIs that change the server (load and unload models, register shared
        memory, change tracing and logging): they need a header whose value is drawn at
        each start and written nowhere but on Triton's command line, which every local
        user can read (docs/triton.md: with it they can load a model that runs their code);
        this object holds it, to load a model again whose stub died. Inference, health,
        metadata and statistics stay open, on loopback like TorchServe's management API."""
        self.admin_key = secrets.token_hex(16)
        key = f"{ADMIN_HEADER}={self.admin_key}"
        return [f"--http-restricted-api={RESTRICTED_APIS}:{key}",
                f"--grpc-restricted-protocol={RESTRICTED_APIS}:{key}"]

    def control_arguments(self) -> list[str]:
        """Every model of the repository, or the ones asked for. Explicit mode, so that a
        model whose stub died can be loaded again (``revive_dead_stubs``); no client can
        load or unload one (the API is refused without the key)."""
        return (["--model-control-mode=explicit"] +
                [f"--load-model={model}" for model in self.models or ["*"]])

    def lay_out(self) -> None:
        """Make the run directory and lay out the server and its Python there, once: a
        launcher says it starts Triton only after this (a full disk said so first).

        Raises:
            ServerError: the run directory cannot be ours, or the layout failed (a full
                disk, a Triton running from it), in one line.
        """
        if self.laid_out:
            return
        own_run_dir(self.given_run_dir)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        try:
            lay_out_server(self.run_dir / "tritonserver")
            layered_venv(self.run_dir / "python")
        except OSError as exc:
            # "Text file busy" is a Triton running from this directory; anything else (a
            # full disk, a quota) is said as it is, where it asked after a running Triton.
            hint = ("is a Triton running from it? Stop it, or choose another --run-dir"
                    if exc.errno == errno.ETXTBSY else
                    "free space there, or choose another --run-dir")
            # A copy of the tree says each file it could not copy: the first is the reason
            # (a full disk listed every file left, in one line of kilobytes).
            reason = exc.args[0][0][2] if isinstance(exc, shutil.Error) else exc
            raise ServerError(f"could not lay out Triton in {self.run_dir}: {reason}; "
                              f"{hint}") from exc
        self.laid_out = True

    def start(self) -> None:
        """Lay out the server (``lay_out``, unless done) and start it in a process session
        of its own, once.

        Raises:
            ServerError: this object started a Triton already, or the layout's. A second
                start skipped the layout's checks (``laid_out``) and took ``process`` from
                the first Triton, which ``stop`` then never ended; and what one run leaves
                (its stubs, ``stopping``) would mislead the next.
        """
        if self.process is not None:
            raise ServerError(f"this TritonServerProcess started tritonserver already (pid "
                              f"{self.process.pid}); create a new one to start another")
        self.lay_out()
        self.roll_log()
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(self.command(), cwd=self.run_dir, env=self.env,
                                        stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True,
                                        preexec_fn=ended_with_this_process())
        log.close()

    def ready(self, model: str | None = None) -> bool:
        path = f"/v2/models/{model}/ready" if model else "/v2/health/ready"
        try:
            # Straight to it: through an egress proxy (HTTP_PROXY, which urllib follows for
            # 127.0.0.1 too) a server the proxy cannot reach was never READY.
            with DIRECT.open(self.ports.http_url + path, timeout=5) as reply:
                return reply.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, model: str | None = None, timeout: float = 240.0,
                   stop: threading.Event | None = None) -> None:
        """Wait for the server (and ``model``, if given) to be ready.

        Raises:
            StartCancelled: ``stop`` was set.
            ServerError: Triton exited (a model that fails to load ends it), or was not
                ready within ``timeout``; with the end of its log.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if stop is not None and stop.is_set():
                raise StartCancelled("stopped before the model was ready")
            if self.process is not None and self.process.poll() is not None:
                raise ServerError(f"tritonserver exited with {self.process.returncode}; see "
                                  f"{self.log_path}\n{self.tail()}")
            if self.ready(model):
                self.note_stubs()
                return
            time.sleep(0.25)
        raise ServerError(f"tritonserver not ready after {timeout:.0f} s; see "
                          f"{self.log_path}\n{self.tail()}")

    def group_pids(self) -> list[int]:
        """Every live process of the server's process group (server, stubs, engines)."""
        if self.process is None:
            return []
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if os.getpgid(int(entry.name)) == self.process.pid and \
                            not _zombie(int(entry.name)):
                        pids.append(int(entry.name))
                except (ProcessLookupError, PermissionError):
                    continue
        return sorted(pids)

    def note_stubs(self) -> None:
        """Remember each backend stub now running: its model, its shared-memory region."""
        for pid in self.group_pids():
            model = stub_model(pid)
            if model is not None:
                self.stubs[pid] = model
                self.shm_regions.update(SHM_REGION.findall(command_line(pid)))

    def upkeep(self) -> None:
        """What a launcher does every second while Triton serves: load a model again whose
        stub died, and roll the log."""
        self.revive_dead_stubs()
        self.roll_log()

    def revive_dead_stubs(self) -> None:
        """Load each model again whose backend stub has died (killed, out of memory).

        Triton 2.51 does not start a dead stub again: every request to its model fails
        while Triton and the model still say ready. Loading the model again through the
        repository API starts a new stub (and engine process); Triton swaps it in once it
        is ready. Cheap enough for every second: a look at each known stub's /proc entry.
        The load runs in a thread (a real model takes minutes to load), one per model.
        """
        if self.process is None or self.process.poll() is not None:
            return  # Triton itself ended: its stubs with it, and the launcher says so
        for pid, model in list(self.stubs.items()):
            if process_running(pid):
                continue
            del self.stubs[pid]
            self.dead_stubs[pid] = model
            if model in self.reloading and self.reloading[model].is_alive():
                continue
            self.report(f"warning: Triton's backend stub of model {model} (pid {pid}) died "
                        f"(killed, out of memory, or crashed) with its engine process: the "
                        f"requests it held failed with 500 \"Stub process '...' is not "
                        f"healthy\"; loading {model} again (until then it is not ready, and "
                        f"requests to it fail)")
            self.reloading[model] = threading.Thread(target=self._reload, args=(model,),
                                                     name=f"reload {model}", daemon=True)
            self.reloading[model].start()

    def _reload(self, model: str) -> None:
        """Unload ``model``, then load it. A load alone of an unchanged model keeps its
        instances, the dead stub's too (Triton 2.51, measured); the unload returns at once
        (Triton never finishes it: the dead stub's requests stay counted) and takes the
        model out of service, so its readiness fails until the new stub is ready."""
        started = time.monotonic()
        for action in ("unload", "load"):
            try:
                status, _, body = http("POST", f"{self.ports.http_url}/v2/repository/models/"
                                       f"{model}/{action}", body=b"", timeout=3600.0,
                                       headers={ADMIN_HEADER: self.admin_key},
                                       direct=True)  # its own Triton: no proxy sees the key
            except OSError as exc:
                status, body = 0, str(exc).encode()
            if status != 200:
                if not self.stopping:  # a stop ends the load: nothing to say then
                    self.report(f"warning: Triton could not {action} model {model} "
                                f"({status}: {body.decode(errors='replace')[:300]}): it is "
                                f"not served until Triton is restarted; see {self.log_path}")
                return
        self.note_stubs()
        self.report(f"model {model} serves again: loaded in "
                    f"{time.monotonic() - started:.1f} s")

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM (models finalize), then SIGKILL to the whole group if anything is left;
        then remove the stubs' shared memory that is left.

        Triton removes a region when it stops its stub. One whose stub died, or that was
        running when Triton crashed or was killed, stayed in /dev/shm: 1 MiB or more each
        (it grows with the largest request and never shrinks), memory held until reboot.
        """
        if self.process is None:
            return
        self.stopping = True
        # Also a stub that died since the last upkeep, or with no upkeep at all.
        self.dead_stubs.update({pid: model for pid, model in self.stubs.items()
                                if not process_running(pid)})
        self.note_stubs()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            if self.dead_stubs:
                self._end_after_dead_stub(grace_s)
            try:
                self.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                pass
        deadline = time.monotonic() + 10
        while self.group_pids() and time.monotonic() < deadline:
            time.sleep(0.2)  # stubs and engines exit right after the server
        if self.group_pids():
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.process.poll() is None:
            self.process.wait(10)
        for name in self.shm_regions:
            (SHM_DIR / name).unlink(missing_ok=True)

    def _end_after_dead_stub(self, grace_s: float) -> None:
        """A model whose stub died is one Triton cannot unload once a request reached it:
        its stop would wait out its whole exit timeout and exit 1. Once every stub still
        alive has stopped (their models' ``finalize`` ran, their requests answered), nothing
        is left to wait for: Triton is ended then."""
        models = ", ".join(sorted(set(self.dead_stubs.values())))
        self.report(f"a backend stub of model {models} died while Triton ran: Triton cannot "
                    f"unload that model and would wait out its {EXIT_TIMEOUT_S} s exit "
                    f"timeout; it is ended once its other stubs have stopped")
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and self.process.poll() is None:
            if not any(stub_model(pid) for pid in self.group_pids()):
                try:
                    # A Triton that can stop ends about 1 s after its last stub (measured):
                    # one no request reached the dead stub's model of.
                    self.process.wait(5)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                return
            time.sleep(0.2)

    def roll_log(self) -> None:
        """Move ``tritonserver.log`` past ``log_roll_bytes`` to ``tritonserver.log.1``.

        Triton, its stubs and the engine processes all write to the one file descriptor
        they were started with, which no signal makes them reopen: the file is copied, then
        emptied in place (it is open for appending, so each next line goes to its new end).
        A line written between the two is lost. Cheap enough for every second: a stat.

        A copy that fails (a full disk) keeps the log whole and ``tritonserver.log.1`` as
        it was, says so once and is tried again after ``log_roll_retry_s``: it ended the
        launcher's upkeep with a traceback, and Triton was stopped with it.
        """
        if self.log_roll_failed_at is not None and \
                time.monotonic() - self.log_roll_failed_at < self.log_roll_retry_s:
            return
        rolled = self.log_path.with_name(self.log_path.name + ".1")
        # Copied beside it, then renamed: a copy cut short must not cost the one before.
        partial = self.log_path.with_name(self.log_path.name + ".1.partial")
        try:
            if self.log_path.stat().st_size <= self.log_roll_bytes:
                return
            shutil.copyfile(self.log_path, partial)
            os.replace(partial, rolled)
            os.truncate(self.log_path, 0)
        except FileNotFoundError:
            return
        except OSError as exc:
            partial.unlink(missing_ok=True)  # the disk's last bytes, given back
            if self.log_roll_failed_at is None:
                self.report(f"warning: {self.log_path} is past {self.log_roll_bytes} bytes "
                            f"and could not be rolled to {rolled.name} "
                            f"({exc.strerror or exc}): it is kept whole and grows; tried "
                            f"again every {self.log_roll_retry_s:.0f} s")
            self.log_roll_failed_at = time.monotonic()
            return
        if self.log_roll_failed_at is not None:
            self.report(f"{self.log_path} rolled to {rolled.name} again")
            self.log_roll_failed_at = None

    def tail(self, lines: int = 40) -> str:
        return "\n".join(last_lines(self.log_path, lines))

    def metadata(self) -> dict:
        with DIRECT.open(self.ports.http_url + "/v2", timeout=5) as reply:
            return json.loads(reply.read())


def _arguments(pid: int) -> list[bytes]:
    """A process's arguments as /proc lists them (the last one empty); none once it is gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


def command_line(pid: int) -> str:
    """A process's command line, spaces between arguments; empty once it is gone."""
    return b" ".join(_arguments(pid)).decode()


def model_unready(ports: TritonPorts, model: str, timeout: float = 5.0) -> str | None:
    """Why ``model`` should get no traffic now, or None when it should.

    Triton's own readiness (``/v2/models/<model>/ready``) stays 200 while our circuit
    breaker is open and every request is a 503: the python backend gives a model no way to
    say otherwise. So this asks Triton first, then reads the breaker's gauge,
    ``sdxl_circuit_state``, on Triton's ``/metrics``: ready only while it is closed (0),
    as TorchServe's deep health check fails readiness while it is open.
    """
    try:
        status, _, _ = http("GET", f"{ports.http_url}/v2/models/{model}/ready",
                            timeout=timeout, direct=True)
        if status != 200:
            return f"Triton says model {model} is not ready ({status})"
        status, _, text = http("GET", ports.metrics_url, timeout=timeout, direct=True)
    except OSError as exc:
        return f"Triton does not answer at {ports.http_url} or {ports.metrics_url}: {exc}"
    if status != 200:
        return f"Triton's metrics at {ports.metrics_url} answer {status}"
    # None written yet is closed: the model's upkeep writes it within metrics_interval_s.
    state = CIRCUIT_STATES[int(circuit_state(text.decode(errors="replace"), model, None))]
    if state == OPEN:
        return (f"model {model}'s circuit breaker is open: its requests are refused with 503 "
                f"until a health check passes")
    if state == HALF_OPEN:
        return (f"model {model}'s circuit breaker is half-open: one trial generation decides "
                f"whether it serves again")
    return None


def to_stderr(line: str) -> None:
    """Print to stderr, unless it is gone (a closed terminal): a stop must still happen."""
    with contextlib.suppress(OSError):
        print(line, file=sys.stderr, flush=True)


def stub_model(pid: int) -> str | None:
    """The model a python backend stub serves (from its ``model.py`` path); None for a
    process that is no stub."""
    arguments = _arguments(pid)
    if len(arguments) < 2 or not arguments[0].endswith(b"triton_python_backend_stub"):
        return None
    # <repository>/<model>/<version>/model.py
    return Path(os.fsdecode(arguments[1])).parents[1].name


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True

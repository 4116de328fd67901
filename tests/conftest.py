"""Fixtures shared by the three tiers: the tiny model, a loaded engine, an archive, a server.

Everything is real: the tiny SDXL is built from diffusers classes, the server is a real
TorchServe process on free loopback ports with its own run and temp directories, always
stopped (Java included) when the session ends.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

# One torch thread in every process the tests start (this one, TorchServe's workers, engine
# processes, Triton's stubs: they inherit it), unless the caller set OMP_NUM_THREADS. The
# suite often has two processes generating at once on a 2-core machine, and so does CI
# running beside other work. Measured here, two processes generating side by side: 0.45
# light requests/s each with 2 OpenMP threads (spinning threads taking the cores from each
# other), 2.6 each with 1; alone, 2 threads did 3.6 and 1 thread 2.4. Read by torch's
# OpenMP when torch is first imported, so it is set before anything imports torch.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# This checkout's code, as the scripts do (test_layout.py): not the checkout a shared venv's
# editable install names.
sys.path[:0] = [str(REPO / "handler"), str(REPO / "jobs"), str(REPO / "scripts")]

import leak_check  # noqa: E402
from full_disk import mounted_full_disk  # noqa: E402
from lifetimes import started_and_ready  # noqa: E402
from sdxl_serve.server import Addresses, TorchServeProcess  # noqa: E402


# --- Nothing left behind: processes and files (leak_check.py, docs/testing.md). -------------

LEAK_STATE = pytest.StashKey[dict]()


def pytest_sessionstart(session):
    session.config.stash[LEAK_STATE] = leak_check.begin(REPO)
    # A shell starts a command put in the background (`make test &`, a CI runner's job)
    # with SIGINT ignored, and every child inherits that through exec: the tests that press
    # Ctrl-C on a script (an interrupted rollout) would see it ignored. Caught here, SIGINT
    # is back to its default in each child.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_sessionfinish(session, exitstatus):
    state = session.config.stash.get(LEAK_STATE, None)
    if state is None:
        return
    problems = leak_check.finish(state)
    if problems:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        for line in ["", "leak check FAILED:", *problems]:
            reporter.write_line(line, red=True) if reporter else print(line)
        if session.exitstatus == 0:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


# Few steps and the tiny size keep a generation well under a second on a CPU core.
FAST = {"num_inference_steps": 3}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from sdxl_serve.tiny_model import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny") / "tiny-sdxl")


@pytest.fixture(scope="session")
def compile_cache_dir(tmp_path_factory) -> Path:
    """One torch.compile cache for the session's compile-on tests (docs/speed.md): the first
    test to use it compiles (minutes on a busy CPU), the later ones start from it."""
    return tmp_path_factory.mktemp("compile-cache")


@pytest.fixture(scope="session")
def engine(tiny_model_dir):
    from sdxl_serve.engine import load_engine
    from sdxl_serve.settings import Settings

    return load_engine(tiny_model_dir, Settings.from_mapping({"device": "cpu"}, env={}))


@pytest.fixture(scope="session")
def model_store(tmp_path_factory, tiny_model_dir) -> Path:
    """A model store with sdxl-1.0.mar built by the real build script around the archiver."""
    from build_archive import build_archive

    store = tmp_path_factory.mktemp("model_store")
    build_archive("sdxl", "1.0", None, store, tiny_model=tiny_model_dir)
    return store


def start_server(run_dir: Path, model_store: Path, models: dict[str, str],
                 env: dict[str, str] | None = None) -> TorchServeProcess:
    return started_and_ready(TorchServeProcess(run_dir, model_store, models, Addresses.free(),
                                               env=env), models, 240)


@pytest.fixture(scope="session")
def server(tmp_path_factory, model_store):
    """A real TorchServe serving sdxl-1.0.mar as model `sdxl`."""
    running = start_server(tmp_path_factory.mktemp("run"), model_store,
                           {"sdxl": "sdxl-1.0.mar"})
    yield running
    running.stop()


@pytest.fixture
def full_disk(tmp_path):
    """A real filesystem that fills: a 4 MiB tmpfs (``full_disk.fill()`` takes its last
    byte), unmounted after the test."""
    yield from mounted_full_disk(tmp_path / "full-disk", "4m")


@pytest.fixture(scope="session")
def unloadable_model_store(tmp_path_factory, tiny_model_dir) -> tuple[Path, Path]:
    """(store, weights dir) where sdxl-1.0.mar serves a weights directory removed after the
    archive was built: the archive is fine, its model cannot load (issue 14's case)."""
    import shutil

    from build_archive import build_archive

    base = tmp_path_factory.mktemp("unloadable")
    weights = base / "weights"
    shutil.copytree(tiny_model_dir, weights)
    build_archive("sdxl", "1.0", weights, base / "store")
    shutil.rmtree(weights)
    return base / "store", weights

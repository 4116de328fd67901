"""A start that fails, fails fast: `make serve` (scripts/serve.py) against real TorchServe.

TorchServe alone retries a worker whose model cannot load for as long as it runs, with a
growing pause; the start must end at the first failed load with the worker's exception,
and Ctrl-C must stop it at any time, Java included. That holds too when the worker process
dies before it is sent the model, for both start paths: ``TorchServeProcess`` (serve.py,
the tests, the benchmark) and the pod's entry point (the rest of it: test_pod.py).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import psutil
import pytest

from archives import patched_archive
from lifetimes import Started, run
from sdxl_serve.server import Addresses, LoadFailed, TorchServeProcess, free_port, port_of

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
SERVE = REPO / "scripts" / "serve.py"


def serve_command(store: Path, run_dir: Path, *extra: str) -> tuple[list[str], dict]:
    addresses = Addresses.free()
    env = dict(os.environ, TS_INFERENCE_ADDRESS=addresses.inference,
               TS_MANAGEMENT_ADDRESS=addresses.management, TS_METRICS_ADDRESS=addresses.metrics,
               TMPDIR=str(run_dir / "tmp"), PYTHONUNBUFFERED="1")
    return [sys.executable, str(SERVE), "--model-store", str(store), "--run-dir", str(run_dir),
            *extra], env


def servers_of(run_dir: Path) -> list[psutil.Process]:
    """Every process started for this run directory: Java (its temp dir) and the workers."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if any(str(run_dir) in word for word in process.info["cmdline"] or []):
            found.append(process)
    return found


def run_serve(command: list[str], env: dict, run_dir: Path
              ) -> tuple[subprocess.CompletedProcess, float, list[str]]:
    """serve.py to its end (at most 120 s), how long it took, and what it left running of
    TorchServe (ended afterwards, so a failing test leaves no Java behind)."""
    started = time.monotonic()
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        took = time.monotonic() - started
    finally:
        left = [p for p in servers_of(run_dir) if p.status() != psutil.STATUS_ZOMBIE]
        names = [" ".join(p.cmdline())[:80] for p in left]
        for process in left:
            process.kill()
        psutil.wait_procs(left, timeout=10)
    print(done.stdout, done.stderr, sep="\n")
    return done, took, names


def test_a_model_that_cannot_load_ends_the_start_with_its_exception(tmp_path,
                                                                     unloadable_model_store):
    store, weights = unloadable_model_store
    run_dir = tmp_path / "run"
    command, env = serve_command(store, run_dir, "--model-dir", str(weights))
    done, took, left = run_serve(command, env, run_dir)
    assert not left, left
    assert done.returncode == 1
    assert took < 60, f"the failed start took {took:.0f} s"
    # It said which weights its archive serves, and the worker's own exception.
    assert f"serves the weights in {weights}" in done.stdout
    assert "Traceback (most recent call last):" in done.stderr
    assert f"SettingsError: model_dir '{weights}' is not a directory" in done.stderr
    assert "READY" not in done.stdout


def serve_until(model_store: Path, run_dir: Path, start: str,
                shell_first: str = "") -> tuple[Started, list[str]]:
    """serve.py in a session of its own, and its output up to the line that starts with
    ``start`` (or to its end); ``Started.stop`` ends what it leaves. ``shell_first``: bash
    runs it (``trap '' TERM``, say), then becomes serve.py."""
    command, env = serve_command(model_store, run_dir)
    if shell_first:
        command = ["bash", "-c", f'{shell_first}; exec "$@"', "serve", *command]
    started = Started(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                      text=True).start()
    out = []
    for line in started.process.stdout:
        out.append(line)
        if line.startswith(start):
            break
    return started, out


def test_ctrl_c_while_the_model_loads_stops_everything_at_once(tmp_path, model_store):
    run_dir = tmp_path / "run"
    started, out = serve_until(model_store, run_dir, "starting TorchServe")
    serve = started.process
    try:
        assert "serves the embedded tiny model" in "".join(out)
        # Java is up and its worker loading when Ctrl-C comes.
        deadline = time.monotonic() + 30
        while not [p for p in servers_of(run_dir) if p.name() == "java"]:
            assert time.monotonic() < deadline, "no Java after 30 s"
            time.sleep(0.1)
        java = [p for p in servers_of(run_dir) if p.name() == "java"]
        interrupted = time.monotonic()
        serve.send_signal(signal.SIGINT)
        rest, _ = serve.communicate(timeout=60)
        took = time.monotonic() - interrupted
        out.append(rest)
    finally:
        if serve.poll() is None:
            serve.kill()  # TorchServe, in a session of its own, is ended below
            serve.wait(30)
    print("".join(out))
    try:
        assert "READY" not in "".join(out), "the model was ready before Ctrl-C: nothing tested"
        assert serve.returncode == 130
        assert took < 15, f"Ctrl-C took {took:.1f} s to stop the start"
        psutil.wait_procs(java, timeout=5)
        assert not [p for p in servers_of(run_dir) if p.is_running()
                    and p.status() != psutil.STATUS_ZOMBIE]
    finally:
        started.stop(grace_s=0)  # what Ctrl-C left, after the check that it left nothing


@pytest.mark.parametrize("signum, to_group", [(signal.SIGINT, True), (signal.SIGTERM, False)],
                         ids=["ctrl-c", "sigterm"])
def test_a_stop_while_the_archive_builds_is_one_line_and_leaves_no_half_build(
        tmp_path, tiny_model_dir, signum, to_group):
    """Ctrl-C (a terminal signals the whole process group) or SIGTERM while `make serve`
    builds its archive, before any server starts: Ctrl-C printed a KeyboardInterrupt
    traceback from inside the build, and SIGTERM left the build's `.building-*` folder in
    the model store for good."""
    store, run_dir = tmp_path / "store", tmp_path / "run"
    command, env = serve_command(store, run_dir)
    env["SDXL_TINY_MODEL_DIR"] = str(tiny_model_dir)
    started = Started(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                      text=True).start()
    serve = started.process
    try:
        deadline = time.monotonic() + 60
        while not list(store.glob(".building-*")):
            assert serve.poll() is None, serve.stdout.read()
            assert time.monotonic() < deadline, "no archive build after 60 s"
            time.sleep(0.005)
        if to_group:
            os.killpg(serve.pid, signum)
        else:
            serve.send_signal(signum)
        out, _ = serve.communicate(timeout=60)
    finally:
        started.stop(grace_s=0)
    print(out)
    assert serve.returncode == 130
    assert "Traceback" not in out and "KeyboardInterrupt" not in out
    assert out.rstrip().endswith("start cancelled")
    assert not list(store.glob(".building-*"))
    assert not servers_of(run_dir)  # nothing was started


@pytest.mark.parametrize("hangup", [signal.SIG_IGN, signal.SIG_DFL], ids=["nohup", "terminal"])
def test_a_closed_terminal_stops_serve_unless_sighup_was_ignored(tmp_path, model_store, hangup):
    """`nohup make serve` starts it with SIGHUP ignored, to outlive its terminal: serve.py
    put its own stop over that (its start's cancel, then its stop), so a closed terminal
    stopped the server all the same. An ignored SIGHUP stays ignored, as rollout.py keeps
    it; at its default (set here: a suite run under nohup passes it on ignored), a closed
    terminal stops the server as Ctrl-C does."""
    run_dir = tmp_path / "run"
    command, env = serve_command(model_store, run_dir)
    started = Started(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                      text=True, preexec_fn=lambda: signal.signal(signal.SIGHUP, hangup)).start()
    serve = started.process
    try:
        out = []
        for line in serve.stdout:
            out.append(line)
            if "serves the embedded tiny model" in line and hangup is signal.SIG_IGN:
                serve.send_signal(signal.SIGHUP)  # while it starts, before the server
            if line.startswith("READY"):
                break
        assert out[-1].startswith("READY"), "".join(out)
        serve.send_signal(signal.SIGHUP)
        if hangup is signal.SIG_IGN:
            with pytest.raises(subprocess.TimeoutExpired):
                serve.wait(timeout=5)  # it stops within a second when told to
            serve.send_signal(signal.SIGTERM)
        rest, _ = serve.communicate(timeout=60)
        java = [p for p in servers_of(run_dir) if p.name() == "java"]
        psutil.wait_procs(java, timeout=10)
        assert not [p for p in servers_of(run_dir) if p.is_running()
                    and p.status() != psutil.STATUS_ZOMBIE]
    finally:
        started.stop(grace_s=0)
    assert serve.returncode == 0, "".join(out) + rest
    assert "stopping TorchServe" in rest, rest


@pytest.mark.parametrize("shell_first", ["", "trap '' TERM"], ids=["default", "sigterm-ignored"])
def test_a_killed_serve_takes_torchserve_with_it(tmp_path, model_store, shell_first):
    # SIGKILL (kill -9, the OOM killer) leaves no handler to run: TorchServe's wrapper, our
    # child then, died with nothing passed on, and Java, its workers and engine processes
    # went on holding the ports (and a GPU) until killed by hand. The kernel's SIGTERM to
    # Java ends them; a serve.py started with SIGTERM ignored that left it so passed the
    # ignoring on to Java, which then outlived it (stop_signals takes SIGTERM always).
    run_dir = tmp_path / "run"
    started, out = serve_until(model_store, run_dir, "READY", shell_first)
    serve = started.process
    try:
        assert out and out[-1].startswith("READY"), "".join(out)
        (java,) = [p for p in servers_of(run_dir) if p.name() == "java"]
        server = [java, *java.children(recursive=True)]  # workers and engine processes
        assert len(server) >= 3, server
        serve.kill()
        serve.wait(30)
        gone, left = psutil.wait_procs(server, timeout=60)
        assert not [p for p in left if p.status() != psutil.STATUS_ZOMBIE], left
    finally:
        started.stop(grace_s=0)


def test_a_flipped_byte_in_the_weights_ends_the_start_naming_the_file(tmp_path, tiny_model_dir):
    # The archive was built from good weights; one bit flips on the volume afterwards. The
    # engine refuses the files at load (the manifest check), and the start ends with that.
    from build_archive import build_archive

    weights = tmp_path / "weights"
    shutil.copytree(tiny_model_dir, weights)
    build_archive("sdxl", "1.0", weights, tmp_path / "store")
    (unet,) = weights.glob("unet/*.safetensors")
    data = bytearray(unet.read_bytes())
    data[-10] ^= 0x01
    unet.write_bytes(bytes(data))
    run_dir = tmp_path / "run"
    command, env = serve_command(tmp_path / "store", run_dir, "--model-dir", str(weights))
    done, took, left = run_serve(command, env, run_dir)
    assert not left, left
    assert done.returncode == 1 and took < 60
    assert "does not match its sdxl-manifest.json" in done.stderr
    assert f"{unet.relative_to(weights).as_posix()}: sha256" in done.stderr


def test_plain_serve_after_the_weights_went_rebuilds_for_the_tiny_model(
        tmp_path, unloadable_model_store, tiny_model_dir):
    # Issue 14's case: `make serve MODEL_DIR=<dir>` once, <dir> removed, then `make serve`.
    # The archive still names <dir>; a plain serve asks for the tiny model, so it is rebuilt.
    from build_archive import archive_differences

    store = tmp_path / "store"
    shutil.copytree(unloadable_model_store[0], store)
    # It names the weights that went (and packs this checkout's code and config).
    assert archive_differences(store / "sdxl-1.0.mar", unloadable_model_store[1]) == []
    run_dir = tmp_path / "run"
    command, env = serve_command(store, run_dir)
    env["SDXL_TINY_MODEL_DIR"] = str(tiny_model_dir)  # the plain serve's tiny model, not the tree's
    serve = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    out = []
    try:
        deadline = time.monotonic() + 240
        for line in serve.stdout:
            out.append(line)
            if line.startswith("READY") or time.monotonic() > deadline:
                break
        serve.send_signal(signal.SIGINT)
        out.append(serve.communicate(timeout=60)[0])
    finally:
        if serve.poll() is None:
            serve.kill()  # TorchServe, in a session of its own, is ended below
            serve.wait(30)
        left = servers_of(run_dir)
        for process in left:
            process.kill()
    text = "".join(out)
    print(text)
    assert "serves the embedded tiny model" in text and "built before" not in text
    assert any(line.startswith("READY") for line in out), text
    assert archive_differences(store / "sdxl-1.0.mar") == []  # the tiny model, inside
    assert serve.returncode == 0


# The worker reads its metrics config (TS_METRICS_CONFIG) before anything else and dies when
# the file is missing, so it is never sent the model: TorchServe logs no "Load model failed",
# only the worker thread's stop, and retries it with a growing pause. (The image killed every
# worker this way while its config.properties named the file relative to the run directory.)
def metrics_config_error(missing: Path) -> str:
    """Most of the worker's last exception line when ``missing`` is its metrics config."""
    return f"MetricsCacheIOError: Error reading file: Error reading file {missing}: [Errno 2]"


def test_a_worker_that_dies_before_it_loads_ends_the_start_with_its_exception(
        tmp_path, model_store):
    missing = tmp_path / "no-metrics.yaml"
    server = TorchServeProcess(tmp_path / "run", model_store, {"sdxl": "sdxl-1.0.mar"},
                               Addresses.free(), env={"TS_METRICS_CONFIG": str(missing)})
    try:
        started = time.monotonic()
        server.start()
        with pytest.raises(LoadFailed) as failed:
            server.wait_ready("sdxl", timeout=120)
        took = time.monotonic() - started
    finally:
        server.stop()
    print(failed.value)
    assert took < 60, f"the failed start took {took:.0f} s"
    assert "Traceback (most recent call last):" in str(failed.value)
    assert metrics_config_error(missing) in str(failed.value)


def test_a_worker_that_dies_before_it_loads_ends_the_pods_start(tmp_path, model_store):
    if not shutil.which("tini"):
        pytest.skip("the image's init `tini` is not installed here (Debian: apt-get install "
                    "tini; .ci/run installs it)")
    missing = tmp_path / "no-metrics.yaml"
    addresses = Addresses.free()
    env = {name: value for name, value in os.environ.items() if not name.startswith("TS_")}
    env.update(TS_INFERENCE_ADDRESS=addresses.inference,
               TS_MANAGEMENT_ADDRESS=addresses.management, TS_METRICS_ADDRESS=addresses.metrics,
               TS_GRPC_INFERENCE_PORT=str(free_port()), TS_GRPC_MANAGEMENT_PORT=str(free_port()),
               TS_METRICS_CONFIG=str(missing), TEMP=str(tmp_path / "tmp"),
               TMPDIR=str(tmp_path / "tmp"), LOG_LOCATION=str(tmp_path / "logs"),
               METRICS_LOCATION=str(tmp_path / "logs"),
               PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"])
    # The image's entry point: tini reaps the start watcher, an orphan by design.
    command = ["tini", "--", sys.executable, "-m", "sdxl_serve.pod", "start",
               "--config", str(REPO / "k8s" / "base" / "config.properties"),
               "--model-store", str(model_store), "--models", "sdxl=sdxl-1.0.mar",
               "--run-dir", str(tmp_path / "run"), "--start-timeout", "120"]
    started = time.monotonic()
    code, output = run(command, 150, tmp_path / "pod.out", "the pod's start", env=env)
    took = time.monotonic() - started
    print(output)
    assert code != 0
    assert took < 60, f"the failed start took {took:.0f} s"
    assert "start failed: a model could not load" in output
    assert metrics_config_error(missing) in output


def rewritten(mar: Path, name: str, data: bytes) -> None:
    """``mar`` with its file ``name`` holding ``data``, as an archive built from other files."""
    old = mar.with_suffix(".old")
    mar.rename(old)
    with zipfile.ZipFile(old) as source, zipfile.ZipFile(mar, "w") as target:
        for item in source.infolist():
            target.writestr(item, data if item.filename == name else source.read(item))
    old.unlink()


def test_serve_says_that_sdxl_model_dir_overrides_the_archives_weights(tmp_path, tiny_model_dir,
                                                                       capsys, monkeypatch):
    # The workers load SDXL_MODEL_DIR over the archive's weights: make serve said only
    # which weights the archive serves ("the embedded tiny model"), not the ones served.
    from serve import prepare_archive

    weights, store = tmp_path / "weights", tmp_path / "store"
    shutil.copytree(tiny_model_dir, weights)  # outside the archive: a quick build
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SDXL_MODEL_DIR", "others")
    assert prepare_archive("sdxl", "1.0", weights, store) is not None
    out = capsys.readouterr().out
    assert f"serves the weights in {weights}" in out, out
    assert (f"SDXL_MODEL_DIR overrides that: the workers load the weights in "
            f"{tmp_path / 'others'}\n") in out, out


def test_serve_rebuilds_an_archive_packed_from_other_code_or_config(tmp_path, tiny_model_dir,
                                                                    capsys):
    # The worker runs the code and model config packed in its archive, not the checkout's:
    # an archive built before a `git pull` (or an edit of model-config.yaml) went on serving
    # the old handler, said only as "built before".
    import yaml
    from build_archive import archive_differences
    from serve import prepare_archive

    weights, store = tmp_path / "weights", tmp_path / "store"
    shutil.copytree(tiny_model_dir, weights)  # outside the archive: rebuilding is cheap
    mar = prepare_archive("sdxl", "1.0", weights, store)
    assert archive_differences(mar, weights.resolve()) == []
    capsys.readouterr()
    assert prepare_archive("sdxl", "1.0", weights, store) == mar
    assert "built before" in capsys.readouterr().out

    rewritten(mar, "sdxl_serve/torchserve_handler.py", b"# an older handler\n")
    assert prepare_archive("sdxl", "1.0", weights, store) == mar
    out = capsys.readouterr().out
    assert "differs from this checkout (sdxl_serve/torchserve_handler.py)" in out, out
    assert "built before" not in out and archive_differences(mar, weights.resolve()) == []
    # The build it replaced is not lost: a rollout may have kept that version, and a
    # rollback loads whatever the store holds under its name.
    (kept,) = (store / "replaced").iterdir()
    assert f"kept as {kept}" in out and kept.name.startswith("sdxl-1.0.")
    with zipfile.ZipFile(kept) as archive:
        assert archive.read("sdxl_serve/torchserve_handler.py") == b"# an older handler\n"

    with zipfile.ZipFile(mar) as archive:
        config = yaml.safe_load(archive.read("model-config.yaml"))
    config["batchSize"] += 1
    rewritten(mar, "model-config.yaml", yaml.safe_dump(config, sort_keys=False).encode())
    prepare_archive("sdxl", "1.0", weights, store)
    assert "differs from this checkout (model-config.yaml)" in capsys.readouterr().out
    assert archive_differences(mar, weights.resolve()) == []
    # The last KEEP_REPLACED builds of a version are kept, no more.
    from build_archive import KEEP_REPLACED
    for n in range(KEEP_REPLACED):
        rewritten(mar, "model-config.yaml", f"# edit {n}\n".encode())
        prepare_archive("sdxl", "1.0", weights, store)
    kept = sorted((store / "replaced").iterdir())
    assert len(kept) == KEEP_REPLACED
    with zipfile.ZipFile(kept[0]) as archive:
        assert archive.read("model-config.yaml") == b"# edit 0\n"
    # Other weights asked for, and refused: the archive stays where it is (it may be
    # serving, and a rollback loads it), nothing moves to replaced/, no build is left.
    capsys.readouterr()
    serving = mar.read_bytes()
    assert prepare_archive("sdxl", "1.0", tmp_path / "nonexistent", store) is None
    assert "nonexistent is not a directory" in capsys.readouterr().err
    assert mar.read_bytes() == serving
    assert sorted((store / "replaced").iterdir()) == kept
    assert sorted(path.name for path in store.iterdir()) == ["replaced", "sdxl-1.0.mar"]


def test_serve_without_model_dir_keeps_the_archives_own_weights(tmp_path, tiny_model_dir,
                                                               capsys):
    # `make serve VERSION=2.0` (the restart note's command) on a 2.0 built with MODEL_DIR
    # rebuilt it with the embedded tiny model: random noise served as 2.0, and a rollback
    # to 2.0 registered that build.
    from sdxl_serve.model_files import packed_model_dir
    from serve import prepare_archive

    weights, store = tmp_path / "weights", tmp_path / "store"
    shutil.copytree(tiny_model_dir, weights)
    mar = prepare_archive("sdxl", "2.0", weights, store)
    built = mar.read_bytes()
    capsys.readouterr()
    assert prepare_archive("sdxl", "2.0", None, store) == mar
    out = capsys.readouterr().out
    assert f"was built for the weights in {weights.resolve()}: serving those" in out, out
    assert mar.read_bytes() == built and packed_model_dir(mar) == weights.resolve()
    assert not (store / "replaced").exists()


def test_serve_after_the_archives_weights_went_says_why_it_builds_again(
        tmp_path, tiny_model_dir, capsys, monkeypatch):
    # It said the weights were gone, then "differs from this checkout (model-config.yaml):
    # building it again", as if the config had been edited: the packed config differs only
    # in the weights it names.
    import build_archive
    from serve import prepare_archive

    # The rebuild packs the test's tiny model, not one built into the checkout's build/
    # (SDXL_TINY_MODEL_DIR does this for a serve.py run as a process).
    monkeypatch.setattr(build_archive, "ensure_tiny_model", lambda: tiny_model_dir)

    weights, store = tmp_path / "weights", tmp_path / "store"
    shutil.copytree(tiny_model_dir, weights)
    mar = prepare_archive("sdxl", "2.0", weights, store)
    shutil.rmtree(weights)
    capsys.readouterr()
    assert prepare_archive("sdxl", "2.0", None, store) == mar
    out = capsys.readouterr().out
    assert (f"archive {mar} was built for the weights in {weights.resolve()}, which are gone: "
            f"building it again for the embedded tiny model (MODEL_DIR=... serves other "
            f"weights)") in out, out
    assert "differs from this checkout" not in out, out


def test_an_archive_of_truncated_weights_is_refused_at_build(tmp_path, tiny_model_dir):
    # A weights file cut short (a copy that ran out of disk) was archived with exit 0, and
    # failed only when a rollout's worker loaded it.
    from build_archive import ARCHIVE_REFUSALS, build_archive

    weights = tmp_path / "weights"
    shutil.copytree(tiny_model_dir, weights)
    (unet,) = (weights / "unet").glob("*.safetensors")
    with open(unet, "r+b") as handle:
        handle.truncate(1000)
    with pytest.raises(ARCHIVE_REFUSALS) as refused:
        build_archive("sdxl", "9.0", weights, tmp_path / "store")
    assert "unet/" in str(refused.value) and "1000" in str(refused.value), refused.value
    assert not (tmp_path / "store" / "sdxl-9.0.mar").exists()


def test_make_archive_keeps_the_archive_it_replaces(tmp_path, tiny_model_dir):
    """`make archive VERSION=2.0` overwrote a 2.0 that a rollout may have kept, which a
    rollback would then load in its place; `make serve` kept it, `make archive` did not."""
    from build_archive import main

    weights, store = tmp_path / "weights", tmp_path / "store"
    shutil.copytree(tiny_model_dir, weights)
    args = ["--version", "2.0", "--model-dir", str(weights), "--model-store", str(store)]
    assert main(args) == 0
    first = (store / "sdxl-2.0.mar").read_bytes()
    assert main(args) == 0
    (kept,) = (store / "replaced").iterdir()
    assert kept.read_bytes() == first and kept.name.startswith("sdxl-2.0.")
    assert sorted(path.name for path in store.iterdir()) == ["replaced", "sdxl-2.0.mar"]


def test_another_models_archive_under_the_same_file_name_is_refused(tmp_path, tiny_model_dir,
                                                                     capsys):
    # `sdxl-1` 0 and `sdxl` 1-0 are both sdxl-1-0.mar: `make archive` moved the other
    # model's archive to replaced/, and `make serve` reused it (same code and config) and
    # waited for a version it never registers.
    from build_archive import main
    from serve import prepare_archive

    weights, store = tmp_path / "weights", tmp_path / "store"
    shutil.copytree(tiny_model_dir, weights)
    at = ["--model-dir", str(weights), "--model-store", str(store)]
    assert main(["--name", "sdxl-1", "--version", "0", *at]) == 0
    mar = store / "sdxl-1-0.mar"
    other = mar.read_bytes()
    capsys.readouterr()
    refusal = (f"error: {mar} is the archive of model sdxl-1 version 0, not of sdxl version "
               f"1-0: their file names are the same; left as it is (choose another --name "
               f"or --version)\n")
    assert main(["--name", "sdxl", "--version", "1-0", *at]) == 2
    assert capsys.readouterr().err == refusal
    assert prepare_archive("sdxl", "1-0", weights, store) is None
    assert capsys.readouterr().err == refusal
    assert prepare_archive("sdxl", "1-0", weights, store, rebuild=True) is None
    assert mar.read_bytes() == other and sorted(path.name for path in store.iterdir()) == [
        "sdxl-1-0.mar"]
    # Its own model and version still reuse it.
    assert prepare_archive("sdxl-1", "0", weights, store) == mar
    assert "built before" in capsys.readouterr().out


@pytest.mark.parametrize("script", ["serve.py", "serve_jobs.py"])
def test_a_port_another_server_holds_is_named_before_anything_starts(tmp_path, model_store,
                                                                      script):
    # Before, TorchServe started, failed to bind it and exited: "torchserve exited with 0".
    run_dir = tmp_path / "run"
    command, env = serve_command(model_store, run_dir)
    command[1] = str(REPO / "scripts" / script)
    with socket.socket() as other:  # another server on the management port
        other.bind(("127.0.0.1", port_of(env["TS_MANAGEMENT_ADDRESS"])))
        other.listen()
        done, took, left = run_serve(command, env, run_dir)
    assert not left, left
    assert done.returncode == 2
    assert (f"error: something already listens on TS_MANAGEMENT_ADDRESS "
            f"{env['TS_MANAGEMENT_ADDRESS']}: another server?") in done.stderr, done.stderr
    assert "starting TorchServe" not in done.stdout and "starting Redis" not in done.stdout
    assert not run_dir.exists()  # nothing made either (it left an empty run directory)


@pytest.mark.parametrize("script", ["serve.py", "serve_jobs.py"])
def test_a_directory_missing_here_is_refused_before_torchserve_starts(tmp_path, model_store,
                                                                      script):
    # The archive's build checks its section for any machine, and the environment's
    # overrides not at all: TorchServe started, every worker's load failed with a traceback
    # (SettingsError: SDXL_VAE_DIR=...), exit 1.
    run_dir, missing = tmp_path / "run", tmp_path / "no-vae"
    command, env = serve_command(model_store, run_dir)
    command[1] = str(REPO / "scripts" / script)
    env["SDXL_VAE_DIR"] = str(missing)
    done, took, left = run_serve(command, env, run_dir)
    assert not left, left
    assert done.returncode == 2, done.stdout + done.stderr
    # The cause alone: it began "error: <archive> (its handler section): ", which is fine.
    assert done.stderr.splitlines()[-1] == (
        f"error: SDXL_VAE_DIR='{missing}' (an environment override): vae_dir '{missing}' is "
        f"not a directory"), done.stderr
    assert "Traceback" not in done.stderr
    assert "starting TorchServe" not in done.stdout and "starting Redis" not in done.stdout


def test_a_refusal_names_the_archives_section_where_it_is_a_cause(tmp_path, model_store,
                                                                  capsys):
    """The archive's section is named where a setting of it is part of the cause: alone, or
    with an override (the variable named too); not where the variables alone are."""
    import yaml

    from serve import refuse_unloadable_settings

    missing = tmp_path / "no-cancel"

    def with_cancel_dir(name: str, data: bytes) -> bytes:
        if name != "model-config.yaml":
            return data
        config = yaml.safe_load(data)
        config["handler"]["cancel_dir"] = str(missing)
        return yaml.safe_dump(config).encode()

    mar = model_store / "sdxl-1.0.mar"
    patched = patched_archive(mar, tmp_path / "sdxl-1.0.mar", with_cancel_dir)
    assert refuse_unloadable_settings(patched, {})
    assert capsys.readouterr().err == (f"error: {patched} (its handler section): cancel_dir "
                                       f"'{missing}' is not a directory\n")
    # The section's max_call_cost (8) and the environment's max_request_cost, together.
    assert refuse_unloadable_settings(mar, {"SDXL_MAX_REQUEST_COST": "10"})
    assert capsys.readouterr().err.startswith(
        f"error: {mar} (its handler section): SDXL_MAX_REQUEST_COST='10' (an environment "
        f"override): setting max_call_cost (8.0) must be at least max_request_cost (10.0)")
    assert refuse_unloadable_settings(mar, {"SDXL_DTYPE": "float17"})
    assert capsys.readouterr().err.startswith("error: SDXL_DTYPE='float17' (an environment "
                                              "override): setting dtype must be one of ")
    assert not refuse_unloadable_settings(mar, {})


def test_an_sdxl_model_dir_override_without_weights_is_refused_before_torchserve_starts(
        tmp_path, model_store):
    # The workers load SDXL_MODEL_DIR over the archive's weights: it was not checked, and
    # TorchServe started, its workers' load failed with a traceback, exit 1.
    run_dir, missing = tmp_path / "run", tmp_path / "no-weights"
    command, env = serve_command(model_store, run_dir)
    env["SDXL_MODEL_DIR"] = str(missing)
    done, took, left = run_serve(command, env, run_dir)
    assert not left, left
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.splitlines()[-1].startswith(
        f"error: SDXL_MODEL_DIR, which the workers load over the archive's weights: "
        f"{missing} is not a directory"), done.stderr
    assert "Traceback" not in done.stderr and "starting TorchServe" not in done.stdout


def test_an_address_not_of_this_machine_is_named_for_what_it_is(tmp_path, model_store):
    # It was "something already listens on ...: another server?", for a server that was
    # never there (any failed bind counted as taken).
    run_dir = tmp_path / "run"
    command, env = serve_command(model_store, run_dir)
    # 192.0.2.1 (TEST-NET-1) is no interface's address.
    env["TS_METRICS_ADDRESS"] = f"http://192.0.2.1:{port_of(env['TS_METRICS_ADDRESS'])}"
    done, took, left = run_serve(command, env, run_dir)
    assert not left, left
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1] == (
        f"error: cannot listen on TS_METRICS_ADDRESS {env['TS_METRICS_ADDRESS']}: Cannot "
        f"assign requested address (no interface of this machine has that address): move "
        f"all three TS_*_ADDRESS ports (docs/configuration.md)"), done.stderr
    assert "already listens" not in done.stderr
    assert not run_dir.exists()


@pytest.mark.parametrize("script", ["serve.py", "serve_jobs.py"])
@pytest.mark.parametrize("address", ["http://127.0.0.1:abc", "127.0.0.1:8080",
                                     "http://127.0.0.1:70000", "http://localhost"])
def test_an_address_setting_that_is_no_address_is_refused_in_one_line(tmp_path, model_store,
                                                                      script, address):
    # Each was a traceback from int() or bind(), or (no scheme) Java's "Invalid binding
    # address" after the archive's build.
    run_dir = tmp_path / "run"
    command, env = serve_command(model_store, run_dir)
    command[1] = str(REPO / "scripts" / script)
    env["TS_INFERENCE_ADDRESS"] = address
    done, took, left = run_serve(command, env, run_dir)
    assert not left, left
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines()[-1] == (
        f"error: TS_INFERENCE_ADDRESS must be http://HOST:PORT or https://HOST:PORT (no "
        f"path; TorchServe takes no IPv6 literal), the port from 1 to 65535, got "
        f"{address!r}"), done.stderr
    assert "Traceback" not in done.stderr and not run_dir.exists()

"""`make serve-triton`'s script: starts on the ports and TMPDIR it is given, prints curl
lines that work as printed, and stops on Ctrl-C leaving no process behind; a handler_config
that no model could serve as written, or an SDXL_* override that none could serve with, is
refused before anything starts."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from lifetimes import live_cpu_seconds, wait_until
from sdxl_serve.management import http
from sdxl_serve.server import ServerError
from sdxl_serve.triton_client import error_of, parse_reply
from sdxl_serve.triton_server import TritonPorts, TritonServerProcess, stub_model
from test_triton_serving import PNG_MAGIC, infer

pytestmark = pytest.mark.triton
REPO = Path(__file__).resolve().parents[2]


def pids_running_from(directory: Path) -> list[int]:
    """Live processes whose command line names ``directory``: the server (its copy is in
    the run directory), the backend stub, and the fork server and engine processes (the
    run directory's Python)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if str(directory) in (entry / "cmdline").read_bytes().decode(errors="replace") \
                        and (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def script_env(tmp_path: Path, tiny_model_dir: Path, ports: TritonPorts) -> dict[str, str]:
    # SDXL_MODEL_DIR: the session's tiny model (without it the script builds build/tiny-sdxl
    # in the checkout, which tests must not write into).
    (tmp_path / "tmp").mkdir(exist_ok=True)
    return {**os.environ, "TMPDIR": str(tmp_path / "tmp"),
            "SDXL_MODEL_DIR": str(tiny_model_dir),
            "SDXL_TRITON_HTTP_PORT": str(ports.http), "SDXL_TRITON_GRPC_PORT": str(ports.grpc),
            "SDXL_TRITON_METRICS_PORT": str(ports.metrics)}


def start_script(tmp_path: Path, env: dict[str, str], out_name: str = "out.txt"
                 ) -> subprocess.Popen:
    """serve_triton.py in a session of its own, its output in ``out_name``, once READY;
    SIGHUP at its default, as a terminal leaves it (a suite run under nohup passes it on
    ignored, which the script keeps ignored)."""
    out_path = tmp_path / out_name
    with open(out_path, "wb") as out:
        process = subprocess.Popen([sys.executable, str(REPO / "scripts" / "serve_triton.py")],
                                   env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True, preexec_fn=lambda: signal.signal(
                                       signal.SIGHUP, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    while b"Ctrl-C stops" not in out_path.read_bytes():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(out_path.read_text())
        time.sleep(0.5)
    return process


def test_serve_triton_prints_curl_lines_that_work(tmp_path, tiny_model_dir):
    ports = TritonPorts.free()
    env = script_env(tmp_path, tiny_model_dir, ports)
    process = start_script(tmp_path, env)
    try:
        text = (tmp_path / "out.txt").read_text()
        # The run directory is under TMPDIR, named by the port.
        assert (tmp_path / "tmp" / f"sdxl-triton-{ports.http}" / "tritonserver.log").exists()
        assert f"127.0.0.1:{ports.http}" in text
        # The lines after "a PNG into out.png:" up to the next heading, as printed.
        png_lines = text.split("a PNG into out.png:\n")[1].split("a bad value")[0]
        work = tmp_path / "work"
        work.mkdir()
        subprocess.run(["bash", "-c", png_lines], cwd=work, check=True, timeout=300)
        assert (work / "out.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
        bad_line = re.search(r"rule:\n(.*)\n", text).group(1)
        reply = subprocess.run(["bash", "-c", bad_line], capture_output=True, text=True,
                               timeout=60).stdout
        assert "`width` must be a multiple of 8" in reply and "got 1004" in reply
        # Server, stub, fork server, engine: what must be gone after Ctrl-C.
        assert len(pids_running_from(tmp_path)) >= 4
        # A second start on the same ports: one line, before anything is laid out (it
        # crashed with "Text file busy" copying over the running server's stub).
        again = subprocess.run([sys.executable, str(REPO / "scripts" / "serve_triton.py")],
                               env=env, capture_output=True, text=True, timeout=120)
        assert again.returncode == 2, again.stdout + again.stderr
        assert f"already listens on SDXL_TRITON_HTTP_PORT {ports.http}" in again.stderr
        assert "Traceback" not in again.stderr
    finally:
        # A closed terminal (SIGHUP to the process group) stops it as Ctrl-C does; it used
        # to end the script at once and leave Triton and its engines running.
        os.killpg(process.pid, signal.SIGHUP)
        code = process.wait(120)
    assert code == 0, (tmp_path / "out.txt").read_text()[-2000:]
    assert not pids_running_from(tmp_path)


def test_a_killed_script_takes_triton_with_it(tmp_path, tiny_model_dir):
    # SIGKILL leaves no stop to run: the kernel ends Triton (PR_SET_PDEATHSIG), whose own
    # stop ends the stub and the engines.
    process = start_script(tmp_path, script_env(tmp_path, tiny_model_dir, TritonPorts.free()))
    try:
        assert len(pids_running_from(tmp_path)) >= 4
        process.kill()
        process.wait(30)
        deadline = time.monotonic() + 90
        while pids_running_from(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not pids_running_from(tmp_path)
    finally:
        for pid in pids_running_from(tmp_path):
            os.kill(pid, signal.SIGKILL)


def test_a_stub_killed_is_started_again_and_the_stop_does_not_wait_for_it(tmp_path,
                                                                          tiny_model_dir):
    # Triton 2.51 does not start a dead stub again: its model failed every request for good
    # while Triton's readiness stayed 200, and the stop then waited out Triton's 30 s exit
    # timeout without a word.
    ports = TritonPorts.free()
    # A request long enough to be in flight on any machine (the cost limits raised for it).
    env = {**script_env(tmp_path, tiny_model_dir, ports), "SDXL_WARMUP_STEPS": "1",
           "SDXL_MAX_REQUEST_COST": "1000", "SDXL_MAX_CALL_COST": "1000"}
    process = start_script(tmp_path, env)
    server = SimpleNamespace(ports=ports)
    out_path = tmp_path / "out.txt"
    try:
        [stub] = [pid for pid in pids_running_from(tmp_path) if stub_model(pid) == "sdxl"]
        # 1. A request in flight when the stub is killed outright.
        in_flight = {}
        thread = threading.Thread(target=lambda: in_flight.update(reply=infer(
            server, {"prompt": "x", "num_inference_steps": 100, "width": 128, "height": 128,
                     "num_images": 4}, timeout=300)))
        idle = live_cpu_seconds(pids_running_from(tmp_path))
        thread.start()
        # Killed once the request is being generated (a CPU second more than idle), where a
        # fixed second's sleep could kill the stub before the request reached it.
        wait_until(lambda: live_cpu_seconds(pids_running_from(tmp_path)) >= idle + 1, 60,
                   "the request to be under way in the model")
        os.kill(stub, signal.SIGKILL)
        thread.join(300)
        status, _, body = in_flight["reply"]
        assert status == 500 and "is not healthy" in error_of(body), (status, body[:300])
        # 2. The model serves again, within a bounded time.
        killed = time.monotonic()
        while True:
            status, headers, body = infer(server, {"prompt": "x", "num_inference_steps": 2})
            if status == 200:
                break
            assert time.monotonic() - killed < 180, (status, body[:300], out_path.read_text())
            time.sleep(1)
        assert parse_reply(headers, body).images[0].startswith(PNG_MAGIC)
        text = out_path.read_text()
        assert (f"warning: Triton's backend stub of model sdxl (pid {stub}) died" in text
                and "the requests it held failed with 500" in text
                and "model sdxl serves again" in text), text[-2000:]
        assert [pid for pid in pids_running_from(tmp_path) if stub_model(pid) == "sdxl"]
        # The repository API the launcher used is still refused to clients (no key).
        status, _, body = http("POST", f"{ports.http_url}/v2/repository/models/sdxl/unload",
                               None, b"{}", timeout=30)
        assert status == 403, (status, body)
    finally:
        # 3. The stop says why it would wait, and does not wait out the 30 s.
        stop_asked = time.monotonic()
        process.send_signal(signal.SIGINT)
        code = process.wait(120)
    text = out_path.read_text()
    assert code == 0, text[-2000:]
    assert "Triton cannot unload that model and would wait out its 30 s exit timeout" \
        in text, text[-2000:]
    assert time.monotonic() - stop_asked < 25, text[-2000:]
    assert not pids_running_from(tmp_path)


def test_a_run_directory_of_another_user_is_refused(tmp_path, tiny_model_dir):
    # Its default name in the temp directory is predictable, and what is found there runs.
    ports = TritonPorts.free()
    env = script_env(tmp_path, tiny_model_dir, ports)
    planted = tmp_path / "tmp" / f"sdxl-triton-{ports.http}"
    # A symbolic link there, to a directory of ours: Triton would be laid out in it.
    ours = tmp_path / "ours"
    ours.mkdir()
    planted.symlink_to(ours)
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "serve_triton.py")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and f"{planted} is a symbolic link" in done.stderr, \
        done.stdout + done.stderr
    assert "Triton" not in done.stdout, done.stdout
    assert not any(ours.iterdir())
    planted.unlink()
    planted.mkdir()
    if os.getuid() != 0:
        pytest.skip("only root can give a directory to another user to test this")
    os.chown(planted, 65534, 65534)
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "serve_triton.py")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"{planted} belongs to another user (uid 65534)" in done.stderr
    assert not (planted / "tritonserver").exists()


def test_a_second_start_is_refused_running_or_stopped(tmp_path, tiny_model_dir):
    """`lay_out` ran once per server object, so a second `start` skipped its checks: while
    the first Triton ran it started a second one (the first, no longer `process`, was left
    to no `stop`), and after a stop it ran from a run directory unchecked since."""
    server = TritonServerProcess(tmp_path / "run", ports=TritonPorts.free(), models=["sdxl"],
                                 env={"SDXL_MODEL_DIR": str(tiny_model_dir)})
    server.start()
    first = server.process
    try:
        with pytest.raises(ServerError, match="started tritonserver already"):
            server.start()
        assert server.process is first
    finally:
        server.stop()
        if first.poll() is None:  # a second start let through left the first to nobody
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(10)
    with pytest.raises(ServerError, match="create a new one to start another"):
        server.start()
    assert server.process is first


@pytest.mark.parametrize("line, setting, message", [
    # A typo: inside Triton only a warning, served with the default (max_num_images 4).
    ("  max_num_image: 1", "max_num_images: 4",
     "max_num_image is not a handler setting (did you mean max_num_images?)"),
    # A bad value: inside Triton the model load fails, with a traceback in Triton's log.
    ("  dtype: float17", "dtype: auto",
     "setting dtype must be one of auto, float16, bfloat16, float32, got 'float17'"),
])
def test_serve_triton_refuses_a_bad_handler_config_before_starting(tmp_path, line, setting,
                                                                   message):
    # The shipped repository and model-config with one line changed, outside the checkout.
    repository = tmp_path / "models"
    shutil.copytree(REPO / "triton-models", repository,
                    ignore=shutil.ignore_patterns("__pycache__"))
    shipped = (REPO / "config" / "model-config.yaml").read_text()
    assert f"\n  {setting}\n" in shipped
    bad = tmp_path / "model-config.yaml"
    bad.write_text(shipped.replace(f"\n  {setting}\n", f"\n{line}\n"))
    for pbtxt in repository.glob("*/config.pbtxt"):
        text = pbtxt.read_text()
        assert '"../../config/model-config.yaml"' in text
        pbtxt.write_text(text.replace('"../../config/model-config.yaml"', f'"{bad}"'))
    said = refused_start(tmp_path, ["--model-repository", str(repository)], {})
    assert said.startswith(f"error: {bad} (handler_config of model ") and message in said


SECTION = f"{(REPO / 'config' / 'model-config.yaml').resolve()} (handler_config of model sdxl): "


@pytest.mark.parametrize("override, message", [
    # A bad value: inside Triton every model's load failed, a traceback in a table of
    # Triton's log printed 19 s later, exit 1. The variable alone is the cause: the file
    # and the model were named before it too.
    ({"SDXL_DTYPE": "float17"}, "error: SDXL_DTYPE='float17' (an environment override): "
                                "setting dtype must be one of auto, float16, bfloat16, "
                                "float32, got 'float17'"),
    # Good alone, bad with the shipped section's max_call_cost (8): both named.
    ({"SDXL_MAX_REQUEST_COST": "10"}, f"error: {SECTION}SDXL_MAX_REQUEST_COST='10' (an "
                                      f"environment override): setting max_call_cost (8.0) "
                                      f"must be at least max_request_cost (10.0)"),
])
def test_serve_triton_refuses_a_bad_override_before_starting(tmp_path, override, message):
    """The shipped repository and section, with an SDXL_* setting that no model could load
    with in the environment serve_triton.py passes on to Triton."""
    started = time.monotonic()
    said = refused_start(tmp_path, [], override)
    took = time.monotonic() - started
    assert said.startswith(message), said
    assert took < 60, f"the refusal took {took:.0f} s"


@pytest.mark.parametrize("variable, setting", [("SDXL_VAE_DIR", "vae_dir"),
                                               ("SDXL_CANCEL_DIR", "cancel_dir")])
def test_serve_triton_refuses_a_directory_missing_here_before_starting(tmp_path, tiny_model_dir,
                                                                      variable, setting):
    """Weights a model can load, and a directory setting that names nothing on this machine:
    the check was the archive build's, for any machine, so Triton started, every model's
    load failed and the reason was a row of Triton's model table, 11 s later, exit 1."""
    missing = tmp_path / "not-there"
    said = refused_start(tmp_path, [], {"SDXL_MODEL_DIR": str(tiny_model_dir),
                                        variable: str(missing)})
    assert said == (f"error: {variable}='{missing}' (an environment override): {setting} "
                    f"'{missing}' is not a directory"), said


def test_serve_triton_refuses_missing_weights_in_the_weights_check_words(tmp_path):
    """The weights are left to check_weights, which says what a weights directory needs,
    not the settings' bare "model_dir ... is not a directory"."""
    said = refused_start(tmp_path, [], {})
    assert said.startswith(f"error: {tmp_path / 'no-weights'} is not a directory (a model "
                           "directory holds"), said


@pytest.mark.parametrize("holds", [None, [], ["sdxl_stream"]])
def test_serve_triton_refuses_a_repository_without_its_model_before_starting(tmp_path, holds):
    # Not there: Triton's reason in a table of its log, exit 1. Empty, or another model
    # only: Triton served, and the script waited 15 minutes for `sdxl` to be READY.
    repository = tmp_path / "models"
    if holds is not None:
        repository.mkdir()
        for model in holds:
            shutil.copytree(REPO / "triton-models" / model, repository / model,
                            ignore=shutil.ignore_patterns("__pycache__"))
    said = refused_start(tmp_path, ["--model-repository", str(repository)], {})
    assert said == (f"error: {repository} holds no model `sdxl` (sdxl/config.pbtxt): this "
                    "script waits for it and prints lines that call it")


def test_serve_triton_refuses_a_run_directory_it_cannot_make(tmp_path, tiny_model_dir):
    # A file at --run-dir was a FileExistsError's traceback.
    taken = tmp_path / "a-file"
    taken.write_text("")
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "serve_triton.py"),
                           "--run-dir", str(taken)],
                          env=script_env(tmp_path, tiny_model_dir, TritonPorts.free()),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert (f"error: {taken} cannot be Triton's run directory: File exists; choose another "
            "with --run-dir") in done.stderr.splitlines()
    # Nothing started, so neither "starting Triton" nor "stopping Triton" was said.
    assert "Triton" not in done.stdout, done.stdout


@pytest.mark.parametrize("value", ["80OO", "0", "65536"])
def test_serve_triton_refuses_a_port_setting_that_is_no_port(tmp_path, value):
    # It was a ValueError's traceback from int(), exit 1.
    assert refused_start(tmp_path, [], {"SDXL_TRITON_GRPC_PORT": value}) == (
        f"error: SDXL_TRITON_GRPC_PORT must be a port number from 1 to 65535, got {value!r}")


def refused_start(tmp_path: Path, args: list[str], override: dict[str, str]) -> str:
    """Run serve_triton.py with ``args`` and ``override`` in its environment, expecting it to
    refuse before Triton starts: exit 2, one `error:` line (returned) and no process left."""
    ports = TritonPorts.free()
    # No weights: the refusal comes before they are looked for (and without SDXL_MODEL_DIR
    # the script would build build/tiny-sdxl in the checkout).
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp"),
           "SDXL_MODEL_DIR": str(tmp_path / "no-weights"),
           "SDXL_TRITON_HTTP_PORT": str(ports.http), "SDXL_TRITON_GRPC_PORT": str(ports.grpc),
           "SDXL_TRITON_METRICS_PORT": str(ports.metrics), **override}
    (tmp_path / "tmp").mkdir()
    run_dir = tmp_path / "tmp" / f"sdxl-triton-{ports.http}"
    process = subprocess.Popen([sys.executable, str(REPO / "scripts" / "serve_triton.py"),
                                *args],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        # Exited, or Triton's run directory appeared: a server is starting on the bad settings.
        deadline = time.monotonic() + 120
        while process.poll() is None and not run_dir.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)  # the script stops the server it started
        out, err = process.communicate(timeout=120)
    assert not run_dir.exists(), f"Triton was started:\n{out}{err}"
    assert process.returncode == 2, out + err
    # One line, the last, and no traceback (whatever else an import may warn about).
    said = [each for each in err.splitlines() if each.startswith("error:")]
    assert len(said) == 1 and err.splitlines()[-1] == said[0] and "Traceback" not in err, err
    assert not pids_running_from(tmp_path)
    return said[0]


def test_serve_triton_refuses_weights_a_load_would_refuse_before_starting(tmp_path,
                                                                          tiny_model_dir):
    """Weights without a manifest, or without tokenizer_2/: the reason was in a table of
    Triton's log, about 45 lines with stack frames, half a minute later."""
    from sdxl_serve.model_files import MANIFEST

    weights = tmp_path / "weights"
    shutil.copytree(tiny_model_dir, weights)
    (weights / MANIFEST).unlink()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    said = refused_start(tmp_path / "a", ["--model-dir", str(weights)],
                         {"SDXL_MODEL_DIR": ""})
    assert said.startswith(f"error: {weights} has no {MANIFEST}"), said
    shutil.rmtree(weights / "tokenizer_2")
    said = refused_start(tmp_path / "b", [], {"SDXL_MODEL_DIR": str(weights)})
    assert said == (f"error: {weights} has no tokenizer_2/ folder with files; an SDXL "
                    "pipeline needs unet, vae, text_encoder, text_encoder_2 and, beside its "
                    "weights, tokenizer, tokenizer_2, scheduler"), said

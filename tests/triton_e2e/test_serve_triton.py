"""`make serve-triton`'s script: starts on the ports and TMPDIR it is given, prints curl
lines that work as printed, and stops on Ctrl-C leaving no process behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sdxl_serve.triton_server import TritonPorts

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


def test_serve_triton_prints_curl_lines_that_work(tmp_path, tiny_model_dir):
    ports = TritonPorts.free()
    # SDXL_MODEL_DIR: the session's tiny model (without it the script builds build/tiny-sdxl
    # in the checkout, which tests must not write into).
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp"), "SDXL_MODEL_DIR": str(tiny_model_dir),
           "SDXL_TRITON_HTTP_PORT": str(ports.http), "SDXL_TRITON_GRPC_PORT": str(ports.grpc),
           "SDXL_TRITON_METRICS_PORT": str(ports.metrics)}
    (tmp_path / "tmp").mkdir()
    out = open(tmp_path / "out.txt", "wb")
    process = subprocess.Popen([sys.executable, str(REPO / "scripts" / "serve_triton.py")],
                               env=env, stdout=out, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while b"Ctrl-C stops" not in (tmp_path / "out.txt").read_bytes():
            assert process.poll() is None and time.monotonic() < deadline, \
                (tmp_path / "out.txt").read_text()
            time.sleep(0.5)
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
    finally:
        process.send_signal(signal.SIGINT)
        code = process.wait(120)
        out.close()
    assert code == 0, (tmp_path / "out.txt").read_text()[-2000:]
    assert not pids_running_from(tmp_path)

"""Java's heap running out ends TorchServe at once, said in one line, where it left a
half-broken frontend (docs/operations.md, "Out of Java heap")."""

from __future__ import annotations

import subprocess
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from sdxl_serve.management import http
from sdxl_serve.server import CONFIG, Addresses, TorchServeProcess
from serve import serve_in_foreground

pytestmark = pytest.mark.e2e

SHIPPED_VMARGS = "vmargs=-XX:+ExitOnOutOfMemoryError"
# Small enough for bursts of 1 MiB bodies (max_request_size) to fill, large enough to start
# and load the tiny model: measured, 48 of them at once mostly ran it out within a second.
# Netty's direct buffers get room of their own (their limit is the heap's by default): when
# they ran out first, Java went on (the flag acts on the JVM's errors only).
TINY_HEAP = "-Xmx24m -XX:MaxDirectMemorySize=256m"


def test_a_java_out_of_heap_exits_and_the_launcher_says_so(tmp_path, model_store, capsys):
    # Without -XX:+ExitOnOutOfMemoryError the OutOfMemoryError ended only the threads that
    # met it, and the frontend ran on half-broken (docs/operations.md).
    shipped = CONFIG.read_text()
    assert SHIPPED_VMARGS in shipped.splitlines()
    config = tmp_path / "config.properties"
    config.write_text(shipped.replace(SHIPPED_VMARGS, f"{SHIPPED_VMARGS} {TINY_HEAP}"))
    server = TorchServeProcess(tmp_path / "run", model_store, {"sdxl": "sdxl-1.0.mar"},
                               Addresses.free(), config=config,
                               env={"SDXL_WARMUP_SIZES": "32x32", "SDXL_WARMUP_STEPS": "1"})
    stopping = threading.Event()
    answers: Counter = Counter()

    def post(_: int) -> object:
        body = b'{"prompt": "' + b"a" * (2 ** 20 - 20) + b'"}'  # just under the limit
        try:
            return http("POST", f"{server.addresses.inference}/predictions/sdxl",
                        server.keys()["inference"], body, timeout=20, direct=True)[0]
        except OSError as exc:  # the server went away mid-request: what this test wants
            return type(exc).__name__

    def burst(java: subprocess.Popen) -> None:
        # Again until Java has gone: a burst the queue refuses quickly (503) may fit.
        with ThreadPoolExecutor(64) as pool:
            while java.poll() is None and not stopping.is_set():
                answers.update(pool.map(post, range(128)))

    def ready() -> None:
        server.wait_ready("sdxl", timeout=120)
        bursts.append(threading.Thread(target=burst, args=(server.process,)))
        bursts[0].start()
        # Not out of heap by then: the test fails below, not at its pytest timeout.
        give_up.start()

    bursts: list[threading.Thread] = []
    give_up = threading.Timer(40, stopping.set)
    server.start()
    try:
        code = serve_in_foreground("TorchServe", server, stopping, ready,
                                   last_word=server.last_word)
    finally:
        give_up.cancel()
        stopping.set()
        for thread in bursts:
            thread.join()
    assert code == 1, answers
    err = capsys.readouterr().err
    assert ("TorchServe stopped on its own (exit code 3), not by Ctrl-C: it said \"Terminating "
            "due to java.lang.OutOfMemoryError: Java heap space\"") in err, err

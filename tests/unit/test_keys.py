"""TorchServe's key file as our code reads it, and the command line the pod starts Java with."""

from __future__ import annotations

import json
import threading
import time

import pytest

from sdxl_serve.management import KeyFile, read_keys
from sdxl_serve.server import java_command

pytestmark = pytest.mark.unit

KEYS = {"management": {"key": "m"}, "inference": {"key": "i"}, "API": {"key": "a"}}


def test_a_half_written_key_file_is_read_again_until_whole(tmp_path):
    # TorchServe truncates and rewrites the file in place at every renewal.
    path = tmp_path / "key_file.json"
    whole = json.dumps(KEYS)
    path.write_text(whole[:len(whole) // 2])
    # Whole after the first read or two, well inside the 0.2 s the reads span (a loaded
    # machine may wake the timer late).
    finisher = threading.Timer(0.03, path.write_text, args=(whole,))
    finisher.start()
    try:
        assert KeyFile(path, "http://127.0.0.1:9").key("inference") == "i"
    finally:
        finisher.join()


@pytest.mark.parametrize("text", ["", '{"inference": {"ke', '{"inference": 1}', "[]"])
def test_a_key_file_that_stays_broken_is_no_key(tmp_path, text):
    path = tmp_path / "key_file.json"
    path.write_text(text)
    started = time.monotonic()
    assert KeyFile(path, "http://127.0.0.1:9").key("inference") is None
    assert time.monotonic() - started >= 0.15  # it was read again before giving up
    with pytest.raises((ValueError, LookupError, TypeError, AttributeError)):
        read_keys(path, attempts=2, pause_s=0.0)


def test_no_key_file_is_no_key_at_once(tmp_path):
    started = time.monotonic()
    assert KeyFile(tmp_path / "absent.json", "http://127.0.0.1:9").key("api") is None
    # Under the 0.2 s that reading it again would take (four pauses of 0.05 s).
    assert time.monotonic() - started < 0.15


def test_the_java_class_path_has_only_torchserves_jars(tmp_path):
    config = tmp_path / "config.properties"
    config.write_text("vmargs=-Xmx1g\n")
    command = java_command(config, tmp_path, ["sdxl=sdxl-1.0.mar"], env={})
    class_path = command[command.index("-cp") + 1].split(":")
    # TorchServe's launcher puts `.` first: classes in the working directory would load.
    assert class_path and all(entry.startswith("/") and entry.endswith("/ts/frontend/*")
                              for entry in class_path), class_path

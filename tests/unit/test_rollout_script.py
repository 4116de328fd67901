"""rollout.py without a server: how it orders versions, and the README's commands."""

import contextlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rollout import hold_run_lock, version_key

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]


def test_versions_order_numerically_part_by_part():
    versions = ["1.10", "2.0", "1.9", "1.0", "10.0", "1.0.1"]
    assert sorted(versions, key=version_key) == ["1.0", "1.0.1", "1.9", "1.10", "2.0", "10.0"]


def test_text_parts_order_after_numbers_without_failing():
    assert sorted(["1.0-rc1", "1.0-2", "1.0"], key=version_key) == ["1.0", "1.0-2", "1.0-rc1"]


def test_the_documented_rollout_commands_are_make_targets_that_run_rollout_py():
    section = (REPO / "docs" / "rollouts.md").read_text().split("# Rollouts", 1)[1]
    block = re.search(r"```\n(.*?)```", section, re.S).group(1)
    commands = [line.split("#")[0].split() for line in block.splitlines() if line.strip()]
    assert [c[:2] for c in commands] == [["make", "serve"], ["make", "archive"],
                                         ["make", "rollout"], ["make", "rollback"]]
    for command in commands:
        dry = subprocess.run([*command, "-n"], cwd=REPO, capture_output=True, text=True)
        assert dry.returncode == 0, dry.stderr
    rollout = subprocess.run(["make", "-n", *commands[2][1:]], cwd=REPO, capture_output=True,
                             text=True).stdout
    assert "scripts/rollout.py --name 'sdxl' --version '2.0'" in rollout
    rollback = subprocess.run(["make", "-n", "rollback"], cwd=REPO, capture_output=True,
                              text=True).stdout
    assert "scripts/rollout.py --name 'sdxl' --rollback" in rollback


@pytest.mark.parametrize("target", ["serve", "archive", "rollout", "serve-jobs"])
def test_a_model_dir_with_a_quote_or_space_reaches_the_script_whole(target):
    """MODEL_DIR="/data/Bob's models" was cut at its quote: a shell syntax error."""
    import shlex

    model_dir = "/data/Bob's sdxl models"
    dry = subprocess.run(["make", "-n", "-o", ".venv/.installed", target, "VERSION=2.0",
                          f"MODEL_DIR={model_dir}"], cwd=REPO, capture_output=True,
                         text=True)
    line = next(line for line in dry.stdout.splitlines() if "scripts/" in line)
    assert subprocess.run(["bash", "-n", "-c", line]).returncode == 0, line
    words = shlex.split(line)
    assert words[words.index("--model-dir") + 1] == model_dir, line


@pytest.mark.parametrize("content", [b"", b"not a zip archive", "truncated"])
def test_an_archive_that_is_not_a_model_archive_is_refused_without_a_traceback(
        tmp_path, capsys, content):
    from rollout import main

    store = tmp_path / "store"
    store.mkdir()
    mar = store / "sdxl-2.0.mar"
    if content == "truncated":  # a copy cut short: a zip without its central directory
        import zipfile
        with zipfile.ZipFile(mar, "w") as archive:
            archive.writestr("MAR-INF/MANIFEST.json", '{"model": {"modelVersion": "2.0"}}')
            archive.writestr("model/weights.bin", b"x" * 4096)
        mar.write_bytes(mar.read_bytes()[:2000])
    else:
        mar.write_bytes(content)
    # Refused before any call to TorchServe: no server is needed.
    assert main(["--version", "2.0", "--model-store", str(store),
                 "--key-file", str(tmp_path / "key_file.json")]) == 1
    error = capsys.readouterr().err
    assert f"{mar} is not a model archive" in error and "Traceback" not in error
    assert error.rstrip().endswith("build it again with `make archive VERSION=2.0`"), error


def test_prune_keeps_the_versions_that_served_last_and_drops_a_leftover_first():
    from rollout import prune_order

    # 9.0 was registered by a run that was killed and never served; 1.0 served before 2.0.
    assert prune_order("2.0", ["1.0", "2.0", "9.0"], ["1.0", "2.0"]) == ["1.0", "9.0"]
    # A rollback: 1.0 serves again after 2.0, so 2.0 is the one to keep next.
    assert prune_order("1.0", ["1.0", "1.5", "2.0", "3.0"], ["2.0", "1.0"]) == \
        ["2.0", "3.0", "1.5"]
    # Nothing recorded (a server whose rollouts predate the record): the highest first.
    assert prune_order("2.0", ["1.0", "1.10", "2.0", "1.9"], []) == ["1.10", "1.9", "1.0"]


def test_a_rollback_goes_to_what_served_before_and_not_to_what_a_rollback_left(tmp_path):
    # 1.0, 2.0; a rollback to 1.0 (2.0 rejected); then 3.0. `make rollback` went to the
    # highest kept version below 3.0: the rejected 2.0.
    from rollout import ServedVersions, rollback_choice

    served = ServedVersions(tmp_path / "served_versions.json", "api-key")
    kept = {"1.0", "2.0", "3.0"}
    served.record("sdxl", kept, "1.0", "2.0")
    served.record("sdxl", kept, "2.0", "1.0")
    served.mark_rolled_back("sdxl", "2.0")
    served.record("sdxl", kept, "1.0", "3.0")
    assert served.rolled_back("sdxl") == ["2.0"]
    assert rollback_choice("3.0", kept, served.order("sdxl", kept),
                           served.rolled_back("sdxl")) == "1.0"
    # A rollout of 2.0 again makes it a target again; forgetting it clears its mark too.
    served.mark_rolled_back("sdxl", "2.0", left=False)
    assert served.rolled_back("sdxl") == []
    served.mark_rolled_back("sdxl", "2.0")
    served.forget("sdxl", "2.0")
    assert served.rolled_back("sdxl") == [] and served.order("sdxl", kept) == ["1.0", "3.0"]
    # Marks belong to one server run, as the history does.
    served.mark_rolled_back("sdxl", "1.0")
    assert ServedVersions(tmp_path / "served_versions.json", "next").rolled_back("sdxl") == []
    # Chained rollbacks go one further back each time: 1, 2, 3, 4, then back, back.
    chain = ServedVersions(tmp_path / "chain.json", "api-key")
    kept = {"1.0", "2.0", "3.0", "4.0"}
    chain.record("sdxl", kept, "1.0", "2.0", "3.0", "4.0")
    for default, target in (("4.0", "3.0"), ("3.0", "2.0"), ("2.0", "1.0")):
        assert rollback_choice(default, kept, chain.order("sdxl", kept),
                               chain.rolled_back("sdxl")) == target
        chain.record("sdxl", kept, default, target)
        chain.mark_rolled_back("sdxl", default)
    assert rollback_choice("1.0", kept, chain.order("sdxl", kept),
                           chain.rolled_back("sdxl")) is None


def test_served_versions_belong_to_one_server_run_and_to_registered_versions(tmp_path):
    from rollout import ServedVersions

    path = tmp_path / "served_versions.json"
    served = ServedVersions(path, "api-key-of-this-run")
    served.record("sdxl", {"1.0", "2.0"}, "1.0", "2.0")
    served.record("sdxl", {"1.0", "2.0"}, "2.0", "1.0")  # a rollback
    assert served.order("sdxl", {"1.0", "2.0", "9.0"}) == ["2.0", "1.0"]
    assert served.order("other", {"1.0"}) == []
    # A version no longer registered does not count, and one unregistered is forgotten.
    assert served.order("sdxl", {"1.0"}) == ["1.0"]
    served.forget("sdxl", "2.0")
    assert served.order("sdxl", {"1.0", "2.0"}) == ["1.0"]
    # The server started again (a new API key): what served before is not this run's.
    assert ServedVersions(path, "api-key-of-the-next-run").order("sdxl", {"1.0"}) == []
    # Without a key nothing is recorded, and a damaged file is no history.
    ServedVersions(tmp_path / "none.json", None).record("sdxl", {"1.0"}, "1.0")
    assert not (tmp_path / "none.json").exists()
    path.write_text("{not json")
    assert served.order("sdxl", {"1.0"}) == []


def test_a_restart_that_serves_another_version_than_the_last_rollout_says_so(tmp_path,
                                                                            capsys):
    """TorchServe remembers no default version: `make serve` after a rollout to 2.0
    serves VERSION (1.0 unless given), silently before."""
    from rollout import ServedVersions
    from serve import say_last_default

    served = ServedVersions(tmp_path / "served_versions.json", "api-key-of-the-last-run")
    served.record("sdxl", {"1.0", "2.0"}, "1.0", "2.0")
    say_last_default(tmp_path, "sdxl", "1.0")
    assert ("served sdxl 2.0 (made the default by scripts/rollout.py); this one serves 1.0. "
            "To serve 2.0: make serve VERSION=2.0") in capsys.readouterr().out
    for quiet in (("sdxl", "2.0"), ("other", "1.0")):
        say_last_default(tmp_path, *quiet)
        assert capsys.readouterr().out == ""
    say_last_default(tmp_path / "no-record-here", "sdxl", "1.0")
    assert capsys.readouterr().out == ""
    say_last_default(tmp_path, "sdxl", "1.0", "make serve-jobs")
    assert "To serve 2.0: make serve-jobs VERSION=2.0" in capsys.readouterr().out


def test_the_restart_note_is_said_once_not_at_every_start(tmp_path, capsys):
    """The record is the server's before; once this server is READY it goes, or every
    later start would say that the server before it served 2.0."""
    import json

    from rollout import ServedVersions
    from serve import drop_previous_record, say_last_default

    record = tmp_path / "served_versions.json"
    ServedVersions(record, "api-key-of-the-last-run").record("sdxl", {"1.0", "2.0"},
                                                             "1.0", "2.0")
    keys = tmp_path / "key_file.json"
    keys.write_text(json.dumps({"API": {"key": "api-key-of-the-last-run"}}))
    drop_previous_record(tmp_path)  # the same run (the key file not rewritten yet): kept
    assert record.exists()
    keys.write_text(json.dumps({"API": {"key": "api-key-of-this-run"}}))
    say_last_default(tmp_path, "sdxl", "1.0")
    assert "served sdxl 2.0" in capsys.readouterr().out
    drop_previous_record(tmp_path)
    say_last_default(tmp_path, "sdxl", "1.0")
    assert capsys.readouterr().out == "" and not record.exists()
    # A rollout of this run writes its own record, which stays.
    ServedVersions(record, "api-key-of-this-run").record("sdxl", {"1.0", "3.0"}, "1.0",
                                                         "3.0")
    drop_previous_record(tmp_path)
    assert ServedVersions(record, "api-key-of-this-run").last_default("sdxl") == "3.0"


def test_a_worker_process_replaced_before_it_was_ready_is_a_failed_load():
    from rollout import replaced_worker

    def workers(pid, status="UNLOADING"):  # describe's fields, as TorchServe 0.12 shows them
        return [{"id": "9001", "startTime": "2026-12-01T18:09:57.493Z", "status": status,
                 "memoryUsage": 0, "pid": pid, "gpu": False, "gpuUsage": "N/A"}]

    first: dict = {}
    assert replaced_worker(first, workers(-1)) is None  # its process has not started yet
    assert replaced_worker(first, workers(6861)) is None  # loading
    assert replaced_worker(first, workers(6861)) is None
    assert "process 6861 ended before it was READY and TorchServe started 6967" in \
        replaced_worker(first, workers(6967))
    assert replaced_worker({}, workers(6967, "READY")) is None


def test_the_cause_of_a_failed_load_is_the_handlers_exception_not_torchserves():
    from rollout import load_cause

    handler = ["Traceback (most recent call last):", '  File "/x/handler.py", line 3',
               "ValueError: setting device must be one of auto, cpu, cuda,",
               "  got 'no-such-device'"]
    caught = ["Traceback (most recent call last):", '  File "/x/ts/model_service_worker.py"',
              "RuntimeError: 500 - Unknown exception"]
    assert load_cause("\n".join(handler) + "\n\n" + "\n".join(caught)) == \
        "ValueError: setting device must be one of auto, cpu, cuda, got 'no-such-device'"
    assert load_cause("Load model failed: sdxl, error: Worker died.") == \
        "Load model failed: sdxl, error: Worker died."
    assert load_cause("\n".join(caught)) == ""  # TorchServe's own: no cause to give
    assert load_cause("\n".join(caught).replace("500 - Unknown exception",
                                                "507 - System out of memory")) == ""


def test_one_rollout_at_a_time_per_model_and_server(tmp_path):
    """Two at once each drained the version the other had made the default: no version
    had a worker left, and both said done. The second now stops before it calls the
    server, naming the first; once the first ends, it runs."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "key_file.json").write_text(
        '{"management": {"key": "m"}, "inference": {"key": "i"}, "API": {"key": "a"}}')

    def rollout() -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, str(REPO / "scripts" / "rollout.py"), "--version", "2.0",
             "--key-file", str(run_dir / "key_file.json"), "--model-store", str(tmp_path)],
            capture_output=True, text=True, timeout=60)

    first = hold_run_lock(run_dir, "sdxl")
    try:
        second = rollout()
    finally:
        first.close()
    assert second.returncode == 1
    assert second.stderr.strip() == (
        f"rollout failed: another rollout or rollback of sdxl is running on this server "
        f"(pid {os.getpid()}); wait for it to end, then run this again"), second.stderr
    after = rollout()  # the lock is free: it goes on, to the missing archive
    assert after.returncode == 1 and "no archive" in after.stderr, after.stderr


@pytest.mark.parametrize("script", ["rollout.py", "build_archive.py"])
@pytest.mark.parametrize("version", ["9" * 65, "2.0+b1", "../x", "a/b", "x y", ""])
def test_a_version_the_archiver_or_a_file_name_cannot_take_is_refused_by_name(script, version):
    done = subprocess.run([sys.executable, str(REPO / "scripts" / script), "--version",
                           version], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "argument --version: must be 1 to 64 letters, digits and . _ -" in done.stderr


def signals_as_a_terminal_leaves_them() -> None:
    """SIGHUP and SIGTERM at their defaults in the child: a suite run under `nohup` (or by
    a CI runner that ignores SIGHUP) passes SIGHUP on ignored, and rollout.py keeps an
    ignored SIGHUP ignored."""
    import signal

    for stop in (signal.SIGHUP, signal.SIGTERM):
        signal.signal(stop, signal.SIG_DFL)


@contextlib.contextmanager
def rollout_in_a_call(tmp_path, preexec_fn=signals_as_a_terminal_leaves_them):
    """rollout.py of 2.0 (``preexec_fn``: run in the child before it starts), held in its
    first call to a management API that takes the connection and never answers, as in a
    long step."""
    import socket
    import zipfile

    with zipfile.ZipFile(tmp_path / "sdxl-2.0.mar", "w") as archive:
        archive.writestr("MAR-INF/MANIFEST.json", '{"model": {"modelVersion": "2.0"}}')
    (tmp_path / "key_file.json").write_text(
        '{"management": {"key": "m"}, "inference": {"key": "i"}, "API": {"key": "a"}}')
    with socket.create_server(("127.0.0.1", 0)) as silent:
        address = f"http://127.0.0.1:{silent.getsockname()[1]}"
        script = subprocess.Popen(
            [sys.executable, str(REPO / "scripts" / "rollout.py"), "--version", "2.0",
             "--key-file", str(tmp_path / "key_file.json"), "--model-store", str(tmp_path)],
            env=dict(os.environ, TS_MANAGEMENT_ADDRESS=address), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, preexec_fn=preexec_fn)
        try:
            silent.settimeout(60)
            connection, _ = silent.accept()  # its first call, never answered
            with connection:
                yield script
        finally:
            script.kill()


@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM", "SIGHUP"])
def test_ctrl_c_says_what_to_do_instead_of_a_traceback(tmp_path, stop):
    """Interrupted in a call to a server that does not answer, as in a long step. SIGTERM
    (a CI job cancelled, `timeout`) and SIGHUP ended it without a word, exit 143 or 129."""
    import signal

    with rollout_in_a_call(tmp_path) as script:
        script.send_signal(getattr(signal, stop))
        _, stderr = script.communicate(timeout=60)
    assert script.returncode == 128 + getattr(signal, stop) and "Traceback" not in stderr, \
        stderr
    # The server does not answer: what serves cannot be said, nor is `make rollback`
    # offered (no undo of a run stopped halfway).
    assert stderr.strip() == ("rollout interrupted: the server is left as it was at this "
                              "point; run the same command again to finish it")


def test_a_rollout_run_under_nohup_outlives_its_terminal(tmp_path):
    """SIGHUP ignored (`nohup make rollout`) stays ignored: the handler that makes SIGHUP
    say what to do was put over it, and the run ended with its terminal (exit 129)."""
    import signal

    with rollout_in_a_call(tmp_path, preexec_fn=lambda: signal.signal(signal.SIGHUP,
                                                                       signal.SIG_IGN)) \
            as script:
        script.send_signal(signal.SIGHUP)
        with pytest.raises(subprocess.TimeoutExpired):
            script.wait(timeout=6)  # interrupted, it asks what serves (3 s) and ends
        script.send_signal(signal.SIGTERM)
        _, stderr = script.communicate(timeout=60)
    assert script.returncode == 128 + signal.SIGTERM, stderr


def test_main_run_in_process_leaves_the_signal_handlers_as_it_found_them(tmp_path,
                                                                         monkeypatch):
    import signal

    from rollout import main
    from sdxl_serve.server import free_port

    before = {stop: signal.getsignal(stop) for stop in (signal.SIGTERM, signal.SIGHUP)}
    (tmp_path / "key_file.json").write_text(
        '{"management": {"key": "m"}, "inference": {"key": "i"}, "API": {"key": "a"}}')
    monkeypatch.setenv("TS_MANAGEMENT_ADDRESS", f"http://127.0.0.1:{free_port()}")
    assert main(["--version", "2.0", "--key-file", str(tmp_path / "key_file.json"),
                 "--model-store", str(tmp_path)]) == 1  # nothing listens there
    assert {stop: signal.getsignal(stop) for stop in before} == before


def test_a_damaged_deflated_member_is_named_not_raised(tmp_path):
    """testzip() raises zlib.error for a deflated member whose bytes are damaged, where a
    stored one fails its CRC: either way the rollout names the archive as damaged."""
    import zipfile

    from rollout import damaged_member

    mar = tmp_path / "sdxl-2.0.mar"
    text = "".join(f"line {n} of a handler\n" for n in range(2000)).encode()
    with zipfile.ZipFile(mar, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("sdxl_serve/handler.py", text)
    with zipfile.ZipFile(mar) as archive:
        info = archive.getinfo("sdxl_serve/handler.py")
    start = info.header_offset + 30 + len(info.filename)
    for offset in range(0, info.compress_size, max(1, info.compress_size // 40)):
        data = bytearray(mar.read_bytes())
        original = data[start + offset]
        data[start + offset] ^= 0xFF
        damaged = tmp_path / "damaged.mar"
        damaged.write_bytes(data)
        found = damaged_member(damaged)
        assert found and ("sdxl_serve/handler.py" in found or "error" in found), found
        assert data[start + offset] != original


def test_a_rollout_to_a_server_that_is_gone_says_so(tmp_path):
    """A server killed outright leaves its key file: the rollout's first call is refused,
    and it said only "Connection refused"."""
    import zipfile

    from sdxl_serve.server import free_port

    with zipfile.ZipFile(tmp_path / "sdxl-2.0.mar", "w") as archive:
        archive.writestr("MAR-INF/MANIFEST.json", '{"model": {"modelVersion": "2.0"}}')
    (tmp_path / "key_file.json").write_text(
        '{"management": {"key": "m"}, "inference": {"key": "i"}, "API": {"key": "a"}}')
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "rollout.py"), "--version", "2.0",
         "--key-file", str(tmp_path / "key_file.json"), "--model-store", str(tmp_path)],
        env=dict(os.environ, TS_MANAGEMENT_ADDRESS=f"http://127.0.0.1:{free_port()}"),
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "Connection refused" in done.stderr
    assert "is TorchServe running on these addresses?" in done.stderr, done.stderr


@pytest.mark.parametrize("answer, named", [
    # TorchServe killed mid-reply: fewer bytes than its Content-Length said.
    (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
     b'[{"modelName', "IncompleteRead(12 bytes read, 988 more expected)"),
    # Something else on the port, answering no HTTP at all.
    (b"SSH-2.0-OpenSSH_9.6\r\n", "BadStatusLine('SSH-2.0-OpenSSH_9.6\\r\\n')"),
], ids=["cut-short", "not-http"])
def test_a_server_that_dies_mid_reply_is_one_rollout_failed_line(tmp_path, answer, named):
    """http.client's IncompleteRead and BadStatusLine are no OSError: they were a
    traceback, where a server that refused the connection was one line."""
    import zipfile

    from faulty_link import CannedAnswer

    with zipfile.ZipFile(tmp_path / "sdxl-2.0.mar", "w") as archive:
        archive.writestr("MAR-INF/MANIFEST.json", '{"model": {"modelVersion": "2.0"}}')
    (tmp_path / "key_file.json").write_text(
        '{"management": {"key": "m"}, "inference": {"key": "i"}, "API": {"key": "a"}}')
    server = CannedAnswer(answer)
    try:
        done = subprocess.run(
            [sys.executable, str(REPO / "scripts" / "rollout.py"), "--version", "2.0",
             "--key-file", str(tmp_path / "key_file.json"), "--model-store", str(tmp_path)],
            env=dict(os.environ, TS_MANAGEMENT_ADDRESS=server.address),
            capture_output=True, text=True, timeout=60)
    finally:
        server.close()
    assert done.returncode == 1
    assert "Traceback" not in done.stderr, done.stderr
    last = done.stderr.splitlines()[-1]
    assert last.startswith("rollout failed: GET ") and named in last, done.stderr
    assert done.stderr.endswith(last + "\n"), done.stderr  # one line: no CR LF read printed


def test_a_rollout_calls_the_server_straight_not_through_the_proxy(tmp_path):
    """With HTTP_PROXY set (an egress proxy, NO_PROXY unset), every management call went
    to the proxy with the management key, 127.0.0.1 included, and a proxy that could not
    reach the server failed the rollout in its own words ("Remote end closed connection"),
    not as a server that is not running."""
    import zipfile

    from forward_proxy import ForwardProxy
    from sdxl_serve.server import free_port

    with zipfile.ZipFile(tmp_path / "sdxl-2.0.mar", "w") as archive:
        archive.writestr("MAR-INF/MANIFEST.json", '{"model": {"modelVersion": "2.0"}}')
    (tmp_path / "key_file.json").write_text(
        '{"management": {"key": "m"}, "inference": {"key": "i"}, "API": {"key": "a"}}')
    proxy = ForwardProxy()
    env = {name: value for name, value in os.environ.items()
           if name.lower() not in ("no_proxy", "all_proxy")}
    env.update({name: proxy.address for name in ("HTTP_PROXY", "http_proxy")},
               TS_MANAGEMENT_ADDRESS=f"http://127.0.0.1:{free_port()}")
    try:
        done = subprocess.run(
            [sys.executable, str(REPO / "scripts" / "rollout.py"), "--version", "2.0",
             "--key-file", str(tmp_path / "key_file.json"), "--model-store", str(tmp_path)],
            env=env, capture_output=True, text=True, timeout=60)
    finally:
        proxy.close()
    assert proxy.asked == []
    assert done.returncode == 1
    assert "is TorchServe running on these addresses?" in done.stderr, done.stderr


def test_a_rollout_says_which_weights_and_refuses_others_than_model_dir(tmp_path):
    """`make rollout VERSION=4.0 MODEL_DIR=...` of an archive built without MODEL_DIR rolled
    out the tiny random model under 4.0, and a missing archive's hint built just that."""
    import zipfile

    from sdxl_serve.server import free_port

    weights = tmp_path / "sdxl weights"  # a space, as the Makefile now quotes it
    weights.mkdir()

    def archive(version: str, model_dir: Path | None) -> None:
        with zipfile.ZipFile(tmp_path / f"sdxl-{version}.mar", "w") as mar:
            mar.writestr("MAR-INF/MANIFEST.json",
                         json.dumps({"model": {"modelVersion": version}}))
            handler = {"model_dir": str(model_dir)} if model_dir else {}
            mar.writestr("model-config.yaml", json.dumps({"handler": handler}))

    archive("4.0", None)  # the tiny model, packed
    archive("5.0", weights)
    archive("6.0", tmp_path / "gone")
    (tmp_path / "key_file.json").write_text(
        '{"management": {"key": "m"}, "inference": {"key": "i"}, "API": {"key": "a"}}')

    def rollout(version: str, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, str(REPO / "scripts" / "rollout.py"), "--version", version,
             "--key-file", str(tmp_path / "key_file.json"), "--model-store", str(tmp_path),
             *extra],
            env=dict(os.environ, TS_MANAGEMENT_ADDRESS=f"http://127.0.0.1:{free_port()}"),
            capture_output=True, text=True, timeout=60)

    done = rollout("4.0", "--model-dir", str(weights))
    assert done.returncode == 1
    assert done.stderr.strip() == (
        "rollout failed: sdxl-4.0.mar serves the embedded tiny model (MODEL_DIR=... serves "
        f"other weights), not the weights in {weights}: build it with `make archive "
        f"VERSION=4.0 MODEL_DIR='{weights}'`"), done.stderr  # quoted: it holds a space
    done = rollout("7.0", "--model-dir", str(weights))
    assert f"build it first with `make archive VERSION=7.0 MODEL_DIR='{weights}'`" in \
        done.stderr, done.stderr
    done = rollout("6.0")
    assert done.stderr.strip() == (f"rollout failed: sdxl-6.0.mar serves the weights in "
                                   f"{tmp_path / 'gone'}, which are gone"), done.stderr
    # The right weights pass this check and go on to the server (gone here).
    done = rollout("5.0", "--model-dir", str(weights))
    assert f"sdxl-5.0.mar serves the weights in {weights}" in done.stdout, done.stdout
    assert "is TorchServe running on these addresses?" in done.stderr, done.stderr


@pytest.mark.parametrize("option, value, said", [
    ("--check-steps", "0", "--check-steps: `num_inference_steps` must be an integer from 1 to "
                           "100, got 0"),
    ("--check-steps", "1000", "got 1000"),
    ("--load-timeout", "-1",
     "argument --load-timeout: must be a number of seconds above 0, got '-1'"),
    ("--load-timeout", "0",
     "argument --load-timeout: must be a number of seconds above 0, got '0'"),
    ("--load-timeout", "nan",
     "argument --load-timeout: must be a number of seconds above 0, got 'nan'"),
    ("--drain-timeout", "-5",
     "argument --drain-timeout: must be a number of seconds from 0, got '-5'"),
    ("--drain-timeout", "inf",
     "argument --drain-timeout: must be a number of seconds from 0, got 'inf'"),
    ("--workers", "0", "--workers must be at least 1"),
])
def test_an_option_the_rollout_cannot_use_is_refused_before_it_calls_the_server(
        tmp_path, option, value, said):
    """A check step count the server refuses failed the check only after the version had
    loaded (minutes with SDXL), and a negative timeout ended in a traceback."""
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "rollout.py"), "--version", "2.0",
         "--model-store", str(tmp_path), "--key-file", str(tmp_path / "key_file.json"),
         option, value],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "TS_INFERENCE_ADDRESS": "http://127.0.0.1:9",
             "TS_MANAGEMENT_ADDRESS": "http://127.0.0.1:9"})
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert said in done.stderr, done.stderr


def test_a_wait_for_an_unlisted_retry_ends_when_torchserve_no_longer_answers(tmp_path,
                                                                              capsys):
    """TorchServe stopped while the rollout waited out its retry of a failed load: its logs
    said nothing more, and the wait went on for the whole --load-timeout."""
    import time

    from rollout import ModelServer, Rollout
    from sdxl_serve.server import Addresses, LoadWatch, free_port

    gone = f"http://127.0.0.1:{free_port()}"  # a stopped server: nothing listens there
    (tmp_path / "key_file.json").write_text(
        '{"management": {"key": "m"}, "inference": {"key": "i"}, "API": {"key": "a"}}')
    logs = tmp_path / "logs"
    logs.mkdir()
    load = LoadWatch(logs)

    def thread_line(thread: str, text: str) -> str:
        return (f"2026-12-07T11:40:01,000 [DEBUG] {thread} "
                f"org.pytorch.serve.wlm.WorkerThread - {text}\n")

    # A failed load scaled down during its retry's back-off: the retry is planned.
    (logs / "ts_log.log").write_text("".join([
        thread_line("W-9008-sdxl_8.1", "W-9008-sdxl_8.1 State change WORKER_ERROR -> "
                                       "WORKER_STOPPED"),
        thread_line("W-9008-sdxl_8.1", "Retry worker: 9008 in 1 seconds."),
        thread_line("epollEventLoopGroup-3-2", "W-9008-sdxl_8.1 State change WORKER_STOPPED "
                                               "-> WORKER_SCALED_DOWN")]))
    server = ModelServer(Addresses(gone, gone, gone), tmp_path / "key_file.json", "sdxl")
    rollout = Rollout(server, tmp_path, load_timeout=120)
    started = time.monotonic()
    left = rollout.wait_out_unlisted_retry("8.1", load)
    assert time.monotonic() - started < 10
    assert left.startswith("; TorchServe stopped answering while its retry of 8.1's load ran"), \
        left
    assert "Connection refused" in left
    assert "TorchServe no longer answers" in capsys.readouterr().out

"""`make serve-jobs` as a user runs it: the curl lines it prints work as printed (submit,
watch, fetch, cancel), `generate.py --async` makes the image, Ctrl-C stops everything; our
Redis on the port SDXL_REDIS_PORT names, a port taken or no port refused in one line."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from lifetimes import Started, killed_mid_rewrite
from sdxl_serve.cancellation import process_running
from sdxl_serve.server import Addresses
from sdxl_jobs.processes import Managed, StartError, free_port, wait_http

pytestmark = [pytest.mark.jobs, pytest.mark.e2e]

REPO = Path(__file__).resolve().parents[2]


def read_until(process: subprocess.Popen, marker: str, timeout: float) -> str:
    """The script's output up to the line holding ``marker``."""
    deadline, seen = time.monotonic() + timeout, []
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            if process.poll() is not None:
                break
            continue
        seen.append(line)
        if marker in line:
            return "".join(seen)
    raise AssertionError(f"no {marker!r} within {timeout:.0f} s:\n{''.join(seen)}")


def shell(line: str, cwd: Path, env: dict) -> str:
    done = subprocess.run(["bash", "-c", line], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def serve_jobs_command(tmp_path: Path, **settings: str) -> tuple[list[str], dict]:
    """serve_jobs.py with its model store, run and temp directories under ``tmp_path``, and
    the environment it runs in: every server on a free loopback port, ``settings`` added."""
    addresses = Addresses.free()
    env = {**os.environ, "TS_INFERENCE_ADDRESS": addresses.inference,
           "TS_MANAGEMENT_ADDRESS": addresses.management,
           "TS_METRICS_ADDRESS": addresses.metrics,
           "SDXL_JOBS_ADDRESS": f"http://127.0.0.1:{free_port()}",
           "TMPDIR": str(tmp_path / "tmp"), "PYTHONUNBUFFERED": "1", **settings}
    return [sys.executable, str(REPO / "scripts" / "serve_jobs.py"), "--model-store",
            str(tmp_path / "store"), "--run-dir", str(tmp_path / "run")], env


def start_serve_jobs(model_store: Path, tmp_path: Path, **settings: str
                     ) -> tuple[Started, str, dict]:
    """serve_jobs.py (``serve_jobs_command``) with its own copy of ``model_store``, its
    output piped: the ``Started`` (whatever serve_jobs.py leaves, TorchServe and Redis in
    sessions of their own, is ended by its ``stop``, even when a test fails half-way), the
    job API's address and the environment it runs in."""
    command, env = serve_jobs_command(tmp_path, **settings)
    (tmp_path / "tmp").mkdir()
    shutil.copytree(model_store, tmp_path / "store")
    serve_jobs = Started(command, cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT).start()
    return serve_jobs, env["SDXL_JOBS_ADDRESS"], env


def test_serve_jobs_prints_curl_lines_that_work(model_store, tmp_path):
    # Our Redis on a port of the operator's choosing (it took a free one each start, so
    # nothing outside could be pointed at it); test_a_killed_serve_jobs... runs without.
    redis_port = free_port()
    serve_jobs, jobs_address, env = start_serve_jobs(model_store, tmp_path,
                                                     SDXL_REDIS_PORT=str(redis_port))
    process = serve_jobs.process
    pids = []
    # As docs/jobs.md has an operator reach it with a tool of theirs.
    redis_cli = (f"REDISCLI_AUTH=$(cat {tmp_path / 'run' / 'jobs' / 'redis-password'}) "
                 f"redis-cli -p {redis_port} ping")
    try:
        banner = read_until(process, "Ctrl-C stops everything", 420)
        assert f"starting Redis on 127.0.0.1:{redis_port} " in banner
        assert shell(redis_cli, tmp_path, env).strip() == "PONG"
        lines = [line.strip() for line in banner.splitlines() if line.startswith("  ")]
        submit = next(line for line in lines if line.startswith("JOB=$("))
        key_file = tmp_path / "run" / "jobs" / "api-key"
        assert oct(key_file.stat().st_mode & 0o777) == "0o600"
        watch = next(line for line in lines if line.endswith("/v1/jobs/$JOB/events"))
        show = next(line for line in lines if line.endswith("/v1/jobs/$JOB")
                    and "DELETE" not in line)
        fetch = next(line for line in lines if "-o out.png" in line)
        cancel = next(line for line in lines if "DELETE" in line)
        # Pasted in order into one shell: submit, watch to the end, the job, the image.
        out = shell("\n".join([submit, watch, show, fetch]), tmp_path, env)
        assert "event: progress" in out and '"status": "succeeded"' in out
        assert (tmp_path / "out.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        # The playground is where the banner says (docs/playground.md).
        assert f"playground: {jobs_address}/ " in banner
        page = shell(f"curl -sf {jobs_address}/", tmp_path, env)
        assert "<title>SDXL playground</title>" in page
        # Cancel: a job with many steps, canceled while it waits or runs.
        slow = submit.replace('"seed": 42}', '"seed": 43, "num_inference_steps": 100}')
        out = shell("\n".join([slow, cancel]), tmp_path, env)
        canceled = json.loads(out.splitlines()[-1])
        assert canceled["status"] == "canceled"
        # The command-line client through the job API.
        client = next(line for line in lines if "--async" in line)
        # (printed for the checkout's root, where `make serve-jobs` runs)
        out = shell(client + f" --steps 3 --seed 5 -o {tmp_path / 'async.png'}", REPO, env)
        assert "seed=5" in out and (tmp_path / "async.png").exists()
        # Another API key, made on this start's Redis by the line printed for it.
        make = next(line for line in lines if "sdxl_jobs.keys create" in line)
        other = shell(make, tmp_path, env).strip()
        listed = shell(f"printf 'Authorization: Bearer %s' {other} | curl -sf -H @- "
                       f"{jobs_address}/v1/jobs", tmp_path, env)
        assert json.loads(listed)["jobs"] == []  # one key never sees another's jobs
        # Our Redis keeps its append-only file: no start warns that a restart loses jobs.
        for log in ("api.log", "dispatcher.log"):
            said = (tmp_path / "run" / "jobs" / log).read_text()
            assert "job store" in said and "appendonly no" not in said, said[-2000:]
        names = {child.pid: " ".join(child.cmdline()) for child in
                 psutil.Process(process.pid).children(recursive=True)}
        pids = list(names)
        for part in ("redis-server", "sdxl_jobs.dispatcher", "sdxl_jobs.api", "java"):
            assert any(part in line for line in names.values()), names
        # A dispatcher or an API that dies is started again; the stack goes on serving (it
        # stopped everything before).
        # So is our Redis (it stayed dead, every call a 503, and nothing said so), from its
        # append-only file: the jobs it had are still there.
        for part, name in (("sdxl_jobs.dispatcher", "the dispatcher"),
                           ("sdxl_jobs.api", "the API"), ("redis-server", "Redis")):
            (pid,) = [pid for pid, line in names.items() if part in line]
            os.kill(pid, signal.SIGKILL)
            restarted = read_until(process, f"{name} exited; started it again", 30)
            pids.append(int(restarted.rsplit("(pid ", 1)[1].split(";")[0]))
        shell(f"for i in $(seq 100); do curl -sf {jobs_address}/v1/health?dispatchers=0 "
              "> /dev/null && break; sleep 0.2; done", tmp_path, env)
        out = shell("\n".join([submit, watch]), tmp_path, env)
        assert '"status": "succeeded"' in out
        assert shell(redis_cli, tmp_path, env).strip() == "PONG"  # started again on its port
        kept = shell(f"sed 's/^/Authorization: Bearer /' {key_file} | curl -sf -H @- "
                     f"{jobs_address}/v1/jobs/{canceled['id']}", tmp_path, env)
        assert json.loads(kept)["status"] == "canceled"
    finally:
        process.send_signal(signal.SIGINT)
        try:
            code = process.wait(60)
            left = still_running(pids, 10)  # Ctrl-C stopped everything, by itself
        finally:
            serve_jobs.stop(grace_s=0)  # what it did not stop (found nothing if it passed)
    assert code == 0
    assert not left, [names[pid] for pid in left]


def test_a_killed_serve_jobs_takes_everything_it_started_with_it(model_store, tmp_path):
    # SIGKILL (kill -9, the OOM killer) leaves no handler to run: Redis, the API and the
    # dispatcher, each in a session of its own, went on running (Redis holding its data
    # directory, so the next `make serve-jobs` refused to start), only TorchServe's Java
    # ended with its launcher.
    serve_jobs, _, _ = start_serve_jobs(model_store, tmp_path)
    process = serve_jobs.process
    try:
        read_until(process, "Ctrl-C stops everything", 420)
        children = psutil.Process(process.pid).children(recursive=True)
        names = {child.pid: " ".join(child.cmdline()) for child in children}
        for part in ("redis-server", "sdxl_jobs.dispatcher", "sdxl_jobs.api", "java"):
            assert any(part in line for line in names.values()), names
        process.kill()
        process.wait(30)
        # Within the dispatcher's drain (8 s) and Java's stop of its workers, with room for
        # a busy machine.
        _, left = psutil.wait_procs(children, timeout=60)
        left = [p for p in left if p.status() != psutil.STATUS_ZOMBIE]
        assert not left, [names[p.pid] for p in left]
    finally:
        serve_jobs.stop(grace_s=0)  # what the kill left, after the check that it left nothing


def test_a_redis_that_cannot_start_again_stops_everything_saying_why(model_store, tmp_path):
    """Our Redis dies and cannot start again (here its port was taken meanwhile; a damaged
    append-only file alike; a full disk waits for room instead, as the test above): waiting
    would not help and the API would answer only 503s, so everything stops, as before; but
    the line says that Redis could not be
    started again, that its jobs are kept, and Redis's own reason, where it was `error:
    redis-server exited:` and 30 lines of Redis's log, the run before's included."""
    redis_port = free_port()
    serve_jobs, _, _ = start_serve_jobs(model_store, tmp_path, SDXL_REDIS_PORT=str(redis_port))
    process = serve_jobs.process
    taken = None
    try:
        read_until(process, "Ctrl-C stops everything", 420)
        children = psutil.Process(process.pid).children(recursive=True)
        (redis,) = [child for child in children if "redis-server" in child.name()]
        redis.kill()
        # Taken as soon as the dying Redis lets go of it, within serve-jobs' look each second
        # (waiting for the process would wait for serve-jobs to see it gone, and start it).
        deadline = time.monotonic() + 5
        while taken is None:
            try:
                taken = socket.create_server(("127.0.0.1", redis_port))
            except OSError:
                assert time.monotonic() < deadline, "Redis kept its port"
                time.sleep(0.001)
        said = read_until(process, "could not be started again", 60)
        assert process.wait(60) == 1
        left = still_running([child.pid for child in children], 30)
        assert not left, left
    finally:
        if taken is not None:
            taken.close()
        serve_jobs.stop(grace_s=0)
    data_dir = tmp_path / "run" / "jobs" / "redis"
    assert said.splitlines()[-1] == (
        f"error: Redis exited and could not be started again, so everything stops (every "
        f"job it accepted is in its append-only file in {data_dir}, for the next start): "
        f"redis-server exited: Warning: Could not create server TCP listening socket "
        f"127.0.0.1:{redis_port}: bind: Address already in use; Failed listening on port "
        f"{redis_port} (TCP), aborting."), said


def test_our_redis_exited_on_a_full_disk_waits_for_room_and_starts_again(full_disk, capsys):
    """Our Redis (`appendfsync always`) exits at the first write its disk refuses. It was
    started again at once, died at the next write (a dispatcher's check-in, within
    seconds), and its third exit within a minute stopped everything, TorchServe and the
    running jobs included, for a disk a person may free minutes later. Here serve-jobs'
    look of each second, on a real full disk: it waits, says so once, and starts Redis
    again once there is room, every accepted job still there."""
    import redis
    from serve_jobs import Restarts
    from sdxl_jobs.processes import RedisServer

    ours = RedisServer(full_disk.path / "redis", room_bytes=2 ** 20)
    ours.start()
    try:
        client = redis.Redis.from_url(ours.url, socket_timeout=10)
        client.set("accepted", "kept")
        restarts = Restarts([("Redis", ours)], ours)
        full_disk.fill()
        for _ in range(4):  # a write each second, as the dispatchers' check-ins
            with pytest.raises(redis.ConnectionError):
                client.set("refused", "x" * 10_000)
            ours.process.wait(10)
            assert restarts.look() is None
        said = capsys.readouterr().err.splitlines()
        assert len(said) == 1 and said[0].startswith("Redis exited: its disk is full ("), said
        assert "AOF write error" in ours.tail(), ours.tail()  # Redis's own reason, in its log
        full_disk.free()
        assert restarts.look() is None
        assert client.get("accepted") == b"kept" and client.get("refused") is None
        assert client.set("after", "room")
        said = capsys.readouterr().err.splitlines()
        assert len(said) == 1 and said[0].startswith("Redis started again: its disk has room")
        assert restarts.exits["Redis"] == []  # the disk's exits are not Redis's
    finally:
        ours.stop()


def test_a_first_start_on_a_full_disk_names_the_secret_it_cannot_write(model_store, full_disk,
                                                                         redis_server, tmp_path):
    """The run directory on a real full disk at a first start: our Redis's password, then
    (with SDXL_REDIS_URL) the API key cannot be written. Each is one `error:` line naming the
    file and the reason, exit 1, and no file is left, whole or cut short: each was a
    traceback that left the file made and empty, which the next start read as the
    password (an empty one) or refused as a key file holding no key."""
    import asyncio

    from sdxl_jobs.store import JobStore

    async def registered() -> list[dict]:
        store = JobStore.from_url(redis_server.url)
        try:
            return await store.keys()
        finally:
            await store.close()

    command, env = serve_jobs_command(tmp_path)
    run = full_disk.path / "run"
    command[command.index("--run-dir") + 1] = str(run)
    (tmp_path / "tmp").mkdir()
    shutil.copytree(model_store, tmp_path / "store")
    full_disk.fill()
    before = asyncio.run(registered())
    for redis_url, secret, said_of_it in (
            ("", run / "jobs" / "redis-password", "cannot write"),
            (redis_server.url, run / "jobs" / "api-key", "the API key file")):
        done = subprocess.run(command, env={**env, "SDXL_REDIS_URL": redis_url},
                              capture_output=True, text=True, timeout=120)
        said = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        assert said == [f"error: {said_of_it} {secret}: No space left on device"], done.stderr
        assert [path.name for path in secret.parent.iterdir() if path.is_file()] == [], \
            "a secret left half-written"
    # The key that could not be written was not registered: nobody holds it.
    assert asyncio.run(registered()) == before


def test_an_empty_secret_file_an_older_start_left_is_made_again(redis_server, tmp_path):
    """Our Redis's password and the API key file, left made and empty by an older make
    serve-jobs on a full disk: each is made again, a new secret in a mode-600 file, and the
    key is registered. The empty password was read as the password (our Redis then got a
    new random one at each start, kept nowhere), the empty key file refused at each start
    ("holds no API key")."""
    import asyncio

    from serve_jobs import secret_file, serve_jobs_key
    from sdxl_jobs.keys import KEY_FORMAT
    from sdxl_jobs.store import JobStore

    password, key_file = tmp_path / "redis-password", tmp_path / "api-key"
    for path in (password, key_file):
        path.write_text("\n")
        path.chmod(0o600)
    made = secret_file(password)
    assert len(made) == 48 and password.read_text() == made + "\n"
    assert secret_file(password) == made  # and kept from then on
    asyncio.run(serve_jobs_key(redis_server.url, key_file))
    key = key_file.read_text().strip()
    assert KEY_FORMAT.fullmatch(key) and key_file.stat().st_mode & 0o777 == 0o600

    async def owner() -> str | None:
        store = JobStore.from_url(redis_server.url)
        try:
            return await store.owner_of(key)
        finally:
            await store.close()
    assert asyncio.run(owner())


def test_a_redis_that_cannot_start_says_its_own_reason_in_one_line(tmp_path):
    """Started again after it was killed, on a port taken meanwhile: the reason is this
    start's last lines, where it was the log's last 30, the run before's among them."""
    from sdxl_jobs.processes import RedisServer, StartError

    redis = RedisServer(tmp_path / "redis")
    redis.start()
    redis.kill(signal.SIGKILL)
    redis.process.wait(10)
    taken = socket.create_server(("127.0.0.1", redis.port))
    try:
        with pytest.raises(StartError) as refused:
            redis.start()
    finally:
        taken.close()
        redis.stop()
    assert str(refused.value) == (
        f"redis-server exited: Warning: Could not create server TCP listening socket "
        f"127.0.0.1:{redis.port}: bind: Address already in use; Failed listening on port "
        f"{redis.port} (TCP), aborting.")


def test_a_second_redis_on_one_data_directory_is_refused(tmp_path):
    """Both appended to one append-only file, whose next load mixed two histories (seen: a
    Redis started by hand after ours died, then `make serve-jobs` again)."""
    from sdxl_jobs.processes import RedisServer, StartError

    first = RedisServer(tmp_path / "redis")
    first.start()
    try:
        assert first.pid_file.read_text().strip() == str(first.pid)
        with pytest.raises(StartError, match=f"a redis-server \\(pid {first.pid}\\) already "
                                             f"runs on {tmp_path / 'redis'}"):
            RedisServer(tmp_path / "redis").start()
        assert first.ping()
    finally:
        first.stop()
    again = RedisServer(tmp_path / "redis")  # its pid file gone with it, or stale: fine
    again.start()
    again.stop()


def test_our_redis_keeps_its_data_and_log_to_its_owner(tmp_path):
    """The append-only file holds every job's prompt (an expired job's too, until Redis
    rewrites it); it and the log were 0644 in a 0755 directory under the usual umask."""
    from sdxl_jobs.processes import RedisServer

    (tmp_path / "redis").mkdir(mode=0o755)  # a directory an older start made
    before = os.umask(0o022)
    try:
        redis = RedisServer(tmp_path / "redis")
        redis.start()
    finally:
        os.umask(before)
    try:
        with socket.create_connection(("127.0.0.1", redis.port), timeout=5) as sock:
            sock.sendall(f"AUTH {redis.password}\r\nSET canary a-prompt\r\n".encode())
            answer = b""
            while answer.count(b"+OK") < 2:
                answer += sock.recv(100)
    finally:
        redis.stop()
    modes = {path.relative_to(tmp_path).as_posix(): path.stat().st_mode & 0o777
             for path in [tmp_path / "redis", *(tmp_path / "redis").rglob("*")]}
    assert any("appendonly" in name for name in modes), modes
    assert {name: mode for name, mode in modes.items()
            if mode & 0o077} == {}, modes


def test_the_cancel_directory_is_its_owners_alone(model_store, tmp_path):
    """Its flags and the `.call-` files of calls in flight are named by request id, and it
    was made 0755 under the usual umask (one made by an older start stayed so), where
    every other run directory is 0700: any local user could list the running requests."""
    cancel_dir = tmp_path / "run" / "jobs" / "cancel"
    cancel_dir.mkdir(parents=True, mode=0o755)  # as an older start made it
    command, env = serve_jobs_command(
        tmp_path, SDXL_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")  # no Redis there
    (tmp_path / "tmp").mkdir()
    shutil.copytree(model_store, tmp_path / "store")
    before = os.umask(0o022)
    try:
        # It ends at the API key, which needs Redis: after the cancel directory is made.
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    finally:
        os.umask(before)
    assert done.returncode == 1 and "error: " in done.stderr, done.stderr
    assert oct(cancel_dir.stat().st_mode & 0o777) == "0o700"
    shutil.rmtree(cancel_dir)
    before = os.umask(0o022)
    try:
        subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    finally:
        os.umask(before)
    assert oct(cancel_dir.stat().st_mode & 0o777) == "0o700"  # made anew


def test_ctrl_c_ends_a_redis_start_at_once(tmp_path):
    """A Redis loading a large append-only file may take most of its 20 s start to answer,
    and Ctrl-C waited it out (make serve-jobs starts Redis again when it exits)."""
    import threading

    from sdxl_jobs.processes import RedisServer
    from sdxl_serve.server import StartCancelled

    stop = threading.Event()
    stop.set()  # Ctrl-C came while it started
    redis = RedisServer(tmp_path / "redis", stop=stop)
    started = time.monotonic()
    with pytest.raises(StartCancelled):
        redis.start()
    assert time.monotonic() - started < 5
    ours = [p.pid for p in psutil.process_iter(["cmdline"])
            if str(redis.config) in " ".join(p.info["cmdline"] or ())]
    assert not ours, f"redis-server left running: {ours}"


def refused_start(tmp_path: Path, **settings: str) -> subprocess.CompletedProcess:
    """serve_jobs.py (``serve_jobs_command``) run to its end, expected to refuse before it
    builds or starts anything: exit 2, nothing on stdout, no run directory or archive."""
    command, env = serve_jobs_command(tmp_path, **settings)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.stdout == "" and done.returncode == 2, (done.returncode, done.stdout,
                                                        done.stderr)
    assert not (tmp_path / "run").exists() and not (tmp_path / "store").exists()
    return done


def test_a_taken_redis_port_is_named_before_anything_starts(tmp_path):
    # Else redis-server started, failed to bind and exited; its reason came back only in
    # the 30 log lines of "error: redis-server exited: ...", after the archive's build.
    with socket.socket() as other:  # a Redis of the system's, another serve-jobs
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        done = refused_start(tmp_path, SDXL_REDIS_PORT=str(port))
    assert done.stderr == (f"error: something already listens on SDXL_REDIS_PORT {port}: "
                           f"another server? Stop it, or move SDXL_REDIS_PORT (unset, our "
                           f"Redis takes a free port)\n")


def test_a_taken_job_api_address_is_named_before_anything_starts(tmp_path):
    # Else Redis and TorchServe started, and the API exited on "address already in use":
    # exit 1, 14 s later.
    with socket.socket() as other:  # another serve-jobs' API
        other.bind(("127.0.0.1", 0))
        other.listen()
        address = f"http://127.0.0.1:{other.getsockname()[1]}"
        done = refused_start(tmp_path, SDXL_JOBS_ADDRESS=address)
    assert done.stderr == (f"error: something already listens on SDXL_JOBS_ADDRESS {address}: "
                           f"another server? Stop it, or move SDXL_JOBS_ADDRESS\n")
    assert refused_start(tmp_path, SDXL_JOBS_ADDRESS="127.0.0.1:8090").stderr == (
        "error: SDXL_JOBS_ADDRESS must be http://HOST:PORT, the port from 1 to 65535, got "
        "'127.0.0.1:8090'\n")


@pytest.mark.parametrize("value", ["6379x", "0", "65536"])
def test_a_redis_port_that_is_no_port_is_refused_in_one_line(tmp_path, value):
    assert refused_start(tmp_path, SDXL_REDIS_PORT=value).stderr == (
        f"error: SDXL_REDIS_PORT must be a port number from 1 to 65535, got {value!r}\n")


def test_two_servers_of_one_start_on_one_port_are_refused_in_one_line(tmp_path):
    # Both free when checked: Redis took it, and the API exited on "address already in
    # use" after TorchServe had started.
    port = free_port()
    done = refused_start(tmp_path, SDXL_REDIS_PORT=str(port),
                         SDXL_JOBS_ADDRESS=f"http://127.0.0.1:{port}")
    assert done.stderr == (f"error: SDXL_JOBS_ADDRESS http://127.0.0.1:{port} and "
                           f"SDXL_REDIS_PORT {port} share port {port}: give each its own\n")


def test_a_redis_port_beside_a_redis_url_is_refused_in_one_line(tmp_path):
    # With a Redis of the operator's, none of ours starts: the port would be ignored.
    done = refused_start(tmp_path, SDXL_REDIS_PORT="6390",
                         SDXL_REDIS_URL="redis://127.0.0.1:6379/0")
    assert done.stderr == ("error: SDXL_REDIS_PORT=6390 is the port of the Redis make "
                           "serve-jobs starts, and with SDXL_REDIS_URL set it starts none: "
                           "unset one of them\n")


@pytest.mark.parametrize("value", ["15m", "0", "0.5", "86401", "nan"])
def test_a_rewrite_interval_that_is_no_interval_is_refused_in_one_line(tmp_path, value):
    assert refused_start(tmp_path, SDXL_REDIS_REWRITE_S=value).stderr == (
        f"error: SDXL_REDIS_REWRITE_S must be a number of seconds from 1 to 86400, got "
        f"{value!r}\n")
    # A Redis of the operator's is rewritten only when the job API is told to.
    done = refused_start(tmp_path, SDXL_REDIS_REWRITE_S="60",
                         SDXL_REDIS_URL="redis://127.0.0.1:6379/0")
    assert done.stderr == ("error: SDXL_REDIS_REWRITE_S=60 is for the Redis make serve-jobs "
                           "starts, and with SDXL_REDIS_URL set it starts none: unset one of "
                           "them (SDXL_JOBS_REDIS_REWRITE_S has the job API ask a Redis of "
                           "yours)\n")


@pytest.mark.parametrize("settings, message", [
    ({"SDXL_JOBS_MAX_BODY_BYTES": "1.5"}, "SDXL_JOBS_MAX_BODY_BYTES must be a whole number, "
                                          "got '1.5'"),
    ({"SDXL_JOBS_LEASE_S": "0"}, "SDXL_JOBS_LEASE_S must be a positive finite number, got 0"),
    ({"SDXL_JOBS_WEBHOOK_ALLOW": "hooks.example.com"},
     "SDXL_JOBS_WEBHOOK_SECRET must be set (whsec_...) when SDXL_JOBS_WEBHOOK_ALLOW names "
     "destinations: deliveries are always signed"),
    ({"SDXL_REDIS_URL": "http://127.0.0.1:6379/0"}, "SDXL_REDIS_URL must be a redis://, "
                                                    "rediss:// (TLS) or unix:// URL, got "
                                                    "'http://127.0.0.1:6379/0'"),
])
def test_a_bad_job_setting_is_refused_in_one_line_before_anything_starts(tmp_path, settings,
                                                                         message):
    # The API and the dispatcher refused it at their own start, after Redis and TorchServe
    # had started (12 s with the tiny model, a real model's load with real weights): exit 1,
    # "error: ['sdxl_jobs.api', '--address'] exited: " and 30 lines of the API's log, the
    # lines of earlier starts included.
    assert refused_start(tmp_path, **settings).stderr == f"error: {message}\n"


def test_a_part_that_exits_at_its_start_is_told_by_this_starts_lines_alone(tmp_path):
    # Each start appends to the API's and the dispatcher's logs: one that exited at its
    # start was told by the log's last 30 lines, the errors of earlier starts among them as
    # if they were this one's.
    log = tmp_path / "api.log"
    for said in ("an earlier start's error", "this start's error"):
        part = Managed([sys.executable, "-c", f"print({said!r})"], log)
        part.start()
        try:
            with pytest.raises(StartError) as caught:
                wait_http(f"http://127.0.0.1:{free_port()}/", 30, part)
        finally:
            part.stop()
    assert str(caught.value).endswith("] exited: this start's error"), caught.value


def still_running(pids: list[int], within: float) -> list[int]:
    """The pids still running after waiting up to ``within`` seconds for them to end."""
    deadline = time.monotonic() + within
    while (left := [pid for pid in pids if process_running(pid)]) and \
            time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def finished_jobs(redis_url: str, prompt: str, image: bytes, ttl_s: int) -> None:
    """Two jobs of ``prompt`` through the store, as the API and a dispatcher write them: one
    that made ``image``, one canceled while queued; each expires ``ttl_s`` after its end."""
    from jobstack import LIMITS, REQUEST, with_store

    async def body(store):
        limits = {**LIMITS, "ttl_s": ttl_s}
        made = await store.submit("owner", {**REQUEST, "prompt": prompt}, **limits)
        canceled = await store.submit("owner", {**REQUEST, "prompt": prompt}, **limits)
        [(entry, job_id)] = await store.next_jobs("dispatcher-1", 1, 1)
        assert job_id == made.job_id
        outcome, claim = await store.start(job_id, entry, "dispatcher-1", 3, ttl_s)
        assert outcome == "claimed"
        assert await store.finish(job_id, claim, ttl_s, "succeeded", {"format": "png"},
                                  seeds=[7, 8], images=[image, image]) == "stored"
        assert await store.cancel(canceled.job_id, "owner", ttl_s) == "canceled"
    with_store(redis_url, body)


def test_an_expired_jobs_prompt_and_images_leave_our_redis_files(tmp_path):
    """An expired job's prompt, request and images stayed in our Redis's append-only file
    until Redis rewrote it, which it does once the file has doubled and passed 64 MB: on a
    quiet server, weeks. Now they leave every file in Redis's directory within the rewrite
    interval after they expire, after a restart too."""
    from jobstack import files_holding
    from sdxl_jobs.processes import RedisServer

    ttl_s, every_s = 2, 3
    prompt = f"a retention canary {secrets.token_hex(8)}"
    image = b"\x89PNG" + secrets.token_bytes(64) + prompt.encode()[::-1]
    data_dir = tmp_path / "redis"
    redis = RedisServer(data_dir, rewrite_every_s=every_s)
    redis.start()

    def gone_within(seconds: float) -> list[str]:
        """The files still holding the prompt or the image after ``seconds`` of serve-jobs'
        supervision (``forget_expired`` every 0.2 s here, every second there)."""
        deadline = time.monotonic() + seconds
        while True:
            redis.forget_expired()
            left = files_holding(data_dir, prompt.encode()) + files_holding(data_dir, image)
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.2)

    try:
        assert redis.forget_expired()  # a start asks for one at once
        finished_jobs(redis.url, prompt, image, ttl_s)
        # What the files hold is seen at all: the search below could not fail otherwise.
        assert files_holding(data_dir, prompt.encode()) and files_holding(data_dir, image)
        # The expiry, then at most the interval and a rewrite of a tiny store.
        assert gone_within(ttl_s + every_s + 5) == []
        assert sorted(path.name for path in data_dir.iterdir()) == [
            "appendonlydir", "redis.conf", "redis.log", "redis.pid"]  # no dump.rdb
        # Stopped before the rewrite, the files keep them; the next start drops them.
        finished_jobs(redis.url, prompt, image, ttl_s)
        redis.stop()
        time.sleep(ttl_s + 0.5)
        assert files_holding(data_dir, prompt.encode())
        redis.start()
        assert gone_within(5) == []
        assert prompt not in redis.log_path.read_text(errors="replace")
    finally:
        redis.stop()


def test_a_rewrite_our_redis_was_killed_in_leaves_no_copy_of_its_jobs(tmp_path):
    """A rewrite writes a copy of the whole store to temp-rewriteaof-<pid>.aof, which Redis
    removes only for a rewrite it ends itself: our Redis killed outright mid-rewrite (the
    OOM killer, kill -9) left that copy, prompts and images, in its directory for good,
    after they expired and after every later rewrite, one more copy at each such kill."""
    from jobstack import files_holding
    from sdxl_jobs.processes import RedisServer

    prompt = f"a rewrite canary {secrets.token_hex(8)}".encode()
    data_dir = tmp_path / "redis"
    own = RedisServer(data_dir, rewrite_every_s=3)
    own.start()
    try:
        killed_mid_rewrite(own, own.url, data_dir, prompt)
        time.sleep(3)  # its keys' expiry
        own.start()
        deadline = time.monotonic() + 3 + 10  # the interval, then a rewrite of a tiny store
        while (left := files_holding(data_dir, prompt)) and time.monotonic() < deadline:
            own.forget_expired()
            time.sleep(0.2)
        assert left == []
    finally:
        own.stop()

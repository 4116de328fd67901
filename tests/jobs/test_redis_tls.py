"""The job stack on a Redis as managed services run it: TLS only, its certificate signed by a
private CA, and a password (`requirepass`) or an ACL user limited to the store's keys. A
real redis-server (TLS on, plain TCP off) with a CA and certificates made here by openssl;
the API, a dispatcher, the keys command and serve_jobs.py as real processes; the session's
TorchServe. A wrong password or a certificate we do not trust is said in one line, with its
reason, and the password is never written anywhere."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import redis

from sdxl_jobs.keys import write_private
from sdxl_jobs.processes import (Managed, RedisServer, api_process, free_port, python_module,
                                  wait_http)

from jobstack import Api, start_api, start_dispatcher
from lifetimes import wait_until
from test_serve_jobs import start_serve_jobs

pytestmark = [pytest.mark.jobs, pytest.mark.e2e]

FAST = {"num_inference_steps": 2}
# Long enough to be canceled while it runs, short on a loaded machine.
SLOW = {"num_inference_steps": 30, "width": 96, "height": 96}
# What a managed service's ACL user may do, or less: the store's keys only (the default
# prefix), no command of @dangerous (KEYS, FLUSHALL, CONFIG, DEBUG...), no pub/sub channel.
ACL = "~sdxl:* resetchannels +@all -@dangerous"


def openssl(folder: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True,
                   timeout=60)


def make_ca(folder: Path, name: str) -> Path:
    openssl(folder, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-days", "2", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
            "-out", f"{name}.crt", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return folder / f"{name}.crt"


class TlsRedis:
    """A redis-server that speaks TLS only, with its password and an ACL user."""

    def __init__(self, folder: Path, process: Managed, port: int, ca: Path, other_ca: Path):
        self.folder, self.process, self.port = folder, process, port
        self.ca, self.other_ca = ca, other_ca
        self.password = "pw-" + secrets.token_hex(16)
        self.acl_password = "acl-" + secrets.token_hex(16)

    def url(self, user: str = "", password: str | None = None, ca: Path | None = None) -> str:
        """``rediss://`` with the password (the ACL user's with ``user``), the CA as
        redis-py reads it from a URL (``ssl_ca_certs``); ``ca`` another one."""
        password = password if password is not None else \
            (self.acl_password if user else self.password)
        return (f"rediss://{user}:{password}@127.0.0.1:{self.port}/0"
                f"?ssl_ca_certs={ca or self.ca}")

    def answers(self) -> bool:
        client = redis.Redis.from_url(self.url(), socket_timeout=2, socket_connect_timeout=2)
        try:
            return client.ping()
        except redis.RedisError:
            return False
        finally:
            client.close()


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: it makes the test's CA and certificates")
    folder = tmp_path_factory.mktemp("tls-redis")
    ca, other_ca = make_ca(folder, "ca"), make_ca(folder, "other-ca")
    # The server's certificate names 127.0.0.1: redis-py checks the host name by default.
    openssl(folder, "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", "server.key", "-out", "server.csr")
    (folder / "server.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl(folder, "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", "server.ext", "-out", "server.crt")
    port = free_port()
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    server = TlsRedis(folder, Managed([binary, str(folder / "redis.conf")],
                                      folder / "redis.log"), port, ca, other_ca)
    # No plain TCP port; clients need no certificate of their own (managed services ask
    # for none); the passwords in a mode-600 file, not on a command line.
    write_private(folder / "redis.conf", "\n".join([
        "port 0", f"tls-port {port}", "bind 127.0.0.1", f"dir {folder}",
        f"tls-cert-file {folder / 'server.crt'}", f"tls-key-file {folder / 'server.key'}",
        f"tls-ca-cert-file {ca}", "tls-auth-clients no", f"requirepass {server.password}",
        f"user jobs on >{server.acl_password} {ACL}", 'save ""', "appendonly no",
        "daemonize no", ""]))
    server.process.start()
    try:
        wait_until(lambda: server.answers() or not server.process.running(), 20,
                   "the TLS Redis to answer", detail=server.process.tail)
        assert server.process.running(), server.process.tail()
        yield server
    finally:
        server.process.stop()


def without_secrets(server: TlsRedis, *logs: Path) -> None:
    """No password in these logs, nor a traceback."""
    for log in logs:
        text = log.read_text(errors="replace")
        assert server.password not in text and server.acl_password not in text, log
        assert "Traceback" not in text, text[-3000:]


def run_keys(url: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(python_module("sdxl_jobs.keys", *args), capture_output=True,
                          text=True, timeout=60, env={**os.environ, "SDXL_REDIS_URL": url})


def test_a_job_runs_end_to_end_on_a_tls_redis_with_an_acl_user(tls_redis, server, tmp_path):
    """Submit, cancel, the events stream to the end, the image, /metrics: every Redis read
    and write of the API and the dispatcher, over TLS with the private CA, as an ACL user
    held to the store's keys."""
    url = tls_redis.url("jobs")
    made = run_keys(url, "create", "--name", "tls")
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    # The default user (requirepass) too.
    assert run_keys(tls_redis.url(), "list").stdout.count(" tls") == 1
    api = start_api(url, tmp_path)
    started = time.time()
    dispatcher = start_dispatcher(url, server, tmp_path, "d-tls")
    client = redis.Redis.from_url(url)
    try:
        # Checked in, and the served model's bounds published (the API validates with them).
        wait_until(lambda: (client.zscore("sdxl:dispatchers", "d-tls") or 0) > started
                   and client.exists("sdxl:model") or not dispatcher.running(), 120,
                   "the dispatcher to check in and publish the model", detail=dispatcher.tail)
        assert dispatcher.running(), dispatcher.tail()
        status, _, job = api.json("POST", "/v1/jobs", key, {"prompt": "a tls fox", **FAST})
        assert status == 202, job
        # The events stream (blocking reads on the API's second pool) to the job's end.
        status, _, stream = api.call("GET", f"/v1/jobs/{job['id']}/events", key,
                                     timeout=120)
        events = [json.loads(line[len("data: "):]) for line in stream.decode().splitlines()
                  if line.startswith("data: ")]
        assert status == 200 and events[-1]["status"] == "succeeded", events[-1]
        assert [event["step"] for event in events if event["type"] == "progress"] == [1, 2]
        status, _, image = api.call("GET", f"/v1/jobs/{job['id']}/images/0", key)
        assert status == 200 and image[:8] == b"\x89PNG\r\n\x1a\n"
        # A running job canceled: the dispatcher reads it from Redis and lets it go.
        _, _, slow = api.json("POST", "/v1/jobs", key, {"prompt": "a slow fox", **SLOW})
        wait_until(lambda: api.json("GET", f"/v1/jobs/{slow['id']}", key)[2]["progress"]
                   ["step"] >= 1, 120, "the slow job to make progress")
        status, _, canceled = api.json("DELETE", f"/v1/jobs/{slow['id']}", key)
        assert (status, canceled["status"]) == (200, "canceled")
        wait_until(lambda: f"job {slow['id']} is no longer ours" in dispatcher.tail(1000), 60,
                   "the dispatcher to let the canceled job go", detail=dispatcher.tail)
        status, _, metrics = api.call("GET", "/metrics")
        lines = set(metrics.decode().splitlines())
        assert status == 200
        assert {'sdxl_jobs_total{state="succeeded"} 1', 'sdxl_jobs_total{state="canceled"} 1',
                "sdxl_jobs_queue_depth 0", "sdxl_jobs_dispatchers 1"} <= lines, lines
        assert api.json("GET", "/v1/health", None)[0] == 200
    finally:
        client.close()
        api.process.stop()
        dispatcher.stop()
    without_secrets(tls_redis, api.process.log_path, dispatcher.log_path)
    # Each says which Redis it uses, without the password.
    shown = f"rediss://jobs:***@127.0.0.1:{tls_redis.port}/0?ssl_ca_certs={tls_redis.ca}"
    for process in (api.process, dispatcher):
        assert f"job store: {shown}" in process.tail(1000)


@pytest.mark.parametrize("fault, reason", [
    ("wrong password", "AuthenticationError: invalid username-password pair"),
    ("untrusted certificate", "CERTIFICATE_VERIFY_FAILED")])
def test_a_redis_that_refuses_us_is_one_line_with_its_reason_and_no_password(
        tls_redis, server, tmp_path, fault, reason):
    """The API stays up (its liveness must not restart it over Redis) and says why at its
    start, and answers 503 JSON, each with that reason in one log line; the dispatcher and
    the keys command end in one line, exit 1. Before, a certificate we do not trust was
    logged as a bare "ConnectionError", the API's start said nothing (its pods unready
    with an empty log), and the dispatcher and the keys command ended in a traceback."""
    url = tls_redis.url("jobs", "wrong-" + tls_redis.acl_password) \
        if fault == "wrong password" else tls_redis.url("jobs", ca=tls_redis.other_ca)
    address = f"http://127.0.0.1:{free_port()}"
    api = api_process(url, address, tmp_path / "api.log")
    api.start()
    try:
        wait_http(address + "/openapi.json", 30, api)
        status, _, body = Api(api, address).json("GET", "/v1/jobs", "sdxl_" + "a" * 43)
        assert (status, body["type"]) == (503, "Unavailable"), body
        # Unauthenticated, so the error's type only; Redis did answer (it refused us).
        status, _, body = Api(api, address).json("GET", "/v1/health?dispatchers=0")
        assert status == 503 and body["message"] == "Redis is unavailable to the API: " + \
            ("AuthenticationError" if fault == "wrong password" else "ConnectionError"), body
    finally:
        api.stop()
    lines = api.log_path.read_text().splitlines()
    assert [line for line in lines if "ERROR" in line and reason in line
            and "answers 503 until it can" in line], lines
    assert [line for line in lines if "job store unavailable on GET /v1/jobs" in line
            and reason in line], lines
    dispatcher = start_dispatcher(url, server, tmp_path, "d-refused")
    try:
        dispatcher.process.wait(timeout=60)
        assert dispatcher.process.returncode == 1, dispatcher.tail()
    finally:
        dispatcher.stop()
    (line,) = [line for line in dispatcher.log_path.read_text().splitlines() if reason in line]
    assert "cannot be used" in line and "exiting" in line
    without_secrets(tls_redis, api.log_path, dispatcher.log_path)
    listed = run_keys(url, "list")
    assert listed.returncode == 1 and listed.stdout == ""
    assert listed.stderr.startswith("error: the job store at rediss://jobs:***@") \
        and reason in listed.stderr and len(listed.stderr.splitlines()) == 1, listed.stderr
    assert tls_redis.acl_password not in listed.stderr


def test_serve_jobs_on_a_tls_redis_says_which_and_a_refusal_in_one_line(
        tls_redis, model_store, tmp_path):
    """serve_jobs.py with SDXL_REDIS_URL names the Redis it uses without the password, and
    a Redis that refuses its password ends the start in one `error:` line (a traceback
    before), exit 1, TorchServe not started."""
    url = tls_redis.url("jobs", "wrong-" + tls_redis.acl_password)
    serve_jobs, _, _ = start_serve_jobs(model_store, tmp_path, SDXL_REDIS_URL=url)
    try:
        out, _ = serve_jobs.process.communicate(timeout=120)
    finally:
        serve_jobs.stop()
    assert serve_jobs.process.returncode == 1, out
    assert f"using Redis at rediss://jobs:***@127.0.0.1:{tls_redis.port}/0?ssl_ca_certs=" in out
    assert "error: the job store at rediss://jobs:***@" in out
    assert "AuthenticationError: invalid username-password pair" in out
    assert tls_redis.acl_password not in out and "Traceback" not in out, out
    assert "starting TorchServe" not in out


def test_a_missing_ca_file_fails_the_start_in_one_line(tls_redis, tmp_path):
    """The CA named in the URL is not there (a Secret without its ca.crt key): the API
    and the dispatcher exit 2 naming it, where each call was a 503 saying "Error 2
    connecting to ... No such file or directory"."""
    url = tls_redis.url("jobs", ca=tmp_path / "absent" / "ca.crt")
    done = subprocess.run(python_module("sdxl_jobs.api", "--address",
                                        f"http://127.0.0.1:{free_port()}"),
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "SDXL_REDIS_URL": url})
    assert done.returncode == 2, done.stderr
    assert f"ssl_ca_certs '{tmp_path / 'absent' / 'ca.crt'}' is not a file" in done.stderr
    assert tls_redis.acl_password not in done.stderr


def test_a_dispatcher_started_before_its_redis_waits_for_it(server, tmp_path):
    """A Redis not there yet when a dispatcher starts (both pods restarting, a failover's
    DNS not yet pointing anywhere): the dispatcher says so once and waits, and goes on
    once Redis answers. It exited before, and on Kubernetes waited out its restart
    back-off (up to 5 minutes) after Redis was back."""
    redis_server = RedisServer(tmp_path / "redis", port=free_port())
    (tmp_path / "redis").mkdir()
    dispatcher = start_dispatcher(redis_server.url, server, tmp_path, "d-early")
    try:
        wait_until(lambda: "waiting for it" in dispatcher.log_path.read_text(), 60,
                   "the dispatcher saying it waits for Redis")
        time.sleep(2.5)  # asked again at least once: still waiting, still alive
        assert dispatcher.process.poll() is None, dispatcher.tail()
        redis_server.start()
        try:
            wait_until(lambda: "job store: redis://:***@" in dispatcher.log_path.read_text(),
                       30, "the dispatcher finding Redis")
            wait_until(lambda: redis.Redis.from_url(redis_server.url).zcard("sdxl:dispatchers"),
                       60, "the dispatcher checking in")
            assert dispatcher.process.poll() is None, dispatcher.tail()
        finally:
            dispatcher.stop()
            redis_server.stop()
    finally:
        dispatcher.stop()
    said = dispatcher.log_path.read_text()
    assert said.count("waiting for it") == 1, said
    assert redis_server.password not in said

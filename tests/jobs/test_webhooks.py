"""Webhook delivery against a real redis-server and a real HTTP receiver, the delivery loop
in process as a dispatcher runs it: no single delivery, Redis going away or Redis coming
back empty may stop it, since it is the one loop that sends every webhook of a dispatcher
(and an entry that stopped one would stop the next dispatcher that took it over)."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import shutil
import signal
import socket
import ssl
import threading
import time

import httpx
import pytest

from sdxl_jobs import webhooks
from sdxl_jobs.processes import RedisServer, dispatcher_process, free_port
from sdxl_jobs.settings import JobSettings
from sdxl_jobs.store import WEBHOOK_GROUP, JobStore
from sdxl_jobs.webhooks import delivery_loop

from faulty_link import LoopbackServer
from jobstack import Receiver, with_store
from test_redis_tls import make_ca, openssl

pytestmark = pytest.mark.jobs

REQUEST = {"prompt": "a red fox", "negative_prompt": "", "num_inference_steps": 3,
           "guidance_scale": 5.0, "width": 64, "height": 64, "seed": 7, "num_images": 1,
           "scheduler": "euler", "output_format": "png"}
LIMITS = {"rate_per_minute": 1000, "max_active": 100, "ttl_s": 600}
# A short lease: a delivery left pending is taken up again after 4 x lease_s = 2 s.
LEASE_S = 0.5
# A secret the start takes (whsec_ and base64 of 16 bytes or more): sign() refuses others.
SECRET = "whsec_c2VjcmV0LWtleS1vZi0xNi1ieXRlcw=="


@pytest.fixture(scope="module")
def receiver():
    running = Receiver()
    yield running
    running.close()


@pytest.fixture
def own_redis(tmp_path):
    """A Redis of the test's own, to stop, restart or empty."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


def settings_for(*receivers: Receiver, lease_s: float = LEASE_S) -> JobSettings:
    return JobSettings(lease_s=lease_s,
                       webhook_allow=tuple(f"127.0.0.1:{r.port}" for r in receivers),
                       webhook_secret=SECRET)


@contextlib.asynccontextmanager
async def delivering(store: JobStore, settings: JobSettings, dispatcher: str = "d1"):
    """The delivery loop running as a dispatcher's background task; stopped on the way out."""
    stop = asyncio.Event()
    loop = asyncio.create_task(delivery_loop(store, settings, dispatcher, stop))
    try:
        yield loop
    finally:
        stop.set()
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)


async def eventually(condition, timeout: float, what: str) -> None:
    """Wait for ``condition()`` (plain or awaitable) without blocking the event loop."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        assert time.monotonic() < deadline, f"no {what} within {timeout:.0f} s"
        await asyncio.sleep(0.05)


async def ended_with_webhook(store: JobStore, url: str) -> str:
    """A job that ran and succeeded, its `succeeded` webhook queued as a dispatcher leaves
    it; the job's id."""
    job_id = (await store.submit("alice", REQUEST, webhook=url, webhook_events=("succeeded",),
                                 **LIMITS)).job_id
    [(entry, got)] = await store.next_jobs("d1", 10, 100)
    assert got == job_id
    _, claim = await store.start(job_id, entry, "d1", 3, 600)
    assert await store.finish(job_id, claim, 600, "succeeded", {}, seeds=[7],
                              images=[b"x"]) == "stored"
    return job_id


async def delivered(store: JobStore, outcome: str = "delivered") -> int:
    return int(await store.redis.hget(store.key("stats"), f"webhooks_{outcome}") or 0)


async def pending_of(store: JobStore, dispatcher: str, count: int) -> bool:
    """The webhook queue's pending events, ``count`` of them, are all ``dispatcher``'s."""
    pending = await store.redis.xpending_range(store.key("webhooks"), WEBHOOK_GROUP, "-",
                                               "+", count + 1)
    return len(pending) == count and {p["consumer"] for p in pending} == {dispatcher.encode()}


async def nothing_queued(store: JobStore) -> bool:
    """No webhook entry left, pending or new."""
    return await store.redis.xlen(store.key("webhooks")) == 0


def test_a_url_the_http_client_refuses_is_given_up_and_delivery_goes_on(redis_server,
                                                                         receiver, caplog):
    # Stored by an API from before check_webhook refused control characters: urlsplit takes
    # it, httpx refuses it with InvalidURL, which is no HTTPError; that used to end the loop.
    caplog.set_level(logging.INFO, logger="sdxl_jobs.webhooks")

    async def body(store: JobStore):
        bad = await ended_with_webhook(store, receiver.url("/bad\x7f?token=secret"))
        async with delivering(store, settings_for(receiver)) as loop:
            await eventually(lambda: delivered(store, "refused"), 10, "refused delivery")
            good = await ended_with_webhook(store, receiver.url("/good"))
            await eventually(lambda: receiver.posts_to("/good"), 10, "delivery after it")
            # Received is not yet marked done: stopping the loop now would leave it pending.
            await eventually(lambda: delivered(store), 10, "the delivery marked done")
            assert not loop.done()
        [(headers, _)] = receiver.posts_to("/good")
        assert headers["webhook-id"] == f"{good}.succeeded"
        assert not any(got.startswith("/bad") for got, _, _ in receiver.received), bad
        assert await store.redis.xlen(store.key("webhooks")) == 0  # given up, not retried
    with_store(redis_server.url, body)
    assert "not delivered" in caplog.text and "token=" not in caplog.text  # no URL logged


def test_a_delivery_given_up_says_so_in_one_warning_naming_no_path(caplog):
    # Each try is an INFO line; the end of them wrote nothing an operator would look for.
    caplog.set_level(logging.INFO, logger="sdxl_jobs.webhooks")
    port = free_port()  # nothing listens there: every try is refused
    url = f"http://127.0.0.1:{port}/hook?token=secret"
    settings = JobSettings(webhook_allow=(f"127.0.0.1:{port}",),
                           webhook_secret=SECRET)

    async def give_up() -> str:
        async with webhooks.Outbound() as outbound:
            return await webhooks.deliver(outbound, settings, url, "j.succeeded",
                                          {"type": "job.succeeded"}, attempts=2,
                                          first_delay_s=0.01)
    assert asyncio.run(give_up()) == "failed"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"webhook j.succeeded not delivered to 127.0.0.1:{port}: given up "
                        f"after 2 attempts"], caplog.text
    assert "token=" not in caplog.text


def test_a_destination_the_allow_list_no_longer_names_is_not_called(receiver):
    # Stored while allowed, delivered after the operator narrowed SDXL_JOBS_WEBHOOK_ALLOW:
    # each delivery checks the list again, or the narrowing would not stop it.
    url = receiver.url("/narrowed")
    narrowed = JobSettings(webhook_allow=("127.0.0.1:1",), webhook_secret=SECRET)

    async def deliver(settings: JobSettings) -> str:
        async with webhooks.Outbound() as outbound:
            return await webhooks.deliver(outbound, settings, url, "j.succeeded",
                                          {"type": "job.succeeded"}, attempts=1)
    assert asyncio.run(deliver(narrowed)) == "refused"
    assert asyncio.run(deliver(settings_for(receiver))) == "delivered"
    assert len(receiver.posts_to("/narrowed")) == 1  # the allowed one only


@pytest.mark.parametrize("host", ["hooks..example.com", f"{'h' * 64}.example.com"])
def test_a_stored_webhook_whose_host_no_lookup_can_find_is_refused_not_raised(host):
    # Stored before the submit refused such hosts, and allowed by name: the resolver's
    # IDNA encoding raised UnicodeError, no OSError, out of the delivery, whose event was
    # left pending and read again for good.
    settings = JobSettings(webhook_allow=(host,), webhook_secret=SECRET)

    async def deliver() -> str:
        async with webhooks.Outbound() as outbound:
            return await webhooks.deliver(outbound, settings, f"http://{host}/h",
                                          "j.succeeded", {"type": "job.succeeded"},
                                          attempts=1)
    assert asyncio.run(deliver()) == "refused"


def test_a_name_that_resolves_to_this_host_is_called_only_where_its_address_is_allowed(
        receiver, caplog):
    # Whoever runs an allowed name's DNS may point it at loopback or at the cloud's
    # metadata address (169.254.169.254) at delivery time: `localhost` resolves to
    # 127.0.0.1 here as such a name would. It was called; now only an entry naming the
    # address admits it, and then the delivery keeps the name as its Host.
    caplog.set_level(logging.INFO, logger="sdxl_jobs.webhooks")
    url = f"http://localhost:{receiver.port}/by-name?token=secret"

    async def deliver(*allow: str) -> str:
        settings = JobSettings(webhook_allow=allow, webhook_secret=SECRET)
        async with webhooks.Outbound() as outbound:
            return await webhooks.deliver(outbound, settings, url, "j.succeeded",
                                          {"type": "job.succeeded"}, attempts=1)
    assert asyncio.run(deliver(f"localhost:{receiver.port}")) == "refused"
    assert receiver.posts_to("/by-name?token=secret") == []
    assert f"resolves to 127.0.0.1" in caplog.text and "token=" not in caplog.text
    assert asyncio.run(deliver(f"localhost:{receiver.port}", "127.0.0.1")) == "delivered"
    (headers, _), = receiver.posts_to("/by-name?token=secret")
    assert {name.lower(): value for name, value in headers.items()}["host"] == \
        f"localhost:{receiver.port}"


def test_a_delivery_tries_each_address_its_name_resolved_to_in_turn():
    """A name's first address refusing the connection (one of its A records down, an AAAA
    on a host without IPv6 routes) does not lose the delivery: the next address checked is
    tried, as the HTTP client tried each one when it resolved the name itself. Only the
    first was tried once deliveries went to the address checked. Two real addresses of
    this host: nothing listens on 127.0.0.2, the receiver on 127.0.0.1."""
    receiver = Receiver()
    url = httpx.URL(f"http://hooks.example:{receiver.port}/both")

    async def post(*addresses: str) -> int:
        async with webhooks.Outbound() as outbound:
            response = await webhooks.post_to_first_that_connects(
                outbound.client(None), url, list(addresses), b"{}",
                {"content-type": "application/json"})
            return response.status_code
    try:
        assert asyncio.run(post("127.0.0.2", "127.0.0.1")) == 200
        (headers, _), = receiver.posts_to("/both")
        assert {name.lower(): value for name, value in headers.items()}["host"] == \
            f"hooks.example:{receiver.port}"
        with pytest.raises(httpx.ConnectError):
            asyncio.run(post("127.0.0.2"))
    finally:
        receiver.close()


def test_an_address_that_takes_no_connection_in_time_gives_its_turn_to_the_next(monkeypatch):
    """An address that drops the connection's packets (a dead A record behind a firewall)
    is given up at the connect timeout and the next one tried. The whole answer's deadline,
    the same 10 s as the connect timeout and started with the try, fired first and failed
    it. Here the first address is a listener whose accept queue is full, which drops them."""
    monkeypatch.setattr(webhooks, "ANSWER_S", 1.0, raising=False)
    receiver = Receiver()  # on 127.0.0.1; the full queue on 127.0.0.2, the same port
    full = socket.create_server(("127.0.0.2", receiver.port), backlog=0)
    queued = [socket.create_connection(full.getsockname(), timeout=1)]
    url = httpx.URL(f"http://hooks.example:{receiver.port}/second")

    async def post() -> int:
        async with webhooks.Outbound(timeout=httpx.Timeout(1.0)) as outbound:
            response = await webhooks.post_to_first_that_connects(
                outbound.client(None), url, ["127.0.0.2", "127.0.0.1"], b"{}",
                {"content-type": "application/json"})
            return response.status_code
    try:
        with contextlib.suppress(OSError):  # fill the queue: connections until one hangs
            for _ in range(8):
                queued.append(socket.create_connection(full.getsockname(), timeout=0.2))
        assert asyncio.run(post()) == 200
        assert len(receiver.posts_to("/second")) == 1
    finally:
        for connection in queued:
            connection.close()
        full.close()
        receiver.close()


def test_addresses_that_take_no_connection_share_one_connect_timeout():
    """A name whose DNS answers many addresses that drop the connection's packets: the try
    connects to them within one connect timeout in all, as curl does (half the time left to
    each address but the last), where each waited the whole timeout (10 s), so that a few
    such names held every delivery slot for minutes a try. A reachable address after them
    is still reached (three dead before it: it is given an eighth of the time), and with
    none the try fails within that timeout. Here the dead addresses are listeners on
    127.0.0.2 to 127.0.0.7 whose accept queues are full."""
    receiver = Receiver()  # on 127.0.0.1; the full queues on the same port
    dead = [f"127.0.0.{n}" for n in range(2, 8)]
    full, queued = [], []
    url = httpx.URL(f"http://hooks.example:{receiver.port}/many")

    async def post(addresses: list[str]) -> tuple[object, float]:
        started = time.monotonic()
        async with webhooks.Outbound(timeout=httpx.Timeout(3.0)) as outbound:
            try:
                response = await webhooks.post_to_first_that_connects(
                    outbound.client(None), url, addresses, b"{}",
                    {"content-type": "application/json"})
                answer: object = response.status_code
            except httpx.ConnectTimeout as exc:
                answer = type(exc)
        return answer, time.monotonic() - started
    try:
        for address in dead:
            listener = socket.create_server((address, receiver.port), backlog=0)
            full.append(listener)
            with contextlib.suppress(OSError):  # fill its queue: connections until one hangs
                for _ in range(8):
                    queued.append(socket.create_connection(listener.getsockname(),
                                                           timeout=0.2))
        answer, took = asyncio.run(post([*dead[:3], "127.0.0.1"]))
        assert answer == 200 and took < 5, (answer, took)  # it took 9 s, 3 s each
        assert len(receiver.posts_to("/many")) == 1
        answer, took = asyncio.run(post(dead))
        assert answer is httpx.ConnectTimeout and took < 5, (answer, took)  # it took 18 s
    finally:
        for connection in [*queued, *full]:
            connection.close()
        receiver.close()


class TricklingReceiver(LoopbackServer):
    """A real HTTP server that answers 200 a byte at a time, ``every_s`` apart: each read
    comes well within the client's read timeout, the whole answer takes seconds."""

    BODY = b"ok, received"

    def __init__(self, every_s: float):
        self.every_s = every_s
        super().__init__()

    def serve(self, client: socket.socket) -> None:
        with contextlib.suppress(OSError), client:
            received = b""
            while b"\r\n\r\n" not in received:
                received += client.recv(65536)
            client.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(self.BODY))
            for byte in self.BODY:
                time.sleep(self.every_s)
                client.sendall(bytes([byte]))


def one_try_to(port: int) -> str:
    """What one try of a delivery to a receiver on loopback ``port`` (allowed) came to."""
    settings = JobSettings(webhook_allow=(f"127.0.0.1:{port}",), webhook_secret=SECRET)

    async def deliver() -> str:
        async with webhooks.Outbound() as outbound:
            return await webhooks.deliver(outbound, settings, f"http://127.0.0.1:{port}/hook",
                                          "job.succeeded", {}, attempts=1)
    return asyncio.run(deliver())


def test_a_receiver_that_trickles_its_answer_is_given_up_after_answer_s(monkeypatch):
    """Each try waits up to ANSWER_S for the answer, as the docs say. The HTTP client's
    timeout bounds each read, not the answer: a receiver that sent a byte every few seconds
    held the try (its slot, and the event, renewed) for as long as it went on."""
    monkeypatch.setattr(webhooks, "ANSWER_S", 1.0, raising=False)
    receiver = TricklingReceiver(every_s=0.5)  # 6 s in all, each byte within the timeout
    try:
        began = time.monotonic()
        assert one_try_to(receiver.port) == "failed"
        assert time.monotonic() - began < 3
    finally:
        receiver.close()


class EndlessReceiver(LoopbackServer):
    """A real HTTP server that answers 200 with a chunked body that never ends, as fast as
    the client reads it; ``sent`` counts the body's bytes it got out."""

    def __init__(self):
        self.sent = 0
        super().__init__()

    def serve(self, client: socket.socket) -> None:
        chunk = b"x" * (1 << 20)
        frame = b"%x\r\n%s\r\n" % (len(chunk), chunk)
        with contextlib.suppress(OSError), client:
            received = b""
            while b"\r\n\r\n" not in received:
                received += client.recv(65536)
            client.sendall(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            while True:
                client.sendall(frame)
                self.sent += len(chunk)


def test_a_receiver_that_answers_an_endless_body_is_read_no_further_than_its_status(
        monkeypatch):
    """Only the status counts. The whole body was read into memory: for ANSWER_S a
    receiver could send it as fast as loopback goes (2.7 GB in the dispatcher measured in
    10 s, past its pod's 512 MiB), and the try then failed though the answer was 200."""
    monkeypatch.setattr(webhooks, "ANSWER_S", 2.0, raising=False)
    receiver = EndlessReceiver()
    try:
        assert one_try_to(receiver.port) == "delivered"
        # What the kernel's socket buffers took before the client closed: a few MB at most.
        assert receiver.sent < 32 << 20, f"{receiver.sent} bytes of the body were sent"
    finally:
        receiver.close()


def tls_receiver(tmp_path) -> tuple[Receiver, ssl.SSLContext]:
    """A receiver over TLS whose certificate names `localhost` only, not 127.0.0.1, and a
    client's context that trusts its CA."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: it makes the test's CA and certificate")
    ca = make_ca(tmp_path, "ca")
    openssl(tmp_path, "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-subj", "/CN=localhost", "-keyout", "hooks.key", "-out", "hooks.csr")
    (tmp_path / "hooks.ext").write_text("subjectAltName=DNS:localhost\n")
    openssl(tmp_path, "x509", "-req", "-in", "hooks.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", "hooks.ext", "-out", "hooks.crt")
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(tmp_path / "hooks.crt", tmp_path / "hooks.key")
    receiver = Receiver()
    # Before anything connects: each accepted connection is then a TLS one. HTTP/1.1: it
    # keeps a connection open for the next request, as most receivers do.
    receiver.server.socket = tls.wrap_socket(receiver.server.socket, server_side=True)
    receiver.server.RequestHandlerClass.protocol_version = "HTTP/1.1"
    return receiver, ssl.create_default_context(cafile=ca)


def test_an_https_delivery_to_an_address_checked_verifies_the_names_certificate(tmp_path):
    # The delivery connects to the address it checked, and TLS still checks the name: the
    # receiver's certificate names `localhost` only, not 127.0.0.1.
    receiver, trusted = tls_receiver(tmp_path)
    settings = JobSettings(webhook_allow=(f"localhost:{receiver.port}", "127.0.0.1"),
                           webhook_secret=SECRET)

    async def deliver(*urls: str) -> list[str]:
        # One client for all, as the delivery loop's: the connection it kept to 127.0.0.1
        # after `localhost`'s delivery was taken again for the next one to that address,
        # whose name the certificate was never checked against (two receivers' names
        # behind one load balancer: one's events went to the other's TLS connection).
        async with webhooks.Outbound(verify=trusted) as outbound:
            return [await webhooks.deliver(outbound, settings, url, "j.succeeded",
                                           {"type": "job.succeeded"}, attempts=1)
                    for url in urls]
    try:
        # The same receiver called by its address next: the certificate does not name it.
        assert asyncio.run(deliver(f"https://localhost:{receiver.port}/tls",
                                   f"https://127.0.0.1:{receiver.port}/tls")) == \
            ["delivered", "failed"]
        assert len(receiver.posts_to("/tls")) == 1
    finally:
        receiver.close()


def test_an_https_delivery_through_a_proxy_asks_it_for_the_name(proxy, tmp_path):
    """With HTTPS_PROXY set, the proxy is asked to connect to the name, which it resolves,
    and TLS checks the certificate against the name: it was asked for the address the
    dispatcher had resolved, and TLS checked the certificate against that address, so
    every HTTPS delivery through a proxy failed."""
    receiver, trusted = tls_receiver(tmp_path)
    settings = JobSettings(webhook_allow=(f"localhost:{receiver.port}", "127.0.0.1"),
                           webhook_secret=SECRET)

    async def deliver() -> str:
        async with webhooks.Outbound(verify=trusted) as outbound:
            return await webhooks.deliver(outbound, settings,
                                          f"https://localhost:{receiver.port}/tls",
                                          "j.succeeded", {"type": "job.succeeded"},
                                          attempts=1)
    try:
        assert asyncio.run(deliver()) == "delivered"
        assert proxy.asked == [(f"CONNECT localhost:{receiver.port} HTTP/1.1",
                                f"localhost:{receiver.port}")]
        assert len(receiver.posts_to("/tls")) == 1
    finally:
        receiver.close()


@pytest.mark.parametrize("no_proxy", ["", "localhost", ".example.com,localhost"])
def test_an_http_delivery_goes_through_a_proxy_by_name_unless_no_proxy_names_it(
        proxy, receiver, monkeypatch, no_proxy):
    """With HTTP_PROXY set, the proxy is asked for the URL by name (its rules by name
    apply), where it was asked for the address the dispatcher resolved; a NO_PROXY naming
    the host sends it straight to the receiver, where it went through the proxy all the
    same (NO_PROXY names the host, and the delivery was to its address)."""
    monkeypatch.setenv("NO_PROXY", no_proxy)
    path = f"/proxied-{len(no_proxy)}"
    url = f"http://localhost:{receiver.port}{path}"
    settings = JobSettings(webhook_allow=(f"localhost:{receiver.port}", "127.0.0.1"),
                           webhook_secret=SECRET)

    async def deliver() -> str:
        async with webhooks.Outbound() as outbound:
            return await webhooks.deliver(outbound, settings, url, "j.succeeded",
                                          {"type": "job.succeeded"}, attempts=1)
    assert asyncio.run(deliver()) == "delivered"
    assert proxy.asked == ([] if no_proxy else
                           [(f"POST {url} HTTP/1.1", f"localhost:{receiver.port}")])
    (headers, _), = receiver.posts_to(path)
    assert {name.lower(): value for name, value in headers.items()}["host"] == \
        f"localhost:{receiver.port}"


def test_the_delivery_loop_outlives_redis_going_away_mid_delivery(own_redis, receiver,
                                                                   caplog):
    """Redis stops while a delivery is under way: the delivery cannot be marked done and
    stays pending; the loop waits for Redis, then delivers new events and, once the pending
    one's claim is old, that one again (at least once, with the same webhook-id)."""
    caplog.set_level(logging.INFO, logger="sdxl_jobs.webhooks")

    async def body(store: JobStore):
        first = await ended_with_webhook(store, receiver.url("/first"))
        receiver.answers = [(500, {}), (500, {})]  # retried after 1 s, then after 2 s more
        async with delivering(store, settings_for(receiver)) as loop:
            await eventually(lambda: receiver.posts_to("/first"), 10, "first try")
            await asyncio.to_thread(own_redis.stop)
            # Its third try lands; marking it done then fails (after the client's own
            # retries), which used to end the loop.
            await eventually(lambda: loop.done() or "left pending" in caplog.text, 60,
                             "the delivery to fail on Redis")
            assert not loop.done()
            await asyncio.to_thread(own_redis.start)
            second = await ended_with_webhook(store, receiver.url("/second"))
            await eventually(lambda: receiver.posts_to("/second"), 30, "a later delivery")
            await eventually(lambda: len(receiver.posts_to("/first")) == 4, 30,
                             "the pending delivery made again")
            await eventually(lambda: nothing_queued(store), 10, "an empty webhook queue")
        ids = {headers["webhook-id"] for headers, _ in receiver.posts_to("/first")}
        assert ids == {f"{first}.succeeded"}
        assert receiver.posts_to("/second")[0][0]["webhook-id"] == f"{second}.succeeded"
    with_store(own_redis.url, body)


def test_jobs_and_webhooks_go_on_after_redis_came_back_empty(own_redis, receiver):
    """Redis restarted without its data: the API's next submit recreates the job stream
    and a job's end the webhook stream (XADD), both without their consumer groups. The
    dispatchers' reads create those again instead of failing with NOGROUP for good."""
    async def body(store: JobStore):
        async with delivering(store, settings_for(receiver)) as loop:
            await ended_with_webhook(store, receiver.url("/before"))
            await eventually(lambda: receiver.posts_to("/before"), 10, "first delivery")
            await store.redis.flushall()
            await asyncio.sleep(0.2)  # the loop's reads meet the empty Redis
            after = await ended_with_webhook(store, receiver.url("/after"))
            await eventually(lambda: receiver.posts_to("/after"), 15, "delivery after it")
            assert not loop.done()
        assert receiver.posts_to("/after")[0][0]["webhook-id"] == f"{after}.succeeded"
        assert await store.abandoned_jobs("d2", 0, 10) == []
    with_store(own_redis.url, body)


def test_the_running_webhook_is_sent_once_when_the_job_first_starts(redis_server, receiver):
    async def body(store: JobStore):
        job_id = (await store.submit("alice", REQUEST, webhook=receiver.url("/running"),
                                     webhook_events=("running",), **LIMITS)).job_id
        [(entry, _)] = await store.next_jobs("d1", 10, 100)
        async with delivering(store, settings_for(receiver)):
            _, claim = await store.start(job_id, entry, "d1", 3, 600)
            await eventually(lambda: receiver.posts_to("/running"), 10, "running webhook")
            await eventually(lambda: nothing_queued(store), 10, "the delivery marked done")
        [(headers, raw)] = receiver.posts_to("/running")
        payload = json.loads(raw)
        assert headers["webhook-id"] == f"{job_id}.running"
        assert payload["type"] == "job.running" and payload["data"]["id"] == job_id
        assert payload["data"]["status"] == "running"
        # Started again after a failed try, then finished: nothing more to send (`running`
        # goes once; `succeeded` was not asked for).
        await store.record_error(job_id, claim, "HTTP 500: boom")
        outcome, again = await store.start(job_id, entry, "d1", 3, 600)
        assert outcome == "claimed" and again == "d1#2"
        await store.finish(job_id, again, 600, "succeeded", {}, seeds=[7], images=[b"x"])
        assert await store.redis.xlen(store.key("webhooks")) == 0
    with_store(redis_server.url, body)


class HeldReceiver(Receiver):
    """A receiver whose answers to ``/slow`` wait until ``release`` is set: a webhook
    destination that takes its time (up to the client's read timeout)."""

    def __init__(self, host: str = "127.0.0.1"):
        super().__init__(host)
        self.release = threading.Event()
        self.held = threading.Event()  # a request to /slow has arrived and waits
        self.holding = self.most_held = 0  # requests to /slow waiting: now, at most
        count = threading.Lock()
        answer = self.server.RequestHandlerClass.do_POST
        receiver = self

        def do_post(handler):
            if handler.path == "/slow":
                with count:
                    receiver.holding += 1
                    receiver.most_held = max(receiver.most_held, receiver.holding)
                receiver.held.set()
                receiver.release.wait(30)
                with count:
                    receiver.holding -= 1
            answer(handler)

        self.server.RequestHandlerClass.do_POST = do_post

    def close(self):
        self.release.set()
        super().close()

    async def answer_all(self, store: JobStore, loop: asyncio.Task) -> None:
        """Let every request held be answered; wait until every event is marked done, the
        delivery loop still running."""
        self.release.set()
        await eventually(lambda: nothing_queued(store), 20, "every delivery marked done")
        assert not loop.done()


def succeeded_posts(receiver: Receiver, path: str) -> set[str]:
    """The jobs whose `succeeded` event ``receiver`` was sent on ``path``."""
    return {headers["webhook-id"].removesuffix(".succeeded")
            for headers, _ in receiver.posts_to(path)}


def ipv6_loopback() -> bool:
    try:
        with socket.create_server(("::1", 0), family=socket.AF_INET6):
            return True
    except OSError:
        return False


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback (::1) to receive on")
def test_spellings_of_one_ipv6_address_share_its_slots_and_its_allow_entry(redis_server):
    """`[::1]`, `[0:0::1]` and `[0000::0001]` are one receiver: their events share its
    DELIVERIES_PER_DESTINATION slots, where each spelling had 8 of its own (12 requests
    held by one receiver at once, all it was sent), and one allow entry in yet another
    spelling, `[0::1]`, allows all three, where it allowed none."""
    held = HeldReceiver("::1")
    settings = JobSettings(lease_s=30, webhook_allow=(f"[0::1]:{held.port}",),
                           webhook_secret=SECRET)
    urls = [f"http://{host}:{held.port}/slow" for host in ("[::1]", "[0:0::1]",
                                                          "[0000::0001]")]

    async def body(store: JobStore):
        sent = {await ended_with_webhook(store, url) for url in urls for _ in range(4)}
        async with delivering(store, settings) as loop:
            await eventually(lambda: held.holding >= 8, 10, "8 deliveries under way")
            await asyncio.sleep(1)  # time for more, were there slots for more
            assert held.most_held == 8 and not held.release.is_set()
            await held.answer_all(store, loop)
        assert succeeded_posts(held, "/slow") == sent and await delivered(store) == 12
    try:
        with_store(redis_server.url, body)
    finally:
        held.close()


def test_a_slow_receiver_does_not_hold_up_deliveries_to_others(redis_server):
    """Each read of the webhook queue waited for its whole batch of deliveries: one
    receiver slow to answer held every later event of the dispatcher, to any receiver,
    for up to all its tries (10 s each, about 65 s). Now deliveries run side by side."""
    held = HeldReceiver()
    settings = settings_for(held, lease_s=30)

    async def body(store: JobStore):
        async with delivering(store, settings) as loop:
            await ended_with_webhook(store, held.url("/slow"))
            await eventually(held.held.is_set, 10, "the slow delivery under way")
            fast = await ended_with_webhook(store, held.url("/fast"))
            await eventually(lambda: held.posts_to("/fast"), 5,
                             "the other delivery while the slow one waits")
            assert not held.release.is_set() and not held.posts_to("/slow")
            held.release.set()
            await eventually(lambda: held.posts_to("/slow"), 15, "the slow delivery")
            await eventually(lambda: nothing_queued(store), 10, "both marked done")
            assert not loop.done()
        assert held.posts_to("/fast")[0][0]["webhook-id"] == f"{fast}.succeeded"
    try:
        with_store(redis_server.url, body)
    finally:
        held.close()


def test_a_burst_to_a_slow_receiver_leaves_slots_for_the_others(redis_server, monkeypatch):
    """36 events to a receiver that holds every request took all 32 delivery slots, and an
    event to another receiver waited behind their tries (about 65 s). One destination now
    gets at most DELIVERIES_PER_DESTINATION slots; of its other events some wait in the
    dispatcher and, beyond HELD_PER_DESTINATION (24 here), the rest in its line: all
    delivered once it answers, none lost."""
    monkeypatch.setattr(webhooks, "HELD_PER_DESTINATION", 24, raising=False)
    slow, fast = HeldReceiver(), Receiver()
    settings = settings_for(slow, fast)

    async def body(store: JobStore):
        slowed = {await ended_with_webhook(store, slow.url("/slow")) for _ in range(36)}
        async with delivering(store, settings) as loop:
            await eventually(lambda: slow.holding >= 8, 10, "8 slow deliveries under way")
            other = await ended_with_webhook(store, fast.url("/fast"))
            await eventually(lambda: fast.posts_to("/fast"), 5,
                             "the other receiver's delivery while the slow one holds 8")
            assert slow.most_held == 8 and not slow.release.is_set()
            await slow.answer_all(store, loop)
        assert succeeded_posts(fast, "/fast") == {other}
        assert succeeded_posts(slow, "/slow") == slowed and await delivered(store) == 37
    try:
        with_store(redis_server.url, body)
    finally:
        slow.close()
        fast.close()


def test_receivers_that_fail_at_once_leave_the_slots_free_between_their_tries(redis_server):
    """Each delivery kept its slot through the 1, 2, 4 and 8 s between its tries: 8 events
    to each of four receivers that answer 500 took all 32 slots, asleep, and another
    receiver's event waited about 15 s for their tries to end. A try now gives its slot
    back while it waits for the next, and the other event is delivered at once."""
    failing = [Receiver() for _ in range(4)]
    for receiver in failing:
        receiver.answers = [(500, {})] * 40  # every try of its 8 events
    fast = Receiver()
    settings = settings_for(*failing, fast, lease_s=30)

    async def body(store: JobStore):
        for receiver in failing:
            for _ in range(8):
                await ended_with_webhook(store, receiver.url("/failing"))
        async with delivering(store, settings) as loop:
            await eventually(lambda: all(len(r.received) >= 8 for r in failing), 10,
                             "the first try of all 32 failing deliveries")
            other = await ended_with_webhook(store, fast.url("/fast"))
            started = time.monotonic()
            await eventually(lambda: fast.posts_to("/fast"), 20, "the other delivery")
            took = time.monotonic() - started
            assert not loop.done()
        assert fast.posts_to("/fast")[0][0]["webhook-id"] == f"{other}.succeeded"
        assert took < 5, f"the other receiver's event waited {took:.1f} s for a slot"
    try:
        with_store(redis_server.url, body)
    finally:
        for receiver in (*failing, fast):
            receiver.close()


def test_a_burst_beyond_what_a_destination_holds_is_sent_as_fast_as_it_answers(
        redis_server, monkeypatch):
    """Events to one destination beyond HELD_PER_DESTINATION were left pending in Redis
    and read again once their claim was 4 x lease_s old (2 minutes by default): a burst of
    more than 128 events to one receiver, even a fast one, sent the rest minutes late. Now
    they wait in the dispatcher's line and each starts as a held one ends."""
    monkeypatch.setattr(webhooks, "HELD_PER_DESTINATION", 24, raising=False)
    fast = Receiver()
    settings = settings_for(fast, lease_s=30)

    async def body(store: JobStore):
        burst = {await ended_with_webhook(store, fast.url("/fast")) for _ in range(100)}
        async with delivering(store, settings) as loop:
            started = time.monotonic()
            await eventually(lambda: nothing_queued(store), 20, "all 100 marked done")
            took = time.monotonic() - started
            assert not loop.done()
        got = [headers["webhook-id"] for headers, _ in fast.posts_to("/fast")]
        assert sorted(got) == sorted(f"{job_id}.succeeded" for job_id in burst)
        assert await delivered(store) == 100
        assert took < 20  # against 4 x lease_s = 120 s for those left pending
    try:
        with_store(redis_server.url, body)
    finally:
        fast.close()


def test_events_waiting_in_a_dispatcher_are_not_taken_over_by_another(redis_server,
                                                                      monkeypatch):
    """The claims of the events a dispatcher keeps waiting for a busy destination are
    renewed like those under way: none gets 4 x lease_s old, when another dispatcher may
    take it over, so a second dispatcher reading all along takes none of them, the receiver
    gets no more than one dispatcher's 8 at once, and every event once."""
    monkeypatch.setattr(webhooks, "HELD_PER_DESTINATION", 24, raising=False)
    slow = HeldReceiver()
    settings = settings_for(slow)

    async def body(store: JobStore):
        burst = {await ended_with_webhook(store, slow.url("/slow")) for _ in range(40)}
        async with delivering(store, settings, "d1"):
            await eventually(lambda: slow.holding >= 8, 10, "8 slow deliveries under way")
            await eventually(lambda: pending_of(store, "d1", 40), 10, "all 40 read by d1")
            async with delivering(store, settings, "d2"):
                oldest_ms, ends = 0, time.monotonic() + LEASE_S * 4 + 1.5
                while time.monotonic() < ends:
                    pending = await store.redis.xpending_range(
                        store.key("webhooks"), WEBHOOK_GROUP, "-", "+", 100)
                    oldest_ms = max([oldest_ms, *(p["time_since_delivered"] for p in pending)])
                    await asyncio.sleep(0.05)
                assert oldest_ms < LEASE_S * 4 * 1000
                assert await pending_of(store, "d1", 40)  # d2 took none of them over
                assert slow.most_held == 8
                slow.release.set()
                await eventually(lambda: nothing_queued(store), 20, "every delivery done")
        got = [headers["webhook-id"] for headers, _ in slow.posts_to("/slow")]
        assert sorted(got) == sorted(f"{job_id}.succeeded" for job_id in burst)
        assert await delivered(store) == 40
    try:
        with_store(redis_server.url, body)
    finally:
        slow.close()


def test_the_webhook_backlog_and_its_oldest_age_are_measured(redis_server, receiver):
    """What the API exports as sdxl_webhook_backlog and sdxl_webhook_oldest_age_seconds:
    events not yet ended and how long the oldest has waited (Redis's clock, from its entry
    id), back to 0 once delivered. The alert on undelivered webhooks and KEDA's trigger that
    keeps a dispatcher for them read these (k8s/overlays/keda-jobs)."""
    settings = settings_for(receiver)

    async def body(store: JobStore):
        assert (await store.gauges())["webhooks"] == 0
        await ended_with_webhook(store, receiver.url("/backlog"))
        await ended_with_webhook(store, receiver.url("/backlog"))
        await asyncio.sleep(1.2)
        gauges = await store.gauges()
        assert gauges["webhooks"] == 2
        assert 1.2 <= gauges["oldest_webhook_age_s"] < 10
        async with delivering(store, settings):
            await eventually(lambda: nothing_queued(store), 10, "both delivered")
        gauges = await store.gauges()
        assert (gauges["webhooks"], gauges["oldest_webhook_age_s"]) == (0, 0.0)
    with_store(redis_server.url, body)


def test_a_dispatcher_sends_webhooks_while_its_torchserve_is_not_up(own_redis, receiver,
                                                                    tmp_path):
    """A dispatcher process sent webhooks only once its TorchServe had loaded the model
    (minutes for SDXL, never for a model that does not load). KEDA now brings a GPU pod up
    for webhook events alone, so they are sent from the dispatcher's start: here with no
    TorchServe at all (nothing listens on its ports), and it stops cleanly at SIGTERM."""
    closed = f"http://127.0.0.1:{free_port()}"
    dispatcher = dispatcher_process(
        own_redis.url, closed, closed, tmp_path / "no-key-file.json", tmp_path / "d.log",
        name="early", env={"SDXL_JOBS_WEBHOOK_ALLOW": f"127.0.0.1:{receiver.port}",
                           "SDXL_JOBS_WEBHOOK_SECRET": SECRET})

    async def body():
        store = JobStore.from_url(own_redis.url)  # the dispatcher's key prefix
        try:
            await store.ensure_groups()
            job_id = await ended_with_webhook(store, receiver.url("/early"))
            dispatcher.start()
            await eventually(lambda: receiver.posts_to("/early"), 20,
                             "the webhook from a dispatcher without TorchServe")
            await eventually(lambda: nothing_queued(store), 5, "the delivery marked done")
            assert receiver.posts_to("/early")[0][0]["webhook-id"] == f"{job_id}.succeeded"
            # Its TorchServe was never up: the task that describes it says so, in its own
            # time (read once, the line could still be on its way after the delivery).
            log = tmp_path / "d.log"  # opened by start()
            await eventually(lambda: "waiting for TorchServe" in log.read_text(), 20,
                             "the dispatcher's `waiting for TorchServe` line")
        finally:
            await store.close()
    try:
        asyncio.run(body())
        dispatcher.process.send_signal(signal.SIGTERM)
        assert dispatcher.process.wait(15) == 0
    finally:
        dispatcher.stop()


@pytest.mark.parametrize("address, own_entry", [
    # On an IPv6-only network with DNS64 an allowed name of a receiver with IPv4 addresses
    # only resolves to NAT64's 64:ff9b::/96, which ipaddress calls reserved: every such
    # delivery was refused. Judged by the IPv4 address it reaches, as ::ffff:a.b.c.d is.
    ("64:ff9b::203.0.113.7", False),
    ("64:ff9b::10.0.0.5", False),
    ("64:ff9b::169.254.169.254", True),
    ("64:ff9b::127.0.0.1", True),
    ("::ffff:169.254.169.254", True),
    ("100::1", True),                               # reserved (discard-only)
])
def test_a_name_may_lead_to_a_nat64_address_as_to_the_ipv4_one_it_reaches(address, own_entry):
    assert webhooks.needs_its_own_entry(ipaddress.ip_address(address)) is own_entry


@pytest.mark.parametrize("address", [
    "fd00:ec2::254",                 # AWS's instance metadata over IPv6 (a unique local address)
    "fd00:ec2::23",                  # EKS Pod Identity's agent: a pod's credentials
    "100.100.100.200",               # Alibaba Cloud's instance metadata (carrier-grade NAT range)
    "::ffff:100.100.100.200",
    "64:ff9b::100.100.100.200",
])
def test_a_name_may_not_lead_to_a_clouds_credential_service_outside_link_local(address):
    # Only 169.254.0.0/16 was kept from names: an allowed name whose DNS answered AWS's
    # IPv6 metadata address was sent the delivery, where its IPv4 one was refused.
    assert webhooks.needs_its_own_entry(ipaddress.ip_address(address)) is True


@pytest.mark.parametrize("url, allowed", [
    ("https://hooks.example.com/h", True),        # its port is 443: the entry's
    ("https://hooks.example.com:443/h", True),
    ("http://hooks.example.com/h", False),        # port 80
    ("https://hooks.example.com:8443/h", False),
    ("http://10.0.0.5/h", True),                  # an entry with port 80
    ("https://any.example.org:9/h", True),        # an entry without a port: any port
    ("https://other.example.org/h", False),
])
def test_an_allowed_host_and_port_matches_a_url_that_leaves_the_default_port_out(url, allowed):
    from sdxl_jobs.settings import JobSettings
    from sdxl_jobs.webhooks import WebhookRefused, check_webhook

    settings = JobSettings(webhook_allow=("hooks.example.com:443", "10.0.0.5:80",
                                          "any.example.org"))
    try:
        check_webhook(url, None, settings)
    except WebhookRefused as refused:
        assert not allowed, refused
        assert "is not an allowed destination" in str(refused)
    else:
        assert allowed, url


def test_an_ipv6_destination_is_allowed_as_its_refusal_names_it():
    """The refusal names an IPv6 destination as `[fd00::5]:8443`, but the allow list took
    that entry for nothing: only `fd00::5:8443` allowed it, an entry that also allows the
    address fd00::5:8443 on any port."""
    from sdxl_jobs.settings import JobSettings
    from sdxl_jobs.webhooks import WebhookRefused, check_webhook

    def allows(entry: str, url: str) -> bool:
        settings = JobSettings(webhook_allow=(entry,), webhook_secret=SECRET)
        try:
            check_webhook(url, None, settings)
        except WebhookRefused as refused:
            assert "is not an allowed destination" in str(refused), refused
            return False
        return True

    url = "https://[FD00::5]:8443/h"
    with pytest.raises(WebhookRefused) as refused:
        check_webhook(url, None, JobSettings(webhook_allow=("hooks.example.com",),
                                             webhook_secret=SECRET))
    named = str(refused.value).split("'")[1]
    assert named == "[fd00::5]:8443", refused.value
    assert allows(named, url)
    assert allows("[fd00::5]", url) and allows("fd00::5", url)  # any port
    assert allows("[fd00::5]:443", "https://[fd00::5]/h")       # the scheme's port
    assert not allows("[fd00::5]:443", url)
    assert not allows("fd00::5:8443", url)  # the address fd00::5:8443, not a port
    assert allows("fd00::5:8443", "https://[fd00::5:8443]:9/h")
    # Any spelling of the address, on either side: one address, one destination. It was
    # allowed only as written, and named as written (`[fd00:0:0::5]:8443`).
    spelled = "https://[FD00:0:0::5]:8443/h"
    with pytest.raises(WebhookRefused, match=r"'\[fd00::5\]:8443' is not an allowed"):
        check_webhook(spelled, None, JobSettings(webhook_allow=("hooks.example.com",),
                                                 webhook_secret=SECRET))
    for entry in ("[fd00:0::5]:8443", "[FD00::0005]:8443", "fd00:0:0:0:0:0:0:5",
                  "[fd00::0:5]"):
        assert allows(entry, url) and allows(entry, spelled), entry
    # ... and no more than that address: a bare one is still read whole, not as a port.
    assert not allows("[fd00:0::5]:443", spelled) and not allows("[fd00::6]", spelled)
    assert not allows("fd00:0::5:8443", spelled)
    assert allows("FD00:0::5:8443", "https://[fd00::5:8443]:9/h")
    assert webhooks.destination(spelled) == webhooks.destination(url) == "[fd00::5]:8443"

"""Webhooks: the job object POSTed when it reaches a chosen state, signed, retried.

Signed as Standard Webhooks do (``webhook-id``, ``webhook-timestamp``,
``webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">``), so receivers can use
any Standard Webhooks library to check them. The id is the same on every retry of one event,
so a receiver can drop duplicates. Redirects are never followed (a 3xx is a failed delivery):
an allowed host must not be able to bounce our POST to one that is not. Which hosts may be
called is configuration (``webhook_allow``), none by default; a host name is resolved at
each try, and the try connects to the address checked (``addresses_to_call``), unless the
environment sends it through a proxy, which is then asked for the name (``Outbound``).

Example (the Standard Webhooks libraries' own test vector, which their receivers check):
    >>> sign("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "msg_p5jXN8AQM9LWM0D4loKWxJek",
    ...      1614265330, b'{"test": 2432232314}')
    'v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE='
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import re
import socket
import ssl
import time
import urllib.parse
import urllib.request
from typing import AsyncContextManager, Callable

import httpx

from sdxl_serve.server import is_host
from sdxl_jobs.settings import JobSettings, host_spelling, webhook_key
from sdxl_jobs.store import JobStore, RepeatedWarnings, reason_to_log
from sdxl_jobs.views import job_view

log = logging.getLogger(__name__)

EVENTS = ("running", "succeeded", "failed", "canceled")
DEFAULT_EVENTS = ("succeeded", "failed", "canceled")
PRINTABLE_URL = re.compile(r"[!-~]+")
DEFAULT_PORTS = {"https": 443, "http": 80}
# "This network": connecting to 0.0.0.1 reaches this host on Linux, as 127.0.0.1 does.
THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")
# NAT64's well-known prefix: on an IPv6-only network with DNS64 a name with IPv4 addresses
# only resolves to these, the IPv4 address in the last 32 bits (ipaddress calls the prefix
# reserved, being in ::/8).
NAT64 = ipaddress.ip_network("64:ff9b::/96")
# Where clouds serve an instance's or a pod's credentials outside link-local: AWS's metadata
# service over IPv6 and EKS Pod Identity's agent (fd00:ec2::254, fd00:ec2::23, unique local
# addresses, so no flag of ipaddress's marks them), Alibaba Cloud's metadata service
# (100.100.100.200, in the carrier-grade NAT range).
CREDENTIAL_SERVICES = frozenset(map(ipaddress.ip_address, (
    "fd00:ec2::254", "fd00:ec2::23", "100.100.100.200")))
# Between tries to reach the webhook queue while Redis is away (restarting, loading).
QUEUE_RETRY_S = (1, 2, 4, 8, 15)
# Deliveries one dispatcher makes at once (each an HTTP request and its retries).
DELIVERIES_IN_FLIGHT = 32
# ... of which to one destination (host:port): a receiver that holds every request until the
# read timeout then keeps only these slots, and the others serve every other destination.
DELIVERIES_PER_DESTINATION = 8
# Events a dispatcher holds (under way or waiting for a slot, each a task), per destination
# and in all. Beyond a destination's HELD_PER_DESTINATION its events wait in a line of their
# own, as entry ids (WAITING_IN_ALL in all, a few MB), each started when one of its held
# events ends: a burst to one receiver is sent as fast as it answers, not in rounds of 128
# every 4 x lease_s. Past WAITING_IN_ALL an event is left pending, unacknowledged, and read
# again once its claim is 4 x lease_s old: so a burst to a slow receiver neither fills the
# memory nor stops the reads that find other destinations' events behind it.
HELD_PER_DESTINATION = 128
HELD_IN_ALL = 512
WAITING_IN_ALL = 10_000
# Claims renewed per Redis command (an XCLAIM's ids).
RENEWED_AT_ONCE = 1000
# How long one try waits for its whole answer from one address (the docs' 10 s). The HTTP
# client's timeout bounds each read, not the answer: a receiver that sent a byte every few
# seconds held the try, its slot and its event (renewed) for as long as it went on.
ANSWER_S = 10.0
# How much of an answer's body one try reads: only its status counts, and a receiver that
# answered 200 with an endless body grew the dispatcher by 2.7 GB in those 10 s (measured on
# loopback), past the pod's memory limit. Read that far a small body leaves the connection
# to be used again; a longer one is cut, closing it.
ANSWER_BODY_BYTES = 64 * 1024


class WebhookRefused(ValueError):
    """A webhook field we do not accept: the message names the rule, then the value given
    (cut); ``rule`` is the message without the value, for logs (a URL's query may hold the
    receiver's token)."""

    def __init__(self, field: str, rule: str, value: str | None = None):
        super().__init__(rule if value is None else f"{rule}, got {value[:100]!r}")
        self.field, self.rule = field, rule


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value for one delivery.

    Raises:
        JobSettingsError: ``secret`` is one the start refuses (``webhook_key``): a decoder of
            its own here signed with what that one refuses, the empty key among them.
    """
    key = webhook_key(secret)
    signed = f"{message_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def destination(url: str) -> str:
    """``host:port`` of a webhook URL (it has passed ``check_webhook``), the port its
    scheme's when none is written, the host in ``host_spelling``'s: the receiver that a
    destination's delivery slots are shared by, so `https://h/` and `https://h:443/` share
    them, and so do `http://[fd00:0::5]/` and `http://[FD00::5]/`, where each had its own.

    >>> destination("https://Hooks.example/a"), destination("https://hooks.example:443/b")
    ('hooks.example:443', 'hooks.example:443')
    >>> destination("http://[::1]:8080/x"), destination("http://[0:0::1]:8080/y")
    ('[::1]:8080', '[::1]:8080')
    """
    parts = urllib.parse.urlsplit(url)
    host = host_spelling(parts.hostname or "")
    port = parts.port or DEFAULT_PORTS[parts.scheme.lower()]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def check_webhook(url: object, events: object, settings: JobSettings
                  ) -> tuple[str, tuple[str, ...]]:
    """Validate the submit's ``webhook`` and ``webhook_events`` fields: their form, then
    whether this server may call the URL's host."""
    if url is None:
        if events is not None:
            raise WebhookRefused("webhook_events", "`webhook_events` needs a `webhook` URL")
        return "", ()
    if not isinstance(url, str) or len(url) > 2000:
        given = (f"a string of {len(url)} characters" if isinstance(url, str)
                 else json.dumps(url)[:40])
        raise WebhookRefused("webhook", f"`webhook` must be an http(s) URL of at most 2000 "
                                        f"characters, got {given}")
    # urlsplit passes control characters and non-ASCII through, which the HTTP client then
    # refuses at delivery time, long after the submit's 202: refuse them here instead.
    if url and not PRINTABLE_URL.fullmatch(url):  # an empty one is refused as no URL, below
        raise WebhookRefused("webhook", "`webhook` must be printable ASCII without spaces "
                                        "(percent-encode anything else)", url)
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port  # raises on a port that is not a number from 0 to 65535
    except ValueError as exc:
        raise WebhookRefused("webhook", f"`webhook` must be an http(s) URL ({exc})",
                             url) from None
    if port == 0:  # nothing listens on port 0: every delivery would fail
        raise WebhookRefused("webhook", "`webhook` must be an http(s) URL with a port from "
                                        "1 to 65535", url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WebhookRefused("webhook", "`webhook` must be an http:// or https:// URL with "
                                        "a host", url)
    # Any "@" in the authority is userinfo: ``parts.username`` is "" (false) for
    # "http://:secret@host/", whose password delivery would send as Basic auth.
    if "@" in parts.netloc:
        raise WebhookRefused("webhook", "`webhook` must be a URL without credentials (no "
                                        "user or password before the host)", url)
    # A label empty or past 63 characters: the resolver's IDNA encoding raises UnicodeError,
    # no OSError, at each delivery (left pending and read again for good).
    if not is_host(parts.hostname):
        raise WebhookRefused("webhook", "`webhook` must be a URL whose host a name lookup "
                                        "can find (labels of 1 to 63 characters)", url)
    try:
        httpx.URL(url)  # what delivery will parse: e.g. an IPv4 address out of range
    except (httpx.InvalidURL, ValueError) as exc:  # (an IDNA error is a ValueError)
        raise WebhookRefused("webhook", f"`webhook` must be a URL the server can call "
                                        f"({str(exc)[:100]})", url) from None
    # The events before the allow list: what is wrong with the request itself first, then
    # what this server allows (a client learns both in that order from any server).
    if events is not None and (not isinstance(events, list) or not events or
                               any(not isinstance(e, str) or e not in EVENTS for e in events)):
        raise WebhookRefused("webhook_events", f"`webhook_events` must be a non-empty list "
                                               f"of {', '.join(EVENTS)}; got "
                                               f"{json.dumps(events)[:100]}")
    if not settings.webhook_allow:
        raise WebhookRefused("webhook", "webhooks are not enabled on this server (no "
                                        "destination is allowed); poll or use the events "
                                        "stream instead")
    # An entry names a host (any port) or a host and port, as the refusal below names it;
    # a URL without a port goes to its scheme's, so `hooks.example.com:443` allows
    # `https://hooks.example.com/` too. An IPv6 address is in brackets with a port
    # (`[fd00::5]:8443`), bare or in brackets without: `fd00::5:8443` is another address
    # (any port), not fd00::5's port 8443, which it allowed as well. Both sides in one
    # spelling (host_spelling): `[fd00:0::5]` is allowed by `[FD00::5]`.
    where = destination(url)
    host = where.rpartition(":")[0]
    if not settings.allowed_destinations & {host_spelling(parts.hostname or ""), host, where}:
        # Not the list itself: any key holder would learn the operator's internal hosts.
        raise WebhookRefused("webhook", f"`webhook` host {where!r} is not an allowed "
                                        f"destination (the operator's webhook_allow list "
                                        f"decides)")
    if events is None:
        return url, DEFAULT_EVENTS
    # In one order, so that an Idempotency-Key's body compares the set, not how it was
    # written (["failed", "succeeded"] was another request than the reverse).
    return url, tuple(event for event in EVENTS if event in events)


def needs_its_own_entry(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether a name in the allow list may not lead to ``address``: this host (loopback,
    0.0.0.0/8, ``::``), link-local (169.254.0.0/16, where clouds serve an instance's
    metadata and credentials; fe80::/10), the clouds' credential services outside it
    (``CREDENTIAL_SERVICES``), multicast or reserved (a NAT64 address: as its IPv4
    address). Whoever runs a name's DNS chooses what it resolves to at each delivery, long
    after the operator allowed it.

    >>> [needs_its_own_entry(ipaddress.ip_address(a)) for a in
    ...  ("127.0.0.5", "169.254.169.254", "::ffff:127.0.0.1", "10.0.0.5", "fd00::5",
    ...   "fd00:ec2::254")]
    [True, True, True, False, False, True]
    """
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    elif address in NAT64:  # judged by the IPv4 address it reaches
        address = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return (address.is_loopback or address.is_link_local or address.is_unspecified or
            address.is_multicast or address.is_reserved or address in CREDENTIAL_SERVICES or
            (address.version == 4 and address in THIS_NETWORK))


async def addresses_to_call(url: httpx.URL, settings: JobSettings) -> list[str | None]:
    """The addresses a delivery to ``url`` may connect to, in the order to try them:
    ``[None]`` when its host is an address (the allow list named it); for a name, every
    address it resolves to now, once each is one a name may lead to, or one the allow list
    names as an address (``127.0.0.1:8080`` beside ``localhost:8080``).

    Raises:
        WebhookRefused: the name resolves to an address of ``needs_its_own_entry``'s that
            no entry names.
        OSError: the name does not resolve (now).
    """
    host = url.raw_host.decode("ascii")
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(host)
        return [None]
    port = url.port or DEFAULT_PORTS[url.scheme]
    found = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    # An IPv6 link-local address comes with its zone (fe80::1%eth0).
    addresses = [ipaddress.ip_address(info[4][0].partition("%")[0]) for info in found]
    allowed = settings.allowed_destinations
    for address in addresses:
        spelled = f"[{address}]" if address.version == 6 else str(address)
        if needs_its_own_entry(address) and not allowed & {str(address), spelled,
                                                           f"{spelled}:{port}"}:
            raise WebhookRefused("webhook", f"`webhook` host {host}:{port} resolves to "
                                            f"{address}, which a name in the allow list "
                                            f"does not admit (an entry naming the "
                                            f"address does)")
    return list(dict.fromkeys(str(address) for address in addresses))


def proxy_named(proxies: dict[str, str], scheme: str) -> str | None:
    """The proxy ``proxies`` (urllib's reading of the environment) name for URLs of
    ``scheme``, None for none."""
    proxy = proxies.get(scheme) or proxies.get("all")
    # A bare host:port is an http:// proxy, as httpx and curl read one.
    return None if not proxy else proxy if "://" in proxy else f"http://{proxy}"


def unusable_proxy() -> str | None:
    """Why a proxy the environment names for webhooks cannot be used, in one line naming
    its variable; None when each can. It was a traceback from deep in httpx at the
    dispatcher's start. The value is not repeated: a proxy URL may hold a password."""
    proxies = urllib.request.getproxies_environment()
    for scheme in DEFAULT_PORTS:
        proxy = proxy_named(proxies, scheme)
        if proxy is None:
            continue
        named = scheme if proxies.get(scheme) else "all"
        # urllib reads either case, the lower case first.
        variable = next((name for name in (f"{named}_proxy", f"{named.upper()}_PROXY")
                         if name in os.environ), f"{named.upper()}_PROXY")
        given = proxy.partition("://")[0] + "://"
        try:
            httpx.AsyncHTTPTransport(proxy=proxy)  # opens nothing: only checks the URL
        except ImportError:
            return (f"{variable} names a {given} proxy for webhooks, which needs the "
                    f"socksio package, not installed here: install httpx[socks], or name "
                    f"an http:// proxy")
        except (ValueError, httpx.InvalidURL):
            return (f"{variable} names a {given} proxy for webhooks, which they cannot go "
                    f"through: name an http://, https://, socks5:// or socks5h:// one")
    return None


class Outbound:
    """The HTTP clients deliveries leave on: straight to the address a name was checked at
    (``addresses_to_call``), or by name through the proxy the environment names for the URL
    (``HTTP_PROXY``, ``HTTPS_PROXY``, ``ALL_PROXY``, not for a host ``NO_PROXY`` names; read
    once, as urllib reads them), which resolves the name itself. Certificates are checked
    against the name either way, with ``SSL_CERT_FILE`` or ``SSL_CERT_DIR`` when set.

    Why not httpx's own reading of those variables: it decides by the URL a request is
    sent to, and a delivery checked by name is sent to the address. A NO_PROXY naming the
    host no longer applied, the proxy was asked for the address (its rules by name did not
    apply), and HTTPS through it checked the certificate against the address: every such
    delivery failed.

    Example:
        async with Outbound() as outbound:
            await deliver(outbound, settings, url, message_id, payload)
    """

    def __init__(self, verify: ssl.SSLContext | None = None,
                 timeout: httpx.Timeout = httpx.Timeout(ANSWER_S)):
        self.proxies = urllib.request.getproxies_environment()
        # trust_env off: the proxies are ours to choose (above), and a ~/.netrc must not
        # give a receiver credentials. A proxy httpx cannot use (socks5:// without socksio)
        # ends the dispatcher's start, said in one line (unusable_proxy).
        options = {"verify": verify or httpx.create_ssl_context(), "timeout": timeout,
                   "trust_env": False}
        self.clients = {proxy: httpx.AsyncClient(proxy=proxy, **options) for proxy in
                        {None, *(proxy_named(self.proxies, scheme)
                                 for scheme in DEFAULT_PORTS)}}

    def proxy_for(self, url: httpx.URL) -> str | None:
        """The proxy a delivery to ``url`` goes through, None for none."""
        if urllib.request.proxy_bypass_environment(url.host, self.proxies):
            return None
        return proxy_named(self.proxies, url.scheme)

    def client(self, proxy: str | None) -> httpx.AsyncClient:
        return self.clients[proxy]

    async def __aenter__(self) -> "Outbound":
        return self

    async def __aexit__(self, *exc_info) -> None:
        for client in self.clients.values():
            await client.aclose()


async def post_to_first_that_connects(client: httpx.AsyncClient, url: httpx.URL,
                                      addresses: list[str | None], body: bytes,
                                      headers: dict[str, str]) -> httpx.Response:
    """POST ``body`` to ``url`` at the first of ``addresses`` that takes the connection
    (None: by the URL as it is), as a client given the name tries each address it resolves
    to: a receiver with an address down (one of its A records, or an AAAA on a host
    without IPv6 routes) is still reached. Each goes to the address checked, not to a
    second lookup of the name, which its DNS could answer with another (rebinding); the
    name stays the Host, and TLS checks the certificate against it.

    The client's connect timeout bounds the connecting to all of them, as curl's does: each
    address but the last is given half the time left, the last all of it. Each given the
    whole timeout, a name whose DNS answers many addresses that drop the connection's
    packets held the try, its slot and its event for 10 s per address.

    Raises:
        httpx.HTTPError: the last address's error, or any error once connected.
    """
    timeouts = client.timeout
    connect_by = time.monotonic() + timeouts.connect
    for index, address in enumerate(addresses):
        left = connect_by - time.monotonic()
        last = index == len(addresses) - 1
        # Past the time (attempts that overran theirs), a millisecond: a try, not none.
        timeout = httpx.Timeout(connect=max(left if last else left / 2, 0.001),
                                read=timeouts.read, write=timeouts.write, pool=timeouts.pool)
        target, extensions, sent_headers = url, {}, dict(headers)
        if address is not None:
            target = url.copy_with(host=address)
            sent_headers["host"] = url.netloc.decode("ascii")
            if url.scheme == "https":
                extensions["sni_hostname"] = url.raw_host.decode("ascii")
        request = client.build_request("POST", target, content=body, headers=sent_headers,
                                       extensions=extensions, timeout=timeout)
        try:
            return await whole_answer(client, request)
        except (httpx.ConnectError, httpx.ConnectTimeout):
            # Nothing was sent: the next address may take it.
            if last:
                raise
    raise AssertionError("no address to call")  # addresses_to_call returns at least one


async def whole_answer(client: httpx.AsyncClient, request: httpx.Request) -> httpx.Response:
    """``client.send(request)``, its whole answer within ``ANSWER_S`` of the request's start
    on the wire. The client's timeouts bound each read, not the answer: a receiver that sent
    a byte every few seconds held the try, its slot and its event (renewed) for as long as
    it went on. Connecting is the client's connect timeout's alone, so that an address
    that takes no connection gives its turn to the next (``ConnectTimeout``). Of the body,
    at most ``ANSWER_BODY_BYTES`` are read, as they came (never decompressed), and none is
    kept: the response has its status and headers only.

    Raises:
        httpx.ReadTimeout: no whole answer in time, a failed try as the client's own are.
    """
    sending = asyncio.Event()

    async def trace(event: str, info: dict) -> None:  # httpcore's, as the request goes
        if event.endswith("send_request_headers.started"):
            sending.set()

    async def answered() -> httpx.Response:
        response = await client.send(request, follow_redirects=False, stream=True)
        try:
            read = 0
            async for chunk in response.aiter_raw():
                read += len(chunk)
                if read >= ANSWER_BODY_BYTES:
                    break
        finally:
            await response.aclose()
        return response

    request.extensions = {**request.extensions, "trace": trace}
    answer = asyncio.ensure_future(answered())
    sent = asyncio.ensure_future(sending.wait())
    try:
        await asyncio.wait({answer, sent}, return_when=asyncio.FIRST_COMPLETED)
        return await asyncio.wait_for(answer, ANSWER_S)
    except asyncio.TimeoutError:
        raise httpx.ReadTimeout(f"no whole answer within {ANSWER_S:g} s",
                                request=request) from None
    finally:
        sent.cancel()
        answer.cancel()  # nothing once it is done; a try given up, or this task cancelled


async def deliver(outbound: Outbound, settings: JobSettings, url: str,
                  message_id: str, payload: dict, attempts: int | None = None,
                  first_delay_s: float = 1.0,
                  between_tries: Callable[[], AsyncContextManager] = contextlib.nullcontext
                  ) -> str:
    """POST one event until a 2xx or the last attempt: ``delivered``, ``failed`` or
    ``refused`` (the destination is no longer allowed, or it answered with a redirect).
    ``between_tries``: entered while it waits for the next try (the delivery loop gives its
    slot back there)."""
    body = json.dumps(payload).encode()
    delay = first_delay_s
    for attempt in range(attempts or settings.webhook_attempts):
        if attempt:
            async with between_tries():
                await asyncio.sleep(delay)
            delay *= 2
        try:
            check_webhook(url, None, settings)  # the allow list may have shrunk since
            parsed = httpx.URL(url)
            proxy = outbound.proxy_for(parsed)
            # Through a proxy, the proxy resolves the name and connects: what a name may
            # lead to is then its rules' to decide (a lookup here might not even resolve,
            # where only the proxy reaches a DNS that knows the name).
            addresses = [None] if proxy else await addresses_to_call(parsed, settings)
        except WebhookRefused as exc:
            log.warning("webhook %s not delivered: %s", message_id, exc.rule)
            return "refused"
        except OSError as exc:  # the name does not resolve (now): a failed try
            log.info("webhook %s attempt %d: %s", message_id, attempt + 1, type(exc).__name__)
            continue
        timestamp = int(time.time())
        headers = {"content-type": "application/json", "webhook-id": message_id,
                   "webhook-timestamp": str(timestamp),
                   "webhook-signature": sign(settings.webhook_secret, message_id, timestamp,
                                             body)}
        if parsed.scheme == "https" and addresses != [None]:
            # The client keeps connections by address, not by the name TLS checked: one
            # kept open would carry the next delivery to another name at that address (two
            # receivers behind one load balancer) without a check of its certificate.
            headers["connection"] = "close"
        try:
            response = await post_to_first_that_connects(outbound.client(proxy), parsed,
                                                         addresses, body, headers)
        except (httpx.InvalidURL, ValueError) as exc:
            # A URL the HTTP client cannot parse (stored before check_webhook refused such
            # URLs): no later try can do better, and it is no HTTPError to retry.
            log.warning("webhook %s not delivered: its URL is not valid (%s)", message_id,
                        type(exc).__name__)
            return "refused"
        except httpx.HTTPError as exc:
            log.info("webhook %s attempt %d: %s", message_id, attempt + 1, type(exc).__name__)
            continue
        if 200 <= response.status_code < 300:
            return "delivered"
        if 300 <= response.status_code < 400:
            log.warning("webhook %s: %s answered with a redirect; not followed",
                        message_id, destination(url))
            return "refused"
        log.info("webhook %s attempt %d: HTTP %d", message_id, attempt + 1,
                 response.status_code)
    # The tries were at INFO: this is the line an operator looks for.
    log.warning("webhook %s not delivered to %s: given up after %d attempts", message_id,
                destination(url), attempts or settings.webhook_attempts)
    return "failed"


class _TrySlot:
    """One delivery's place among those under way: one of its destination's slots and one
    of all, held while it makes a try and given back while it waits for the next. Held
    through the 15 s between a failing receiver's tries, four receivers that answer 500 or
    refuse at once took all 32 slots asleep, and every other receiver's events waited."""

    def __init__(self, slots: _Slots, where: str):
        self.semaphores = (slots.by_destination[where], slots.in_all)
        self.held = 0  # of the two: a cancel between their acquires leaves one held

    async def __aenter__(self) -> _TrySlot:
        for semaphore in self.semaphores:
            await semaphore.acquire()
            self.held += 1
        return self

    async def __aexit__(self, *exc_info) -> None:
        for semaphore in self.semaphores[:self.held]:
            semaphore.release()
        self.held = 0

    @contextlib.asynccontextmanager
    async def set_aside(self):
        """Give the slots back for the time of the ``with``, then wait for them again; not
        when it ends with an error (a cancel at the loop's end), which must not wait for one."""
        await self.__aexit__()
        yield
        await self.__aenter__()


class _Slots:
    """The delivery slots of one dispatcher: in all and per destination, how many events
    each destination holds (under way or waiting for a slot), and the line of those waiting
    beyond that. ``start(event, where)`` starts the delivery of a waiting event in the place
    a held one frees (the delivery loop's, so the task is counted and awaited as its own)."""

    def __init__(self, start: Callable[[tuple[str, str, str], str], None]):
        self.in_all = asyncio.Semaphore(DELIVERIES_IN_FLIGHT)
        self.by_destination: dict[str, asyncio.Semaphore] = {}
        self.held: dict[str, int] = {}
        self.waiting: dict[str, collections.deque[tuple[str, str, str]]] = {}
        self.waiting_entries: set[str] = set()
        self.start = start
        self.closed = False  # the loop is stopping: nothing waiting is started any more

    def hold(self, where: str) -> bool:
        """Count one more event held for ``where``; False when it holds its most."""
        if self.held.get(where, 0) >= HELD_PER_DESTINATION:
            return False
        self.held[where] = self.held.get(where, 0) + 1
        self.by_destination.setdefault(where, asyncio.Semaphore(DELIVERIES_PER_DESTINATION))
        return True

    def wait(self, where: str, event: tuple[str, str, str]) -> bool:
        """Put ``event`` (entry, job id, event) in ``where``'s line; False when the lines
        are full (the event is then left pending in Redis)."""
        if len(self.waiting_entries) >= WAITING_IN_ALL:
            return False
        self.waiting.setdefault(where, collections.deque()).append(event)
        self.waiting_entries.add(event[0])
        return True

    def release(self, where: str) -> None:
        """One of ``where``'s held events ended: the first in its line takes its place."""
        line = self.waiting.get(where)
        if line and not self.closed:
            event = line.popleft()
            if not line:
                del self.waiting[where]
            self.waiting_entries.discard(event[0])
            self.start(event, where)
            return
        self.held[where] -= 1
        if not self.held[where]:  # nobody waits on its semaphore: forget the destination
            del self.held[where], self.by_destination[where]


async def delivery_loop(store: JobStore, settings: JobSettings, dispatcher: str,
                        stop: asyncio.Event, faults: RepeatedWarnings | None = None) -> None:
    """Deliver the webhooks jobs have asked for, as long as this dispatcher runs; its queue
    unreachable is said through ``faults`` (the dispatcher's, which says once that Redis
    answers again, whichever of its loops sees it first).

    Nothing one delivery does may end the loop: it is the only one on this dispatcher, and
    an entry that broke it would be taken over by the next dispatcher and break that one's
    too. A delivery that fails with an error stays pending, to be retried (by any
    dispatcher) once its claim is ``4 x lease_s`` old; Redis away only pauses the loop.

    Deliveries run side by side, up to DELIVERIES_IN_FLIGHT, and the queue is read again as
    soon as one ends: waiting for a whole batch held every later event, to any receiver,
    behind one receiver slow to answer (10 s a try, about 65 s over its tries). One
    destination gets at most DELIVERIES_PER_DESTINATION of them: a burst of 32 events to a
    receiver that never answers took every slot, and every other receiver's events waited
    for its tries to end. Its further events wait in the dispatcher (HELD_PER_DESTINATION,
    then in its line, each started as one of them ends) or, beyond WAITING_IN_ALL, pending
    in Redis. The claims of all of them are renewed every ``lease_s`` (``_keep_claims``).
    """
    faults = faults or RepeatedWarnings(log)
    held: dict[str, asyncio.Task] = {}  # by stream entry: under way or waiting for a slot
    async with Outbound() as outbound:

        def start(event: tuple[str, str, str], where: str | None = None) -> None:
            """Deliver ``event``; ``where``: its destination, whose place it takes."""
            task = asyncio.create_task(_deliver_guarded(store, settings, outbound, slots,
                                                        *event, where))
            held[event[0]] = task
            task.add_done_callback(lambda _, done=event[0]: held.pop(done))

        slots = _Slots(start)
        keeper = asyncio.create_task(_keep_claims(store, settings, dispatcher, held, slots))
        try:
            waits = iter(QUEUE_RETRY_S)
            while not stop.is_set():
                room = min(HELD_IN_ALL - len(held), DELIVERIES_IN_FLIGHT)
                if room <= 0:
                    await asyncio.wait(held.values(), return_when=asyncio.FIRST_COMPLETED)
                    continue
                try:
                    entries = await store.next_webhooks(dispatcher, settings.lease_s * 4,
                                                        room)
                except Exception as exc:  # noqa: BLE001 - Redis restarting: try again
                    delay = next(waits, QUEUE_RETRY_S[-1])
                    # Without the delay, which changes: each line would be a new one.
                    faults.warning(f"webhook queue unreachable ({reason_to_log(exc)}); tried "
                                   f"again within {QUEUE_RETRY_S[-1]} s")
                    await asyncio.sleep(delay)
                    continue
                waits = iter(QUEUE_RETRY_S)
                faults.ended("Redis answers again")
                for entry in entries:
                    if entry[0] in held or entry[0] in slots.waiting_entries:
                        continue  # its claim aged under us (Redis away): still ours
                    start(entry)
            slots.closed = True  # told to stop: let the deliveries under way end
            while held:
                await asyncio.wait(list(held.values()))
        finally:
            # Cancelled (the dispatcher is ending): what is under way or waiting stays
            # pending, to be delivered again by another dispatcher.
            slots.closed = True
            tasks = [keeper, *held.values()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def _keep_claims(store: JobStore, settings: JobSettings, dispatcher: str,
                       held: dict[str, asyncio.Task], slots: _Slots) -> None:
    """Renew, every ``lease_s``, the claims of the events this dispatcher holds or keeps
    waiting, so that no other dispatcher takes them over (it does once one is
    ``4 x lease_s`` old): one command per RENEWED_AT_ONCE events, not one per event."""
    while True:
        await asyncio.sleep(settings.lease_s)
        entries = [*held, *slots.waiting_entries]
        for first in range(0, len(entries), RENEWED_AT_ONCE):
            try:
                await store.renew_webhooks(entries[first:first + RENEWED_AT_ONCE],
                                           dispatcher)
            except Exception as exc:  # noqa: BLE001 - Redis restarting: renew next time
                log.info("%d webhook claims not renewed: %s", len(entries), reason_to_log(exc))
                break


async def _deliver_guarded(store: JobStore, settings: JobSettings, outbound: Outbound,
                           slots: _Slots, entry: str, job_id: str, event: str,
                           where: str | None) -> None:
    try:
        await _deliver_entry(store, settings, outbound, slots, entry, job_id, event, where)
    except Exception as exc:  # noqa: BLE001 - see delivery_loop: the entry is retried later
        log.warning("webhook %s.%s (entry %s) failed with %s; left pending for a retry",
                    job_id, event, entry, reason_to_log(exc))


async def _deliver_entry(store: JobStore, settings: JobSettings, outbound: Outbound,
                         slots: _Slots, entry: str, job_id: str, event: str,
                         where: str | None) -> None:
    """Deliver one event. ``where``: its destination, when it comes from that destination's
    line and already has the place of the held event that started it; else it is held
    here, or put in the line, or left pending when the lines are full."""
    if where is None:
        job = await store.job(job_id)
        if job is None or not job.get("webhook"):
            await store.webhook_done(entry, "expired")
            return
        where = destination(job["webhook"])
        if not slots.hold(where):
            if not slots.wait(where, (entry, job_id, event)):
                # Read again (by any dispatcher) once its claim is 4 x lease_s old.
                log.debug("webhook entry %s left pending: its destination holds its most "
                          "and the lines are full", entry)
            return
    try:
        async with _TrySlot(slots, where) as slot:
            # Read again: the payload is the job as it is when the delivery is made, and
            # waiting for a slot may have taken a while.
            job = await store.job(job_id)
            if job is None or not job.get("webhook"):
                outcome = "expired"
            else:
                payload = {"type": f"job.{event}", "timestamp": int(time.time()),
                           "data": job_view(job, ttl_s=settings.result_ttl_s)}
                outcome = await deliver(outbound, settings, job["webhook"],
                                        f"{job_id}.{event}", payload,
                                        between_tries=slot.set_aside)
    finally:
        slots.release(where)
    await store.webhook_done(entry, outcome)

"""Job API and dispatcher settings, read once into a frozen object.

Every setting has a default that is safe in production and an ``SDXL_JOBS_<NAME>``
environment variable, but Redis's URL: ``SDXL_REDIS_URL``, which the keys command reads
too; the command lines of the API and the dispatcher override both. A bad value fails the
start at once with a message naming the variable (``SDXL_JOBS_LEASE_S``, not ``lease_s``).

Example:
    >>> s = JobSettings.from_env({"SDXL_JOBS_RESULT_TTL_S": "60",
    ...                           "SDXL_REDIS_URL": "redis://r:6379/1",
    ...                           "SDXL_JOBS_REDIS_URL": "redis://ignored/"})
    >>> (s.result_ttl_s, s.max_attempts, s.webhook_allow, s.redis_url)
    (60, 3, (), 'redis://r:6379/1')
"""

from __future__ import annotations

import argparse
import base64
import binascii
import ipaddress
import logging
import math
import os
import re
from dataclasses import dataclass, fields, replace
from functools import cached_property
from typing import Any, Mapping

from redis.asyncio.connection import parse_url

from sdxl_serve.server import is_host
from sdxl_serve.settings import BOOLEAN_WORDS, parse_bool


# Every name `logging` takes, as it took them before they were checked here: a deployment
# that set WARN or CRITICAL must not stop starting (exit 2) on an upgrade.
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "WARN", "ERROR", "CRITICAL", "FATAL", "NOTSET")


# The longest a seconds setting may be: 10 years, which no lease, wait or TTL needs. Redis
# is given them in milliseconds (XAUTOCLAIM's min-idle-time, SET PX, a script's arguments)
# as 64-bit integers or a script's doubles: a lease of 1e30 failed every read of the queue
# ("Invalid min-idle-time"), a TTL of 99999999999999999 every cancel ("value is not an
# integer or out of range"), each long after the start had taken it.
MAX_SECONDS = 10 * 365 * 24 * 3600


class JobSettingsError(ValueError):
    """A setting has a value we cannot run with."""


@dataclass(frozen=True)
class JobSettings:
    """How the job API and its dispatchers run."""

    redis_url: str = "redis://127.0.0.1:6379/0"
    result_ttl_s: int = 3600
    """How long a finished job, its events and its images are kept."""
    max_wait_s: int = 60
    """Most seconds a ``Prefer: wait=N`` submit may hold the connection."""
    max_body_bytes: int = 1 << 20
    """Largest submit body; bigger ones get 413 before they are parsed (TorchServe's limit)."""
    body_timeout_s: float = 30.0
    """Most seconds a request's body may take to arrive, from the end of its headers: a
    client that trickles its body, or sends none after declaring one, would otherwise hold
    a connection and a task for as long as it likes (slowloris). Past it: 408, closed."""
    header_timeout_s: float = 10.0
    """Most seconds a request's line and headers may take to arrive, from the connection's
    start or, on a kept-alive connection, from the next request's first byte: a client that
    trickles them, or connects and sends nothing, would otherwise hold a connection for as
    long as it likes. Past it: closed, after a 408 if part of a head came. Not the body's
    limit: a head is at most 16 KiB and comes in one read from any normal client. Time idle
    between requests is uvicorn's keep-alive (5 s)."""
    rate_per_minute: int = 120
    """Submits per API key per minute (429 with Retry-After beyond)."""
    max_active_per_key: int = 32
    """Queued or running jobs one API key may have at once (429 beyond)."""
    max_streams_per_key: int = 8
    """Event streams (and ``Prefer: wait`` submits) one API key may hold open at once on one
    API replica (429 beyond): each holds a Redis connection while it waits."""
    max_waiting: int = 256
    """Event streams and ``Prefer: wait`` submits of all keys together held open at once on
    one API replica (503 with Retry-After beyond; a ``Prefer: wait`` submit is answered at
    once). Each holds a Redis connection while it waits, and Redis's ``maxclients`` is
    shared with the dispatchers: unbounded, the browsers of 1,000 keys took up to 8,000
    connections from one replica, and a dispatcher could no longer connect."""
    redis_connections: int = 64
    """Redis connections one API replica holds for every call but the waits (503 with
    Retry-After when none comes free within ``store.CALL_CONNECTION_S``). Unbounded, the
    pool grew to as many calls as reached Redis at once and kept them all for good (300
    GETs at once left 24 open), from the ``maxclients`` the dispatchers share."""
    max_attempts: int = 3
    """Times a job is started before it goes to the dead-letter stream as failed."""
    lease_s: float = 30.0
    """A job whose dispatcher has not renewed its claim for this long is taken over."""
    drain_s: float = 120.0
    """A dispatcher told to stop (SIGTERM) takes no new job and finishes those in flight for
    up to this long; what is left is taken over by another after ``lease_s``."""
    consumer_idle_s: float = 3600.0
    """A consumer of the stream's groups (a dispatcher's name) that owns no entry and has
    not read for this long is removed: its dispatcher is gone. A live one that owns nothing
    reads every second; one that waited longer (its TorchServe down) is added again by its
    next read."""
    webhook_allow: tuple[str, ...] = ()
    """Webhook destinations allowed, as ``host`` or ``host:port`` (``[fd00::5]:8443`` for an
    IPv6 address); none by default (a server that POSTs anywhere it is told is an SSRF
    hole)."""
    webhook_secret: str = ""
    """Standard Webhooks signing secret (``whsec_`` + base64); webhooks are refused without."""
    webhook_attempts: int = 5
    """Deliveries tried per webhook event, with exponential backoff from 1 s."""
    cancel_dir: str = ""
    """The dispatcher's view of the directory TorchServe's workers watch for cancel flags
    (their ``SDXL_CANCEL_DIR``; in Kubernetes one volume both containers mount): canceling
    a running job then stops its generation at the next step. Empty: the job's result is
    not stored, but its batch runs to its end. Only the dispatcher reads it (and refuses to
    start when it is not a directory): the API may share the environment without the volume."""
    redis_rewrite_s: float = 0.0
    """Above 0, the API has Redis rewrite its append-only file at most this often (1 to
    86400 s), when keys expired since the last rewrite, so that an expired job leaves
    Redis's files too, not only its memory (``retention``). 0, the default: Redis rewrites
    it on its own, once the file has doubled. Off by default: a Redis of yours may refuse
    BGREWRITEAOF (managed services do), or keep its data otherwise; the Kubernetes
    overlay turns it on for its own Redis."""
    redis_no_aof_ok: bool = False
    """Set (``1``) where Redis keeps its data without an append-only file (a managed
    service that relies on replication): the API and the dispatchers then do not warn at
    their start that it runs with ``appendonly no`` (``store.say_persistence``)."""
    log_level: str = "INFO"
    """The least level the API's and the dispatcher's own log lines are written at (a name of
    ``LOG_LEVELS``, any case). No line of theirs holds a prompt, at any level."""

    @cached_property
    def allowed_destinations(self) -> frozenset[str]:
        """``webhook_allow``'s entries as a webhook's destination is compared with them
        (``allow_entry``): read once, not at every submit and every delivery."""
        return frozenset(allow_entry(entry) for entry in self.webhook_allow)

    @classmethod
    def from_env(cls, env: Mapping[str, str], **overrides: Any) -> "JobSettings":
        """Defaults, then ``SDXL_JOBS_*`` variables (``SDXL_REDIS_URL`` for ``redis_url``,
        the one name every part of the stack reads), then explicit ``overrides``."""
        values: dict[str, Any] = {}
        as_set: dict[str, str] = {}
        for field in fields(cls):
            raw = env.get(variable(field.name))
            if raw is not None:
                values[field.name] = _convert(field.name, field.type, raw)
                as_set[field.name] = raw
        for name, value in overrides.items():
            if value is not None:
                values[name] = value
                as_set.pop(name, None)
        settings = replace(cls(), **values)
        settings.check(as_set)
        return settings

    @classmethod
    def of_command(cls, parser: argparse.ArgumentParser, redis_url: str | None
                   ) -> "JobSettings":
        """The settings of a command (the API, a dispatcher) from its environment, its
        logging set to their level; a bad one ends the command in one line, exit 2."""
        try:
            if redis_url:  # refused in the words of where it was given
                check_redis_url(redis_url, redis_url_name(redis_url))
            settings = cls.from_env(os.environ, redis_url=redis_url)
        except JobSettingsError as exc:
            parser.error(str(exc))
        logging.basicConfig(level=settings.log_level.upper(),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return settings

    def check(self, as_set: Mapping[str, str] | None = None) -> None:
        """Raise ``JobSettingsError`` for the first value we cannot run with, naming its
        variable and the value as set (``as_set``: the variables' text by field; a value
        given otherwise is shown as read)."""
        def shown(name: str) -> str:
            return (as_set or {}).get(name) or str(getattr(self, name))

        positive = ("result_ttl_s", "max_wait_s", "max_body_bytes", "body_timeout_s",
                    "header_timeout_s", "rate_per_minute", "max_active_per_key",
                    "max_streams_per_key", "max_waiting", "redis_connections", "max_attempts",
                    "lease_s", "drain_s", "consumer_idle_s", "webhook_attempts")
        for name in positive:
            # NaN passes `<= 0` (every comparison with it is false) and a lease of NaN made
            # every read of the queue fail for good; infinity is no deadline at all.
            if not 0 < getattr(self, name) < math.inf:
                raise JobSettingsError(f"{variable(name)} must be a positive finite number, "
                                       f"got {shown(name)}")
            if name.endswith("_s") and getattr(self, name) > MAX_SECONDS:
                raise JobSettingsError(f"{variable(name)} must be at most {MAX_SECONDS} "
                                       f"seconds (10 years; Redis takes it in milliseconds, "
                                       f"a 64-bit integer), got {shown(name)}")
        # NaN fails both comparisons, as above.
        if not (self.redis_rewrite_s == 0 or 1 <= self.redis_rewrite_s <= 86400):
            raise JobSettingsError(f"SDXL_JOBS_REDIS_REWRITE_S must be 0 (off) or a number of "
                                   f"seconds from 1 to 86400, got {shown('redis_rewrite_s')}")
        check_redis_url(self.redis_url)
        if self.log_level.upper() not in LOG_LEVELS:
            raise JobSettingsError(f"SDXL_JOBS_LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}, "
                                   f"got {self.log_level!r}")
        # A secret set but wrong is webhook_key's to name (it said "must be set").
        if self.webhook_allow and not self.webhook_secret:
            raise JobSettingsError("SDXL_JOBS_WEBHOOK_SECRET must be set (whsec_...) when "
                                   "SDXL_JOBS_WEBHOOK_ALLOW names destinations: deliveries are "
                                   "always signed")
        if self.webhook_secret:
            webhook_key(self.webhook_secret)
        # Read here, at the start: a malformed entry ends it, naming the entry.
        self.allowed_destinations


def host_spelling(host: str) -> str:
    """The one spelling of a host that destinations and allow entries are compared in: an
    IP address as ``ipaddress`` writes it (an IPv6 one shortest, in lower case), a name in
    lower case. Two spellings of one address were two destinations, each with its own
    delivery slots, and an allow entry took only the spelling it was written in.

    >>> host_spelling("FD00:0::5"), host_spelling("fd00:0000:0:0:0:0:0:5")
    ('fd00::5', 'fd00::5')
    >>> host_spelling("Hooks.Example"), host_spelling("10.0.0.5")
    ('hooks.example', '10.0.0.5')
    """
    host = host.lower()
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:  # a name (or what only a resolver reads as an address, 10.1)
        return host


def allow_entry(entry: str) -> str:
    """An entry of ``SDXL_JOBS_WEBHOOK_ALLOW`` as the allow list compares it, its host in
    ``host_spelling``'s: the one reader of an entry, at the start and for every webhook, so
    that none the start takes is read another way later. An entry names a destination as a
    refused webhook names it: ``host`` or ``host:port``, an IPv6 address bare (any port) or
    in brackets (with a port in brackets only). A bare IPv6 address is read whole, never as
    an address and a port (`fd00::5:8443` is that address, any port), so no entry allows
    more than it did: only the other spellings of what it names.

    >>> allow_entry("[FD00:0::5]:8443"), allow_entry("fd00:0::5:8443")
    ('[fd00::5]:8443', 'fd00::5:8443')
    >>> allow_entry("Hooks.Example:443"), allow_entry("[fd00::5]"), allow_entry("10.0.0.5")
    ('hooks.example:443', '[fd00::5]', '10.0.0.5')
    >>> allow_entry("hooks.example:0443"), allow_entry("[fd00::5]:08443")
    ('hooks.example:443', '[fd00::5]:8443')
    >>> allow_entry("https://hooks.example.com")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    sdxl_jobs.settings.JobSettingsError: SDXL_JOBS_WEBHOOK_ALLOW's ... 'https://hooks.example.com'

    Raises:
        JobSettingsError: the entry is of another form (a URL pasted in, a path, a
            wildcard), which was taken and allowed nothing: every webhook to the host meant
            was refused as not allowed, the list seeming to name it.
    """
    bracketed = entry.startswith("[")
    if bracketed:  # an IPv6 address, then nothing or a colon and a port
        host, bracket, after = entry[1:].partition("]")
        stray, colon, port = after.partition(":")
        good = bool(bracket) and ":" in host and not stray
    elif entry.count(":") > 1:  # a bare IPv6 address, read whole
        host, colon, port, good = entry, "", "", True
    else:
        host, colon, port = entry.partition(":")
        good = True
    # A colon with no port after it is refused in brackets too: `[fd00::5]:` started and
    # allowed nothing (compared as written, with its colon).
    if not (good and entry.isascii() and is_host(host.lower()) and
            (not colon or re.fullmatch(r"[0-9]+", port) and 1 <= int(port) <= 65535)):
        raise JobSettingsError(f"SDXL_JOBS_WEBHOOK_ALLOW's entries must be host or host:port "
                               f"(hooks.example.com:443; an IPv6 address in brackets: "
                               f"[fd00::5]:8443), the port from 1 to 65535, got {entry!r}")
    host = f"[{host_spelling(host)}]" if bracketed else host_spelling(host)
    # The port as a destination writes it: `:0443` was compared as written and allowed
    # nothing, where it means 443.
    return f"{host}:{int(port)}" if colon else host


# The shortest webhook signing key taken: 128 bits. `whsec_` alone was an empty HMAC key,
# with which anyone signs a delivery its receiver accepts.
WEBHOOK_KEY_MIN_BYTES = 16


def webhook_key(secret: str) -> bytes:
    """The HMAC key of ``secret`` (``whsec_`` and base64, as Standard Webhooks write it): the
    one decoder of the secret, the start's check and every signature's.

    Raises:
        JobSettingsError: it is not ``whsec_`` and base64 of 16 bytes or more; the message
            says what is wrong without quoting the secret. A key that was not base64 failed
            every delivery (left pending for good), and the base64 decoder's default drops
            what is not base64, so ``whsec_!!!!`` was the empty key.

    >>> webhook_key("whsec_" + "c2VjcmV0LWtleS1vZi0xNi1ieXRlcw==")
    b'secret-key-of-16-bytes'
    """
    rule = (f"SDXL_JOBS_WEBHOOK_SECRET must be whsec_ and the base64 of at least "
            f"{WEBHOOK_KEY_MIN_BYTES} random bytes (e.g. whsec_$(openssl rand -base64 32))")
    if not secret.startswith("whsec_"):
        raise JobSettingsError(f"{rule}; it does not start with whsec_")
    # Whitespace is no part of the key: the lenient decoder that signed before this check
    # dropped it, so a secret read from a file (its final newline, `openssl rand -base64
    # 64`'s line break) signed with the key its receiver holds, and must still start.
    encoded = "".join(secret.removeprefix("whsec_").split())
    try:
        key = base64.b64decode(encoded, validate=True)
    except binascii.Error:
        raise JobSettingsError(f"{rule}; what follows whsec_ is not base64") from None
    if len(key) < WEBHOOK_KEY_MIN_BYTES:
        raise JobSettingsError(f"{rule}; it holds {len(key)} bytes")
    return key


# A query value redis-py takes as a secret: `?password=` is the password too, and
# `ssl_password` a client key's.
_SECRET_QUERY = re.compile(r"((?:^|&)[^=&]*password=)[^&]*", re.IGNORECASE)


def redacted_url(url: str) -> str:
    """``url`` as a log line or an error message may show it: the password ``***``.

    Everything before the last ``@`` of what follows the scheme is taken as the user part,
    so a password with an unencoded ``/``, ``#`` or ``@`` (which URL parsers read as a path,
    a fragment or the host) is hidden all the same; without a ``:`` there, the whole user
    part may be the password, and is hidden.

    >>> redacted_url("rediss://jobs:s3cret@redis.example:6380/0?ssl_ca_certs=/etc/ca.crt")
    'rediss://jobs:***@redis.example:6380/0?ssl_ca_certs=/etc/ca.crt'
    >>> redacted_url("redis://:pa/ss#w@rd@host:6379/0"), redacted_url("s3cret@host:6379")
    ('redis://:***@host:6379/0', '***@host:6379')
    >>> redacted_url("redis://host:6379/0?db=1&password=s3cret")
    'redis://host:6379/0?db=1&password=***'
    >>> redacted_url("redis://:s3://cret@host:6379/0?client_name=http://x")
    'redis://:***@host:6379/0?client_name=http://x'
    """
    # The first "://": a later one is in the password or the query, which it would show.
    scheme, separator, rest = url.partition("://")
    if not separator:
        scheme, rest = "", url
    if "@" in rest:
        user_part, _, rest = rest.rpartition("@")
        user, colon, _ = user_part.partition(":")
        rest = f"{user}:***@{rest}" if colon else f"***@{rest}"
    where, question, query = rest.partition("?")
    query = _SECRET_QUERY.sub(r"\g<1>***", query)
    return f"{scheme}{separator}{where}{question}{query}"


def check_redis_url(url: str, name: str = "SDXL_REDIS_URL") -> None:
    """Refuse, naming the URL without its password, a Redis URL that redis-py would take
    and then fail with at the first command (or fail reading, its message quoting a part of
    an unencoded password), or that names TLS files which are not there. ``name``: where
    it was given (``redis_url_name``).

    >>> try:
    ...     check_redis_url("rediss://:s3cret@r:6380/0?ssl_ca_certs=/nonexistent/ca.crt")
    ... except JobSettingsError as exc:
    ...     print(str(exc).split(" (in ")[0], "s3cret" in str(exc))
    SDXL_REDIS_URL's ssl_ca_certs '/nonexistent/ca.crt' is not a file False
    """
    shown = redacted_url(url)
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise JobSettingsError(f"{name} must be a redis://, rediss:// (TLS) or "
                               f"unix:// URL, got {shown!r}")
    try:
        options = parse_url(url)
    except ValueError as exc:
        # redis-py's own words, but for a port it cannot read: its message quotes it, and
        # an unencoded / or # in a password puts the password's start there.
        why = str(exc) if str(exc).startswith("Invalid value") else "its port is no number"
        raise JobSettingsError(f"{name} {shown!r} cannot be read: {why} (a "
                               f"password's / ? # @ % must be percent-encoded)") from None
    if not url.startswith("unix://") and "host" not in options:
        raise JobSettingsError(f"{name} {shown!r} names no host (a password's "
                               f"/ ? # @ % must be percent-encoded)")
    files = {"ssl_ca_certs": "the CA certificate(s) that signed the server's, in PEM",
             "ssl_certfile": "this client's certificate, in PEM",
             "ssl_keyfile": "this client's key, in PEM"}
    for option, what in files.items():
        path = options.get(option)
        if path is not None and not os.path.isfile(path):
            # Found missing only at the first connection, it was "Error 2 connecting to
            # host:port. No such file or directory." on every call.
            raise JobSettingsError(f"{name}'s {option} {path!r} is not a file (in "
                                   f"{shown!r}): {what}")


def redis_url_name(url: str) -> str:
    """Where a command's Redis URL came from, to name it in a refusal: ``--redis`` unless it
    is ``SDXL_REDIS_URL``'s (the flag's default)."""
    return "SDXL_REDIS_URL" if url == os.environ.get("SDXL_REDIS_URL") else "--redis"


def command_parser(module: str, doc: str) -> argparse.ArgumentParser:
    """The parser of a job command run as ``python -m <module>``, with its ``--redis`` (the
    URL, else ``SDXL_REDIS_URL``, else the default), described by its module's ``doc``."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}",
                                     description=doc.splitlines()[0])
    parser.add_argument("--redis", default=os.environ.get("SDXL_REDIS_URL"))
    return parser


def variable(name: str) -> str:
    """The environment variable a user sets for the setting ``name``: what its errors name.

    >>> variable("lease_s"), variable("redis_url")
    ('SDXL_JOBS_LEASE_S', 'SDXL_REDIS_URL')
    """
    return "SDXL_REDIS_URL" if name == "redis_url" else f"SDXL_JOBS_{name.upper()}"


def _convert(name: str, kind: Any, raw: str) -> Any:
    kind = str(kind)
    try:
        if "tuple" in kind:
            return tuple(part.strip() for part in raw.split(",") if part.strip())
        if kind == "int":  # annotations are strings here (from __future__ import annotations)
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "bool":
            return parse_bool(raw)
    except ValueError:
        # "A number" refused 2.5 for a count, which is one.
        rule = {"int": "a whole number", "bool": BOOLEAN_WORDS}.get(kind, "a number")
        raise JobSettingsError(f"{variable(name)} must be {rule}, got {raw!r}") from None
    return raw

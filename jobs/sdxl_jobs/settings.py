"""Job API and dispatcher settings, read once into a frozen object.

Every setting has a default that is safe in production and an ``SDXL_JOBS_<NAME>``
environment variable, but Redis's URL: ``SDXL_REDIS_URL``, which the keys command reads
too; the command lines of the API and the dispatcher override both. A bad value fails the
start at once with a message naming the setting.

Example:
    >>> s = JobSettings.from_env({"SDXL_JOBS_RESULT_TTL_S": "60",
    ...                           "SDXL_REDIS_URL": "redis://r:6379/1",
    ...                           "SDXL_JOBS_REDIS_URL": "redis://ignored/"})
    >>> (s.result_ttl_s, s.max_attempts, s.webhook_allow, s.redis_url)
    (60, 3, (), 'redis://r:6379/1')
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from dataclasses import dataclass, fields, replace
from typing import Any, Mapping


# Every name `logging` takes, as it took them before they were checked here: a deployment
# that set WARN or CRITICAL must not stop starting (exit 2) on an upgrade.
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "WARN", "ERROR", "CRITICAL", "FATAL", "NOTSET")


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
    """Webhook destinations allowed, as ``host`` or ``host:port``; none by default (a server
    that POSTs anywhere it is told is an SSRF hole)."""
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
    log_level: str = "INFO"
    """The least level the API's and the dispatcher's own log lines are written at (a name of
    ``LOG_LEVELS``, any case). No line of theirs holds a prompt, at any level."""

    @classmethod
    def from_env(cls, env: Mapping[str, str], **overrides: Any) -> "JobSettings":
        """Defaults, then ``SDXL_JOBS_*`` variables (``SDXL_REDIS_URL`` for ``redis_url``,
        the one name every part of the stack reads), then explicit ``overrides``."""
        values: dict[str, Any] = {}
        for field in fields(cls):
            raw = env.get("SDXL_REDIS_URL" if field.name == "redis_url"
                          else f"SDXL_JOBS_{field.name.upper()}")
            if raw is not None:
                values[field.name] = _convert(field.name, field.type, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = replace(cls(), **values)
        settings.check()
        return settings

    @classmethod
    def of_command(cls, parser: argparse.ArgumentParser, redis_url: str | None
                   ) -> "JobSettings":
        """The settings of a command (the API, a dispatcher) from its environment, its
        logging set to their level; a bad one ends the command in one line, exit 2."""
        try:
            settings = cls.from_env(os.environ, redis_url=redis_url)
        except JobSettingsError as exc:
            parser.error(str(exc))
        logging.basicConfig(level=settings.log_level.upper(),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return settings

    def check(self) -> None:
        positive = ("result_ttl_s", "max_wait_s", "max_body_bytes", "body_timeout_s",
                    "header_timeout_s", "rate_per_minute",
                    "max_active_per_key", "max_streams_per_key", "max_attempts", "lease_s",
                    "drain_s", "consumer_idle_s",
                    "webhook_attempts")
        for name in positive:
            # NaN passes `<= 0` (every comparison with it is false) and a lease of NaN made
            # every read of the queue fail for good; infinity is no deadline at all.
            if not 0 < getattr(self, name) < math.inf:
                raise JobSettingsError(f"{name} must be a positive finite number, got "
                                       f"{getattr(self, name)}")
        if not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise JobSettingsError(f"redis_url must be a redis:// URL, got {self.redis_url!r}")
        if self.log_level.upper() not in LOG_LEVELS:
            raise JobSettingsError(f"SDXL_JOBS_LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}, "
                                   f"got {self.log_level!r}")
        if self.webhook_allow and not self.webhook_secret.startswith("whsec_"):
            raise JobSettingsError("webhook_secret must be set (whsec_...) when webhook_allow "
                                   "names destinations: deliveries are always signed")


def _convert(name: str, kind: Any, raw: str) -> Any:
    kind = str(kind)
    try:
        if "tuple" in kind:
            return tuple(part.strip() for part in raw.split(",") if part.strip())
        if kind == "int":  # annotations are strings here (from __future__ import annotations)
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError:
        raise JobSettingsError(f"SDXL_JOBS_{name.upper()} must be a number, got {raw!r}") \
            from None
    return raw

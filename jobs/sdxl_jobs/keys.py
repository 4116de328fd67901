"""API keys of the job API: made here, stored in Redis only as their SHA-256.

Usage:
    python -m sdxl_jobs.keys create --redis URL --name team-a [--out FILE]
    python -m sdxl_jobs.keys list --redis URL
    python -m sdxl_jobs.keys revoke --redis URL (--id ID | --key-file FILE)

``create`` prints the key once (or writes it to FILE with mode 600, keeping a key already
there): it cannot be read back from Redis. ``list`` shows each key's id (the start of its
SHA-256), name and creation time; ``revoke`` removes one: every call with it is 401 from
then on (an events stream already open runs to its end).
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import sys
import time
from pathlib import Path

from redis.exceptions import RedisError

from sdxl_jobs.settings import (JobSettingsError, check_redis_url, command_parser,
                                redis_url_name)
from sdxl_jobs.store import JobStore, reason_to_log, unusable

# What new_key makes: "sdxl_" and 32 random bytes in URL-safe base64 (43 characters).
KEY_FORMAT = re.compile(r"sdxl_[A-Za-z0-9_-]{43}")
# The shortest id prefix `revoke --id` takes: 32 bits, as `list` shows 12 hex digits.
MIN_ID_DIGITS = 8


class KeyFileError(ValueError):
    """A key file that holds no key of ours: its content is not registered."""


def write_private(path: Path, text: str, replace: bool = False) -> None:
    """Write ``text`` to ``path``, readable by its owner only from the moment it exists
    (mode 600 at creation, never wider), whole or not at all. An existing file is an error
    (FileExistsError) unless ``replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written beside it, then put in place: a full disk refuses the bytes (ENOSPC, at the
    # write or the close) after the file is made, and a key or a password cut short, even
    # empty, was left where the next start read it as the real one.
    partial = path.with_name(f".{path.name}.{secrets.token_hex(4)}.partial")
    try:
        with os.fdopen(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600),
                       "w") as handle:
            handle.write(text)
        if replace:
            os.replace(partial, path)
        else:
            os.link(partial, path)  # FileExistsError where there is one: never replaced
    except OSError as exc:
        if exc.errno is None:
            raise
        # Named as the file asked for: the partial one's name is nothing to its reader.
        raise OSError(exc.errno, exc.strerror, str(path)) from None
    finally:
        partial.unlink(missing_ok=True)


def new_key() -> str:
    return "sdxl_" + secrets.token_urlsafe(32)


def read_key_file(path: Path) -> str:
    """The key in ``path``; ``KeyFileError`` when it holds anything else. Registering any
    content made a password of five letters (or an empty file) a working key."""
    # Undecodable bytes are read as such, so a binary file is "no key", not a traceback.
    token = path.read_text(errors="replace").strip()
    if not KEY_FORMAT.fullmatch(token):
        raise KeyFileError(f"{path} holds no API key (sdxl_ and 43 characters of URL-safe "
                           f"base64): its content is not registered; remove it, or choose "
                           f"another --out")
    return token


async def ensure_key(store: JobStore, name: str, out: Path | None) -> str:
    """The key in ``out`` if it holds one (registered again on a fresh Redis), else a new
    key (written to ``out``)."""
    if out is not None and out.exists():
        token = read_key_file(out)
        if not await store.owner_of(token):
            if await store.is_revoked(token):
                raise KeyFileError(f"the key in {out} was revoked: remove the file, and a "
                                   f"new key is written there")
            await store.add_key(token, name)  # a fresh Redis: the file's key stays valid
        return token
    token = new_key()
    # Written before it is registered: a file that cannot be written (a folder that may not
    # be made, a full disk) registered a key that nobody holds. A key written whose
    # registration fails is registered by the next run with the same ``out``.
    if out is not None:
        write_private(out, token + "\n")
    await store.add_key(token, name)
    return token


async def revoke(store: JobStore, key_id: str | None, key_file: Path | None) -> str:
    """Revoke the key ``key_id`` names (a prefix of its id) or ``key_file`` holds; its id."""
    if key_file is not None:
        owner = await store.owner_of(read_key_file(key_file))
        if owner is None:
            raise KeyFileError(f"the key in {key_file} is not known (revoked already?)")
    else:
        key_id = (key_id or "").lower()
        if len(key_id) < MIN_ID_DIGITS or not re.fullmatch(r"[0-9a-f]+", key_id):
            raise KeyFileError(f"--id must be at least {MIN_ID_DIGITS} hex digits of an id "
                               f"that `list` shows, got {key_id!r}")
        matches = [key["id"] for key in await store.keys() if key["id"].startswith(key_id)]
        if len(matches) != 1:
            raise KeyFileError(f"--id {key_id} matches {len(matches)} keys, not one")
        owner = matches[0]
    await store.revoke_key(owner)
    return owner


def key_line(key: dict) -> str:
    """One line of ``list``: the id's first 12 hex digits, when it was made, its name."""
    made = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(key["created_at"]))
    return f"{key['id'][:12]}  {made}  {key['name']}"


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("sdxl_jobs.keys", __doc__)
    parser.add_argument("command", choices=("create", "list", "revoke"))
    parser.add_argument("--name", help="create: who the key is for")
    parser.add_argument("--out", type=Path, default=None, help="create: write the key here")
    parser.add_argument("--id", help="revoke: the key's id, or its first 8+ hex digits")
    parser.add_argument("--key-file", type=Path, help="revoke: the key in this file")
    args = parser.parse_args(argv)
    if not args.redis:
        parser.error("--redis (or SDXL_REDIS_URL) is required")
    try:
        check_redis_url(args.redis, redis_url_name(args.redis))
    except JobSettingsError as exc:
        parser.error(str(exc))
    if args.command == "create" and not args.name:
        parser.error("create needs --name")
    if args.command == "create" and not args.name.isprintable():
        # `list` prints one key a line: a line break in a name would show a second key.
        parser.error(f"--name must be printable characters (no line break, tab or other "
                     f"control character), got {args.name!r}")
    if args.command == "revoke" and (args.id is None) == (args.key_file is None):
        parser.error("revoke needs --id or --key-file (one of them)")

    async def run() -> str:
        store = JobStore.from_url(args.redis)
        try:
            if args.command == "list":
                return "\n".join(map(key_line, await store.keys())) or "no keys"
            if args.command == "revoke":
                return f"revoked key {(await revoke(store, args.id, args.key_file))[:12]}"
            kept = args.out is not None and args.out.exists()
            token = await ensure_key(store, args.name, args.out)
            return (f"API key kept in {args.out} (it already held one)" if kept else
                    f"API key written to {args.out}" if args.out else token)
        finally:
            await store.close()

    try:
        said = asyncio.run(run())
    except KeyFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RedisError as exc:  # a wrong password or CA, no Redis: one line, not a traceback
        print(f"error: {unusable(args.redis, reason_to_log(exc))}", file=sys.stderr)
        return 1
    except OSError as exc:  # --out or --key-file: a folder, not there, not ours to write
        print(f"error: {exc.filename or args.out or args.key_file}: {exc.strerror or exc}",
              file=sys.stderr)
        return 2
    print(said)
    return 0


if __name__ == "__main__":
    sys.exit(main())

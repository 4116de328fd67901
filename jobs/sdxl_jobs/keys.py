"""API keys of the job API: made here, stored in Redis only as their SHA-256.

Usage:
    python -m sdxl_jobs.keys create --redis URL --name team-a [--out FILE]

Prints the key once (or writes it to FILE with mode 600, keeping a key already there):
it cannot be read back from Redis.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sys
from pathlib import Path

from sdxl_jobs.store import JobStore


def write_private(path: Path, text: str, replace: bool = False) -> None:
    """Write ``text`` to ``path``, readable by its owner only from the moment it exists
    (mode 600 at creation, never wider). An existing file is an error unless ``replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if replace else os.O_EXCL)
    with os.fdopen(os.open(path, flags, 0o600), "w") as handle:
        handle.write(text)


def new_key() -> str:
    return "sdxl_" + secrets.token_urlsafe(32)


async def ensure_key(store: JobStore, name: str, out: Path | None) -> str:
    """The key in ``out`` if Redis knows it, else a new key (written to ``out``)."""
    if out is not None and out.exists():
        token = out.read_text().strip()
        if await store.owner_of(token):
            return token
        await store.add_key(token, name)  # a fresh Redis: the file's key stays valid
        return token
    token = new_key()
    await store.add_key(token, name)
    if out is not None:
        write_private(out, token + "\n")
    return token


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("create",))
    parser.add_argument("--redis", default=os.environ.get("SDXL_REDIS_URL"), required=False)
    parser.add_argument("--name", required=True)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if not args.redis:
        parser.error("--redis (or SDXL_REDIS_URL) is required")

    async def run() -> str:
        store = JobStore.from_url(args.redis)
        try:
            return await ensure_key(store, args.name, args.out)
        finally:
            await store.close()

    token = asyncio.run(run())
    print(f"API key written to {args.out}" if args.out else token)
    return 0


if __name__ == "__main__":
    sys.exit(main())

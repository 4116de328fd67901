"""`python -m sdxl_jobs.keys` against a real Redis: create, list, revoke, and a key file
that holds no key refused (its content was registered as a key)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.jobs


def keys(redis_server, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sdxl_jobs.keys", *args,
                           "--redis", redis_server.url],
                          capture_output=True, text=True, timeout=60)


def known(redis_server, token: str) -> bool:
    import asyncio

    from sdxl_jobs.store import JobStore

    async def ask() -> bool:
        store = JobStore.from_url(redis_server.url)
        try:
            return await store.owner_of(token) is not None
        finally:
            await store.close()
    return asyncio.run(ask())


def test_a_file_that_holds_no_key_is_not_registered(redis_server, tmp_path: Path):
    for content in ("hello\n", ""):
        weak = tmp_path / "weak"
        weak.write_text(content)
        done = keys(redis_server, "create", "--name", "weak", "--out", str(weak))
        assert done.returncode == 2, done.stdout + done.stderr
        assert f"error: {weak} holds no API key" in done.stderr
        assert not known(redis_server, content.strip())
        assert weak.read_text() == content


def test_create_list_and_revoke(redis_server, tmp_path: Path):
    out = tmp_path / "key"
    made = keys(redis_server, "create", "--name", "team-a", "--out", str(out))
    assert made.returncode == 0 and made.stdout.strip() == f"API key written to {out}"
    token = out.read_text().strip()
    assert known(redis_server, token)
    again = keys(redis_server, "create", "--name", "team-a", "--out", str(out))
    assert again.stdout.strip() == f"API key kept in {out} (it already held one)"
    assert out.read_text().strip() == token
    printed = keys(redis_server, "create", "--name", "team-b").stdout.strip()
    assert printed.startswith("sdxl_") and known(redis_server, printed)

    listed = keys(redis_server, "list").stdout
    rows = {line.split()[-1]: line.split()[0] for line in listed.splitlines()}
    assert {"team-a", "team-b"} <= set(rows), listed
    assert token not in listed and printed not in listed  # ids, never keys

    done = keys(redis_server, "revoke", "--id", rows["team-b"][:8])
    assert done.returncode == 0 and done.stdout.strip() == f"revoked key {rows['team-b']}"
    assert not known(redis_server, printed) and known(redis_server, token)
    done = keys(redis_server, "revoke", "--key-file", str(out))
    assert done.returncode == 0 and not known(redis_server, token)
    # The file cannot bring it back (make serve-jobs registers its key file's key again on
    # a fresh Redis, and did so for a revoked one too).
    again = keys(redis_server, "create", "--name", "team-a", "--out", str(out))
    assert again.returncode == 2 and f"the key in {out} was revoked" in again.stderr
    assert not known(redis_server, token)
    # Refusals: a short or unknown id, a key revoked already.
    assert "at least 8 hex digits" in keys(redis_server, "revoke", "--id", "abc").stderr
    assert "matches 0 keys" in keys(redis_server, "revoke", "--id", "0" * 12).stderr
    assert "is not known" in keys(redis_server, "revoke", "--key-file", str(out)).stderr


def test_an_id_prefix_of_two_keys_revokes_neither(redis_server):
    """Two keys whose ids share their first 8 hex digits (found by trying tokens: about
    80,000 for a pair): `--id` with that prefix is refused, not taken for one of them."""
    import asyncio
    import secrets

    from sdxl_jobs.store import JobStore, hash_key

    seen: dict[str, str] = {}
    while True:
        token = "sdxl_" + secrets.token_urlsafe(32)
        prefix = hash_key(token)[:8]
        if prefix in seen:
            pair = (seen[prefix], token)
            break
        seen[prefix] = token

    async def add() -> None:
        store = JobStore.from_url(redis_server.url)
        try:
            for token in pair:
                await store.add_key(token, "twin")
        finally:
            await store.close()
    asyncio.run(add())
    done = keys(redis_server, "revoke", "--id", prefix)
    assert done.returncode == 2 and f"--id {prefix} matches 2 keys, not one" in done.stderr
    assert all(known(redis_server, token) for token in pair)


def test_a_key_file_is_its_owners_alone_whatever_the_umask(tmp_path: Path):
    import os

    from sdxl_jobs.keys import write_private

    old = os.umask(0o022)  # a usual shell's: files readable by all
    try:
        write_private(tmp_path / "key", "sdxl_x\n")
    finally:
        os.umask(old)
    assert (tmp_path / "key").stat().st_mode & 0o777 == 0o600


def test_a_key_file_that_cannot_be_used_is_one_line_and_registers_nothing(redis_server,
                                                                          tmp_path: Path):
    """--out or --key-file that is a folder, is not there, may not be written or holds
    bytes that are not text: one `error:` line, exit 2, where each was a traceback; and a
    key file that cannot be written registers no key (it registered one nobody holds)."""
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where --out needs a folder")
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe\x00")
    before = keys(redis_server, "list").stdout
    for args, said in [
            (("create", "--name", "nobody", "--out", str(tmp_path)), f"error: {tmp_path}: "),
            (("create", "--name", "nobody", "--out", str(blocked / "key")),
             f"error: {blocked}: File exists"),
            (("revoke", "--key-file", str(tmp_path / "absent")),
             f"error: {tmp_path / 'absent'}: No such file or directory"),
            (("revoke", "--key-file", str(binary)), f"error: {binary} holds no API key")]:
        done = keys(redis_server, *args)
        assert done.returncode == 2 and done.stderr.startswith(said), done.stderr
        assert "Traceback" not in done.stderr and len(done.stderr.splitlines()) == 1
    assert "nobody" not in keys(redis_server, "list").stdout
    assert keys(redis_server, "list").stdout == before


def test_a_name_that_would_break_the_list_is_refused(redis_server):
    """`list` prints a key a line: a name with a line break showed a second key, whose id
    and date the name could make up."""
    forged = "team-a\n0123456789ab  2026-01-01T00:00:00Z  admin"
    done = keys(redis_server, "create", "--name", forged)
    assert done.returncode == 2 and "--name must be printable" in done.stderr
    assert "admin" not in keys(redis_server, "list").stdout

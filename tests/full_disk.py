"""A real full disk: a small tmpfs mounted for one test and filled to its last byte, then
emptied and unmounted (the ``full_disk`` fixture in conftest.py). Root only: where mounting
is not permitted the test is skipped, saying so."""

from __future__ import annotations

import errno
import subprocess
from pathlib import Path

import pytest


class FullDisk:
    """A tmpfs at ``path``; ``fill`` takes every byte left, ``free`` gives them back."""

    def __init__(self, path: Path):
        self.path = path
        self.filler = path / "filler"

    def fill(self) -> None:
        """Write until the filesystem refuses: its size alone leaves room in the pages of
        files already there."""
        chunk = b"\0" * 65536
        with self.filler.open("ab", buffering=0) as filler:
            for size in (65536, 4096, 1):
                try:
                    while True:
                        filler.write(chunk[:size])
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)


def mounted_full_disk(path: Path, size: str):
    """Mount a tmpfs of ``size`` (``mount``'s ``size=``) at ``path``, yield it as a
    ``FullDisk`` (not yet filled), unmount it after."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                           str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"a full disk is a small tmpfs mounted for the test, and mounting is not "
                    f"permitted here: {(done.stderr or done.stdout).strip()}")
    try:
        yield FullDisk(path)
    finally:
        # Lazily: a process the test left holding a file there must not keep it mounted.
        subprocess.run(["umount", "--lazy", str(path)], check=False)

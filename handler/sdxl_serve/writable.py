"""Whether a directory can take a write, said in one line: a full disk named as such
(``ENOSPC``) by the launchers, the rollout and the profile store alike."""

from __future__ import annotations

import errno
import tempfile
from pathlib import Path
from typing import Sequence


# What a directory must take for ``unwritable`` to call it writable: a key file and the
# first log lines, with room to spare (TorchServe's unpacked archive is checked by its load).
WRITE_PROBE_BYTES = 64 * 1024


def errno_name(exc: OSError) -> str:
    """`` (ENOSPC)``: the errno's name for an error message, or "" when it has none."""
    return f" ({errno.errorcode[exc.errno]})" if exc.errno in errno.errorcode else ""


def unwritable(directories: Sequence[Path]) -> str | None:
    """One line saying which of ``directories`` cannot take ``WRITE_PROBE_BYTES`` and why
    (``cannot write in DIR: No space left on device (ENOSPC)``); None when all can.

    Written, not read from statvfs: a full disk keeps the blocks reserved for root, a
    quota ends sooner than the disk, and a read-only mount has free space."""
    for directory in directories:
        try:
            with tempfile.TemporaryFile(dir=directory) as probe:
                probe.write(bytes(WRITE_PROBE_BYTES))
                probe.flush()
        except OSError as exc:
            return f"cannot write in {directory}: {exc.strerror}{errno_name(exc)}"
    return None

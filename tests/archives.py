"""Model archives changed for a test: a broken version of a real archive."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Callable


def patched_archive(source: Path, target: Path, patch: Callable[[str, bytes], bytes]) -> Path:
    """A copy of the model archive ``source`` at ``target``, each member's bytes replaced by
    ``patch(member name, bytes)``."""
    with zipfile.ZipFile(source) as original, \
            zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as copy:
        for item in original.infolist():
            copy.writestr(item, patch(item.filename, original.read(item.filename)))
    return target

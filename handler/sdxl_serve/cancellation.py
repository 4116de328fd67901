"""Cancelling a request from outside it: the flag files a caller makes in a directory the
engine watches, and the files that let a process clean up after one that was killed.

The job dispatcher stops a running job's generation this way (TorchServe never tells a
worker that its client went away), and Triton's model its cancelled requests' (the python
backend's ``is_cancelled``). None of it imports torch or TorchServe.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
from pathlib import Path

CANCEL_HEADER = "X-Cancel-Token"
"""A request header naming the request's cancel flag: a caller that can write to the
server's ``cancel_dir`` (the job dispatcher beside TorchServe in its pod) stops the request's
generation between two steps by making a file of that name there. TorchServe never tells a
worker that its client went away, so without it a canceled job's batch runs to its end."""


def cancel_flag(directory: str, token: str | None) -> str:
    """The flag file of a request whose ``CANCEL_HEADER`` is ``token``; "" for none.

    None without a shared ``directory``, and none for a token that is not 32 lowercase hex
    digits (``uuid.uuid4().hex``, what the dispatcher sends): the token becomes a file name,
    so it must never be able to name a path (``../x``) or another directory's file.

    Example:
        >>> cancel_flag("/run/sdxl-cancel", "0123456789abcdef0123456789abcdef")
        '/run/sdxl-cancel/0123456789abcdef0123456789abcdef'
        >>> cancel_flag("/run/sdxl-cancel", "../../etc/passwd"), cancel_flag("", "0" * 32)
        ('', '')
    """
    token = (token or "").strip()
    if not directory or len(token) != 32 or token.strip("0123456789abcdef"):
        return ""
    return f"{directory.rstrip('/')}/{token}"


# The cancel directory's other files, each named by host and pid so that the process that
# finds one left by a process gone from this host (killed: TorchServe kills its workers, a
# SIGKILL or an OOM kill ends a dispatcher) can act on it; another host's (a shared volume)
# and a live process's stay.
PROBE_PREFIX = ".worker-"
CALL_PREFIX = ".call-"


def this_host() -> str:
    """This host's name as the first part of a ``<prefix><host>-<pid>-<rest>`` name."""
    return socket.gethostname().replace("-", "_")  # "-" separates the name's parts


def process_running(pid: int) -> bool:
    """Whether ``pid`` runs: a zombie (ended, not yet reaped) does not count."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel, zombies included
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def own_folder(directory: str, prefix: str) -> str:
    """This process's ``<prefix><pid>`` folder in ``directory``, made (mode 700), after
    removing the ``<prefix><pid>`` folders of processes gone (``_gone``).

    For a process's own folder in a shared temp directory, which a clean exit removes and a
    SIGKILL (TorchServe ending a worker, a Triton stub killed) leaves for good."""
    for folder in Path(directory).glob(f"{prefix}*"):
        pid = folder.name[len(prefix):]
        if pid.isdigit() and _gone(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
    mine = Path(directory, f"{prefix}{os.getpid()}")
    mine.mkdir(mode=0o700)
    return str(mine)


def _gone(pid: int) -> bool:
    """Whether what process ``pid`` left behind is an orphan: it is not running, or it is
    this process's own pid from before (a container started again gets the same pid),
    since this process makes its files only after looking."""
    return pid == os.getpid() or not process_running(pid)


def left_by_gone_process(directory: str, prefix: str) -> list[tuple[Path, str]]:
    """(path, its ``<rest>``) of the ``<prefix><host>-<pid>-<rest>`` files or folders in
    ``directory`` of this host whose process is gone (``_gone``)."""
    left = []
    for path in Path(directory).glob(f"{prefix}{this_host()}-*-*"):
        parts = path.name[len(prefix):].split("-", 2)
        if len(parts) != 3 or not parts[1].isdigit():
            continue
        if _gone(int(parts[1])):
            left.append((path, parts[2]))
    return left


def leave_cancel_probe(cancel_dir: str) -> str:
    """Create a worker's probe file in ``cancel_dir``, which the dispatcher looks for to
    know its flags land where the worker looks; return its name. The probes of this host's
    workers that are gone are removed first: each worker start would otherwise leave one
    more file for good."""
    for path, _ in left_by_gone_process(cancel_dir, PROBE_PREFIX):
        path.unlink(missing_ok=True)
    mine = f"{PROBE_PREFIX}{this_host()}-{os.getpid()}-{secrets.token_hex(16)}"
    Path(cancel_dir, mine).touch()
    return mine


def mark_call(cancel_dir: str, token: str) -> Path:
    """A file saying this process has a call with cancel ``token`` in flight: removed when
    the call ends; left behind if the process is killed, for ``flag_orphaned_calls``."""
    marker = Path(cancel_dir, f"{CALL_PREFIX}{this_host()}-{os.getpid()}-{token}")
    marker.touch()
    return marker


def flag_orphaned_calls(cancel_dir: str) -> int:
    """Flag the calls that a killed process of this host left in flight (their markers),
    so that TorchServe's worker stops generating results nobody will store; return how
    many. Run before this process makes calls of its own."""
    flagged = 0
    for marker, token in left_by_gone_process(cancel_dir, CALL_PREFIX):
        flag = cancel_flag(cancel_dir, token)
        if flag:
            Path(flag).touch()
            flagged += 1
        marker.unlink(missing_ok=True)
    return flagged

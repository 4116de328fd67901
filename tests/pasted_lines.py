"""Lines a person pastes into a shell (the docs' curl lines, the ones `make serve` prints),
run as pasted, with the command line of each program they start recorded: a key found
there is one every user of the machine reads (`ps`, /proc/<pid>/cmdline)."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

# What the lines run: a key in any of these arguments is in the open.
WATCHED = ("curl", "python3", "sed", "cat")


def run_pasted(line: str, **run_args) -> tuple[subprocess.CompletedProcess, str]:
    """``line`` run by bash (``run_args`` as for ``subprocess.run``), each program of
    ``WATCHED`` found first in a folder of shims that append their name and arguments to a
    log, then run the real one. Returns the finished process and the log."""
    env = dict(run_args.pop("env", None) or os.environ)
    with tempfile.TemporaryDirectory() as shims:
        log = Path(shims) / "command-lines.log"
        log.touch()
        for name in WATCHED:
            real = shutil.which(name, path=env.get("PATH"))
            shim = Path(shims) / name
            shim.write_text(f'#!/bin/sh\nprintf "%s\\n" "{name} $*" >> {shlex.quote(str(log))}\n'
                            f'exec {shlex.quote(real)} "$@"\n')
            shim.chmod(0o700)
        env["PATH"] = f"{shims}{os.pathsep}{env.get('PATH', '')}"
        done = subprocess.run(["bash", "-c", line], env=env, **run_args)
        return done, log.read_text()

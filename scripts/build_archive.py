#!/usr/bin/env python3
"""Pack the handler, the sdxl_serve package and the model config into a TorchServe archive.

The archive is model_store/<name>-<version>.mar. With no --model-dir the embedded tiny
model is built if needed and packed inside the archive (a few MB). With --model-dir the
weights stay where they are and the archive only names that directory: a 7 GB model is
not copied (the directory must exist at the same path where TorchServe runs).

A batching, timeout or worker-count value TorchServe would replace, a handler setting the
worker would refuse at load, a handler: key that is no setting (a typo the worker would
ignore), a --model-dir that is not an SDXL in safetensors, or one whose files' names and
sizes differ from its manifest (a truncated copy) is refused before anything is built: one
`error:` line naming it, exit status 2. So is an archive that could not be written (a full
disk: `No space left on device (ENOSPC)`), which leaves the model store as it was, and one
whose file name another model's or version's archive already holds (`sdxl-1` 0 and `sdxl`
1-0 are both sdxl-1-0.mar), which stays as it is.

Usage:
    python scripts/build_archive.py [--name sdxl] [--version 1.0] [--model-dir DIR]
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
# This checkout's code first, not the checkout a shared venv's editable install names.
sys.path[:0] = [str(REPO / "handler"), str(REPO / "jobs"), str(REPO / "scripts")]
from sdxl_serve.server import cancel_on_signals  # noqa: E402

if __name__ == "__main__":
    cancel_on_signals("archive build")  # before the imports of torch below (seconds)

from sdxl_serve.engine import ModelLoadError, check_model_dir  # noqa: E402
from sdxl_serve.management import archive_part  # noqa: E402
from sdxl_serve.model_files import ModelFilesError, check_model_files  # noqa: E402
from sdxl_serve.server import venv_tool  # noqa: E402
from sdxl_serve.settings import Settings, SettingsError  # noqa: E402
from sdxl_serve.writable import errno_name  # noqa: E402
from build_model import ensure_tiny_model  # noqa: E402

# Archives replaced by a build of the same name and version, kept per version, latest last.
KEEP_REPLACED = 3

HANDLER_ENTRY = REPO / "handler" / "sdxl_serve_handler.py"
PACKAGE = REPO / "handler" / "sdxl_serve"
MODEL_CONFIG = REPO / "config" / "model-config.yaml"


def archive_path(model_store: Path, name: str, version: str) -> Path:
    return model_store / f"{name}-{version}.mar"


class ArchiveTakenError(ValueError):
    """The store's ``<name>-<version>.mar`` is another model's or version's archive."""


def check_archive_owner(mar: Path, name: str, version: str) -> None:
    """Refuse ``mar`` (``archive_path`` of ``name`` and ``version``) when its manifest
    says it is another version's: the file name joins name and version with a "-" that
    both may hold, so `sdxl-1` 0 and `sdxl` 1-0 are both sdxl-1-0.mar. Building over it
    moved the other model's archive to replaced/, and a serve that reused it waited for a
    version it never registers. The version tells them apart: the archiver's model name
    is the file's stem, the same for both. No archive, or one without a readable
    manifest, is not refused (it is built again, as before).

    Raises:
        ArchiveTakenError
    """
    try:
        with zipfile.ZipFile(mar) as archive:
            model = json.loads(archive.read("MAR-INF/MANIFEST.json"))["model"]
        packed = str(model["modelVersion"])
        other = str(model.get("modelName") or mar.stem)
    except (OSError, zipfile.BadZipFile, KeyError, ValueError, TypeError, AttributeError):
        return
    if packed != version:
        other = other.removesuffix(f"-{packed}")
        raise ArchiveTakenError(
            f"{mar} is the archive of model {other} version {packed}, not of {name} "
            f"version {version}: their file names are the same; left as it is (choose "
            f"another --name or --version)")


class BatchingConfigError(ValueError):
    """A TorchServe setting of the archive (batching, workers, timeouts) that TorchServe
    would not read as written."""


# What TorchServe 0.12 uses instead of a value it does not take, for the message.
_TORCHSERVE_DEFAULTS = {
    "batchSize": "1",
    "maxBatchDelay": "100 ms",
    "responseTimeout": "120 s",
    "startupTimeout": "120 s",
    "minWorkers": "the server's default_workers_per_model",
    "maxWorkers": "the server's default_workers_per_model",
}


def check_batching(model_config: dict) -> None:
    """Refuse TorchServe settings that TorchServe 0.12 silently replaces.

    Its ModelConfig takes each of ``batchSize``, ``maxBatchDelay``, ``responseTimeout``,
    ``startupTimeout``, ``minWorkers`` and ``maxWorkers`` only when it is a YAML integer
    above 0. Anything else (0, a negative number, ``"300"``, ``300.0``) is logged as a
    warning in its log and replaced: the timeouts by 120 s (a full SDXL start or batch can
    take longer: docs/cost-limits.md), ``batchSize`` by 1, ``maxBatchDelay`` by 100 ms, the
    worker counts by the server's default. So "no batch wait" cannot be written as 0: it
    would make every request that finds the worker idle wait 100 ms. The shortest wait
    TorchServe allows is 1 ms.

    Example:
        >>> check_batching({"batchSize": 4, "maxBatchDelay": 5, "responseTimeout": 300})
        >>> check_batching({"batchSize": 4, "maxBatchDelay": 0})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        build_archive.BatchingConfigError: maxBatchDelay: 0 is not a positive integer: ...
    """
    for key, default in _TORCHSERVE_DEFAULTS.items():
        value = model_config.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            shortest = " (the shortest wait it allows is 1 ms)" if key == "maxBatchDelay" else ""
            raise BatchingConfigError(f"{key}: {value!r} is not a positive integer: TorchServe "
                                      f"0.12 would use its default, {default}{shortest}")


class ArchiveWriteError(RuntimeError):
    """The archive could not be written (a full disk, a quota, no permission); the model
    store is left as it was."""


# A config or weights directory build_archive refuses, before anything is built, a build
# that could not be written (replace_archive), or another model's archive under the file
# name (check_archive_owner); the message names what is wrong, so a caller prints it
# instead of a traceback.
ARCHIVE_REFUSALS = (BatchingConfigError, SettingsError, ModelLoadError, ModelFilesError,
                    ArchiveWriteError, ArchiveTakenError)
# The archiver's exception, the last line of its traceback: `OSError: [Errno 28] ...`.
ARCHIVER_EXCEPTION = re.compile(r"^(?:\w+\.)*\w*(?:Error|Exception): (?P<text>.+)$",
                                re.MULTILINE)
OS_ERROR = re.compile(r"\[Errno (?P<number>\d+)\] (?P<text>.+)")


def archiver_cause(returncode: int, output: str) -> str:
    """What a failed torch-model-archiver said, in one line: on a full disk its output is
    three chained tracebacks, and the cause is the last exception's line.

    >>> archiver_cause(1, "Traceback ...\\nOSError: [Errno 28] No space left on device\\n")
    'No space left on device (ENOSPC)'
    """
    causes = [found.group("text") for found in ARCHIVER_EXCEPTION.finditer(output)]
    if not causes:
        return f"torch-model-archiver exited with {returncode}: {output.strip()[-300:]}"
    os_error = OS_ERROR.fullmatch(causes[-1])
    if os_error and int(os_error["number"]) in errno.errorcode:
        return f"{os_error['text']} ({errno.errorcode[int(os_error['number'])]})"
    return causes[-1]


def build_archive(name: str = "sdxl", version: str = "1.0", model_dir: Path | None = None,
                  model_store: Path = REPO / "model_store", config: Path = MODEL_CONFIG,
                  handler_settings: dict | None = None, tiny_model: Path | None = None) -> Path:
    """Build ``<model_store>/<name>-<version>.mar`` and return its path.

    ``handler_settings``: added to the config's ``handler:`` section. ``tiny_model``: the
    tiny model to pack when there is no ``model_dir`` (default build/tiny-sdxl, built if
    missing; the tests pass one of their own, outside the tree).

    Raises:
        BatchingConfigError, SettingsError, ModelLoadError, ModelFilesError
            (``ARCHIVE_REFUSALS``): before anything is created or copied, so a refused
            config or weights directory leaves no trace.
        ArchiveWriteError: torch-model-archiver failed (its exception in the message).
        OSError: the files could not be staged in TMPDIR.
    """
    # 1. The config as it will be packed.
    model_config = packed_model_config(model_dir, config, handler_settings)
    check_batching(model_config)
    if model_dir is not None:
        check_weights(model_dir, model_config["handler"].get("model_file_check",
                                                             Settings.model_file_check))
    # With the worker's own parser: a value it refuses would fail every worker at start,
    # on the serving machine, long after the build. Only what holds on any machine: the
    # archive may be served elsewhere (device: cuda built on a CPU machine).
    Settings.check_portable(model_config["handler"])
    model_store.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sdxl-archive-") as tmp:
        staging = Path(tmp, "files")
        staging.mkdir()
        # 2. The package, without caches.
        shutil.copytree(PACKAGE, staging / "sdxl_serve",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        # 3. The embedded tiny model, inside the archive, unless the weights stay outside.
        if model_dir is None:
            shutil.copytree(tiny_model or ensure_tiny_model(), staging / "model")
        # 4. The model config.
        config_file = Path(tmp, "model-config.yaml")
        config_file.write_text(yaml.safe_dump(model_config, sort_keys=False))
        # torch-model-archiver stages in $TMPDIR/<model-name>: keep parallel builds apart.
        env = dict(os.environ, TMPDIR=tmp)
        work_name = f"{name}-{version}"
        archiver = subprocess.run(
            [venv_tool("torch-model-archiver"),
             "--model-name", work_name, "--version", version,
             "--handler", str(HANDLER_ENTRY), "--extra-files", str(staging),
             "--config-file", str(config_file), "--export-path", str(model_store),
             "--force"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, errors="replace")
        if archiver.returncode != 0:
            raise ArchiveWriteError(archiver_cause(archiver.returncode, archiver.stdout))
    # The archiver names the file after --model-name, which is also the name TorchServe
    # registers it under; scripts pass `name=<file>` so the registered name stays `name`.
    return archive_path(model_store, name, version)


def packed_model_config(model_dir: Path | None = None, config: Path = MODEL_CONFIG,
                        handler_settings: dict | None = None) -> dict:
    """The model config as an archive packs it: the file's ``handler:`` section, the
    caller's settings, and the weights directory when they stay outside the archive."""
    model_config = yaml.safe_load(config.read_text())
    settings = model_config["handler"] = dict(model_config.get("handler") or {})
    settings.update(handler_settings or {})
    if model_dir is not None:
        settings["model_dir"] = str(Path(model_dir).resolve())
    return model_config


def archive_differences(mar: Path, model_dir: Path | None = None) -> list[str]:
    """The files of ``mar`` that this checkout would now pack otherwise: the package's code,
    the handler's entry point, and the model config (batching, settings, which weights).

    The worker runs the code packed in its archive, not the checkout's, so an archive built
    before a change (a ``git pull``, an edited model-config.yaml) serves the old behaviour.
    The weights packed inside are not compared (the worker checks them against their
    manifest at load).
    """
    expected = {f"sdxl_serve/{path.relative_to(PACKAGE).as_posix()}": path.read_bytes()
                for path in PACKAGE.rglob("*")
                if path.is_file() and "__pycache__" not in path.parts
                and path.suffix != ".pyc"}
    expected[HANDLER_ENTRY.name] = HANDLER_ENTRY.read_bytes()
    expected["model-config.yaml"] = yaml.safe_dump(packed_model_config(model_dir),
                                                   sort_keys=False).encode()
    with zipfile.ZipFile(mar) as archive:
        packed = {name: archive.read(name) for name in archive.namelist()
                  if name.startswith("sdxl_serve/") and not name.endswith("/")
                  and "__pycache__" not in name or name in expected}
    return sorted(name for name in expected.keys() | packed.keys()
                  if expected.get(name) != packed.get(name))


def check_weights(model_dir: Path, model_file_check: object) -> None:
    """What the worker's load will refuse of a weights directory, said before anything is
    built or started: an SDXL of safetensors (``check_model_dir``), and names and sizes
    against its manifest (seconds: no byte is read), which the load needs unless the check
    is off. A truncated file, or weights without a manifest (any download but
    fetch_sdxl.py's), failed only at the worker's load, in a traceback. The variable wins,
    as it does in the worker.

    Raises:
        ModelLoadError, ModelFilesError
    """
    check_model_dir(model_dir)
    check = os.environ.get("SDXL_MODEL_FILE_CHECK") or model_file_check
    if check not in ("off", False):  # False: YAML's reading of an unquoted off
        check_model_files(model_dir, "size")


def add_archive_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that name an archive: shared by build_archive.py, serve.py and
    serve_jobs.py."""
    parser.add_argument("--name", default="sdxl", type=archive_part)
    parser.add_argument("--version", default="1.0", type=archive_part)
    parser.add_argument("--model-dir", type=lambda text: Path(text).expanduser(), default=None,
                        help="serve weights from this directory instead of the tiny model "
                             "(see fetch_sdxl.py)")
    parser.add_argument("--model-store", type=model_store_path, default=REPO / "model_store")


def model_store_path(text: str) -> Path:
    """--model-store: a folder, or none yet (made at the build); a file there was a
    traceback from the build's mkdir."""
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a file, not a folder of archives")
    return path


def replace_archive(name: str, version: str, model_dir: Path | None, model_store: Path
                    ) -> tuple[Path, Path | None]:
    """Build ``<model_store>/<name>-<version>.mar`` in a hidden directory of the store and
    move it in once built; (its path, where the archive it replaced was kept, or None).

    A version number names one build: a rollout may have kept the one replaced, and a
    rollback loads whatever the store holds under its name, so it goes to ``replaced/``
    (``keep_replaced``), never overwritten. A refused build (``ARCHIVE_REFUSALS``: weights
    missing, a bad setting) leaves the store as it was. The caller refuses another model's
    archive under the name first (``check_archive_owner``)."""
    mar = archive_path(model_store, name, version)
    model_store.mkdir(parents=True, exist_ok=True)
    try:
        building = Path(tempfile.mkdtemp(prefix=".building-", dir=model_store))
        try:
            built = build_archive(name, version, model_dir, building)
            kept = keep_replaced(mar) if mar.exists() else None
            os.replace(built, mar)
        finally:
            shutil.rmtree(building, ignore_errors=True)
    except (OSError, ArchiveWriteError) as exc:
        # A full disk (the store's, or TMPDIR's where the files are staged): one line, and
        # the store as it was, the version's archive before this build included.
        reason = (f"{exc.strerror}{errno_name(exc)}" + (f": {exc.filename}" if exc.filename
                                                        else "")
                  if isinstance(exc, OSError) and exc.strerror else str(exc))
        raise ArchiveWriteError(f"could not write {mar}: {reason}; the model store is as "
                                f"it was") from None
    return mar, kept


def keep_replaced(mar: Path) -> Path:
    """Link ``mar`` as ``<store>/replaced/<name>-<version>.<UTC time>.mar``, outside the
    store's top level, which TorchServe may load from (the caller then replaces ``mar``:
    it is never missing meanwhile); the last ``KEEP_REPLACED`` of a version stay (an
    edit-and-serve loop would otherwise fill the disk)."""
    now = time.time_ns()  # one reading: the seconds and their fraction of the same moment
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now // 10**9)) + f".{now % 10**9:09d}Z"
    kept = mar.parent / "replaced" / f"{mar.stem}.{stamp}{mar.suffix}"
    kept.parent.mkdir(exist_ok=True)
    try:
        os.link(mar, kept)
    except OSError:  # a file system without hard links
        shutil.copy2(mar, kept)
    # This version's own, not those of a version that extends its name (1.0 and 1.0.1).
    own = re.compile(re.escape(mar.stem) + r"\.\d{8}T\d{6}\.\d{9}Z" + re.escape(mar.suffix))
    for old in sorted(path for path in kept.parent.iterdir() if own.fullmatch(path.name))[
            :-KEEP_REPLACED]:
        old.unlink()
    return kept


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_archive_arguments(parser)
    args = parser.parse_args(argv)
    try:
        check_archive_owner(archive_path(args.model_store, args.name, args.version),
                            args.name, args.version)
        path, kept = replace_archive(args.name, args.version, args.model_dir, args.model_store)
    except ARCHIVE_REFUSALS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if kept is not None:
        print(f"the archive it replaces is kept as {kept} (the last {KEEP_REPLACED} are)")
    print(f"archive: {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A model directory's manifest: every file's size and SHA-256, written where the weights are
made or fetched and checked before they are served.

A volume can hand a worker a truncated download, a flipped bit or a swapped file, and a
model that loads anyway makes wrong images on a GPU that looks healthy. The manifest
(``sdxl-manifest.json`` in the model directory) is written when the tiny model is built
(tiny_model.py) and when SDXL is fetched (scripts/fetch_sdxl.py); the engine checks it
before it opens a weight file (engine.load_engine), and the pod checks it in an init
container, so a bad volume never reaches a GPU.

Standard library only (but ``packed_handler_section``, which reads an archive's YAML): the init
container and a person run it without torch.

Usage:
    python -m sdxl_serve.model_files check DIR [--sizes-only]
    python -m sdxl_serve.model_files write DIR      # only for weights you trust

Example:
    >>> import tempfile
    >>> model = Path(tempfile.mkdtemp())
    >>> _ = (model / "model_index.json").write_text("{}")
    >>> _ = write_manifest(model)
    >>> check_model_files(model)
    >>> _ = (model / "model_index.json").write_text("{ }")
    >>> try:
    ...     check_model_files(model)
    ... except ModelFilesError as refused:
    ...     print(str(refused).splitlines()[-1].strip())
    model_index.json: 3 bytes, the manifest says 2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import sys
import zipfile
from pathlib import Path
from typing import Any, Mapping

MANIFEST = "sdxl-manifest.json"
FORMAT = 1
CHECKS = ("sha256", "size", "off")
_CHUNK = 8 << 20


class ModelFilesError(ValueError):
    """A model directory does not match its manifest; the message names every file."""


def model_files(model_dir: str | Path) -> list[str]:
    """The files of a model directory as POSIX paths relative to it, sorted.

    Not the manifest itself, and nothing under a dot-name (the hub's ``.cache/`` download
    state, ``.gitattributes``): those are not the model.

    Symbolic links are followed, to files and to folders alike, because the loader follows
    them: a hub cache snapshot is made of links into ``blobs/``, and a component folder may
    be a link to weights kept elsewhere. A link back to a folder above it (a loop) is not
    followed.
    """
    root = Path(model_dir)
    found = []
    for folder, subfolders, names in os.walk(root, followlinks=True):
        relative = Path(folder).relative_to(root)
        above = {os.path.realpath(root / parent) for parent in relative.parents}
        if os.path.realpath(folder) in above:
            subfolders[:] = []
            continue
        if any(part.startswith(".") for part in relative.parts):
            subfolders[:] = []
            continue
        for name in names:
            path = relative / name
            if not name.startswith(".") and path.as_posix() != MANIFEST and \
                    (root / path).is_file():
                found.append(path.as_posix())
    return sorted(found)


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(model_dir: str | Path, source: Mapping[str, Any] | None = None) -> Path:
    """Record every file's size and SHA-256 in ``<model_dir>/sdxl-manifest.json``.

    Args:
        model_dir: the directory, as it will be served.
        source: where the files came from (hub repository and revision, a builder), kept
            in the manifest for people.
    """
    root = Path(model_dir)
    files = {name: {"size": (root / name).stat().st_size, "sha256": sha256_of(root / name)}
             for name in model_files(root)}
    manifest = {"format": FORMAT, "source": dict(source or {}), "files": files}
    path = root / MANIFEST
    partial = path.with_name(MANIFEST + ".partial")
    partial.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    os.replace(partial, path)  # never a half-written manifest
    return path


def check_model_files(model_dir: str | Path, check: str = "sha256") -> None:
    """Refuse a model directory that differs from its manifest.

    Args:
        model_dir: the directory to check.
        check: ``sha256`` (sizes, then every file's hash), ``size`` (sizes and names only:
            seconds instead of a read of every byte) or ``off``.

    Raises:
        ModelFilesError: no manifest, or files missing, added, of another size or another
            hash; every such file is named.
    """
    if check not in CHECKS:
        raise ValueError(f"check must be one of {', '.join(CHECKS)}, got {check!r}")
    if check == "off":
        return
    root = Path(model_dir)
    try:
        manifest = json.loads((root / MANIFEST).read_text())
        if not isinstance(manifest, dict):
            raise ValueError(f"it holds {manifest!r:.60}, not an object")
        if manifest.get("format") != FORMAT:
            raise ValueError(f"format {manifest.get('format')!r} is not {FORMAT}")
        expected = manifest.get("files")
        if not isinstance(expected, dict):
            raise ValueError(f"`files` is {expected!r:.60}, not an object of file paths")
        # Every entry is checked here, so that a hand-edited one is refused with its name
        # instead of failing the check half-way with a KeyError. JSON's true is no size,
        # though Python's bool is an int.
        for name, entry in expected.items():
            if not (isinstance(entry, dict) and type(entry.get("size")) is int
                    and isinstance(entry.get("sha256"), str)):
                raise ValueError(f"the entry of {name} is {entry!r}, not "
                                 f"{{\"size\": <bytes>, \"sha256\": <hex digest>}}")
    except FileNotFoundError:
        # fetch_sdxl.py fetches a whole pipeline (a model_index.json): a folder of one
        # component (a `vae_dir`) comes from elsewhere, and only its manifest can be written.
        fetch = "fetch the model with scripts/fetch_sdxl.py (which writes it), or, " \
            if (root / "model_index.json").is_file() else ""
        # This Python, by its path: a bare `python` pasted into a checkout's shell is the
        # system's, which has no sdxl_serve. Quoted, as a path may hold a space.
        write = f"{shlex.quote(sys.executable)} -m sdxl_serve.model_files write " \
            f"{shlex.quote(str(root))}"
        raise ModelFilesError(
            f"{root} has no {MANIFEST}, so its files cannot be checked: {fetch}for weights "
            f"you trust, write one with `{write}` (on "
            f"a read-only volume: `model_file_check: \"off\"` in the archive's model-config.yaml, "
            f"or SDXL_MODEL_FILE_CHECK=off in the environment the server starts with, serves "
            f"them unchecked)") from None
    except (OSError, ValueError, LookupError, TypeError) as exc:
        raise ModelFilesError(f"{root / MANIFEST} is unreadable: {exc}") from None
    present = set(model_files(root))
    problems = [f"{name}: missing" for name in sorted(set(expected) - present)]
    problems += [f"{name}: not in the manifest (added or swapped in)"
                 for name in sorted(present - set(expected))]
    # Sizes first: a truncated download is found without reading 7 GB.
    for name in sorted(present & set(expected)):
        size = (root / name).stat().st_size
        if size != expected[name]["size"]:
            problems.append(f"{name}: {size} bytes, the manifest says {expected[name]['size']}")
    if not problems and check == "sha256":
        for name in sorted(expected):
            digest = sha256_of(root / name)
            if digest != expected[name]["sha256"]:
                problems.append(f"{name}: sha256 {digest[:16]}..., the manifest says "
                                f"{expected[name]['sha256'][:16]}...")
    if problems:
        raise ModelFilesError(f"{root} does not match its {MANIFEST} ({len(problems)} "
                              f"file(s)); refusing to serve it:\n  " + "\n  ".join(problems))


def packed_handler_section(mar: Path) -> dict:
    """The ``handler:`` section of the model config packed in ``mar``, which its workers
    read."""
    import yaml  # not at the top: the rest of this module is standard library only

    with zipfile.ZipFile(mar) as archive:
        try:
            config = yaml.safe_load(archive.read("model-config.yaml")) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"{mar}: model-config.yaml is not YAML: {exc}") from exc
    return dict(config.get("handler") or {})


def packed_model_dir(mar: Path) -> Path | None:
    """The weights directory ``mar`` serves from outside the archive; None when it packs its
    weights (the embedded tiny model)."""
    model_dir = packed_handler_section(mar).get("model_dir")
    return Path(model_dir) if model_dir else None


def describe_weights(model_dir: Path | None) -> str:
    """What an archive serves (``packed_model_dir``), as serve.py and rollout.py say it."""
    return f"the weights in {model_dir}" if model_dir else \
        "the embedded tiny model (MODEL_DIR=... serves other weights)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdxl_serve.model_files",
                                     description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    checking = commands.add_parser("check", help="exit 0 if DIR matches its manifest, else 1")
    checking.add_argument("model_dir", type=Path)
    checking.add_argument("--sizes-only", action="store_true",
                          help="names and sizes only, no hashes")
    writing = commands.add_parser("write", help="write DIR's manifest (weights you trust)")
    writing.add_argument("model_dir", type=Path)
    args = parser.parse_args(argv)
    if not args.model_dir.is_dir():
        print(f"error: {args.model_dir} is not a directory", file=sys.stderr)
        return 2
    if args.command == "write":
        try:
            path = write_manifest(args.model_dir,
                                  {"written_by": "python -m sdxl_serve.model_files"})
        except OSError as exc:  # a read-only volume
            print(f"error: cannot write {args.model_dir / MANIFEST}: {exc.strerror or exc}; "
                  f"without a manifest, `model_file_check: \"off\"` (SDXL_MODEL_FILE_CHECK=off) "
                  f"serves the files unchecked", file=sys.stderr)
            return 1
        print(f"wrote {path} ({len(model_files(args.model_dir))} files)")
        return 0
    try:
        check_model_files(args.model_dir, "size" if args.sizes_only else "sha256")
    except ModelFilesError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    # A sizes-only pass says so: it read no byte of the files.
    print(f"{args.model_dir}: every file matches {MANIFEST}"
          f"{' in name and size (--sizes-only: no hash read)' if args.sizes_only else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

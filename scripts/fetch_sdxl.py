#!/usr/bin/env python3
"""Download SDXL base 1.0 (fp16 safetensors only) into a local directory.

Needs the Hugging Face hub (or a mirror named by HF_ENDPOINT): on a machine without it
this fails at once with a one-line message instead of hanging. A download that stops
half-way (exit 1, one line) leaves its files in <out>.partial, never in <out>; a second run
resumes it. <out> appears only once every file is there, with its manifest. About 7 GB
on disk; serving it at 1024x1024 took 11.5 GiB of GPU memory at batch 1, 4 and 8 alike
(measured with random weights of its shapes, docs/real-sdxl.md).

Downloads a pinned revision and writes sdxl-manifest.json (every file's size and SHA-256),
which the engine and the pod check before serving (docs/model-validation.md).

Usage: python scripts/fetch_sdxl.py [--out models/sdxl-base-1.0] [--repo ID] [--revision SHA]
Then:  make serve MODEL_DIR=models/sdxl-base-1.0
"""

from __future__ import annotations

import argparse
import shlex
import socket
import sys
import urllib.parse
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# This checkout's code first, not the checkout a shared venv's editable install names.
sys.path[:0] = [str(REPO / "handler"), str(REPO / "jobs"), str(REPO / "scripts")]

REPO_ID = "stabilityai/stable-diffusion-xl-base-1.0"
# A commit of that repository, not the moving `main`: the same files on every machine. Found
# in public sources (pinned references and hub cache snapshot paths in several public
# repositories); it could not be checked against the hub from our machines, which reach none.
REVISION = "462165984030d82259a11f4367a4eed129e94a7b"
# Configs, tokenizers and the fp16 safetensors of each component; no pickles, no fp32 copy.
PATTERNS = ["model_index.json", "*/config.json", "scheduler/*.json", "tokenizer*/*",
            "unet/diffusion_pytorch_model.fp16.safetensors",
            "vae/diffusion_pytorch_model.fp16.safetensors",
            "text_encoder/model.fp16.safetensors", "text_encoder_2/model.fp16.safetensors"]


def hub_reachable(endpoint: str, timeout: float = 5.0) -> str | None:
    """None when the hub answers a TCP connect, else why not."""
    url = urllib.parse.urlsplit(endpoint)
    host = url.hostname or endpoint
    # A mirror (HF_ENDPOINT) may listen on a port of its own, or speak plain http.
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return f"{host}:{port} is not reachable ({exc})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("models/sdxl-base-1.0"))
    parser.add_argument("--repo", default=REPO_ID)
    parser.add_argument("--revision", default=None,
                        help="a commit of --repo (default: SDXL base's pinned one; required "
                             "with another --repo)")
    args = parser.parse_args(argv)
    if args.revision is None:
        if args.repo != REPO_ID:  # the pinned commit is SDXL base's: another repo has none
            parser.error(f"--revision is required with --repo {args.repo}: a commit of it")
        args.revision = REVISION
    from huggingface_hub import constants, snapshot_download

    from sdxl_serve.model_files import MANIFEST, write_manifest

    # 1. Only a directory with its manifest is complete: fetch_sdxl.py writes it last.
    if (args.out / MANIFEST).is_file():
        # This Python by its path: a bare `python` in a checkout's shell has no sdxl_serve.
        print(f"{args.out} is already fetched (it has its {MANIFEST}); check it with: "
              f"{shlex.quote(sys.executable)} -m sdxl_serve.model_files check "
              f"{shlex.quote(str(args.out))}")
        return 0
    if args.out.exists():
        print(f"error: {args.out} exists but has no {MANIFEST}, so it is not a complete "
              "fetch: remove it or choose another --out", file=sys.stderr)
        return 2
    # 2. Fail at once, in one line, where there is no hub.
    problem = hub_reachable(constants.ENDPOINT)
    if problem:
        print(f"error: cannot download {args.repo}: {problem}; this machine has no route "
              "to the model hub: fetch on a machine that has one, copy the directory here, "
              f"then: make serve MODEL_DIR={args.out}", file=sys.stderr)
        return 2
    # 3. Download next to --out, so that an interrupted download is never where serving
    # looks; a second run resumes it.
    partial = args.out.with_name(args.out.name + ".partial")
    print(f"downloading {args.repo}@{args.revision} (about 7 GB) into {partial} ...",
          flush=True)
    try:
        snapshot_download(args.repo, revision=args.revision, local_dir=partial,
                          allow_patterns=PATTERNS)
    except Exception as exc:  # noqa: BLE001 - any failure of the hub client: one line, no traceback
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"error: downloading {args.repo}@{args.revision} failed: "
              f"{type(exc).__name__}: {reason}; the files so far are in {partial}: run this "
              "again to resume", file=sys.stderr)
        return 1
    # 4. Each component's fp16 weights: a repository without them (a fine-tune saved in
    # full precision only) matched configs alone, and was reported fetched.
    missing = [pattern for pattern in PATTERNS if pattern.endswith(".safetensors")
               and not (partial / pattern).is_file()]
    if missing:
        print(f"error: {args.repo}@{args.revision} has no {', '.join(missing)}: this fetches "
              f"the fp16 safetensors of each component; download a repository without "
              f"them yourself and write its manifest (docs/real-sdxl.md)", file=sys.stderr)
        return 1
    # 5. The manifest the engine and the pod's init container check before serving these
    # files, then the move that makes the directory complete.
    write_manifest(partial, {"repo": args.repo, "revision": args.revision,
                             "patterns": PATTERNS})
    partial.rename(args.out)
    print(f"done, files recorded in {args.out / MANIFEST}. Serve it with: "
          f"make serve MODEL_DIR={args.out}")
    return 0

if __name__ == "__main__":
    sys.exit(main())

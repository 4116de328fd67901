#!/usr/bin/env python3
"""Download SDXL base 1.0 (fp16 safetensors only) into a local directory.

Needs the Hugging Face hub: on a machine without it this fails at once with a message
instead of hanging. About 7 GB on disk; serving it needs a GPU with about 10 GB free at
1024x1024 batch 1 (more for larger batches).

Downloads a pinned revision and writes sdxl-manifest.json (every file's size and SHA-256),
which the engine and the pod check before serving (docs/model-validation.md).

Usage: python scripts/fetch_sdxl.py [--out models/sdxl-base-1.0] [--repo ID] [--revision SHA]
Then:  make serve MODEL_DIR=models/sdxl-base-1.0
"""

from __future__ import annotations

import argparse
import socket
import sys
import urllib.parse
from pathlib import Path

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
    host = urllib.parse.urlsplit(endpoint).hostname or endpoint
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return None
    except OSError as exc:
        return f"{host}:443 is not reachable ({exc})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("models/sdxl-base-1.0"))
    parser.add_argument("--repo", default=REPO_ID)
    parser.add_argument("--revision", default=REVISION,
                        help="a commit of --repo (default: the pinned one)")
    args = parser.parse_args(argv)
    from huggingface_hub import constants, snapshot_download

    from sdxl_serve.model_files import write_manifest

    problem = hub_reachable(constants.ENDPOINT)
    if problem:
        print(f"error: cannot download {args.repo}: {problem}.\nThis machine has no route to "
              "the model hub. Download the fp16 safetensors on a machine that has one "
              f"(this script there), copy the directory here, then: make serve "
              f"MODEL_DIR={args.out}", file=sys.stderr)
        return 2
    print(f"downloading {args.repo}@{args.revision} (about 7 GB) into {args.out} ...",
          flush=True)
    snapshot_download(args.repo, revision=args.revision, local_dir=args.out,
                      allow_patterns=PATTERNS)
    # The manifest the engine and the pod's init container check before serving these files.
    manifest = write_manifest(args.out, {"repo": args.repo, "revision": args.revision,
                                         "patterns": PATTERNS})
    print(f"done, files recorded in {manifest}. Serve it with: make serve MODEL_DIR={args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

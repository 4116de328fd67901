#!/usr/bin/env python3
"""Generate an image from the command line through a running server (standard library only).

Reads the inference key from TorchServe's key file, sends the prompt with options, writes
the image and prints the seed, so the same image can be made again with --seed. With
--stream it shows a progress bar from the per-step messages.

Usage:
    python3 scripts/generate.py "a lighthouse at dawn" [--seed 42] [--steps 30] [-o out.png]
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import sys
import urllib.parse
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_KEY_FILE = REPO / "build" / "run" / "8080" / "key_file.json"
# The formats the server makes (contract's `output_format`) and the extension each is written as.
EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}


def progress_bar(step: int, total: int, elapsed: float, width: int = 30) -> str:
    done = int(width * step / max(total, 1))
    return f"\r[{'#' * done}{'.' * (width - done)}] step {step}/{total} {elapsed:6.2f} s"


def post(base: str, path: str, body: str, token: str, timeout: float):
    url = urllib.parse.urlsplit(base)
    connection = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=timeout)
    connection.request("POST", path, body=body, headers={"Authorization": f"Bearer {token}",
                                                         "Content-Type": "application/json"})
    return connection.getresponse()


def renew_inference_key(management: str, keys: dict, key_file: Path) -> str:
    """Ask TorchServe for a new inference key; it rewrites the key file."""
    url = urllib.parse.urlsplit(management)
    connection = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=30)
    connection.request("GET", "/token?type=inference",
                       headers={"Authorization": f"Bearer {keys['API']['key']}"})
    connection.getresponse().read()
    return json.loads(key_file.read_text())["inference"]["key"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompt")
    parser.add_argument("--negative-prompt")
    parser.add_argument("--steps", type=int, dest="num_inference_steps")
    parser.add_argument("--guidance-scale", type=float)
    parser.add_argument("--width", type=int)
    parser.add_argument("--height", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--num-images", type=int)
    parser.add_argument("--scheduler")
    parser.add_argument("--format", dest="output_format", choices=("png", "jpeg", "webp"))
    parser.add_argument("--stream", action="store_true", help="show per-step progress")
    parser.add_argument("-o", "--output", type=Path, default=None,
                        help="image file (default: out.<format>; image i of many: out-i.<ext>)")
    parser.add_argument("--url", default="http://127.0.0.1:8080", help="inference address")
    parser.add_argument("--management-url", default="http://127.0.0.1:8081",
                        help="management address, to renew an expired inference key")
    parser.add_argument("--model", default="sdxl", help="model name, or name/version")
    parser.add_argument("--key-file", type=Path, default=DEFAULT_KEY_FILE)
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args(argv)

    try:
        keys = json.loads(args.key_file.read_text())
        token = keys["inference"]["key"]
    except (OSError, KeyError, ValueError) as exc:
        print(f"error: cannot read the inference key from {args.key_file} ({exc}); start the "
              "server with `make serve` or pass --key-file", file=sys.stderr)
        return 2
    fields = ("prompt", "negative_prompt", "num_inference_steps", "guidance_scale", "width",
              "height", "seed", "num_images", "scheduler", "output_format")
    request = {name: getattr(args, name) for name in fields if getattr(args, name) is not None}
    if args.stream:
        request["stream"] = True

    response = post(args.url, f"/predictions/{args.model}", json.dumps(request), token,
                    args.timeout)
    if response.status == 400 and b"InvalidKeyException" in response.peek():
        # The inference key expires (token_expiration_min); the API key renews it.
        response.read()
        token = renew_inference_key(args.management_url, keys, args.key_file)
        response = post(args.url, f"/predictions/{args.model}", json.dumps(request), token,
                        args.timeout)
    # Streamed replies are JSON lines: progress events, then the result object.
    result = None
    for line in response:
        if not line.strip():
            continue
        message = json.loads(line)
        if "step" in message and "image" not in message:
            print(progress_bar(message["step"], message["total"], message["elapsed_s"]),
                  end="", file=sys.stderr, flush=True)
        else:
            result = message
    if args.stream:
        print(file=sys.stderr)
    if response.status != 200 or result is None or "image" not in result:
        print(f"error: HTTP {response.status}: {json.dumps(result)}", file=sys.stderr)
        return 1
    images = result.get("images") or [result["image"]]
    seeds = result.get("seeds") or [result["seed"]]
    # The file name comes from us, never from the reply: a `format` such as "/../../x"
    # would otherwise choose where the bytes go.
    ext = EXTENSIONS.get(result.get("format"))
    if ext is None:
        print(f"error: the server answered an unknown image format {result.get('format')!r} "
              f"(known: {', '.join(EXTENSIONS)}); nothing written", file=sys.stderr)
        return 1
    output = args.output or Path(f"out.{ext}")
    for index, (data, seed) in enumerate(zip(images, seeds)):
        path = output if len(images) == 1 else \
            output.with_name(f"{output.stem}-{index}{output.suffix}")
        path.write_bytes(base64.b64decode(data))
        print(f"{path}  seed={seed}  model_version={result.get('model_version', '')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

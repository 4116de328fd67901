#!/usr/bin/env python3
"""Deep health probe for a Kubernetes readiness check: exit 0 if the model can generate.

Sends the deep health request to TorchServe's inference API, `GET /predictions/<model>` with
`X-Health-Check: deep` and the inference key, and exits 0 on 200 ("healthy"), 1 otherwise,
printing the answer. The worker answers from its latest check, which is at most
`health_interval_s` old, or runs one cheap real generation first.

TorchServe 0.12 puts predictions (and /ping) behind the inference key, which expires after
`token_expiration_min`: the probe reads key_file.json on every run and, if the key was
refused, renews it with the API key through the management API (which rewrites the file).
That is why it is an exec probe and not an httpGet probe with a fixed header.

Usage:
    python3 scripts/health_probe.py [--url http://127.0.0.1:8080] [--model sdxl]
        [--key-file build/run/8080/key_file.json] [--management http://127.0.0.1:8081]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "handler"))
from sdxl_serve.management import KeyFile  # noqa: E402  (standard library only)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8080", help="inference address")
    parser.add_argument("--model", default="sdxl", help="model name, or name/version")
    parser.add_argument("--key-file", type=Path,
                        default=REPO / "build" / "run" / "8080" / "key_file.json")
    parser.add_argument("--management", default="http://127.0.0.1:8081",
                        help="management address (to renew an expired key)")
    parser.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args(argv)

    keys = KeyFile(args.key_file, args.management)
    try:
        status, body = keys.call("GET", f"{args.url.rstrip('/')}/predictions/{args.model}",
                                 "inference", headers={"X-Health-Check": "deep"},
                                 timeout=args.timeout)
    except OSError as exc:
        print(f"unhealthy: no answer from {args.url}: {exc}")
        return 1
    print(body.decode("utf-8", "replace").strip())
    return 0 if status == 200 else 1


if __name__ == "__main__":
    sys.exit(main())

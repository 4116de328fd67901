#!/usr/bin/env python3
"""Regenerate what is derived from the request declaration: the README's field table and
config/request.schema.json (SDXL base 1.0 bounds). `--check` fails when either is stale."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sdxl_serve.contract import SDXL_LIMITS, json_schema, markdown_table

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
SCHEMA = REPO / "config" / "request.schema.json"
START, END = "<!-- fields:start -->", "<!-- fields:end -->"


def rendered() -> tuple[str, str]:
    text = README.read_text()
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme = f"{head}{START}\n{markdown_table(SDXL_LIMITS)}\n{END}{tail}"
    return readme, json.dumps(json_schema(SDXL_LIMITS), indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    readme, schema = rendered()
    if args.check:
        stale = [p.name for p, text in ((README, readme), (SCHEMA, schema))
                 if not p.exists() or p.read_text() != text]
        if stale:
            print(f"stale: {', '.join(stale)}; run `make docs`", file=sys.stderr)
            return 1
        return 0
    README.write_text(readme)
    SCHEMA.write_text(schema)
    return 0


if __name__ == "__main__":
    sys.exit(main())

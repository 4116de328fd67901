#!/usr/bin/env python3
"""Regenerate what is derived from the request declaration: the field table of docs/api.md,
config/request.schema.json (SDXL base 1.0 bounds) and the job API's OpenAPI document
(docs/jobs-openapi.json). `--check` fails when any is stale."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# This checkout's code first, not the checkout a shared venv's editable install names.
sys.path[:0] = [str(REPO / "handler"), str(REPO / "jobs"), str(REPO / "scripts")]
from sdxl_serve.contract import SDXL_LIMITS, json_schema, markdown_table  # noqa: E402

README = REPO / "docs" / "api.md"
SCHEMA = REPO / "config" / "request.schema.json"
OPENAPI = REPO / "docs" / "jobs-openapi.json"
START, END = "<!-- fields:start -->", "<!-- fields:end -->"


def openapi() -> str:
    """The job API's OpenAPI document, as the API serves it at /openapi.json."""
    from sdxl_jobs.api import create_app
    from sdxl_jobs.settings import JobSettings
    from sdxl_jobs.store import JobStore

    app = create_app(JobSettings(), JobStore.from_url(JobSettings().redis_url))
    return json.dumps(app.openapi(), indent=2) + "\n"


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
    documents = ((README, readme), (SCHEMA, schema), (OPENAPI, openapi()))
    if args.check:
        stale = [p.name for p, text in documents
                 if not p.exists() or p.read_text() != text]
        if stale:
            print(f"stale: {', '.join(stale)}; run `make docs`", file=sys.stderr)
            return 1
        return 0
    for path, text in documents:
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

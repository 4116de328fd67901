#!/usr/bin/env python3
"""Serve SDXL with Triton Inference Server in the foreground until Ctrl-C.

The model repository is triton-models/ unless --model-repository names another; the server is
the tritonserver bundled in the nvidia-pytriton wheel (sdxl_serve/triton_server.py lays it
out). Refuses, before anything starts, a handler_config section that no model could load,
or an SDXL_* setting of the environment that none could, a directory missing here included
(exit 2, one `error:` line). Builds the tiny model if missing, waits until the model is
READY and prints curl lines that work as printed.

On loopback; ports from SDXL_TRITON_HTTP_PORT, SDXL_TRITON_GRPC_PORT and
SDXL_TRITON_METRICS_PORT (8000, 8001, 8002). The server's copy, its Python and its log live
in a run directory under TMPDIR (sdxl-triton-<http port>) unless --run-dir says otherwise.
Every SDXL_* setting applies, as under TorchServe (docs/triton.md).

Usage: python scripts/serve_triton.py [--model-dir DIR] [--run-dir DIR] [--model-repository DIR]
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Mapping

REPO = Path(__file__).resolve().parents[1]
# This checkout's code first, not the checkout a shared venv's editable install names.
sys.path[:0] = [str(REPO / "handler"), str(REPO / "jobs"), str(REPO / "scripts")]
from sdxl_serve.server import cancel_on_signals, refuse_missing_packages  # noqa: E402

if __name__ == "__main__":
    cancel_on_signals("start")  # before the imports of torch below (seconds)
    # nvidia-pytriton: requirements-triton.txt, the bundled tritonserver.
    refuse_missing_packages({"pytriton": "nvidia-pytriton", "torch": "torch",
                             "diffusers": "diffusers", "yaml": "pyyaml", "numpy": "numpy"})

from sdxl_serve.server import check_distinct_ports  # noqa: E402
from sdxl_serve.settings import Settings, SettingsError  # noqa: E402
from sdxl_serve.triton_model import handler_config  # noqa: E402
from sdxl_serve.triton_server import (  # noqa: E402
    MODEL_REPOSITORY, TritonPorts, TritonServerProcess)
from build_archive import ARCHIVE_REFUSALS, check_weights  # noqa: E402
from build_model import ensure_tiny_model  # noqa: E402
from serve import refuse_taken, serve_in_foreground, stop_on_signals  # noqa: E402

MODEL = "sdxl"
CURL_BODY = ('{"inputs": [{"name": "prompt", "shape": [1, 1], "datatype": "BYTES", '
             '"data": ["a lighthouse at dawn"]}, {"name": "seed", "shape": [1, 1], '
             '"datatype": "UINT64", "data": [42]}], "outputs": [{"name": "seed"}, '
             '{"name": "info"}, {"name": "image", "parameters": {"binary_data": true}}]}')

# The `handler_config` parameter of a config.pbtxt, as the python backend hands it to the
# model: `{ key: "handler_config" value: { string_value: "..." } }`.
HANDLER_CONFIG_PARAMETER = re.compile(r"""key\s*:\s*["']handler_config["']\s*value\s*:?\s*\{"""
                                      r"""\s*string_value\s*:\s*["']([^"']*)["']""")


def check_handler_configs(repository: Path, env: Mapping[str, str]) -> list[dict]:
    """Refuse a handler section that a model of ``repository`` would be given and could not
    serve, with the ``SDXL_*`` overrides of ``env`` (the environment Triton is started
    with, which every model reads): ``Settings.check_serving``, the rules build_archive.py
    checks TorchServe's section by (``check_portable``) and the directories but the
    weights, which the caller checks (``check_weights``).

    Each model's section is read as the model reads it (``triton_model.handler_config``, the
    path relative to the model's directory). Inside Triton a key that no setting declares is
    only a warning in its log, served with the default, and a bad value ends the start with
    a traceback in that log; here either is one message before anything starts.

    Returns the sections, as read.

    Raises:
        SettingsError: naming the setting, its value and the rule; the variable when an
            override set it, and the file and the model unless overrides alone did.
    """
    sections = []
    for pbtxt in sorted(repository.glob("*/config.pbtxt")):
        # A commented-out parameter is no parameter.
        text = re.sub(r"(?m)^\s*#.*$", "", pbtxt.read_text())
        found = HANDLER_CONFIG_PARAMETER.search(text)
        if not found or not found.group(1):
            continue
        model_dir = pbtxt.parent
        parameters = {"parameters": {"handler_config": {"string_value": found.group(1)}}}
        where = (f"{(model_dir / found.group(1)).resolve()} "
                 f"(handler_config of model {model_dir.name})")
        try:
            section, _ = handler_config(parameters, str(model_dir))
            # This is the machine that serves: a directory missing here (SDXL_VAE_DIR,
            # SDXL_CANCEL_DIR) failed every model's load, the reason in a row of Triton's
            # model table, 11 s later. Not the weights: check_weights says more of them.
            Settings.check_serving(section, env)
            sections.append(section)
        except OSError as exc:
            raise SettingsError(f"{where}: cannot be read: {exc.strerror or exc}") from None
        except SettingsError as exc:
            if exc.overridden:  # the variables alone, the same for every model: the cause
                raise
            raise SettingsError(f"{where}: {exc}") from None
    return sections


def curl_lines(ports: TritonPorts) -> str:
    """Shell lines that work as printed: the PNG into out.png, then an error."""
    url = f"{ports.http_url}/v2/models/{MODEL}/infer"
    # The reply is a JSON header of Inference-Header-Content-Length bytes, then the image
    # as a binary BYTES element: a 4-byte length, then the PNG.
    return (f"  curl -s -D headers.txt -o reply.bin -H 'Content-Type: application/json' "
            f"-d '{CURL_BODY}' {url} \\\n"
            f"  && tail -c +$(( $(tr -d '\\r' < headers.txt | sed -n "
            f"'s/^inference-header-content-length: *//Ip') + 5 )) reply.bin > out.png\n"
            f"a bad value is a 400 naming field, value and rule:\n"
            f"  curl -s -H 'Content-Type: application/json' -d '{{\"inputs\": [{{\"name\": "
            f"\"prompt\", \"shape\": [1, 1], \"datatype\": \"BYTES\", \"data\": [\"x\"]}}, "
            f"{{\"name\": \"width\", \"shape\": [1, 1], \"datatype\": \"INT64\", "
            f"\"data\": [1004]}}]}}' {url}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=lambda text: Path(text).expanduser(), default=None,
                        help="serve these weights (diffusers format) instead of the tiny model")
    parser.add_argument("--run-dir", type=Path, default=None)
    parser.add_argument("--model-repository", type=Path, default=MODEL_REPOSITORY,
                        help="serve this Triton model repository (default triton-models/)")
    args = parser.parse_args(argv)

    # Triton serves a repository without it (or ends on one that is not there, its reason
    # in a table of its log), and the wait for READY below would last 15 minutes.
    if not (args.model_repository / MODEL / "config.pbtxt").is_file():
        print(f"error: {args.model_repository} holds no model `{MODEL}` ({MODEL}/config.pbtxt): "
              f"this script waits for it and prints lines that call it", file=sys.stderr)
        return 2
    # 1. The handler settings each model will read, checked before anything is built or
    # started: each section with the SDXL_* overrides of this environment, which the server
    # is started with. Unlike an archive's build, this is the machine that serves.
    try:
        sections = check_handler_configs(args.model_repository, os.environ)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        ports = TritonPorts.from_env()
        check_distinct_ports(ports.listen_settings())
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # Triton would fail to bind it, and say so only in its log.
    if refuse_taken(ports.listen_settings(), "the SDXL_TRITON_*_PORT ports"):
        return 2
    # 2. The weights: SDXL_MODEL_DIR wins (as it does under TorchServe), then --model-dir.
    env = {}
    if not os.environ.get("SDXL_MODEL_DIR"):
        env["SDXL_MODEL_DIR"] = str((args.model_dir or ensure_tiny_model()).resolve())
    weights = os.environ.get("SDXL_MODEL_DIR") or env["SDXL_MODEL_DIR"]
    # As an archive's build checks them: in one line, not in Triton's model table. Each
    # model loads them: checked unless every model's section turns the check off.
    checks = {section.get("model_file_check", Settings.model_file_check)
              for section in sections} or {Settings.model_file_check}
    try:
        check_weights(Path(weights), "off" if checks <= {"off", False} else "size")
    except ARCHIVE_REFUSALS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # 3. Where this server keeps its state.
    run_dir = args.run_dir or Path(tempfile.gettempdir()) / f"sdxl-triton-{ports.http}"
    server = TritonServerProcess(run_dir, model_repository=args.model_repository, ports=ports,
                                 env=env)
    stopping = stop_on_signals()
    # 4. Start and wait for READY (model load and warm-up included); a model that fails to
    # load ends Triton, and the start with it.
    def ready() -> None:
        # A run directory it cannot have, or a full disk: one line, and no "starting" before.
        server.lay_out()
        print(f"starting Triton on {weights} (log: {server.log_path}) ...", flush=True)
        server.start()
        server.wait_ready(MODEL, timeout=900, stop=stopping)
        print(f"\nREADY: model {MODEL} at {ports.http_url}/v2/models/{MODEL} (gRPC "
              f"{ports.host}:{ports.grpc})\n"
              f"a PNG into out.png:\n{curl_lines(ports)}"
              f"the command-line client:\n  python3 scripts/generate.py --triton "
              f"{ports.http_url} 'a lighthouse at dawn'\n"
              f"metrics: {ports.metrics_url}\n"
              f"Ctrl-C stops the server.", flush=True)

    # Triton does not start a backend stub that died again, and nothing rolls its log.
    return serve_in_foreground("Triton", server, stopping, ready, watch=server.upkeep)


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Generate an image from the command line through a running server (standard library only).

Reads the inference key from TorchServe's key file, sends the prompt with options, writes
the image and prints the seed, so the same image can be made again with --seed. With
--stream it shows a progress bar from the per-step messages.

With --triton URL it calls Triton Inference Server (make serve-triton) instead: model
`sdxl` over the KServe v2 API, one input tensor per field, or `sdxl_stream` with --stream.

With --async it goes through the job API instead (make serve-jobs): it submits a job, shows
the progress bar from the job's events (with or without --stream) and fetches the images; a
dropped connection is resumed where it stopped (Last-Event-ID), and the job itself never
depended on it. When the API says its store is away, its reason is said once and the stream
is resumed when the API asks; a job that expired, or a key refused, ends it at once.

A prompt given as `-` is read from standard input (to its end, less one trailing newline):
one on the command line is visible to every user of the machine in `ps` and stays in the
shell's history.

Usage:
    python3 scripts/generate.py "a lighthouse at dawn" [--seed 42] [--steps 30] [-o out.png]
    python3 scripts/generate.py - < prompt.txt
    python3 scripts/generate.py --async "a lighthouse at dawn" [--jobs-url URL]
    python3 scripts/generate.py --triton http://127.0.0.1:8000 "a lighthouse at dawn"
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import math
import os
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# This checkout's code first, not the checkout a shared venv's editable install names.
sys.path[:0] = [str(REPO / "handler"), str(REPO / "jobs"), str(REPO / "scripts")]
# Standard library only, these (any python3 runs this script).
from sdxl_serve.management import archive_part, http as call, read_keys, refused_key  # noqa: E402
from sdxl_serve.server import run_dir_for, seconds, server_address  # noqa: E402
from sdxl_serve.contract import MOST_NUM_IMAGES, RequestError  # noqa: E402
from sdxl_serve.triton_client import infer_request, parse_reply, triton_fields  # noqa: E402

DEFAULT_API_KEY_FILE = REPO / "build" / "run" / "jobs" / "api-key"
# The formats the server makes (contract's `output_format`) and the extension each is written as.
EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}
# The options that tell of one server: TorchServe's ("", where a request goes by default) or
# the job API's (--async); Triton's is its --triton URL alone. And where a request goes instead.
OPTION_SERVERS = {"--url": "", "--management-url": "", "--model": "", "--key-file": "",
                  "--jobs-url": "--async", "--api-key-file": "--async"}
WHERE_IT_GOES = {"--async": "a job goes to the job API at --jobs-url, with --api-key-file, "
                            "which runs the model its dispatchers serve",
                 "--triton": "it calls Triton's model sdxl, or sdxl_stream with --stream, "
                             "at the --triton URL, which takes no key"}
# The format an --output name asks for by its extension.
FORMAT_OF_SUFFIX = {f".{ext}": fmt for fmt, ext in EXTENSIONS.items()} | {".jpeg": "jpeg"}
# `-o -`: the image's bytes to standard output. Kept as the text, not Path("-"), which
# equals Path("./-"), the way to name a file called "-".
STDOUT = "-"


def progress_bar(step: int, total: int, elapsed: float, width: int = 30) -> str:
    done = int(width * step / max(total, 1))
    return f"\r[{'#' * done}{'.' * (width - done)}] step {step}/{total} {elapsed:6.2f} s"


def post(base: str, path: str, body: str, token: str, timeout: float):
    url = urllib.parse.urlsplit(base)
    if url.scheme.lower() == "https":
        # TorchServe serves TLS when its config names a certificate (keystore, or
        # private_key_file and certificate_file): an https --url got the request, with the
        # inference key, as plain HTTP on port 80. Verified against the system's CAs (or
        # SSL_CERT_FILE's), as any HTTPS client does.
        connection = http.client.HTTPSConnection(url.hostname, url.port or 443,
                                                 timeout=timeout,
                                                 context=ssl.create_default_context())
    else:
        connection = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=timeout)
    connection.request("POST", path, body=body, headers={"Authorization": f"Bearer {token}",
                                                         "Content-Type": "application/json"})
    return connection.getresponse()


class Refused(Exception):
    """What to print as the one `error:` line instead of a traceback."""


def unreachable(address: str, exc: BaseException) -> str:
    """The `error:` line's text for a server not reached at ``address``; for a certificate
    not trusted, how to trust it (a server's own CA is in no system store)."""
    if isinstance(exc, http.client.HTTPException):
        # No OSError, so it was a traceback: a server that died mid-reply (IncompleteRead),
        # or something on the port that speaks no HTTP (BadStatusLine, its line quoted).
        return f"{address} sent no whole HTTP reply (it stopped mid-reply, or is no HTTP " \
               f"server): {exc!r}"
    text = f"cannot reach {address}: {exc}"
    # urllib wraps it in a URLError (its `reason`); an SSLError's own `reason` is a string.
    cause = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(cause, ssl.SSLCertVerificationError):
        text += " (a certificate from a CA of your own: SSL_CERT_FILE=<its PEM file>)"
    return text


def error_message(body: bytes) -> str:
    """The message of an error body: TorchServe's is pretty-printed JSON over several lines
    with a `message`, Triton's `{"error": ...}`; anything else as text."""
    text = body.decode(errors="replace").strip()
    try:
        parsed = json.loads(text)
    except ValueError:
        return text
    if isinstance(parsed, dict):
        for name in ("message", "error"):
            if isinstance(parsed.get(name), str):
                return parsed[name]
    return text


def renewed_inference_key(management: str, key_file: Path) -> str:
    """A new inference key from TorchServe (it rewrites the key file), or Refused."""
    try:
        api_key = read_keys(key_file)["api"]
    except (OSError, LookupError, ValueError, TypeError, AttributeError) as exc:
        raise Refused(f"the inference key was refused and {key_file} holds no API key to "
                      f"renew it with ({type(exc).__name__}: {exc})") from None
    try:
        # Straight, as the predictions call is (http.client): not the API key, which
        # never expires, to the environment's HTTP_PROXY.
        status, _, body = call("GET", f"{management.rstrip('/')}/token?type=inference",
                               api_key, direct=True)
    except OSError as exc:
        raise Refused(unreachable(management, exc)) from exc
    if status != 200:
        # The key file still holds the expired key: retrying with it would only fail again.
        raise Refused(f"the inference key was refused (expired, or from another run) and "
                      f"renewing it at {management} failed: HTTP {status}: "
                      f"{error_message(body)}")
    return read_keys(key_file)["inference"]


def finite_number(text: str) -> float:
    """--guidance-scale: a finite number. NaN or infinity went out as JSON's NaN or
    Infinity, and the server's refusal named the body, which the user never wrote."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def model_path(text: str) -> str:
    """--model: a name or name/version, as the path /predictions/<name>[/<version>] takes
    it (a space in it was http.client's traceback)."""
    parts = text.split("/")
    try:
        if len(parts) > 2:
            raise argparse.ArgumentTypeError(text)
        for part in parts:
            archive_part(part)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"must be a model name or name/version, each 1 to 64 letters, digits and . _ - "
            f"(got {text[:80]!r})") from None
    return text


def output_path(text: str) -> Path | str:
    """An ``-o`` name, or STDOUT for ``-`` (it wrote a file named ``-``); one that ends with
    a slash names a folder (``Path`` drops the slash: ``-o shots/``, a folder not made yet,
    was written as a file named ``shots``)."""
    if text == STDOUT:
        return STDOUT
    if text.endswith(("/", os.sep)):
        raise argparse.ArgumentTypeError(f"{text!r} names a folder, not a file")
    return Path(text)


def image_paths(output: Path, count: int) -> list[Path]:
    """Where ``count`` images go: ``output`` itself for one, ``out-i.png`` for each of many."""
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{index}{output.suffix}") for index in range(count)]


def unwritable(output: Path | None, count: int) -> str | None:
    """Why the ``count`` images cannot be written to ``output``, asked before the request:
    found after it, the generation was lost in a traceback, its seed never printed. With
    many images each file is asked for (``-o fox.png`` writes ``fox-1.png``, which may be a
    folder)."""
    if output is None or output == STDOUT:
        return None
    for path in image_paths(output, count):
        if path.is_dir():
            return "it is a folder" if path == output else f"{path} is a folder"
    if not output.parent.is_dir():
        return f"no folder {output.parent}"
    if not os.access(output.parent, os.W_OK):
        return f"folder {output.parent} is not writable"
    return None


def request_fields(args) -> dict:
    fields = ("prompt", "negative_prompt", "num_inference_steps", "guidance_scale", "width",
              "height", "seed", "num_images", "scheduler", "output_format")
    return {name: getattr(args, name) for name in fields if getattr(args, name) is not None}


def write_images(images: list[bytes], seeds: list[int], fmt: object,
                 output: Path | str | None, version: str) -> int:
    """Write the images (the one image's bytes to standard output for STDOUT, its line to
    standard error, so that a pipe gets the image alone); 1 (nothing written) for a format
    we do not know."""
    # The file name comes from us, never from the reply: a `format` such as "/../../x"
    # would otherwise choose where the bytes go.
    ext = EXTENSIONS.get(fmt) if isinstance(fmt, str) else None
    if ext is None:
        print(f"error: the server answered an unknown image format {fmt!r} "
              f"(known: {', '.join(EXTENSIONS)}); nothing written", file=sys.stderr)
        return 1
    if output == STDOUT:
        # One image (main refuses -o - with --num-images over 1).
        sys.stdout.buffer.write(images[0])
        sys.stdout.buffer.flush()
        print(f"-  seed={seeds[0]}  model_version={version}", file=sys.stderr)
        return 0
    output = output or Path(f"out.{ext}")
    for path, data, seed in zip(image_paths(output, len(images)), images, seeds):
        path.write_bytes(data)
        print(f"{path}  seed={seed}  model_version={version}")
    return 0


def jobs_call(base: str, path: str, key: str, body: bytes | None = None,
              headers: dict | None = None, timeout: float = 60):
    request = urllib.request.Request(base.rstrip("/") + path, data=body,
                                     headers={"Authorization": f"Bearer {key}",
                                              "Content-Type": "application/json",
                                              **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def stream_lines(response):
    """The lines of an event stream as they come, without their newline;
    http.client.IncompleteRead when the connection is cut before the reply's end, which
    iterating the reply itself reads as an end (its readline stops quietly at a chunked
    reply cut short), the same as a stream the API ended whole."""
    pending = b""
    while chunk := response.read1(65536):
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            yield line.decode("utf-8")


def follow_events(base: str, job_id: str, key: str, timeout: float) -> dict | None:
    """Show the progress bar from the job's events; resume after a dropped connection, or
    after the API said its store is away (an `unavailable` event, a 503), saying its reason
    once and waiting as long as it asked. Returns the final job object, or None if it never
    came within ``timeout``; Refused when the job cannot be followed at all (expired, not
    this key's, the key refused), where it asked again until the timeout."""
    started = time.monotonic()
    last, deadline = "", started + timeout
    said = ""

    def say_once(reason: str) -> None:
        nonlocal said
        if reason != said:
            print(f"\n({reason}; resuming)", file=sys.stderr)
            said = reason

    while time.monotonic() < deadline:
        headers = {"Last-Event-ID": last} if last else {}
        request = urllib.request.Request(
            f"{base.rstrip('/')}/v1/jobs/{job_id}/events",
            headers={"Authorization": f"Bearer {key}", **headers})
        event: dict = {}
        pause = 1.0
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                if response.status == 204:  # resumed after the final event: it ended
                    status, body = jobs_call(base, f"/v1/jobs/{job_id}", key)
                    if status == 200:
                        return json.loads(body)
                for line in stream_lines(response):
                    if line.startswith("id: "):
                        event["id"] = line[4:]
                    elif line.startswith("event: "):
                        event["event"] = line[7:]
                    elif line.startswith("retry: ") and line[7:].isdigit():
                        pause = int(line[7:]) / 1000
                    elif line.startswith("data: "):
                        event["data"] = json.loads(line[6:])
                    elif not line and "data" in event:
                        last = event.get("id", last)
                        name, data = event.get("event"), event["data"]
                        event = {}
                        if name != "unavailable":
                            said = ""  # followed again: a later outage is said again
                        if name == "expired":
                            raise Refused(f"job {job_id} expired before it was seen to end")
                        if name == "unavailable":  # the stream ends after it
                            say_once(f"the job API: {data.get('message')}")
                        elif data.get("type") == "progress":
                            print(progress_bar(data["step"], data["total"],
                                               time.monotonic() - started),
                                  end="", file=sys.stderr, flush=True)
                        elif "job" in data:
                            print(file=sys.stderr)
                            return data["job"]
        except urllib.error.HTTPError as error:
            message = error_message(error.read())
            if 400 <= error.code < 500 and error.code not in (408, 429):
                # Gone (expired, another key's), or this key refused: no retry helps.
                raise Refused(f"HTTP {error.code} for job {job_id}'s events: {message}") \
                    from None
            say_once(f"the job API answered HTTP {error.code}: {message}")
            retry_after = error.headers.get("Retry-After", "")
            pause = float(retry_after) if retry_after.isdigit() else 5.0
        except http.client.IncompleteRead:
            say_once("connection lost: the stream was cut before its end")
        except (OSError, ValueError) as exc:
            say_once(f"connection lost: {exc}")
        # A stream that ended whole before the job's end (its API replica stops: a rolling
        # update) is resumed after its `retry:` without a word.
        time.sleep(max(0.0, min(pause, deadline - time.monotonic())))
    return None


def run_job(args, request: dict) -> int:
    """--async: submit to the job API, follow the events, fetch the images."""
    try:
        key = args.api_key_file.read_text().strip()
    except OSError as exc:
        print(f"error: cannot read the API key from {args.api_key_file} ({exc}); start the "
              "job API with `make serve-jobs` or pass --api-key-file", file=sys.stderr)
        return 2
    try:
        return follow_job(args, request, key)
    except (urllib.error.URLError, ConnectionError, TimeoutError,
            http.client.HTTPException) as exc:
        # Not any OSError: a file it cannot write is not the API's doing.
        print(f"error: {unreachable(args.jobs_url, exc)}", file=sys.stderr)
        return 1


def follow_job(args, request: dict, key: str) -> int:
    status, body = jobs_call(args.jobs_url, "/v1/jobs", key, json.dumps(request).encode())
    if status not in (200, 202):
        print(f"error: HTTP {status}: {error_message(body)}", file=sys.stderr)
        return 1
    job = json.loads(body)
    print(f"job {job['id']} {job['status']}" + (f", position {job['queue_position']}"
                                                if job.get("queue_position") else ""),
          file=sys.stderr)
    job_id = job["id"]
    try:
        job = follow_events(args.jobs_url, job_id, key, args.timeout)
    except Refused as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if job is None:
        print(f"error: job {job_id} did not end within {args.timeout:g} s",
              file=sys.stderr)
        return 1
    if job["status"] != "succeeded":
        # Its status and error only: the whole job holds its request (prompt, webhook
        # URL), which a captured stderr would keep.
        error = job.get("error")
        message = error.get("message") if isinstance(error, dict) else None
        print(f"error: job {job_id} {job['status']}" + (f": {message}" if message else ""),
              file=sys.stderr)
        return 1
    images = []
    for link in job["images"]:
        status, data = jobs_call(args.jobs_url, link, key)
        if status != 200:
            print(f"error: HTTP {status} for {link}", file=sys.stderr)
            return 1
        images.append(data)
    return write_images(images, job["seeds"], job["result"]["format"], args.output,
                        job["result"].get("model_version", ""))


def triton_post(base: str, path: str, body: bytes, timeout: float):
    request = urllib.request.Request(base.rstrip("/") + path, data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
        return response.status, response
    except urllib.error.HTTPError as error:
        return error.code, error


def run_triton(args, request: dict) -> int:
    """--triton: model `sdxl` (the image as a binary output), or `sdxl_stream` with
    --stream (server-sent events: a progress event per step, then the image in base64)."""
    started = time.monotonic()
    try:
        request = triton_fields(request)
    except RequestError as exc:  # an integer its Triton type cannot hold: Triton says 500
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.stream:
        status, response = triton_post(args.triton, "/v2/models/sdxl_stream/generate_stream",
                                       json.dumps(request).encode(), args.timeout)
        result: dict = {}
        other: list[str] = []  # lines that are no event: a refusal before the model ran
        for raw in response:
            line = raw.decode("utf-8").strip()
            if not line.startswith("data: "):
                other.append(line)
                continue
            result = json.loads(line[6:])
            if "error" in result or "image_base64" in result:
                break
            event = json.loads(result["info"])
            print(progress_bar(event["step"], event["total"], time.monotonic() - started),
                  end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
        if not result:
            # Triton answers a request it refuses (unknown model, bad input) with plain
            # JSON, not server-sent events: its error is the whole body.
            body = "\n".join(other).encode()
            print(f"error: HTTP {status}: {error_message(body)}", file=sys.stderr)
            return 1
        if "image_base64" not in result:
            print(f"error: HTTP {status}: {result.get('error', result)}", file=sys.stderr)
            return 1
        encoded, seeds = result["image_base64"], result["seed"]
        images = [base64.b64decode(data) for data in
                  (encoded if isinstance(encoded, list) else [encoded])]
        seeds = seeds if isinstance(seeds, list) else [seeds]
        info = json.loads(result["info"])
        return write_images(images, seeds, info.get("format"), args.output,
                            info.get("model_version", ""))
    body, _ = infer_request(request)
    status, response = triton_post(args.triton, "/v2/models/sdxl/infer", body, args.timeout)
    data = response.read()
    if status != 200:
        print(f"error: HTTP {status}: {error_message(data)}", file=sys.stderr)
        return 1
    reply = parse_reply(dict(response.headers), data)
    return write_images(reply.images, reply.seeds, reply.info.get("format"), args.output,
                        reply.info.get("model_version", ""))


def predict(args, request: dict, token: str) -> dict:
    """POST the request to TorchServe; the result object, or Refused saying why not."""
    path = f"/predictions/{args.model}"
    try:
        response = post(args.url, path, json.dumps(request), token, args.timeout)
        if response.status != 200:
            body = response.read()
            if refused_key(response.status, body):
                # The inference key expires (token_expiration_min); the API key renews it.
                token = renewed_inference_key(args.management_url, args.key_file)
                response = post(args.url, path, json.dumps(request), token, args.timeout)
                if response.status != 200:
                    body = response.read()
        if response.status != 200:
            # TorchServe's own errors (unknown model, bad key) are JSON over several lines.
            raise Refused(f"HTTP {response.status}: {error_message(body)}")
        # Streamed replies are JSON lines: progress events, then the result object.
        result = None
        for line in response:
            if not line.strip():
                continue
            try:
                message = json.loads(line)
            except ValueError:  # its last line cut short: the server stopped mid-reply
                raise Refused(f"{args.url} stopped mid-reply: {line[:80]!r} is no whole JSON "
                              f"line") from None
            if "step" in message and "image" not in message:
                print(progress_bar(message["step"], message["total"], message["elapsed_s"]),
                      end="", file=sys.stderr, flush=True)
            else:
                result = message
    except (OSError, http.client.HTTPException) as exc:
        raise Refused(unreachable(args.url, exc)) from exc
    if args.stream:
        print(file=sys.stderr)
    if result is None or "image" not in result:
        raise Refused(f"HTTP {response.status}: {json.dumps(result)}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompt", help="the prompt, or - to read it from standard input")
    parser.add_argument("--negative-prompt")
    parser.add_argument("--steps", type=int, dest="num_inference_steps")
    parser.add_argument("--guidance-scale", type=finite_number)
    parser.add_argument("--width", type=int)
    parser.add_argument("--height", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--num-images", type=int)
    parser.add_argument("--scheduler")
    parser.add_argument("--format", dest="output_format", choices=("png", "jpeg", "webp"),
                        help="image format (default: as -o's extension, else the server's: png)")
    parser.add_argument("--stream", action="store_true",
                        help="show per-step progress (--async always does: the job's events)")
    parser.add_argument("-o", "--output", type=output_path, default=None,
                        help="image file (default: out.png, out.jpg or out.webp, as the image's "
                             "format; image i of many: out-i.png and so on; - writes the one "
                             "image to standard output, its seed line to standard error)")
    # The defaults (filled in below, after the check that each option was given where it
    # applies) are the servers' as serve.py and serve_jobs.py start them: their variables.
    parser.add_argument("--url", help="inference address (TS_INFERENCE_ADDRESS, else port 8080)")
    parser.add_argument("--management-url",
                        help="management address, to renew an expired inference key "
                             "(TS_MANAGEMENT_ADDRESS, else port 8081)")
    parser.add_argument("--model", type=model_path,
                        help="TorchServe's model name, or name/version (default sdxl)")
    parser.add_argument("--key-file", type=Path, default=None,
                        help="TorchServe's key file (default: build/run/<--url's port>/"
                             "key_file.json, where serve.py starts it)")
    parser.add_argument("--timeout", type=seconds, default=600)
    parser.add_argument("--async", dest="use_jobs", action="store_true",
                        help="submit a job to the job API and follow its events")
    parser.add_argument("--jobs-url", help="job API address (SDXL_JOBS_ADDRESS, else port 8090)")
    parser.add_argument("--api-key-file", type=Path,
                        help="the job API's key (default: build/run/jobs/api-key, where "
                             "serve_jobs.py writes it)")
    parser.add_argument("--triton", metavar="URL", default=None,
                        help="call Triton's HTTP address instead (make serve-triton)")
    args = parser.parse_args(argv)
    if args.use_jobs and args.triton is not None:
        # Each names where the request goes: with both, the job API took it and --triton
        # was dropped without a word.
        parser.error("argument --triton: not allowed with --async (a job goes to the job "
                     "API at --jobs-url, which runs it on TorchServe)")
    # Each of these options tells of one server; given for another, it was dropped without
    # a word: `--triton URL --model sdxl_stream` called `sdxl`, `--async --model sdxl/2.0`
    # ran whatever was served, `--jobs-url` without --async went to TorchServe.
    where = "--async" if args.use_jobs else "--triton" if args.triton is not None else ""
    for option, server in OPTION_SERVERS.items():
        if getattr(args, option.lstrip("-").replace("-", "_")) is not None and server != where:
            parser.error(f"argument {option}: not allowed with {where} ({WHERE_IT_GOES[where]})"
                         if where else f"argument {option}: only with {server} (without it the "
                                       f"request goes to TorchServe at --url)")
    # The addresses of the server the request goes to, each from its option, else its
    # variable, else serve*.py's default. A scheme left out (127.0.0.1:8090) was a
    # traceback, or a key file looked for under port 80; another server's variable, wrong
    # or not, is not read.
    if args.use_jobs:
        args.jobs_url = server_address(parser, "--jobs-url", args.jobs_url,
                                       "SDXL_JOBS_ADDRESS", "http://127.0.0.1:8090")
        args.api_key_file = args.api_key_file or DEFAULT_API_KEY_FILE
    elif args.triton is not None:
        server_address(parser, "--triton", args.triton)
    else:
        args.url = server_address(parser, "--url", args.url, "TS_INFERENCE_ADDRESS",
                                  "http://127.0.0.1:8080")
        args.management_url = server_address(parser, "--management-url", args.management_url,
                                             "TS_MANAGEMENT_ADDRESS", "http://127.0.0.1:8081")
        args.model = args.model or "sdxl"
        # The address is checked above, so its port is one: run_dir_for cannot refuse it.
        args.key_file = args.key_file or run_dir_for(args.url) / "key_file.json"
    if args.output == STDOUT and (args.num_images or 1) > 1:
        # A pipe takes one image's bytes; many would run together into one stream.
        parser.error(f"argument -o/--output: '-' (standard output) takes one image, not "
                     f"--num-images {args.num_images}")
    # `-o cat.jpg` got a PNG written under that name, without a word.
    named = (FORMAT_OF_SUFFIX.get(args.output.suffix.lower())
             if isinstance(args.output, Path) else None)
    if named and args.output_format not in (None, named):
        parser.error(f"argument -o/--output: {str(args.output)!r} names a {named} file, "
                     f"not {args.output_format} (--format)")
    args.output_format = args.output_format or named
    # Every file the images would go to; no server takes more than MOST_NUM_IMAGES, and a
    # count it refuses is refused before anything is written.
    if reason := unwritable(args.output, min(max(args.num_images or 1, 1), MOST_NUM_IMAGES)):
        print(f"error: cannot write the image to {args.output}: {reason}", file=sys.stderr)
        return 2
    if args.prompt == "-":
        args.prompt = sys.stdin.read().removesuffix("\n")
    if args.use_jobs:
        return run_job(args, request_fields(args))
    if args.triton is not None:
        try:
            return run_triton(args, request_fields(args))
        except (OSError, http.client.HTTPException) as exc:  # urllib's URLError too
            print(f"error: {unreachable(args.triton, exc)}", file=sys.stderr)
            return 1

    try:
        token = read_keys(args.key_file, attempts=1)["inference"]
    except (OSError, KeyError, ValueError) as exc:
        print(f"error: cannot read the inference key from {args.key_file} ({exc}); start the "
              "server with `make serve` or pass --key-file", file=sys.stderr)
        return 2
    request = request_fields(args)
    if args.stream:
        request["stream"] = True

    try:
        result = predict(args, request, token)
    except Refused as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    images = [base64.b64decode(data) for data in result.get("images") or [result["image"]]]
    seeds = result.get("seeds") or [result["seed"]]
    return write_images(images, seeds, result.get("format"), args.output,
                        result.get("model_version", ""))


if __name__ == "__main__":
    sys.exit(main())

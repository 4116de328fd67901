"""scripts/generate.py against a real HTTP server that answers what a hostile server might."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

CLIENT = Path(__file__).resolve().parents[2] / "scripts" / "generate.py"


def serve_reply(reply: dict, requests: list | None = None):
    """A server answering every POST with ``reply``; each request's JSON goes to ``requests``."""
    body = json.dumps(reply).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - the http.server hook's name
            sent = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if requests is not None:
                requests.append(json.loads(sent))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def generate(tmp_path: Path, reply: dict) -> subprocess.CompletedProcess:
    key_file = tmp_path / "key_file.json"
    key_file.write_text(json.dumps({"inference": {"key": "k"}, "API": {"key": "a"}}))
    server = serve_reply(reply)
    try:
        return subprocess.run(
            [sys.executable, str(CLIENT), "a fox", "--key-file", str(key_file),
             "--url", f"http://127.0.0.1:{server.server_address[1]}", "--timeout", "30"],
            cwd=tmp_path / "work", capture_output=True, text=True, timeout=60)
    finally:
        server.shutdown()


def reply(image_format: str) -> dict:
    return {"image": base64.b64encode(b"bytes").decode(), "seed": 1, "format": image_format}


@pytest.mark.parametrize("image_format", ["/../../escaped", "png/../../../x", "exe", ""])
def test_an_unknown_format_writes_nothing(tmp_path, image_format):
    (tmp_path / "work").mkdir()
    done = generate(tmp_path, reply(image_format))
    assert done.returncode == 1
    assert "unknown image format" in done.stderr
    written = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert written == [Path("key_file.json")], written


@pytest.mark.parametrize("image_format, name", [("png", "out.png"), ("jpeg", "out.jpg"),
                                                ("webp", "out.webp")])
def test_a_known_format_is_written_with_its_extension(tmp_path, image_format, name):
    (tmp_path / "work").mkdir()
    done = generate(tmp_path, reply(image_format))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "work" / name).read_bytes() == b"bytes"
    # And --help names that file: it said out.<format>, which is out.jpeg for a JPEG.
    shown = subprocess.run([sys.executable, str(CLIENT), "--help"], capture_output=True,
                           text=True, timeout=60).stdout
    assert name in shown.split("--output", 1)[1].split("--url", 1)[0], shown


# TorchServe's own error bodies are pretty-printed JSON over several lines, as it sends them.
def torchserve_error(code: int, kind: str, message: str) -> bytes:
    return json.dumps({"code": code, "type": kind, "message": message}, indent=2).encode()


BAD_KEY = "Token Authorization failed. Token either incorrect, expired, or not provided correctly"


def serve_errors(replies: dict[str, tuple[int, bytes]]):
    """A server answering each path (GET or POST) with a fixed status and body."""

    class Handler(BaseHTTPRequestHandler):
        def answer(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            status, body = replies[self.path.split("?")[0]]
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = answer  # noqa: N815 - the http.server hooks' names

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def run_client(tmp_path: Path, *args: str, env: dict | None = None, text: bool = True
               ) -> subprocess.CompletedProcess:
    key_file = tmp_path / "key_file.json"
    key_file.write_text(json.dumps({"inference": {"key": "k"}, "API": {"key": "a"}}))
    # TorchServe's key file, where the request goes to TorchServe (refused for another).
    to_torchserve = not {"--triton", "--async"} & set(args)
    return subprocess.run([sys.executable, str(CLIENT), "a fox",
                           *(["--key-file", str(key_file)] if to_torchserve else []),
                           "--timeout", "30", *args],
                          cwd=tmp_path, capture_output=True, text=text, timeout=60, env=env)


def run_against(tmp_path: Path, reply: dict, sent: list, *args: str, text: bool = True
                ) -> subprocess.CompletedProcess:
    """The client run against a server answering ``reply`` (``serve_reply``)."""
    server = serve_reply(reply, sent)
    try:
        return run_client(tmp_path, "--url", f"http://127.0.0.1:{server.server_address[1]}",
                          *args, text=text)
    finally:
        server.shutdown()


def test_an_unknown_model_says_torchserves_message(tmp_path):
    server = serve_errors({"/predictions/nosuch": (
        404, torchserve_error(404, "ModelNotFoundException", "Model not found: nosuch"))})
    try:
        done = run_client(tmp_path, "--url", f"http://127.0.0.1:{server.server_address[1]}",
                          "--model", "nosuch")
    finally:
        server.shutdown()
    assert done.returncode == 1
    assert done.stderr.strip() == "error: HTTP 404: Model not found: nosuch", done.stderr


def test_a_failed_key_renewal_says_so_instead_of_retrying_with_the_old_key(tmp_path):
    # The inference key is refused and the management API refuses the API key as well
    # (a key file from another run): the renewal's own status is the answer.
    refused = (400, torchserve_error(400, "InvalidKeyException", BAD_KEY))
    server = serve_errors({"/predictions/sdxl": refused, "/token": refused})
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        done = run_client(tmp_path, "--url", url, "--management-url", url)
    finally:
        server.shutdown()
    assert done.returncode == 1
    assert "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip() == ("error: the inference key was refused (expired, or from "
                                   f"another run) and renewing it at {url} failed: "
                                   f"HTTP 400: {BAD_KEY}"), done.stderr


def test_a_server_on_moved_ports_is_found_from_its_ts_variables(tmp_path):
    """The key's renewal went to port 8081 whatever TS_MANAGEMENT_ADDRESS said: another
    server's management API got this server's API key."""
    refused = (400, torchserve_error(400, "InvalidKeyException", BAD_KEY))
    server = serve_errors({"/predictions/sdxl": refused, "/token": refused})
    url = f"http://127.0.0.1:{server.server_address[1]}"
    key_file = tmp_path / "key_file.json"
    key_file.write_text(json.dumps({"inference": {"key": "k"}, "API": {"key": "a"}}))
    env = dict(os.environ, TS_INFERENCE_ADDRESS=url, TS_MANAGEMENT_ADDRESS=url)
    try:
        done = subprocess.run([sys.executable, str(CLIENT), "a fox", "--key-file",
                               str(key_file)], env=env, capture_output=True, text=True,
                              timeout=60)
        # Without --key-file: build/run/<the inference port>/, where serve.py starts it.
        default = subprocess.run([sys.executable, str(CLIENT), "a fox"], env=env,
                                 capture_output=True, text=True, timeout=60)
    finally:
        server.shutdown()
    assert done.returncode == 1
    assert f"renewing it at {url} failed" in done.stderr, done.stderr
    expected = CLIENT.parents[1] / "build" / "run" / str(server.server_address[1])
    assert default.returncode == 2
    assert f"cannot read the inference key from {expected / 'key_file.json'}" in \
        default.stderr, default.stderr


def test_a_key_renewal_goes_straight_to_the_server_not_to_the_proxy(tmp_path):
    """With HTTP_PROXY set (an egress proxy, NO_PROXY unset), the prediction went straight
    to TorchServe but the renewal of its refused key went to the proxy, with the API key,
    which never expires."""
    from forward_proxy import ForwardProxy

    refused = (400, torchserve_error(400, "InvalidKeyException", BAD_KEY))
    server = serve_errors({"/predictions/sdxl": refused, "/token": refused})
    url = f"http://127.0.0.1:{server.server_address[1]}"
    key_file = tmp_path / "key_file.json"
    key_file.write_text(json.dumps({"inference": {"key": "k"}, "API": {"key": "a"}}))
    proxy = ForwardProxy()
    env = {name: value for name, value in os.environ.items()
           if name.lower() not in ("no_proxy", "all_proxy")}
    env.update({name: proxy.address for name in ("HTTP_PROXY", "http_proxy")})
    try:
        done = subprocess.run([sys.executable, str(CLIENT), "a fox", "--key-file",
                               str(key_file), "--url", url, "--management-url", url],
                              env=env, capture_output=True, text=True, timeout=60)
    finally:
        server.shutdown()
        proxy.close()
    assert f"renewing it at {url} failed: HTTP 400" in done.stderr, done.stderr
    assert proxy.asked == []


def test_the_job_api_not_running_is_one_line_not_a_traceback(tmp_path):
    import socket

    with socket.socket() as unused:  # a port nothing listens on once it is closed
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    key = tmp_path / "api-key"
    key.write_text("k")
    done = subprocess.run([sys.executable, str(CLIENT), "--async", "--api-key-file", str(key),
                           "--jobs-url", f"http://127.0.0.1:{port}", "a fox"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith(f"error: cannot reach http://127.0.0.1:{port}: "), \
        done.stderr


def test_a_job_api_refusal_says_its_message(tmp_path):
    refusal = json.dumps({"code": 400, "type": "InvalidRequest", "field": "width",
                          "message": "`width` must be a multiple of 8"}).encode()
    server = serve_errors({"/v1/jobs": (400, refusal)})
    key = tmp_path / "api-key"
    key.write_text("k")
    try:
        done = subprocess.run(
            [sys.executable, str(CLIENT), "--async", "--api-key-file", str(key), "--jobs-url",
             f"http://127.0.0.1:{server.server_address[1]}", "--width", "33", "a fox"],
            capture_output=True, text=True, timeout=60)
    finally:
        server.shutdown()
    assert done.returncode == 1
    assert done.stderr.strip() == "error: HTTP 400: `width` must be a multiple of 8", \
        done.stderr


def test_a_failed_job_says_its_error_not_its_request(tmp_path):
    # The whole job went to stderr: its request too, prompt, negative prompt and webhook URL,
    # which a cron job's or CI's captured stderr would keep.
    job_id = "0" * 32
    request = {"prompt": "canary prompt 7f3a", "negative_prompt": "canary negative 91bc",
               "seed": 1, "num_images": 1}
    failed = {"id": job_id, "status": "failed", "request": request,
              "webhook": "http://hooks.example/canary-hook-path?canary-hook-query",
              "error": {"code": 500, "type": "JobFailed",
                        "message": "the job was started 3 times without finishing"}}
    events = f"id: 1-0\nevent: end\ndata: {json.dumps({'job': failed})}\n\n".encode()
    server = serve_errors({"/v1/jobs": (202, json.dumps({"id": job_id, "status": "queued"})
                                        .encode()),
                           f"/v1/jobs/{job_id}/events": (200, events)})
    key = tmp_path / "api-key"
    key.write_text("k")
    try:
        done = subprocess.run(
            [sys.executable, str(CLIENT), "--async", "--api-key-file", str(key), "--jobs-url",
             f"http://127.0.0.1:{server.server_address[1]}", "--negative-prompt",
             request["negative_prompt"], request["prompt"]],
            capture_output=True, text=True, timeout=60)
    finally:
        server.shutdown()
    assert done.returncode == 1
    assert "canary" not in done.stdout + done.stderr, done.stderr
    assert done.stderr.splitlines()[-1] == (f"error: job {job_id} failed: the job was started "
                                            "3 times without finishing"), done.stderr


def test_an_unreachable_server_is_one_line_not_a_traceback(tmp_path):
    import socket

    with socket.socket() as unused:  # a port nothing listens on once it is closed
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    for flag in ("--url", "--triton"):
        done = run_client(tmp_path, flag, f"http://127.0.0.1:{port}")
        assert done.returncode == 1
        assert "Traceback" not in done.stderr, done.stderr
        assert done.stderr.startswith(f"error: cannot reach http://127.0.0.1:{port}: "), \
            done.stderr


def test_a_triton_stream_refused_before_the_model_ran_says_tritons_error(tmp_path):
    # Triton refuses a bad request to generate_stream with plain JSON, not server-sent events.
    message = "[request id: <id_unknown>] input 'num_inference_steps' has datatype INT64"
    server = serve_errors({"/v2/models/sdxl_stream/generate_stream": (
        400, json.dumps({"error": message}).encode())})
    try:
        done = run_client(tmp_path, "--triton",
                          f"http://127.0.0.1:{server.server_address[1]}", "--stream")
    finally:
        server.shutdown()
    assert done.returncode == 1
    assert done.stderr.strip() == f"error: HTTP 400: {message}", done.stderr


@pytest.mark.parametrize("option, value, rule", [
    ("--seed", "-1", "from 0 to 18446744073709551615 (Triton's UINT64)"),
    ("--seed", str(2**64), "from 0 to 18446744073709551615 (Triton's UINT64)"),
    ("--width", str(2**63), "from -9223372036854775808 to 9223372036854775807 (Triton's INT64)"),
])
@pytest.mark.parametrize("stream", [(), ("--stream",)])
def test_an_integer_tritons_type_cannot_hold_is_refused_by_name(tmp_path, option, value, rule,
                                                                 stream):
    # Sent, Triton's frontend would answer 500 ("Unable to parse 'data'") before the model.
    server = serve_errors({})
    try:
        done = run_client(tmp_path, "--triton", f"http://127.0.0.1:{server.server_address[1]}",
                          option, value, *stream)
    finally:
        server.shutdown()
    name = option[2:]
    assert done.returncode == 2
    assert done.stderr.strip() == f"error: `{name}` must be an integer {rule}, got {value}"


def test_a_prompt_given_as_dash_is_read_from_stdin_and_kept_out_of_argv(tmp_path):
    # A prompt in argv is visible to every user of the machine (`ps`): `-` keeps it out.
    bodies = []
    server = serve_reply(reply("png"), bodies)
    key_file = tmp_path / "key_file.json"
    key_file.write_text(json.dumps({"inference": {"key": "k"}, "API": {"key": "a"}}))
    try:
        done = subprocess.run(
            [sys.executable, str(CLIENT), "-", "--key-file", str(key_file),
             "--url", f"http://127.0.0.1:{server.server_address[1]}", "--timeout", "30"],
            input="a secret fox,\nover two lines\n", cwd=tmp_path, capture_output=True,
            text=True, timeout=60)
    finally:
        server.shutdown()
    assert done.returncode == 0, done.stderr
    assert [body["prompt"] for body in bodies] == ["a secret fox,\nover two lines"]


def test_an_output_of_dash_writes_the_image_to_stdout_and_its_line_to_stderr(tmp_path):
    # `-o -` wrote a file named "-", and the seed line went to stdout, into a pipe.
    done = run_against(tmp_path, reply("png"), [], "-o", "-", text=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"bytes"
    assert done.stderr == b"-  seed=1  model_version=\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key_file.json"]


def test_an_output_of_dash_with_many_images_is_refused_before_anything_is_sent(tmp_path):
    sent: list = []
    done = run_against(tmp_path, reply("png"), sent, "--num-images", "2", "-o", "-")
    assert done.returncode == 2 and done.stdout == "", done.stderr
    assert done.stderr.splitlines()[-1] == ("generate.py: error: argument -o/--output: '-' "
                                            "(standard output) takes one image, not "
                                            "--num-images 2"), done.stderr
    assert sent == []


@pytest.mark.parametrize("flag", ["--url", "--async", "--triton"])
def test_an_output_in_no_folder_is_refused_before_anything_is_sent(tmp_path, flag):
    # The images were generated (a job run to its end), then the write failed in a
    # traceback that did not even name the job.
    sent: list = []
    server = serve_reply(reply("png"), sent)
    address = f"http://127.0.0.1:{server.server_address[1]}"
    (tmp_path / "api-key").write_text("k")
    target = {"--url": ["--url", address], "--triton": ["--triton", address],
              "--async": ["--async", "--jobs-url", address,
                          "--api-key-file", str(tmp_path / "api-key")]}[flag]
    try:
        done = run_client(tmp_path, *target, "-o", str(tmp_path / "missing" / "out.png"))
    finally:
        server.shutdown()
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.splitlines()[-1] == (f"error: cannot write the image to "
                                            f"{tmp_path / 'missing' / 'out.png'}: no folder "
                                            f"{tmp_path / 'missing'}"), done.stderr
    assert sent == []


@pytest.mark.parametrize("flag", ["--url", "--jobs-url", "--triton", "--management-url"])
def test_an_address_without_its_scheme_is_named_before_anything_is_sent(tmp_path, flag):
    # `--jobs-url notaurl` was a traceback; `--url 127.0.0.1:8080` looked for its key file
    # under port 80.
    done = run_client(tmp_path, *(["--async"] if flag == "--jobs-url" else []), flag,
                      "127.0.0.1:8080")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.splitlines()[-1] == (f"generate.py: error: {flag} must be "
                                            f"http://HOST[:PORT] or https://HOST[:PORT], the "
                                            f"port from 1 to 65535, got '127.0.0.1:8080'"), \
        done.stderr


@pytest.mark.parametrize("flag", ["--url", "--management-url", "--jobs-url", "--triton"])
def test_an_address_given_empty_is_refused_not_taken_for_the_default(tmp_path, flag):
    # `--url "$TS_URL"` with the variable unset called port 8080 without a word.
    done = run_client(tmp_path, *(["--async"] if flag == "--jobs-url" else []), flag, "")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.splitlines()[-1].startswith(
        f"generate.py: error: {flag} must be http://HOST[:PORT]"), done.stderr


def test_the_address_variables_of_servers_not_called_are_not_read(tmp_path):
    """A wrong SDXL_JOBS_ADDRESS refused a request to TorchServe (and a wrong
    TS_INFERENCE_ADDRESS one through the job API); the variable of the server called is
    named when it is wrong."""
    sent: list = []
    server = serve_reply(reply("png"), sent)
    env = {**os.environ, "SDXL_JOBS_ADDRESS": "127.0.0.1:8090"}
    try:
        done = run_client(tmp_path, "--url", f"http://127.0.0.1:{server.server_address[1]}",
                          env=env)
    finally:
        server.shutdown()
    assert done.returncode == 0 and len(sent) == 1, done.stderr
    done = run_client(tmp_path, env={**os.environ, "TS_INFERENCE_ADDRESS": "127.0.0.1:8080"})
    assert done.returncode == 2 and done.stderr.splitlines()[-1].startswith(
        "generate.py: error: TS_INFERENCE_ADDRESS must be http://HOST[:PORT]"), done.stderr


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e400"])
def test_a_guidance_scale_that_is_no_finite_number_is_named_before_anything_is_sent(
        tmp_path, value):
    # Sent as JSON's NaN or Infinity, the server's refusal named the body ("the body must
    # be JSON without NaN"), which a user of the command line never wrote.
    sent: list = []
    done = run_against(tmp_path, reply("png"), sent, f"--guidance-scale={value}")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.splitlines()[-1] == (f"generate.py: error: argument --guidance-scale: "
                                            f"must be a finite number, got {value!r}")
    assert sent == []


@pytest.mark.parametrize("name, asked", [("cat.jpg", "jpeg"), ("cat.JPEG", "jpeg"),
                                         ("cat.webp", "webp"), ("cat.png", "png"),
                                         ("cat.img", None)])
def test_an_output_names_extension_asks_for_that_format(tmp_path, name, asked):
    # `-o cat.jpg` asked for the server's default and wrote a PNG under that name.
    sent: list = []
    done = run_against(tmp_path, reply(asked or "png"), sent, "-o", name)
    assert done.returncode == 0, done.stderr
    assert [body.get("output_format") for body in sent] == [asked]


def test_a_format_that_an_output_names_extension_contradicts_is_refused(tmp_path):
    sent: list = []
    done = run_against(tmp_path, reply("png"), sent, "--format", "png", "-o", "cat.jpg")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.splitlines()[-1] == ("generate.py: error: argument -o/--output: "
                                            "'cat.jpg' names a jpeg file, not png (--format)")
    assert sent == []


def test_async_with_triton_is_refused_before_anything_is_sent(tmp_path):
    # The job API took the request and --triton was dropped without a word.
    done = run_client(tmp_path, "--async", "--jobs-url", "http://127.0.0.1:9",
                      "--triton", "http://127.0.0.1:9")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.splitlines()[-1].startswith(
        "generate.py: error: argument --triton: not allowed with --async"), done.stderr


@pytest.mark.parametrize("given, said", [
    (["--async", "--model", "sdxl/2.0"], "--model: not allowed with --async (a job goes to "
                                         "the job API"),
    (["--triton", "http://127.0.0.1:9", "--model", "sdxl_stream"],
     "--model: not allowed with --triton (it calls Triton's model sdxl"),
    (["--triton", "http://127.0.0.1:9", "--stream", "--model", "sdxl_stream"],
     "--model: not allowed with --triton (it calls Triton's model sdxl"),
    (["--triton", "http://127.0.0.1:9", "--url", "http://127.0.0.1:9"],
     "--url: not allowed with --triton"),
    (["--triton", "http://127.0.0.1:9", "--key-file", "k.json"],
     "--key-file: not allowed with --triton"),
    (["--async", "--management-url", "http://127.0.0.1:9"],
     "--management-url: not allowed with --async"),
    (["--jobs-url", "http://127.0.0.1:9"], "--jobs-url: only with --async (without it the "
                                           "request goes to TorchServe at --url)"),
    (["--api-key-file", "api-key"], "--api-key-file: only with --async")])
def test_an_option_given_for_another_server_is_refused_before_anything_is_sent(
        tmp_path, given, said):
    # Each was dropped without a word: `--triton URL --model sdxl_stream` called `sdxl`,
    # `--async --model sdxl/2.0` ran whatever version the dispatchers serve, `--jobs-url`
    # without --async went to TorchServe at port 8080.
    done = run_client(tmp_path, *given)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.splitlines()[-1].startswith(
        f"generate.py: error: argument {said}"), done.stderr


def tls_certificate(folder: Path) -> tuple[Path, Path, Path]:
    """(CA certificate, server certificate for 127.0.0.1, its key), made by openssl: a CA of
    our own, as a TorchServe given private_key_file and certificate_file may have."""
    import shutil

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: it makes the test's CA and certificate")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True,
                       timeout=60)

    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    openssl("req", "-x509", *ec, "-days", "2", "-subj", "/CN=test CA", "-keyout", "ca.key",
            "-out", "ca.crt", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    openssl("req", *ec, "-subj", "/CN=127.0.0.1", "-keyout", "server.key", "-out",
            "server.csr")
    (folder / "server.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", "server.ext", "-out", "server.crt")
    return folder / "ca.crt", folder / "server.crt", folder / "server.key"


def test_an_https_url_is_sent_over_tls_and_its_certificate_verified(tmp_path):
    """`--url https://...` (TorchServe configured with a certificate) sent the prediction,
    with the inference key, as plain HTTP: the TLS server saw no request and the user got
    "Remote end closed connection"."""
    import ssl

    ca, certificate, key = tls_certificate(tmp_path)
    requests: list = []
    server = serve_reply(reply("png"), requests)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(certificate, key)
    server.socket = tls.wrap_socket(server.socket, server_side=True)
    url = f"https://127.0.0.1:{server.server_address[1]}"
    key_file = tmp_path / "key_file.json"
    key_file.write_text(json.dumps({"inference": {"key": "k"}, "API": {"key": "a"}}))
    env = {name: value for name, value in os.environ.items()
           if name not in ("SSL_CERT_FILE", "SSL_CERT_DIR")}
    command = [sys.executable, str(CLIENT), "a fox", "--key-file", str(key_file), "--url", url,
               "--timeout", "30"]
    try:
        trusted = subprocess.run(command, cwd=tmp_path, env=dict(env, SSL_CERT_FILE=str(ca)),
                                 capture_output=True, text=True, timeout=60)
        # Verified: a certificate of a CA the client was not told to trust is refused.
        untrusted = subprocess.run(command + ["-o", str(tmp_path / "not.png")], cwd=tmp_path,
                                   env=env, capture_output=True, text=True, timeout=60)
    finally:
        server.shutdown()
    assert trusted.returncode == 0, trusted.stderr
    assert (tmp_path / "out.png").read_bytes() == b"bytes"
    assert requests == [{"prompt": "a fox"}]
    assert untrusted.returncode == 1
    assert untrusted.stderr.startswith(f"error: cannot reach {url}: "), untrusted.stderr
    assert "CERTIFICATE_VERIFY_FAILED" in untrusted.stderr, untrusted.stderr
    assert "SSL_CERT_FILE=" in untrusted.stderr and len(untrusted.stderr.splitlines()) == 1
    assert not (tmp_path / "not.png").exists()


def test_the_key_file_of_an_https_url_without_a_port_is_looked_for_under_443(tmp_path):
    from sdxl_serve.server import run_dir_for

    assert run_dir_for("https://example.test", tmp_path) == tmp_path / "443"
    assert run_dir_for("http://example.test", tmp_path) == tmp_path / "80"


@pytest.mark.parametrize("answer, said", [
    # The server killed mid-reply: fewer bytes than its Content-Length said.
    (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
     b'{"image": "iVBO', "stopped mid-reply"),
    # Something else on the port, answering no HTTP at all.
    (b"SSH-2.0-OpenSSH_9.6\r\n", "BadStatusLine('SSH-2.0-OpenSSH_9.6\\r\\n')"),
], ids=["cut-short", "not-http"])
@pytest.mark.parametrize("flag", ["--url", "--triton", "--jobs-url"])
def test_a_server_that_stops_mid_reply_is_one_line_not_a_traceback(tmp_path, flag, answer,
                                                                    said):
    """http.client's IncompleteRead and BadStatusLine are no OSError, and a JSON line cut
    short no reply: each was a traceback, where a server not running was one line."""
    from faulty_link import CannedAnswer

    server = CannedAnswer(answer)
    (tmp_path / "api-key").write_text("k\n")
    url = server.address
    extra = ["--async", "--api-key-file", str(tmp_path / "api-key")] \
        if flag == "--jobs-url" else []
    try:
        done = run_client(tmp_path, flag, url, *extra)
    finally:
        server.close()
    assert done.returncode == 1
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {url} "), done.stderr
    assert said in lines[0], done.stderr

"""End to end against a real TorchServe process serving the archive build_archive.py makes."""

from __future__ import annotations

import base64
import io
import json
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

from pasted_lines import run_pasted
from sdxl_serve.management import http

pytestmark = pytest.mark.e2e
README = Path(__file__).resolve().parents[2] / "README.md"


def predict(server, body, token=None, headers=None, model="sdxl"):
    token = server.keys()["inference"] if token is None else token
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return http("POST", f"{server.addresses.inference}/predictions/{model}", token, raw,
                headers=headers, timeout=120)


def image_of(body: bytes) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(json.loads(body)["image"])))


def test_the_run_directory_and_its_files_are_the_owners_alone(server):
    """torchserve.out (TorchServe's output: its config, paths, where the key file is) was
    0644, and the run and log directories 0755."""
    for directory in (server.run_dir, server.run_dir / "logs"):
        assert directory.stat().st_mode & 0o777 == 0o700, directory
    files = [server.run_dir / "torchserve.out", server.run_dir / "key_file.json",
             *(server.run_dir / "logs").glob("*.log")]
    assert len(files) > 3
    assert all(path.stat().st_mode & 0o077 == 0 for path in files), \
        [(path.name, oct(path.stat().st_mode)) for path in files]


def test_returns_a_png_of_the_asked_size(server):
    status, headers, body = predict(server, {"prompt": "a lighthouse", "width": 96,
                                             "height": 48, "num_inference_steps": 3})
    assert status == 200, body
    image = image_of(body)
    assert image.format == "PNG" and image.size == (96, 48)
    reply = json.loads(body)
    assert reply["seed"] >= 0 and reply["model_version"] == "1.0"
    assert headers["X-Seed"] == str(reply["seed"])


def test_same_seed_same_bytes_other_seed_other_image(server):
    body = {"prompt": "a lighthouse", "seed": 1234, "num_inference_steps": 3}
    first = json.loads(predict(server, body)[2])["image"]
    again = json.loads(predict(server, body)[2])["image"]
    other = json.loads(predict(server, {**body, "seed": 1235})[2])["image"]
    assert first == again
    assert first != other


def test_a_drawn_seed_reproduces_the_image(server):
    body = {"prompt": "a lighthouse", "num_inference_steps": 3}
    first = json.loads(predict(server, body)[2])
    again = json.loads(predict(server, {**body, "seed": first["seed"]})[2])
    assert first["image"] == again["image"]


def test_without_the_token_the_call_is_refused(server):
    status, _, body = http("POST", f"{server.addresses.inference}/predictions/sdxl", None,
                           b'{"prompt": "x"}')
    assert status == 400 and json.loads(body)["type"] == "InvalidKeyException"
    status, _, _ = predict(server, {"prompt": "x"}, token="not-the-key")
    assert status == 400
    status, _, body = http("GET", f"{server.addresses.management}/models", None)
    assert status == 400 and json.loads(body)["type"] == "InvalidKeyException"


def test_only_metrics_and_the_api_description_answer_without_a_key(server):
    """What a caller without a key gets from each port. TorchServe's API description is
    the one route of the inference and management ports that token authorization leaves
    open; it names TorchServe's version, no model (docs/security.md)."""
    addresses = server.addresses
    for base in (addresses.inference, addresses.management):
        for method, path in (("GET", "/api-description"), ("OPTIONS", "/")):
            status, _, body = http(method, f"{base}{path}")
            assert status == 200, (base, method, path, status)
            description = json.loads(body)
            assert description["info"]["version"] == "0.12.0"
            assert "sdxl" not in body.decode(), "the description names a model"
    refused = [(addresses.inference, "GET", path) for path in
               ("/ping", "/models", "/models/sdxl", "/predictions/sdxl", "/metrics")] + \
              [(addresses.inference, "OPTIONS", "/predictions/sdxl")] + \
              [(addresses.management, "GET", path) for path in
               ("/models", "/models/sdxl", "/token?type=inference", "/metrics")]
    for base, method, path in refused:
        status, _, body = http(method, f"{base}{path}")
        assert status == 400 and json.loads(body)["type"] == "InvalidKeyException", \
            (base, method, path, status)
    status, _, _ = http("GET", f"{addresses.metrics}/metrics")
    assert status == 200


def test_a_key_renewal_of_another_type_is_refused_as_a_wrong_key(server):
    """docs/api.md: the API key with `type` other than inference or management gets the
    answer of a wrong key, and the key file is left as it was. This fails once TorchServe
    changes it."""
    before = (server.run_dir / "key_file.json").read_bytes()
    for query in ("type=API", "type=INFERENCE", "type=", ""):
        status, _, body = http("GET", f"{server.addresses.management}/token?{query}",
                               server.keys()["api"])
        assert status == 400 and json.loads(body)["type"] == "InvalidKeyException", (query, body)
    assert (server.run_dir / "key_file.json").read_bytes() == before


def test_raw_png_bytes_with_accept(server):
    status, headers, body = predict(server, {"prompt": "x", "num_inference_steps": 2},
                                    headers={"Accept": "image/png"})
    assert status == 200 and body[:8] == b"\x89PNG\r\n\x1a\n"
    assert headers["content-type"] == "image/png"


def test_a_mixed_batch_sent_at_once(server):
    bodies = [{"prompt": "ok", "seed": i, "num_inference_steps": 3} for i in range(4)]
    bodies[1] = {"prompt": "bad", "num_inference_steps": 0}
    bodies[3] = b'{"prompt": "bad", "width": 63}'
    with ThreadPoolExecutor(len(bodies)) as pool:
        results = list(pool.map(lambda b: predict(server, b), bodies))
    assert [status for status, _, _ in results] == [200, 400, 200, 400]
    assert json.loads(results[1][2])["field"] == "num_inference_steps"
    assert json.loads(results[3][2])["field"] == "width"


def test_streamed_steps_arrive_before_the_image(server):
    token = server.keys()["inference"]
    import http.client
    import urllib.parse

    url = urllib.parse.urlsplit(server.addresses.inference)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    connection.request("POST", "/predictions/sdxl",
                       json.dumps({"prompt": "x", "num_inference_steps": 4, "stream": True}),
                       {"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    response = connection.getresponse()
    body = response.read()
    # Every line ends with a newline, the result's too: a reader that waits for one (bash's
    # `while read line`) would not see a last line without it.
    *lines, rest = body.split(b"\n")
    assert rest == b"", body[-80:]
    lines = [json.loads(line) for line in lines]
    assert response.status == 200
    assert [line["step"] for line in lines[:-1]] == [1, 2, 3, 4]
    assert all(line["total"] == 4 for line in lines[:-1])
    assert "image" in lines[-1]
    # The headers leave with the first step (TorchServe drops the final reply's).
    assert response.getheader("Content-Type") == "application/x-ndjson"
    assert response.getheader("X-Model-Version") == lines[-1]["model_version"] == "1.0"


def test_the_readme_curl_line_works(server, tmp_path):
    """As pasted, and with the key on no command line (`ps` shows those to every user)."""
    text = README.read_text()
    block = re.search(r"```bash\n([^`]*?\bcurl [^`]*?)\n```", text)
    assert block, "README has no curl example"
    command = block.group(1).replace("\\\n", " ")
    command = command.replace("build/run/8080/key_file.json",
                              str(server.run_dir / "key_file.json"))
    command = command.replace("http://127.0.0.1:8080", server.addresses.inference)
    result, command_lines = run_pasted(command, capture_output=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "curl " in command_lines and server.keys()["inference"] not in command_lines
    reply = json.loads(result.stdout)
    assert image_of(result.stdout).format == "PNG" and reply["seed"] == 42


def test_the_api_docs_raw_bytes_lines_work(server, tmp_path):
    """docs/api.md's raw-bytes example, pasted as written: it used a $KEY nothing set, and
    went out with an empty bearer token (400 InvalidKeyException, out.png that JSON)."""
    text = (README.parent / "docs" / "api.md").read_text()
    block = re.search(r"```\n(python3 [^`]*\bcurl [^`\n]*'Accept: image/png'[^`]*?)\n```", text)
    assert block, "docs/api.md has no raw-bytes example"
    command = (block.group(1).replace("\\\n", " ")
               .replace("build/run/8080/key_file.json", str(server.run_dir / "key_file.json"))
               .replace("http://127.0.0.1:8080", server.addresses.inference))
    result, command_lines = run_pasted(command, capture_output=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "curl " in command_lines and server.keys()["inference"] not in command_lines
    assert Image.open(tmp_path / "out.png").format == "PNG"


def test_the_lines_make_serve_prints_work_from_a_folder_with_a_space_or_a_quote(server,
                                                                              tmp_path):
    """make serve prints its lines with the run directory's whole path: a checkout under
    `My Projects` split it (the client looked for a key file `.../My`, the probe for a run
    directory of that name), and one under `Bob's projects` broke the curl lines' Python."""
    import shutil

    from serve import ready_lines

    run_dir = tmp_path / "Bob's My Projects" / "run"
    run_dir.mkdir(parents=True)
    shutil.copy(server.run_dir / "key_file.json", run_dir)
    # Pasted in the checkout's root, as printed (scripts/...), writing out.png in tmp_path.
    (tmp_path / "scripts").symlink_to(README.parent / "scripts")
    printed = [line.strip() for line in
               ready_lines(server.addresses, run_dir, "sdxl").splitlines()
               if line.startswith("  ")]
    assert len(printed) == 4, printed
    # Two steps where a line asks for the default 30: the same lines, a shorter wait.
    curl_json, curl_raw, client, probe = [
        line.replace('"seed": 42}', '"seed": 42, "num_inference_steps": 2}')
            .replace("'a lighthouse at dawn'", "'a lighthouse at dawn' --steps 2")
        for line in printed]

    def run(line: str) -> subprocess.CompletedProcess:
        done, command_lines = run_pasted(line, capture_output=True, cwd=tmp_path, timeout=120)
        assert done.returncode == 0, (line, done.stderr)
        # No key on a command line, where `ps` shows it to every user (it was curl's).
        assert server.keys()["inference"] not in command_lines, command_lines
        return done

    assert json.loads(run(curl_json).stdout)["seed"] == 42
    run(curl_raw)
    assert Image.open(tmp_path / "out.png").format == "PNG"
    (tmp_path / "out.png").unlink()
    assert b"seed=" in run(client).stdout and (tmp_path / "out.png").exists()
    assert json.loads(run(probe).stdout)["status"] == "healthy"


def run_client(server, tmp_path, *args, text: bool = True):
    """generate.py against ``server``; ``text=False``: its output as bytes (an image)."""
    client = Path(__file__).resolve().parents[2] / "scripts" / "generate.py"
    return subprocess.run(
        ["python3", str(client), "a lighthouse", "--url", server.addresses.inference,
         "--management-url", server.addresses.management,
         "--key-file", str(server.run_dir / "key_file.json"), "--steps", "3", *args],
        capture_output=True, text=text, cwd=tmp_path, timeout=120)


def test_the_command_line_client_streams_and_writes_the_image(server, tmp_path):
    result = run_client(server, tmp_path, "--seed", "9", "--stream", "-o", "fox.png")
    assert result.returncode == 0, result.stderr
    assert "step 3/3" in result.stderr  # the progress bar reached the last step
    assert "seed=9" in result.stdout
    assert Image.open(tmp_path / "fox.png").format == "PNG"


def test_the_command_line_client_writes_one_image_to_stdout_for_a_pipe(server, tmp_path):
    # `-o -` wrote a file named "-"; its seed line goes to stderr, so the pipe gets a PNG.
    result = run_client(server, tmp_path, "--seed", "9", "-o", "-", text=False)
    assert result.returncode == 0, result.stderr
    assert Image.open(io.BytesIO(result.stdout)).format == "PNG"
    assert result.stderr == b"-  seed=9  model_version=1.0\n"
    assert list(tmp_path.iterdir()) == []


def test_the_client_renews_an_expired_inference_key(server, tmp_path):
    key_file = server.run_dir / "key_file.json"
    keys = json.loads(key_file.read_text())
    keys["inference"]["key"] = "expired-key"
    key_file.write_text(json.dumps(keys))
    result = run_client(server, tmp_path, "--seed", "9")
    assert result.returncode == 0, result.stderr
    assert json.loads(key_file.read_text())["inference"]["key"] != "expired-key"


def test_the_command_line_client_says_torchserves_refusals_in_one_line(server, tmp_path):
    # TorchServe's own error bodies are JSON over several lines; each is one `error:` line.
    unknown = run_client(server, tmp_path, "--model", "nosuch")
    assert unknown.returncode == 1
    assert re.fullmatch(r"error: HTTP 404: [^\n]*nosuch[^\n]*\n", unknown.stderr), unknown.stderr
    # A key file of another run: the inference key is refused and so is the renewal.
    stale = tmp_path / "stale_key_file.json"
    stale.write_text(json.dumps({"inference": {"key": "stale"}, "API": {"key": "stale"}}))
    refused = run_client(server, tmp_path, "--key-file", str(stale))
    assert refused.returncode == 1
    assert re.fullmatch(r"error: the inference key was refused \(expired, or from another "
                        r"run\) and renewing it at http://[^ ]+ failed: HTTP 4\d\d: [^\n]+\n",
                        refused.stderr), refused.stderr


@pytest.mark.parametrize("args, said", [
    (["-o", "missing/fox.png"], "error: cannot write the image to missing/fox.png: no folder "
                                "missing\n"),
    (["-o", "."], "error: cannot write the image to .: it is a folder\n"),
    (["-o", "shots/"], "argument -o/--output: 'shots/' names a folder, not a file"),
    (["--timeout", "-5"], "argument --timeout: must be a number of seconds above 0, got '-5'"),
    (["--timeout", "0"], "argument --timeout: must be a number of seconds above 0, got '0'"),
    (["--model", "sd xl"], "argument --model: must be a model name or name/version"),
    (["-o", "-", "--num-images", "2"], "argument -o/--output: '-' (standard output) takes one "
                                       "image, not --num-images 2"),
])
def test_the_command_line_client_refuses_what_it_cannot_use_before_it_generates(
        server, tmp_path, args, said):
    """An output it could not write was a traceback once the image was made, its seed never
    printed; a timeout of 0 or less and a model name no URL path takes were tracebacks or a
    misleading "cannot reach"."""
    result = run_client(server, tmp_path, *args)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert said in result.stderr and result.stdout == "", result.stderr


def test_the_command_line_client_refuses_many_images_where_one_would_be_a_folder(
        server, tmp_path):
    """`-o fox.png` with two images writes fox-0.png and fox-1.png: a folder fox-1.png was a
    traceback after both were made, fox-0.png written and the second seed never printed."""
    (tmp_path / "fox-1.png").mkdir()
    result = run_client(server, tmp_path, "--num-images", "2", "-o", "fox.png")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr == "error: cannot write the image to fox.png: fox-1.png is a folder\n"
    assert not (tmp_path / "fox-0.png").exists()

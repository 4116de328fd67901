"""scripts/generate.py against a real HTTP server that answers what a hostile server might."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

CLIENT = Path(__file__).resolve().parents[2] / "scripts" / "generate.py"


def serve_reply(reply: dict):
    body = json.dumps(reply).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - the http.server hook's name
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
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

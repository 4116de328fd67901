"""The model manifest (sdxl_serve.model_files) on small directories of real files."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sdxl_serve.model_files import (MANIFEST, ModelFilesError, check_model_files, model_files,
                                    write_manifest)

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def model(tmp_path):
    root = tmp_path / "model"
    (root / "unet").mkdir(parents=True)
    (root / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')
    (root / "unet" / "weights.safetensors").write_bytes(bytes(range(256)) * 64)
    (root / ".cache" / "huggingface").mkdir(parents=True)
    (root / ".cache" / "huggingface" / "download.lock").write_text("hub state")
    write_manifest(root, {"built_by": "test"})
    return root


def refusal(model, check="sha256") -> str:
    with pytest.raises(ModelFilesError) as refused:
        check_model_files(model, check)
    return str(refused.value)


def test_the_manifest_lists_every_file_but_itself_and_dot_folders(model):
    manifest = json.loads((model / MANIFEST).read_text())
    assert sorted(manifest["files"]) == ["model_index.json", "unet/weights.safetensors"]
    assert manifest["files"]["unet/weights.safetensors"]["size"] == 256 * 64
    assert len(manifest["files"]["unet/weights.safetensors"]["sha256"]) == 64
    assert manifest["source"] == {"built_by": "test"}
    assert model_files(model) == ["model_index.json", "unet/weights.safetensors"]
    check_model_files(model)
    check_model_files(model, "size")


def test_a_flipped_byte_is_refused_naming_the_file(model):
    weights = model / "unet" / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    message = refusal(model)
    assert "unet/weights.safetensors: sha256" in message
    assert "model_index.json" not in message
    # Sizes alone cannot see it: that is what the sha256 check is for.
    check_model_files(model, "size")
    check_model_files(model, "off")


def test_a_truncated_file_is_refused_by_size(model):
    weights = model / "unet" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert "unet/weights.safetensors: 100 bytes, the manifest says 16384" in refusal(model, "size")


def test_missing_and_added_files_are_refused(model):
    (model / "model_index.json").unlink()
    (model / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    message = refusal(model, "size")
    assert "model_index.json: missing" in message
    assert "unet/diffusion_pytorch_model.bin: not in the manifest" in message


def test_a_swapped_file_of_the_same_size_is_refused(model):
    weights = model / "unet" / "weights.safetensors"
    weights.write_bytes(bytes(reversed(weights.read_bytes())))
    assert "unet/weights.safetensors: sha256" in refusal(model)


def test_no_manifest_says_how_to_get_one(model):
    (model / MANIFEST).unlink()
    message = refusal(model)
    assert "has no sdxl-manifest.json" in message and "fetch_sdxl.py" in message
    assert "model_files write" in message
    # Where each way off takes effect: SDXL_MODEL_FILE_CHECK=off before `make archive` or
    # `make rollout` never reaches the workers of a server started without it.
    assert ("`model_file_check: \"off\"` in the archive's model-config.yaml, or "
            "SDXL_MODEL_FILE_CHECK=off in the environment the server starts with") in message
    # A folder of one component (a vae_dir) is nothing fetch_sdxl.py fetches on its own.
    (model / "model_index.json").unlink()
    message = refusal(model)
    assert "fetch_sdxl.py" not in message and "model_files write" in message


def test_the_command_a_missing_manifest_names_runs_as_printed(model, tmp_path):
    # Pasted into a shell of a checkout, `python -m sdxl_serve.model_files` was the system's
    # Python, which has no sdxl_serve: "No module named sdxl_serve". A PATH without a venv
    # on it and a folder outside the checkout, as a user's shell has.
    model = model.rename(tmp_path / "weights of mine")
    (model / MANIFEST).unlink()
    command = re.search(r"write one with `([^`]+)`", refusal(model)).group(1)
    env = {**os.environ, "PATH": "/usr/bin:/bin"}
    run = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert run.returncode == 0, (command, run.stderr)
    check_model_files(model)


def test_a_broken_manifest_is_refused(model):
    (model / MANIFEST).write_text('{"format": 1, "files": ')
    assert "unreadable" in refusal(model)


@pytest.mark.parametrize("manifest, says", [
    ({"format": 1, "files": []}, "`files` is [], not an object of file paths"),
    ({"format": 1}, "`files` is None"),
    ([{"format": 1}], "it holds [{'format': 1}], not an object"),
    ({"format": 1, "files": {"model_index.json": {"size": True, "sha256": "ab"}}},
     "the entry of model_index.json is"),
])
def test_a_manifest_of_another_shape_is_refused_saying_what_is_wrong(model, manifest, says):
    # They said "format 1 is not 1", "list indices must be integers..." and "671 bytes, the
    # manifest says True".
    (model / MANIFEST).write_text(json.dumps(manifest))
    message = refusal(model)
    assert "unreadable" in message and says in message, message


def test_the_command_exits_nonzero_naming_the_file(model):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "sdxl_serve.model_files", *args],
                              capture_output=True, text=True, timeout=60)

    assert run("check", str(model)).returncode == 0
    (model / "unet" / "weights.safetensors").write_bytes(b"x" * (256 * 64))
    done = run("check", str(model))
    assert done.returncode == 1 and "unet/weights.safetensors: sha256" in done.stderr
    sizes_only = run("check", "--sizes-only", str(model))
    # It passes a changed file of the same size, and says that it read no hash.
    assert sizes_only.returncode == 0 and "no hash read" in sizes_only.stdout, sizes_only
    assert run("write", str(model)).returncode == 0
    assert run("check", str(model)).returncode == 0
    assert run("check", str(model / "nowhere")).returncode == 2


def test_a_component_folder_that_is_a_link_is_listed_and_checked(model, tmp_path):
    # A person keeps one VAE for several models and links it in: the loader follows the
    # link, so the manifest must list and check what is behind it.
    kept = tmp_path / "shared-vae"
    kept.mkdir()
    (kept / "diffusion_pytorch_model.safetensors").write_bytes(bytes(range(256)) * 16)
    (model / "vae").symlink_to(kept, target_is_directory=True)
    write_manifest(model)
    assert "vae/diffusion_pytorch_model.safetensors" in model_files(model)
    weights = kept / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(bytes(reversed(weights.read_bytes())))
    assert "vae/diffusion_pytorch_model.safetensors: sha256" in refusal(model)


def test_a_hub_cache_snapshot_of_links_into_blobs_is_checked(model, tmp_path):
    # The hub's cache: snapshots/<revision>/ holds real folders of links into ../blobs/.
    blobs, snapshot = tmp_path / "hub" / "blobs", tmp_path / "hub" / "snapshots" / "rev"
    blobs.mkdir(parents=True)
    for index, name in enumerate(model_files(model) + [MANIFEST]):
        blob = blobs / f"blob{index}"
        blob.write_bytes((model / name).read_bytes())
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).symlink_to(blob)
    assert model_files(snapshot) == model_files(model)
    check_model_files(snapshot)
    (blobs / "blob1").write_bytes(b"\0" * (256 * 64))
    assert "unet/weights.safetensors: sha256" in refusal(snapshot)


def test_a_link_back_up_the_tree_is_not_followed_round(model):
    (model / "unet" / "loop").symlink_to("..", target_is_directory=True)
    assert model_files(model) == ["model_index.json", "unet/weights.safetensors"]


def test_a_manifest_entry_without_its_hash_is_refused_naming_it(model):
    manifest = json.loads((model / MANIFEST).read_text())
    del manifest["files"]["model_index.json"]["sha256"]
    (model / MANIFEST).write_text(json.dumps(manifest))
    message = refusal(model)
    assert "unreadable" in message and "model_index.json" in message


# --- scripts/fetch_sdxl.py against a hub on loopback ------------------------------------
# The model hub is not reachable here, so a small HTTP server stands in for the two calls
# the hub client makes: the file listing of a revision and each file's download. It can
# cut one file's body short, as a dropped connection does.

HUB_FILES = {"model_index.json": b'{"_class_name": "StableDiffusionXLPipeline"}',
             "unet/config.json": b"{}",
             "unet/diffusion_pytorch_model.fp16.safetensors": bytes(range(256)) * 16,
             "vae/diffusion_pytorch_model.fp16.safetensors": b"vae" * 100,
             "text_encoder/model.fp16.safetensors": b"te" * 100,
             "text_encoder_2/model.fp16.safetensors": b"te2" * 100}


@pytest.fixture
def hub():
    """A loopback hub; ``hub.cut`` names a file whose download stops half-way."""
    import hashlib
    import http.server
    import threading

    class Hub(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        cut = ""

        def log_message(self, *args):
            pass

        def reply(self, status, body, headers=(), cut=False):
            self.send_response(status)
            for header in headers:
                self.send_header(*header)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body[:len(body) // 2] if cut else body)
            self.close_connection = cut

        def do_GET(self):
            path = self.path.split("?")[0]
            if "/tree/" in path:
                listing = [{"type": "file", "path": name, "size": len(body),
                            "oid": hashlib.sha1(body).hexdigest()}
                           for name, body in HUB_FILES.items()]
                return self.reply(200, json.dumps(listing).encode(),
                                  [("Content-Type", "application/json")])
            if "/resolve/" in path:
                revision, name = path.split("/resolve/", 1)[1].split("/", 1)
                if name in HUB_FILES:
                    body = HUB_FILES[name]
                    return self.reply(200, body, [
                        ("X-Repo-Commit", revision),
                        ("ETag", f'"{hashlib.sha1(body).hexdigest()}"')], cut=name == Hub.cut)
            self.reply(404, b"{}")

        do_HEAD = do_GET

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    server.handler = Hub
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def fetch(endpoint, out, tmp_path, *extra):
    env = dict(os.environ, HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf-home"),
               HF_HUB_DISABLE_TELEMETRY="1")
    return subprocess.run([sys.executable, str(REPO / "scripts" / "fetch_sdxl.py"),
                           "--out", str(out), *extra], capture_output=True, text=True,
                          timeout=180, env=env)


def test_fetch_through_a_mirror_on_its_own_port_writes_the_manifest(hub, tmp_path):
    out = tmp_path / "sdxl"
    done = fetch(hub.endpoint, out, tmp_path)
    assert done.returncode == 0, done.stderr
    assert model_files(out) == sorted(HUB_FILES)
    check_model_files(out)
    assert not out.with_name("sdxl.partial").exists()
    again = fetch(hub.endpoint, out, tmp_path)
    assert again.returncode == 0 and "already fetched" in again.stdout


def test_the_check_an_earlier_fetch_names_runs_as_printed(model, tmp_path):
    # "check it with: python -m sdxl_serve.model_files check DIR": the system's Python in a
    # checkout's shell, which has no sdxl_serve. No hub is called: DIR is complete.
    done = fetch("http://127.0.0.1:9", model, tmp_path)
    assert done.returncode == 0 and "already fetched" in done.stdout, done
    command = done.stdout.split("check it with: ", 1)[1].strip()
    run = subprocess.run(["bash", "-c", command], cwd=tmp_path,
                         env={**os.environ, "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True)
    assert run.returncode == 0 and "every file matches" in run.stdout, (command, run.stderr)


def test_a_download_cut_half_way_is_one_error_line_and_never_the_model_dir(hub, tmp_path):
    out = tmp_path / "sdxl"
    hub.handler.cut = "unet/diffusion_pytorch_model.fp16.safetensors"
    done = fetch(hub.endpoint, out, tmp_path)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith("error: downloading") and "run this again to resume" in error
    # Nothing where `make serve MODEL_DIR=...` looks: the files so far wait beside it.
    assert not out.exists() and out.with_name("sdxl.partial").is_dir()
    hub.handler.cut = ""
    assert fetch(hub.endpoint, out, tmp_path).returncode == 0
    check_model_files(out)


def test_fetch_with_no_hub_fails_at_once_in_one_line(tmp_path):
    import socket

    with socket.socket() as unused:  # a loopback port nothing listens on
        unused.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{unused.getsockname()[1]}"
    out = tmp_path / "sdxl"
    done = fetch(endpoint, out, tmp_path)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: cannot download")
    assert "is not reachable" in done.stderr and "Traceback" not in done.stderr
    assert not out.exists() and not out.with_name("sdxl.partial").exists()
    # A directory left by hand or by an older fetch, without its manifest, is not taken as
    # a finished one.
    out.mkdir()
    (out / "model_index.json").write_text("{}")
    done = fetch(endpoint, out, tmp_path)
    assert done.returncode == 2 and "not a complete fetch" in done.stderr


def test_a_repository_without_fp16_weights_is_not_reported_fetched(hub, tmp_path,
                                                                   monkeypatch):
    """A fine-tune saved in full precision only: the patterns matched its configs alone,
    the run said "done" and wrote a manifest, so a second run said "already fetched"."""
    for name in [name for name in HUB_FILES if name.endswith(".fp16.safetensors")
                 and not name.startswith("unet/")]:
        monkeypatch.delitem(HUB_FILES, name)
    out = tmp_path / "finetune"
    done = fetch(hub.endpoint, out, tmp_path, "--repo", "someone/sdxl-finetune",
                 "--revision", "0" * 40)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(
        "error: someone/sdxl-finetune@" + "0" * 40 + " has no vae/diffusion_pytorch_model"
        ".fp16.safetensors, text_encoder/model.fp16.safetensors, text_encoder_2/model.fp16"
        ".safetensors: "), done.stderr
    assert not out.exists()
    # And another repository names its own commit: the pinned one is SDXL base's.
    done = fetch(hub.endpoint, out, tmp_path, "--repo", "someone/sdxl-finetune")
    assert done.returncode == 2 and "--revision is required with --repo" in done.stderr

"""The model manifest (sdxl_serve.model_files) on small directories of real files."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sdxl_serve.model_files import (MANIFEST, ModelFilesError, check_model_files, model_files,
                                    write_manifest)

pytestmark = pytest.mark.unit


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


def test_a_broken_manifest_is_refused(model):
    (model / MANIFEST).write_text('{"format": 1, "files": ')
    assert "unreadable" in refusal(model)


def test_the_command_exits_nonzero_naming_the_file(model):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "sdxl_serve.model_files", *args],
                              capture_output=True, text=True, timeout=60)

    assert run("check", str(model)).returncode == 0
    (model / "unet" / "weights.safetensors").write_bytes(b"x" * (256 * 64))
    done = run("check", str(model))
    assert done.returncode == 1 and "unet/weights.safetensors: sha256" in done.stderr
    assert run("check", "--sizes-only", str(model)).returncode == 0
    assert run("write", str(model)).returncode == 0
    assert run("check", str(model)).returncode == 0
    assert run("check", str(model / "nowhere")).returncode == 2

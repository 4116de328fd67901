"""Only safetensors are loaded; a pickle-only model directory is refused with a reason."""

from __future__ import annotations

import json
import shutil

import pytest

from sdxl_serve.engine import ModelLoadError, check_safetensors, load_engine
from sdxl_serve.settings import Settings

pytestmark = pytest.mark.handler


def pickle_only_copy(tiny_model_dir, tmp_path):
    copy = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, copy)
    for weights in copy.glob("unet/*.safetensors"):
        weights.rename(weights.with_suffix(".bin"))
    return copy


def test_the_tiny_model_is_safetensors_only(tiny_model_dir):
    check_safetensors(tiny_model_dir)
    assert not [p for p in tiny_model_dir.rglob("*") if p.suffix in (".bin", ".pt", ".ckpt")]


def test_a_pickle_only_directory_is_refused_before_loading(tiny_model_dir, tmp_path):
    model = pickle_only_copy(tiny_model_dir, tmp_path)
    with pytest.raises(ModelLoadError) as caught:
        load_engine(model, Settings.from_mapping({"device": "cpu"}, env={}))
    message = str(caught.value)
    assert "unet" in message and "diffusion_pytorch_model.bin" in message
    assert "safetensors" in message and "arbitrary code" in message


def test_a_directory_that_is_no_model_says_what_to_do(tmp_path):
    with pytest.raises(ModelLoadError, match="model_index.json"):
        check_safetensors(tmp_path)


def test_a_missing_component_is_named(tiny_model_dir, tmp_path):
    copy = tmp_path / "partial"
    shutil.copytree(tiny_model_dir, copy)
    shutil.rmtree(copy / "text_encoder_2")
    with pytest.raises(ModelLoadError, match="text_encoder_2"):
        check_safetensors(copy)


def test_the_tiny_model_is_deterministic(tmp_path):
    from sdxl_serve.tiny_model import build_tiny_sdxl

    first = build_tiny_sdxl(tmp_path / "a")
    second = build_tiny_sdxl(tmp_path / "b")
    for weights in first.rglob("*.safetensors"):
        assert weights.read_bytes() == (second / weights.relative_to(first)).read_bytes()
    index = json.loads((first / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"


# --- the manifest, checked at load (sdxl_serve.model_files) ------------------------------

def flipped_copy(tiny_model_dir, tmp_path):
    """A copy of the tiny model with one bit flipped near the end of the UNet's weights
    (in the tensor data, not the header: the file still parses and loads)."""
    copy = tmp_path / "flipped"
    shutil.copytree(tiny_model_dir, copy)
    (weights,) = copy.glob("unet/*.safetensors")
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0x01
    weights.write_bytes(bytes(data))
    return copy, weights.relative_to(copy).as_posix()


def test_the_tiny_model_has_a_manifest_that_matches(tiny_model_dir):
    from sdxl_serve.model_files import MANIFEST, check_model_files

    assert (tiny_model_dir / MANIFEST).is_file()
    check_model_files(tiny_model_dir)


def test_a_flipped_byte_in_one_weight_file_is_refused_at_load(tiny_model_dir, tmp_path):
    model, name = flipped_copy(tiny_model_dir, tmp_path)
    with pytest.raises(ModelLoadError) as refused:
        load_engine(model, Settings.from_mapping({"device": "cpu"}, env={}))
    message = str(refused.value)
    assert f"{name}: sha256" in message and "refusing to serve it" in message
    # The flip alone does not stop diffusers: without the check the same files load.
    engine = load_engine(model, Settings.from_mapping(
        {"device": "cpu", "model_file_check": "off"}, env={}))
    assert engine is not None

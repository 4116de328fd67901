"""Only safetensors are loaded; a pickle-only model directory is refused with a reason."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from sdxl_serve.engine import ModelLoadError, check_model_dir, load_engine
from sdxl_serve.settings import Settings

pytestmark = pytest.mark.handler


def pickle_only_copy(tiny_model_dir, tmp_path):
    copy = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, copy)
    for weights in copy.glob("unet/*.safetensors"):
        weights.rename(weights.with_suffix(".bin"))
    return copy


def test_the_tiny_model_is_safetensors_only(tiny_model_dir):
    check_model_dir(tiny_model_dir)
    assert not [p for p in tiny_model_dir.rglob("*") if p.suffix in (".bin", ".pt", ".ckpt")]


def test_the_tiny_models_files_are_as_readable_as_the_umask_makes_files():
    """safetensors wrote the weights 0600 whatever the umask: a model built by one user (a
    shared volume, an init container) could not be read by the server's user."""
    from sdxl_serve.tiny_model import build_tiny_sdxl

    before = os.umask(0o022)
    try:
        with tempfile.TemporaryDirectory() as where:
            built = build_tiny_sdxl(Path(where) / "tiny")
            modes = {str(f.relative_to(built)): f.stat().st_mode & 0o777
                     for f in built.rglob("*") if f.is_file()}
    finally:
        os.umask(before)
    assert any(name.endswith(".safetensors") for name in modes)
    assert {name: mode for name, mode in modes.items() if mode != 0o644} == {}


def test_a_pickle_only_directory_is_refused_before_loading(tiny_model_dir, tmp_path):
    model = pickle_only_copy(tiny_model_dir, tmp_path)
    with pytest.raises(ModelLoadError) as caught:
        load_engine(model, Settings.from_mapping({"device": "cpu"}, env={}))
    message = str(caught.value)
    assert "unet" in message and "diffusion_pytorch_model.bin" in message
    assert "safetensors" in message and "arbitrary code" in message


def test_a_directory_that_is_no_model_says_what_to_do(tmp_path):
    with pytest.raises(ModelLoadError, match="model_index.json"):
        check_model_dir(tmp_path)


def test_a_missing_component_is_named(tiny_model_dir, tmp_path):
    copy = tmp_path / "partial"
    shutil.copytree(tiny_model_dir, copy)
    shutil.rmtree(copy / "text_encoder_2")
    with pytest.raises(ModelLoadError, match="text_encoder_2"):
        check_model_dir(copy)


def test_every_missing_folder_and_every_folder_of_pickles_is_named_at_once(tiny_model_dir,
                                                                         tmp_path):
    """Only the first was named: a model put together by hand took a build per folder."""
    copy = tmp_path / "partial"
    shutil.copytree(tiny_model_dir, copy)
    for name in ("unet", "vae", "tokenizer"):
        shutil.rmtree(copy / name)
    (copy / "scheduler" / "scheduler_config.json").unlink()
    with pytest.raises(ModelLoadError) as refused:
        check_model_dir(copy)
    assert f"{copy} has no unet/, vae/, tokenizer/, scheduler/ folders with files" in \
        str(refused.value)
    shutil.copytree(tiny_model_dir, copy, dirs_exist_ok=True)
    for name in ("unet", "vae"):
        for weights in (copy / name).glob("*.safetensors"):
            weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(ModelLoadError) as refused:
        check_model_dir(copy)
    assert "only pickle weights in unet/diffusion_pytorch_model.bin, " \
        "vae/diffusion_pytorch_model.bin." in str(refused.value)


@pytest.mark.parametrize("component", ["tokenizer", "tokenizer_2", "scheduler"])
def test_a_missing_tokenizer_or_scheduler_is_named(tiny_model_dir, tmp_path, component):
    # Without tokenizer_2/, diffusers made an empty 2-token tokenizer of the model root,
    # and the warm-up failed with "OverflowError: int too big to convert".
    copy = tmp_path / "partial"
    shutil.copytree(tiny_model_dir, copy)
    shutil.rmtree(copy / component)
    with pytest.raises(ModelLoadError, match=rf"has no {component}/ folder with files;"):
        check_model_dir(copy)


def test_a_path_that_is_no_directory_or_a_hub_cache_folder_says_so(tiny_model_dir, tmp_path):
    with pytest.raises(ModelLoadError, match="is not a directory"):
        check_model_dir(tmp_path / "nonexistent")
    cache = tmp_path / "models--stabilityai--stable-diffusion-xl-base-1.0"
    shutil.copytree(tiny_model_dir, cache / "snapshots" / "462165984030d82259a11f4367a4eed1")
    with pytest.raises(ModelLoadError, match=r"hub cache folder: serve one of its snapshots/"):
        check_model_dir(cache)


def test_fp16_weights_sharded_or_for_some_components_only_are_loaded(tmp_path):
    """Which files load: the fp16 ones when they are all a component has, sharded or not
    (the sharded names were not recognised, and the load failed with diffusers' "no file
    named diffusion_pytorch_model.safetensors"), and on CPU the full ones elsewhere."""
    from sdxl_serve.engine import weights_variant
    from sdxl_serve.model_files import write_manifest
    from sdxl_serve.tiny_model import build_tiny_pipeline

    reference = build_tiny_pipeline()
    sharded = tmp_path / "sharded-fp16"
    build_tiny_pipeline().to(torch.float16).save_pretrained(
        sharded, safe_serialization=True, variant="fp16", max_shard_size="200KB")
    assert list((sharded / "unet").glob("*.fp16-00001-of-*.safetensors")), "not sharded"
    mixed = tmp_path / "mixed"  # the UNet in both precisions, the rest in fp16 only
    build_tiny_pipeline().to(torch.float16).save_pretrained(mixed, safe_serialization=True,
                                                            variant="fp16")
    build_tiny_pipeline().unet.save_pretrained(mixed / "unet", safe_serialization=True)
    for model in sharded, mixed:
        assert weights_variant(model, half=False) == "fp16"
        write_manifest(model)
        engine = load_engine(model, Settings.from_mapping({"device": "cpu"}, env={}))
        for name in ("unet", "vae", "text_encoder_2"):
            loaded = next(getattr(engine.pipe, name).parameters())
            assert loaded.dtype == torch.float32, (model.name, name)
            assert torch.allclose(loaded, next(getattr(reference, name).parameters()),
                                  atol=1e-2), (model.name, name)


def test_a_model_made_for_another_scheduler_serves_euler_as_euler(tiny_model_dir, tmp_path,
                                                                   caplog):
    """An LCM or UniPC fine-tune: `euler`, the default, was the model's own scheduler."""
    import diffusers

    from sdxl_serve.model_files import write_manifest

    model = tmp_path / "lcm"
    shutil.copytree(tiny_model_dir, model)
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(model)
    diffusers.LCMScheduler.from_config(pipe.scheduler.config).save_pretrained(
        model / "scheduler")
    index = json.loads((model / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "LCMScheduler"]
    (model / "model_index.json").write_text(json.dumps(index))
    write_manifest(model)
    engine = load_engine(model, Settings.from_mapping({"device": "cpu"}, env={}))
    assert "the model's scheduler LCMScheduler is not one we serve" in caplog.text
    assert engine.limits.default_scheduler == "euler"
    assert {name: type(s).__name__ for name, s in engine.schedulers.items()} == {
        "euler": "EulerDiscreteScheduler",
        "euler_ancestral": "EulerAncestralDiscreteScheduler",
        "dpmpp_2m": "DPMSolverMultistepScheduler", "ddim": "DDIMScheduler"}


def test_weights_without_a_manifest_are_refused_when_the_archive_is_built(
        tiny_model_dir, tmp_path, monkeypatch):
    """Any download but fetch_sdxl.py's has no manifest: the archive was built, and the
    worker's load failed in a traceback. Refused at build, saying what to do."""
    from build_archive import build_archive
    from sdxl_serve.model_files import MANIFEST, ModelFilesError

    model = tmp_path / "downloaded"
    shutil.copytree(tiny_model_dir, model)
    (model / MANIFEST).unlink()
    with pytest.raises(ModelFilesError, match=rf"has no {MANIFEST}.*model_files write "
                                              rf".*SDXL_MODEL_FILE_CHECK=off"):
        build_archive("sdxl", "1.0", model, tmp_path / "store")
    assert not (tmp_path / "store").exists()
    # `model_file_check: off` unquoted, which YAML reads as false: off, as meant.
    build_archive("sdxl", "1.0", model, tmp_path / "yaml-off",
                  handler_settings={"model_file_check": False})
    assert (tmp_path / "yaml-off" / "sdxl-1.0.mar").is_file()
    monkeypatch.setenv("SDXL_MODEL_FILE_CHECK", "off")  # unchecked, as the worker will
    build_archive("sdxl", "1.0", model, tmp_path / "store")
    assert (tmp_path / "store" / "sdxl-1.0.mar").is_file()


def test_a_manifest_that_cannot_be_written_is_one_error_line(tiny_model_dir, tmp_path):
    import subprocess
    import sys

    from sdxl_serve.model_files import MANIFEST

    model = tmp_path / "read-only"
    shutil.copytree(tiny_model_dir, model)
    # Unwritable even for root: a directory where the manifest's temporary file goes.
    (model / f"{MANIFEST}.partial").mkdir()
    done = subprocess.run([sys.executable, "-m", "sdxl_serve.model_files", "write", str(model)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith(f"error: cannot write {model / MANIFEST}: "), done.stderr
    assert "SDXL_MODEL_FILE_CHECK=off" in done.stderr


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


# --- a directory laid out as the hub ships SDXL base 1.0 ---------------------------------

def hub_layout(tmp_path):
    """The tiny SDXL laid out as the hub's SDXL base 1.0 repository is: fp32 and fp16
    (``*.fp16.safetensors``) weights side by side, ONNX and OpenVINO files (``.bin`` that
    is no pickle) beside them, an extra ``vae_1_0/`` and a single-file checkpoint that
    ``model_index.json`` does not name. The fp16 weights are those of the model plus 1,
    so which file was loaded shows in the weights."""
    import torch

    from sdxl_serve.model_files import write_manifest
    from sdxl_serve.tiny_model import build_tiny_pipeline

    model = tmp_path / "sdxl-base-1.0"
    build_tiny_pipeline().save_pretrained(model, safe_serialization=True)
    shifted = build_tiny_pipeline()
    with torch.no_grad():
        for component in (shifted.unet, shifted.vae, shifted.text_encoder,
                          shifted.text_encoder_2):
            for parameter in component.parameters():
                parameter.add_(1.0)
    shifted.to(torch.float16).save_pretrained(model, safe_serialization=True, variant="fp16")
    shutil.copytree(model / "vae", model / "vae_1_0")
    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
        (model / component / "openvino_model.bin").write_bytes(b"OpenVINO weights")
        (model / component / "model.onnx").write_bytes(b"ONNX graph")
    # A pickle that would fail if anything unpickled it.
    (model / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"not a pickle")
    (model / "sd_xl_base_1.0.safetensors").write_bytes(b"single-file checkpoint")
    write_manifest(model)
    return model


def test_the_hub_layout_loads_the_weights_its_dtype_asks_for(tmp_path):
    import torch

    from sdxl_serve.tiny_model import build_tiny_pipeline

    model = hub_layout(tmp_path)
    reference = build_tiny_pipeline()
    check_model_dir(model)
    for dtype, shift in (("float32", 0.0), ("float16", 1.0)):
        engine = load_engine(model, Settings.from_mapping(
            {"device": "cpu", "dtype": dtype}, env={}))
        for name in ("unet", "text_encoder", "text_encoder_2"):
            loaded = next(getattr(engine.pipe, name).parameters())
            expected = next(getattr(reference, name).parameters()) + shift
            assert loaded.dtype == getattr(torch, dtype), name
            assert torch.allclose(loaded.float(), expected, atol=1e-2), (dtype, name)
        # The SDXL VAE stays in fp32 (it overflows in fp16), from the fp16 file.
        vae = next(engine.pipe.vae.parameters())
        assert vae.dtype == torch.float32
        assert torch.allclose(vae, next(reference.vae.parameters()) + shift, atol=1e-2)


@pytest.mark.parametrize("layout,missing", [("sd-1.5", "text_encoder_2"),
                                            ("sdxl-refiner", "text_encoder")])
def test_a_model_that_is_not_sdxl_base_is_refused_when_the_archive_is_built(
        tiny_model_dir, tmp_path, layout, missing):
    """SD 1.5 has no second text encoder, the SDXL refiner no first one: both are refused
    by name when the archive is built, before a model store or anything in it exists."""
    from build_archive import build_archive

    model = tmp_path / layout
    shutil.copytree(tiny_model_dir, model)
    shutil.rmtree(model / missing)
    shutil.rmtree(model / missing.replace("text_encoder", "tokenizer"))
    tokenizer = missing.replace("text_encoder", "tokenizer")
    with pytest.raises(ModelLoadError,
                       match=rf"has no {missing}/, {tokenizer}/ folders with files; an SDXL "):
        build_archive("sdxl", "1.0", model, tmp_path / "store")
    assert not (tmp_path / "store").exists()


def test_an_inpainting_model_is_refused_before_loading_and_when_archived(tiny_model_dir,
                                                                          tmp_path):
    """SDXL inpainting has every component of the base model, but its UNet takes 9
    channels (latents, mask, masked image): loaded as text to image, it failed only in
    warm-up with a tensor-size error. It is refused by what it is, at build and at load."""
    import diffusers
    from build_archive import build_archive
    from sdxl_serve.model_files import MANIFEST, write_manifest

    model = tmp_path / "sdxl-inpainting"
    shutil.copytree(tiny_model_dir, model)
    unet = diffusers.UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet")
    shutil.rmtree(model / "unet")
    diffusers.UNet2DConditionModel.from_config({**unet.config, "in_channels": 9}) \
        .save_pretrained(model / "unet", safe_serialization=True)
    (model / MANIFEST).unlink()
    write_manifest(model)  # a well-formed model, as fetched: only its kind is wrong
    rule = r"not a text-to-image SDXL: its UNet takes 9 input channels, and its VAE makes 4"
    with pytest.raises(ModelLoadError, match=rule):
        load_engine(model, Settings(device="cpu"))
    with pytest.raises(ModelLoadError, match=rule):
        build_archive("sdxl", "1.0", model, tmp_path / "store")
    assert not (tmp_path / "store").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine whose torch sees no GPU")
def test_device_cuda_without_a_gpu_refuses_to_load(tiny_model_dir):
    """The Kubernetes GPU pods set `SDXL_DEVICE=cuda`: a pod that cannot see its GPU fails
    its start with the reason instead of serving SDXL on the CPU, as `auto` would."""
    with pytest.raises(ModelLoadError, match="device=cuda, but torch sees no CUDA device") \
            as refused:
        load_engine(tiny_model_dir, Settings(device="cuda"))
    # What to do, and what torch was built for: it named neither, and `make serve
    # SDXL_DEVICE=cuda` on a CPU machine left a user to guess.
    assert f"torch {torch.__version__} built for CUDA {torch.version.cuda or 'none'}" \
        in str(refused.value), refused.value
    assert "device: auto or cpu (SDXL_DEVICE) serves on the CPU" in str(refused.value)

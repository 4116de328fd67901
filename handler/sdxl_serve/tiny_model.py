"""Build the embedded default model: a tiny SDXL with random weights.

It is made from the real diffusers and transformers classes (UNet2DConditionModel with
text-time conditioning, CLIPTextModel, CLIPTextModelWithProjection, AutoencoderKL,
EulerDiscreteScheduler, CLIPTokenizer), so every code path that serves real SDXL runs
against it, in seconds on a CPU and with no model hub. The images are noise: it proves the
plumbing, not the art.

Example:
    from sdxl_serve.tiny_model import build_tiny_sdxl
    build_tiny_sdxl("build/tiny-sdxl")
"""

from __future__ import annotations

import os
from pathlib import Path

from sdxl_serve.model_files import write_manifest

# Pixel size the tiny model generates by default: UNet sample_size 32 times the VAE's
# scale factor of 2 (two VAE blocks).
TINY_SAMPLE_SIZE = 32
_SEED = 0


def _byte_vocabulary() -> dict[str, int]:
    """A byte-level CLIP vocabulary with no merges, built here so no download is needed.

    CLIP's BPE maps every byte to a printable character; with no merge rules each word
    becomes one token per character, ending in ``</w>``. Good enough for random weights.
    """
    printable = list(range(ord("!"), ord("~") + 1))
    printable += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    byte_chars = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in byte_chars:
            byte_chars[b] = chr(256 + shift)
            shift += 1
    symbols = [byte_chars[b] for b in range(256)]
    tokens = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}


def _build_tokenizer(vocab: dict[str, int]):
    from transformers import CLIPTokenizer

    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def build_tiny_pipeline():
    """Return a deterministic tiny ``StableDiffusionXLPipeline`` with random weights."""
    import sdxl_serve.pipeline_libraries  # noqa: F401 (first: without the libraries' notes)
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(_SEED)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=TINY_SAMPLE_SIZE,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        # 2 * 8 (time ids) * 3 + 32 (pooled text embedding of text_encoder_2)
        projection_class_embeddings_input_dim=80,
        cross_attention_dim=64,
        norm_num_groups=1,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        steps_offset=1,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
    )
    torch.manual_seed(_SEED)
    vae = AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        sample_size=128,
    )
    vocab = _byte_vocabulary()
    text_config = CLIPTextConfig(
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
        hidden_size=32,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=5,
        vocab_size=len(vocab),
        hidden_act="gelu",
        projection_dim=32,
    )
    torch.manual_seed(_SEED)
    text_encoder = CLIPTextModel(text_config)
    torch.manual_seed(_SEED)
    text_encoder_2 = CLIPTextModelWithProjection(text_config)
    tokenizer = _build_tokenizer(vocab)
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    )


def build_tiny_sdxl(out_dir: str | Path) -> Path:
    """Save the tiny pipeline in diffusers format, safetensors only, with the manifest of its
    files (model_files.py) that the engine checks at load, and return its path."""
    from transformers.utils import logging as transformers_logging

    out = Path(out_dir)
    pipeline = build_tiny_pipeline()
    # No "Writing model shards" bar for each text encoder's one shard in the launcher's
    # terminal (`make serve`'s first start); the caller's setting is left as it was.
    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        pipeline.save_pretrained(out, safe_serialization=True)
    finally:
        if bars:
            transformers_logging.enable_progress_bar()
    # safetensors writes its files 0600 whatever the umask, where every other file gets
    # the umask's mode: a model built by one user and served by another (a shared volume,
    # a pod's uid) could not be read. Random weights are no secret: the umask decides.
    umask = os.umask(0)
    os.umask(umask)
    for weights in out.rglob("*.safetensors"):
        weights.chmod(0o666 & ~umask)
    write_manifest(out, {"built_by": "sdxl_serve.tiny_model", "seed": _SEED})
    return out

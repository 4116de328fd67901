"""The GPU half of the benchmark, as far as it can be checked without a GPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.handler
REPO = Path(__file__).resolve().parents[2]


def test_the_architecture_has_sdxl_base_parameter_counts():
    """Built on the meta device (no memory): the counts of the published SDXL base 1.0
    checkpoint, so the script's configuration is the real model's, FLOPs included."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from bench_gpu import CLIP_BIG_G, CLIP_L, SDXL_UNET, SDXL_VAE

    text = dict(vocab_size=49408, max_position_embeddings=77)
    with torch.device("meta"):
        models = {"unet": UNet2DConditionModel(**SDXL_UNET), "vae": AutoencoderKL(**SDXL_VAE),
                  "text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP_L, **text)),
                  "text_encoder_2": CLIPTextModelWithProjection(
                      CLIPTextConfig(**CLIP_BIG_G, **text))}
    counts = {name: sum(p.numel() for p in model.parameters()) for name, model in models.items()}
    assert counts == {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480,
                      "text_encoder_2": 694_659_840}


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the GPU bench "
                    "would run instead of refusing")
def test_without_cuda_the_gpu_bench_refuses_and_says_not_measured():
    done = subprocess.run([sys.executable, "scripts/bench.py", "--gpu"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "NOT MEASURED" in done.stderr and "CUDA" in done.stderr


# The same code path at a tiny size on the CPU: the configuration is swapped, nothing else.
SMALL = {
    "unet": dict(sample_size=32, in_channels=4, out_channels=4, layers_per_block=1,
                 block_out_channels=(32, 64),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 1), attention_head_dim=(2, 4),
                 cross_attention_dim=64, use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=80, norm_num_groups=8),
    "vae": dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                block_out_channels=(32, 64),
                down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
                sample_size=64, force_upcast=True),
    "clip_l": dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                   num_attention_heads=4, projection_dim=32, hidden_act="quick_gelu"),
    "clip_big_g": dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                       num_attention_heads=4, projection_dim=32, hidden_act="gelu"),
}


@pytest.mark.parametrize("variant", ["baseline", "channels_last", "fused_qkv", "vae_fp16",
                                     "compile_default", "int8_dynamic"])
def test_each_variant_serves_a_small_model_on_the_cpu(variant, tiny_model_dir):
    from bench_gpu import run_variant

    result = run_variant(variant, [1, 2], steps=1, repeats=1, size=64, device="cpu",
                         dtype="float32", architecture=SMALL, tiny_model=tiny_model_dir)
    assert set(result["batch"]) == {"1", "2"}
    assert all(point["images_per_s"] > 0 for point in result["batch"].values())

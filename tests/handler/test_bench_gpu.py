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

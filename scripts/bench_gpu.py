#!/usr/bin/env python3
"""The GPU half of the benchmark: full-size SDXL with random fp16 weights, in process.

NOT RUN YET: no machine we had for this work had a GPU; nothing it would print has been
measured. It needs CUDA and stops at once without it.

It builds the SDXL base 1.0 architecture (UNet, both text encoders, VAE) from the published
configuration below with random weights: the same shapes and FLOPs as the real model, noise
for images. Then it serves 1024x1024, 20 steps, guidance 5 requests through
``GenerationService`` in process (validation, one batched pipeline call, PNG encoding,
JSON) and through ``Engine.generate`` alone, at batch 1, 2, 4 and 8, and reports img/s and
p50 latency per optimisation, one at a time, each in a fresh process (so a compiled or fused
model never leaks into the next variant). TorchServe itself is not in this path: the GPU
machine has no Java; TorchServe's overhead is measured on the CPU by ``bench.py``.

Where the architecture values come from: Stability AI's ``configs/inference/sd_xl_base.yaml``
(generative-models): model_channels 320, channel_mult [1, 2, 4], num_res_blocks 2,
attention_resolutions [4, 2], num_head_channels 64, transformer_depth [1, 2, 10],
context_dim 2048, adm_in_channels 2816, time embeddings of 256, VAE ch 128 with ch_mult
[1, 2, 4, 4] and scale factor 0.13025; the text encoders are CLIP ViT-L/14 (width 768,
12 layers, 12 heads) and OpenCLIP ViT-bigG/14 (width 1280, 32 layers, 20 heads; open_clip
model configs), vocabulary 49408, 77 tokens. Written in diffusers' terms as diffusers'
conversion of that checkpoint names them.

Usage:
    python scripts/bench.py --gpu [--variants baseline,compile] [--batch-sizes 1,2,4,8]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# This checkout's code first, not the checkout a shared venv's editable install names.
sys.path[:0] = [str(REPO / "handler"), str(REPO / "jobs"), str(REPO / "scripts")]
from bench_report import publish  # noqa: E402
# Inductor's compiled kernels and FX graphs are kept here, so a second start reuses them.
COMPILE_CACHE = REPO / "build" / "bench" / "inductor-cache"

SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),  # diffusers' name for heads: channels / 64
    cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,  # 1280 pooled text + 6 x 256 time ids
    norm_num_groups=32,
)
SDXL_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=32, sample_size=1024, scaling_factor=0.13025, force_upcast=True,
)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, projection_dim=768, hidden_act="quick_gelu")
CLIP_BIG_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                  num_attention_heads=20, projection_dim=1280, hidden_act="gelu")

VARIANTS = {
    # name: what it changes against the served default (SDPA, fp16, fp32 VAE)
    "baseline": "PyTorch SDPA attention, fp16 UNet and text encoders, fp32 VAE",
    "xformers": "xformers memory-efficient attention instead of SDPA",
    "channels_last": "UNet and VAE in channels_last memory format",
    "fused_qkv": "fused query/key/value projections (diffusers fuse_qkv_projections)",
    "vae_fp16": "VAE in fp16 (needs an fp16-fixed VAE for real weights)",
    "compile_default": "torch.compile(unet) in its default mode (no autotuning), per batch",
    "compile": "torch.compile(unet, max-autotune without CUDA graphs), per batch bucket",
    "cuda_graphs": "torch.compile(unet, max-autotune), which captures CUDA graphs",
    "int8_dynamic": "UNet linear layers int8, activations quantized at run time (torchao)",
    "int8_compile": "int8_dynamic + torch.compile(unet, max-autotune without CUDA graphs)",
    "all": "channels_last + fused_qkv + vae_fp16 + compile with CUDA graphs",
}


def build_engine(variant: str, device: str = "cuda", dtype: str = "float16",
                 architecture: dict | None = None, tiny_model: Path | None = None):
    """The served Engine around a random-weight SDXL with one optimisation.

    ``architecture`` replaces the full-size configuration (keys ``unet``, ``vae``,
    ``clip_l``, ``clip_big_g``): the test builds a small one on the CPU to check this path.
    ``tiny_model``: where the tokenizer comes from (default build/tiny-sdxl, built if
    missing; the test passes its own).
    """
    import torch
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection,
                              CLIPTokenizer)

    from build_model import ensure_tiny_model
    from sdxl_serve.engine import Engine
    from sdxl_serve.settings import Settings

    arch = {"unet": SDXL_UNET, "vae": SDXL_VAE, "clip_l": CLIP_L, "clip_big_g": CLIP_BIG_G,
            **(architecture or {})}
    device = torch.device(device)
    half = getattr(torch, dtype)
    # A tokenizer with no download: the tiny model's byte-level CLIP vocabulary. Prompts are
    # padded to 77 tokens either way, so the text encoders do the same work.
    tokenizer = CLIPTokenizer.from_pretrained((tiny_model or ensure_tiny_model()) / "tokenizer")
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id, vocab_size=49408,
               max_position_embeddings=77)
    torch.manual_seed(0)
    with device:
        unet = UNet2DConditionModel(**arch["unet"]).to(half)
        text_encoder = CLIPTextModel(CLIPTextConfig(**arch["clip_l"], **ids)).to(half)
        text_encoder_2 = CLIPTextModelWithProjection(
            CLIPTextConfig(**arch["clip_big_g"], **ids)).to(half)
        vae_fp16 = variant in ("vae_fp16", "all")
        vae = AutoencoderKL(**arch["vae"]).to(half if vae_fp16 else torch.float32)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012,
                                       beta_schedule="scaled_linear", steps_offset=1,
                                       timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder,
                                     text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                                     tokenizer_2=tokenizer, unet=unet, scheduler=scheduler,
                                     force_zeros_for_empty_prompt=True)
    pipe.set_progress_bar_config(disable=True)
    if variant == "xformers":
        pipe.enable_xformers_memory_efficient_attention()  # fails loudly if not installed
    if variant in ("channels_last", "all"):
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if variant in ("fused_qkv", "all"):
        pipe.fuse_qkv_projections()
    if variant in ("int8_dynamic", "int8_compile"):
        from sdxl_serve.speed import quantize_unet

        quantize_unet(pipe.unet, "int8_dynamic")
    if variant in ("compile_default", "compile", "cuda_graphs", "all", "int8_compile"):
        mode = {"compile_default": "default", "compile": "max-autotune-no-cudagraphs",
                "int8_compile": "max-autotune-no-cudagraphs"}.get(variant, "max-autotune")
        pipe.unet = torch.compile(pipe.unet, mode=mode, fullgraph=True)
    settings = Settings.from_mapping({"device": device.type, "max_batch_images": 8}, env={})
    return Engine(pipe, settings, device)


def run_variant(variant: str, batch_sizes: list[int], steps: int, repeats: int,
                size: int = 1024, **build) -> dict:
    """Measure one variant in this process; returns its numbers."""
    import torch

    from sdxl_serve.contract import parse_request
    from sdxl_serve.service import GenerationService, Incoming

    retries = []
    logging.getLogger("sdxl_serve.engine").addHandler(_Counter(retries))
    started = time.perf_counter()
    engine = build_engine(variant, **build)
    built = time.perf_counter() - started
    service = GenerationService(engine, "random-weights")
    results = {"variant": variant, "what": VARIANTS[variant], "build_s": built, "batch": {}}
    for batch in batch_sizes:
        bodies = [json.dumps({"prompt": "a lighthouse at dawn", "width": size, "height": size,
                              "num_inference_steps": steps, "guidance_scale": 5.0,
                              "seed": i}).encode() for i in range(batch)]
        requests = [parse_request(body, engine.limits) for body in bodies]
        # Warm-up on this shape bucket: compilation, autotuning and graph capture happen
        # here, and are reported, not mixed into the timed calls.
        warm_started = time.perf_counter()
        for _ in range(3 if variant in ("cuda_graphs", "all") else 1):
            engine.generate(requests)
        warm = time.perf_counter() - warm_started
        pipeline, served = [], []
        cuda = torch.cuda.is_available() and engine.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        for _ in range(repeats):
            t = time.perf_counter()
            engine.generate(requests)
            pipeline.append(time.perf_counter() - t)
            t = time.perf_counter()
            replies = service.handle([Incoming(body) for body in bodies])
            served.append(time.perf_counter() - t)
            if any(reply.status != 200 for reply in replies):
                raise RuntimeError(f"{variant}: a reply failed: {replies[0].body[:300]!r}")
        results["batch"][str(batch)] = {
            "warm_up_s": warm,
            "pipeline_p50_s": statistics.median(pipeline),
            "service_p50_s": statistics.median(served),
            "images_per_s": batch / statistics.median(served),
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "service_runs_s": served,
        }
    results["vae_fp32_retries"] = len(retries)
    return results


class _Counter(logging.Handler):
    """Counts the engine's 'fp16 VAE decode overflowed' warnings (random weights may)."""

    def __init__(self, sink: list):
        super().__init__(logging.WARNING)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        if "overflowed" in record.getMessage():
            self.sink.append(record.getMessage())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, from: {', '.join(VARIANTS)}")
    parser.add_argument("--batch-sizes", default="1,2,4,8")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path,
                        help="also write the report here, rewritten after each variant")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child process of one variant
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print(f"bench --gpu needs a CUDA GPU; torch {torch.__version__} sees none here. "
              "The GPU half is NOT MEASURED on this machine.", file=sys.stderr)
        return 2
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    if args.one:
        print(json.dumps(run_variant(args.one, sizes, args.steps, args.repeats)), flush=True)
        return 0
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(COMPILE_CACHE),
               TORCHINDUCTOR_FX_GRAPH_CACHE="1")
    gpu = torch.cuda.get_device_name(0)
    report = {"gpu": gpu, "torch": torch.__version__, "steps": args.steps, "size": 1024,
              "variants": {}}
    print(f"{'variant':<14} " + " ".join(f"{'b' + str(s) + ' img/s':>10}" for s in sizes)
          + f" {'b' + str(sizes[0]) + ' p50 s':>9}  what")
    for variant in variants:
        child = subprocess.run(
            [sys.executable, __file__, "--one", variant, "--batch-sizes", args.batch_sizes,
             "--steps", str(args.steps), "--repeats", str(args.repeats)],
            env=env, capture_output=True, text=True)
        if child.returncode != 0:
            report["variants"][variant] = {"failed": child.stderr.strip().splitlines()[-20:]}
            print(f"{variant:<14} failed: {child.stderr.strip().splitlines()[-1:]}")
        else:
            result = json.loads(child.stdout.strip().splitlines()[-1])
            report["variants"][variant] = result
            batch = result["batch"]
            first = batch[str(sizes[0])]["service_p50_s"]
            print(f"{variant:<14} " + " ".join(f"{batch[str(s)]['images_per_s']:>10.2f}"
                                               for s in sizes)
                  + f" {first:>9.2f}  {result['what']}", flush=True)
        if args.json:  # kept after each variant: a later one may take the machine down
            args.json.write_text(json.dumps(report, indent=2))
    publish(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

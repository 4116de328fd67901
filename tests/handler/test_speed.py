"""The speed switches on the tiny model, for real (docs/speed.md).

Quality guard: with a switch on, a seed gives the image it gives with the switch off, within
the bound below. Compile per shape bucket: the bucket runs compiled, any other shape eager,
nothing recompiles after warm-up, and a recompile that a guard would force is refused and
counted.

The bound: at most 2 of 255 levels on any pixel and 0.1 on average (PSNR above 55 dB), the
bound the suite already uses for one image alone against the same image in a batch. Each
switch computes the same function in another order (fused matmuls, another memory layout,
Inductor's fused kernels): float32 reassociation moves values by about 1e-6, far below one
8-bit level (0.004), so the images agree to rounding. A switch that changed the computation
(a wrong weight, a dropped bias) moves pixels by tens of levels: the check on another seed
below shows the bound tells such images apart.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from sdxl_serve.contract import parse_request
from sdxl_serve.engine import load_engine
from sdxl_serve.settings import Settings

pytestmark = pytest.mark.handler

MAX_LEVELS, MEAN_LEVELS = 2, 0.1
STEPS = 2


def pixels(engine, seed: int, size: int = 32, **fields) -> np.ndarray:
    request = parse_request({"prompt": "a lighthouse", "num_inference_steps": STEPS,
                             "seed": seed, "width": size, "height": size, **fields},
                            engine.limits)
    [result] = engine.generate([request])
    return np.asarray(result.images[0], np.int16)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a - b).astype(np.float64) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255 ** 2 / mse)


def assert_same_image(switched: np.ndarray, reference: np.ndarray, what: str) -> None:
    difference = np.abs(switched - reference)
    print(f"{what}: max {difference.max()} levels, mean {difference.mean():.4f}, "
          f"PSNR {psnr(switched, reference):.1f} dB")
    assert difference.max() <= MAX_LEVELS and difference.mean() <= MEAN_LEVELS, (
        f"{what} changed the image: max {difference.max()}, mean {difference.mean():.3f} "
        f"levels, PSNR {psnr(switched, reference):.1f} dB")


def test_the_bound_tells_another_image_apart(engine):
    # Guards the guard: an image that is not the same one fails it by far.
    with pytest.raises(AssertionError, match="changed the image"):
        assert_same_image(pixels(engine, 8), pixels(engine, 7), "another seed")


@pytest.mark.parametrize("switch", ["fuse_qkv", "channels_last"])
def test_a_switch_keeps_the_image(engine, tiny_model_dir, switch):
    switched = load_engine(tiny_model_dir, Settings.from_mapping(
        {"device": "cpu", switch: True}, env={}))
    if switch == "fuse_qkv":  # the switch took effect: fused projections in the UNet
        attentions = [m for m in switched.pipe.unet.modules() if hasattr(m, "fused_projections")]
        assert attentions and all(m.fused_projections for m in attentions)
        assert {type(p).__name__ for p in switched.pipe.unet.attn_processors.values()} == \
            {"FusedAttnProcessor2_0"}
    else:
        weight = switched.pipe.unet.conv_in.weight
        assert weight.is_contiguous(memory_format=torch.channels_last)
        assert not weight.is_contiguous()
    for seed in (7, 8):
        assert_same_image(pixels(switched, seed), pixels(engine, seed), f"{switch} seed {seed}")


@pytest.fixture(scope="module")
def compiled(tiny_model_dir, compile_cache_dir):
    """One compiled engine for the module: one bucket (32x32, one image, guidance on)."""
    saved = dict(os.environ)  # use_compile_cache points Inductor's variables at the cache
    engine = load_engine(tiny_model_dir, Settings.from_mapping(
        {"device": "cpu", "compile": "default", "compile_batch_sizes": "1",
         "compile_cache_dir": str(compile_cache_dir), "warmup_sizes": "32x32",
         "warmup_steps": STEPS}, env={}))
    engine.warm_up()
    yield engine
    os.environ.clear()
    os.environ.update(saved)


@pytest.mark.timeout(1800)  # the module's compile: minutes when the cache is cold
def test_compile_keeps_the_image_and_runs_the_bucket_compiled(compiled, engine):
    unet = compiled.compiled_unet
    assert unet.sealed and len(unet.buckets) == 1
    before = unet.compiled_calls
    for seed in (7, 8):
        assert_same_image(pixels(compiled, seed), pixels(engine, seed), f"compile seed {seed}")
    assert unet.compiled_calls == before + 2 * STEPS and unet.eager_calls == 0
    assert compiled.speed_gauges()["sdxl_compile_recompilations"] == 0


def test_other_shapes_run_eager_and_never_compile(compiled, engine):
    unet = compiled.compiled_unet
    eager, done = unet.eager_calls, unet.compiled_calls
    # Another size, and the bucket's size without guidance (half the UNet batch).
    assert_same_image(pixels(compiled, 3, size=64), pixels(engine, 3, size=64), "64x64")
    assert_same_image(pixels(compiled, 3, guidance_scale=1.0),
                      pixels(engine, 3, guidance_scale=1.0), "no guidance")
    assert unet.eager_calls == eager + 2 * STEPS and unet.compiled_calls == done
    assert len(unet.buckets) == 1 and unet.recompilations == 0
    assert compiled.speed_gauges() == {"sdxl_compile_recompilations": 0,
                                       "sdxl_compile_eager_calls": unet.eager_calls}


def test_a_recompile_after_warm_up_is_refused_and_counted(compiled, engine):
    """A bucket's exact inputs with grad mode on: dynamo's guard on global state fails, so
    its compiled code would recompile. Refused: the call runs eager and the gauge counts it."""
    unet = compiled.compiled_unet
    calls = []
    hook = compiled.pipe.unet.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append((args, kwargs)), with_kwargs=True)
    try:
        pixels(compiled, 7)  # a bucket call, its inputs kept
    finally:
        hook.remove()
    args, kwargs = calls[0]
    # Copies made outside inference mode (same shapes, strides, dtypes: the same bucket),
    # called with grad mode on, as nothing in serving does.
    args = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    kwargs = {k: {n: t.clone() for n, t in v.items()} if isinstance(v, dict) else
              v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    done, eager = unet.compiled_calls, unet.eager_calls
    output = compiled.pipe.unet(*args, **kwargs)
    assert unet.compiled_calls == done and unet.eager_calls == eager + 1
    assert unet.recompilations == 1
    assert compiled.speed_gauges()["sdxl_compile_recompilations"] == 1
    with torch.no_grad():  # what it returned is the UNet's own output for those inputs
        assert torch.equal(output[0], unet.eager(*args, **kwargs)[0])
    # And the bucket still serves the same image.
    assert_same_image(pixels(compiled, 7), pixels(engine, 7), "compile after a refusal")


# Above this the difference between two images is commonly taken as invisible to the eye
# (JPEG at quality 90 lands about here); a broken quantization (a wrong scale) is far below.
CLOSE_PSNR_DB = 40.0


def test_int8_quantization_is_close_but_not_quality_neutral(engine, tiny_model_dir):
    """int8 dynamic quantization (torchao) rounds every linear layer's weights and inputs to
    8 bits: the image moves beyond the rounding bound (docs/speed.md says so), but stays
    close to the unquantized one."""
    quantized = load_engine(tiny_model_dir, Settings.from_mapping(
        {"device": "cpu", "quantize": "int8_dynamic"}, env={}))
    linear = quantized.pipe.unet.time_embedding.linear_1
    assert type(linear.weight).__name__ == "Int8Tensor"  # torchao's, in place
    for seed in (7, 8):
        switched, reference = pixels(quantized, seed), pixels(engine, seed)
        with pytest.raises(AssertionError, match="changed the image"):
            assert_same_image(switched, reference, f"int8_dynamic seed {seed}")
        assert psnr(switched, reference) >= CLOSE_PSNR_DB

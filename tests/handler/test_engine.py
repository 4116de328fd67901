"""The engine with the tiny SDXL pipeline: sizes, seeds, batching and schedulers, for real."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import pytest
import torch
from PIL import Image

from sdxl_serve.contract import SCHEDULERS, parse_request
from sdxl_serve.service import GenerationService, Incoming

pytestmark = pytest.mark.handler


def request(engine, **fields):
    body = {"prompt": "a lighthouse", "num_inference_steps": 3, **fields}
    return parse_request(json.dumps(body).encode(), engine.limits)


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def close(a, b) -> bool:
    """Batched and single convolutions may sum in another order on a CPU: at most a couple
    of steps of 8-bit rounding apart, never another image."""
    difference = np.abs(pixels(a) - pixels(b))
    return difference.max() <= 2 and difference.mean() < 0.1


def test_limits_come_from_the_model(engine):
    assert (engine.limits.default_size, engine.limits.min_size, engine.limits.max_size) == \
        (64, 32, 128)


def test_generates_the_asked_size(engine):
    [out] = engine.generate([request(engine, width=96, height=48, seed=1)])
    assert out.images[0].size == (96, 48)
    assert pixels(out.images[0]).std() > 0  # not a blank image


def test_same_seed_same_image_other_seed_other_image(engine):
    first = engine.generate([request(engine, seed=7)])[0].images[0]
    again = engine.generate([request(engine, seed=7)])[0].images[0]
    other = engine.generate([request(engine, seed=8)])[0].images[0]
    assert first.tobytes() == again.tobytes()
    assert first.tobytes() != other.tobytes()


def test_compatible_requests_share_one_call_and_match_single_images(engine):
    requests = [request(engine, seed=seed, prompt=f"prompt {seed}") for seed in (11, 12, 13)]
    alone = [engine.generate([r])[0].images[0] for r in requests]
    calls = engine.pipeline_calls
    service = GenerationService(engine)
    replies = service.handle([Incoming(json.dumps({"prompt": r.prompt, "seed": r.seed,
                                                   "num_inference_steps": 3}).encode())
                              for r in requests])
    assert engine.pipeline_calls - calls == 1  # three requests, one pipeline call
    for reply, single in zip(replies, alone):
        batched = Image.open(io.BytesIO(base64.b64decode(reply.json()["image"])))
        assert close(batched, single)


def test_a_negative_prompt_beside_does_not_change_an_image(engine):
    # Alone, a request without a negative prompt gets SDXL's zero embeddings; in a call
    # where another has one, its "" would be encoded as text (21 levels apart, measured).
    plain = request(engine, seed=7, prompt="a red fox")
    [alone] = engine.generate([plain])
    calls = engine.pipeline_calls
    replies = GenerationService(engine).handle([
        Incoming(json.dumps({"prompt": "a red fox", "seed": 7,
                             "num_inference_steps": 3}).encode()),
        Incoming(json.dumps({"prompt": "a blue bird", "seed": 9, "negative_prompt": "blurry",
                             "num_inference_steps": 3}).encode())])
    assert engine.pipeline_calls - calls == 2
    beside = Image.open(io.BytesIO(base64.b64decode(replies[0].json()["image"])))
    assert close(beside, alone.images[0])


def test_a_prompt_past_clips_77_tokens_is_not_logged(engine):
    # diffusers warns with the words it cut off; prompts never reach the logs.
    import logging

    seen: list[logging.LogRecord] = []
    catcher = logging.Handler()
    catcher.emit = seen.append
    pipeline_log = logging.getLogger(type(engine.pipe).__module__)
    pipeline_log.addHandler(catcher)
    try:
        engine.generate([request(engine, seed=1, num_inference_steps=1,
                                 prompt=" ".join(["topsecretword"] * 120),
                                 negative_prompt=" ".join(["hiddenword"] * 120))])
    finally:
        pipeline_log.removeHandler(catcher)
    messages = [record.getMessage() for record in seen]
    assert any("77 tokens" in message for message in messages)
    assert not any("topsecret" in m or "hiddenword" in m for m in messages)


def test_num_images_gives_one_seed_per_image(engine):
    [out] = engine.generate([request(engine, seed=5, num_images=3)])
    assert len(out.images) == 3
    [fourth] = engine.generate([request(engine, seed=6)])
    assert close(out.images[1], fourth.images[0])
    assert not close(out.images[0], out.images[1])


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_every_scheduler_generates(engine, scheduler):
    [out] = engine.generate([request(engine, seed=3, scheduler=scheduler)])
    # A scheduler that produced NaN latents decodes to a flat (black) image: uint8 pixels
    # cannot hold NaN, so the check is that the image is not flat.
    assert pixels(out.images[0]).std() >= 1.0


def test_each_scheduler_is_the_one_asked_for(engine):
    """The same seed under each scheduler: four different images, each made by the class
    of its name (the field was ignored and every image was Euler's, unnoticed)."""
    from sdxl_serve.engine import _SCHEDULER_CLASSES

    made = {}
    for scheduler in SCHEDULERS:
        [out] = engine.generate([request(engine, seed=3, scheduler=scheduler)])
        assert type(engine.pipe.scheduler).__name__ == _SCHEDULER_CLASSES[scheduler]
        made[scheduler] = out.images[0].tobytes()
    assert len(set(made.values())) == len(SCHEDULERS), "two schedulers made the same image"


# The diffusers class of each `scheduler` name, as docs/api.md tells a user who calls
# diffusers alone: written out here, not read from the engine, so a wrong mapping fails.
DIFFUSERS_SCHEDULERS = {"euler": "EulerDiscreteScheduler",
                        "euler_ancestral": "EulerAncestralDiscreteScheduler",
                        "dpmpp_2m": "DPMSolverMultistepScheduler", "ddim": "DDIMScheduler"}


@pytest.fixture(scope="module")
def diffusers_alone(tiny_model_dir):
    """The tiny model in diffusers' own pipeline, called as a user would, without us."""
    import diffusers

    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(str(tiny_model_dir),
                                                               use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe, pipe.scheduler.config


@pytest.mark.parametrize("fields", [
    {}, {"negative_prompt": "fog"}, {"guidance_scale": 1.0},
    {"guidance_scale": 9.5, "num_inference_steps": 4}, {"width": 96, "height": 48},
    {"num_images": 3}, *({"scheduler": name} for name in SCHEDULERS)], ids=str)
def test_each_field_makes_the_image_diffusers_makes_alone(engine, diffusers_alone, fields):
    """Every field reaches the pipeline as docs/api.md says to pass it to diffusers: the
    same bytes for one image, the same images within rounding for several (a field dropped
    or mapped wrongly on the way gave another image)."""
    import diffusers
    import torch

    pipe, scheduler_config = diffusers_alone
    asked = request(engine, seed=21, **fields)
    [ours] = engine.generate([asked])

    def theirs(negative_prompt):
        pipe.scheduler = getattr(diffusers, DIFFUSERS_SCHEDULERS[asked.scheduler]).from_config(
            scheduler_config)
        return pipe(prompt=asked.prompt, negative_prompt=negative_prompt,
                    num_inference_steps=asked.num_inference_steps,
                    guidance_scale=asked.guidance_scale, width=asked.width,
                    height=asked.height, num_images_per_prompt=asked.num_images,
                    generator=[torch.Generator("cpu").manual_seed(s) for s in asked.seeds]
                    ).images

    made = theirs(asked.negative_prompt or None)
    if asked.num_images == 1:
        assert ours.images[0].tobytes() == made[0].tobytes()
    else:  # we encode the prompt once per image, diffusers once and repeats it
        assert len(made) == len(ours.images)
        assert all(close(a, b) for a, b in zip(ours.images, made))
    if not asked.negative_prompt and asked.guidance_scale > 1:
        # The docs' warning holds: diffusers encodes "" as text, another image.
        assert theirs("")[0].tobytes() != ours.images[0].tobytes()


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_a_mixed_batch_gives_each_image_the_one_it_gets_alone(engine, scheduler):
    """Requests of every field the batcher groups by, under each scheduler (an ancestral
    one draws noise at every step, from each image's own generator): each image within the
    rounding bound of its request alone, whatever shares its calls. PNG, which keeps the
    pixels: a lossy format moves them further (docs/api.md)."""
    bodies = [{"prompt": "a fox", "seed": 10}, {"prompt": "a cat", "seed": 20, "num_images": 2},
              {"prompt": "a dog", "seed": 30, "negative_prompt": "blur"},
              {"prompt": "a dog", "seed": 40, "negative_prompt": "fog", "num_images": 2},
              {"prompt": "a hill", "seed": 50, "guidance_scale": 1.0},
              {"prompt": "a hill", "seed": 60, "stream": True}]
    bodies = [{**body, "scheduler": scheduler, "num_inference_steps": 3} for body in bodies]
    service = GenerationService(engine)
    calls = engine.pipeline_calls
    batched = service.handle([Incoming(json.dumps(body).encode()) for body in bodies])
    assert engine.pipeline_calls - calls == 3  # guided, guided with negatives, unguided
    for body, reply in zip(bodies, batched):
        [alone] = service.handle([Incoming(json.dumps(body).encode())])
        got, single = (reply.json().get("images") or [reply.json()["image"]] for reply in
                       (reply, alone))
        assert len(got) == body.get("num_images", 1)
        for image, other in zip(got, single):
            assert close(*(Image.open(io.BytesIO(base64.b64decode(data)))
                           for data in (image, other))), body


def test_a_request_of_several_images_batched_with_another_gets_its_own(engine):
    """A request of 2 images before one of 1 in one pipeline call: each gets its own
    images, in its seeds' order (a wrong offset gave the second request the first's
    second image)."""
    several = request(engine, seed=5, num_images=2)
    other = request(engine, seed=20, prompt="a harbour at night")
    calls = engine.pipeline_calls
    results = engine.generate([several, other])
    assert engine.pipeline_calls == calls + 1
    assert [len(result.images) for result in results] == [2, 1]
    assert close(results[1].images[0], engine.generate([other])[0].images[0])
    for index, seed in enumerate((5, 6)):
        alone = engine.generate([request(engine, seed=seed)])[0].images[0]
        assert close(results[0].images[index], alone), seed


def test_guidance_off_and_negative_prompts_run(engine):
    [off] = engine.generate([request(engine, seed=3, guidance_scale=1.0)])
    [neg] = engine.generate([request(engine, seed=3, negative_prompt="blurry")])
    assert off.images[0].tobytes() != neg.images[0].tobytes()


def test_progress_reaches_every_step(engine):
    steps = []
    engine.generate([request(engine, seed=3, num_inference_steps=4)],
                    on_step=lambda step, total: steps.append((step, total)))
    assert steps == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_no_signature_is_computed_per_denoising_step(engine, monkeypatch):
    """diffusers' attention asks for its processor's signature at every call; the engine
    keeps it computed (``keep_attention_signatures``), so what a generation computes does
    not grow with its steps (the scheduler's, once per call, stay)."""
    import inspect

    computed = []
    from_function = inspect._signature_from_function
    monkeypatch.setattr(inspect, "_signature_from_function",
                        lambda *args, **kwargs: computed.append(args) or
                        from_function(*args, **kwargs))
    counts = {}
    for steps in (2, 6):
        computed.clear()
        engine.generate([request(engine, num_inference_steps=steps)])
        counts[steps] = len(computed)
    assert counts[2] == counts[6], counts


def test_a_generation_does_not_search_the_modules_for_its_device(engine, monkeypatch):
    """diffusers finds a pipeline call's device by looking for offload hooks in every module
    of every component (2.4 ms a call on the tiny model, 11 ms on SDXL); the engine keeps
    the answer it found at its start (``keep_execution_device``): the same device, the same
    class name, no search per generation."""
    import diffusers

    searched = []
    search = diffusers.DiffusionPipeline._execution_device.fget
    monkeypatch.setattr(diffusers.DiffusionPipeline, "_execution_device",
                        property(lambda pipe: searched.append(pipe) or search(pipe)))
    engine.generate([request(engine)])
    assert searched == []
    assert engine.pipe._execution_device == engine.device == torch.device("cpu")
    assert isinstance(engine.pipe, diffusers.StableDiffusionXLPipeline)
    assert (type(engine.pipe).__module__, type(engine.pipe).__name__) == (
        diffusers.StableDiffusionXLPipeline.__module__, "StableDiffusionXLPipeline")
    # A pipeline made from its class without a kept device finds its own.
    assert type(engine.pipe)(**engine.pipe.components)._execution_device == engine.device


def test_warm_up_generates_each_configured_size(tiny_model_dir):
    from sdxl_serve.engine import load_engine
    from sdxl_serve.settings import Settings

    engine = load_engine(tiny_model_dir, Settings.from_mapping(
        {"device": "cpu", "warmup_sizes": "64x64,96x32"}, env={}))
    engine.warm_up()
    assert engine.pipeline_calls == 2


def test_a_warmup_size_outside_the_models_bounds_fails_the_start_naming_the_setting(
        tiny_model_dir):
    """The tiny model's sizes are 32 to 128: its start failed on `width` ... got 256, a
    request's error that named no setting."""
    from sdxl_serve.engine import load_engine
    from sdxl_serve.settings import Settings, SettingsError

    engine = load_engine(tiny_model_dir, Settings.from_mapping(
        {"device": "cpu", "warmup_sizes": "64x64,256x64"}, env={}))
    with pytest.raises(SettingsError) as caught:
        engine.warm_up()
    assert str(caught.value) == (
        "setting warmup_sizes holds 256x64, which this model cannot generate: "
        "`width` must be a multiple of 8 from 32 to 128, got 256")


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(alphabet=st.characters(codec=None, categories=None), min_size=1, max_size=300))
def test_any_prompt_the_contract_accepts_generates(engine, prompt):
    """Whatever text passes validation must not crash the tokenizers or the pipeline."""
    from sdxl_serve.contract import RequestError

    try:
        accepted = request(engine, prompt=prompt, negative_prompt=prompt[::-1],
                           num_inference_steps=1, seed=0)
    except RequestError:
        return
    [out] = engine.generate([accepted])
    assert out.images[0].size == (64, 64)


def test_a_refused_field_name_is_logged_on_one_line(engine, caplog):
    from sdxl_serve.service import GenerationService, Incoming

    forged = "x\n2026-11-30 12:00:00 INFO forged line"
    with caplog.at_level("INFO", logger="sdxl_serve.service"):
        [reply] = GenerationService(engine).handle(
            [Incoming(json.dumps({"prompt": "x", forged: 1}).encode(), "r1")])
    assert reply.status == 400 and reply.json()["field"] == forged
    lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert lines and all("\n" not in line for line in lines)


def test_a_refusal_logs_no_name_the_client_chose(engine, caplog):
    """A field name the client chose is its own text: a prompt sent as a key, a URL query
    parameter's name. The 400 gives it back; the INFO log line names only the request and
    the contract's own fields (it logged the client's name, up to 60 characters)."""
    from sdxl_serve.service import GenerationService, Incoming

    canary = "canary prompt 7f3a about a red fox"
    items = [Incoming(json.dumps({"prompt": "x", canary: 1}).encode(), "unknown-key"),
             Incoming(json.dumps({"prompt": "x"})[:-1].encode() +
                      f', "{canary}": 1, "{canary}": 2}}'.encode(), "repeated-key"),
             Incoming(json.dumps({"prompt": "x"}).encode(), "query-name",
                      outside_body=(canary,)),
             Incoming(json.dumps({"prompt": canary, "width": 1001}).encode(), "known")]
    with caplog.at_level("INFO", logger="sdxl_serve.service"):
        replies = GenerationService(engine).handle(items)
    assert [r.status for r in replies] == [400] * 4
    assert all(canary in r.json()["field"] for r in replies[:3])  # the client's, given back
    refusals = {r.getMessage() for r in caplog.records if "refused" in r.getMessage()}
    assert refusals == {"request unknown-key refused: an unknown field (its name is not "
                        "logged)",
                        "request repeated-key refused: an unknown field (its name is not "
                        "logged)",
                        "request query-name refused: an unknown field (its name is not "
                        "logged)",
                        "request known refused: field 'width'"}
    assert "canary" not in caplog.text


def _latents(engine, count: int, seed: int = 0):
    import torch

    generator = torch.Generator("cpu").manual_seed(seed)
    side = engine.limits.default_size // engine.pipe.vae_scale_factor
    return torch.randn(count, 4, side, side, generator=generator)


def test_a_batch_is_decoded_in_one_vae_call_with_the_images_of_one_by_one(engine):
    """One VAE call for the batch's latents gives each image within the rounding bound of
    decoding it alone (the convolutions may sum in another order)."""
    import torch

    latents = _latents(engine, 3)
    calls = []
    decode = engine.pipe.vae.decode
    engine.pipe.vae.decode = lambda *a, **k: calls.append(a[0].shape[0]) or decode(*a, **k)
    try:
        with torch.inference_mode():  # as in Engine.generate
            together = engine._decode(latents)
            assert calls == [3]
            alone = [engine._decode(latents[i:i + 1])[0] for i in range(3)]
    finally:
        engine.pipe.vae.decode = decode
    assert len(together) == 3
    for batched, single in zip(together, alone):
        assert close(batched, single)


def test_an_fp16_overflow_redoes_only_that_image_in_fp32(engine, caplog):
    """The NaN guard stays per image: a latent scaled until its fp16 decode overflows is
    decoded again in fp32 and comes back finite; its neighbour keeps its fp16 decode."""
    import torch

    latents = _latents(engine, 2, seed=1)
    latents[1] *= 1e4  # beyond fp16's range inside the VAE
    vae = engine.pipe.vae
    vae.to(torch.float16)
    try:
        with torch.inference_mode():
            fp16_batch = engine._vae_decode(vae, latents, torch.float16)
            overflowed = engine._vae_decode(vae, latents[1:], torch.float16)
            assert not torch.isfinite(overflowed).all()
            with caplog.at_level("WARNING", logger="sdxl_serve.engine"):
                images = engine._decode_checked(latents)
    finally:
        vae.to(torch.float32)
    assert "overflowed for 1 of 2 image(s)" in caplog.text
    assert images.dtype == torch.float32 and torch.isfinite(images).all()
    assert torch.equal(images[0], fp16_batch[0].float())  # kept, not decoded again
    with torch.inference_mode():  # and the one redone is its own latent's, in fp32
        redone = engine._vae_decode(vae, latents[1:], torch.float32)[0]
    assert torch.allclose(images[1], redone, atol=1e-4)


def test_a_batch_decode_out_of_memory_falls_back_to_one_image_at_a_time(engine, caplog):
    """The denoising is kept: only the VAE call is split. The VAE here raises CUDA's own
    out-of-memory error for more than one latent at once, as a GPU short of memory would."""
    import torch

    latents = _latents(engine, 3, seed=2)
    decode = engine.pipe.vae.decode
    calls = []

    def short_of_memory(latent, *args, **kwargs):
        calls.append(latent.shape[0])
        if latent.shape[0] > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (raised by the test)")
        return decode(latent, *args, **kwargs)

    engine.pipe.vae.decode = short_of_memory
    try:
        with torch.inference_mode(), caplog.at_level("WARNING", logger="sdxl_serve.engine"):
            images = engine._decode(latents)
    finally:
        engine.pipe.vae.decode = decode
    assert calls == [3, 1, 1, 1]
    assert "decoding them one by one" in caplog.text
    with torch.inference_mode():
        alone = [engine._decode(latents[i:i + 1])[0] for i in range(3)]
    assert [image.tobytes() for image in images] == [image.tobytes() for image in alone]

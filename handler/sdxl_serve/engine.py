"""Load an SDXL pipeline and generate images from validated requests.

This module knows diffusers and torch, not TorchServe. One ``Engine`` belongs to one engine
process (engine_process.py) and is called from one thread: a diffusers pipeline is not safe
to call from two threads at once (the scheduler holds state).

Example:
    from sdxl_serve.settings import Settings
    engine = load_engine("build/tiny-sdxl", Settings(device="cpu"))
    engine.warm_up()
"""

from __future__ import annotations

import functools
import inspect
import json
import re
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from sdxl_serve.contract import GenerationRequest, ModelLimits, RequestError, parse_request
from sdxl_serve.model_files import ModelFilesError, check_model_files
from sdxl_serve.settings import Settings, SettingsError
from sdxl_serve.speed import BucketedUNet, apply_speed_settings

log = logging.getLogger(__name__)

# Components whose weights must be safetensors. A pickle (.bin, .ckpt, .pt) can run code
# when it is loaded: a model directory is input we do not fully trust.
WEIGHT_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
# Components of configuration and vocabulary only. Without one, diffusers may still "load"
# (a missing tokenizer_2 became an empty 2-token tokenizer) and fail at warm-up with a
# message that names nothing ("int too big to convert").
CONFIG_COMPONENTS = ("tokenizer", "tokenizer_2", "scheduler")
# Weight files of the fp16 variant, whole or sharded, and a sharded variant's index.
FP16_FILE = re.compile(r".*\.fp16(-\d+-of-\d+)?\.safetensors|.*\.safetensors\.index\.fp16\.json")
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")

_SCHEDULER_CLASSES = {
    "euler": "EulerDiscreteScheduler",
    "euler_ancestral": "EulerAncestralDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "ddim": "DDIMScheduler",
}

StepCallback = Callable[[int, int], None]
"""Called after each denoising step with (step, total)."""

# Out of GPU memory, as CUDA's libraries say it in a plain RuntimeError: torch's own
# OutOfMemoryError covers only its caching allocator, while cuBLAS creating a handle or a
# workspace (CUBLAS_STATUS_ALLOC_FAILED), cuDNN, and a raw cudaMalloc ("CUDA error: out of
# memory") fail beside it. None of them leaves the CUDA context unusable: like the
# allocator's, they are answered by a smaller call, not by a new engine process.
_OUT_OF_MEMORY_TEXTS = ("CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED",
                        "CUDA error: out of memory")
# What injected sticky CUDA errors say (fault_cuda_error_prompt): CUDA's own words.
_ILLEGAL_ACCESS = "CUDA error: an illegal memory access was encountered"


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says the GPU ran out of memory, whichever library ran out.

        >>> out_of_memory(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when "
        ...                            "calling `cublasCreate(handle)`"))
        True
        >>> out_of_memory(RuntimeError(_ILLEGAL_ACCESS))
        False
    """
    return isinstance(exc, torch.cuda.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and any(text in str(exc) for text in _OUT_OF_MEMORY_TEXTS))


class ModelLoadError(RuntimeError):
    """The model directory cannot be served; the message says why and what to do."""


class NonFiniteImage(RuntimeError):
    """A pipeline call decoded images with NaN or infinite pixels (after the fp32 redo of an
    fp16 decode): the UNet or the weights went bad, or the GPU did. Sent, they were black
    images with a 200, and that 200 told the circuit breaker the engine was healthy."""

    kind = "NonFiniteImage"
    """The error's ``type`` in the JSON body."""

    def __init__(self, bad: int, total: int):
        super().__init__(f"{bad} of {total} decoded image(s) hold NaN or infinite pixels")
        self.for_client = ("the pipeline produced NaN or infinite pixels for this request "
                           "(a fault of the GPU or the weights, not of the request), so no "
                           "image was sent")


@dataclass(frozen=True)
class GeneratedImages:
    """The images of one request, in the order of ``request.seeds``."""

    request: GenerationRequest
    images: list  # PIL images
    seconds: dict[str, float]  # time per stage for the pipeline call that made them


def check_model_dir(model_dir: str | Path) -> None:
    """Refuse a model directory unless it is a text-to-image SDXL whose every weight
    component is stored as safetensors.

    Raises:
        ModelLoadError: naming the component and what to do about it.
    """
    root = Path(model_dir)
    if not root.is_dir():
        raise ModelLoadError(f"{root} is not a directory (a model directory holds "
                             "model_index.json and a folder per component)")
    if (root / "snapshots").is_dir() and not (root / "model_index.json").exists():
        raise ModelLoadError(f"{root} is a model hub cache folder: serve one of its "
                             "snapshots/<revision>/ folders")
    if not (root / "model_index.json").is_file():
        raise ModelLoadError(
            f"{root} is not a diffusers model directory (no model_index.json). Build the "
            "embedded model with `make model`, or download SDXL with scripts/fetch_sdxl.py.")
    # Every folder missing and every folder of pickles named at once: one at a time, a
    # model put together by hand took a build per folder to find them all.
    missing = [name for name in WEIGHT_COMPONENTS if not (root / name).is_dir()] + \
        [name for name in CONFIG_COMPONENTS if not (root / name).is_dir()
         or not any(p.is_file() for p in (root / name).iterdir())]
    if missing:
        raise ModelLoadError(
            f"{root} has no {', '.join(name + '/' for name in missing)} folder"
            f"{'s' if len(missing) > 1 else ''} with files; an SDXL pipeline needs "
            f"{', '.join(WEIGHT_COMPONENTS)} and, beside its weights, "
            f"{', '.join(CONFIG_COMPONENTS)}")
    pickled, empty = [], []
    for component in WEIGHT_COMPONENTS:
        files = [p.name for p in (root / component).iterdir() if p.is_file()]
        if any(name.endswith(".safetensors") for name in files):
            continue
        pickles = sorted(name for name in files if name.endswith(PICKLE_SUFFIXES))
        if pickles:
            pickled += [f"{component}/{name}" for name in pickles]
        else:
            empty.append(f"{component}/")
    if pickled:
        raise ModelLoadError(
            f"{root} holds only pickle weights in {', '.join(pickled)}. We load "
            "safetensors only, because unpickling can run arbitrary code. Convert them "
            "(load with diffusers and save_pretrained(..., safe_serialization=True)) or "
            "download the safetensors files of the model.")
    if empty:
        raise ModelLoadError(f"{root} has no .safetensors weights in {', '.join(empty)}")
    # SDXL inpainting has every component of the base model, but its UNet takes the
    # masked image too (9 channels): loaded as text to image, it failed only in warm-up,
    # with "The size of tensor a (9) must match the size of tensor b (4)".
    unet_in = _config_value(root / "unet", "in_channels")
    latents = _config_value(root / "vae", "latent_channels")
    if unet_in is not None and latents is not None and unet_in != latents:
        raise ModelLoadError(
            f"{root} is not a text-to-image SDXL: its UNet takes {unet_in} input channels, "
            f"and its VAE makes {latents}-channel latents (an inpainting model takes the "
            "masked image too). Serve SDXL base 1.0 or a fine-tune of it.")


def weights_variant(model_dir: str | Path, half: bool) -> str | None:
    """``"fp16"`` to load the fp16 files (whole or sharded) where a component has them, or
    None for the full-precision ones. fp16 when they suit the dtype (``half``), or when
    some component has nothing else (fetch_sdxl.py downloads only those): diffusers then
    takes the full-precision files of a component without fp16 ones, never the reverse.
    """
    has_fp16 = False
    for component in WEIGHT_COMPONENTS:
        names = [p.name for p in Path(model_dir, component).iterdir()
                 if p.name.endswith((".safetensors", ".json"))]
        fp16 = [n for n in names if FP16_FILE.fullmatch(n)]
        full = [n for n in names if n.endswith(".safetensors") and not FP16_FILE.fullmatch(n)
                and ".fp16" not in n]
        has_fp16 = has_fp16 or bool(fp16)
        if fp16 and not full:
            return "fp16"
    return "fp16" if has_fp16 and half else None


def _config_value(folder: Path, key: str):
    """``key`` of a component's config.json; None when the file or the key is missing
    (diffusers then fails on its own, naming the file)."""
    try:
        return json.loads((folder / "config.json").read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        return None


def choose_device(settings: Settings, gpu_id: int | None = None) -> torch.device:
    """CUDA when asked or available (``auto``), on the GPU TorchServe assigned; else CPU."""
    if settings.device == "cpu" or (settings.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        # A CPU build of torch and a GPU hidden from this process call for different fixes.
        raise ModelLoadError(
            f"setting device=cuda, but torch sees no CUDA device (torch {torch.__version__} "
            f"built for CUDA {torch.version.cuda or 'none'}, CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')}): device: auto or cpu "
            f"(SDXL_DEVICE) serves on the CPU; on a GPU machine, give this process its GPU "
            f"(the driver, a CUDA build of torch, the pod's nvidia.com/gpu limit)")
    return torch.device("cuda", gpu_id or 0)


def choose_dtype(settings: Settings, device: torch.device) -> torch.dtype:
    """fp16 on CUDA, fp32 on CPU (CPU half precision is slow and poorly supported)."""
    if settings.dtype != "auto":
        return getattr(torch, settings.dtype)
    return torch.float16 if device.type == "cuda" else torch.float32


def model_limits(pipe, settings: Settings) -> ModelLimits:
    """Read the size bounds off the model: its native size, and half to twice that."""
    native = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
    default_scheduler = next(
        (name for name, cls in _SCHEDULER_CLASSES.items()
         if type(pipe.scheduler).__name__ == cls), "euler")
    return ModelLimits(
        default_size=native,
        min_size=max(8, native // 2),
        max_size=native * 2,
        max_num_images=settings.max_num_images,
        max_request_cost=settings.max_request_cost,
        default_steps=settings.default_steps,
        default_guidance_scale=settings.default_guidance_scale,
        default_scheduler=default_scheduler,
    )


class PromptTextFilter(logging.Filter):
    """Keeps prompt text out of diffusers' warning about a prompt longer than CLIP's 77
    tokens: the warning quotes the part cut off. Prompts never reach our logs (docs/api.md),
    so the record keeps its news and loses the text."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "was truncated because CLIP" in str(record.msg):
            record.msg = "a prompt longer than CLIP's 77 tokens was cut to them (text not logged)"
            record.args = ()
        return True


PROMPT_TEXT_FILTER = PromptTextFilter()


def load_engine(model_dir: str | Path, settings: Settings, gpu_id: int | None = None
                ) -> "Engine":
    """Load the SDXL pipeline from a local directory, safetensors only."""
    import diffusers

    # 1. Check the files before any of them is opened: safetensors only, and each one as
    # its manifest recorded it (model_files.py), so a corrupt or swapped file never loads.
    check_model_dir(model_dir)
    for directory in filter(None, (model_dir, settings.vae_dir)):
        try:
            check_model_files(directory, settings.model_file_check)
        except ModelFilesError as exc:
            raise ModelLoadError(str(exc)) from None
    # 2. Choose where and in which precision it runs.
    device = choose_device(settings, gpu_id)
    dtype = choose_dtype(settings, device)
    variant = weights_variant(model_dir, dtype == torch.float16)
    started = time.perf_counter()
    # 3. Load, never falling back to pickles. `low_cpu_mem_usage` is what diffusers does
    # without `accelerate` anyway, said so that it does not warn (a WARN line in the model
    # log at every engine start): measured with diffusers 0.42, the full-size UNet's 5 GB
    # of fp16 weights load in 0.4 s and 0.4 GB of resident memory with `accelerate` or without.
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(
        str(model_dir), dtype=dtype, use_safetensors=True, variant=variant,
        low_cpu_mem_usage=False)
    # A logger's filter sees the records made by that logger: the pipeline module's.
    logging.getLogger(type(pipe).__module__).addFilter(PROMPT_TEXT_FILTER)
    # 4. An fp16-safe VAE: the SDXL VAE overflows to NaN (black images) in fp16.
    if settings.vae_dir:
        vae = diffusers.AutoencoderKL.from_pretrained(
            settings.vae_dir, dtype=dtype, use_safetensors=True, low_cpu_mem_usage=False)
        pipe.vae = vae
        pipe.register_modules(vae=vae)
    elif dtype == torch.float16 and pipe.vae.config.force_upcast:
        # Keep the VAE in fp32 for good instead of diffusers' upcast on every call.
        pipe.vae.to(torch.float32)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    # 5. Attention: PyTorch SDPA is diffusers' default; xformers only where asked and usable.
    if settings.attention == "xformers":
        _enable_xformers(pipe, device)
    # 6. The speed switches (docs/speed.md), each off by default; compile happens in warm-up.
    unet = apply_speed_settings(pipe, settings)
    log.info("loaded %s on %s as %s in %.1f s (compile %s, fuse_qkv %s, channels_last %s, "
             "quantize %s)", Path(model_dir).name, device, dtype,
             time.perf_counter() - started, settings.compile, settings.fuse_qkv,
             settings.channels_last, settings.quantize)
    return Engine(pipe, settings, device, unet)


def keep_attention_signatures(pipe) -> None:
    """Compute once the signature diffusers computes at every attention call.

    ``Attention.forward`` asks ``inspect.signature`` for its processor's ``__call__`` on each
    call, to drop keyword arguments the processor does not take: about 0.03 ms each on our
    CPUs, 103 calls in a light request of the tiny model (measured: 3.6 ms of its 160 ms)
    and some 2,800 in a 20-step SDXL image, all on the thread that launches the GPU's
    kernels. A function's signature never changes, and ``inspect.signature`` returns a
    function's ``__signature__`` as it is (for a bound method it still drops ``self``, as
    before), so each processor class's ``__call__`` keeps its own.
    """
    from diffusers.models.attention_processor import Attention

    for component in pipe.components.values():
        if not isinstance(component, torch.nn.Module):
            continue
        for module in component.modules():
            if isinstance(module, Attention):
                call = type(module.processor).__call__
                if inspect.isfunction(call) and "__signature__" not in vars(call):
                    call.__signature__ = inspect.signature(call)


def keep_execution_device(pipe) -> None:
    """Answer diffusers' execution device as it was found once, at the engine's start.

    Each pipeline call asks ``_execution_device`` where to make its latents and embeddings,
    and diffusers finds out by looking for offload hooks in every module of every component
    (group offloading's, then accelerate's) and reading the pipeline's ``__init__``
    signature: measured 2.4 ms a call on the tiny model (716 modules) and 11 ms on
    full-size SDXL's 2,717 modules, before the GPU gets its first kernel. An engine never
    offloads, nor moves its pipeline after loading it, so the answer cannot change. The
    property is on the class, so the pipeline becomes an instance of a subclass that reads
    the kept answer, with the same name and module (which loggers and saved configs go by);
    a pipeline made from that class without one (``from_pipe``) finds its own as before.
    Unlike the original class, it cannot be pickled, which nothing does (an engine process
    sends requests and images).
    """
    device = pipe._execution_device
    pipe.__class__ = _with_kept_execution_device(type(pipe))
    pipe.kept_execution_device = device


@functools.cache
def _with_kept_execution_device(cls: type) -> type:
    if cls.__dict__.get("keeps_execution_device"):
        return cls  # an engine made again over the same pipeline (the tests do)
    found = cls._execution_device.fget

    def execution_device(pipe):
        kept = pipe.__dict__.get("kept_execution_device")
        return found(pipe) if kept is None else kept

    return type(cls.__name__, (cls,), {
        "__module__": cls.__module__, "__qualname__": cls.__qualname__, "__doc__": cls.__doc__,
        "keeps_execution_device": True, "_execution_device": property(execution_device)})


def _enable_xformers(pipe, device: torch.device) -> None:
    try:
        import xformers  # noqa: F401
    except ImportError:
        log.warning("attention=xformers asked for, but xformers is not installed: using SDPA")
        return
    if device.type != "cuda":
        log.warning("attention=xformers needs CUDA: using SDPA on %s", device)
        return
    pipe.enable_xformers_memory_efficient_attention()


class Engine:
    """A loaded pipeline and what it allows; generates compatible requests in one call."""

    def __init__(self, pipe, settings: Settings, device: torch.device,
                 compiled_unet: BucketedUNet | None = None):
        import diffusers

        self.pipe = pipe
        # After every switch that sets attention processors (xformers, fuse_qkv).
        keep_attention_signatures(pipe)
        keep_execution_device(pipe)
        self.compiled_unet = compiled_unet
        """The UNet's compiled shape buckets when compile is on (``speed``), else None."""
        self.settings = settings
        self.device = device
        self.limits = model_limits(pipe, settings)
        own = type(pipe.scheduler).__name__
        if own not in _SCHEDULER_CLASSES.values():
            # A fine-tune made for another scheduler (LCM, UniPC): each name keeps its own
            # class, so a request for `euler` gets Euler, not the model's scheduler.
            log.warning("the model's scheduler %s is not one we serve (%s): requests without "
                        "a `scheduler` get euler", own, ", ".join(_SCHEDULER_CLASSES))
        self.schedulers = {
            name: pipe.scheduler if cls == own else
            getattr(diffusers, cls).from_config(pipe.scheduler.config)
            for name, cls in _SCHEDULER_CLASSES.items()
        }
        self.pipeline_calls = 0
        self.cuda_error = ""
        """The injected sticky CUDA error (``fault_cuda_error_prompt``) once raised: every
        later call raises it again."""
        self.profile_next = None
        """A ``profiling.TraceStore`` that the next pipeline call records into, once."""

    def warm_up(self) -> float:
        """Generate once at each warm-up size so the first user does not pay for it.

        With compile on, once per shape bucket instead: each warm-up size with each image
        count of ``compile_batch_sizes`` in one pipeline call (compiled now, from the cache
        when it has them), then the buckets are sealed: no shape compiles after this.
        """
        started = time.perf_counter()
        sizes = self.settings.warmup_sizes or ((self.limits.default_size,) * 2,)
        counts = self.settings.compile_batch_sizes if self.compiled_unet else (1,)
        for width, height in sizes:
            for count in counts:
                self.generate(self._warm_up_group(width, height, count))
        if self.compiled_unet is not None:
            self.compiled_unet.seal()
        seconds = time.perf_counter() - started
        log.info("warm-up of %d size(s) x %d image count(s) took %.2f s", len(sizes),
                 len(counts), seconds)
        return seconds

    def _warm_up_group(self, width: int, height: int, images: int) -> list[GenerationRequest]:
        """One-image requests that one pipeline call serves together, as the batcher groups
        them (default guidance and scheduler, as most requests have)."""
        try:
            return [parse_request({"prompt": "warm-up", "width": width, "height": height,
                                   "seed": seed,
                                   "num_inference_steps": self.settings.warmup_steps},
                                  self.limits) for seed in range(images)]
        except RequestError as exc:
            # The size is the setting's, outside this model's bounds: said as the request's
            # error alone, a failed start named a `width` nobody had sent.
            raise SettingsError(f"setting warmup_sizes holds {width}x{height}, which this "
                                f"model cannot generate: {exc}", "warmup_sizes") from None

    def speed_gauges(self) -> dict[str, float]:
        """The compiled UNet's gauges (``metrics``); empty when compile is off."""
        unet = self.compiled_unet
        if unet is None:
            return {}
        return {"sdxl_compile_recompilations": unet.recompilations,
                "sdxl_compile_eager_calls": unet.eager_calls}

    def generate(self, group: Sequence[GenerationRequest],
                 on_step: StepCallback | None = None) -> list[GeneratedImages]:
        """Run one batched pipeline call for requests that share a ``compat_key``.

        Each image gets its own generator, so a seed makes the same image alone or in a
        batch. Results come back in the order of ``group``. When ``profile_next`` holds a
        ``profiling.TraceStore``, this one call runs under torch.profiler and leaves a trace.
        """
        store, self.profile_next = self.profile_next, None
        if store is None:
            return self._generate(group, on_step)
        first = group[0]
        images = sum(r.num_images for r in group)
        with store.recording(f"{len(group)} request(s), {images} image(s) of "
                             f"{first.width}x{first.height}, {first.num_inference_steps} "
                             f"steps, guidance {first.guidance_scale:g}", self.device):
            return self._generate(group, on_step)

    @torch.inference_mode()
    def _generate(self, group: Sequence[GenerationRequest],
                  on_step: StepCallback | None = None) -> list[GeneratedImages]:
        first = group[0]
        if any(r.compat_key != first.compat_key for r in group):
            raise ValueError("generate() takes requests with one compat_key; group them first")
        prompts, negatives, generators = [], [], []
        for request in group:
            for seed in request.seeds:
                prompts.append(request.prompt)
                negatives.append(request.negative_prompt)
                generators.append(torch.Generator("cpu").manual_seed(seed))
        # SDXL's convention: an empty negative prompt means zero embeddings, not "".
        no_negative = not any(negatives)
        steps = first.num_inference_steps
        timings: dict[str, float] = {}

        if self.cuda_error:
            raise RuntimeError(self.cuda_error)
        fault = self._injected_oom(len(prompts) * first.width * first.height)
        sticky = bool(self.settings.fault_cuda_error_prompt) and any(
            r.prompt == self.settings.fault_cuda_error_prompt for r in group)
        poisoned = bool(self.settings.fault_error_prompt) and any(
            r.prompt == self.settings.fault_error_prompt for r in group)
        broken = bool(self.settings.fault_engine_broken_file) and \
            os.path.exists(self.settings.fault_engine_broken_file)
        crashing = bool(self.settings.fault_crash_prompt) and any(
            r.prompt == self.settings.fault_crash_prompt for r in group)
        hanging = bool(self.settings.fault_hang_prompt) and any(
            r.prompt == self.settings.fault_hang_prompt for r in group)

        def step_end(pipe, step, timestep, tensors):
            if fault is not None and self.settings.fault_oom_stage == "denoise":
                raise fault  # inside the real pipeline call, after one denoising step
            if poisoned:
                raise RuntimeError("injected failure (fault_error_prompt)")
            if sticky:
                self.cuda_error = f"{_ILLEGAL_ACCESS} (injected: fault_cuda_error_prompt)"
                raise RuntimeError(self.cuda_error)
            if broken:
                raise RuntimeError("injected engine failure (fault_engine_broken_file exists)")
            if crashing:
                log.warning("injected crash (fault_crash_prompt): SIGKILL to process %d",
                            os.getpid())
                os.kill(os.getpid(), signal.SIGKILL)
            if hanging:
                log.warning("injected hang (fault_hang_prompt) in process %d", os.getpid())
                time.sleep(3600)
            if on_step is not None:
                on_step(step + 1, steps)
            return tensors

        self.pipe.scheduler = self.schedulers[first.scheduler]
        started = time.perf_counter()
        latents = self.pipe(
            prompt=prompts,
            negative_prompt=None if no_negative else negatives,
            num_inference_steps=steps,
            guidance_scale=first.guidance_scale,
            width=first.width,
            height=first.height,
            generator=generators,
            output_type="latent",
            callback_on_step_end=step_end,
        ).images
        self.pipeline_calls += 1
        timings["denoise"] = time.perf_counter() - started
        started = time.perf_counter()
        if fault is not None:
            raise fault
        images = self._decode(latents)
        timings["decode"] = time.perf_counter() - started
        results, offset = [], 0
        for request in group:
            results.append(GeneratedImages(request, images[offset:offset + request.num_images],
                                           timings))
            offset += request.num_images
        return results

    def _injected_oom(self, pixels: int) -> RuntimeError | None:
        """The real CUDA out-of-memory error type, when fault injection says this call is
        too big (``fault_oom_max_pixels``), so OOM handling is tested on any machine; or
        cuBLAS's, a plain RuntimeError (``fault_oom_error``)."""
        limit = self.settings.fault_oom_max_pixels
        if not limit or pixels <= limit:
            return None
        if self.settings.fault_oom_error == "cublas":
            return RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling "
                                f"`cublasCreate(handle)` (injected: {pixels} pixels in one "
                                f"call, fault_oom_max_pixels={limit})")
        return torch.cuda.OutOfMemoryError(
            f"CUDA out of memory (injected: {pixels} pixels in one call, "
            f"fault_oom_max_pixels={limit})")

    def _decode(self, latents: torch.Tensor) -> list:
        """Decode a batch's latents in one VAE call; fall back to one call per image when
        that call runs out of GPU memory (the denoising already done is kept)."""
        try:
            decoded = self._decode_checked(latents)
        except RuntimeError as exc:
            if not out_of_memory(exc):
                raise
            log.warning("decoding %d latents at once ran out of GPU memory (%s); decoding "
                        "them one by one", latents.shape[0], exc)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            decoded = torch.cat([self._decode_checked(latents[i:i + 1])
                                 for i in range(latents.shape[0])])
        # NaN becomes 0 in postprocess: a black image that looked like a success.
        bad = int((~torch.isfinite(decoded).flatten(1).all(dim=1)).sum())  # one GPU sync
        if bad:
            raise NonFiniteImage(bad, decoded.shape[0])
        return self.pipe.image_processor.postprocess(decoded, output_type="pil")

    def _decode_checked(self, latents: torch.Tensor) -> torch.Tensor:
        """One VAE call; an image whose fp16 decode overflowed (NaN or inf: a black image)
        is decoded again alone in fp32, the others are kept."""
        vae = self.pipe.vae
        images = self._vae_decode(vae, latents, vae.dtype)
        if vae.dtype != torch.float16:
            return images
        bad = [i for i in range(images.shape[0]) if not torch.isfinite(images[i]).all()]
        if bad:
            log.warning("fp16 VAE decode overflowed for %d of %d image(s); decoding those "
                        "in fp32", len(bad), images.shape[0])
            images = images.float()  # an fp32 decode written back into fp16 could overflow
            vae.to(torch.float32)
            try:
                for i in bad:
                    images[i] = self._vae_decode(vae, latents[i:i + 1], torch.float32)[0]
            finally:
                vae.to(torch.float16)
        return images

    @staticmethod
    def _vae_decode(vae, latents: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        latents = latents.to(dtype)
        config = vae.config
        if getattr(config, "latents_mean", None) is not None and \
                getattr(config, "latents_std", None) is not None:
            mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1).to(latents)
            std = torch.tensor(config.latents_std).view(1, -1, 1, 1).to(latents)
            latents = latents * std / config.scaling_factor + mean
        else:
            latents = latents / config.scaling_factor
        return vae.decode(latents, return_dict=False)[0]

"""Serving settings, read once into a frozen object.

They come from the ``handler:`` section of the model-config YAML that is packed into the
archive, and a few can be overridden per deployment by ``SDXL_*`` environment variables
(the environment wins, so one archive serves several deployments). A bad value fails the
model load at once with a message naming the setting (and the variable that set it, if
one did); a key no setting declares (a typo such as ``max_num_image``) is refused when the
archive is built and logged as a warning at load. Nothing re-reads configuration on the
hot path.
"""

from __future__ import annotations

import difflib
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Iterator, Mapping

from sdxl_serve.contract import FIELDS, MOST_NUM_IMAGES, SDXL_LIMITS
from sdxl_serve.model_files import CHECKS, ModelFilesError, check_model_files

log = logging.getLogger(__name__)


class SettingsError(ValueError):
    """A setting has a value we cannot serve with.

    ``settings`` names the settings the broken rule is about, so that an error caused by an
    ``SDXL_*`` override can name the variable: the section may be fine as written.
    ``overridden``: ``SDXL_*`` variables set some of them and the section none of the
    others (a rule between a variable and a default), so the section is no part of the cause.
    """

    def __init__(self, message: str, *settings: str, overridden: bool = False):
        super().__init__(message)
        self.settings = settings
        self.overridden = overridden


_DEVICES = ("auto", "cpu", "cuda")
_DTYPES = ("auto", "float16", "bfloat16", "float32")
_ATTENTION = ("sdpa", "xformers")
_FAULT_STAGES = ("denoise", "decode")
_FAULT_OOM_ERRORS = ("allocator", "cublas")
# torch.compile's modes, as speed.py passes them for the UNet; "off" runs it eager.
_COMPILE_MODES = ("off", "default", "max-autotune", "max-autotune-no-cudagraphs")
_QUANTIZE = ("none", "int8_dynamic")  # speed.quantize_unet
# Every boolean setting's words, the handler's and the job API's (``parse_bool``).
# The first word of each is the one refusals suggest; an empty value is the default, false.
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off", "")
BOOLEAN_WORDS = f"{_TRUE[0]} ({', '.join(_TRUE[1:])}) or {_FALSE[0]} ({', '.join(_FALSE[1:-1])})"
"""How refusals name the words: ``true (1, yes, on) or false (0, no, off)``."""
_NO_OVERRIDES: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True)
class Settings:
    """How one worker serves.

    Example:
        >>> Settings.from_mapping({"device": "cpu", "max_num_images": 2}, env={}).max_num_images
        2
    """

    model_dir: str = ""
    """Diffusers-format directory; empty means the model packed inside the archive."""
    vae_dir: str = ""
    """Optional fp16-safe VAE (diffusers format) used in place of the model's own."""
    device: str = "auto"
    dtype: str = "auto"
    attention: str = "sdpa"
    max_num_images: int = 4
    """Most images one request may ask for."""
    max_batch_images: int = 8
    """Most images one pipeline call generates; larger groups are split, and so is one
    request that asks more (``max_num_images`` above this)."""
    max_request_cost: float = 4.0
    """Most work one request may ask for, in default requests (one image at the model's
    native size, default steps and guidance: ``contract.request_cost``); more gets 400.
    4 = four default images, or one image of twice the native width and height."""
    max_call_cost: float = 8.0
    """Most work one pipeline call may do, in the same unit; a group over it is split into
    several calls. At least ``max_request_cost``, so a request never needs splitting."""
    png_compress_level: int = 1
    """zlib level 0-9; 1 is about twice as fast as PNG's default 6 for a few % more bytes."""
    jpeg_quality: int = 90
    webp_quality: int = 90
    encode_threads: int = 4
    default_steps: int = 30
    """Denoising steps of a request that names no ``num_inference_steps``; with
    ``default_guidance_scale`` it also sets the unit of request cost (one default request)."""
    default_guidance_scale: float = 5.0
    """Guidance of a request that names no ``guidance_scale``; above 1 costs twice the work."""
    warmup_sizes: tuple[tuple[int, int], ...] = ()
    """(width, height) buckets generated once before the worker reports ready; empty means
    the model's default size."""
    warmup_steps: int = 2
    model_version: str = ""
    """Reported in every response; the archive's version when empty."""
    model_file_check: str = "sha256"
    """Before loading, the model's files are checked against its manifest
    (sdxl-manifest.json): sha256 (every byte), size (names and sizes only) or off."""
    # --- Speed (docs/speed.md). All off by default: each costs start time or exactness. --
    compile: str = "off"
    """torch.compile mode for the UNet: off, default, max-autotune or
    max-autotune-no-cudagraphs. Compiled per shape bucket during warm-up only."""
    compile_batch_sizes: tuple[int, ...] = (1, 4)
    """Images per pipeline call that warm-up compiles, at each warm-up size: the shape
    buckets are warmup_sizes x these. A call of another shape runs the eager UNet."""
    compile_cache_dir: str = ""
    """Inductor's cache (kernels, FX graphs, AOTAutograd): a directory that outlives the
    engine process; empty: compile-cache/ in $SDXL_RUN_DIR, else in the temp directory."""
    fuse_qkv: bool = False
    """Fuse each attention's query/key/value projections into one matmul (UNet and VAE)."""
    channels_last: bool = False
    """UNet and VAE weights and activations in channels_last memory format."""
    quantize: str = "none"
    """UNet linear layers: none, or int8_dynamic (int8 weights, activations quantized at
    run time; torchao). Not quality-neutral: docs/speed.md."""
    # --- Production runtime (recycling, health, metrics, fault injection). ---------------
    max_requests_per_worker: int = 1000
    """Requests one engine process serves before a fresh one replaces it (PyTorch services
    leak memory over days); each process draws its own budget up to 10% lower (jitter)."""
    max_worker_age_s: float = 3600.0
    """Seconds one engine process lives at most, jittered the same way."""
    recycle_jitter: float = 0.1
    """Fraction by which budgets are drawn lower, so workers do not all restart at once."""
    health_interval_s: float = 30.0
    """A deep health check (one cheap real generation) runs at most this often."""
    metrics_interval_s: float = 5.0
    """How often gauges (worker age, GPU memory and use, queue depth) are refreshed, and
    how often at the latest a worker that is never idle writes its metric lines
    (``metrics.DeferredSink``)."""
    management_address: str = ""
    """TorchServe's management API, read for the queue depth; empty: $TS_MANAGEMENT_ADDRESS,
    else http://127.0.0.1:8081 (config.properties' default)."""
    key_file: str = ""
    """TorchServe's key_file.json; empty: the one in the TorchServe process's directory."""
    cancel_dir: str = ""
    """A directory shared with the job dispatcher (docs/jobs.md, the job API): a request with
    an ``X-Cancel-Token`` header stops between two steps once a file of that name exists
    here, so a canceled job frees the GPU. Empty: the header is ignored."""
    circuit_failure_threshold: int = 3
    """Engine failures in a row, each confirmed by a deep health check, that open the
    circuit breaker: requests then get 503 at once and readiness fails. 0 turns it off."""
    circuit_cooldown_s: float = 30.0
    """Seconds the breaker stays open before one deep health check decides to close it."""
    engine_stall_s: float = 60.0
    """An engine process that makes no progress (no denoising step, no answer) for this
    many seconds while it owes an answer is taken for hung (a stuck GPU or driver call),
    ended, and its batch answered 500 ``EngineStalled``, long before TorchServe's
    ``responseTimeout`` would kill the worker; 0 waits however long it takes. Keep it above
    the slowest step and VAE decode of one pipeline call (seconds on a GPU)."""
    engine_start_s: float = 600.0
    """Seconds an engine process may take to start, load the model and warm up (compiles
    included) before it is taken for hung, killed, and the start counted as failed: the
    first one's and every replacement's. Under TorchServe keep it within the model's
    ``startupTimeout``; Triton has no such limit of its own. 0 waits however long it takes."""
    profile_every_n_requests: int = 0
    """Scheduled profiling: every this many requests one pipeline call runs under
    torch.profiler (memory included) and leaves a trace; 0 is off."""
    profile_keep: int = 5
    """Traces kept: the newest this many, older ones are deleted."""
    profile_dir: str = ""
    """Where traces go; empty: ``profiles/`` in TorchServe's working directory (the run
    directory), else in the temp directory."""
    fault_oom_max_pixels: int = 0
    """Fault injection (tests): a pipeline call for more pixels (images x width x height)
    raises CUDA's out-of-memory error (``fault_oom_error``) at ``fault_oom_stage``; 0 is
    off."""
    fault_oom_stage: str = "denoise"
    fault_oom_error: str = "allocator"
    """Which out-of-memory error ``fault_oom_max_pixels`` raises: ``allocator``, torch's
    OutOfMemoryError (its caching allocator), or ``cublas``, the plain RuntimeError of
    cuBLAS failing to allocate (``CUBLAS_STATUS_ALLOC_FAILED``)."""
    fault_error_prompt: str = ""
    """Fault injection (tests): a pipeline call with a request whose prompt is exactly this
    raises RuntimeError inside the call, after one denoising step; empty is off."""
    fault_engine_broken_file: str = ""
    """Fault injection (tests): while a file exists at this path, every pipeline call raises
    RuntimeError inside the call, as a broken driver or bad weights would; empty is off."""
    fault_cuda_error_prompt: str = ""
    """Fault injection (tests): a pipeline call with a request whose prompt is exactly this
    raises CUDA's "illegal memory access" error after one denoising step, and every later
    pipeline call of the process raises it too, as a real one leaves the CUDA context
    unusable until the process exits; empty is off."""
    fault_crash_prompt: str = ""
    """Fault injection (tests): a pipeline call with a request whose prompt is exactly this
    kills its own process with SIGKILL after one denoising step, as the kernel's OOM killer
    or a crash in a CUDA kernel would; empty is off. Only for engine processes."""
    fault_hang_prompt: str = ""
    """Fault injection (tests): a pipeline call with a request whose prompt is exactly this
    sleeps for an hour after one denoising step, as a stuck driver call would ("warm-up":
    the warm-up's); empty is off. Only for engine processes."""
    fault_busy_hold_s: float = 0.0
    """Fault injection (tests): a profile's stop and its write each begin by holding
    Python's lock on a busy core this many seconds, as stopping the profiler of a long call
    does (1.3 s for 32 steps of the tiny model on 2 cores); 0 is off. Only for engine
    processes."""
    extra: Mapping[str, Any] = field(default_factory=dict)
    """Keys of the section that no setting above declares, kept as given: nothing reads
    them. ``check_portable`` refuses them; ``from_mapping`` logs a warning naming them."""

    @classmethod
    def from_mapping(
        cls, config: Mapping[str, Any] | None, env: Mapping[str, str] | None = None
    ) -> "Settings":
        """Validate ``config`` (the YAML ``handler:`` section) plus ``SDXL_*`` overrides."""
        env = os.environ if env is None else env
        with _naming_overrides(env, config):
            settings = cls._parse(config, env)
            settings._check()
            settings._check_directories()
        # At load an undeclared key is named in a warning, not refused: build_archive.py
        # refuses it already, so one reaches a worker only from a section no build checked
        # (Triton's handler_config file, read as it is; an archive made another way), which
        # may have been written for another version of this package, holding a setting it
        # has since dropped. The key changes nothing here, so failing every worker's start
        # over it would turn a harmless leftover into an outage; a typo still gets a line in
        # the model log naming it and the setting it was probably meant to be.
        if settings.extra:
            log.warning("%s: ignored", _undeclared(settings.extra))
        return settings

    @classmethod
    def check_portable(cls, config: Mapping[str, Any] | None,
                       env: Mapping[str, str] = _NO_OVERRIDES) -> None:
        """Refuse a ``handler:`` section that no worker could load, wherever it runs.

        Every rule of ``from_mapping`` that depends on the section alone, not on the
        machine that checks it: an archive is often built on one machine and served on
        another. So ``model_dir`` and ``vae_dir`` need not exist here, ``device: cuda``
        passes on a machine without a GPU (whether one exists is decided at load:
        ``engine.choose_device``), and no ``SDXL_*`` override is read unless ``env`` is
        given. build_archive.py runs it before it builds anything, without ``env`` (the
        building machine's overrides are not the archive's); serve_triton.py with its own
        environment, the one its models will read, before it starts anything.

        Args:
            config: the ``handler:`` section.
            env: ``SDXL_*`` overrides to check with the section, as a worker started with
                this environment reads them; none when not given.

        Raises:
            SettingsError: naming the setting, its value and the rule, and the variable
                when an override set it.

        Example:
            >>> Settings.check_portable({"device": "cuda", "vae_dir": "/only/on/the/gpu/node"})
            >>> Settings.check_portable({"dtype": "float17"})  # doctest: +ELLIPSIS
            Traceback (most recent call last):
            ...
            sdxl_serve.settings.SettingsError: setting dtype must be one of ..., got 'float17'
            >>> Settings.check_portable({"max_num_image": 2})  # doctest: +ELLIPSIS
            Traceback (most recent call last):
            ...
            sdxl_serve.settings.SettingsError: max_num_image ... (did you mean max_num_images?)...
            >>> Settings.check_portable({}, env={"SDXL_DTYPE": "float17"})  # doctest: +ELLIPSIS
            Traceback (most recent call last):
            ...
            sdxl_serve.settings.SettingsError: SDXL_DTYPE='float17' (an environment override): ...
        """
        with _naming_overrides(env, config):
            settings = cls._parse(config, env)
            if settings.extra:
                # A build is where the section is written: a key that no setting declares
                # is a typo or a leftover that would otherwise build and serve with the
                # default.
                them = "it" if len(settings.extra) == 1 else "them"
                raise SettingsError(f"{_undeclared(settings.extra)}: a worker would ignore "
                                    f"{them}; rename or remove {them}")
            settings._check()

    @classmethod
    def check_serving(cls, config: Mapping[str, Any] | None,
                      env: Mapping[str, str] = _NO_OVERRIDES) -> None:
        """Refuse a ``handler:`` section that no worker on this machine could load with
        ``env``, the weights aside: ``check_portable``, and a directory that a worker's load
        (``from_mapping``) would find missing here. For a launcher on the machine that serves,
        with the environment its workers get: a missing ``vae_dir`` or ``cancel_dir`` failed
        every worker's load, the reason in a log; so did a ``vae_dir`` whose files differ
        from its manifest in names or sizes, or that has none (unless ``model_file_check``
        is off). ``model_dir`` is left to the caller, which says what is wrong with the
        weights in its own words (build_archive.check_weights).

        Args:
            config: the ``handler:`` section.
            env: ``SDXL_*`` overrides, as the workers read them.

        Raises:
            SettingsError: naming the setting, its value and the rule, and the variable
                when an override set it.

        Example:
            >>> Settings.check_serving({}, env={"SDXL_VAE_DIR": "/no/vae"})
            ... # doctest: +ELLIPSIS
            Traceback (most recent call last):
            ...
            sdxl_serve.settings.SettingsError: SDXL_VAE_DIR='/no/vae' (...): vae_dir '/no/vae' is...
            >>> Settings.check_serving({"model_dir": "/no/weights"})
        """
        cls.check_portable(config, env)
        with _naming_overrides(env, config):
            settings = cls._parse(config, env)
            settings._check_directories(leave_out=("model_dir",))
            if settings.vae_dir and settings.model_file_check != "off":
                try:  # names and sizes: seconds, no byte read; the load hashes them
                    check_model_files(settings.vae_dir, "size")
                except ModelFilesError as exc:
                    raise SettingsError(f"vae_dir: {exc}", "vae_dir") from None

    @classmethod
    def _parse(cls, config: Mapping[str, Any] | None, env: Mapping[str, str]) -> "Settings":
        """``config`` with ``env``'s overrides, each value in its declared type; unchecked."""
        config = dict(config or {})
        known = {f.name: f for f in fields(cls) if f.name != "extra"}
        for name in known:
            value = env.get(_variable(name))
            if value is not None and value != "":
                config[name] = value
        values: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for name, value in config.items():
            if name in known:
                values[name] = _coerce(name, value, known[name].type)
            else:
                extra[name] = value
        return cls(**values, extra=extra)

    def _check(self) -> None:
        """The rules that hold on any machine (``check_portable``)."""
        _one_of("device", self.device, _DEVICES)
        _one_of("dtype", self.dtype, _DTYPES)
        _one_of("attention", self.attention, _ATTENTION)
        _within("max_num_images", self.max_num_images, 1, MOST_NUM_IMAGES)
        _within("max_batch_images", self.max_batch_images, 1, 256)
        _within("max_request_cost", self.max_request_cost, 0.01, 10**6)
        _within("max_call_cost", self.max_call_cost, 0.01, 10**6)
        if self.max_call_cost < self.max_request_cost:
            raise SettingsError(
                f"setting max_call_cost ({self.max_call_cost}) must be at least "
                f"max_request_cost ({self.max_request_cost}): a request that passes the "
                "request limit must fit in one pipeline call",
                "max_call_cost", "max_request_cost")
        _within("png_compress_level", self.png_compress_level, 0, 9)
        _within("jpeg_quality", self.jpeg_quality, 1, 100)
        _within("webp_quality", self.webp_quality, 1, 100)
        _within("encode_threads", self.encode_threads, 1, 64)
        # A default is what a request gets by naming nothing, so it keeps the request's own
        # bounds: 0 steps made every request's cost a division by zero (no worker started)
        # and -3 was served with a 200.
        _within("default_steps", self.default_steps, *_request_bounds("num_inference_steps"),
                rule="the bounds of a request's num_inference_steps")
        _within("default_guidance_scale", self.default_guidance_scale,
                *_request_bounds("guidance_scale"),
                rule="the bounds of a request's guidance_scale")
        _within("warmup_steps", self.warmup_steps, 1, 100)
        _check_warmup_sizes(self.warmup_sizes)
        _within("max_requests_per_worker", self.max_requests_per_worker, 1, 10**9)
        _within("max_worker_age_s", self.max_worker_age_s, 1, 10**9)
        _within("recycle_jitter", self.recycle_jitter, 0, 0.9)
        _within("health_interval_s", self.health_interval_s, 0, 86400)
        # The alerts, the dashboard and the autoscalers take a worker for live while its age
        # gauge, written every interval, moved within 2 minutes: past 1 minute a live worker
        # dropped out of them between two writes (a scrape every 15 s or more on top).
        _within("metrics_interval_s", self.metrics_interval_s, 0.1, 60,
                rule="a live worker's age must move within the 2 minutes the alerts "
                     "and autoscalers look at")
        _within("circuit_failure_threshold", self.circuit_failure_threshold, 0, 10**6)
        _within("circuit_cooldown_s", self.circuit_cooldown_s, 0, 86400)
        if self.engine_stall_s != 0:  # the heartbeat comes every second: leave it room
            _within("engine_stall_s", self.engine_stall_s, 5, 86400, rule="or 0 for none")
        if self.engine_start_s != 0:
            _within("engine_start_s", self.engine_start_s, 5, 86400, rule="or 0 for none")
        _within("profile_every_n_requests", self.profile_every_n_requests, 0, 10**9)
        _within("profile_keep", self.profile_keep, 1, 1000)
        _within("fault_oom_max_pixels", self.fault_oom_max_pixels, 0, 10**12)
        _within("fault_busy_hold_s", self.fault_busy_hold_s, 0, 3600)
        _one_of("fault_oom_stage", self.fault_oom_stage, _FAULT_STAGES)
        _one_of("fault_oom_error", self.fault_oom_error, _FAULT_OOM_ERRORS)
        _one_of("model_file_check", self.model_file_check, CHECKS)
        _one_of("compile", self.compile, _COMPILE_MODES)
        _one_of("quantize", self.quantize, _QUANTIZE)
        if not self.compile_batch_sizes:
            raise SettingsError("setting compile_batch_sizes needs at least one image count",
                                "compile_batch_sizes")
        for count in self.compile_batch_sizes:
            if not 1 <= count <= self.max_batch_images:
                # max_batch_images is part of the cause only when the count is above it.
                cause = ("compile_batch_sizes", "max_batch_images") if count >= 1 \
                    else ("compile_batch_sizes",)
                raise SettingsError(
                    f"setting compile_batch_sizes holds {count}: each must be between 1 and "
                    f"max_batch_images ({self.max_batch_images}), the most images one "
                    "pipeline call generates", *cause)

    def _check_directories(self, leave_out: tuple[str, ...] = ()) -> None:
        """The directories exist on this machine: only where the worker loads, and in the
        launcher that starts it (``check_serving``). The other path settings need not:
        compile_cache_dir and profile_dir are made when first used, and a key_file that is
        not there leaves only the queue depth unread."""
        for name in ("model_dir", "vae_dir", "cancel_dir"):
            path = getattr(self, name)
            if name not in leave_out and path and not Path(path).is_dir():
                raise SettingsError(f"{name} {path!r} is not a directory", name)


# The settings that name a file or directory. A server runs its models elsewhere than where
# its launcher was started (TorchServe's workers in an unpacked archive's directory, Triton's
# stubs in its run directory): a relative path given as an SDXL_* override, which the
# launcher's own checks found, named nothing there, and the model failed its load.
PATH_SETTINGS = ("model_dir", "vae_dir", "compile_cache_dir", "key_file", "cancel_dir",
                 "profile_dir", "fault_engine_broken_file")


def absolute_path_overrides(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` with each relative path in a path setting's ``SDXL_*`` variable made
    absolute from this process's directory, for a server started elsewhere.

    Example:
        >>> env = absolute_path_overrides({"SDXL_MODEL_DIR": "weights", "SDXL_VAE_DIR": "",
        ...                                "SDXL_DTYPE": "float16"})
        >>> env["SDXL_MODEL_DIR"] == os.path.join(os.getcwd(), "weights")
        True
        >>> env["SDXL_VAE_DIR"], env["SDXL_DTYPE"]
        ('', 'float16')
        >>> home = absolute_path_overrides({"SDXL_MODEL_DIR": "~/w"})["SDXL_MODEL_DIR"]
        >>> home == os.path.expanduser("~/w")
        True
    """
    env = dict(env)
    for name in map(_variable, PATH_SETTINGS):
        if env.get(name):  # empty is the setting's default, not this directory
            # `~` as --model-dir takes it: quoted, no shell expanded it.
            env[name] = os.path.abspath(os.path.expanduser(env[name]))
    return env


def _variable(name: str) -> str:
    """The environment variable that overrides setting ``name``."""
    return "SDXL_" + name.upper()


@contextmanager
def _naming_overrides(env: Mapping[str, str],
                      config: Mapping[str, Any] | None) -> Iterator[None]:
    """An error about a setting that an ``SDXL_*`` variable of ``env`` set names the variable
    and its value: the file's line for that setting is not what the worker reads. Whether
    the section ``config`` is part of the cause: it sets one of the others."""
    try:
        yield
    except SettingsError as exc:
        overrides = [f"{_variable(name)}={env[_variable(name)]!r}" for name in exc.settings
                     if env.get(_variable(name))]
        if not overrides:
            raise
        which = "an environment override" if len(overrides) == 1 else "environment overrides"
        raise SettingsError(f"{', '.join(overrides)} ({which}): {exc}", *exc.settings,
                            overridden=not any(name in (config or {}) for name in exc.settings
                                               if not env.get(_variable(name)))) from None


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise SettingsError(f"setting {name} must be one of {', '.join(allowed)}, got {value!r}",
                            name)


def _within(name: str, value: float, low: float, high: float, rule: str = "") -> None:
    if not low <= value <= high:
        why = f" ({rule})" if rule else ""
        raise SettingsError(f"setting {name} must be between {low} and {high}{why}, got {value}",
                            name)


def _check_warmup_sizes(sizes: tuple[tuple[int, int], ...]) -> None:
    """Each warm-up size keeps the rule of a request's width and height that holds for every
    model (a positive multiple of 8); the model's own bounds are checked as it warms up
    (``Engine.warm_up``). Unchecked, 33x33 built and then failed every worker's start with a
    request's error about `width`, naming no setting."""
    step = next(each for each in FIELDS if each.name == "width").multiple_of
    for width, height in sizes:
        if min(width, height) <= 0 or width % step or height % step:
            raise SettingsError(f"setting warmup_sizes holds {width}x{height}: each size must "
                                f"be WIDTHxHEIGHT, both positive multiples of {step} (as a "
                                "request's width and height)", "warmup_sizes")


def _request_bounds(name: str) -> tuple[float, float]:
    """A request field's bounds as the contract declares them (model-independent ones)."""
    declared = next(each for each in FIELDS if each.name == name)
    return declared.bounds(SDXL_LIMITS)


def _undeclared(extra: Mapping[str, Any]) -> str:
    """Each key no setting declares, with the declared name closest to it when one is."""
    declared = [each.name for each in fields(Settings) if each.name != "extra"]

    def hint(key: Any) -> str:
        close = difflib.get_close_matches(str(key), declared, n=1)
        return f" (did you mean {close[0]}?)" if close else ""

    keys = list(extra)
    if len(keys) == 1:
        return f"{keys[0]} is not a handler setting{hint(keys[0])}"
    return ", ".join(f"{key}{hint(key)}" for key in keys) + " are not handler settings"


def _coerce(name: str, value: Any, annotation: str) -> Any:
    """Turn YAML or environment text into the declared type, or say which setting is wrong."""
    try:
        if annotation == "int":
            if isinstance(value, bool):
                raise ValueError("a boolean is not a number")
            # int() would cut a YAML 2.9 to 2 without a word (the same text in an SDXL_*
            # variable is refused); a whole 4.0 is still 4.
            if isinstance(value, float) and not value.is_integer():
                raise ValueError("not a whole number")
            return _read_as(int, value, "not a whole number")
        if annotation == "float":
            if isinstance(value, bool):
                raise ValueError("a boolean is not a number")
            number = _read_as(float, value, "not a number")
            if number != number or number in (float("inf"), float("-inf")):
                raise ValueError("not a finite number")
            return number
        if annotation == "str":
            # YAML 1.1 reads an unquoted `off` (or `no`) as false: for a setting whose
            # choices include "off" (compile, model_file_check) that is what was meant.
            return "off" if value is False else str(value)
        if annotation == "bool":
            return parse_bool(value)
        if annotation == "tuple[int, ...]":
            return _read_as(_parse_counts, value, "each must be a whole number, e.g. 1,4")
        if annotation.startswith("tuple[tuple[int, int]"):
            return _read_as(_parse_sizes, value, "each size must be WIDTHxHEIGHT in whole "
                                                 "numbers, e.g. 1024x1024,768x1344")
    except (TypeError, ValueError) as exc:
        raise SettingsError(f"setting {name} has a bad value {value!r}: {exc}", name) from None
    raise SettingsError(f"setting {name}: no parser for type {annotation}", name)


def _read_as(parse: Callable[[Any], Any], value: Any, rule: str) -> Any:
    """``parse(value)``, its failure said as the setting's rule: int() and float() say
    "invalid literal for int() with base 10: ''", which names no rule."""
    try:
        return parse(value)
    except (TypeError, ValueError):
        raise ValueError(rule) from None


def _parse_sizes(value: Any) -> tuple[tuple[int, int], ...]:
    """Accept ``"1024x1024,768x1344"`` or a YAML list of ``[w, h]`` pairs / ``"WxH"`` strings."""
    if isinstance(value, str):
        items: list[Any] = [part for part in value.replace(" ", "").split(",") if part]
    else:
        items = list(value)
    sizes = []
    for item in items:
        if isinstance(item, str):
            width, _, height = item.lower().partition("x")
            sizes.append((int(width), int(height)))
        else:
            width, height = item
            sizes.append((int(width), int(height)))
    return tuple(sizes)


def parse_bool(value: Any) -> bool:
    """A boolean setting's value: a YAML boolean, or a word of ``BOOLEAN_WORDS``, any case.

    The one reading of every boolean setting, the handler's and the job API's
    (``sdxl_jobs.settings``), so that a word one of them takes the other takes too. Empty
    text is false, the default of every boolean setting (an ``SDXL_*`` override that is
    empty is not read at all: ``Settings._parse``).

    Raises:
        ValueError: any other value; the message lists the words.

    >>> parse_bool("Yes"), parse_bool("0"), parse_bool(""), parse_bool(True)
    (True, False, False, True)
    """
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"not a boolean, use {BOOLEAN_WORDS}")


def _parse_counts(value: Any) -> tuple[int, ...]:
    """Accept ``"1,4"``, a single number or a YAML list of numbers."""
    if isinstance(value, bool):
        raise ValueError("a boolean is not a number")
    if isinstance(value, int):
        return (value,)
    items = value.replace(" ", "").split(",") if isinstance(value, str) else list(value)
    return tuple(int(item) for item in items if item != "")

"""The engine's speed switches: torch.compile per shape bucket, fused QKV, channels_last,
int8 dynamic quantization.

Each is off by default and applied once, in ``load_engine`` (docs/speed.md says what each
costs at start and gains at serving, and which are quality-neutral).

``torch.compile`` recompiles the UNet for every new input shape, and a recompile takes
seconds to minutes: done in the middle of serving, it would stall every request behind it.
So the shapes compiled are a declared, finite set, the *buckets*: each warm-up size
(``warmup_sizes``) times each image count per pipeline call in ``compile_batch_sizes``.
Warm-up runs one pipeline call per bucket while the UNet is *open* (every shape it sees is
compiled), then *seals* it: from then on a call whose inputs match a bucket runs the
compiled UNet, and any other call runs the eager UNet, which never compiles. Both are kept:
``BucketedUNet`` replaces the UNet's ``forward`` and chooses per call. Should a bucket's
compiled code still need a recompile after the seal (a guard we did not foresee: global
state, a changed module), torch refuses (its ``fail_on_recompile`` stance), the call runs
eager, and the event is counted: ``recompilations`` is exported as a metric and alerted on.

The compile cache (Inductor's kernels and FX graphs, AOTAutograd's graphs) is kept in
``compile_cache_dir``, a directory that outlives the engine process, so a replaced engine
process (recycling) or a restarted pod warms up from it instead of compiling again.

Example:
    from sdxl_serve.settings import Settings
    engine = load_engine("build/tiny-sdxl", Settings.from_mapping(
        {"device": "cpu", "compile": "default", "warmup_sizes": "32x32",
         "compile_batch_sizes": "1"}))
    engine.warm_up()                 # compiles the one bucket, then seals it
    engine.speed_gauges()            # {"sdxl_compile_recompilations": 0, ...}
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch

from sdxl_serve.settings import Settings

log = logging.getLogger(__name__)


def compile_cache_dir(settings: Settings, env: Mapping[str, str] | None = None) -> Path:
    """Where the compile cache lives: the setting, else ``compile-cache/`` in the run
    directory ($SDXL_RUN_DIR, which the pod mounts), else ``sdxl-compile-cache/`` in the
    temp directory.

    Example:
        >>> str(compile_cache_dir(Settings(), env={"SDXL_RUN_DIR": "/run/sdxl"}))
        '/run/sdxl/compile-cache'
    """
    env = os.environ if env is None else env
    if settings.compile_cache_dir:
        return Path(settings.compile_cache_dir)
    if env.get("SDXL_RUN_DIR"):
        return Path(env["SDXL_RUN_DIR"]) / "compile-cache"
    return Path(tempfile.gettempdir()) / "sdxl-compile-cache"


def use_compile_cache(directory: Path) -> None:
    """Point Inductor's on-disk caches at ``directory`` and turn them on, in this process,
    before anything compiles.

    The environment variables reach Inductor's compile worker processes too; the config
    attributes cover a torch already imported (the fork server preloads it).
    """
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    directory.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(directory)
    os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] = "1"
    os.environ["TORCHINDUCTOR_AUTOGRAD_CACHE"] = "1"
    inductor_config.fx_graph_cache = True
    functorch_config.enable_autograd_cache = True


def quantize_unet(unet, scheme: str) -> None:
    """Quantize the UNet's linear layers in place (torchao).

    ``int8_dynamic``: int8 weights, each activation quantized to int8 when it arrives (the
    recipe of PyTorch's diffusion-fast); convolutions stay in floating point.
    """
    if scheme == "none":
        return
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    except ImportError as exc:
        raise RuntimeError(f"quantize={scheme} needs torchao (requirements.txt pins it): "
                           f"{exc}") from None
    quantize_(unet, Int8DynamicActivationInt8WeightConfig())


def apply_speed_settings(pipe, settings: Settings) -> "BucketedUNet | None":
    """Apply fuse_qkv, channels_last, quantize and compile to a loaded pipeline, in that
    order (quantized layers are what compile then compiles).

    Returns the ``BucketedUNet`` when compile is on (warm-up fills and seals it), else None.
    """
    if settings.fuse_qkv:
        # One matmul instead of three per attention: same weights, concatenated.
        pipe.fuse_qkv_projections(unet=True, vae=True)
    if settings.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    quantize_unet(pipe.unet, settings.quantize)
    if settings.compile == "off":
        return None
    use_compile_cache(compile_cache_dir(settings))
    sizes = max(1, len(settings.warmup_sizes))
    return BucketedUNet(pipe.unet, settings.compile,
                        max_buckets=sizes * len(settings.compile_batch_sizes))


def _compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process (its counters; one per bucket here)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _signature(value: Any) -> Any:
    """What dynamo's guards on a compiled call's argument depend on: a tensor's shape,
    strides, dtype and device; a plain value itself; containers element by element."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), tuple(value.stride()), value.dtype,
                str(value.device))
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _signature(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_signature(v) for v in value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return type(value).__name__


class BucketedUNet:
    """The UNet's forward: compiled for the warm-up buckets, eager for anything else.

    It replaces ``unet.forward`` on the module itself, so the pipeline and everything that
    reads the UNet (config, dtype, device, attention processors) see the same module.
    """

    def __init__(self, unet, mode: str, max_buckets: int = 8):
        self.mode = mode
        self.eager = unet.forward  # the class's forward, bound: what both paths run
        # dynamic=False: one graph per bucket, exactly specialised; never a dynamic-shape
        # graph that trades speed for fewer compiles.
        self.compiled = torch.compile(self.eager, mode=mode, dynamic=False)
        self.buckets: set = set()
        self.sealed = False
        self.compiled_calls = 0
        self.eager_calls = 0
        self.refused_recompiles = 0
        """Calls after the seal whose compiled code needed a recompile (run eager instead)."""
        self._graphs_at_start = self._graphs_at_seal = _compiled_graphs()
        # Each bucket is one entry in dynamo's cache for the UNet's forward: past
        # recompile_limit (8) entries dynamo would run every further bucket eager.
        import torch._dynamo.config as dynamo_config

        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, max_buckets + 8)
        unet.forward = self

    def __call__(self, *args, **kwargs):
        key = _signature((args, kwargs))
        if not self.sealed:  # warm-up: every shape seen becomes a bucket
            self.buckets.add(key)
            return self.compiled(*args, **kwargs)
        if key in self.buckets:
            try:
                # After the seal a recompile raises at once, before any compiled code runs.
                with torch.compiler.set_stance("fail_on_recompile"):
                    output = self.compiled(*args, **kwargs)
                self.compiled_calls += 1
                return output
            except RuntimeError as exc:
                if "recompile" not in str(exc).lower():
                    raise
                self.refused_recompiles += 1
                log.warning("the compiled UNet would have recompiled for one of its buckets "
                            "(%s); ran it eager instead", str(exc).splitlines()[0][:300])
        self.eager_calls += 1
        return self.eager(*args, **kwargs)

    def seal(self) -> None:
        """End of warm-up: no new shape is compiled from now on; a bucket whose guards fail
        runs eager instead of recompiling, and is counted in ``recompilations``."""
        self.sealed = True
        self._graphs_at_seal = _compiled_graphs()
        log.info("compiled the UNet (%s) for %d shape bucket(s) in %d graph(s); other shapes "
                 "run eager", self.mode, len(self.buckets),
                 _compiled_graphs() - self._graphs_at_start)

    @property
    def recompilations(self) -> int:
        """Recompilations since the seal, 0 at steady state: those refused (run eager) plus
        any graph dynamo's counters show compiled after the seal."""
        if not self.sealed:
            return 0
        return self.refused_recompiles + _compiled_graphs() - self._graphs_at_seal

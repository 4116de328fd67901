#!/usr/bin/env python3
"""The CUDA paths of the served engine, checked on a real GPU with the tiny model.

What only a GPU can show, and what no CPU test reaches:
- ``fp16``: the engine loads the tiny model on CUDA in float16 (VAE kept in fp32), a seed
  gives the same bytes twice, and the image is close to the CPU fp32 one (PSNR reported);
- ``oom``: a real CUDA out-of-memory error (the allocator's, under a per-process memory
  cap, no injection) splits a batch and still answers every image, identical to the images
  made without the cap; one image that cannot fit at all is a 507 with a smaller size;
- ``gauges``: the GPU memory gauges and NVML's utilisation gauge are read;
- ``recycling``: the engine process is a spawned child that owns CUDA; it is replaced at its
  request budget and serves on.

Usage: python scripts/gpu_check.py [--json PATH]. Exits 2 without CUDA, 1 if a check failed.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# This checkout's code first, not the checkout a shared venv's editable install names.
sys.path[:0] = [str(REPO / "handler"), str(REPO / "jobs"), str(REPO / "scripts")]


def _request(**fields) -> bytes:
    body = {"prompt": "a lighthouse at dawn", "num_inference_steps": 4, "seed": 7, **fields}
    return json.dumps(body).encode()


def _images(reply) -> list[bytes]:
    import base64

    payload = reply.json()
    return [base64.b64decode(b) for b in payload.get("images", [payload["image"]])]


def _psnr(a: bytes, b: bytes) -> float:
    import numpy as np
    from PIL import Image

    x = np.asarray(Image.open(io.BytesIO(a)), dtype=np.float64)
    y = np.asarray(Image.open(io.BytesIO(b)), dtype=np.float64)
    mse = float(((x - y) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def check_fp16(model_dir: Path) -> dict:
    import torch

    from sdxl_serve.engine import load_engine
    from sdxl_serve.service import GenerationService, Incoming
    from sdxl_serve.settings import Settings

    cuda = load_engine(model_dir, Settings.from_mapping({"device": "auto"}, env={}))
    cpu = load_engine(model_dir, Settings.from_mapping({"device": "cpu"}, env={}))
    assert cuda.device.type == "cuda", cuda.device
    assert cuda.pipe.unet.dtype == torch.float16, cuda.pipe.unet.dtype
    body = _request()
    on_gpu = GenerationService(cuda)
    started = time.perf_counter()
    first = on_gpu.handle([Incoming(body)])[0]
    first_s = time.perf_counter() - started
    again = on_gpu.handle([Incoming(body)])[0]
    reference = GenerationService(cpu).handle([Incoming(body)])[0]
    assert first.status == again.status == reference.status == 200, first.body[:300]
    # Batched: four seeds in one call give the images each seed gives alone.
    batch = on_gpu.handle([Incoming(_request(seed=s)) for s in range(4)])
    alone = [on_gpu.handle([Incoming(_request(seed=s))])[0] for s in range(4)]
    batch_psnr = [_psnr(_images(b)[0], _images(a)[0]) for b, a in zip(batch, alone)]
    return {
        "device": str(cuda.device), "unet_dtype": str(cuda.pipe.unet.dtype),
        "vae_dtype": str(cuda.pipe.vae.dtype), "first_request_s": round(first_s, 3),
        "same_seed_same_bytes": _images(first) == _images(again),
        "psnr_fp16_vs_cpu_fp32_db": round(_psnr(_images(first)[0], _images(reference)[0]), 2),
        "psnr_batched_vs_alone_db": [round(p, 2) for p in batch_psnr],
        "ok": _images(first) == _images(again) and min(batch_psnr) > 30,
    }


def check_oom(model_dir: Path) -> dict:
    import torch

    from sdxl_serve.engine import load_engine
    from sdxl_serve.service import GenerationService, Incoming
    from sdxl_serve.settings import Settings

    engine = load_engine(model_dir, Settings.from_mapping(
        {"device": "cuda", "max_num_images": 8, "max_batch_images": 8,
         "max_request_cost": 1000, "max_call_cost": 1000}, env={}))
    service = GenerationService(engine)
    size = engine.limits.max_size
    big = _request(width=size, height=size, num_images=8)
    one = _request(width=size, height=size, num_images=1)
    total = torch.cuda.get_device_properties(0).total_memory
    # 1. Measure: what is held at rest, and the peak of one image and of eight.
    uncapped = service.handle([Incoming(big)])[0]
    assert uncapped.status == 200, uncapped.body[:300]
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    rest = torch.cuda.memory_reserved(0)
    peaks = {}
    for images, body in ((1, one), (8, big)):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(0)
        service.handle([Incoming(body)])
        peaks[images] = torch.cuda.max_memory_reserved(0)
    result = {"size": size, "rest_reserved_mb": rest / 2**20,
              "peak_reserved_mb_1_image": peaks[1] / 2**20,
              "peak_reserved_mb_8_images": peaks[8] / 2**20}
    # 2. A cap that holds two or three images' worth, not eight: the allocator refuses.
    per_image = max(peaks[8] - rest, 1) / 8
    cap = min(0.99, (rest + 3 * per_image + (peaks[1] - rest)) / total)
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(cap, 0)
    try:
        stats_before = service.serve([Incoming(big)])
        capped, stats = stats_before[0][0], stats_before[1]
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
    result.update(cap_mb=cap * total / 2**20, capped_status=capped.status,
                  oom_events=stats.oom_events, pipeline_calls=len(stats.calls))
    if capped.status == 200:
        result["capped_images_identical"] = _images(capped) == _images(uncapped)
    # 3. A cap under one image: 507 with a smaller size, and the engine serves on.
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(
        min(0.99, (rest + 0.3 * (peaks[1] - rest)) / total), 0)
    try:
        refused = service.handle([Incoming(one)])[0]
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
    after = service.handle([Incoming(one)])[0]
    result.update(one_image_capped_status=refused.status,
                  one_image_capped_body=refused.json() if refused.status != 200 else None,
                  served_after=after.status)
    result["ok"] = (capped.status == 200 and stats.oom_events > 0
                    and result.get("capped_images_identical") is True
                    and refused.status == 507 and after.status == 200)
    return result


def check_gauges() -> dict:
    import torch

    from sdxl_serve.engine_process import gpu_gauges

    torch.ones(1, device="cuda")
    gauges = gpu_gauges(torch.device("cuda", 0))
    return {"gauges": gauges,
            "ok": {"sdxl_gpu_memory_allocated_bytes", "sdxl_gpu_memory_total_bytes",
                   "sdxl_gpu_utilization_ratio"} <= set(gauges)}


def check_recycling(model_dir: Path) -> dict:
    from sdxl_serve.engine_process import EngineSpec
    from sdxl_serve.recycling import RecyclingService
    from sdxl_serve.service import Incoming
    from sdxl_serve.settings import Settings

    config = {"device": "cuda", "max_requests_per_worker": 3, "health_interval_s": 3600,
              "recycle_jitter": 0}
    service = RecyclingService(EngineSpec(str(model_dir), config, 0, "gpu-check"),
                               Settings.from_mapping(config, env={}))
    started = time.perf_counter()
    info = service.start()
    ready_s = time.perf_counter() - started
    statuses, images = [], []
    try:
        for _ in range(8):
            reply = service.handle([Incoming(_request())])[0]
            statuses.append(reply.status)
            if reply.status == 200:
                images.append(_images(reply)[0])
        engines = service.engines_started
    finally:
        service.close()
    return {"ready_s": round(ready_s, 2), "device": info.get("device"), "statuses": statuses,
            "engines_started": engines, "same_bytes_across_engines": len(set(images)) == 1,
            "ok": statuses == [200] * 8 and engines >= 3 and len(set(images)) == 1}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write every result here")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu_check needs a CUDA GPU; none is visible here", file=sys.stderr)
        return 2
    from build_model import ensure_tiny_model

    model_dir = ensure_tiny_model()
    report = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "checks": {}}
    checks = {"fp16": lambda: check_fp16(model_dir), "oom": lambda: check_oom(model_dir),
              "gauges": check_gauges, "recycling": lambda: check_recycling(model_dir)}
    for name, check in checks.items():
        started = time.perf_counter()
        try:
            result = check()
        except Exception as exc:  # noqa: BLE001 - reported, and the other checks still run
            result = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                      "traceback": traceback.format_exc()[-2000:]}
        result["seconds"] = round(time.perf_counter() - started, 2)
        report["checks"][name] = result
        print(f"{name:<10} {'ok' if result['ok'] else 'FAILED'} "
              f"{json.dumps({k: v for k, v in result.items() if k != 'traceback'}, default=str)}",
              flush=True)
        if args.json:
            args.json.write_text(json.dumps(report, indent=2, default=str))
    return 0 if all(r["ok"] for r in report["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())

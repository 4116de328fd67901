"""From request bodies to replies: validation, batching, generation, encoding, errors.

This is the whole serving logic without TorchServe: the handler only unpacks TorchServe's
request list into ``Incoming`` items and packs ``Reply`` objects back. Exceptions become
HTTP statuses here and nowhere else.
"""

from __future__ import annotations

import base64
import json
import logging
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import torch

from sdxl_serve.batching import run_batched
from sdxl_serve.contract import (CONTENT_TYPES, GenerationRequest, RequestError, decode_body,
                                 parse_request)
from sdxl_serve.encoding import ImageEncoder
from sdxl_serve.engine import Engine, GeneratedImages

log = logging.getLogger(__name__)

JSON_TYPE = "application/json"
ProgressSink = Callable[[int, dict], None]
"""Receives (index of the request in the batch, progress event) for streaming requests."""


@dataclass(frozen=True)
class Incoming:
    """One request as the server received it."""

    body: Any
    request_id: str = ""
    accept: str = ""


@dataclass
class Reply:
    """One response: status, body bytes, content type and extra headers."""

    status: int
    body: bytes
    content_type: str = JSON_TYPE
    headers: dict[str, str] = field(default_factory=dict)

    def json(self) -> Any:
        return json.loads(self.body)


def raw_format(accept: str) -> str | None:
    """The image format a client asks for as raw bytes through ``Accept``, if any."""
    for part in (accept or "").split(","):
        media = part.split(";")[0].strip().lower()
        for fmt, content_type in CONTENT_TYPES.items():
            if media == content_type:
                return fmt
    return None


def error_reply(exc: BaseException, request_id: str) -> Reply:
    """Map an exception to a status, in one place.

    Bad input is 400 (or the status it carries), out of memory 507, anything else 500
    with the request id that also appears in the log, and never a stack trace.
    """
    if isinstance(exc, RequestError):
        payload = exc.to_json()
        status = exc.status
    elif isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        status = 507
        payload = {"code": status, "type": "OutOfMemory",
                   "message": "the GPU ran out of memory for this request even alone; "
                              "lower width/height or num_images"}
    else:
        status = 500
        log.error("request %s failed: %s", request_id, exc, exc_info=exc)
        payload = {"code": status, "type": "InternalServerError",
                   "message": f"generation failed; quote request id {request_id} when "
                              "reporting it"}
    payload["request_id"] = request_id
    return Reply(status, json.dumps(payload).encode())


class GenerationService:
    """Serves a batch of incoming requests on one engine.

    Example:
        service = GenerationService(engine, model_version="1.0")
        [r.status for r in service.handle([Incoming(b'{"prompt": "x"}')])]
    """

    def __init__(self, engine: Engine, model_version: str = ""):
        self.engine = engine
        self.model_version = model_version
        self.encoder = ImageEncoder(engine.settings)

    def parse(self, item: Incoming) -> GenerationRequest:
        """Validate one body, honouring ``Accept: image/...`` for raw bytes."""
        body = decode_body(item.body)
        request = parse_request(body, self.engine.limits)
        fmt = raw_format(item.accept)
        if fmt is None:
            return request
        if request.num_images != 1:
            raise RequestError("num_images", f"`num_images` must be 1 when asking for raw "
                                             f"image bytes (Accept: {CONTENT_TYPES[fmt]}), "
                                             f"got {request.num_images}")
        if request.stream:
            raise RequestError("stream", "`stream` must be false when asking for raw image "
                                         "bytes; streaming replies are JSON lines")
        if "output_format" in body and request.output_format != fmt:
            raise RequestError("output_format",
                               f"`output_format` is \"{request.output_format}\" but Accept "
                               f"asks for {CONTENT_TYPES[fmt]}; send one or make them agree")
        return replace(request, output_format=fmt)

    def handle(self, items: Sequence[Incoming], progress: ProgressSink | None = None
               ) -> list[Reply]:
        """Return exactly one reply per item; a bad item fails only itself."""
        ids = [item.request_id or uuid.uuid4().hex for item in items]
        replies: list[Reply | None] = [None] * len(items)
        valid: list[tuple[int, GenerationRequest]] = []
        # 1. Validate each request on its own.
        for index, item in enumerate(items):
            try:
                valid.append((index, self.parse(item)))
            except RequestError as exc:
                log.info("request %s refused: field %s", ids[index], exc.field)
                replies[index] = error_reply(exc, ids[index])
        # 2. Generate: one pipeline call per compatible group.
        batch_index = {id(request): index for index, request in valid}
        streaming = {index for index, request in valid if request.stream}

        def generate(group: list[GenerationRequest]) -> list[GeneratedImages]:
            listeners = [batch_index[id(r)] for r in group if batch_index[id(r)] in streaming]
            started = time.perf_counter()

            def on_step(step: int, total: int) -> None:
                event = {"step": step, "total": total,
                         "elapsed_s": round(time.perf_counter() - started, 4)}
                for index in listeners:
                    progress(index, event)

            return self.engine.generate(group, on_step if listeners and progress else None)

        requests = [request for _, request in valid]
        outcomes = run_batched(requests, generate, key=lambda r: r.compat_key,
                               size=lambda r: r.num_images,
                               max_images=self.engine.settings.max_batch_images)
        # 3. Encode every image of the batch in parallel.
        done = [(index, out) for (index, _), out in zip(valid, outcomes)
                if isinstance(out, GeneratedImages)]
        jobs = [(image, out.request.output_format) for _, out in done for image in out.images]
        try:
            encoded = iter(self.encoder.encode_all(jobs))
        except Exception as exc:  # noqa: BLE001 - reported per request below
            encoded = None
            for index, _ in done:
                replies[index] = error_reply(exc, ids[index])
        for (index, _), out in zip(valid, outcomes):
            if isinstance(out, Exception):
                replies[index] = error_reply(out, ids[index])
            elif encoded is not None:
                data = [next(encoded) for _ in out.images]
                replies[index] = self._reply(out, data, ids[index], items[index])
        return replies  # type: ignore[return-value]

    def _reply(self, out: GeneratedImages, data: list[bytes], request_id: str,
               item: Incoming) -> Reply:
        request = out.request
        headers = {"X-Seed": str(request.seed), "X-Request-Id": request_id}
        if self.model_version:
            headers["X-Model-Version"] = self.model_version
        if raw_format(item.accept):
            return Reply(200, data[0], CONTENT_TYPES[request.output_format], headers)
        payload: dict[str, Any] = {
            "image": base64.b64encode(data[0]).decode("ascii"),
            "seed": request.seed,
            "format": request.output_format,
            "width": request.width,
            "height": request.height,
            "model_version": self.model_version,
            "request_id": request_id,
            "timings_s": {stage: round(s, 4) for stage, s in out.seconds.items()},
        }
        if request.num_images > 1:
            payload["images"] = [base64.b64encode(d).decode("ascii") for d in data]
            payload["seeds"] = request.seeds
        return Reply(200, json.dumps(payload).encode(), JSON_TYPE, headers)


"""From request bodies to replies: validation, batching, generation, encoding, errors.

This is the whole serving logic without TorchServe: the handler only unpacks TorchServe's
request list into ``Incoming`` items and packs ``Reply`` objects back. Exceptions become
HTTP statuses here and nowhere else.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import torch

from sdxl_serve.batching import run_batched
from sdxl_serve.contract import (CONTENT_TYPES, ENGINE_CRASHED, FIELD_NAMES, OUT_OF_MEMORY,
                                 SIZE_MULTIPLE, GenerationRequest, ModelLimits, RequestError,
                                 check_content_encoding, check_cost, check_in_body,
                                 decode_object, guidance_factor, parse_fields, request_cost)
from sdxl_serve.encoding import ImageEncoder
from sdxl_serve.engine import (Engine, GeneratedImages, NonFiniteImage, StepCallback,
                               out_of_memory)
from sdxl_serve.engine_process import EngineStalled

log = logging.getLogger(__name__)

JSON_TYPE = "application/json"
# A streamed reply: one JSON object per line (the steps, then the result).
STREAM_TYPE = "application/x-ndjson"
ProgressSink = Callable[[int, dict], None]
"""Receives (index of the request in the batch, progress event) for streaming requests."""


@dataclass(frozen=True)
class Incoming:
    """One request as the server received it."""

    body: Any
    request_id: str = ""
    accept: str = ""
    health: bool = False
    """A deep health check (``X-Health-Check: deep``), not a generation request."""
    cancel_flag: str = ""
    """A file path that its server creates once the client has gone (Triton's request
    cancellation): a pipeline call whose requests all have theirs stops at its next step.
    A path, not an object, because the engine runs in another process."""
    outside_body: tuple[str, ...] = ()
    """Names the request gave beside its body (URL query parameters, a multipart form's
    other fields): refused, never read."""
    content_encoding: str = ""
    """The request's ``Content-Encoding`` where its server passes the body on as sent
    (TorchServe): a compressed body is refused, naming the header."""


@dataclass
class Reply:
    """One response: status, body bytes, content type and extra headers."""

    status: int
    body: bytes
    content_type: str = JSON_TYPE
    headers: dict[str, str] = field(default_factory=dict)

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class BatchStats:
    """What serving one batch measured: the raw material of the worker's metrics."""

    validate_s: float = 0.0
    encode_s: float = 0.0
    calls: list[tuple[int, float, float]] = field(default_factory=list)
    """(requests, denoise seconds, decode seconds) of each pipeline call that succeeded."""
    images: int = 0
    """Images generated and returned."""
    oom_events: int = 0
    """CUDA out-of-memory errors caught (each one split a batch or refused an image)."""
    engine_broken: bool = False
    """A CUDA error other than out-of-memory: the CUDA context may be unusable until the
    process exits, so the engine process should be replaced."""
    refused: int = 0
    """Requests refused by validation: they cost the engine no pipeline work, so they do not
    count against its recycling budget."""
    not_run: list[int] = field(default_factory=list)
    """Positions in this call's items of the requests not run because a CUDA error of
    another pipeline call of the batch broke the engine first (``EngineBroken``): to run
    again on a fresh engine process. Not folded in by ``add`` (positions of another call)."""

    def add(self, other: "BatchStats | None") -> "BatchStats":
        """Fold in the stats of another part of the same batch (served separately)."""
        if other is not None:
            self.validate_s += other.validate_s
            self.encode_s += other.encode_s
            self.calls.extend(other.calls)
            self.images += other.images
            self.oom_events += other.oom_events
            self.engine_broken = self.engine_broken or other.engine_broken
            self.refused += other.refused
        return self


class ImageTooLarge(Exception):
    """One image of this size does not fit in GPU memory, even alone."""

    def __init__(self, request: GenerationRequest, suggestion: tuple[int, int] | None):
        super().__init__(f"one {request.width}x{request.height} image does not fit in GPU "
                         "memory")
        self.width, self.height = request.width, request.height
        self.suggestion = suggestion
        self.guided = guidance_factor(request.guidance_scale) == 2


class GenerationCancelled(Exception):
    """Every client of a pipeline call has gone: the call stopped between two steps."""


def all_cancelled(flags: Sequence[str]) -> bool:
    """Whether every request of a group has a cancel flag and each flag is set."""
    return bool(flags) and all(flags) and all(os.path.exists(flag) for flag in flags)


def remove_cancel_flags(items: Sequence["Incoming"]) -> None:
    """Delete a served batch's cancel flags: each names one request, now answered. What
    made a flag may make it again too late (a cancel racing the batch's end): that one
    stays, an empty file that names nothing in flight."""
    for item in items:
        if item.cancel_flag:
            try:
                os.unlink(item.cancel_flag)
            except OSError:
                pass


class EngineCrashed(Exception):
    """The engine process died each time it ran this request: a poison request, not run
    again, so it cannot take its companions (or the next engine) down with it."""

    kind = ENGINE_CRASHED
    """The error's ``type`` in the JSON body."""

    def __init__(self, runs: int):
        super().__init__(f"the engine process died each of the {runs} times it ran this "
                         "request")
        self.for_client = (f"the engine process died each of the {runs} times it ran this "
                           "request, so it is not run again (requests batched with it are "
                           "served without it)")


class EngineBroken(Exception):
    """A request not run: a CUDA error in another pipeline call of its batch left the
    engine's CUDA context unusable (``BatchStats.engine_broken``), so every call after it
    would fail too. ``RecyclingService`` runs such requests again on a fresh engine."""

    kind = "EngineBroken"
    """The error's ``type`` in the JSON body."""

    def __init__(self):
        super().__init__("not run: a CUDA error of another request of the batch broke the "
                         "engine first")
        self.for_client = ("this request was not run: a GPU error under another request of "
                           "its batch broke the engine first; it may be sent again")


def raw_format(accept: str, wanted: str | None = None) -> str | None:
    """The image format a client asks for as raw bytes through ``Accept``, if any.

    The image type with the highest ``q`` wins, the first listed among equals; but the
    body's own ``output_format`` (``wanted``) wins whenever Accept takes it (``q`` above 0
    and not below JSON's). ``image/*`` takes every image type that is not listed itself
    (RFC 9110: the more specific range's ``q`` counts), and stands for ``wanted``, else PNG.
    None when JSON has a higher ``q``, or when every image type has ``q=0`` ("not
    acceptable", RFC 9110). JSON's ``q`` is the most specific range's that matches it:
    ``application/json``, else ``application/*``, else ``*/*`` (``image/png;q=0.5, */*``
    prefers JSON; ``*/*`` counted for nothing, it got PNG).

        >>> raw_format("image/webp;q=0.5, image/png"), raw_format("image/png;q=0")
        ('png', None)
        >>> raw_format("application/json, image/png;q=0.9"), raw_format("*/*")
        (None, None)
        >>> raw_format("image/png, image/jpeg", "jpeg"), raw_format("image/png", "jpeg")
        ('jpeg', 'png')
        >>> raw_format("image/*"), raw_format("image/*", "webp"), raw_format("image/*;q=0")
        ('png', 'webp', None)
        >>> raw_format("image/png;q=0, image/*", "png"), raw_format("image/*, application/json")
        ('jpeg', 'png')
        >>> raw_format("image/png;q=0.5, */*"), raw_format("image/png;q=0.5, application/*")
        (None, None)
        >>> raw_format("image/png, */*;q=0.2")
        'png'
        >>> raw_format("application/json;q=0.1, */*, image/png;q=0.5")
        'png'
    """
    best, best_q, any_image_q = None, 0.0, 0.0
    json_qs: dict[str, float] = {}  # of each range that matches JSON, by its own name
    taken: dict[str, float] = {}
    for part in (accept or "").split(","):
        media, *parameters = [piece.strip().lower() for piece in part.split(";")]
        q = 1.0
        for parameter in parameters:
            name, _, value = parameter.partition("=")
            if name.strip() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
                q = q if 0.0 <= q <= 1.0 else 0.0  # NaN and out-of-range: not acceptable
        if media in ("application/json", "application/*", "*/*"):
            json_qs[media] = max(json_qs.get(media, 0.0), q)
        elif media == "image/*":
            any_image_q = max(any_image_q, q)
        for fmt, content_type in CONTENT_TYPES.items():
            if media == content_type:
                taken[fmt] = max(taken.get(fmt, 0.0), q)
                if q > best_q:
                    best, best_q = fmt, q
    if any_image_q:
        for fmt in sorted(CONTENT_TYPES, key=lambda f: (f != (wanted or "png"), f != "png")):
            if fmt not in taken:
                taken[fmt] = any_image_q
                if any_image_q > best_q:
                    best, best_q = fmt, any_image_q
    json_q = next((json_qs[media] for media in ("application/json", "application/*", "*/*")
                   if media in json_qs), 0.0)
    if wanted in taken and 0.0 < taken[wanted] >= json_q:
        return wanted
    return best if best_q >= json_q else None


def error_reply(exc: BaseException, request_id: str) -> Reply:
    """``error_replies`` for one request."""
    return error_replies(exc, [request_id])[0]


def error_replies(exc: BaseException, request_ids: Sequence[str]) -> list[Reply]:
    """Map an exception to a status, in one place: a reply for each request it failed.

    Bad input is 400 (or the status it carries), out of memory 507, anything else 500
    with the request id that also appears in the log, and never a stack trace. Each request
    gets its own reply, with its own id; a failure of ours is logged once, naming every
    request it failed: a batch that fails as one (its engine process cannot start, its
    images cannot be encoded) is one traceback in the log, not one per request.

    Example:
        >>> replies = error_replies(RuntimeError("boom"), ["a", "b"])
        >>> [(r.status, r.json()["request_id"], r.json()["message"]) for r in replies]
        ... # doctest: +NORMALIZE_WHITESPACE
        [(500, 'a', 'generation failed; quote request id a when reporting it'),
         (500, 'b', 'generation failed; quote request id b when reporting it')]
    """
    failed = (f"request {request_ids[0]}" if len(request_ids) == 1 else
              f"{len(request_ids)} requests ({', '.join(request_ids)})")
    # The start of a message that ends by asking to quote the request's own id.
    quote = ""
    if isinstance(exc, RequestError):
        payload = exc.to_json()
        status = exc.status
    elif isinstance(exc, ImageTooLarge):
        status = 507
        # Only what the request can still change: a smaller size where the model takes one,
        # guidance off where it is on (told to one that had it off, a client tried again).
        ways = []
        if exc.suggestion:
            ways.append(f"lower `width` and `height`, e.g. to {exc.suggestion[0]}x"
                        f"{exc.suggestion[1]}")
        if exc.guided:
            ways.append("set `guidance_scale` to 1 or less (half the memory)")
        how = ", or ".join(ways) or "no request of this model fits this GPU's free memory"
        payload = {"code": status, "type": OUT_OF_MEMORY,
                   "message": f"one {exc.width}x{exc.height} image does not fit in GPU memory, "
                              f"even alone: {how}"}
    elif isinstance(exc, GenerationCancelled):
        # nginx's "client closed request": nobody reads it, but logs and metrics tell it
        # from a failure (a 4xx: no health check, no circuit breaker count).
        status = 499
        payload = {"code": status, "type": "Cancelled",
                   "message": "the client cancelled the request; its generation was stopped"}
    elif isinstance(exc, (EngineCrashed, EngineStalled, NonFiniteImage, EngineBroken)):
        status = 500
        if not isinstance(exc, EngineBroken):  # said with the error that broke the engine
            log.error("%s: %s; answering %s with an error", failed, exc,
                      "it" if len(request_ids) == 1 else "each")
        payload = {"code": status, "type": exc.kind}
        quote = f"{exc.for_client}. Quote"
    elif isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        # Not out_of_memory(): a failed engine start quotes its child's error, which may
        # be cuBLAS's, and is no request's size (500, and the deep check follows).
        status = 507
        payload = {"code": status, "type": OUT_OF_MEMORY,
                   "message": "the GPU ran out of memory for this request even alone; "
                              "lower width/height or num_images"}
    else:
        status = 500
        log.error("%s failed: %s", failed, exc, exc_info=exc)
        payload = {"code": status, "type": "InternalServerError"}
        quote = "generation failed; quote"
    replies = []
    for request_id in request_ids:
        body = dict(payload)
        if quote:
            body["message"] = f"{quote} request id {request_id} when reporting it"
        body["request_id"] = request_id
        replies.append(Reply(status, json.dumps(body).encode()))
    return replies


def refused_field(field: str) -> str:
    """How the log names a refused request's field: one of the contract's by name, any
    other as "an unknown field" only. A name the client chose is the client's text (a
    prompt sent as a key, a URL query parameter's name) and prompts are never logged; the
    400 body gives the name back to the client.

    >>> refused_field("width")
    "field 'width'"
    >>> refused_field("a lighthouse at dawn")
    'an unknown field (its name is not logged)'
    """
    if field in FIELD_NAMES or field in ("body", "Content-Encoding"):
        return f"field {field!r}"
    return "an unknown field (its name is not logged)"


def parse_incoming(item: Incoming, limits: ModelLimits) -> GenerationRequest:
    """Validate one body against the model's ``limits``, honouring ``Accept: image/...``
    for raw bytes. What is wrong with the request itself is said before what the server
    limits (its cost)."""
    check_content_encoding(item.content_encoding)
    check_in_body(item.outside_body)
    body = decode_object(item.body)
    request = parse_fields(body, limits)
    fmt = raw_format(item.accept, body.get("output_format"))
    if fmt is None:
        check_cost(request, limits)
        return request
    if request.num_images != 1:
        raise RequestError("num_images", f"`num_images` must be 1 when asking for raw "
                                         f"image bytes (Accept: {CONTENT_TYPES[fmt]}), "
                                         f"got {request.num_images}")
    if request.stream:
        raise RequestError("stream", "`stream` must be false when asking for raw image "
                                     "bytes; streaming replies are JSON lines")
    if body.get("output_format") is not None and request.output_format != fmt:
        raise RequestError("output_format",
                           f"`output_format` is \"{request.output_format}\" but Accept "
                           f"asks for {CONTENT_TYPES[fmt]}; send one or make them agree")
    check_cost(request, limits)
    return replace(request, output_format=fmt)


class GenerationService:
    """Serves a batch of incoming requests on one engine.

    Example:
        service = GenerationService(engine, model_version="1.0")
        [r.status for r in service.handle([Incoming(b'{"prompt": "x"}')])]
    """

    def __init__(self, engine: Engine, model_version: str = "",
                 heartbeat: Callable[[], None] | None = None):
        self.engine = engine
        self.model_version = model_version
        self.encoder = ImageEncoder(engine.settings)
        # Called between denoising steps and before encoding: the engine process's sign of
        # life to the worker (its stall deadline); it decides itself how often to speak.
        self.heartbeat = heartbeat

    def parse(self, item: Incoming) -> GenerationRequest:
        """``parse_incoming`` with this engine's limits."""
        return parse_incoming(item, self.engine.limits)

    def handle(self, items: Sequence[Incoming], progress: ProgressSink | None = None
               ) -> list[Reply]:
        """Return exactly one reply per item; a bad item fails only itself."""
        return self.serve(items, progress)[0]

    def serve(self, items: Sequence[Incoming], progress: ProgressSink | None = None
              ) -> tuple[list[Reply], BatchStats]:
        """``handle``, plus what the batch measured (stage times, pipeline calls, OOMs)."""
        stats = BatchStats()
        started = batch_started = time.perf_counter()
        ids = [item.request_id or uuid.uuid4().hex for item in items]
        replies: list[Reply | None] = [None] * len(items)
        valid: list[tuple[int, GenerationRequest]] = []
        # 1. Validate each request on its own.
        for index, item in enumerate(items):
            try:
                valid.append((index, self.parse(item)))
            except RequestError as exc:
                log.info("request %s refused: %s", ids[index], refused_field(exc.field))
                replies[index] = error_reply(exc, ids[index])
                stats.refused += 1
            except Exception as exc:  # a bug of ours in validation fails its request alone,
                replies[index] = error_reply(exc, ids[index])  # not the batch or the engine
        stats.validate_s = time.perf_counter() - started
        # 2. Generate: one pipeline call per compatible group.
        batch_index = {id(request): index for index, request in valid}
        streaming = {index for index, request in valid if request.stream}

        def watch(part: list[GenerationRequest]) -> StepCallback | None:
            """The step callback of one pipeline call: its own requests' progress and cancel
            flags, so each half of a split batch stops on its own requests' flags."""
            indexes = [batch_index[id(r)] for r in part]
            listeners = [index for index in indexes if index in streaming]
            flags = [items[index].cancel_flag for index in indexes]
            if all_cancelled(flags):
                raise GenerationCancelled()

            def on_step(step: int, total: int) -> None:
                # From the batch's start, not this call's: the calls of a batch split by an
                # out-of-memory error count on, where each started again from 0.
                event = {"step": step, "total": total,
                         "elapsed_s": round(time.perf_counter() - batch_started, 4)}
                if progress is not None:
                    for index in listeners:
                        progress(index, event)
                if self.heartbeat is not None:
                    self.heartbeat()
                # Raised inside the pipeline's step callback, the exception ends the call
                # at once (pipe._interrupt would run out the loop and still decode).
                if all_cancelled(flags):
                    raise GenerationCancelled()

            return on_step if (listeners and progress) or all(flags) or self.heartbeat \
                else None

        def generate(group: list[GenerationRequest]) -> list[GeneratedImages | Exception]:
            if stats.engine_broken:
                raise EngineBroken()  # a call on this engine fails before it starts
            return self._generate_fitting(group, watch, stats)

        def retry_alone(exc: Exception) -> bool:
            # A request that breaks the pipeline (not memory: that was split and retried
            # already) should fail alone; a broken CUDA context fails everything anyway.
            if isinstance(exc, (ImageTooLarge, GenerationCancelled)) or stats.engine_broken:
                return False
            log.warning("a batched pipeline call failed (%s: %s); running its requests one "
                        "by one", type(exc).__name__, exc)
            return True

        requests = [request for _, request in valid]
        limits = self.engine.limits
        outcomes = run_batched(requests, generate, key=lambda r: r.compat_key,
                               size=lambda r: r.num_images,
                               max_images=self.engine.settings.max_batch_images,
                               retry_alone=retry_alone,
                               cost=lambda r: request_cost(r, limits),
                               max_cost=self.engine.settings.max_call_cost)
        stats.not_run = [index for (index, _), out in zip(valid, outcomes)
                         if isinstance(out, EngineBroken)]
        # 3. Encode every image of the batch in parallel.
        done = [(index, out) for (index, _), out in zip(valid, outcomes)
                if isinstance(out, GeneratedImages)]
        jobs = [(image, out.request.output_format) for _, out in done for image in out.images]
        if self.heartbeat is not None:
            self.heartbeat()
        started = time.perf_counter()
        # Each exception with the requests it failed: answered, and logged, together.
        failures: dict[int, tuple[Exception, list[int]]] = {}
        try:
            encoded = iter(self.encoder.encode_all(jobs))
            stats.images = len(jobs)
        except Exception as exc:  # noqa: BLE001 - reported per request below
            encoded = None
            failures[id(exc)] = (exc, [index for index, _ in done])
        stats.encode_s = time.perf_counter() - started
        for (index, _), out in zip(valid, outcomes):
            if isinstance(out, Exception):
                # One exception may fail a whole pipeline call (a broken CUDA context is
                # not retried request by request).
                failures.setdefault(id(out), (out, []))[1].append(index)
            elif encoded is not None:
                data = [next(encoded) for _ in out.images]
                replies[index] = self._reply(out, data, ids[index], items[index])
        for exc, failed in failures.values():
            for index, reply in zip(failed, error_replies(exc, [ids[i] for i in failed])):
                replies[index] = reply
        return replies, stats  # type: ignore[return-value]

    def _generate_fitting(self, group: list[GenerationRequest],
                          watch: Callable[[list[GenerationRequest]], StepCallback | None],
                          stats: BatchStats) -> list[GeneratedImages | Exception]:
        """One pipeline call; when CUDA runs out of memory, split it in two and retry. A
        request of more images than ``max_batch_images`` is split up front.

        A group splits by requests, a single request by images (each image has its own
        seed, so the images are the same as in one call). Only one image that does not fit
        alone is refused (``ImageTooLarge``, 507). ``watch(group)`` gives a call its step
        callback; a half whose requests were all canceled is answered ``GenerationCancelled``
        per request while the other half is served.
        """
        on_step = watch(group)
        most = self.engine.settings.max_batch_images
        if len(group) == 1 and group[0].num_images > most:
            # A request may ask more images (max_num_images) than one call may carry: it
            # went whole into one call, past the memory and the compiled shapes planned.
            return self._generate_images_apart(group[0], most, on_step, stats)
        try:
            results = self.engine.generate(group, on_step)
        except RuntimeError as exc:
            if not out_of_memory(exc):
                stats.engine_broken = stats.engine_broken or "CUDA error" in str(exc)
                raise
            stats.oom_events += 1
            log.warning("CUDA out of memory for %d image(s) of %dx%d: %s",
                        sum(r.num_images for r in group), group[0].width, group[0].height, exc)
        else:
            seconds = results[0].seconds
            stats.calls.append((len(group), seconds["denoise"], seconds["decode"]))
            return results
        # Out of the except block, so the failed call's tensors (held by the traceback)
        # are gone before the cache is emptied and the halves run.
        if self.engine.device.type == "cuda":
            torch.cuda.empty_cache()
        if len(group) > 1:
            half = len(group) // 2
            return (self._generate_part(group[:half], watch, stats)
                    + self._generate_part(group[half:], watch, stats))
        request = group[0]
        if request.num_images == 1:
            raise ImageTooLarge(request, self._smaller_size(request))
        return self._generate_images_apart(request, request.num_images // 2, on_step, stats)

    def _generate_images_apart(self, request: GenerationRequest, first_images: int,
                               on_step: StepCallback | None, stats: BatchStats
                               ) -> list[GeneratedImages]:
        """One request's images in two parts, its first ``first_images`` and the rest,
        each split further as it needs (each image has its own seed, so the images are
        those of one call)."""
        first = replace(request, num_images=first_images)
        second = replace(request, num_images=request.num_images - first_images,
                         seed=request.seeds[first_images])
        # The parts are one request's images: its callback, whoever asks.
        same = lambda part: on_step  # noqa: E731
        parts = (self._generate_fitting([first], same, stats)
                 + self._generate_fitting([second], same, stats))
        seconds = {stage: sum(p.seconds.get(stage, 0.0) for p in parts)
                   for stage in parts[0].seconds}
        return [GeneratedImages(request, parts[0].images + parts[1].images, seconds)]

    def _generate_part(self, part: list[GenerationRequest],
                       watch: Callable[[list[GenerationRequest]], StepCallback | None],
                       stats: BatchStats) -> list[GeneratedImages | Exception]:
        """``_generate_fitting`` for one half of a split group: a cancel ends this half's
        requests alone, not their companions in the other half."""
        try:
            return self._generate_fitting(part, watch, stats)
        except GenerationCancelled as exc:
            return [exc] * len(part)

    def _smaller_size(self, request: GenerationRequest) -> tuple[int, int] | None:
        """Three quarters of each side, on the size grid and within the model's bounds."""
        low = self.engine.limits.min_size
        width, height = (max(low, side * 3 // 4 // SIZE_MULTIPLE * SIZE_MULTIPLE)
                         for side in (request.width, request.height))
        return None if (width, height) == (request.width, request.height) else (width, height)

    def _reply(self, out: GeneratedImages, data: list[bytes], request_id: str,
               item: Incoming) -> Reply:
        request = out.request
        headers = {"X-Seed": str(request.seed), "X-Request-Id": request_id,
                   "X-Image-Size": f"{request.width}x{request.height}"}
        if self.model_version:
            headers["X-Model-Version"] = self.model_version
        if raw_format(item.accept, request.output_format):
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


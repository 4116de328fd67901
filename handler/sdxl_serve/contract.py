"""The request contract: every field declared once.

``FIELDS`` is the single declaration of what a generation request may hold: name, type,
default, bounds and description. Parsing, the error messages, the JSON schema
(``json_schema``) and the field table of docs/api.md (``markdown_table``) all derive from it.

Bounds that depend on the model (image size, how many images) come from ``ModelLimits``,
which the engine reads off the loaded pipeline, not from constants here.

Example:
    >>> limits = ModelLimits(default_size=64, min_size=32, max_size=128)
    >>> request = parse_request(b'{"prompt": "a red fox", "seed": 7}', limits)
    >>> (request.width, request.seed, request.num_inference_steps)
    (64, 7, 30)
    >>> parse_request(b'{"prompt": "x", "widht": 64}', limits)
    Traceback (most recent call last):
    ...
    sdxl_serve.contract.RequestError: `widht` is not a known field (did you mean `width`?)
"""

from __future__ import annotations

import decimal
import difflib
import functools
import json
import math
import secrets
import sys
import unicodedata
from dataclasses import dataclass, fields
from typing import Any, Callable, Mapping, Sequence

# The `type` of the error replies another process acts on by name: the dispatcher (a job
# failed for good, or sent back to the queue) and the pod's drain (a barrier that went
# through). Here, not in service.py, because those import neither torch nor the engine.
OUT_OF_MEMORY = "OutOfMemory"
ENGINE_CRASHED = "EngineCrashed"
CIRCUIT_OPEN = "CircuitOpen"

MAX_SEED = 2**64 - 1
# The most images any server lets a request ask for: the bound of setting max_num_images.
MOST_NUM_IMAGES = 64
MAX_PROMPT_CHARS = 2000
SIZE_MULTIPLE = 8
SCHEDULERS = ("euler", "euler_ancestral", "dpmpp_2m", "ddim")
OUTPUT_FORMATS = ("png", "jpeg", "webp")
CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


class RequestError(ValueError):
    """A request we refuse, with the HTTP status and the field it is about.

    The message names the field, the value and the rule, and says what to do.
    """

    kind = "InvalidRequest"
    """The error's ``type`` in the JSON body."""

    def __init__(self, field: str, message: str, status: int = 400):
        super().__init__(message)
        self.field = field
        self.status = status

    def to_json(self) -> dict[str, Any]:
        return {"code": self.status, "type": self.kind, "field": self.field,
                "message": str(self)}


@dataclass(frozen=True)
class ModelLimits:
    """What the loaded model allows: sizes in pixels, and how many images a request may ask."""

    default_size: int
    min_size: int
    max_size: int
    max_num_images: int = 4
    default_steps: int = 30
    default_guidance_scale: float = 5.0
    default_scheduler: str = "euler"
    max_request_cost: float = 4.0
    """Most work one request may ask for, in default requests (see ``request_cost``)."""

    @classmethod
    def published(cls, limits: Mapping[str, Any]) -> "ModelLimits":
        """The limits a worker published (``asdict`` of its own), keeping only the fields
        this version knows: in a rolling update a newer worker may publish more, and the
        older job API must go on taking requests.

        Example:
            >>> ModelLimits.published({"default_size": 64, "min_size": 64, "max_size": 128,
            ...                        "max_frames": 8}).max_size
            128
        """
        known = {field.name for field in fields(cls)}
        return cls(**{key: value for key, value in limits.items() if key in known})


# SDXL base 1.0's bounds (128 latent x 8), as docs/api.md and the shipped schema state them;
# a served model reports its own through Engine.limits.
SDXL_LIMITS = ModelLimits(default_size=1024, min_size=512, max_size=2048)


@dataclass(frozen=True)
class Field:
    """One request field: its type, default, bounds and description, declared once."""

    name: str
    kind: str  # "string", "integer", "number", "boolean" or "enum"
    description: str
    required: bool = False
    default: Callable[[ModelLimits], Any] = lambda limits: None
    low: Callable[[ModelLimits], float] | None = None
    high: Callable[[ModelLimits], float] | None = None
    choices: tuple[str, ...] = ()
    multiple_of: int = 1
    not_blank: bool = False

    def bounds(self, limits: ModelLimits) -> tuple[Any, Any]:
        low = self.low(limits) if self.low else None
        high = self.high(limits) if self.high else None
        return low, high

    def rule(self, limits: ModelLimits) -> str:
        """The rule in words, as the error messages and docs/api.md state it."""
        low, high = self.bounds(limits)
        if self.kind == "string":
            rule = f"a string of {low} to {high} characters"
            # Not blank: whitespace and invisible characters alone are (``_invisible``).
            return rule + (", with a visible character" if self.not_blank else "")
        if self.kind == "enum":
            return "one of " + ", ".join(f'"{c}"' for c in self.choices)
        if self.kind == "boolean":
            return "true or false"
        noun = "an integer" if self.kind == "integer" else "a finite number"
        if self.multiple_of > 1:
            noun = f"a multiple of {self.multiple_of}"
        return f"{noun} from {number_text(low)} to {number_text(high)}"


def number_text(value: float) -> str:
    """A number's shortest exact text, a whole one without ".0": in the rules' words, and
    on the job API's /metrics (where ``:g`` kept 6 digits, and a counter past 999,999 read
    1.23457e+06 and stood still for ``rate()``).

    Example:
        >>> number_text(1234567.0), number_text(0), number_text(98765.4321)
        ('1234567', '0', '98765.4321')
    """
    return str(int(value)) if float(value).is_integer() else str(value)


FIELDS: tuple[Field, ...] = (
    Field("prompt", "string", "What to draw.", required=True, not_blank=True,
          low=lambda m: 1, high=lambda m: MAX_PROMPT_CHARS),
    Field("negative_prompt", "string", "What to steer away from.",
          default=lambda m: "", low=lambda m: 0, high=lambda m: MAX_PROMPT_CHARS),
    Field("num_inference_steps", "integer", "Denoising steps: more is slower and finer.",
          default=lambda m: m.default_steps, low=lambda m: 1, high=lambda m: 100),
    Field("guidance_scale", "number",
          "Classifier-free guidance; 1 or less turns it off (about twice as fast).",
          default=lambda m: m.default_guidance_scale, low=lambda m: 0, high=lambda m: 30),
    Field("width", "integer", "Image width in pixels; the bounds come from the model.",
          default=lambda m: m.default_size, low=lambda m: m.min_size,
          high=lambda m: m.max_size, multiple_of=SIZE_MULTIPLE),
    Field("height", "integer", "Image height in pixels; the bounds come from the model.",
          default=lambda m: m.default_size, low=lambda m: m.min_size,
          high=lambda m: m.max_size, multiple_of=SIZE_MULTIPLE),
    Field("seed", "integer",
          "Seed of the first image (image i uses seed + i, wrapping to 0 past the largest); "
          "drawn at random and returned when absent, so any image can be made again.",
          low=lambda m: 0, high=lambda m: MAX_SEED),
    Field("num_images", "integer", "Images to generate from this prompt.",
          default=lambda m: 1, low=lambda m: 1, high=lambda m: m.max_num_images),
    Field("scheduler", "enum", "Sampler; the model's own when absent.",
          default=lambda m: m.default_scheduler, choices=SCHEDULERS),
    Field("output_format", "enum", "Image encoding.",
          default=lambda m: "png", choices=OUTPUT_FORMATS),
    Field("stream", "boolean",
          "Send one JSON line per denoising step before the result (chunked response).",
          default=lambda m: False),
)
FIELD_NAMES = tuple(f.name for f in FIELDS)


@dataclass(frozen=True)
class GenerationRequest:
    """One validated request. Built only by ``parse_request``, so every value is in range."""

    prompt: str
    negative_prompt: str
    num_inference_steps: int
    guidance_scale: float
    width: int
    height: int
    seed: int
    num_images: int
    scheduler: str
    output_format: str
    stream: bool

    @property
    def compat_key(self) -> tuple:
        """Requests with equal keys can share one batched pipeline call.

        With or without a negative prompt too: SDXL gives a request without one zero
        embeddings, but a call that has any negative prompt encodes the others' "" as text,
        which changes their images far beyond rounding."""
        return (self.width, self.height, self.num_inference_steps, self.guidance_scale,
                self.scheduler, bool(self.negative_prompt))

    @property
    def seeds(self) -> list[int]:
        """One seed per image, so each image can be reproduced alone."""
        return image_seeds(self.seed, self.num_images)


def image_seeds(seed: int, num_images: int) -> list[int]:
    """The seed of each image of a request: ``seed``, then the next ones (wrapping).

    >>> image_seeds(MAX_SEED, 2)
    [18446744073709551615, 0]
    """
    return [(seed + i) % (MAX_SEED + 1) for i in range(num_images)]


def _reject_constant(name: str) -> Any:
    raise RequestError("body", f"the body must be JSON without {name}: send finite numbers")


class _Rounded(float):
    """A JSON number whose digits a float does not hold, read as the integer it rounds
    to, as 0 (a fraction too small, ``1.5e-400``) or as infinity (``1e400``, or 4000 digits
    and ``.0``): ``text`` is what was written, which an error shows. No integer field takes
    one (``seed`` 9007199254740993.0 would have been 9007199254740992)."""

    text = ""


def _exactly(text: str, value: float) -> bool:
    """Whether the float ``value`` is exactly the number ``text`` writes."""
    try:
        return decimal.Decimal(text) == decimal.Decimal(value)
    except decimal.InvalidOperation:
        # An exponent past what Decimal holds (about 10**18, ``1e-9999999999999999999``):
        # the float is then 0 (an integral float that large is infinite, not integral),
        # exact only when every digit written is 0. Uncaught, it was a 500.
        return not any(digit in "123456789" for digit in text.lower().partition("e")[0])


def _read_float(text: str) -> float:
    """``json.loads``' reader of numbers written with a fraction or an exponent.

    >>> _read_float("30.0"), _read_float("3e1"), _read_float("7.5")
    (30.0, 30.0, 7.5)
    >>> rounded = _read_float("9007199254740993.0")
    >>> type(rounded).__name__, rounded, rounded.text
    ('_Rounded', 9007199254740992.0, '9007199254740993.0')
    """
    value = float(text)
    if (value.is_integer() or math.isinf(value)) and not _exactly(text, value):
        rounded = _Rounded(value)
        rounded.text = text
        return rounded
    return value


class _Repeated(dict):
    """A JSON object that holds a key twice; ``key`` is the first such key."""

    key = ""


def _keep_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Marked, not refused here: this hook sees nested objects too (first), and only the
    # body's own fields have names the client should be told about. A nested object is
    # refused anyway, by its field's type.
    body: dict[str, Any] = {}
    for key, value in pairs:
        if key in body and not isinstance(body, _Repeated):
            body = _Repeated(body)
            body.key = key
        body[key] = value
    return body


def _client_name(name: str) -> tuple[str, str]:
    """A field name from the client as the error's ``field`` (cut at 60 characters) and as
    its message quotes it (``repr()`` when not printable), so that a long or multi-line
    name can neither flood a reply nor forge a line where the message is shown."""
    shown = name if len(name) <= 60 else name[:60] + "..."
    return shown, (shown if shown.isprintable() else repr(shown))


def check_in_body(names: Sequence[str]) -> None:
    """Refuse fields sent beside the JSON body: URL query parameters, which TorchServe hands
    to the handler next to the body on some routes (``/invocations?width=33``), or the other
    fields of a multipart form whose ``data`` part is the body. Read nowhere, they were
    dropped without a word, the default width served.

    >>> check_in_body([])
    >>> check_in_body(["width"])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    sdxl_serve.contract.RequestError: `width` was sent beside the JSON body, as a URL query ...
    """
    if names:
        shown, quoted = _client_name(str(names[0]))
        # The handler cannot tell the two apart: TorchServe gives both as named values.
        raise RequestError(shown, f"`{quoted}` was sent beside the JSON body, as a URL query "
                                  f"parameter or a form field; only the JSON body is read: "
                                  f"send every field there")


class UnsupportedMediaType(RequestError):
    """A body in a form the server does not read (415), as the job API names it."""

    kind = "UnsupportedMediaType"


def check_content_encoding(value: str) -> None:
    """Refuse a body sent compressed (``Content-Encoding`` other than ``identity``):
    TorchServe hands the bytes over as sent, so a gzipped body was a 400 saying byte 1 is
    not valid UTF-8, with nothing about the compression; a 415 naming the header, as the
    job API answers it.

    >>> check_content_encoding(""), check_content_encoding(" Identity ")
    (None, None)
    >>> check_content_encoding("gzip")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    sdxl_serve.contract.UnsupportedMediaType: `Content-Encoding` must be identity or absent ...
    """
    if any(coding.strip().lower() not in ("", "identity") for coding in value.split(",")):
        raise UnsupportedMediaType(
            "Content-Encoding", f"`Content-Encoding` must be identity or absent (the body is "
                                f"read as sent, not decompressed), got {value[:80]!r}; send "
                                f"the body uncompressed", status=415)


def decode_body(raw: Any) -> Any:
    """Parse a request body strictly: UTF-8 JSON, no NaN/Infinity, no repeated keys.

    A leading byte order mark is skipped, as RFC 8259 allows a parser to: Triton's parser
    skips it, so a body saved by an editor that writes one was served there and refused
    here ("Unexpected UTF-8 BOM (decode using utf-8-sig)").

    >>> decode_body(b'\\xef\\xbb\\xbf{"prompt": "x"}')
    {'prompt': 'x'}
    """
    if isinstance(raw, (bytes, bytearray, memoryview)):
        try:
            raw = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RequestError("body", f"the body must be UTF-8 JSON: byte {exc.start} "
                                       "is not valid UTF-8") from None
    if not isinstance(raw, str):
        return raw  # already decoded by the server; still validated below
    raw = raw.removeprefix("\ufeff")
    if not raw.strip():
        raise RequestError("body", 'the body is empty or was not sent as JSON: send a JSON '
                                   'object such as {"prompt": "a red fox"} with '
                                   'Content-Type: application/json')
    try:
        body = json.loads(raw, parse_float=_read_float, parse_constant=_reject_constant,
                          object_pairs_hook=_keep_repeats)
    except json.JSONDecodeError as exc:
        raise RequestError("body", f"the body is not valid JSON: {exc.msg} at line "
                                   f"{exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise RequestError("body", "the body is nested too deeply to be a request") from None
    except RequestError:  # NaN or Infinity (_reject_constant); a ValueError too
        raise
    except ValueError:  # Python refuses to read an integer of more than 4300 digits
        raise RequestError("body", "the body holds a number with more than 4300 digits; "
                                   "no field takes one") from None
    if isinstance(body, _Repeated):
        shown, quoted = _client_name(body.key)
        raise RequestError(shown, f"`{quoted}` is given twice; send each field once")
    return body


def decode_object(raw: Any) -> dict:
    """``decode_body``, and the body must be a JSON object.

    Decode once: a body that is a JSON string decodes to text, which decoded again would
    be taken for the body itself.

    Example:
        >>> decode_object(b'"a red fox"')  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        sdxl_serve.contract.RequestError: the body must be a JSON object, got a string; ...
    """
    body = decode_body(raw)
    if not isinstance(body, dict):
        raise RequestError("body", f"the body must be a JSON object, got {_json_type(body)}; "
                                   'send for example {"prompt": "a red fox"}')
    return body


def parse_request(raw: Any, limits: ModelLimits) -> GenerationRequest:
    """Validate a body (bytes or text to decode, or the dict ``decode_object`` gave) into a
    ``GenerationRequest``: ``parse_fields``, then ``check_cost``.

    Raises:
        RequestError: naming the field, the value and the rule.
    """
    request = parse_fields(raw, limits)
    check_cost(request, limits)
    return request


def parse_fields(raw: Any, limits: ModelLimits) -> GenerationRequest:
    """``parse_request`` without the cost limit: each field by its own declaration, for an
    adapter that refuses what is wrong with the request itself before what its server
    limits (the job API: a `stream` it does not take before the cost).

    Raises:
        RequestError: naming the field, the value and the rule.
    """
    body = raw if isinstance(raw, dict) else decode_object(raw)
    check_field_names(body)
    values = {field.name: _field_value(field, body, limits) for field in FIELDS}
    if values["seed"] is None:
        values["seed"] = secrets.randbelow(MAX_SEED + 1)
    return GenerationRequest(**values)


def parse_field(name: str, value: Any, limits: ModelLimits) -> Any:
    """One field's value checked by its declaration alone, for an adapter that gets a field
    outside the body (Triton's ``stream`` request parameter): the rule and the message are
    the ones ``parse_request`` gives.

    Example:
        >>> parse_field("stream", True, SDXL_LIMITS)
        True
        >>> parse_field("stream", "yes", SDXL_LIMITS)
        Traceback (most recent call last):
        ...
        sdxl_serve.contract.RequestError: `stream` must be true or false, got "yes" (a string)
    """
    field = next(field for field in FIELDS if field.name == name)
    return _field_value(field, {name: value}, limits)


def check_field_names(body: Mapping[str, Any], known: Sequence[str] = FIELD_NAMES) -> None:
    """Refuse the first name of ``body`` not in ``known`` (the contract's fields, or an
    adapter's that adds its own, checked before it takes them out)."""
    for name in body:
        if name not in known:
            raise unknown_field(name, known)


def unknown_field(name: str, known: Sequence[str] = FIELD_NAMES) -> RequestError:
    """The refusal of a field name not in ``known`` (the contract's fields, or an adapter's
    that adds its own), with a "did you mean"."""
    shown, quoted = _client_name(name)
    return RequestError(shown, _unknown_field_message(name, quoted, known))


def _unknown_field_message(name: str, shown: str, known: Sequence[str]) -> str:
    shown = f"`{shown}`"  # every message names its field in backticks
    close = difflib.get_close_matches(str(name), known, n=1, cutoff=0.6) or \
        [field for field in known if len(name) >= 3 and name.lower() in field]
    hint = f" (did you mean `{close[0]}`?)" if close else \
        f"; known fields: {', '.join(known)}"
    return f"{shown} is not a known field{hint}"


def _field_value(field: Field, body: Mapping[str, Any], limits: ModelLimits) -> Any:
    if field.name not in body or (body[field.name] is None and not field.required):
        if field.required:
            raise RequestError(field.name, f"`{field.name}` is required: "
                                           f"{field.rule(limits)}")
        return field.default(limits)
    value = body[field.name]
    if field.kind == "integer" and isinstance(value, float) and value.is_integer() and \
            abs(value) <= 2 ** 53 and not isinstance(value, _Rounded):
        value = int(value)  # JSON has one number type: 2.0 is 2 (JSON Schema's integer too)
    problem = _check(field, value, limits)
    if problem is not None:
        raise RequestError(field.name, f"`{field.name}` must be {field.rule(limits)}, "
                                       f"got {_show(value)}{problem}")
    if field.kind == "number":
        return float(value)
    return value


def _check(field: Field, value: Any, limits: ModelLimits) -> str | None:
    """Return None when ``value`` obeys the field's rule, else a (possibly empty) detail."""
    low, high = field.bounds(limits)
    if field.kind == "string":
        if not isinstance(value, str):
            return f" ({_json_type(value)})"
        if "\x00" in value:
            return " (it holds a NUL character)"
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:  # JSON allows lone surrogates; tokenizers do not
            return f" (it holds an unpaired surrogate at character {exc.start})"
        if not low <= len(value) <= high:
            return f" ({len(value)} characters)"
        if field.not_blank and all(map(_invisible, value)):
            return ""
        return None
    if field.kind == "enum":
        return None if isinstance(value, str) and value in field.choices else ""
    if field.kind == "boolean":
        return None if isinstance(value, bool) else f" ({_json_type(value)})"
    # Booleans are ints in Python, never in our JSON.
    if isinstance(value, bool):
        return " (a boolean)"
    if field.kind == "integer" and not isinstance(value, int):
        if isinstance(value, _Rounded):
            if math.isinf(value):
                return ""  # the bounds say it: "from 0 to ..., got 1e400"
            if value == 0:  # a fraction too small for a float (1.5e-400), not 0
                return f" ({_json_type(value)})"
            return f" (more digits than a number keeps: it reads as {value:.0f})"
        if isinstance(value, float) and value.is_integer():  # beyond 2**53: not exact
            return " (a number that large is exact only without a fraction or exponent)"
        return f" ({_json_type(value)})"
    if field.kind == "number":
        if not isinstance(value, (int, float)):
            return f" ({_json_type(value)})"
        try:
            finite = math.isfinite(value)
        except OverflowError:  # an integer beyond the largest float
            finite = False
        if not finite:
            return ""
    if not low <= value <= high:
        return ""
    # Only a real grid: every number is a "multiple" of 1 (7.5 % 1 is 0.5, not a refusal).
    if field.multiple_of > 1 and value % field.multiple_of:
        return ""
    return None


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object" if isinstance(value, dict) else type(value).__name__


def _show(value: Any, limit: int = 60) -> str:
    """A short, log-safe rendering of a client's value (long strings are cut)."""
    if isinstance(value, str):
        text = json.dumps(value if len(value) <= limit else value[:limit] + "...")
    else:
        try:
            # A rounded number as written, not as it rounds.
            text = value.text if isinstance(value, _Rounded) else json.dumps(value)
        except RecursionError:  # parsed within Python's limit, but deeper than dumps goes
            text = f"{_json_type(value)} nested too deeply to show"
        except (TypeError, ValueError):
            text = repr(value)
        if len(text) > limit:
            text = text[:limit] + "..."
    return text


# --- Cost: how much work a request asks for. ---------------------------------------------

COST_FIELDS = ("num_images", "width", "height", "num_inference_steps", "guidance_scale")
"""The fields that set a request's cost; every other field costs (almost) nothing."""
_COST_SLACK = 1e-9  # a request at exactly the limit passes despite float rounding


def guidance_factor(guidance_scale: float) -> int:
    """2 with classifier-free guidance (the UNet runs on the prompt and the negative prompt
    each step), else 1: the rule of diffusers' SDXL pipeline, guidance on above 1."""
    return 2 if guidance_scale > 1 else 1


def _work(num_images: int, width: int, height: int, steps: int, guidance_scale: float) -> int:
    return num_images * width * height * steps * guidance_factor(guidance_scale)


def request_cost(request: GenerationRequest, limits: ModelLimits) -> float:
    """The work a request asks for, in default requests.

    images x pixels x steps, doubled with guidance, divided by the same product for one
    default request: one image at the model's native size, default steps and guidance. So
    a limit holds for any model (the tiny one's 64x64 and SDXL's 1024x1024 both cost 1).

    Example:
        >>> limits = ModelLimits(default_size=1024, min_size=512, max_size=2048)
        >>> parse = lambda **f: parse_request(dict(prompt="x", **f), limits)
        >>> request_cost(parse(), limits), request_cost(parse(num_images=4), limits)
        (1.0, 4.0)
        >>> request_cost(parse(width=2048, height=2048, guidance_scale=1.0), limits)
        2.0
    """
    return _work(request.num_images, request.width, request.height,
                 request.num_inference_steps, request.guidance_scale) / _default_work(limits)


def _default_work(limits: ModelLimits) -> int:
    return _work(1, limits.default_size, limits.default_size, limits.default_steps,
                 limits.default_guidance_scale)


class CostLimitExceeded(RequestError):
    """A request asks for more work than one request may (``max_request_cost``).

    The JSON body adds the cost, the limit and every field that drives the cost to the
    usual shape; ``field`` is the one that raises the cost most above its default.
    """

    kind = "CostLimitExceeded"

    def __init__(self, request: GenerationRequest, limits: ModelLimits, cost: float):
        self.cost = cost
        self.limit = limits.max_request_cost
        super().__init__(_costliest_field(request, limits), _cost_message(request, limits,
                                                                          cost))

    def to_json(self) -> dict[str, Any]:
        return {**super().to_json(), "fields": list(COST_FIELDS),
                "cost": round(self.cost, 2), "limit": self.limit}


def check_cost(request: GenerationRequest, limits: ModelLimits) -> None:
    """Refuse a request that costs more than ``limits.max_request_cost``.

    Raises:
        CostLimitExceeded: naming the fields, the cost, the limit and ways under it.
    """
    cost = request_cost(request, limits)
    if cost > limits.max_request_cost * (1 + _COST_SLACK):
        raise CostLimitExceeded(request, limits, cost)


def _costliest_field(request: GenerationRequest, limits: ModelLimits) -> str:
    # Each field's factor over a default request; width and height count together, as
    # pixels, under the name of `width` (the first of the pair in the contract).
    factors = {
        "num_images": request.num_images,
        "width": request.width * request.height / limits.default_size ** 2,
        "num_inference_steps": request.num_inference_steps / limits.default_steps,
        "guidance_scale": guidance_factor(request.guidance_scale) /
        guidance_factor(limits.default_guidance_scale),
    }
    return max(factors, key=factors.__getitem__)  # the first of equals: num_images


def _cost_message(request: GenerationRequest, limits: ModelLimits, cost: float) -> str:
    """The cost, how it is made up, and each single change that gets under the limit."""
    limit, native = limits.max_request_cost, limits.default_size
    budget = limits.max_request_cost * _default_work(limits) * (1 + _COST_SLACK)
    guided = guidance_factor(request.guidance_scale)
    per_image = _work(1, request.width, request.height, request.num_inference_steps,
                      request.guidance_scale)
    ways = []
    # Each way changes one thing and keeps the rest, so a client can pick what matters.
    if request.num_images > 1 and per_image <= budget:
        ways.append(f"`num_images` at most {int(budget // per_image)}")
    steps = int(budget // _work(request.num_images, request.width, request.height, 1,
                                request.guidance_scale))
    if steps >= 1:
        ways.append(f"`num_inference_steps` at most {steps}")
    scale = math.sqrt(limit / cost)
    width, height = (max(limits.min_size, int(side * scale) // SIZE_MULTIPLE * SIZE_MULTIPLE)
                     for side in (request.width, request.height))
    if _work(request.num_images, width, height, request.num_inference_steps,
             request.guidance_scale) <= budget:
        ways.append(f"`width` x `height` at most {width}x{height}")
    if guided == 2 and cost / 2 <= limit * (1 + _COST_SLACK):
        ways.append("`guidance_scale` 1 or less (no guidance: half the cost)")
    how = ("; change one of: " + "; ".join(ways)) if ways else \
        "; lower several of `num_images`, `width`, `height` and `num_inference_steps`"
    guidance = " x 2 for `guidance_scale` > 1" if guided == 2 else ""
    return (f"this request costs {number_text(round(cost, 2))} default requests, over the limit "
            f"of {number_text(limit)} per request: `num_images` {request.num_images} x "
            f"`width` x `height` {request.width}x{request.height} / {native}x{native} x "
            f"`num_inference_steps` {request.num_inference_steps} / {limits.default_steps}"
            f"{guidance} (one {native}x{native} image at {limits.default_steps} steps"
            f"{' with guidance' if guidance_factor(limits.default_guidance_scale) == 2 else ''}"
            f" costs 1){how}")


# What "blank" means: besides whitespace, control and format characters (zero-width space
# and joiners, the byte order mark, bidirectional marks) draw nothing. `str.strip` took
# "\u200b" for a prompt.
_INVISIBLE = ("Cc", "Cf")
# Nor do these, which are letters, marks or symbols to `unicodedata`: the variation selectors,
# the combining grapheme joiner, Mongolian free variation selectors and Khmer inherent vowels
# (Unicode's default-ignorable code points outside Cc/Cf), and the characters fonts draw
# empty: the Hangul fillers and the Braille blank. "\u3164" alone passed as a prompt.
_BLANK = frozenset(map(chr, [
    0x034F, 0x115F, 0x1160, 0x17B4, 0x17B5, *range(0x180B, 0x1810), 0x2800, 0x3164,
    *range(0xFE00, 0xFE10), 0xFFA0, *range(0xE0100, 0xE01F0)]))


def _invisible(char: str) -> bool:
    return char.isspace() or unicodedata.category(char) in _INVISIBLE or char in _BLANK


def _char_class(ranges: Sequence[tuple[int, int]], negated: bool = False) -> str:
    """A pattern's character class of code point ranges, read alike by ECMA-262 with the u
    flag (as JSON Schema 2020-12 reads a pattern: by code point) and by Python's ``re``
    (Python's jsonschema): a BMP character as ``\\uXXXX``, one beyond it as itself (its
    escapes differ: ``\\u{E0001}`` is not Python's, ``\\U000E0001`` not ECMA-262's)."""
    def one(code: int) -> str:
        return f"\\u{code:04x}" if code <= 0xFFFF else chr(code)

    return ("[^" if negated else "[") + "".join(
        one(low) + (f"-{one(high)}" if high > low else "") for low, high in ranges) + "]"


# A string field holds no NUL and no surrogate (a lone one is not UTF-8, so no tokenizer
# reads it; ``_check`` refuses both). A pattern leaves the surrogates out with the range
# around them, U+D7FF-U+E000, and gives its two ends back: a surrogate named in a pattern is
# no regex to Rust's engines (jsonschema-rs, which schemathesis runs on, refused the whole
# document over one), and a class that lists the million characters taken rather than the
# few left out made Hypothesis (schemathesis's generator) walk them all, seconds a string.
_AROUND_SURROGATES = (0xD7FF, 0xE000)


@functools.cache
def _string_patterns() -> tuple[str, str]:
    """What a string field's pattern is made of: any character it may hold, and a visible
    one (``_invisible`` is false), in every plane: one above U+FFFF, alone, passed the
    schema and not the server. Every invisible character is named, no ``\\s``: ECMA-262's
    takes U+FEFF, Python's does not (so Python's jsonschema took "\\ufeff" for a prompt).
    Made once a process: the scan of every code point takes about 0.2 s, and the job API
    builds the schema for every GET /v1/request-schema."""
    invisible: list[list[int]] = []
    for code in range(sys.maxunicode + 1):
        if 0xD800 <= code <= 0xDFFF or not _invisible(chr(code)):
            continue
        if invisible and invisible[-1][1] == code - 1:
            invisible[-1][1] = code
        else:
            invisible.append([code, code])

    def taking(left_out: list[list[int]]) -> str:
        ends = [(code, code) for code in _AROUND_SURROGATES
                if not any(low <= code <= high for low, high in left_out)]
        return (f"(?:{_char_class([*left_out, _AROUND_SURROGATES], negated=True)}|"
                f"{_char_class(ends)})")

    return taking([[0, 0]]), taking(invisible)


def json_schema(limits: ModelLimits) -> dict[str, Any]:
    """The request contract as JSON Schema (draft 2020-12), derived from ``FIELDS``."""
    properties: dict[str, Any] = {}
    for field in FIELDS:
        low, high = field.bounds(limits)
        prop: dict[str, Any] = {"description": field.description}
        if field.kind == "string":
            # No NUL or lone surrogate anywhere, and where the field may not be blank a
            # visible character somewhere. (minLength and maxLength count code points, as
            # ``len`` does.)
            allowed, visible = _string_patterns()
            middle = f"{visible}{allowed}*" if field.not_blank else ""
            prop.update(type="string", minLength=low, maxLength=high,
                        pattern=f"^{allowed}*{middle}$")
        elif field.kind == "enum":
            prop.update(type="string", enum=list(field.choices))
        elif field.kind == "boolean":
            prop["type"] = "boolean"
        else:
            prop.update(type=field.kind, minimum=low, maximum=high)
            if field.multiple_of > 1:
                prop["multipleOf"] = field.multiple_of
        default = field.default(limits)
        if default is not None:
            prop["default"] = default
        properties[field.name] = prop
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "GenerationRequest",
        # Whose character classes the string patterns hold: the running Python's `unicodedata`
        # (Python 3.12's Unicode 15 has format characters 3.11's Unicode 14 does not), the
        # one the server refuses by too. A document committed under one version says so
        # where a server on another serves its own.
        "x-unicode-version": unicodedata.unidata_version,
        "type": "object",
        "properties": properties,
        "required": [f.name for f in FIELDS if f.required],
        "additionalProperties": False,
    }


def markdown_table(limits: ModelLimits) -> str:
    """The field table of docs/api.md, derived from ``FIELDS``."""
    rows = ["| field | type | default | rule | description |", "|---|---|---|---|---|"]
    for field in FIELDS:
        if field.required:
            default = "required"
        else:
            value = field.default(limits)
            default = "drawn at random" if value is None else json.dumps(value)
        rows.append(f"| `{field.name}` | {field.kind} | {default} | {field.rule(limits)} | "
                    f"{field.description} |")
    return "\n".join(rows)

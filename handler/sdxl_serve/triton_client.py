"""Calling the Triton model over KServe v2 HTTP without tritonclient: the request's JSON
and the reply's binary outputs (used by scripts/generate.py --triton and the tests;
standard library only, as that script is).

Each request field is its own input tensor, of the type triton-models/sdxl/config.pbtxt declares
(``DATATYPES``). The image comes back as a binary output: Triton writes a BYTES output
into JSON as raw bytes, which is not valid JSON for a PNG, so it is asked for with
``binary_data`` and read after the JSON header (``Inference-Header-Content-Length``); a
BYTES element there is a 4-byte little-endian length followed by the bytes.

Example:
    >>> body, headers = infer_request({"prompt": "a red fox", "seed": 7})
    >>> json.loads(body)["inputs"][1]
    {'name': 'seed', 'shape': [1, 1], 'datatype': 'UINT64', 'data': [7]}
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any, Mapping

from sdxl_serve.contract import RequestError

# What config.pbtxt declares for each input (tests/unit/test_triton_client.py checks it).
DATATYPES = {
    "prompt": "BYTES", "negative_prompt": "BYTES", "num_inference_steps": "INT64",
    "guidance_scale": "FP64", "width": "INT64", "height": "INT64", "seed": "UINT64",
    "num_images": "INT64", "scheduler": "BYTES", "output_format": "BYTES",
}
OUTPUTS = [{"name": "seed"}, {"name": "info"},
           {"name": "image", "parameters": {"binary_data": True}}]
# The integers each integer datatype holds: Triton's frontend answers 500 to one outside.
INTEGER_RANGES = {"INT64": (-2**63, 2**63 - 1), "UINT64": (0, 2**64 - 1)}


def tensor(name: str, value: Any, datatype: str | None = None) -> dict:
    """One input of a request of batch size 1; the datatype is the declared one."""
    return {"name": name, "shape": [1, 1], "datatype": datatype or DATATYPES[name],
            "data": [value]}


def triton_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """One request's fields written the way Triton's frontend parses them.

    It is stricter than our contract, and answers 500 before our model sees the request:
    to an integer input written ``2.0`` and to a ``null``, where TorchServe takes ``2.0`` as
    2 and ``null`` as "the default", and to an integer its input's datatype cannot hold (a
    negative seed, a width past 2**63), which TorchServe refuses with a 400 naming the
    field. So a whole number goes as an integer, a ``null`` field is left out (its
    default), and an integer out of its datatype's range is refused here, by name.

    Example:
        >>> triton_fields({"prompt": "x", "seed": 7.0, "width": None})
        {'prompt': 'x', 'seed': 7}
        >>> triton_fields({"seed": -1})  # doctest: +NORMALIZE_WHITESPACE
        Traceback (most recent call last):
        ...
        sdxl_serve.contract.RequestError: `seed` must be an integer from 0 to
        18446744073709551615 (Triton's UINT64), got -1
    """
    written = {}
    for name, value in fields.items():
        if value is None:
            continue
        datatype = DATATYPES.get(name, "")
        if datatype in INTEGER_RANGES and isinstance(value, float) and value.is_integer():
            value = int(value)
        low, high = INTEGER_RANGES.get(datatype, (None, None))
        if low is not None and isinstance(value, int) and not low <= value <= high:
            raise RequestError(name, f"`{name}` must be an integer from {low} to {high} "
                                     f"(Triton's {datatype}), got {value}")
        written[name] = value
    return written


def infer_request(fields: Mapping[str, Any]) -> tuple[bytes, dict[str, str]]:
    """(body, headers) of a ``POST /v2/models/<name>/infer`` for one request's fields
    (``triton_fields``)."""
    inputs = [tensor(name, value) for name, value in triton_fields(fields).items()]
    body = {"inputs": inputs, "outputs": OUTPUTS}
    return json.dumps(body).encode(), {"Content-Type": "application/json"}


@dataclass
class TritonReply:
    """A successful reply: the images, their seeds and ``info`` (format, sizes, timings)."""

    images: list[bytes]
    seeds: list[int]
    info: dict


def unpack_bytes(data: bytes) -> list[bytes]:
    """The elements of a binary BYTES tensor (4-byte little-endian length, then the bytes).

    Example:
        >>> unpack_bytes(b"\\x02\\x00\\x00\\x00hi\\x00\\x00\\x00\\x00")
        [b'hi', b'']
    """
    items, offset = [], 0
    while offset < len(data):
        (size,) = struct.unpack_from("<I", data, offset)
        items.append(data[offset + 4:offset + 4 + size])
        offset += 4 + size
    return items


def parse_reply(headers: Mapping[str, str], body: bytes) -> TritonReply:
    """Read a 200 reply to ``infer_request``.

    Raises:
        ValueError: the reply lacks an output asked for.
    """
    lowered = {key.lower(): value for key, value in headers.items()}
    size = int(lowered.get("inference-header-content-length", len(body)))
    header, binary = json.loads(body[:size]), body[size:]
    outputs, offset = {}, 0
    for output in header["outputs"]:
        binary_size = (output.get("parameters") or {}).get("binary_data_size")
        if binary_size is None:
            outputs[output["name"]] = output["data"]
        else:
            outputs[output["name"]] = unpack_bytes(binary[offset:offset + binary_size])
            offset += binary_size
    try:
        return TritonReply(outputs["image"], [int(s) for s in outputs["seed"]],
                           json.loads(outputs["info"][0]))
    except KeyError as exc:
        raise ValueError(f"the reply has no output {exc}") from None


def error_of(body: bytes) -> str:
    """Triton's error message (``{"error": "..."}``)."""
    try:
        return str(json.loads(body)["error"])
    except (ValueError, KeyError, TypeError):
        return body.decode("utf-8", "replace")

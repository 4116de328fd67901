"""The Triton client's view of the model agrees with triton-models/sdxl/config.pbtxt, the
model takes every request field but `stream` as a tensor, and `stream` (a request
parameter) is refused in the contract's words."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from sdxl_serve.contract import FIELD_NAMES, SDXL_LIMITS, RequestError, parse_request
from sdxl_serve.triton_client import DATATYPES, INTEGER_RANGES, OUTPUTS, infer_request
from sdxl_serve.triton_model import TENSOR_FIELDS, check_parameters

pytestmark = pytest.mark.unit
CONFIG = Path(__file__).resolve().parents[2] / "triton-models" / "sdxl" / "config.pbtxt"
# config.pbtxt's types, as the v2 protocol names them.
V2_NAMES = {"TYPE_STRING": "BYTES", "TYPE_INT64": "INT64", "TYPE_UINT64": "UINT64",
            "TYPE_FP64": "FP64"}


def declared(section: str) -> dict[str, tuple[str, bool]]:
    """{name: (v2 datatype, optional)} of config.pbtxt's ``input`` or ``output`` list."""
    text = re.sub(r"#.*", "", CONFIG.read_text())
    block = re.search(section + r"\s*\[(.*?)\n\]", text, re.S).group(1)
    return {name: (V2_NAMES[kind], "optional: true" in entry)
            for entry in re.findall(r"\{[^{}]*\}", block)
            for name, kind in re.findall(r'name:\s*"(\w+)"\s*data_type:\s*(\w+)', entry)}


def test_every_field_but_stream_is_an_input_of_the_declared_type():
    inputs = declared("input")
    assert set(inputs) == set(FIELD_NAMES) - {"stream"} == set(TENSOR_FIELDS)
    assert {name: kind for name, (kind, _) in inputs.items()} == DATATYPES
    assert [name for name, (_, optional) in inputs.items() if not optional] == ["prompt"]


def test_the_client_asks_for_every_output():
    assert set(declared("output")) == {output["name"] for output in OUTPUTS}


def test_a_request_is_written_as_tritons_frontend_parses_it():
    """Triton answers 500 to `2.0` for an integer input and to `null`, before the model
    runs; our contract takes both (2, and the default)."""
    body, _ = infer_request({"prompt": "a fox", "seed": 2.0, "num_inference_steps": 3e0,
                             "width": None, "guidance_scale": 7.0})
    sent = {tensor["name"]: tensor["data"][0] for tensor in json.loads(body)["inputs"]}
    assert sent == {"prompt": "a fox", "seed": 2, "num_inference_steps": 3,
                    "guidance_scale": 7.0}
    assert type(sent["seed"]) is int and type(sent["guidance_scale"]) is float
    # A fraction stays what it is: the model refuses it, naming the field and value.
    body, _ = infer_request({"prompt": "a fox", "seed": 2.5})
    assert json.loads(body)["inputs"][1]["data"] == [2.5]


@pytest.mark.parametrize("value", ["yes", "true", 1, 0.5, "x" * 100])
def test_a_stream_parameter_that_is_no_boolean_gets_the_contracts_refusal(value):
    """Triton's `stream` parameter was checked by the adapter's own code: its message left
    out what the value was ("(a string)") and cut it otherwise than every other refusal."""
    with pytest.raises(RequestError) as through_triton:
        check_parameters(json.dumps({"stream": value}))
    with pytest.raises(RequestError) as through_torchserve:
        parse_request({"prompt": "x", "stream": value}, SDXL_LIMITS)
    assert through_triton.value.field == "stream"
    assert str(through_triton.value) == str(through_torchserve.value)

"""The request contract: defaults, every rule, and the messages that name field and value."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from prompt_texts import (TEXT_FIELDS, as_sent, assert_committed_is_current, server_takes,
                          skip_unless_made_here, string_rule, text_samples)
from sdxl_serve.contract import (FIELDS, MAX_SEED, SDXL_LIMITS, RequestError, json_schema,
                                 markdown_table, parse_field, parse_request)

pytestmark = pytest.mark.unit
LIMITS = SDXL_LIMITS
REPO = Path(__file__).resolve().parents[2]
README = REPO / "docs" / "api.md"


def refuse(body, field: str) -> str:
    with pytest.raises(RequestError) as caught:
        parse_request(body if isinstance(body, bytes) else json.dumps(body).encode(), LIMITS)
    assert caught.value.field == field
    assert caught.value.status == 400
    return str(caught.value)


def test_defaults_come_from_the_model_limits():
    request = parse_request(b'{"prompt": "a red fox"}', LIMITS)
    assert (request.width, request.height) == (1024, 1024)
    assert request.num_inference_steps == 30 and request.guidance_scale == 5.0
    assert request.num_images == 1 and request.output_format == "png"
    assert request.stream is False and request.scheduler == "euler"
    assert 0 <= request.seed <= MAX_SEED


def test_seed_is_drawn_when_absent_and_kept_when_given():
    seeds = {parse_request(b'{"prompt": "x"}', LIMITS).seed for _ in range(5)}
    assert len(seeds) == 5
    assert parse_request(b'{"prompt": "x", "seed": 18446744073709551615}', LIMITS).seed == \
        MAX_SEED


def test_each_image_of_a_request_has_its_own_seed():
    request = parse_request(b'{"prompt": "x", "seed": 18446744073709551614, "num_images": 3}',
                            LIMITS)
    assert request.seeds == [MAX_SEED - 1, MAX_SEED, 0]


@pytest.mark.parametrize("body, field, words", [
    ({"prompt": "x", "width": 1004}, "width", ["multiple of 8", "512", "2048", "1004"]),
    ({"prompt": "x", "width": 4096}, "width", ["4096"]),
    ({"prompt": "x", "height": 256}, "height", ["256"]),
    ({"prompt": "x", "num_inference_steps": 0}, "num_inference_steps", ["1 to 100", "0"]),
    ({"prompt": "x", "num_inference_steps": 30.5}, "num_inference_steps", ["a number"]),
    ({"prompt": "x", "seed": 1e19}, "seed", ["exact only without a fraction or exponent"]),
    ({"prompt": "x", "num_inference_steps": True}, "num_inference_steps", ["a boolean"]),
    ({"prompt": "x", "guidance_scale": 31}, "guidance_scale", ["0 to 30", "31"]),
    ({"prompt": "x", "guidance_scale": "7"}, "guidance_scale", ["a string"]),
    ({"prompt": "x", "seed": -1}, "seed", ["-1"]),
    ({"prompt": "x", "seed": 2**64}, "seed", ["18446744073709551616"]),
    ({"prompt": "x", "num_images": 5}, "num_images", ["1 to 4", "5"]),
    ({"prompt": "x", "scheduler": "k_lms"}, "scheduler", ["euler", "k_lms"]),
    ({"prompt": "x", "output_format": "gif"}, "output_format", ["png", "gif"]),
    ({"prompt": "x", "stream": "yes"}, "stream", ["true or false"]),
    ({"prompt": ""}, "prompt", ["1 to 2000"]),
    ({"prompt": "   "}, "prompt", ["with a visible character"]),
    ({"prompt": "\u200b\u200d"}, "prompt", ["with a visible character"]),  # zero-width only
    ({"prompt": "\ufeff\x01"}, "prompt", ["with a visible character"]),  # BOM, a control
    # A Hangul filler, the Braille blank, a variation selector: letters and symbols that draw
    # nothing; and one beyond the Basic Multilingual Plane (a variation selector supplement).
    ({"prompt": "\u3164\u2800\ufe0f"}, "prompt", ["with a visible character"]),
    ({"prompt": " \U000e0100"}, "prompt", ["with a visible character"]),
    ({"prompt": "x" * 2001}, "prompt", ["2001 characters"]),
    ({"prompt": ["a", "b"]}, "prompt", ["an array"]),
    ({"prompt": "a\u0000b"}, "prompt", ["NUL"]),
    ({"prompt": "a\ud800b"}, "prompt", ["unpaired surrogate at character 1"]),
    ({"prompt": "x", "negative_prompt": "\udfff"}, "negative_prompt", ["surrogate"]),
    ({"negative_prompt": "x"}, "prompt", ["required"]),
    ({"prompt": "x", "widht": 512}, "widht", ["`widht`", "did you mean `width`"]),
    ({"prompt": "x", "steps": 20}, "steps", ["num_inference_steps"]),
    ([1, 2], "body", ["JSON object", "an array"]),
    ("a string", "body", ["JSON object"]),
])
def test_bad_values_are_refused_naming_field_value_and_rule(body, field, words):
    message = refuse(body, field)
    for word in words:
        assert word in message


@pytest.mark.parametrize("raw, words", [
    (b'{"prompt": "x", "guidance_scale": NaN}', ["NaN"]),
    (b'{"prompt": "x", "guidance_scale": Infinity}', ["Infinity"]),
    (b'{"prompt": "x", "seed": -Infinity}', ["-Infinity"]),
    (b'{"prompt": "x"', ["not valid JSON"]),
    (b'', ["empty", "Content-Type: application/json"]),
    (b'\xff\xfe{}', ["UTF-8"]),
    (b'[' * 100000 + b']' * 100000, ["nested too deeply"]),
    (b'"a string"', ["JSON object", "got a string"]),
    (json.dumps(json.dumps({"prompt": "x"})).encode(), ["JSON object", "got a string"]),
])
def test_malformed_bodies_are_refused(raw, words):
    message = refuse(raw, "body")
    for word in words:
        assert word in message


def test_an_integer_written_with_a_fraction_or_exponent_is_that_integer():
    # JSON has one number type, and the published schema (JSON Schema) counts 2.0 as an
    # integer: a client validating against it was refused by the server.
    request = parse_request({"prompt": "x", "num_inference_steps": 2.0, "seed": 5e3,
                             "width": 512.0, "num_images": 1.0}, LIMITS)
    assert (request.num_inference_steps, request.seed, request.width, request.num_images) \
        == (2, 5000, 512, 1)
    assert all(type(value) is int for value in (request.num_inference_steps, request.seed,
                                                 request.width, request.num_images))


@pytest.mark.parametrize("written, field, read_as", [
    (b"9007199254740993.0", "seed", "9007199254740992"),  # 2**53 + 1
    (b"9.007199254740993e15", "seed", "9007199254740992"),
    (b"4503599627370497.5", "seed", "4503599627370498"),  # a fraction a float cannot hold
    (b"1.0000000000000000001", "num_inference_steps", "1"),
])
def test_a_number_with_more_digits_than_a_float_keeps_is_not_taken_as_an_integer(
        written, field, read_as):
    """Read as the integer it rounds to, 2**53 + 1 written with a fraction was served as
    seed 2**53: another image than asked for, said only by the reply's seed."""
    message = refuse(b'{"prompt": "x", "%s": %s}' % (field.encode(), written), field)
    assert f"got {written.decode()} " in message, message
    assert f"it reads as {read_as})" in message, message
    # Written with digits alone, or with a fraction a float holds, it is that integer.
    assert parse_request(b'{"prompt": "x", "seed": 9007199254740993}', LIMITS).seed == \
        2 ** 53 + 1
    request = parse_request(b'{"prompt": "x", "seed": 9007199254740992.0, "num_inference_steps"'
                            b': 3e1, "guidance_scale": 7.00000000000000000001}', LIMITS)
    assert (request.seed, request.num_inference_steps, request.guidance_scale) == \
        (2 ** 53, 30, 7.0)


@pytest.mark.parametrize("written, field", [
    (b"1e-9999999999999999999", "seed"),
    (b"1.5E-99999999999999999999", "num_inference_steps"),
])
def test_a_number_with_an_exponent_past_what_decimal_holds_is_refused_not_a_500(
        written, field):
    """The check for digits a float does not keep compared the text as a Decimal, which
    raises InvalidOperation past an exponent of about 10**18: an uncaught error of ours,
    so a 500 InternalServerError (and a traceback in the log) for a bad number."""
    message = refuse(b'{"prompt": "x", "%s": %s}' % (field.encode(), written), field)
    assert message.endswith(f"got {written.decode()} (a number)"), message
    # Zero written with any exponent is zero, exactly; a number field takes what it reads.
    request = parse_request(b'{"prompt": "x", "seed": 0e99999999999999999999, '
                            b'"guidance_scale": 1e-9999999999999999999}', LIMITS)
    assert (request.seed, request.guidance_scale) == (0, 0.0)


def test_a_number_a_float_holds_is_shown_as_the_number_it_is():
    # docs/api.md said every number was shown as written; only those a float does not hold
    # exactly are (above): one it holds is shown as the number it reads as.
    assert refuse(b'{"prompt": "x", "guidance_scale": 3.1e1}', "guidance_scale") \
        .endswith("got 31.0")
    assert refuse(b'{"prompt": "x", "num_images": 3.1e1}', "num_images").endswith("got 31")


BIG = "1" + "0" * 3999 + ".0"  # an integer past the largest float, written with a fraction


@pytest.mark.parametrize("field, written, said", [
    # A fraction too small for a float reads as 0 (or -0): it was said to be an integer
    # with more digits than a number keeps, "it reads as -0". It is not an integer.
    ("seed", "-1.5e-99999999", "`seed` must be an integer from 0 to 18446744073709551615, "
                               "got -1.5e-99999999 (a number)"),
    ("num_images", "1e-400", "`num_images` must be an integer from 1 to 4, got 1e-400 "
                             "(a number)"),
    # Past the largest float a number reads as infinity: it was shown as "got Infinity",
    # which the client never wrote. Shown as written, cut as any long value is.
    ("seed", BIG, f"`seed` must be an integer from 0 to 18446744073709551615, "
                  f"got {BIG[:60]}..."),
    ("seed", "1e400", "`seed` must be an integer from 0 to 18446744073709551615, got 1e400"),
    ("guidance_scale", "-" + BIG, f"`guidance_scale` must be a finite number from 0 to 30, "
                                  f"got -{BIG[:59]}..."),
    ("guidance_scale", "1E400", "`guidance_scale` must be a finite number from 0 to 30, "
                                "got 1E400"),
])
def test_a_number_a_float_cannot_hold_is_named_as_written_with_the_rule(field, written, said):
    assert refuse(f'{{"prompt": "x", "{field}": {written}}}'.encode(), field) == said


def test_a_value_nested_at_any_depth_is_refused_naming_its_field():
    # json.loads reads a little deeper than json.dumps writes: a value nested just short of
    # the parser's limit made the refusal's rendering of it raise RecursionError (a 500).
    for depth in range(1, sys.getrecursionlimit() + 50):
        raw = b'{"prompt": "x", "width": ' + b"[" * depth + b"]" * depth + b"}"
        with pytest.raises(RequestError) as refused:
            parse_request(raw, LIMITS)
        assert refused.value.field in ("width", "body"), depth


@pytest.mark.parametrize("name", ["x\n2026-11-30 12:00:00 INFO forged line", "a\rb",
                                  "a\u2028b", "a\x1b[2Jb", "x" * 59 + "\n" + "y" * 30])
def test_an_unknown_field_name_cannot_forge_a_log_line(name):
    # The client gets back the name it sent (cut at 60); the message quotes its repr(), one
    # printable line whatever the client put in it. (The service's log line does not name
    # a field the client chose: tests/handler/test_engine.py checks the log line itself.)
    with pytest.raises(RequestError) as refused:
        parse_request({"prompt": "x", name: 1}, LIMITS)
    shown = name if len(name) <= 60 else name[:60] + "..."
    assert refused.value.field == shown
    assert str(refused.value).isprintable()
    assert repr(shown) in str(refused.value) or shown in str(refused.value)


def test_a_byte_order_mark_before_the_body_is_skipped_as_tritons_parser_skips_it():
    # TorchServe's path and the job API refused it ("Unexpected UTF-8 BOM (decode using
    # utf-8-sig)"), Triton served it: one body, two answers. RFC 8259 lets a parser skip it.
    body = json.dumps({"prompt": "a red fox", "seed": 7}).encode()
    assert parse_request(b"\xef\xbb\xbf" + body, LIMITS) == parse_request(body, LIMITS)
    # Only the one mark that begins the body: inside a value it is a character like any.
    assert parse_request('\ufeff{"prompt": "x\ufeff"}'.encode(), LIMITS).prompt == "x\ufeff"
    assert "not valid JSON" in refuse(b"\xef\xbb\xbf\xef\xbb\xbf" + body, "body")


def test_a_repeated_key_is_refused():
    assert "twice" in refuse(b'{"prompt": "x", "prompt": "y"}', "prompt")


def test_a_repeated_long_key_is_named_cut():
    # The field goes into the reply (never the log): 60 characters, not the client's 99,000.
    key = "my secret prompt about a red fox " * 3000
    raw = json.dumps({"prompt": "x"})[:-1] + f', "{key}": 1, "{key}": 2}}'
    message = refuse(raw.encode(), key[:60] + "...")
    assert len(message) < 300


def test_a_key_repeated_inside_a_field_blames_the_field():
    # Duplicates are the body's own fields' business; an object is no seed anyway.
    assert "(an object)" in refuse(b'{"prompt": "x", "seed": {"a": 1, "a": 2}}', "seed")


@pytest.mark.parametrize("raw, field", [
    (b'{"prompt": "x", "seed": ' + b"1" * 5000 + b"}", "body"),  # past Python's 4300 digits
    (b'{"prompt": "x", "whatever": ' + b"7" * 5000 + b"}", "body"),
    (b'{"prompt": "x", "guidance_scale": ' + b"1" * 400 + b"}", "guidance_scale"),  # no float
    (b'{"prompt": "x", "seed": ' + b"1" * 400 + b"}", "seed"),
])
def test_huge_integers_are_refused_by_name(raw, field):
    # They raised ValueError / OverflowError, which killed the engine process (a 500 after
    # two engine restarts, and every batch-mate waited through them).
    refuse(raw, field)


def test_null_means_default_for_optional_fields():
    assert parse_request(b'{"prompt": "x", "seed": null, "width": null}', LIMITS).width == 1024


def test_a_fractional_guidance_scale_is_accepted():
    # The common 7.5 was refused once: numbers have no grid, only sizes do.
    assert parse_request(b'{"prompt": "x", "guidance_scale": 7.5}', LIMITS).guidance_scale == 7.5


def test_long_values_are_cut_in_messages():
    message = refuse({"prompt": "x", "scheduler": "s" * 5000}, "scheduler")
    assert len(message) < 300


def test_compat_key_separates_what_cannot_share_a_call():
    base = {"prompt": "x", "seed": 1}
    key = parse_request(json.dumps(base).encode(), LIMITS).compat_key
    same = parse_request(json.dumps({**base, "prompt": "y", "seed": 2}).encode(), LIMITS)
    other = parse_request(json.dumps({**base, "width": 512}).encode(), LIMITS)
    assert same.compat_key == key and other.compat_key != key
    # A call with any negative prompt encodes the others' "" as text: not the zero
    # embeddings they get alone.
    steered = parse_request(json.dumps({**base, "negative_prompt": "blur"}).encode(), LIMITS)
    assert steered.compat_key != key


def test_json_schema_is_derived_from_the_declaration():
    schema = json_schema(LIMITS)
    assert list(schema["properties"]) == [f.name for f in FIELDS]
    assert schema["required"] == ["prompt"] and schema["additionalProperties"] is False
    width = schema["properties"]["width"]
    assert (width["minimum"], width["maximum"], width["multipleOf"]) == (512, 2048, 8)


# What a client validating against a published schema meets: the OpenAPI document's submit
# body (docs/jobs-openapi.json) and config/request.schema.json, read by a JSON Schema
# validator as they are published, against the server's contract (tests/prompt_texts.py).
PUBLISHED = {
    "openapi": lambda: json.loads((REPO / "docs" / "jobs-openapi.json").read_text())
    ["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"],
    "request.schema.json": lambda: json.loads((REPO / "config" / "request.schema.json")
                                              .read_text()),
}


@pytest.mark.parametrize("published", PUBLISHED)
@pytest.mark.parametrize("field", TEXT_FIELDS)
def test_a_published_schema_takes_the_text_the_server_takes(published, field):
    import jsonschema

    schema = PUBLISHED[published]()
    validator = jsonschema.validators.validator_for(schema)(schema)
    disagree = [text for text in text_samples()
                if validator.is_valid(as_sent({"prompt": "a", field: text}))
                != server_takes({"prompt": "a", field: text}, LIMITS)]
    assert not disagree, (len(disagree), [ascii(text[:12]) for text in disagree[:20]])


def test_every_character_alone_is_judged_by_the_document_as_by_the_server():
    # Every code point, surrogates included, as a whole prompt and as a negative prompt:
    # the document's pattern read as its JSON Schema validator reads it (`re.search`, by
    # code point), against the server's rule for that field.
    schema = PUBLISHED["openapi"]()
    # The server classes characters by this Python's Unicode version: under another one
    # the document and the server part on the characters it changed.
    skip_unless_made_here(schema, "")
    disagree = []
    for name in TEXT_FIELDS:
        pattern = re.compile(string_rule(schema, name)["pattern"])
        for code in range(sys.maxunicode + 1):
            text = chr(code)
            try:
                parse_field(name, text, LIMITS)
                taken = True
            except RequestError:
                taken = False
            if (pattern.search(text) is not None) != taken:
                disagree.append(f"{name} U+{code:04X}")
    assert not disagree, (len(disagree), disagree[:20])


def test_an_ecma_262_reader_compiles_the_documents_patterns_and_agrees():
    # jsonschema-rs (schemathesis runs on it) reads a pattern as ECMA-262 with the u flag,
    # as JSON Schema 2020-12 asks, in Rust, where a surrogate is no character: a pattern
    # naming one is no regex there, and the whole document is refused. Its strings cannot
    # hold a lone surrogate either, so those are left to the tests above.
    jsonschema_rs = pytest.importorskip(
        "jsonschema_rs", reason="jsonschema-rs comes with schemathesis (requirements-dev.txt)")
    validator = jsonschema_rs.validator_for(PUBLISHED["openapi"]())
    disagree = []
    for text in text_samples():
        for field in TEXT_FIELDS:
            body = {"prompt": "a", field: text}
            sent = as_sent(body)
            if any(0xD800 <= ord(char) <= 0xDFFF for char in sent[field]):
                continue
            if validator.is_valid(sent) != server_takes(body, LIMITS):
                disagree.append(f"{field} {ascii(text[:12])}")
    assert not disagree, (len(disagree), disagree[:20])


def test_readme_field_table_is_the_generated_one():
    assert markdown_table(LIMITS) in README.read_text(), \
        "docs/api.md's field table is stale: regenerate it with `make docs`"


def test_the_shipped_json_schema_is_the_generated_one():
    shipped = Path(__file__).resolve().parents[2] / "config" / "request.schema.json"
    assert_committed_is_current(
        json.loads(shipped.read_text()), json_schema(LIMITS),
        "config/request.schema.json is stale: regenerate it with `make docs`")


def test_the_models_own_scheduler_is_the_default():
    """The served model's scheduler, as the engine reads it off the model, is what a request
    without `scheduler` gets, and what the schema says."""
    from dataclasses import replace

    limits = replace(LIMITS, default_scheduler="ddim")
    assert parse_request(b'{"prompt": "x"}', limits).scheduler == "ddim"
    assert json_schema(limits)["properties"]["scheduler"]["default"] == "ddim"
    assert parse_request(b'{"prompt": "x", "scheduler": "euler"}', limits).scheduler == "euler"

"""Texts of every class of character the request contract tells apart, and how the server
and a published schema judge them: for the tests that hold the schemas' string rules to the
server's (tests/unit/test_contract.py, and the browser's reading in tests/playground).

The published schemas took lone surrogates, and a prompt of invisible characters above
U+FFFF (or of U+FEFF alone, which Python's ``\\s`` does not match), all of which the server
refuses.

Those rules class characters by the Unicode version of the Python that made them: the
committed schemas are held to the ones made here whole only under their version
(``assert_committed_is_current``).
"""

from __future__ import annotations

import json
import unicodedata
from typing import Any

import pytest

from sdxl_serve.contract import FIELDS, ModelLimits, RequestError, parse_request

VISIBLE = ("a", "~", "\u00e9", "\u4e00", "\u0378", "\ue000", "\ufffd", "\uffff",
           "\U0001f600", "\U0001d400", "\U00020000", "\U000e0000", "\U000f0000",
           "\U0010ffff")  # letters, unassigned, private use, noncharacters, emoji
INVISIBLE = (
    "\x01", "\t", "\n", "\x1c", "\x1f", "\x7f", "\x85", "\x9f",  # control characters
    " ", "\xa0", "\u1680", "\u2000", "\u2028", "\u202f", "\u3000",  # white space
    "\u00ad", "\u061c", "\u200b", "\u200d", "\u200e", "\u2060", "\ufeff", "\ufff9",  # format
    "\U000110bd", "\U00013430", "\U0001bca0", "\U0001d173", "\U000e0001", "\U000e0020",
    "\U000e007f",  # format characters beyond the BMP: Kaithi, hieroglyph, music, tags
    "\u034f", "\u115f", "\u17b4", "\u180b", "\u2800", "\u3164", "\ufe0f", "\uffa0",
    "\U000e0100", "\U000e01ef")  # drawn empty: fillers, variation selectors, Braille blank
REFUSED_ANYWHERE = ("\x00", "\ud800", "\udbff", "\udc00", "\udfff")  # NUL, lone surrogates
TEXT_FIELDS = ("prompt", "negative_prompt")


def text_samples() -> list[str]:
    """Each character alone, repeated, beside a visible one and beside each other one; the
    length bounds in characters of one and of two UTF-16 units; surrogates paired and not."""
    samples = ["", "a" * 2000, "a" * 2001, "\U0001f600" * 2000, "\U0001f600" * 2001,
               "\ufeff" * 2000, "\U000e0020" * 2000, "\ude00\ud83d", "\ud83d\ude00"]
    every = VISIBLE + INVISIBLE + REFUSED_ANYWHERE
    for char in every:
        samples += [char, char * 3, f"a{char}", f"{char}a", f" {char}\U000e0001"]
        samples += [f"{char}{other}" for other in every]
    return samples


def as_sent(body: dict[str, Any]) -> dict[str, Any]:
    """``body`` as its JSON text carries it: a surrogate pair written in the text is one
    character, a lone one stays alone."""
    return json.loads(json.dumps(body))


def server_takes(body: dict[str, Any], limits: ModelLimits) -> bool:
    """Whether the server's contract takes ``body``, sent as JSON text as a client sends it."""
    try:
        parse_request(json.dumps(body).encode(), limits)
    except RequestError as error:
        assert error.field in body, error
        return False
    return True


def string_rule(schema: dict[str, Any], name: str) -> dict[str, Any]:
    """A string field's rule in a request schema (an optional field's is in its `anyOf`,
    beside null)."""
    rule = schema["properties"][name]
    return next(one for one in rule.get("anyOf", [rule]) if one.get("type") == "string")


def unicode_version(document: Any) -> str | None:
    """The Unicode version a request schema's string patterns were made with (its
    ``x-unicode-version``), in it or in the OpenAPI document that holds it."""
    if isinstance(document, dict):
        if "x-unicode-version" in document:
            return document["x-unicode-version"]
        document = list(document.values())
    if isinstance(document, list):
        return next(filter(None, map(unicode_version, document)), None)
    return None


def beyond_unicode(document: Any) -> Any:
    """``document`` (a request schema, or an OpenAPI document holding one) without what the
    Unicode version it was made with decides: the patterns of the fields that need a visible
    character, and ``x-unicode-version``."""
    if isinstance(document, list):
        return [beyond_unicode(item) for item in document]
    if not isinstance(document, dict):
        return document
    kept = {key: beyond_unicode(value) for key, value in document.items()
            if key != "x-unicode-version"}
    if "x-unicode-version" in document:
        for field in FIELDS:
            if field.kind == "string" and field.not_blank:
                del string_rule(kept, field.name)["pattern"]
    return kept


def skip_unless_made_here(document: Any, compared: str) -> None:
    """Skip, naming both versions, where ``document``'s string patterns were made with
    another Unicode version than this Python's: this Python can neither make them nor
    class characters as they do (a version adds format characters: Unicode 15 has
    U+13439..U+1343F, Unicode 14 does not). ``compared``: what the test held already."""
    made_with, here = unicode_version(document), unicodedata.unidata_version
    if made_with != here:
        pytest.skip(f"{compared}the committed string patterns were made with Unicode "
                    f"{made_with}, and this Python has Unicode {here}: they are compared "
                    f"under Unicode {made_with} only")


def assert_committed_is_current(committed: Any, made_here: Any, stale: str) -> None:
    """A committed document is the one this code makes: whole, where this Python has the
    Unicode version it was made with; under another, everything but the patterns that
    version decides, and the test is then skipped saying so."""
    assert beyond_unicode(committed) == beyond_unicode(made_here), stale
    skip_unless_made_here(committed, "everything but the string patterns is current; ")
    assert committed == made_here, stale

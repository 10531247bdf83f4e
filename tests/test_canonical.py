"""fedforget.canonical: RFC 8785 (JCS) on the published test vectors.

The vectors are the reference implementation's test data
(https://github.com/cyberphone/json-canonicalization, ``testdata/input`` and
``testdata/output``), written here with Python escapes for the control characters. Each input
is parsed with ``json.loads`` (as any verifier would parse a file) and must canonicalise to
exactly the published output bytes.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedforget.canonical import CanonicalJSONError, canonical_dumps
from fedforget.history.records import canonical_json
from fedforget.receipts._util import canonical_json as receipt_canonical_json
from fedforget.receipts.errors import ReceiptError

VECTORS = {
    # testdata/input/values.json -> testdata/output/values.json
    "values": (
        '{\n  "numbers": [1E30, 4.50, 333333333.33333329, 2e-3, 0.000000000000000000000000001],'
        '\n  "escaping": "\\u20ac$\\u000F\\u000aA\'\\u0042\\u0022\\u005c\\\\\\"\\/",\n'
        '  "literals": [null, true, false]\n}',
        '{"escaping":"\u20ac$\\u000f\\nA\'B\\"\\\\\\\\\\"/","literals":[null,true,false],'
        '"numbers":[1e+30,4.5,333333333.3333333,0.002,1e-27]}',
    ),
    # testdata/input/weird.json: keys sorted by UTF-16 code units (the emoji, a surrogate
    # pair D83D DE02, sorts before U+FB33 although its code point is larger).
    "weird": (
        '{\n  "\\u20ac": "Euro Sign",\n  "1": "One",\n  "\\u0080": "Control\\u007f",\n'
        '  "\\ud83d\\ude02": "Smiley",\n  "\\u00f6": "Latin Small Letter O With Diaeresis",\n'
        '  "\\ufb33": "Hebrew Letter Dalet With Dagesh",\n  "</script>": "Browser Challenge"\n}',
        '{"1":"One","</script>":"Browser Challenge","\u0080":"Control\u007f",'
        '"\u00f6":"Latin Small Letter O With Diaeresis","\u20ac":"Euro Sign",'
        '"\U0001f602":"Smiley","\ufb33":"Hebrew Letter Dalet With Dagesh"}',
    ),
    # testdata/input/structures.json
    "structures": (
        '{\n  "1": {"f": {"f": "hi","F": 5} ,"\\n": 56.0},\n  "10": { },\n  "": "empty",\n'
        '  "a": { },\n  "111": [ { } ],\n  "A": { }\n}',
        '{"":"empty","1":{"\\n":56,"f":{"F":5,"f":"hi"}},"10":{},"111":[{}],"A":{},"a":{}}',
    ),
    # testdata/input/french.json: no locale in the sort
    "french": (
        '{\n  "peach": "This sorting order",\n  "p\u00e9ch\u00e9": "is wrong according to '
        'French",\n  "p\u00eache": "but canonicalization MUST",\n  "sin":   "ingnore locale"\n}',
        '{"peach":"This sorting order","p\u00e9ch\u00e9":"is wrong according to French",'
        '"p\u00eache":"but canonicalization MUST","sin":"ingnore locale"}',
    ),
}


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_the_published_rfc_8785_vectors(name: str) -> None:
    source, expected = VECTORS[name]
    assert canonical_dumps(json.loads(source)) == expected.encode("utf-8")


def test_every_hashed_byte_string_goes_through_the_same_encoder() -> None:
    source, expected = VECTORS["values"]
    value = json.loads(source)
    assert canonical_json(value) == expected.encode("utf-8")  # round records
    assert receipt_canonical_json(value) == expected.encode("utf-8")  # heads, receipts


def test_numbers_in_ecmascript_form() -> None:
    # Worked out from ECMA-262 Number::toString: integral doubles without ".0", exponent
    # from 1e21 on, shortest round-trip digits, -0 as 0.
    cases = {1.0: b"1", -0.0: b"0", 1e21: b"1e+21", 1e20: b"100000000000000000000",
             5e-324: b"5e-324", 0.1: b"0.1", 2**53 - 1: b"9007199254740991"}
    for value, expected in cases.items():
        assert canonical_dumps(value) == expected


def test_numpy_scalars_and_tuples_are_plain_json() -> None:
    assert canonical_dumps({"b": np.float32(0.5), "a": (np.int64(3), True)}) == (
        b'{"a":[3,true],"b":0.5}'
    )


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (float("nan"), "not representable"),
        (float("inf"), "not representable"),
        (2**53, "integers beyond 2\\*\\*53 - 1 are not exact"),
        ({1: "x"}, "has key 1 \\(int\\); expected string keys"),
        ({"a": object()}, "value.a is a object, which is not JSON"),
        ("\ud800", "not representable"),
    ],
)
def test_what_jcs_cannot_represent_is_refused(value: object, message: str) -> None:
    with pytest.raises(CanonicalJSONError, match=message):
        canonical_dumps(value)
    with pytest.raises(ReceiptError):
        receipt_canonical_json(value)

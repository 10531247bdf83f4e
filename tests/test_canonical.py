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
    cases = {
        1.0: b"1",
        -0.0: b"0",
        1e21: b"1e+21",
        1e20: b"100000000000000000000",
        5e-324: b"5e-324",
        0.1: b"0.1",
        2**53 - 1: b"9007199254740991",
    }
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


# --- the standard-library fast path gives rfc8785's bytes, or steps aside -----------------

import rfc8785  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fedforget import canonical  # noqa: E402

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**60), max_value=2**60)
    | st.sampled_from([2**53 - 1, -(2**53 - 1), 2**53, -(2**53), 0])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from([0.0, -0.0, 1.0, 1e-7, 1e-6, 1e16, 1e20, 1e21, 0.1, 5e-324])
    | st.text()  # lone surrogates included
    | st.text(alphabet=st.characters(max_codepoint=0x7F))
)
_keys = st.text(max_size=4) | st.sampled_from(["a", "b", "\u00e9", "\U0001f602", "\ufb33"])
_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.lists(inner, max_size=3).map(tuple)
        | st.dictionaries(_keys, inner, max_size=4)
    ),
    max_leaves=20,
)


def _reference(value: object) -> bytes | type[Exception]:
    """rfc8785 on jcs_ready's output (the path the fast one must agree with), or what it raises."""
    try:
        return rfc8785.dumps(canonical.jcs_ready(value))
    except (rfc8785.CanonicalizationError, CanonicalJSONError):
        return CanonicalJSONError


@settings(max_examples=600, deadline=None)
@given(_values)
def test_the_fast_path_writes_rfc8785s_bytes_or_both_refuse(value: object) -> None:
    expected = _reference(value)
    if expected is CanonicalJSONError:
        with pytest.raises(CanonicalJSONError):
            canonical_dumps(value)
    else:
        assert canonical_dumps(value) == expected


def test_fast_path_bytes_worked_out_by_hand() -> None:
    # Keys sorted, no white space, a control character as lower-case \u0001, "é" as UTF-8,
    # "\t" and a quote with their short escapes, 0.5 and -3 as written.
    value = {"b": -3, "a": [0.5, "\u0001\u00e9", '\t"', None, True]}
    expected = b'{"a":[0.5,"\\u0001\xc3\xa9","\\t\\"",null,true],"b":-3}'
    assert canonical._fast_dumps(value) == expected
    assert canonical_dumps(value) == expected


def test_the_fast_path_is_taken_for_a_round_record_and_not_where_python_differs() -> None:
    record = {
        "round": 3,
        "loss": 0.2314,
        "clients": ["c-1", "c-2"],
        "digest": "ab" * 32,
        "weights": {"c-1": 60, "c-2": 40},
        "metrics": {"accuracy": 0.9125},
        "x": None,
    }
    assert canonical._fast_dumps(record) is not None
    # Python writes these differently from ECMAScript (1.0, -0.0, 1e-07, 1e+16), or sorts
    # by code point where JCS sorts by UTF-16 units, or holds a NumPy scalar: rfc8785 then.
    for value in (
        1.0,
        -0.0,
        1e-7,
        1e16,
        {"\ufb33": 1, "\U0001f602": 2},
        np.float64(0.5),
        2**53,
        float("nan"),
    ):
        assert canonical._fast_dumps(value) is None, value
    assert canonical_dumps({"\ufb33": 1, "\U0001f602": 2}) == (
        '{"\U0001f602":2,"\ufb33":1}'.encode()
    )


def test_a_cyclic_value_is_refused_not_looped_on() -> None:
    loop: list[object] = []
    loop.append(loop)
    assert canonical._fast_dumps(loop) is None
    with pytest.raises(CanonicalJSONError, match="nested too deeply for JSON or contains itself"):
        canonical_dumps(loop)

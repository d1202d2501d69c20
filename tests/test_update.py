"""
The update decoder against every rule of contract section 2.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from steptrackd.update import (
    MAX_SAFE_INTEGER,
    InvalidUpdate,
    Reason,
    Update,
    UpdateDecoder,
)

decoder = UpdateDecoder()

VALID: dict[str, Any] = {
    "update_id": "ba3f2ea6-1478-4b6d-bacc-97904f839d17",
    "username": "luisa",
    "ts": 1666960429981,
    "newSteps": 108,
}


def encode(**changes: Any) -> bytes:
    update = {**VALID, **changes}
    return json.dumps(
        {k: v for k, v in update.items() if v is not _MISSING}, allow_nan=True
    ).encode()


_MISSING = object()


def reason_of(payload: bytes, decoder: UpdateDecoder = decoder) -> Reason:
    with pytest.raises(InvalidUpdate) as raised:
        decoder.decode(payload)
    return raised.value.reason


def test_the_contract_example_is_valid() -> None:
    """The update shown in the contract decodes to exactly its fields."""
    assert decoder.decode(encode()) == Update(
        "luisa", 1666960429981, 108, "ba3f2ea6-1478-4b6d-bacc-97904f839d17"
    )


@pytest.mark.parametrize(
    "payload",
    [
        b'{"username": "a", "ts": NaN, "newSteps": 1}',
        b'{"username": "a", "ts": Infinity, "newSteps": 1}',
        b'{"username": "a", "ts": -Infinity, "newSteps": 1}',
        b'{"username": "a", "ts": 1, "newSteps": 1',
        b'{"username": "a", "ts": 1, "newSteps": 1} trailing',
        b"",
        b"not json at all",
        b'{"username": "a\xff", "ts": 1, "newSteps": 1}',
        b'{"username": "\\ud800", "ts": 1, "newSteps": 1}',
        b"\xef\xbb\xbf" + encode(),
        b"{'username': 'a', 'ts': 1, 'newSteps': 1}",
    ],
)
def test_payload_that_is_not_strict_json(payload: bytes) -> None:
    """NaN, Infinity, truncation, trailing data, bad UTF-8, lone surrogates."""
    assert reason_of(payload) is Reason.NOT_JSON


@pytest.mark.parametrize(
    "payload", [b"[]", b"[1, 2]", b'"text"', b"1", b"null", b"true"]
)
def test_top_level_must_be_an_object(payload: bytes) -> None:
    """A JSON document that is not an object is not an update."""
    assert reason_of(payload) is Reason.NOT_AN_OBJECT


@pytest.mark.parametrize(
    "username",
    [
        _MISSING,
        None,
        1,
        True,
        ["luisa"],
        "",
        "x" * 257,
        "a\x00b",
        "tab\there",
        "new\nline",
        "trailing newline\n",
        "\x1f",
        "del\x7f",
        "é\x00",
        "ü\n",
        "😀\x7f",
    ],
)
def test_username_rule(username: Any) -> None:
    """username: a string of 1 to 256 characters with no control characters."""
    assert reason_of(encode(username=username)) is Reason.BAD_USERNAME


@pytest.mark.parametrize(
    "username",
    [
        "x" * 256,
        "😀" * 256,
        "with space",
        "a/b",
        "toString",
        "__proto__",
        "é",
        "\u00a0",
        "x\u0085",
        "\u2028",
    ],
)
def test_usernames_that_are_valid(username: str) -> None:
    """256 characters (not bytes), spaces, slashes and odd names are valid.

    Only U+0000 to U+001F and U+007F are control characters to the rule:
    U+0085, a no-break space or a line separator are not.
    """
    assert decoder.decode(encode(username=username)).username == username


@pytest.mark.parametrize(
    "ts",
    [
        _MISSING,
        None,
        "1",
        True,
        False,
        -1,
        -0.5,
        MAX_SAFE_INTEGER + 1,
        2**64,
        [1],
        {"ts": 1},
    ],
)
def test_ts_rule(ts: Any) -> None:
    """ts: a finite JSON number, not a boolean, from 0 to 2^53 - 1."""
    assert reason_of(encode(ts=ts)) is Reason.BAD_TS


def test_ts_that_overflows_to_infinity_is_invalid() -> None:
    """1e400 is valid JSON syntax but not a finite number."""
    payload = b'{"username": "a", "ts": 1e400, "newSteps": 1}'
    assert reason_of(payload) is Reason.BAD_TS


@pytest.mark.parametrize(
    ("ts_text", "expected"),
    [
        ("0", 0),
        ("9007199254740991", MAX_SAFE_INTEGER),
        ("1666960429981.5", 1666960429981.5),
        ("1.0", 1.0),
        ("1e3", 1000.0),
    ],
)
def test_ts_is_kept_as_sent(ts_text: str, expected: float) -> None:
    """ts keeps its value and its type: an integer stays an integer."""
    payload = f'{{"username": "a", "ts": {ts_text}, "newSteps": 1}}'.encode()
    ts = decoder.decode(payload).ts
    assert ts == expected
    assert type(ts) is type(expected)


@pytest.mark.parametrize(
    "new_steps",
    [_MISSING, None, "5", True, False, -1, 1.5, 0.1, 1_000_001, 2**60, [5]],
)
def test_new_steps_rule(new_steps: Any) -> None:
    """newSteps: an integral number, not a boolean, from 0 to the maximum."""
    assert reason_of(encode(newSteps=new_steps)) is Reason.BAD_NEW_STEPS


def test_new_steps_that_overflow_to_infinity_are_invalid() -> None:
    """newSteps 1e400 is not finite."""
    payload = b'{"username": "a", "ts": 1, "newSteps": 1e400}'
    assert reason_of(payload) is Reason.BAD_NEW_STEPS


@pytest.mark.parametrize(
    ("text", "expected"), [("2.0", 2), ("0", 0), ("1e2", 100), ("1000000", 10**6)]
)
def test_integral_new_steps_become_integers(text: str, expected: int) -> None:
    """2.0 counts as 2, and the store always receives an int."""
    payload = f'{{"username": "a", "ts": 1, "newSteps": {text}}}'.encode()
    new_steps = decoder.decode(payload).new_steps
    assert new_steps == expected
    assert type(new_steps) is int


def test_the_maximum_of_new_steps_is_configurable() -> None:
    """--max-new-steps moves the upper bound, and only that."""
    small = UpdateDecoder(max_new_steps=10)
    assert small.decode(encode(newSteps=10)).new_steps == 10
    assert reason_of(encode(newSteps=11), small) is Reason.BAD_NEW_STEPS


@pytest.mark.parametrize("update_id", [None, "", "x" * 129, 5, True, ["a"], {}])
def test_update_id_rule(update_id: Any) -> None:
    """update_id, when present, is a string of 1 to 128 characters (null is not)."""
    assert reason_of(encode(update_id=update_id)) is Reason.BAD_UPDATE_ID


def test_update_id_is_optional() -> None:
    """Without update_id the update is valid and carries None."""
    assert decoder.decode(encode(update_id=_MISSING)).update_id is None


def test_update_id_of_128_characters_is_valid() -> None:
    """128 characters is the longest update_id."""
    assert decoder.decode(encode(update_id="é" * 128)).update_id == "é" * 128


def test_other_fields_are_ignored() -> None:
    """Unknown fields, whatever their value, do not affect validity."""
    payload = encode(extra={"nested": [1, 2, None]}, more=1e300, flag=True)
    assert decoder.decode(payload) == decoder.decode(encode())


def test_duplicate_keys_take_the_last_value() -> None:
    """A key given twice counts with its last value, as most JSON parsers do."""
    payload = b'{"username": "a", "username": "b", "ts": 1, "newSteps": 1}'
    assert decoder.decode(payload).username == "b"


@given(
    st.one_of(
        st.binary(max_size=200),
        st.text(max_size=200).map(str.encode),
        st.recursive(
            st.none()
            | st.booleans()
            | st.integers()
            | st.floats(allow_nan=False)
            | st.text(max_size=20),
            lambda children: (
                st.lists(children, max_size=4)
                | st.dictionaries(
                    st.sampled_from(["username", "ts", "newSteps", "update_id", "x"]),
                    children,
                    max_size=5,
                )
            ),
            max_leaves=10,
        ).map(lambda value: json.dumps(value).encode()),
    )
)
def test_any_payload_decodes_or_is_invalid_with_a_reason(payload: bytes) -> None:
    """No payload makes the decoder raise anything but InvalidUpdate."""
    try:
        update = decoder.decode(payload)
    except InvalidUpdate as invalid:
        assert isinstance(invalid.reason, Reason)
        assert invalid.reason is not Reason.TOTAL_OVERFLOW
    else:
        assert isinstance(update.new_steps, int)
        assert 0 <= update.new_steps <= decoder.max_new_steps
        assert 0 <= update.ts <= MAX_SAFE_INTEGER
        assert 1 <= len(update.username) <= 256


@pytest.mark.parametrize(
    ("skipped", "bad"),
    [
        (b'"x": "%s"', b"\xff"),
        # an encoded surrogate, in a key
        (b'"%s": 1', b"\xed\xa0\x80"),
        # an overlong "/"
        (b'"x": ["%s"]', b"\xc0\xaf"),
        # past U+10FFFF
        (b'"x": {"y": "%s"}', b"\xf4\x90\x80\x80"),
    ],
)
def test_utf8_is_checked_in_skipped_fields_too(skipped: bytes, bad: bytes) -> None:
    """Invalid UTF-8 anywhere, even in a field that is skipped, is not_json."""
    payload = b'{"username": "a", "ts": 1, "newSteps": 1, ' + skipped + b"}"
    assert decoder.decode(payload % "é".encode()).username == "a"
    assert reason_of(payload % bad) is Reason.NOT_JSON
    with pytest.raises(InvalidUpdate) as raised:
        decoder.decode_batch(b"[" + payload % bad + b"]", 1000)
    assert raised.value.reason is Reason.NOT_JSON


@pytest.mark.parametrize("depth", [1000, 100_000])
def test_deeply_nested_json_is_not_json(depth: int) -> None:
    """Nesting deeper than the parser can follow, even if ignored, is not_json."""
    nested = b"[" * depth + b"]" * depth
    payload = b'{"username": "a", "ts": 1, "newSteps": 1, "x": ' + nested + b"}"
    assert reason_of(payload) is Reason.NOT_JSON
    with pytest.raises(InvalidUpdate) as raised:
        decoder.decode_batch(b"[" + nested + b"]", 1000)
    assert raised.value.reason is Reason.NOT_JSON


@pytest.mark.parametrize("payload", [b"[1, }", b"[1,2,3", b'[{"a":1}, '])
def test_batch_broken_after_an_invalid_item_is_not_json(payload: bytes) -> None:
    """An array whose syntax breaks after an invalid item is not_json, as a whole."""
    with pytest.raises(InvalidUpdate) as raised:
        decoder.decode_batch(payload, 1000)
    assert raised.value.reason is Reason.NOT_JSON

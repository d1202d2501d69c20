"""
The AsyncAPI document of the WebSocket protocols (``docs/asyncapi.yaml``),
held to the code: its shape, its reasons and default limits, and its schemas
against real replies of the adapter and real verdicts of the decoder.

It checks what the code can answer; the prose of the document is checked
only where it states a default.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml
from jsonschema import Draft7Validator
from referencing import Registry
from referencing.jsonschema import DRAFT7

from steptrackd import __version__
from steptrackd.server import ProtocolLimits
from steptrackd.update import (
    MAX_SAFE_INTEGER,
    MAX_UPDATE_ID_LENGTH,
    MAX_USERNAME_LENGTH,
    InvalidUpdate,
    Reason,
    Update,
    UpdateDecoder,
)
from steptrackd.websocket import SUBPROTOCOL_V2, Rejection, Reply

from .test_websocket import (
    BINARY,
    V2,
    Adapter,
    frame,
    held_adapter,
    replies,
    v2_update,
)

DOCUMENT = Path(__file__).parent.parent / "docs" / "asyncapi.yaml"
# The document is registered under this name so that its own "#/..."
# references resolve when one of its schemas is used on its own.
_DOCUMENT_URI = "urn:steptrack:asyncapi"
_LIMITS = ProtocolLimits()


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    loaded = yaml.safe_load(DOCUMENT.read_text(encoding="utf-8"))
    assert isinstance(loaded, dict)
    return loaded


def schema(document: dict[str, Any], name: str) -> Draft7Validator:
    """A validator for the document's schema ``name``, references resolved."""
    registry: Registry[Any] = Registry().with_resource(
        _DOCUMENT_URI, DRAFT7.create_resource(document)
    )
    return Draft7Validator(
        {"$ref": f"{_DOCUMENT_URI}#/components/schemas/{name}"}, registry=registry
    )


def resolve(document: dict[str, Any], reference: str) -> Any:
    """The part of the document that a local ``$ref`` points to."""
    assert reference.startswith("#/"), reference
    node: Any = document
    for part in reference[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def references(node: Any) -> Iterator[str]:
    """Every ``$ref`` in ``node``, however deep."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from references(value)
    elif isinstance(node, list):
        for item in node:
            yield from references(item)


def text_of(node: Any) -> str:
    """All the strings in ``node``, joined: what a reader of it reads."""
    if isinstance(node, dict):
        return "\n".join(text_of(value) for value in node.values())
    if isinstance(node, list):
        return "\n".join(text_of(item) for item in node)
    return node if isinstance(node, str) else ""


def test_document_is_asyncapi_3_with_one_channel_and_both_versions(
    document: dict[str, Any],
) -> None:
    """AsyncAPI 3.x: the ws server, one channel, a v1 and a v2 operation."""
    assert str(document["asyncapi"]).startswith("3.")
    server = document["servers"]["local"]
    assert (server["host"], server["protocol"]) == ("localhost:8081", "ws")
    assert list(document["channels"]) == ["updates"]
    channel = "#/channels/updates"
    messages = channel + "/messages/"
    operations = document["operations"]
    assert set(operations) == {"receiveUpdateV1", "receiveUpdatesV2"}
    v1, v2 = operations["receiveUpdateV1"], operations["receiveUpdatesV2"]
    assert v1["action"] == v2["action"] == "receive"
    assert v1["channel"] == v2["channel"] == {"$ref": channel}
    assert v1["messages"] == [{"$ref": messages + "update"}]
    assert "reply" not in v1
    assert v2["messages"] == [
        {"$ref": messages + "updateV2"},
        {"$ref": messages + "batch"},
    ]
    assert v2["reply"] == {
        "channel": {"$ref": channel},
        "messages": [{"$ref": messages + "reply"}],
    }


def test_every_reference_resolves(document: dict[str, Any]) -> None:
    """Every $ref points at something that exists in the document."""
    found = list(references(document))
    assert found
    for reference in found:
        assert resolve(document, reference) is not None, reference


def test_subprotocol_is_the_one_the_code_chooses(document: dict[str, Any]) -> None:
    """The v2 subprotocol in the ws binding and descriptions is the code's."""
    channel = document["channels"]["updates"]
    header = channel["bindings"]["ws"]["headers"]["properties"][
        "Sec-WebSocket-Protocol"
    ]
    assert header["examples"] == [SUBPROTOCOL_V2]
    assert SUBPROTOCOL_V2 in channel["description"]
    assert SUBPROTOCOL_V2 in document["servers"]["local"]["description"]


def test_version_is_the_package_version(document: dict[str, Any]) -> None:
    """info.version names the steptrack release the document describes."""
    assert document["info"]["version"] == __version__


def test_component_schemas_are_valid_draft_7(document: dict[str, Any]) -> None:
    """Every schema is valid JSON Schema (draft 7, as AsyncAPI 3.0 builds on)."""
    for name, component in document["components"]["schemas"].items():
        Draft7Validator.check_schema(component)
        assert component.get("description"), f"{name} has no description"


def test_reasons_are_the_codes_reasons(document: dict[str, Any]) -> None:
    """The reason enum holds every Reason of the code and nothing else."""
    reason = document["components"]["schemas"]["Reason"]
    in_code = {member.value for member in Reason}
    assert set(reason["enum"]) == in_code
    assert len(reason["enum"]) == len(in_code)
    assert set(reason["x-v2-only"]) == {
        Reason.MISSING_UPDATE_ID.value,
        Reason.BATCH_TOO_LARGE.value,
    }
    for value in in_code:
        assert f"`{value}`" in reason["description"], value


def test_default_limits_are_the_codes(document: dict[str, Any]) -> None:
    """Max batch, max newSteps and message size are ProtocolLimits() defaults."""
    schemas = document["components"]["schemas"]
    server = document["servers"]["local"]
    assert schemas["Batch"]["maxItems"] == _LIMITS.max_batch
    assert schemas["Update"]["properties"]["newSteps"]["maximum"] == (
        _LIMITS.max_new_steps
    )
    assert server["x-max-message-size"] == _LIMITS.max_message_size
    text = text_of(document)
    assert f"default {_LIMITS.max_message_size} bytes" in text
    assert f"default {_LIMITS.max_new_steps:,}" in text
    assert f"default {_LIMITS.max_batch}" in text


def test_field_rules_use_the_codes_bounds(document: dict[str, Any]) -> None:
    """Username and update_id lengths and the ts maximum are the code's."""
    schemas = document["components"]["schemas"]
    assert schemas["Username"]["maxLength"] == MAX_USERNAME_LENGTH
    assert schemas["UpdateId"]["maxLength"] == MAX_UPDATE_ID_LENGTH
    rejection_id = schemas["Rejection"]["properties"]["update_id"]
    assert rejection_id["maxLength"] == MAX_UPDATE_ID_LENGTH
    assert schemas["Update"]["properties"]["ts"]["maximum"] == MAX_SAFE_INTEGER


@pytest.mark.parametrize("struct", [Reply, Rejection])
def test_reply_schemas_name_every_field_of_the_code(
    document: dict[str, Any], struct: type[msgspec.Struct]
) -> None:
    """Reply and Rejection list exactly the fields the server encodes, all required."""
    component = document["components"]["schemas"][struct.__name__]
    fields = [field.encode_name for field in msgspec.structs.fields(struct)]
    assert list(component["properties"]) == fields
    assert component["required"] == fields
    assert component["additionalProperties"] is False


def accepted(version: int, payload: bytes) -> bool:
    """Whether the real decoder takes every update in ``payload``."""
    decoder = UpdateDecoder(_LIMITS.max_new_steps)
    try:
        if version == 1:
            decoder.decode(payload)
            return True
        items = decoder.decode_batch(payload, _LIMITS.max_batch)
    except InvalidUpdate:
        return False
    return all(isinstance(item, Update) for item in items)


def conforms(document: dict[str, Any], version: int, payload: bytes) -> bool:
    """Whether ``payload`` matches the document's schema for that version."""
    message = json.loads(payload)
    if version == 1:
        name = "Update"
    else:
        name = "Batch" if isinstance(message, list) else "UpdateV2"
    return schema(document, name).is_valid(message)


def test_message_examples_match_their_schema_and_the_code(
    document: dict[str, Any],
) -> None:
    """Every example message validates; the update examples also decode."""
    versions = {"update": 1, "updateV2": 2, "batch": 2}
    for name, message in document["components"]["messages"].items():
        schema_name = message["payload"]["$ref"].removeprefix("#/components/schemas/")
        assert message["examples"], name
        for example in message["examples"]:
            schema(document, schema_name).validate(example["payload"])
            if name in versions:
                payload = json.dumps(example["payload"]).encode()
                assert accepted(versions[name], payload), example["name"]


def test_real_replies_match_the_reply_schema(document: dict[str, Any]) -> None:
    """Replies of the real adapter, of every kind, validate against Reply."""
    adapter = Adapter(max_batch=4, decoder=UpdateDecoder(MAX_SAFE_INTEGER))
    device = adapter.device(V2)
    mixed = [v2_update("u2"), v2_update("bad", ts=True), v2_update(None)]
    messages = [
        json.dumps(v2_update("u1")).encode(),
        # Applied, rejected with and without an id, and a resend of u1.
        json.dumps([*mixed, v2_update("u1")]).encode(),
        json.dumps(["not an object"]).encode(),
        b"[{",
        json.dumps([v2_update(f"m{i}") for i in range(5)]).encode(),
        b"[]",
        b"{nope",
        json.dumps(v2_update("big", newSteps=MAX_SAFE_INTEGER)).encode(),
    ]
    got = replies(device.send(*(frame(message, BINARY) for message in messages)))
    failing, store = held_adapter()
    store.fail_next = True
    failing_device = failing.device(V2)
    failing_device.send(
        frame(json.dumps([v2_update("r1"), v2_update("r2", ts=-1)]).encode())
    )
    store.release(0)
    got += replies(failing_device.send())

    reply_schema = schema(document, "Reply")
    for reply in got:
        reply_schema.validate(reply)
    assert [reply["seq"] for reply in got] == [*range(1, len(messages) + 1), 1]
    rejections = [r for reply in got for r in reply["rejected"]]
    # Every kind of entry the schema allows has been seen and checked.
    assert any(reply["acked"] for reply in got)
    assert any(reply["retry"] for reply in got)
    assert {r["index"] is None for r in rejections} == {True, False}
    assert {r["update_id"] is None for r in rejections} == {True, False}
    assert {"total_overflow", "batch_too_large", "missing_update_id"} <= {
        r["reason"] for r in rejections
    }


_VALID_V1 = {
    "update_id": "ba3f2ea6-1478-4b6d-bacc-97904f839d17",
    "username": "luisa",
    "ts": 1666960429981,
    "newSteps": 108,
}
_NO_ID = {key: value for key, value in _VALID_V1.items() if key != "update_id"}


def _with(**fields: Any) -> dict[str, Any]:
    return {**_VALID_V1, **fields}


_CASES = [
    ("valid example", 1, _VALID_V1, True),
    ("no update_id in v1", 1, _NO_ID, True),
    ("unknown field", 1, _with(x=[1e300]), True),
    ("bool ts", 1, _with(ts=True), False),
    ("negative ts", 1, _with(ts=-1), False),
    ("float ts", 1, _with(ts=1.5), True),
    ("ts at 2^53 - 1", 1, _with(ts=MAX_SAFE_INTEGER), True),
    ("ts at 2^53", 1, _with(ts=MAX_SAFE_INTEGER + 1), False),
    ("1.5 newSteps", 1, _with(newSteps=1.5), False),
    ("2.0 newSteps", 1, _with(newSteps=2.0), True),
    ("bool newSteps", 1, _with(newSteps=False), False),
    ("newSteps at max", 1, _with(newSteps=_LIMITS.max_new_steps), True),
    ("newSteps over max", 1, _with(newSteps=_LIMITS.max_new_steps + 1), False),
    ("256-char username", 1, _with(username="u" * 256), True),
    ("257-char username", 1, _with(username="u" * 257), False),
    ("256 astral chars", 1, _with(username="\U0001f600" * 256), True),
    ("empty username", 1, _with(username=""), False),
    ("control char", 1, _with(username="a\x07b"), False),
    ("DEL char", 1, _with(username="a\x7f"), False),
    ("no username", 1, {"ts": 1, "newSteps": 1}, False),
    ("null update_id", 1, _with(update_id=None), False),
    ("128-char update_id", 1, _with(update_id="i" * 128), True),
    ("129-char update_id", 1, _with(update_id="i" * 129), False),
    ("number update_id", 1, _with(update_id=7), False),
    ("array in v1", 1, [_VALID_V1], False),
    ("valid example in v2", 2, _VALID_V1, True),
    ("missing update_id in v2", 2, _NO_ID, False),
    ("bool ts in v2", 2, _with(ts=True), False),
    ("batch of two", 2, [_VALID_V1, _with(update_id="2")], True),
    ("empty batch", 2, [], True),
    ("batch with an invalid item", 2, [_VALID_V1, _NO_ID], False),
    ("batch at max", 2, [_VALID_V1] * _LIMITS.max_batch, True),
    ("batch over max", 2, [_VALID_V1] * (_LIMITS.max_batch + 1), False),
    ("number in v2", 2, 42, False),
]


@pytest.mark.parametrize(
    ("version", "message", "valid"),
    [
        *(pytest.param(*case[1:], id=case[0]) for case in _CASES),
        pytest.param(
            1, _with(username="abc\n"), False, id="username ending in a newline"
        ),
    ],
)
def test_schemas_judge_updates_as_the_decoder_does(
    document: dict[str, Any], version: int, message: Any, valid: bool
) -> None:
    """An update the decoder takes validates; one it refuses does not."""
    payload = json.dumps(message).encode()
    assert conforms(document, version, payload) is valid
    assert accepted(version, payload) is valid

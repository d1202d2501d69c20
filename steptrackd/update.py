"""
What a step update is, and the decoder that decides whether one is valid.

This module knows the wire format and the validation rules of an update and
nothing else: it does not know where totals are kept (that is ``store``) or
how updates arrive (that is ``websocket``). One call to
:meth:`UpdateDecoder.decode` parses and validates a payload in a single pass;
the schema is expressed as msgspec types so that most rules are checked while
parsing, and only what msgspec cannot express, or can only express slowly, is
checked afterwards.

msgspec checks the UTF-8 of every string it decodes, but skips the fields it
does not need without looking inside them; the decoder checks the payload's
UTF-8 as a whole first, which for an ASCII payload (the usual case) costs
one ``bytes.isascii()``.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable
from typing import Annotated, Final, TypeVar

import msgspec

T = TypeVar("T")

MAX_SAFE_INTEGER: Final = 2**53 - 1
"""The largest integer that every JSON client reads exactly."""

MAX_USERNAME_LENGTH: Final = 256
MAX_UPDATE_ID_LENGTH: Final = 128
DEFAULT_MAX_NEW_STEPS: Final = 1_000_000


class Reason(enum.StrEnum):
    """
    Why an update was not applied. The values are stable, machine-readable
    names: they appear in logs and counters, and clients may rely on them.
    """

    NOT_JSON = "not_json"
    NOT_AN_OBJECT = "not_an_object"
    BAD_USERNAME = "bad_username"
    BAD_TS = "bad_ts"
    BAD_NEW_STEPS = "bad_new_steps"
    BAD_UPDATE_ID = "bad_update_id"
    TOTAL_OVERFLOW = "total_overflow"
    # Protocol v2 only:
    MISSING_UPDATE_ID = "missing_update_id"
    BATCH_TOO_LARGE = "batch_too_large"


class InvalidUpdate(Exception):
    """
    A payload that is not a valid update.

    ``reason`` says which rule it broke; ``detail`` is a short human-readable
    explanation for the log (never a copy of the payload).
    """

    def __init__(
        self, reason: Reason, detail: str, update_id: str | None = None
    ) -> None:
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail
        self.update_id = update_id
        """The update's id, when it has a readable one (protocol v2 replies)."""


class Update(msgspec.Struct, frozen=True, gc=False):
    """
    A valid update, as the stores receive it.

    ``new_steps`` is always an ``int``; ``ts`` is an ``int`` or a ``float``
    exactly as the client sent it, so that an integer comes back as an
    integer. ``update_id`` is ``None`` when the client sent none.
    """

    username: str
    ts: int | float
    new_steps: int
    update_id: str | None = None


# The wire schema. The fixed rules of the contract live in these types so
# that msgspec checks them while it parses; the configurable maximum of
# newSteps, "integral value" and the username's characters are checked after
# decoding. (A msgspec pattern would cost a regular-expression search per
# update, more than half of the decoding time.)
_Username = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_USERNAME_LENGTH)]
_Ts = (
    Annotated[int, msgspec.Meta(ge=0, le=MAX_SAFE_INTEGER)]
    | Annotated[float, msgspec.Meta(ge=0, le=MAX_SAFE_INTEGER)]
)
_NewSteps = Annotated[int, msgspec.Meta(ge=0)] | Annotated[float, msgspec.Meta(ge=0)]
_UpdateId = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_UPDATE_ID_LENGTH)]


class _WireUpdate(msgspec.Struct, rename={"new_steps": "newSteps"}, gc=False):
    username: _Username
    ts: _Ts
    new_steps: _NewSteps
    # UNSET, not None, so that an explicit ``"update_id": null`` is invalid.
    update_id: _UpdateId | msgspec.UnsetType = msgspec.UNSET


_CONTROL_CHARACTER: Final = re.compile("[\x00-\x1f\x7f]")

_FIELD_REASONS: Final = {
    "username": Reason.BAD_USERNAME,
    "ts": Reason.BAD_TS,
    "newSteps": Reason.BAD_NEW_STEPS,
    "update_id": Reason.BAD_UPDATE_ID,
}
_FIELD_IN_ERROR = re.compile(r"`\$\.(\w+)`|required field `(\w+)`")


def _reason_for(error: msgspec.ValidationError) -> Reason:
    """
    Name the rule that a msgspec validation error is about.

    msgspec reports the offending field as a path (``at `$.ts```) or, for a
    missing field, by name. An error with no field is about the top level,
    which can only fail by not being an object.
    """
    match = _FIELD_IN_ERROR.search(str(error))
    if match is None:
        return Reason.NOT_AN_OBJECT
    return _FIELD_REASONS[match.group(1) or match.group(2)]


# msgspec raises RecursionError for JSON nested deeper than the stack
# allows (about a thousand levels), even inside a field that is ignored.
_UNREADABLE: Final = (msgspec.DecodeError, RecursionError)


def _not_json(error: Exception) -> InvalidUpdate:
    if isinstance(error, RecursionError):
        return InvalidUpdate(Reason.NOT_JSON, "JSON nested too deeply")
    return InvalidUpdate(Reason.NOT_JSON, str(error))


def is_utf8(payload: bytes) -> bool:
    """
    Whether ``payload`` is valid UTF-8 (RFC 3629: no surrogates, no overlong
    forms, nothing past U+10FFFF), as RFC 6455 requires of a text message.
    """
    if payload.isascii():
        return True
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _check_utf8(payload: bytes) -> None:
    if not is_utf8(payload):
        raise InvalidUpdate(Reason.NOT_JSON, "the payload is not UTF-8")


class _IdOnly(msgspec.Struct):
    update_id: object = None


_decode_items = msgspec.json.Decoder(list[msgspec.Raw]).decode
_decode_id = msgspec.json.Decoder(_IdOnly).decode


def update_id_of(payload: bytes | msgspec.Raw) -> str | None:
    """
    The update_id of a payload that did not decode as an update, if it has
    a usable one, so that a rejection can name it.
    """
    try:
        update_id = _decode_id(payload).update_id
    except (msgspec.ValidationError, *_UNREADABLE):
        return None
    if isinstance(update_id, str) and 1 <= len(update_id) <= MAX_UPDATE_ID_LENGTH:
        return update_id
    return None


class UpdateDecoder:
    """
    Turns one payload (UTF-8 JSON bytes) into an :class:`Update`, or raises
    :class:`InvalidUpdate` saying why it cannot.
    """

    def __init__(self, max_new_steps: int = DEFAULT_MAX_NEW_STEPS) -> None:
        self.max_new_steps = max_new_steps
        self._decode = msgspec.json.Decoder(_WireUpdate).decode
        self._decode_all = msgspec.json.Decoder(list[_WireUpdate]).decode

    def decode(self, payload: bytes) -> Update:
        _check_utf8(payload)
        return self.decode_utf8(payload)

    def decode_utf8(self, payload: bytes | msgspec.Raw) -> Update:
        """
        :meth:`decode`, for a payload known to be valid UTF-8 (a WebSocket
        text message, which RFC 6455 has the server check).
        """
        try:
            wire = self._decode(payload)
        except msgspec.ValidationError as e:
            raise InvalidUpdate(_reason_for(e), str(e)) from None
        except _UNREADABLE as e:
            raise _not_json(e) from None
        return self._checked(wire)

    def _checked(self, wire: _WireUpdate) -> Update:
        """The rules msgspec does not check while parsing."""
        username = wire.username
        # The ASCII characters that are not printable are exactly the control
        # characters of the rule: the usual name needs no search.
        if (
            not username.isprintable()
            if username.isascii()
            else _CONTROL_CHARACTER.search(username) is not None
        ):
            raise InvalidUpdate(Reason.BAD_USERNAME, "username has a control character")
        new_steps = wire.new_steps
        if isinstance(new_steps, float):
            if not new_steps.is_integer():
                raise InvalidUpdate(
                    Reason.BAD_NEW_STEPS, "newSteps is not a whole number"
                )
            new_steps = int(new_steps)
        if new_steps > self.max_new_steps:
            raise InvalidUpdate(
                Reason.BAD_NEW_STEPS,
                f"newSteps is over the maximum of {self.max_new_steps}",
            )
        update_id = wire.update_id
        return Update(
            username,
            wire.ts,
            new_steps,
            None if update_id is msgspec.UNSET else update_id,
        )

    def decode_batch(
        self, payload: bytes, max_batch: int
    ) -> list[Update | InvalidUpdate]:
        """
        Protocol v2: a payload is one update or a JSON array of at most
        ``max_batch`` of them, each with an update_id. Returns, in order,
        each update or why it is invalid; raises :class:`InvalidUpdate` when
        the payload as a whole is unusable (not JSON, too many updates).
        """
        _check_utf8(payload)
        if payload.lstrip()[:1] != b"[":
            return [self._with_id(self._decode_one, payload)]
        try:
            # The whole batch in one pass: the common case, all valid.
            wires = self._decode_all(payload)
        except msgspec.ValidationError:
            # Some item is invalid: decode item by item to say which. The
            # first pass may have stopped at that item before reaching a
            # syntax error further on, so the array can still be unreadable.
            try:
                raws = _decode_items(payload)
            except _UNREADABLE as e:
                raise _not_json(e) from None
            self._check_size(len(raws), max_batch)
            return [self._with_id(self._decode_one, raw) for raw in raws]
        except _UNREADABLE as e:
            raise _not_json(e) from None
        self._check_size(len(wires), max_batch)
        return [self._with_id(self._checked, wire) for wire in wires]

    @staticmethod
    def _check_size(size: int, max_batch: int) -> None:
        if size > max_batch:
            raise InvalidUpdate(
                Reason.BATCH_TOO_LARGE,
                f"{size} updates in one message; the limit is {max_batch}",
            )

    def _decode_one(self, payload: bytes | msgspec.Raw) -> Update:
        try:
            return self.decode_utf8(payload)
        except InvalidUpdate as invalid:
            invalid.update_id = update_id_of(payload)
            raise

    @staticmethod
    def _with_id(decode: Callable[[T], Update], item: T) -> Update | InvalidUpdate:
        """``decode(item)``, as an outcome, with the update_id v2 requires."""
        try:
            update = decode(item)
        except InvalidUpdate as invalid:
            if invalid.update_id is None and isinstance(item, _WireUpdate):
                invalid.update_id = (
                    None if item.update_id is msgspec.UNSET else item.update_id
                )
            return invalid
        if update.update_id is None:
            return InvalidUpdate(
                Reason.MISSING_UPDATE_ID, "protocol v2 needs an update_id"
            )
        return update

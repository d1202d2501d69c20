"""
The WebSocket adapter in memory: Autobahn's real server protocol over a
``StringTransport``, fed frames built here byte by byte, with no reactor.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from typing import Any

import pytest
from autobahn.websocket.utf8validator import Utf8Validator
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, capturedLogs

from steptrackd.rejections import RejectionCounter
from steptrackd.store import MemoryStore, Outcome, StoreWriteFailed, Total
from steptrackd.update import MAX_SAFE_INTEGER, Reason, Update
from steptrackd.websocket import (
    MAX_BYTES_PER_TURN,
    MAX_FRAMES_PER_MESSAGE,
    MAX_HANDSHAKE_SIZE,
    MAX_IN_FLIGHT,
    StepUpdateFactory,
    StepUpdateProtocol,
)

from .test_store import result_of

TEXT, BINARY, CONTINUATION, CLOSE, PING, PONG = 0x1, 0x2, 0x0, 0x8, 0x9, 0xA


def frame(payload: bytes, opcode: int = TEXT, fin: bool = True) -> bytes:
    """One client frame, masked as RFC 6455 requires of clients."""
    mask = os.urandom(4)
    length = len(payload)
    if length < 126:
        header = struct.pack("!BB", (0x80 if fin else 0) | opcode, 0x80 | length)
    elif length < 2**16:
        header = struct.pack("!BBH", (0x80 if fin else 0) | opcode, 0x80 | 126, length)
    else:
        header = struct.pack("!BBQ", (0x80 if fin else 0) | opcode, 0x80 | 127, length)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return header + mask + masked


def update(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def server_frames(data: bytes) -> list[tuple[int, bytes]]:
    """Split what the server wrote into (opcode, payload) frames."""
    frames = []
    while data:
        opcode = data[0] & 0x0F
        length = data[1] & 0x7F
        offset = 2
        if length == 126:
            (length,) = struct.unpack("!H", data[2:4])
            offset = 4
        elif length == 127:
            (length,) = struct.unpack("!Q", data[2:10])
            offset = 10
        frames.append((opcode, data[offset : offset + length]))
        data = data[offset + length :]
    return frames


def close_code(data: bytes) -> int | None:
    for opcode, payload in server_frames(data):
        if opcode == CLOSE:
            code: int = struct.unpack("!H", payload[:2])[0]
            return code
    return None


HANDSHAKE = (
    b"GET / HTTP/1.1\r\n"
    b"Host: localhost:8081\r\n"
    b"Upgrade: websocket\r\n"
    b"Connection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n"
)


class _Transport(StringTransport):
    """A StringTransport that, like a real one, lets go of no producer."""

    aborted = False

    def unregisterProducer(self) -> None:
        self.producer = None

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()


class Device:
    """One device connected to the adapter over an in-memory transport."""

    def __init__(self, factory: StepUpdateFactory, extra_headers: bytes = b"") -> None:
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        assert isinstance(protocol, StepUpdateProtocol)
        self.protocol: StepUpdateProtocol = protocol
        self.transport: _Transport = _Transport(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 8081),
            peerAddress=IPv4Address("TCP", "127.0.0.1", 40000),
        )
        self.protocol.makeConnection(self.transport)
        self.protocol.dataReceived(HANDSHAKE + extra_headers + b"\r\n")
        self.handshake_response: bytes = self.transport.value()
        self.transport.clear()

    def send(self, *frames: bytes) -> bytes:
        """Deliver frames in one read; return what the server wrote back."""
        self.protocol.dataReceived(b"".join(frames))
        written: bytes = self.transport.value()
        self.transport.clear()
        return written


class Adapter:
    def __init__(self, **options: Any) -> None:
        self.clock = Clock()
        self.store = MemoryStore(self.clock)
        self.store.startService()
        self.rejections = RejectionCounter(self.clock)
        # Timeouts off: they would need a running reactor.
        options = {
            "max_batch": 1000,
            "handshake_timeout": 0,
            "ping_interval": 0,
            "close_timeout": 0,
            **options,
        }
        self.factory = StepUpdateFactory(
            self.store, self.rejections, reactor=self.clock, **options
        )

    def device(self, extra_headers: bytes = b"") -> Device:
        return Device(self.factory, extra_headers)

    def total(self, username: str) -> Total | None:
        return result_of(self.store.total(username))


@pytest.fixture
def adapter() -> Iterator[Adapter]:
    adapter = Adapter()
    yield adapter
    result_of(adapter.store.close())


def test_handshake_offers_nothing_extra(adapter: Adapter) -> None:
    """Protocol v1: no subprotocol chosen and no permessage-deflate, even when asked."""
    device = adapter.device(
        b"Sec-WebSocket-Protocol: chat, steptrack.v9\r\n"
        b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
    )
    response = device.handshake_response.lower()
    assert response.startswith(b"http/1.1 101 switching protocols")
    assert b"sec-websocket-protocol" not in response
    assert b"sec-websocket-extensions" not in response


def test_text_and_binary_messages_both_carry_updates(adapter: Adapter) -> None:
    """A text and a binary message each apply their update; nothing is sent back."""
    device = adapter.device()
    written = device.send(
        frame(update(username="a", ts=1, newSteps=10), TEXT),
        frame(update(username="a", ts=2, newSteps=5), BINARY),
    )
    assert written == b""
    assert adapter.total("a") == Total(15, 2)


def test_updates_apply_in_the_order_sent(adapter: Adapter) -> None:
    """Two updates with one update_id: the first sent is the one counted."""
    device = adapter.device()
    device.send(
        frame(update(username="a", ts=1, newSteps=10, update_id="x")),
        frame(update(username="a", ts=2, newSteps=99, update_id="x")),
    )
    assert adapter.total("a") == Total(10, 1)


def test_invalid_update_is_counted_and_the_connection_lives(adapter: Adapter) -> None:
    """An invalid update is ignored and counted by reason; later updates still apply."""
    device = adapter.device()
    written = device.send(
        frame(b"{not json"),
        frame(update(username="a", ts=True, newSteps=1)),
        frame(b"[1, 2, 3]", BINARY),
        frame(update(username="a", ts=1, newSteps=7)),
    )
    assert written == b""
    assert device.protocol.state == device.protocol.STATE_OPEN
    assert adapter.total("a") == Total(7, 1)
    assert adapter.rejections.totals == {
        Reason.NOT_JSON: 1,
        Reason.BAD_TS: 1,
        Reason.NOT_AN_OBJECT: 1,
    }


def test_overflowing_total_is_counted(adapter: Adapter) -> None:
    """An update that would pass 2^53 - 1 is counted as total_overflow."""
    device = adapter.device()
    device.send(
        *(frame(update(username="a", ts=1, newSteps=1_000_000)) for _ in range(3))
    )
    result_of(adapter.store.apply([]))
    adapter.store._totals["a"][0] = MAX_SAFE_INTEGER - 5
    device.send(frame(update(username="a", ts=1, newSteps=6)))
    assert adapter.rejections.totals == {Reason.TOTAL_OVERFLOW: 1}
    assert adapter.total("a") == Total(MAX_SAFE_INTEGER - 5, 1)


def test_binary_message_with_invalid_utf8_is_an_invalid_update(
    adapter: Adapter,
) -> None:
    """Bad UTF-8 in a binary message is bad JSON, not a protocol error."""
    device = adapter.device()
    written = device.send(frame(b'{"username": "\xff"}', BINARY))
    assert written == b""
    assert adapter.rejections.totals == {Reason.NOT_JSON: 1}


def test_text_message_with_invalid_utf8_closes_with_1007(adapter: Adapter) -> None:
    """RFC 6455: invalid UTF-8 in a text message fails the connection with 1007."""
    device = adapter.device()
    written = device.send(frame(b'{"username": "\xff"}', TEXT))
    assert close_code(written) == 1007


def test_message_over_the_limit_closes_with_1009() -> None:
    """A message over the maximum size closes the connection with 1009."""
    adapter = Adapter(max_message_size=100)
    device = adapter.device()
    written = device.send(frame(b" " * 101))
    assert close_code(written) == 1009


def test_message_over_the_limit_in_fragments_closes_with_1009() -> None:
    """The limit holds for the whole message, not only for each frame."""
    adapter = Adapter(max_message_size=100)
    device = adapter.device()
    written = device.send(
        frame(b" " * 60, TEXT, fin=False), frame(b" " * 60, CONTINUATION)
    )
    assert close_code(written) == 1009


def test_fragmented_message_is_one_update(adapter: Adapter) -> None:
    """A message in several frames, with a ping between them, is one update."""
    payload = update(username="a", ts=3, newSteps=4)
    device = adapter.device()
    written = device.send(
        frame(payload[:5], TEXT, fin=False),
        frame(b"hi", PING),
        frame(payload[5:], CONTINUATION),
    )
    assert server_frames(written) == [(PONG, b"hi")]
    assert adapter.total("a") == Total(4, 3)


def test_going_away_sends_1001(adapter: Adapter) -> None:
    """Shutting down closes an open connection with 1001."""
    device = adapter.device()
    device.protocol.close_going_away()
    assert close_code(device.transport.value()) == 1001


def test_connection_is_forgotten_once_lost(adapter: Adapter) -> None:
    """The factory tracks live connections only, for shutdown."""
    device = adapter.device()
    assert adapter.factory.connections == {device.protocol}
    device.protocol.connectionLost()
    assert adapter.factory.connections == set()
    assert device.protocol.closed.called


_payloads = st.one_of(
    st.tuples(
        st.sampled_from(["a", "b"]),
        st.one_of(st.none(), st.sampled_from(["1", "2", "3"])),
        st.integers(0, 100),
        st.integers(0, 100),
    ),
    st.sampled_from(
        [
            b"{",
            b"[]",
            update(username="", ts=1, newSteps=1),
            update(username="a", ts=-1, newSteps=1),
            update(username="a", ts=1, newSteps=1.5),
            update(username="a", ts=1, newSteps=1, update_id=""),
        ]
    ),
)


@settings(max_examples=150)
@given(
    messages=st.lists(_payloads, max_size=30),
    binary=st.lists(st.booleans(), min_size=30, max_size=30),
    cuts=st.lists(st.integers(1, 200), max_size=10),
)
def test_any_stream_gives_exact_totals(
    messages: list[Any], binary: list[bool], cuts: list[int]
) -> None:
    """Any valid, invalid and repeated updates, cut anywhere: exact totals."""
    adapter = Adapter()
    device = adapter.device()
    stream = b""
    expected: dict[str, list[int]] = {}
    seen: set[tuple[str, str]] = set()
    invalid = 0
    for message, is_binary in zip(messages, binary, strict=False):
        if isinstance(message, bytes):
            stream += frame(message, BINARY if is_binary else TEXT)
            invalid += 1
            continue
        username, update_id, ts, new_steps = message
        fields: dict[str, Any] = {"username": username, "ts": ts, "newSteps": new_steps}
        if update_id is not None:
            fields["update_id"] = update_id
        stream += frame(update(**fields), BINARY if is_binary else TEXT)
        if update_id is not None:
            if (username, update_id) in seen:
                continue
            seen.add((username, update_id))
        entry = expected.setdefault(username, [0, ts])
        entry[0] += new_steps
        entry[1] = max(entry[1], ts)
    position = 0
    for cut in cuts:
        written = device.send(stream[position : position + cut])
        assert close_code(written) is None
        position += cut
    device.send(stream[position:])
    for username in ["a", "b"]:
        if username in expected:
            assert adapter.total(username) == Total(*expected[username])
        else:
            assert adapter.total(username) is None
    assert sum(adapter.rejections.totals.values()) == invalid


V2 = b"Sec-WebSocket-Protocol: steptrack.v2\r\n"


def replies(written: bytes) -> list[dict[str, Any]]:
    """The version 2 replies among what the server wrote."""
    return [json.loads(p) for opcode, p in server_frames(written) if opcode == TEXT]


def v2_update(update_id: str | None = None, **fields: Any) -> dict[str, Any]:
    update: dict[str, Any] = {"username": "a", "ts": 1, "newSteps": 1, **fields}
    if update_id is not None:
        update["update_id"] = update_id
    return update


def test_v2_is_chosen_when_offered(adapter: Adapter) -> None:
    """A client offering steptrack.v2 gets it back in the handshake."""
    device = adapter.device(b"Sec-WebSocket-Protocol: other, steptrack.v2\r\n")
    assert b"Sec-WebSocket-Protocol: steptrack.v2" in device.handshake_response
    assert device.protocol.version == 2


def test_v2_single_update_is_acked(adapter: Adapter) -> None:
    """One update in a message: applied, then acknowledged by its id."""
    device = adapter.device(V2)
    written = device.send(frame(json.dumps(v2_update("u1", newSteps=5)).encode()))
    assert replies(written) == [
        {"seq": 1, "acked": ["u1"], "rejected": [], "retry": []}
    ]
    assert adapter.total("a") == Total(5, 1)


def test_v2_batch_is_acked_in_order_with_resends(adapter: Adapter) -> None:
    """A batch: every applied id and every resend is acked, in batch order."""
    device = adapter.device(V2)
    device.send(frame(json.dumps([v2_update("u1", newSteps=5)]).encode()))
    written = device.send(
        frame(
            json.dumps(
                [
                    v2_update("u2", newSteps=1),
                    v2_update("u1", newSteps=5),
                    v2_update("u3"),
                ]
            ).encode(),
            BINARY,
        )
    )
    assert replies(written) == [
        {"seq": 2, "acked": ["u2", "u1", "u3"], "rejected": [], "retry": []}
    ]
    assert adapter.total("a") == Total(7, 1)


def test_v2_rejections_name_index_id_and_reason(adapter: Adapter) -> None:
    """Invalid updates in a batch are rejected by index and id; the rest apply."""
    device = adapter.device(V2)
    batch = [
        v2_update("ok-1"),
        v2_update("bad-ts", ts=-1),
        v2_update(None),
        "not an object",
        v2_update("ok-2", newSteps=1.5),
        {"update_id": 7, "username": "a", "ts": 1, "newSteps": 1},
    ]
    written = device.send(frame(json.dumps(batch).encode()))
    assert replies(written) == [
        {
            "seq": 1,
            "acked": ["ok-1"],
            "rejected": [
                {"index": 1, "update_id": "bad-ts", "reason": "bad_ts"},
                {"index": 2, "update_id": None, "reason": "missing_update_id"},
                {"index": 3, "update_id": None, "reason": "not_an_object"},
                {"index": 4, "update_id": "ok-2", "reason": "bad_new_steps"},
                {"index": 5, "update_id": None, "reason": "bad_update_id"},
            ],
            "retry": [],
        }
    ]
    assert adapter.total("a") == Total(1, 1)
    assert device.protocol.state == device.protocol.STATE_OPEN


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"[{", "not_json"),
        (b"{nope", "not_json"),
        (b"42", "not_an_object"),
        (
            json.dumps([v2_update(f"u{i}") for i in range(11)]).encode(),
            "batch_too_large",
        ),
    ],
)
def test_v2_message_refused_as_a_whole(payload: bytes, reason: str) -> None:
    """Not JSON, or too big a batch: the message is refused whole."""
    adapter = Adapter(max_batch=10)
    device = adapter.device(V2)
    written = device.send(frame(payload))
    [reply] = replies(written)
    assert reply["acked"] == []
    assert [r["reason"] for r in reply["rejected"]] == [reason]
    assert adapter.total("a") is None


def test_v2_batch_at_the_limit_is_accepted() -> None:
    """max_batch updates in one message are fine."""
    adapter = Adapter(max_batch=10)
    device = adapter.device(V2)
    written = device.send(
        frame(json.dumps([v2_update(f"u{i}") for i in range(10)]).encode())
    )
    assert len(replies(written)[0]["acked"]) == 10


def test_v2_overflow_is_rejected_not_acked(adapter: Adapter) -> None:
    """An update that would pass 2^53 - 1 is rejected with total_overflow."""
    device = adapter.device(V2)
    adapter.store._totals["a"] = [MAX_SAFE_INTEGER - 1, 1]
    written = device.send(
        frame(json.dumps([v2_update("x", newSteps=2), v2_update("y")]).encode())
    )
    assert replies(written) == [
        {
            "seq": 1,
            "acked": ["y"],
            "rejected": [{"index": 0, "update_id": "x", "reason": "total_overflow"}],
            "retry": [],
        }
    ]


def test_v2_replies_follow_message_order(adapter: Adapter) -> None:
    """One reply per message, numbered by seq, in the order the messages came."""
    device = adapter.device(V2)
    written = device.send(
        frame(json.dumps(v2_update("a1")).encode()),
        frame(b"garbage"),
        frame(json.dumps([v2_update("a2"), v2_update("a3")]).encode()),
    )
    assert [(r["seq"], r["acked"]) for r in replies(written)] == [
        (1, ["a1"]),
        (2, []),
        (3, ["a2", "a3"]),
    ]


class HeldStore(MemoryStore):
    """A memory store whose answers wait until the test releases them."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock)
        self.held: list[tuple[Deferred[list[Outcome]], list[Outcome] | Exception]] = []
        self.fail_next = False

    def apply(self, updates: Any) -> Deferred[list[Outcome]]:
        result: list[Outcome] | Exception = (
            StoreWriteFailed("disk full") if self.fail_next else self.apply_now(updates)
        )
        held: Deferred[list[Outcome]] = Deferred()
        self.held.append((held, result))
        return held

    def release(self, index: int) -> None:
        held, result = self.held[index]
        if isinstance(result, Exception):
            held.errback(result)
        else:
            held.callback(result)


def held_adapter() -> tuple[Adapter, HeldStore]:
    adapter = Adapter()
    store = HeldStore(adapter.clock)
    adapter.factory.store = store
    adapter.store = store
    return adapter, store


def test_v2_replies_wait_for_earlier_messages() -> None:
    """No reply overtakes an earlier message's, whatever finishes first."""
    adapter, store = held_adapter()
    device = adapter.device(V2)
    device.send(
        frame(json.dumps(v2_update("first")).encode()),
        frame(json.dumps(v2_update("second")).encode()),
    )
    store.release(1)
    assert replies(device.send()) == []
    store.release(0)
    assert [r["acked"] for r in replies(device.send())] == [["first"], ["second"]]


def test_v2_failed_write_asks_for_a_retry() -> None:
    """When the store cannot write, nothing is acked: the ids come back under retry."""
    adapter, store = held_adapter()
    store.fail_next = True
    device = adapter.device(V2)
    device.send(frame(json.dumps([v2_update("r1"), v2_update("r2", ts=-5)]).encode()))
    store.release(0)
    assert replies(device.send()) == [
        {
            "seq": 1,
            "acked": [],
            "rejected": [{"index": 1, "update_id": "r2", "reason": "bad_ts"}],
            "retry": ["r1"],
        }
    ]
    assert device.protocol.state == device.protocol.STATE_OPEN


def test_reading_pauses_while_the_store_lags() -> None:
    """A client far ahead of the store is not read until the store catches up."""
    adapter, store = held_adapter()
    device = adapter.device(V2)
    for i in range(MAX_IN_FLIGHT + 1):
        device.send(frame(json.dumps(v2_update(f"u{i}")).encode()))
    assert device.transport.producerState == "paused"
    for i in range(MAX_IN_FLIGHT // 2 + 1):
        store.release(i)
    assert device.transport.producerState == "producing"


@pytest.mark.parametrize(
    ("close_payload", "expected"),
    [
        (struct.pack("!H", 999), 1002),
        (struct.pack("!H", 1005), 1002),
        (b"\x03", 1002),
        (struct.pack("!H", 1000) + b"\xff\xfe", 1007),
    ],
)
def test_bad_close_frame_is_answered_with_a_code(
    adapter: Adapter, close_payload: bytes, expected: int
) -> None:
    """A close frame that breaks RFC 6455 is answered with 1002/1007, not a reset."""
    device = adapter.device()
    written = device.send(frame(close_payload, CLOSE))
    assert close_code(written) == expected
    # Aborting would discard the close frame before it reaches the client.
    assert not device.transport.aborted


def test_v2_rule_broken_after_parsing_names_the_id(adapter: Adapter) -> None:
    """A rule checked after parsing (newSteps 1.5, or too big) still names the id."""
    device = adapter.device(V2)
    batch = [
        v2_update("ok"),
        v2_update("half", newSteps=1.5),
        v2_update("big", newSteps=10**7),
    ]
    [reply] = replies(device.send(frame(json.dumps(batch).encode())))
    assert reply["acked"] == ["ok"]
    assert reply["rejected"] == [
        {"index": 1, "update_id": "half", "reason": "bad_new_steps"},
        {"index": 2, "update_id": "big", "reason": "bad_new_steps"},
    ]


def test_reading_pauses_while_the_client_reads_no_replies(adapter: Adapter) -> None:
    """When our send buffer fills (the client reads no replies), we stop reading it."""
    device = adapter.device(V2)
    flow = device.transport.producer
    assert flow is not None
    flow.pauseProducing()
    assert device.transport.producerState == "paused"
    flow.resumeProducing()
    assert device.transport.producerState == "producing"


def test_endless_fragments_close_with_1009(adapter: Adapter) -> None:
    """A message of more fragments than allowed closes with 1009, even if empty."""
    device = adapter.device()
    written = device.send(
        frame(b"", TEXT, fin=False),
        *(frame(b"", CONTINUATION, fin=False) for _ in range(MAX_FRAMES_PER_MESSAGE)),
    )
    assert close_code(written) == 1009


def test_fragments_within_the_limit_are_fine(adapter: Adapter) -> None:
    """A message in many small fragments, under the limit, is one update."""
    payload = update(username="frag", ts=1, newSteps=2)
    device = adapter.device()
    frames = [frame(payload[:1], TEXT, fin=False)]
    frames += [
        frame(payload[i : i + 1], CONTINUATION, fin=False)
        for i in range(1, len(payload) - 1)
    ]
    frames.append(frame(payload[-1:], CONTINUATION))
    assert close_code(device.send(*frames)) is None
    assert adapter.total("frag") == Total(2, 1)


def test_oversized_handshake_is_refused() -> None:
    """Opening-handshake headers past the limit get a 431 and the connection ends."""
    adapter = Adapter()
    protocol = adapter.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    assert isinstance(protocol, StepUpdateProtocol)
    transport = _Transport()
    protocol.makeConnection(transport)
    protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\nX-Pad: ")
    for _ in range(MAX_HANDSHAKE_SIZE // 1000 + 1):
        protocol.dataReceived(b"a" * 1000)
    assert transport.value().startswith(b"HTTP/1.1 431")
    assert transport.disconnecting


def test_frames_right_behind_the_handshake_are_fine() -> None:
    """Updates sent in the same read as the handshake, past the header limit, apply."""
    adapter = Adapter()
    protocol = adapter.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    assert isinstance(protocol, StepUpdateProtocol)
    protocol.makeConnection(_Transport())
    body = b"".join(
        frame(update(username="fast", ts=i, newSteps=1)) for i in range(400)
    )
    assert len(body) > MAX_HANDSHAKE_SIZE
    protocol.dataReceived(HANDSHAKE + b"\r\n" + body)
    # A read this long is processed over several turns of the reactor.
    adapter.clock.advance(0)
    assert adapter.total("fast") == Total(400, 399)


def test_protocol_errors_are_counted_not_logged_one_by_one(adapter: Adapter) -> None:
    """Many connections breaking the protocol add counts, not warning lines."""
    with capturedLogs() as events:
        for _ in range(50):
            close_code(adapter.device().send(frame(b"\xff", TEXT)))
    assert adapter.rejections.closed == {1007: 50}
    noisy = [e for e in events if e.get("log_level") >= LogLevel.warn]
    assert noisy == []


# What makes a message cheap (wsaccel's unmasking, reads in slices over
# several turns, UTF-8 checked at the end of a whole text message) must not
# change what any message means.


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536])
def test_payloads_of_every_length_encoding_are_unmasked(size: int) -> None:
    """7-bit, 16-bit and 64-bit payload lengths all reach the decoder intact."""
    adapter = Adapter(max_message_size=70_000)
    device = adapter.device()
    payload = update(username="len", ts=1, newSteps=size)
    padded = payload + b" " * (size - len(payload))
    written = device.send(frame(padded[:size], TEXT))
    adapter.clock.advance(0)
    assert written == b""
    if size >= len(payload):
        assert adapter.total("len") == Total(size, 1)
    else:
        assert adapter.rejections.totals == {Reason.NOT_JSON: 1}


def test_unmasked_client_frame_closes_with_1002(adapter: Adapter) -> None:
    """A client frame without a mask is refused by Autobahn, as before."""
    device = adapter.device()
    payload = update(username="bare", ts=1, newSteps=1)
    written = device.send(struct.pack("!BB", 0x80 | TEXT, len(payload)) + payload)
    assert close_code(written) == 1002
    assert adapter.total("bare") is None


def test_control_frame_payloads_are_unmasked(adapter: Adapter) -> None:
    """A ping of the largest size is answered with exactly its payload."""
    device = adapter.device()
    ping = os.urandom(125)
    assert server_frames(device.send(frame(ping, PING))) == [(PONG, ping)]


def _burst(username: str, count: int, new_steps: int = 1, first_ts: int = 0) -> bytes:
    """``count`` updates with ids id-0, id-1, ... in one read."""
    return b"".join(
        frame(
            update(
                username=username,
                ts=first_ts + i,
                newSteps=new_steps,
                update_id=f"id-{i}",
            )
        )
        for i in range(count)
    )


def test_long_read_is_processed_over_several_turns(
    adapter: Adapter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read past the per-turn budget is applied over later turns, in order."""
    calls: list[int] = []
    apply = adapter.store.apply

    def counted(updates: list[Update]) -> Deferred[list[Outcome]]:
        calls.append(len(updates))
        return apply(updates)

    monkeypatch.setattr(adapter.store, "apply", counted)
    device = adapter.device()
    # The same ids again: in order, the first of each counts.
    data = _burst("burst", 500) + _burst("burst", 500, new_steps=7, first_ts=1000)
    assert len(data) > 3 * MAX_BYTES_PER_TURN
    device.protocol.dataReceived(data)
    # Not read from until the rest has been processed.
    assert device.transport.producerState == "paused"
    adapter.clock.advance(0)
    assert adapter.total("burst") == Total(500, 499)
    assert device.transport.producerState == "producing"
    # The updates of one read still reach the store in one call.
    assert calls == [1000]


def test_data_read_during_a_wait_comes_after_what_waits(adapter: Adapter) -> None:
    """What a transport delivers while reading is paused goes after the rest."""
    device = adapter.device()
    device.protocol.dataReceived(_burst("late", 600))
    # A resend of the first update, which must find it applied.
    device.protocol.dataReceived(
        frame(update(username="late", ts=9999, newSteps=50, update_id="id-0"))
    )
    adapter.clock.advance(0)
    assert adapter.total("late") == Total(600, 599)


def test_connection_lost_during_a_long_read(adapter: Adapter) -> None:
    """Lost mid-read: what was decoded is applied; what waited its turn is not."""
    device = adapter.device()
    device.protocol.dataReceived(_burst("gone", 600))
    device.protocol.connectionLost()
    adapter.clock.advance(0)
    total = adapter.total("gone")
    assert total is not None
    # A first part of the burst, in order.
    assert 0 < total.cumulative_steps < 600
    assert total.ts == total.cumulative_steps - 1


def test_fault_in_a_later_turn_drops_only_that_connection(
    adapter: Adapter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug while processing a later turn is logged and drops the connection."""
    device = adapter.device()
    other = adapter.device()
    device.protocol.dataReceived(_burst("fault", 600))

    def broken(data: bytes) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(device.protocol, "_dataReceived", broken)
    with capturedLogs() as events:
        adapter.clock.advance(0)
    assert [e["log_failure"].value.args for e in events if "log_failure" in e] == [
        ("bug",)
    ]
    assert device.transport.aborted
    first_turn = adapter.total("fault")
    assert first_turn is not None
    assert 0 < first_turn.cumulative_steps < 600
    assert other.send(frame(update(username="other", ts=1, newSteps=1))) == b""
    assert adapter.total("other") == Total(1, 1)


def test_a_close_ends_the_long_read(adapter: Adapter) -> None:
    """After the client's close frame, the rest of a long read is ignored."""
    device = adapter.device()
    data = _burst("cut", 100) + frame(struct.pack("!H", 1000), CLOSE)
    data += _burst("cut", 600, first_ts=100)
    device.protocol.dataReceived(data)
    adapter.clock.advance(0)
    assert adapter.total("cut") == Total(100, 99)
    assert close_code(device.transport.value()) == 1000


@pytest.mark.parametrize(
    ("username", "payload"),
    [
        ("é", '{"username": "é", "ts": 1, "newSteps": 1}'),
        ("用户😀", '{"username": "用户😀", "ts": 1, "newSteps": 1}'),
        ("a", '{"username": "a", "ts": 1, "newSteps": 1, "note": "\u00a0€"}'),
    ],
)
def test_text_messages_in_utf8_beyond_ascii_apply(
    adapter: Adapter, username: str, payload: str
) -> None:
    """Non-ASCII text, whole or cut across reads anywhere, applies."""
    data = frame(payload.encode(), TEXT)
    for cut in range(len(data) + 1):
        device = adapter.device()
        written = device.send(data[:cut]) + device.send(data[cut:])
        assert close_code(written) is None
    assert adapter.total(username) == Total(len(data) + 1, 1)


_NOT_UTF8 = [
    b"\xff",
    # an encoded surrogate
    b"\xed\xa0\x80",
    # an overlong "/"
    b"\xc0\xaf",
    # past U+10FFFF
    b"\xf4\x90\x80\x80",
    # a sequence cut short
    b"\xe2\x82",
]


@pytest.mark.parametrize("bad", _NOT_UTF8)
@pytest.mark.parametrize(
    "template",
    [
        b'{"username": "a%s", "ts": 1, "newSteps": 1}',
        # in fields the decoder skips without reading them
        b'{"username": "a", "ts": 1, "newSteps": 1, "x": "%s"}',
        b'{"username": "a", "ts": 1, "newSteps": 1, "%s": [1]}',
    ],
)
@pytest.mark.parametrize("subprotocol", [b"", V2])
def test_text_message_not_in_utf8_anywhere_closes_with_1007(
    adapter: Adapter, bad: bytes, template: bytes, subprotocol: bytes
) -> None:
    """Invalid UTF-8 anywhere in a text message closes with 1007, v1 or v2."""
    device = adapter.device(subprotocol)
    payload = template % bad
    written = device.send(frame(payload, TEXT))
    assert close_code(written) == 1007
    assert replies(written) == []
    assert adapter.total("a") is None
    assert adapter.rejections.closed == {1007: 1}


@pytest.mark.parametrize("bad", _NOT_UTF8)
def test_binary_message_not_in_utf8_in_a_skipped_field_is_invalid(
    adapter: Adapter, bad: bytes
) -> None:
    """In a binary message, invalid UTF-8 even where the decoder skips is not_json."""
    device = adapter.device()
    payload = b'{"username": "a", "ts": 1, "newSteps": 1, "x": "%s"}' % bad
    assert device.send(frame(payload, BINARY)) == b""
    assert adapter.rejections.totals == {Reason.NOT_JSON: 1}
    assert adapter.total("a") is None
    v2 = adapter.device(V2)
    [reply] = replies(v2.send(frame(b"[" + payload + b"]", BINARY)))
    assert reply["rejected"] == [
        {"index": None, "update_id": None, "reason": "not_json"}
    ]
    assert device.protocol.state == v2.protocol.state == device.protocol.STATE_OPEN


def test_fragment_not_in_utf8_closes_before_the_message_ends(adapter: Adapter) -> None:
    """A fragmented text message is failed as soon as its invalid fragment arrives."""
    device = adapter.device()
    written = device.send(
        frame(b'{"username": "', TEXT, fin=False),
        frame(b"\xff", CONTINUATION, fin=False),
    )
    assert close_code(written) == 1007


def test_frame_not_in_utf8_arriving_in_pieces_closes_at_once(
    adapter: Adapter,
) -> None:
    """A text frame cut across reads is failed as soon as the invalid bytes arrive."""
    device = adapter.device()
    payload = b'{"username": "\xff' + b" " * 200 + b'", "ts": 1, "newSteps": 1}'
    data = frame(payload, TEXT)
    # 2 + 2 bytes of header, 4 of mask, then the payload up to the 0xff.
    written = device.send(data[:30])
    assert close_code(written) == 1007


@settings(max_examples=300)
@given(
    junk=st.one_of(st.binary(max_size=12), st.text(max_size=6).map(str.encode)),
    cut=st.integers(0, 80),
    fragmented=st.booleans(),
)
def test_1007_is_exactly_autobahns_utf8_verdict(
    junk: bytes, cut: int, fragmented: bool
) -> None:
    """Closed with 1007 exactly when Autobahn's own validator says not UTF-8."""
    payload = b'{"username": "a", "ts": 1, "newSteps": 1, "x": "' + junk + b'"}'
    validator = Utf8Validator()
    valid, ended, _, _ = validator.validate(payload)
    if fragmented:
        middle = min(cut, len(payload))
        data = frame(payload[:middle], TEXT, fin=False)
        data += frame(payload[middle:], CONTINUATION)
    else:
        data = frame(payload, TEXT)
    adapter = Adapter()
    device = adapter.device()
    written = device.send(data[:cut]) + device.send(data[cut:])
    if valid and ended:
        assert close_code(written) is None
    else:
        assert close_code(written) == 1007

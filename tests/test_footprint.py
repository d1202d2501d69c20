"""
What a connection keeps, and that keeping less changed no behaviour: the
adapter in memory, as in ``test_websocket``, with every timeout on a
``task.Clock``.
"""

from __future__ import annotations

import base64
import hashlib
import json

from autobahn.twisted.websocket import WebSocketServerProtocol
from twisted.internet.address import IPv4Address

from steptrackd import footprint
from steptrackd.store import Total
from steptrackd.websocket import StepUpdateProtocol

from .test_store import result_of
from .test_websocket import (
    CLOSE,
    HANDSHAKE,
    PING,
    PONG,
    V2,
    Adapter,
    _Transport,
    close_code,
    frame,
    replies,
    server_frames,
    update,
    v2_update,
)

KEEPALIVE = {"ping_interval": 30, "ping_timeout": 20}


def pings(written: bytes) -> list[bytes]:
    return [payload for opcode, payload in server_frames(written) if opcode == PING]


def connecting(adapter: Adapter) -> tuple[StepUpdateProtocol, _Transport]:
    """A connection whose opening handshake has not arrived yet."""
    protocol = adapter.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    assert isinstance(protocol, StepUpdateProtocol)
    transport = _Transport()
    protocol.makeConnection(transport)
    return protocol, transport


def test_idle_connection_is_pinged_and_dropped_when_silent() -> None:
    """Keepalive: a ping after the interval, and the drop after the timeout."""
    adapter = Adapter(**KEEPALIVE)
    device = adapter.device()
    adapter.clock.advance(29.9)
    assert device.transport.value() == b""
    adapter.clock.advance(0.1)
    assert len(pings(device.transport.value())) == 1
    adapter.clock.advance(19.9)
    assert not device.transport.aborted
    adapter.clock.advance(0.1)
    assert device.transport.aborted
    result_of(adapter.store.close())


def test_answered_pings_keep_the_connection() -> None:
    """A peer that answers every ping stays connected, pinged once per interval."""
    adapter = Adapter(**KEEPALIVE)
    device = adapter.device()
    for _ in range(5):
        adapter.clock.advance(30)
        [ping] = pings(device.transport.value())
        device.transport.clear()
        adapter.clock.advance(5)
        device.send(frame(ping, PONG))
    assert not device.transport.aborted
    assert device.protocol.state == device.protocol.STATE_OPEN
    # Frames after a pong are unmasked as before.
    device.send(frame(update(username="after", ts=2, newSteps=3)))
    assert adapter.total("after") == Total(3, 2)
    result_of(adapter.store.close())


def test_updates_instead_of_a_pong_keep_the_connection() -> None:
    """Data from the peer counts as a sign of life while a ping waits."""
    adapter = Adapter(**KEEPALIVE)
    device = adapter.device()
    adapter.clock.advance(30)
    assert len(pings(device.transport.value())) == 1
    device.transport.clear()
    adapter.clock.advance(15)
    device.send(frame(update(username="busy", ts=1, newSteps=1)))
    # No pong came, but the update restarted the keepalive: the next ping
    # is due an interval after it, and nothing is dropped meanwhile.
    adapter.clock.advance(29.9)
    assert not device.transport.aborted
    assert pings(device.transport.value()) == []
    adapter.clock.advance(0.1)
    assert len(pings(device.transport.value())) == 1
    assert adapter.total("busy") == Total(1, 1)
    result_of(adapter.store.close())


def test_unfinished_handshake_is_dropped_after_the_timeout() -> None:
    """A client that never finishes the opening handshake is dropped in time."""
    adapter = Adapter(handshake_timeout=10, **KEEPALIVE)
    protocol, transport = connecting(adapter)
    protocol.dataReceived(b"GET / HTTP/1.1\r\n")
    adapter.clock.advance(9.9)
    assert not transport.aborted
    adapter.clock.advance(0.1)
    assert transport.aborted
    result_of(adapter.store.close())


def test_finished_handshake_leaves_only_the_ping_scheduled() -> None:
    """Opening cancels the handshake timeout; only the next ping is pending."""
    adapter = Adapter(handshake_timeout=10, **KEEPALIVE)
    before = set(adapter.clock.getDelayedCalls())
    adapter.device()
    [pending] = set(adapter.clock.getDelayedCalls()) - before
    assert pending.getTime() == 30
    result_of(adapter.store.close())


def test_closing_handshake_times_out() -> None:
    """A peer that does not answer our close frame is dropped after close_timeout."""
    adapter = Adapter(close_timeout=2)
    device = adapter.device()
    device.protocol.close_going_away()
    assert close_code(device.transport.value()) == 1001
    adapter.clock.advance(1.9)
    assert not device.transport.aborted
    adapter.clock.advance(0.1)
    assert device.transport.aborted or device.transport.disconnecting
    result_of(adapter.store.close())


def test_handshake_in_pieces_is_kept_until_answered_then_dropped() -> None:
    """A handshake read in pieces is answered in full; then its leftovers go."""
    adapter = Adapter()
    protocol, transport = connecting(adapter)
    request = HANDSHAKE + V2 + b"\r\n"
    for piece in (request[:20], request[20:90], request[90:]):
        assert protocol.state == protocol.STATE_CONNECTING
        protocol.dataReceived(piece)
    response = transport.value()
    assert response.startswith(b"HTTP/1.1 101")
    assert b"Sec-WebSocket-Protocol: steptrack.v2\r\n" in response
    # The accept header proves the client's key was still there to answer.
    key = b"dGhlIHNhbXBsZSBub25jZQ=="
    accept = base64.b64encode(
        hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()
    )
    assert b"Sec-WebSocket-Accept: " + accept + b"\r\n" in response
    for name in footprint.HANDSHAKE_ONLY:
        assert getattr(protocol, name) is None, name
    # Open and working without them.
    transport.clear()
    protocol.dataReceived(frame(json.dumps([v2_update("p1")]).encode()))
    assert replies(transport.value())[0]["acked"] == ["p1"]
    result_of(adapter.store.close())


def test_autobahn_state_lives_in_slots() -> None:
    """Through a connection's life its state stays in slots, options on its class."""
    adapter = Adapter(**KEEPALIVE)
    device = adapter.device(V2)
    device.send(frame(json.dumps([v2_update("s1")]).encode()))
    device.send(frame(b"x", PING), frame(update(username="a", ts=1, newSteps=1), 2))
    adapter.clock.advance(30)
    [ping] = pings(device.transport.value())
    device.send(frame(ping, PONG))
    device.protocol.close_going_away()
    device.send(frame(b"\x03\xe9", CLOSE))
    device.protocol.connectionLost()
    # Only what Twisted sets (or what has a class-level default) is kept
    # in the instance's dictionary.
    assert set(vars(device.protocol)) <= {"connected", "factory", "peer", "transport"}
    result_of(adapter.store.close())


def test_no_slot_hides_a_class_attribute() -> None:
    """A slot named like a class attribute of Autobahn's would hide its default."""
    slots = StepUpdateProtocol.__slots__
    hidden = [name for name in slots if hasattr(WebSocketServerProtocol, name)]
    assert hidden == []


def test_each_factory_applies_its_own_options() -> None:
    """Options are per factory, and changed options apply to new connections."""
    strict = Adapter(max_message_size=100)
    lenient = Adapter(max_message_size=1000)
    message = frame(b" " * 500)
    assert close_code(strict.device().send(message)) == 1009
    assert close_code(lenient.device().send(message)) is None
    already_open = lenient.device()
    lenient.factory.setProtocolOptions(maxMessagePayloadSize=200)
    assert close_code(lenient.device().send(message)) == 1009
    assert close_code(already_open.send(message)) is None
    for adapter in (strict, lenient):
        result_of(adapter.store.close())


def test_paced_writes_get_a_send_queue_of_their_own() -> None:
    """The shared, empty send queue is never written to: a paced write makes one."""
    adapter = Adapter()
    device = adapter.device()
    device.protocol.sendData(b"paced", sync=True)
    assert device.transport.value() == b"paced"
    assert device.protocol.send_queue is not footprint.NO_SEND_QUEUE
    assert len(footprint.NO_SEND_QUEUE) == 0
    result_of(adapter.store.close())


def test_closed_fires_whether_asked_before_or_after() -> None:
    """``closed`` fires once the connection is gone, however late it is asked for."""
    adapter = Adapter()
    early, late = adapter.device(), adapter.device()
    waiting = early.protocol.closed
    assert not waiting.called
    for device in (early, late):
        device.protocol.connectionLost()
    assert waiting.called
    assert late.protocol.closed.called
    result_of(adapter.store.close())


def test_what_all_connections_share_stays_shared() -> None:
    """Version 1 connections share the empty reply queue; version 2 ones own theirs."""
    adapter = Adapter()
    v1, other_v1 = adapter.device(), adapter.device()
    v2, other_v2 = adapter.device(V2), adapter.device(V2)
    v2.send(frame(json.dumps([v2_update("q1")]).encode()))
    assert v1.protocol._replies is other_v1.protocol._replies
    assert len(v1.protocol._replies) == 0
    assert v2.protocol._replies is not other_v2.protocol._replies
    assert v1.protocol.trafficStats is adapter.factory.traffic
    assert adapter.factory.traffic.incomingWebSocketMessages == 1
    result_of(adapter.store.close())


def test_an_option_a_connection_changes_stays_per_connection() -> None:
    """An option kept in a slot is left to Autobahn's copy, not put on the class."""

    class Base:
        CONFIG_ATTRS = ("shared", "own")
        __slots__ = ("own",)

    class Factory:
        shared = "for all"
        own = "for one"

    made = footprint.connection_class(Base, Factory())
    assert made.shared == "for all"  # type: ignore[attr-defined]
    assert "own" not in vars(made)
    assert issubclass(made, Base)

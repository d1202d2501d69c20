"""
Both APIs over real sockets on ephemeral ports, started through the
programmatic API, with a real WebSocket client and a real HTTP client.
"""

from __future__ import annotations

import json
import socket
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor as global_reactor
from twisted.internet.endpoints import (
    TCP4ServerEndpoint,
    TCP6ServerEndpoint,
)
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from steptrackd.server import ProtocolLimits, RunningServer, start_server
from steptrackd.sqlite_store import SQLiteStore
from steptrackd.store import MemoryStore

from .clients import Closed, http, open_ws, raw_connect, wait_for_total

reactor: Any = global_reactor


async def _start(limits: ProtocolLimits | None = None, **ports: int) -> RunningServer:
    return await start_server(
        reactor,
        TCP6ServerEndpoint(reactor, ports.get("ws", 0), interface="::"),
        TCP6ServerEndpoint(reactor, ports.get("rest", 0), interface="::"),
        MemoryStore(reactor),
        limits or ProtocolLimits(),
    )


@pytest_twisted.async_yield_fixture
async def server() -> AsyncIterator[RunningServer]:
    running = await _start()
    yield running
    await running.close()


def _ports(server: RunningServer) -> tuple[int, int]:
    return server.ws_address.port, server.rest_address.port


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
async def test_update_then_read_over_ipv4_and_ipv6(
    server: RunningServer, host: str
) -> None:
    """An update sent over WebSocket is read back over REST, on IPv4 and IPv6."""
    ws_port, rest_port = _ports(server)
    client = await open_ws(reactor, host, ws_port)
    client.send_update({"username": "luisa", "ts": 1666960429981, "newSteps": 108})
    await client.barrier()
    result = await http("GET", host, rest_port, "/users/luisa/steps")
    assert (result.status, result.json()) == (
        200,
        {"cumulativeSteps": 108, "ts": 1666960429981},
    )
    assert result.header("content-type") == "application/json"
    assert result.header("cache-control") == "no-store"
    client.sendClose(1000)
    assert (await client.closed).code == 1000


@pytest_twisted.ensureDeferred
async def test_close_says_going_away_and_frees_ports() -> None:
    """close() sends 1001 to live WebSockets; the same ports then bind at once."""
    running = await _start()
    ws_port, rest_port = _ports(running)
    client = await open_ws(reactor, "127.0.0.1", ws_port)
    await running.close()
    closed: Closed = await client.closed
    assert closed.code == 1001
    again = await _start(ws=ws_port, rest=rest_port)
    try:
        assert _ports(again) == (ws_port, rest_port)
    finally:
        await again.close()


@pytest_twisted.ensureDeferred
async def test_close_ends_idle_http_keepalive_connections() -> None:
    """close() also ends HTTP keep-alive connections, so nothing is left open."""
    running = await _start()
    _, rest_port = _ports(running)

    raw = await raw_connect(reactor, rest_port)
    assert raw.transport is not None
    raw.send(b"GET /users/x/steps HTTP/1.1\r\nHost: x\r\n\r\n")
    while b"User doesn't exist" not in raw.data:
        await deferLater(reactor, 0.01, lambda: None)
    await running.close()
    await raw.lost


@pytest_twisted.ensureDeferred
async def test_start_fails_cleanly_when_a_port_is_taken(server: RunningServer) -> None:
    """start_server fails with the bind error, and leaves nothing listening."""
    from twisted.internet.error import CannotListenError

    ws_port, _ = _ports(server)
    with pytest.raises(CannotListenError):
        await start_server(
            reactor,
            TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"),
            TCP6ServerEndpoint(reactor, ws_port, interface="::"),
            MemoryStore(reactor),
        )


_HANDSHAKE = (
    b"GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n"
)


@pytest_twisted.ensureDeferred
async def test_silent_client_is_dropped_after_the_handshake_timeout() -> None:
    """A client that never finishes the opening handshake is disconnected."""
    running = await _start(ProtocolLimits(handshake_timeout=0.2))
    try:
        raw = await raw_connect(reactor, running.ws_address.port)
        raw.send(b"GET / HTTP/1.1\r\n")
        await raw.lost
        assert b"101" not in raw.data
    finally:
        await running.close()


@pytest_twisted.ensureDeferred
async def test_peer_that_never_answers_pings_is_dropped() -> None:
    """Keepalive: a peer that does not answer a ping in time is disconnected."""
    running = await _start(ProtocolLimits(ping_interval=0.1, ping_timeout=0.2))
    try:
        raw = await raw_connect(reactor, running.ws_address.port)
        raw.send(_HANDSHAKE)
        await raw.lost
        assert raw.data.startswith(b"HTTP/1.1 101")
        # The server pinged (opcode 0x9) before giving up.
        assert b"\x89" in raw.data.split(b"\r\n\r\n", 1)[1]
    finally:
        await running.close()


@pytest_twisted.ensureDeferred
async def test_live_peer_survives_pings() -> None:
    """A client that answers pings keeps its connection through several pings."""
    # Timeouts fire on quarter seconds, so a 0.05 s interval pings about
    # four times a second, each ping with at least 2 s to be answered.
    running = await _start(ProtocolLimits(ping_interval=0.05, ping_timeout=2))
    try:
        client = await open_ws(reactor, "127.0.0.1", running.ws_address.port)
        [connection] = running.service.ws_factory.connections
        deadline = reactor.seconds() + 10
        while connection.autoPingPendingSeq < 3 and reactor.seconds() < deadline:
            await deferLater(reactor, 0.01, lambda: None)
        assert connection.autoPingPendingSeq >= 3
        client.send_update({"username": "alive", "ts": 1, "newSteps": 2})
        await client.barrier()
        assert not client.closed.called
    finally:
        await running.close()


@pytest_twisted.ensureDeferred
async def test_oversized_message_closes_only_that_connection() -> None:
    """1009 for a message over the limit; other connections are untouched."""
    running = await _start(ProtocolLimits(max_message_size=1024))
    try:
        ws_port, rest_port = _ports(running)
        big = await open_ws(reactor, "127.0.0.1", ws_port)
        other = await open_ws(reactor, "127.0.0.1", ws_port)
        big.sendMessage(b" " * 1025)
        assert (await big.closed).code == 1009
        other.send_update({"username": "fine", "ts": 3, "newSteps": 4})
        await other.barrier()
        result = await http("GET", "127.0.0.1", rest_port, "/users/fine/steps")
        assert result.json() == {"cumulativeSteps": 4, "ts": 3}
    finally:
        await running.close()


@pytest_twisted.ensureDeferred
async def test_bursts_on_several_connections_are_counted_exactly(
    server: RunningServer,
) -> None:
    """Reads far past the per-turn budget, on two connections at once: exact totals."""
    ws_port, rest_port = _ports(server)
    clients = [await open_ws(reactor, "127.0.0.1", ws_port) for _ in range(2)]
    for number, client in enumerate(clients):
        # Written in one go: the server reads it in 64 KiB pieces, each
        # processed over several turns.
        for i in range(4000):
            client.send_update(
                {
                    "update_id": f"{number}-{i % 3000}",
                    "username": f"burst-{number}",
                    "ts": i,
                    "newSteps": 1 if i < 3000 else 5,
                },
                binary=i % 2 == 1,
            )
    for number, client in enumerate(clients):
        await client.barrier()
        result = await http(
            "GET", "127.0.0.1", rest_port, f"/users/burst-{number}/steps"
        )
        assert result.json() == {"cumulativeSteps": 3000, "ts": 2999}
        assert not client.closed.called


@pytest_twisted.ensureDeferred
async def test_invalid_updates_keep_the_connection(server: RunningServer) -> None:
    """Over a real socket, garbage is ignored and counted; the connection stays open."""
    ws_port, rest_port = _ports(server)
    client = await open_ws(reactor, "127.0.0.1", ws_port)
    client.sendMessage(b"\x00\x01 garbage", isBinary=True)
    client.sendMessage(b'{"username": "x", "ts": NaN, "newSteps": 1}')
    client.send_update({"username": "x", "ts": 1, "newSteps": 1e400})
    client.send_update({"username": "x", "ts": 5, "newSteps": 6})
    await client.barrier()
    assert not client.closed.called
    assert sum(server.service.rejections.totals.values()) == 3
    result = await http("GET", "127.0.0.1", rest_port, "/users/x/steps")
    assert result.json() == {"cumulativeSteps": 6, "ts": 5}


@pytest_twisted.ensureDeferred
async def test_v2_acks_only_what_is_on_disk(tmp_path: Path) -> None:
    """Over real sockets with the SQLite store, an ack means the ids are committed."""
    path = tmp_path / "steps.sqlite3"
    running = await start_server(
        reactor,
        TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"),
        TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"),
        SQLiteStore(str(path), reactor),
    )
    try:
        ws_port, rest_port = _ports(running)
        client = await open_ws(
            reactor, "127.0.0.1", ws_port, protocols=["steptrack.v2"]
        )
        assert client.subprotocol == "steptrack.v2"
        for batch in range(5):
            client.sendMessage(
                json.dumps(
                    [
                        {
                            "update_id": f"b{batch}-{i}",
                            "username": "disk",
                            "ts": batch * 100 + i,
                            "newSteps": 1,
                        }
                        for i in range(100)
                    ]
                ).encode()
            )
        while len(client.messages) < 5:
            await deferLater(reactor, 0.005, lambda: None)
            # Each ack must already be on disk when it arrives.
            for payload, _ in client.messages:
                acked = json.loads(payload)["acked"]
                reader = sqlite3.connect(path)
                on_disk = {
                    row[0]
                    for row in reader.execute("SELECT update_id FROM applied_ids")
                }
                reader.close()
                assert set(acked) <= on_disk
        replies = [json.loads(payload) for payload, _ in client.messages]
        assert [r["seq"] for r in replies] == [1, 2, 3, 4, 5]
        assert sum(len(r["acked"]) for r in replies) == 500
        result = await http("GET", "127.0.0.1", rest_port, "/users/disk/steps")
        assert result.json() == {"cumulativeSteps": 500, "ts": 499}
    finally:
        await running.close()


def _mask(payload: bytes) -> bytes:
    """One masked client text frame (a v2 message)."""
    key = b"\x01\x02\x03\x04"
    header = bytes([0x81, 0xFE]) + len(payload).to_bytes(2, "big")
    return header + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def _flood_without_reading(
    port: int, frame: bytes, limit: int
) -> tuple[int, socket.socket]:
    """
    Send v2 messages and never read a reply; return how many went out
    before the server stopped taking them (or ``limit``), and the socket,
    still open.
    """
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(
        _HANDSHAKE.replace(
            b"\r\n\r\n", b"\r\nSec-WebSocket-Protocol: steptrack.v2\r\n\r\n"
        )
    )
    sock.settimeout(2)
    for sent in range(limit):
        try:
            sock.sendall(frame)
        except TimeoutError:
            return sent, sock
    return limit, sock


@pytest_twisted.ensureDeferred
async def test_client_that_reads_no_replies_is_not_read_either(
    server: RunningServer,
) -> None:
    """A v2 client that never reads replies is stopped, not served into our memory."""
    ws_port, rest_port = _ports(server)
    batch = json.dumps(
        [
            {"update_id": f"flood-{i}", "username": "flood", "ts": 1, "newSteps": 1}
            for i in range(100)
        ]
    ).encode()
    limit = 20_000
    sent, flood = await deferToThread(
        _flood_without_reading, ws_port, _mask(batch), limit
    )
    try:
        assert sent < limit
        [connection] = server.service.ws_factory.connections
        assert "replies" in connection._pause_reasons
        # Everyone else is still served.
        client = await open_ws(reactor, "127.0.0.1", ws_port)
        client.send_update({"username": "other", "ts": 1, "newSteps": 1})
        await wait_for_total(
            reactor, "127.0.0.1", rest_port, "other", {"cumulativeSteps": 1, "ts": 1}
        )
    finally:
        flood.close()

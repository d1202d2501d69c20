"""
Real clients for tests over real sockets: an Autobahn WebSocket client that
records what the server does, and a small HTTP client on Twisted's Agent.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import treq
from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
)
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    connectProtocol,
)
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.web.client import URI, Agent, HTTPConnectionPool
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer


def _client_endpoint(reactor: Any, host: str, port: int) -> IStreamClientEndpoint:
    host = host.strip("[]")
    if ":" in host:
        return TCP6ClientEndpoint(reactor, host, port)
    return TCP4ClientEndpoint(reactor, host, port)


@dataclass(frozen=True)
class Closed:
    """How a WebSocket connection ended, as the client saw it."""

    was_clean: bool
    code: int | None
    reason: str | None


class RecordingClient(WebSocketClientProtocol):
    """A WebSocket client that records what the server sends and does."""

    def __init__(self) -> None:
        super().__init__()
        self.opened: Deferred[RecordingClient] = Deferred()
        self.closed: Deferred[Closed] = Deferred()
        self.messages: list[tuple[bytes, bool]] = []
        self.subprotocol: str | None = None
        self._pongs: dict[bytes, Deferred[None]] = {}

    def onConnect(self, response: Any) -> None:
        self.subprotocol = response.protocol

    def onOpen(self) -> None:
        self.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.messages.append((payload, isBinary))

    def onPong(self, payload: bytes) -> None:
        waiter = self._pongs.pop(payload, None)
        if waiter is not None:
            waiter.callback(None)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if not self.opened.called:
            self.opened.errback(ConnectionError(f"handshake failed: {reason}"))
        if not self.closed.called:
            self.closed.callback(Closed(wasClean, code, reason))

    def send_update(self, update: dict[str, Any], binary: bool = False) -> None:
        self.sendMessage(json.dumps(update).encode("utf-8"), isBinary=binary)

    def barrier(self) -> Deferred[None]:
        """
        Fires once the server has processed everything sent before it: the
        server answers a ping only after the frames ahead of it.
        """
        token = os.urandom(8)
        waiter: Deferred[None] = Deferred()
        self._pongs[token] = waiter
        self.sendPing(token)
        return waiter


async def open_ws(
    reactor: Any,
    host: str,
    port: int,
    *,
    protocols: list[str] | None = None,
    path: str = "/",
) -> RecordingClient:
    """Connect and complete the opening handshake."""
    url_host = f"[{host}]" if ":" in host else host
    factory = WebSocketClientFactory(
        f"ws://{url_host}:{port}{path}", protocols=protocols or [], reactor=reactor
    )
    # The test clients never ping on their own; the server's pings are
    # answered by Autobahn.
    factory.setProtocolOptions(autoPingInterval=0, failByDrop=False)
    client = RecordingClient()
    client.factory = factory
    await connectProtocol(_client_endpoint(reactor, host, port), client)
    await client.opened
    return client


@dataclass(frozen=True)
class HTTPResult:
    status: int
    headers: dict[str, list[str]]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[0] if values else None


@implementer(IAgentEndpointFactory)
class _IPLiteralEndpoints:
    """Connects to the IPv4 or IPv6 literal in a URL, with no name lookup."""

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        return _client_endpoint(self._reactor, uri.host.decode("ascii"), uri.port)


async def http(
    method: str, host: str, port: int, path: str, *, reactor: Any = None
) -> HTTPResult:
    """One HTTP request over a fresh connection; ``path`` is sent as given."""
    if reactor is None:
        from twisted.internet import reactor
    agent = Agent.usingEndpointFactory(
        reactor,
        _IPLiteralEndpoints(reactor),
        pool=HTTPConnectionPool(reactor, persistent=False),
    )
    url_host = f"[{host}]" if ":" in host else host
    # Twisted's Agent directly: it sends the path exactly as given, and
    # takes IPv6 literals without trying to IDNA-encode them.
    response = await agent.request(
        method.encode("ascii"), f"http://{url_host}:{port}{path}".encode("ascii")
    )
    body = await treq.content(response)
    headers = {
        name.decode("latin-1").lower(): [v.decode("latin-1") for v in values]
        for name, values in response.headers.getAllRawHeaders()
    }
    return HTTPResult(response.code, headers, body)


async def wait_for_total(
    reactor: Any,
    host: str,
    port: int,
    username: str,
    expected: dict[str, Any],
    timeout: float = 10.0,
) -> dict[str, Any]:
    """
    Poll ``GET /users/{username}/steps`` until it shows ``expected``; fail
    with the last answer if ``timeout`` seconds pass first.
    """
    from urllib.parse import quote

    path = f"/users/{quote(username, safe='')}/steps"
    deadline = reactor.seconds() + timeout
    while True:
        result = await http("GET", host, port, path, reactor=reactor)
        seen = result.json() if result.status == 200 else None
        if seen == expected:
            return expected
        if reactor.seconds() > deadline:
            raise AssertionError(
                f"{username!r}: expected {expected}, last saw "
                f"{result.status} {result.body!r}"
            )
        await deferLater(reactor, 0.01, lambda: None)


class RawClient(Protocol):
    """A plain TCP client that records what it receives and when it is cut off."""

    def __init__(self) -> None:
        self.lost: Deferred[None] = Deferred()
        self.data = b""

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any = None) -> None:
        if not self.lost.called:  # not if a timeout cancelled the wait
            self.lost.callback(None)

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)


async def raw_connect(reactor: Any, port: int) -> RawClient:
    """Connect a :class:`RawClient` to ``port`` on 127.0.0.1."""
    client = RawClient()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
    return client

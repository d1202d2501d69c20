"""
The WebSocket adapter: device connections that stream updates into a store.

This is a thin layer over Autobahn. It decodes each message with
``update.UpdateDecoder``, counts the invalid ones, and hands the valid ones
to the store in arrival order. Framing, UTF-8 checks of text messages, size
limits, pings and the closing handshake are Autobahn's own code, configured
with real limits. It does not know how totals are kept (``store``) or read
(``rest``).

The per-message path is kept short on purpose: one decode, one append; the
updates decoded from one network read reach the store in a single call.
"""

from __future__ import annotations

from typing import Any, cast

from autobahn.twisted.websocket import (
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from autobahn.websocket.types import ConnectionRequest
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime, ITCPTransport
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from . import __version__
from .rejections import RejectionCounter
from .store import IStepStore, Outcome
from .update import InvalidUpdate, Reason, Update, UpdateDecoder

CLOSE_GOING_AWAY = 1001

_log = Logger()


class StepUpdateProtocol(WebSocketServerProtocol):
    """
    One device connection. Every message is one update, JSON in a text or a
    binary message; nothing is sent back.
    """

    factory: StepUpdateFactory

    def __init__(self) -> None:
        super().__init__()
        self._pending: list[Update] = []
        self.closed: Deferred[None] = Deferred()
        """Fires once the TCP connection is gone."""

    def onConnect(self, request: ConnectionRequest) -> None:
        # Version 1 of the protocol has no subprotocol; a client that offers
        # only subprotocols we do not speak is answered without one.
        return None

    def connectionMade(self) -> None:
        super().connectionMade()
        self.factory.connections.add(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        try:
            super().connectionLost(reason)
        finally:
            self.factory.connections.discard(self)
            self.closed.callback(None)

    def dataReceived(self, data: bytes) -> None:
        # Autobahn's own dataReceived only adds a debug log line per read.
        # Messages completed by this read are collected by onMessageEnd and
        # go to the store together, in order, when the read is processed.
        try:
            self._dataReceived(data)
        finally:
            if self._pending:
                self._flush()

    def onMessageEnd(self) -> None:
        # Replaces Autobahn's onMessageEnd, which would also fire a
        # per-message "message" event that nothing here listens to.
        if not self.failedByMe:
            self._decode(b"".join(self.message_data))
        self.message_data = None  # type: ignore[assignment]

    def _decode(self, payload: bytes) -> None:
        try:
            self._pending.append(self.factory.decoder.decode(payload))
        except InvalidUpdate as invalid:
            self.factory.rejections.count(invalid.reason, invalid.detail)

    def _flush(self) -> None:
        if self._pending:
            updates, self._pending = self._pending, []
            self.factory.apply(updates)

    def close_going_away(self) -> None:
        """Start closing because the server is going away."""
        if self.state == self.STATE_OPEN:
            # sendClose() accepts only the codes an application may choose;
            # 1001 is the protocol-level "going away" that RFC 6455 gives
            # to servers that shut down.
            self.sendCloseFrame(CLOSE_GOING_AWAY, b"server going away")
        elif self.state != self.STATE_CLOSED:
            # Still in the opening handshake, or already closing.
            self.dropConnection(abort=True)


class StepUpdateFactory(WebSocketServerFactory):
    """
    Makes device connections that all feed one store, with the protocol
    limits of the daemon applied to each.
    """

    protocol = StepUpdateProtocol  # type: ignore[assignment]
    noisy = False

    def logPrefix(self) -> str:
        return "steptrack WebSocket"

    def __init__(
        self,
        store: IStepStore,
        rejections: RejectionCounter,
        *,
        reactor: IReactorTime,
        decoder: UpdateDecoder | None = None,
        max_message_size: int = 64 * 1024,
        handshake_timeout: float = 10.0,
        ping_interval: float = 30.0,
        ping_timeout: float = 30.0,
        close_timeout: float = 2.0,
    ) -> None:
        super().__init__(server=f"steptrack/{__version__}", reactor=reactor)
        self.store = store
        self.rejections = rejections
        self.decoder = decoder if decoder is not None else UpdateDecoder()
        self.connections: set[StepUpdateProtocol] = set()
        self.setProtocolOptions(
            webStatus=False,
            maxFramePayloadSize=max_message_size,
            maxMessagePayloadSize=max_message_size,
            openHandshakeTimeout=handshake_timeout,
            closeHandshakeTimeout=close_timeout,
            autoPingInterval=ping_interval,
            autoPingTimeout=ping_timeout,
            # Close with the RFC 6455 status code (1007, 1009, ...) rather
            # than dropping TCP, so clients learn what they did wrong.
            failByDrop=False,
            # No permessage-deflate: its inflated size would be unbounded.
            perMessageCompressionAccept=lambda offers: None,
        )

    def apply(self, updates: list[Update]) -> None:
        """Hand ``updates`` to the store, counting the ones it refuses."""
        try:
            applying = self.store.apply(updates)
        except Exception:
            _log.failure("The store refused {count} update(s)", count=len(updates))
            return
        applying.addCallbacks(self._count_refused, self._store_failed)

    def _count_refused(self, outcomes: list[Outcome]) -> None:
        for outcome in outcomes:
            if outcome is Outcome.TOTAL_OVERFLOW:
                self.rejections.count(
                    Reason.TOTAL_OVERFLOW,
                    "the total would pass 2^53 - 1",
                )

    def _store_failed(self, failure: Failure) -> None:
        _log.failure("The store failed to apply updates", failure)

    def close_connections(self, timeout: float) -> Deferred[Any]:
        """
        Close every connection with 1001 (going away). Fires when all are
        gone; any still open after ``timeout`` seconds is dropped.
        """
        connections = list(self.connections)
        for connection in connections:
            connection.close_going_away()
        closed = DeferredList([c.closed for c in connections])
        deadline = self.reactor.callLater(timeout, self._drop_all, connections)
        closed.addBoth(lambda result: deadline.cancel() if deadline.active() else None)
        return closed

    @staticmethod
    def _drop_all(connections: list[StepUpdateProtocol]) -> None:
        for connection in connections:
            if connection.transport is not None:
                cast(ITCPTransport, connection.transport).abortConnection()

"""
The WebSocket adapter: device connections that stream updates into a store.

This is a thin layer over Autobahn. It decodes each message with
``update.UpdateDecoder``, counts the invalid ones, and hands the valid ones
to the store in arrival order. Framing, size limits, pings and the closing
handshake are Autobahn's own code, configured with real limits, and so is
the UTF-8 check of text messages except for the shortcut below. It does not
know how totals are kept (``store``) or read (``rest``).

Two versions of the protocol share one connection class:

- version 1 (no subprotocol): one update per message, nothing sent back;
- version 2 (subprotocol ``steptrack.v2``): one update or an array of them
  per message, each with an update_id, and one reply per message, in order,
  once the store has committed its updates.

An idle connection is kept small (most devices are idle most of the time):
Autobahn's per-connection state lives in slots, its options on a class
shared by all connections, and what is the same for every connection is
shared; ``footprint`` says how, ``timeouts`` does the timeouts.

The version 1 path is kept short on purpose: one decode, one append; the
updates decoded from one network read reach the store in a single call.

How a message is made cheap without framing anything beside Autobahn: every
frame, whatever it is, is parsed and checked by Autobahn's own code, and the
adapter only uses Autobahn's extension points.

- Unmasking: Autobahn's default unmasker (its native "NVX" one) allocates
  several objects per frame, which costs more than everything else a small
  frame needs. Autobahn is told not to unmask (its ``applyMask`` option), and
  ``onFrameBegin`` gives each masked frame, data or control, wsaccel's
  unmasker before Autobahn reads a byte of its payload.
- Reads in slices: after each frame Autobahn copies what is left of its
  receive buffer, so a frame costs in proportion to the bytes behind it.
  A network read is handed to Autobahn ``READ_SLICE`` bytes at a time.
- Bounded work per turn: one read holds up to 64 KiB, about 500 updates,
  and REST requests in the same reactor would wait while it is processed.
  At most ``MAX_BYTES_PER_TURN`` of a read is processed at once; the rest
  waits for the next turn of the reactor, with reading from that client
  paused. The read's updates still go to the store in one call, once the
  read is done (or the connection lost).
- UTF-8: a text message in one frame whose payload has arrived whole is
  checked once it is complete instead of by Autobahn's incremental
  validator; an ASCII payload, the usual case, needs no more than
  ``bytes.isascii()``. Such a message is all in Autobahn's buffer already,
  so invalid UTF-8 closes it with 1007 at the point where Autobahn would.
- Autobahn's per-message "message" event (a future nobody here listens to)
  is never made: ``onMessageEnd`` is replaced.

What the shortcuts leave to Autobahn, at its own cost: fragmented text
messages, and text frames cut by the end of a read or of a slice, are
validated incrementally by Autobahn, so that invalid UTF-8 fails them as
soon as it arrives; the opening handshake; and every rule about frames
(reserved bits and opcodes, unmasked or oversized frames, control frames
and the closing handshake). Binary messages are not UTF-8 text to RFC 6455:
the decoder checks their UTF-8. permessage-deflate is never negotiated.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Final, cast

import msgspec
import txaio
from autobahn.twisted.websocket import (
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from autobahn.websocket.protocol import TrafficStats
from autobahn.websocket.types import ConnectionRequest
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import (
    IDelayedCall,
    IPushProducer,
    IReactorTime,
    ITCPTransport,
)
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from wsaccel.xormask import XorMaskerSimple
from zope.interface import implementer

from . import __version__, footprint, timeouts
from .rejections import RejectionCounter
from .store import IStepStore, Outcome, StoreWriteFailed
from .update import InvalidUpdate, Reason, Update, UpdateDecoder, is_utf8

CLOSE_GOING_AWAY = 1001
SUBPROTOCOL_V2: Final = "steptrack.v2"
DEFAULT_MAX_BATCH: Final = 1000
MAX_IN_FLIGHT: Final = 64
"""Store calls one connection may have outstanding before it stops reading."""
MAX_FRAMES_PER_MESSAGE: Final = 1024
"""Fragments one message may have: each costs memory even when empty."""
MAX_HANDSHAKE_SIZE: Final = 16 * 1024
"""Bytes of the HTTP opening handshake, headers included."""
READ_SLICE: Final = 4096
"""Bytes of a network read handed to Autobahn at a time."""
MAX_BYTES_PER_TURN: Final = 8 * 1024
"""Bytes of one client's data processed in one turn of the reactor."""

_log = Logger()


class Rejection(msgspec.Struct):
    """One invalid update in a version 2 reply."""

    index: int | None
    """Its position in the message (0 for a single update); null when the
    message as a whole was refused."""
    update_id: str | None
    reason: str


class Reply(msgspec.Struct):
    """The answer to one version 2 message."""

    seq: int
    """1 for the first message on the connection, 2 for the next, ..."""
    acked: list[str] = msgspec.field(default_factory=list)
    """Applied now, or already applied before (a resend): safe to forget."""
    rejected: list[Rejection] = msgspec.field(default_factory=list)
    """Invalid: resending will not help."""
    retry: list[str] = msgspec.field(default_factory=list)
    """Not stored (the server could not write): send these again later."""


_encode_reply = msgspec.json.Encoder().encode


@dataclass
class _PendingReply:
    reply: Reply
    ready: bool = False
    # (index, update) of the valid updates handed to the store.
    applied: list[tuple[int, Update]] = field(default_factory=list)


_NO_REPLIES: Final[deque[_PendingReply]] = deque(maxlen=0)
"""The replies of every version 1 connection: there are none, and a deque
of its own would cost each connection 760 bytes. Nothing is ever added to
it: ``onConnect`` gives each version 2 connection a deque of its own."""


_NOT_PAUSED: Final[frozenset[str]] = frozenset()
"""No reason to pause: shared, where an empty set would cost every
connection 216 bytes."""


@implementer(IPushProducer)
class StepUpdateProtocol(WebSocketServerProtocol):
    """One device connection, speaking version 1 or 2 of the protocol."""

    # Slots instead of a dictionary entry per attribute: see ``footprint``.
    # An attribute added to this class without a slot still works, at the
    # cost of a dictionary entry for each connection.
    __slots__ = (
        *footprint.AUTOBAHN_CONNECTION_STATE,
        "version",
        "_pending",
        "_replies",
        "_seq",
        "_in_flight",
        "_pause_reasons",
        "_frames_in_message",
        "_open_when_read_began",
        "_drop_deadline",
        "_closed",
        "_unread",
        "_next_turn",
        "_utf8_at_end",
        # An option, but one each connection sets for itself, message by
        # message: in a slot, not on the shared class (see ``footprint``).
        "utf8validateIncoming",
    )

    factory: StepUpdateFactory
    # Autobahn logs every failed connection at warning level, which lets any
    # client flood the log; failures are counted and summed up instead.
    log = txaio.make_logger(level="error")  # type: ignore[attr-defined]

    def __init__(self) -> None:
        super().__init__()
        footprint.forget_event_registry(self)
        self.version = 1
        self._pending: list[Update] = []
        self._replies: deque[_PendingReply] = _NO_REPLIES
        self._seq = 0
        self._in_flight = 0
        # Why reading is paused: "store" (too many store calls outstanding),
        # "replies" (the client does not read what we send).
        self._pause_reasons = _NOT_PAUSED
        self._frames_in_message = 0
        # Whether the text message being received is checked for UTF-8 once
        # complete, rather than by Autobahn as it arrives.
        self._utf8_at_end = False
        self._open_when_read_began = False
        # What was read but is left for later turns of the reactor, and the
        # call that will take the next turn.
        self._unread = b""
        self._next_turn: IDelayedCall | None = None
        self._drop_deadline: IDelayedCall | None = None
        self._closed: Deferred[None] | None = None

    @property
    def closed(self) -> Deferred[None]:
        """Fires once the TCP connection is gone."""
        # Made when first asked for (at shutdown, or once the connection is
        # lost), not with every connection.
        if self._closed is None:
            self._closed = Deferred()
        return self._closed

    def onConnect(self, request: ConnectionRequest) -> str | None:
        if SUBPROTOCOL_V2 in request.protocols:
            self.version = 2
            self._replies = deque()
            return SUBPROTOCOL_V2
        # Version 1 has no subprotocol; a client that offers only
        # subprotocols we do not speak is answered without one.
        return None

    def connectionMade(self) -> None:
        super().connectionMade()
        self._share_what_is_the_same()
        self.factory.connections.add(self)
        # The transport tells us when its send buffer fills up, so that a
        # client that sends batches but never reads the replies is not read
        # from either, instead of making us buffer replies without bound.
        self.transport.registerProducer(self, True)  # type: ignore[union-attr]

    def _share_what_is_the_same(self) -> None:
        # Autobahn gives each connection an empty send queue and traffic
        # counters of its own; steptrack never paces writes and never reads
        # the counters, so all connections share one of each (see
        # ``footprint``): the counters then count all connections together.
        self.send_queue = footprint.NO_SEND_QUEUE
        self.trafficStats = self.factory.traffic
        footprint.settle_transport_attributes(self.transport)

    def sendData(
        self, data: bytes, sync: bool = False, chopsize: int | None = None
    ) -> None:
        if (sync or chopsize) and self.send_queue is footprint.NO_SEND_QUEUE:
            # A paced write: Autobahn queues it, so the connection needs a
            # queue of its own from now on.
            self.send_queue = deque()
        super().sendData(data, sync, chopsize)

    def onOpen(self) -> None:
        footprint.forget_handshake(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        try:
            super().connectionLost(reason)
        finally:
            self.factory.connections.discard(self)
            if self._drop_deadline is not None and self._drop_deadline.active():
                self._drop_deadline.cancel()
            if self._next_turn is not None and self._next_turn.active():
                self._next_turn.cancel()
            # What had been decoded still counts; what waited for its turn
            # is dropped, as if it had never been read.
            self._unread = b""
            if self._pending:
                self._flush()
            self.closed.callback(None)

    def dataReceived(self, data: bytes) -> None:
        # Autobahn's own dataReceived only adds a debug log line per read.
        # Version 1 messages completed by this read are collected by
        # onMessageEnd and go to the store together, in order, afterwards.
        if self.state == self.STATE_CONNECTING:
            # Autobahn would buffer headers until the handshake times out.
            # Frames may follow the headers in the same read: only the
            # headers count.
            buffered = self.data + data
            if (
                len(buffered) > MAX_HANDSHAKE_SIZE
                and b"\r\n\r\n" not in buffered[: MAX_HANDSHAKE_SIZE + 4]
            ):
                self.failHandshake("opening handshake too large", 431)
                return
        if self._unread:
            # Read while paused, as a TLS transport may: it comes after
            # what is waiting.
            self._unread += data
        else:
            self._take_turn(data)

    def _take_turn(self, data: bytes) -> None:
        """
        Hand ``data`` to Autobahn: ``MAX_BYTES_PER_TURN`` of it now, and the
        rest in later turns of the reactor, not reading from the client
        meanwhile, so that one client's burst does not hold up the others
        and REST requests.
        """
        now, self._unread = data[:MAX_BYTES_PER_TURN], data[MAX_BYTES_PER_TURN:]
        self._open_when_read_began = self.state in (
            self.STATE_CONNECTING,
            self.STATE_OPEN,
        )
        try:
            # Autobahn copies the rest of its buffer after every frame: small
            # slices keep that copy small.
            for start in range(0, len(now), READ_SLICE):
                self._dataReceived(now[start : start + READ_SLICE])
                if self.state == self.STATE_CLOSED:
                    # Autobahn ignores whatever comes after.
                    self._unread = b""
                    break
        except BaseException:
            # The connection is dropped for it: nothing is left for later.
            self._unread = b""
            raise
        finally:
            self._open_when_read_began = False
            # The updates of one read reach the store in one call.
            if self._pending and not self._unread:
                self._flush()
        if self._unread:
            if self._next_turn is None:
                self.pause_reading("turn")
            self._next_turn = self.factory.reactor.callLater(0, self._turn)
        elif self._next_turn is not None:
            self._next_turn = None
            self.resume_reading("turn")

    def _turn(self) -> None:
        try:
            self._take_turn(self._unread)
        except Exception:
            # What Twisted does when dataReceived raises.
            _log.failure("Bug while reading from a client")
            if self.transport is not None:
                cast(ITCPTransport, self.transport).abortConnection()

    def dropConnection(self, abort: bool = False) -> None:
        # A close frame that breaks the rules (a reserved code, a reason that
        # is not UTF-8, a length of 1) makes Autobahn send its own 1002 or
        # 1007 close, and then take the bad frame for the answer to that
        # close and abort the TCP connection, which throws away the close
        # frame it has just queued. When that happens within one read,
        # close gracefully instead, so that the client learns the code, and
        # abort only if the close frame cannot be delivered in time.
        if abort and self._open_when_read_began and self.transport is not None:
            abort = False
            self._drop_deadline = self.factory.reactor.callLater(
                self.factory.close_timeout or 1.0,
                cast(ITCPTransport, self.transport).abortConnection,
            )
        super().dropConnection(abort=abort)

    def _fail_connection(self, code: int = 1001, reason: str = "going away") -> None:
        if self.state != self.STATE_CLOSED and not self.failedByMe:
            self.factory.rejections.count_closed(code, reason)
        super()._fail_connection(code, reason)

    def onFrameBegin(self) -> None:
        # Autobahn has parsed and checked the frame's header, and reads its
        # payload through current_frame_masker from now on.
        frame = self.current_frame
        if frame.mask is not None and frame.length > 0:
            # The factory turns Autobahn's own unmasking off (applyMask):
            # its default unmasker costs more per frame than all the rest.
            self.current_frame_masker = XorMaskerSimple(frame.mask)
        if frame.opcode > 7:
            super().onFrameBegin()
            return
        if not self.inside_message:
            self._frames_in_message = 0
            # A text message in one frame whose payload is all here is
            # checked whole at its end, where an ASCII payload costs next to
            # nothing; Autobahn's validator, read at the start of each
            # message, would fail it no sooner. Anything else that is text
            # is validated by Autobahn as it arrives.
            self._utf8_at_end = (
                frame.opcode == self.MESSAGE_TYPE_TEXT
                and frame.fin
                and len(self.data) >= frame.length
            )
            self.utf8validateIncoming = not self._utf8_at_end
        super().onFrameBegin()
        # Autobahn bounds a message's bytes, not its fragments: a stream of
        # empty continuation frames would grow without end.
        self._frames_in_message += 1
        if self._frames_in_message > MAX_FRAMES_PER_MESSAGE and not self.failedByMe:
            self._fail_connection(
                self.CLOSE_STATUS_CODE_MESSAGE_TOO_BIG,
                f"more than {MAX_FRAMES_PER_MESSAGE} fragments in one message",
            )

    def onMessageEnd(self) -> None:
        # Replaces Autobahn's onMessageEnd, which would also fire a
        # per-message "message" event that nothing here listens to.
        if not self.failedByMe:
            payload = b"".join(self.message_data)
            if self._utf8_at_end and not is_utf8(payload):
                # What Autobahn's own validator would have done: 1007.
                self._invalid_payload("invalid UTF-8 in a text message")
            else:
                try:
                    if self.version == 1:
                        self._receive_v1(payload)
                    else:
                        self._receive_v2(payload)
                except Exception:
                    # A bug must cost this one message, not the connection.
                    _log.failure(
                        "Bug while handling a message of {length} bytes",
                        length=len(payload),
                    )
                    if self._replies and not self._replies[-1].ready:
                        self._replies[-1].ready = True
                        self._send_replies()
        self.message_data = None  # type: ignore[assignment]

    # -- version 1 --

    def _receive_v1(self, payload: bytes) -> None:
        decoder = self.factory.decoder
        try:
            if self.message_is_binary:
                update = decoder.decode(payload)
            else:
                # A text message has been checked for UTF-8 by now, by
                # Autobahn or by onMessageEnd.
                update = decoder.decode_utf8(payload)
        except InvalidUpdate as invalid:
            self._count(invalid)
        else:
            self._pending.append(update)

    def _flush(self) -> None:
        updates, self._pending = self._pending, []
        applying = self.factory.apply(updates)
        if applying is not None:
            # Version 1 has no replies: a failed write is only logged.
            applying.addErrback(self.factory.store_failed)
            if not applying.called:
                self._track(applying)

    # -- version 2 --

    def _receive_v2(self, payload: bytes) -> None:
        self._seq += 1
        pending = _PendingReply(Reply(self._seq))
        self._replies.append(pending)
        rejected = pending.reply.rejected
        try:
            items = self.factory.decoder.decode_batch(payload, self.factory.max_batch)
        except InvalidUpdate as invalid:
            self._count(invalid)
            rejected.append(Rejection(None, None, invalid.reason.value))
            items = []
        for index, item in enumerate(items):
            if isinstance(item, InvalidUpdate):
                self._count(item)
                rejected.append(Rejection(index, item.update_id, item.reason.value))
            else:
                pending.applied.append((index, item))
        if not pending.applied:
            pending.ready = True
            self._send_replies()
            return
        applying = self.factory.apply([update for _, update in pending.applied])
        if applying is None:
            self._settle(None, pending)
            return
        applying.addBoth(self._settle, pending)
        if not applying.called:
            self._track(applying)

    def _count(self, invalid: InvalidUpdate) -> None:
        self.factory.rejections.count(invalid.reason, invalid.detail)

    def _settle(
        self, outcomes: list[Outcome] | Failure | None, pending: _PendingReply
    ) -> None:
        reply = pending.reply
        if isinstance(outcomes, list):
            for (index, update), outcome in zip(pending.applied, outcomes, strict=True):
                assert update.update_id is not None
                if outcome is Outcome.TOTAL_OVERFLOW:
                    reply.rejected.append(
                        Rejection(index, update.update_id, Reason.TOTAL_OVERFLOW.value)
                    )
                else:
                    reply.acked.append(update.update_id)
            reply.rejected.sort(key=lambda rejection: rejection.index or 0)
        else:
            if outcomes is not None:
                self.factory.store_failed(outcomes)
            reply.retry.extend(
                cast(str, update.update_id) for _, update in pending.applied
            )
        pending.ready = True
        self._send_replies()

    def _send_replies(self) -> None:
        replies = self._replies
        while replies and replies[0].ready:
            reply = replies.popleft().reply
            if self.state == self.STATE_OPEN:
                self.sendMessage(_encode_reply(reply))

    # -- both --

    def _track(self, applying: Deferred[Any]) -> None:
        """
        Stop reading from a client that is ahead of the store by more than
        ``MAX_IN_FLIGHT`` calls, and read again once it has caught up half.
        """
        self._in_flight += 1
        applying.addBoth(self._landed)
        if self._in_flight > MAX_IN_FLIGHT:
            self.pause_reading("store")

    def _landed(self, result: object) -> object:
        self._in_flight -= 1
        if self._in_flight <= MAX_IN_FLIGHT // 2:
            self.resume_reading("store")
        return result

    def pause_reading(self, reason: str) -> None:
        if not self._pause_reasons and self.transport is not None:
            self.transport.pauseProducing()  # type: ignore[attr-defined]
        self._pause_reasons |= {reason}

    def resume_reading(self, reason: str) -> None:
        if reason not in self._pause_reasons:
            return
        self._pause_reasons -= {reason}
        if not self._pause_reasons and self.transport is not None:
            self.transport.resumeProducing()  # type: ignore[attr-defined]

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

    # -- IPushProducer: the connection is registered with its own transport,
    # which pauses it while its send buffer is full; the connection then
    # stops reading until the client has taken its replies. (No object of
    # its own for this: one more per connection would cost 100 bytes.)

    def pauseProducing(self) -> None:
        self.pause_reading("replies")

    def resumeProducing(self) -> None:
        self.resume_reading("replies")

    def stopProducing(self) -> None:
        pass


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
        max_batch: int = DEFAULT_MAX_BATCH,
    ) -> None:
        super().__init__(server=f"steptrack/{__version__}", reactor=reactor)
        # Autobahn schedules every connection's timeouts (handshake, ping,
        # pong, close) through this attribute; see ``timeouts`` for why not
        # txaio's.
        self._batched_timer = timeouts.BatchedTimeouts(reactor)
        self.max_batch = max_batch
        self.close_timeout = close_timeout
        self.store = store
        self.rejections = rejections
        self.decoder = decoder if decoder is not None else UpdateDecoder()
        self.connections: set[StepUpdateProtocol] = set()
        self.traffic = TrafficStats()
        """Autobahn's traffic counters, for all connections together."""
        self.setProtocolOptions(
            webStatus=False,
            maxFramePayloadSize=max_message_size,
            maxMessagePayloadSize=max_message_size,
            openHandshakeTimeout=handshake_timeout,
            closeHandshakeTimeout=close_timeout,
            autoPingInterval=ping_interval,
            autoPingTimeout=ping_timeout,
            # Frames are unmasked with wsaccel instead (see onFrameBegin).
            applyMask=False,
            # Close with the RFC 6455 status code (1007, 1009, ...) rather
            # than dropping TCP, so clients learn what they did wrong.
            failByDrop=False,
            # No permessage-deflate: its inflated size would be unbounded.
            perMessageCompressionAccept=lambda offers: None,
        )

    def setProtocolOptions(self, *args: Any, **options: Any) -> None:
        super().setProtocolOptions(*args, **options)
        # Connections take the options from their class (see ``footprint``),
        # so changed options need a new class; connections already open
        # keep theirs, as with Autobahn's own copying.
        self.protocol = footprint.connection_class(StepUpdateProtocol, self)

    def apply(self, updates: list[Update]) -> Deferred[list[Outcome]] | None:
        """
        Hand ``updates`` to the store, counting the ones it refuses. Returns
        the store's answer, or ``None`` if the store raised (which is logged).
        """
        try:
            applying = self.store.apply(updates)
        except Exception:
            _log.failure("The store refused {count} update(s)", count=len(updates))
            return None
        return applying.addCallback(self._count_refused)

    def _count_refused(self, outcomes: list[Outcome]) -> list[Outcome]:
        if Outcome.TOTAL_OVERFLOW in outcomes:
            for outcome in outcomes:
                if outcome is Outcome.TOTAL_OVERFLOW:
                    self.rejections.count(
                        Reason.TOTAL_OVERFLOW, "the total would pass 2^53 - 1"
                    )
        return outcomes

    @staticmethod
    def store_failed(failure: Failure) -> None:
        """Log a store failure, unless the store has reported it itself."""
        if not failure.check(StoreWriteFailed):
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

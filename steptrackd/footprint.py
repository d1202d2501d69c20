"""
What each WebSocket connection keeps in memory, and how it is kept small.

A daemon with tens of thousands of devices holds most of them idle, so the
memory of an idle connection decides how many fit. Autobahn keeps
everything about a connection as instance attributes, about a hundred of
them, which Python stores in a dictionary of over 3 KB; some of them (the
options) are the same for every connection, others (the HTTP request) are
never read again once the connection is open. This module holds the means
``websocket`` uses to keep less, all through subclassing and Autobahn's own
interfaces, without changing Autobahn:

- the options become class attributes of a class made for each factory:
  Autobahn copies an option to a connection only when the connection does
  not have it yet, so it copies none (``connection_class``);
- Autobahn's per-connection attributes get ``__slots__``, 8 bytes each
  instead of a dictionary entry (``AUTOBAHN_CONNECTION_STATE``);
- what only the opening handshake needs is dropped once it is done
  (``forget_handshake``);
- what Autobahn makes for every connection but steptrack never uses (a send
  queue, an event registry) is shared or dropped (``NO_SEND_QUEUE``,
  ``forget_event_registry``);
- every TCP transport keeps its attributes in CPython's compact form, even
  after a burst of connections (``settle_transport_attributes``).

The timeouts of all connections are batched by ``timeouts``. None of this
changes what a connection does, nor the per-message path.
"""

from __future__ import annotations

from collections import deque
from types import FunctionType, MemberDescriptorType
from typing import Any, Final, TypeVar

AUTOBAHN_CONNECTION_STATE: Final = (
    # The attributes Autobahn's server protocol sets on each connection,
    # apart from its options and from those with a class-level default
    # (``transport``, ``factory``, ``connected``, ``peer``, ...), which a
    # slot would hide: a test checks that none of these has one. A name
    # missing here (a new Autobahn may add some) still works; it only
    # costs a dictionary entry.
    "_isMessageCompressed",
    "_perMessageCompress",
    "_transport_details",
    "_wskey",
    "autoPingPending",
    "autoPingPendingCall",
    "autoPingPendingSent",
    "autoPingPendingSeq",
    "autoPingTimeoutCall",
    "closeHandshakeTimeoutCall",
    "closedByMe",
    "control_frame_data",
    "current_frame",
    "current_frame_masker",
    "data",
    "droppedByMe",
    "failedByMe",
    "frame_data",
    "frame_length",
    "http_headers",
    "http_request_data",
    "http_request_host",
    "http_request_params",
    "http_request_path",
    "http_request_uri",
    "http_response_data",
    "http_status_line",
    "inside_message",
    "is_closed",
    "is_open",
    "localCloseCode",
    "localCloseReason",
    "message_data",
    "message_data_total_length",
    "message_is_binary",
    "openHandshakeTimeoutCall",
    "remoteCloseCode",
    "remoteCloseReason",
    "send_compressed",
    "send_message_frame_length",
    "send_message_frame_mask",
    "send_message_frame_masker",
    "send_message_opcode",
    "send_queue",
    "send_state",
    "serverConnectionDropTimeoutCall",
    "state",
    "trackedTimings",
    "trafficStats",
    "triggered",
    "utf8validateIncomingCurrentMessage",
    "utf8validateLast",
    "utf8validator",
    "wasClean",
    "wasCloseHandshakeTimeout",
    "wasMaxFramePayloadSizeExceeded",
    "wasMaxMessagePayloadSizeExceeded",
    "wasNotCleanReason",
    "wasOpenHandshakeTimeout",
    "wasServerConnectionDropTimeout",
    "wasServingFlashSocketPolicyFile",
    "websocket_extensions",
    "websocket_extensions_in_use",
    "websocket_origin",
    "websocket_protocol_in_use",
    "websocket_protocols",
    "websocket_version",
)

HANDSHAKE_ONLY: Final = (
    # Set while the opening handshake is read and answered, and never read
    # by Autobahn once the connection is open: the raw request and response,
    # the parsed headers, the client's key and offers, and the transport
    # details (steptrack reads none of them either). Together about 1.5 KB.
    "_transport_details",
    "_wskey",
    "http_headers",
    "http_request_data",
    "http_request_host",
    "http_request_params",
    "http_request_path",
    "http_request_uri",
    "http_response_data",
    "http_status_line",
    "websocket_extensions",
    "websocket_origin",
    "websocket_protocols",
)

NO_SEND_QUEUE: Final[deque[Any]] = deque(maxlen=0)
"""
Stands for a connection's send queue until one is needed. Autobahn queues
outgoing data only for writes it is asked to pace (``sync`` or
``chopsize``), which steptrack never asks for, yet it gives every
connection a deque of its own (760 bytes, empty). This one is shared and
always empty; ``StepUpdateProtocol.sendData`` gives a connection a real
queue before Autobahn could put anything in it.
"""

_Protocol = TypeVar("_Protocol")


def connection_class(base: type[_Protocol], factory: Any) -> type[_Protocol]:
    """
    A subclass of ``base`` (an Autobahn protocol class) that has the
    factory's current options as class attributes, so that its connections
    share them instead of each holding a copy. An option that ``base``
    keeps in a slot (one a connection changes for itself) is left out:
    Autobahn then copies it into each connection's slot, as it would
    without this class.
    """
    options = {}
    for name in base.CONFIG_ATTRS:  # type: ignore[attr-defined]
        if isinstance(getattr(base, name, None), MemberDescriptorType):
            continue
        value = getattr(factory, name)
        # A function as a class attribute would become a method; Autobahn
        # calls its function-valued options as plain functions.
        options[name] = (
            staticmethod(value) if isinstance(value, FunctionType) else value
        )
    namespace = {
        "__slots__": (),
        "__module__": base.__module__,
        "__qualname__": base.__qualname__,
        **options,
    }
    return type(base.__name__, (base,), namespace)


def forget_handshake(connection: object) -> None:
    """Drop what only the opening handshake needed, once it is done."""
    for name in HANDSHAKE_ONLY:
        setattr(connection, name, None)
    # The handshake lists the extensions it agreed to in a new list; it
    # agrees to none (permessage-deflate is refused), and nothing adds to
    # the list afterwards.
    connection.websocket_extensions_in_use = ()  # type: ignore[attr-defined]


def forget_event_registry(connection: object) -> None:
    """
    Drop the event registry Autobahn gives each connection (a list and a
    dictionary, 250 bytes), for its one event, "message", which is never
    fired here: ``StepUpdateProtocol`` replaces the method that fires it,
    so a listener added with ``on("message")`` would never be called
    anyway. Autobahn's class-level defaults take over: no events.
    """
    del connection._valid_events  # type: ignore[attr-defined]
    del connection._results  # type: ignore[attr-defined]


TRANSPORT_LATE_ATTRIBUTES: Final = ("dataBuffer", "offset", "_tempDataLen")
"""Attributes a Twisted TCP transport sets only at its first write."""


def settle_transport_attributes(transport: object) -> None:
    """
    Make sure every TCP transport of the process keeps its attributes in
    the compact form, by setting at once, to the values they have, those
    it would otherwise set only at its first write.

    CPython (3.11 and 3.12) keeps the attribute names of all instances of a
    class in one table and each instance's values in a small array, but
    that table takes new names only while few instances have been made
    (each new instance shrinks the room left). An instance that sets a
    name the table can no longer take gets a dictionary of its own instead,
    of about 800 bytes. Twisted accepts up to 100 connections in a row, so
    after a burst of connections at start (devices reconnecting after a
    restart) the table could close before any transport has written, and
    every transport made afterwards would carry a dictionary, for the life
    of the process.
    """
    for name in TRANSPORT_LATE_ATTRIBUTES:
        if hasattr(transport, name):
            setattr(transport, name, getattr(transport, name))

"""
What each WebSocket connection keeps in memory, and how it is kept small.

A daemon with tens of thousands of devices holds most of them idle, so the
memory of an idle connection is what decides how many fit. Autobahn keeps
everything about a connection as instance attributes: about a hundred of
them, which Python stores in a dictionary of several kilobytes, and some of
them (the options, the HTTP request) are the same for every connection or
never read again once the connection is open. This module holds the means
``websocket`` uses to keep less, all through subclassing and Autobahn's own
options, without changing Autobahn:

- the options become class attributes of a class made for each factory,
  so that Autobahn, which copies an option to a connection only when the
  connection does not have it yet, copies none;
- Autobahn's per-connection attributes are given ``__slots__`` (8 bytes
  each, instead of a dictionary entry);
- what only the opening handshake needs is dropped once it is done.

It is not about the per-message path, and it changes no behaviour.
"""

from __future__ import annotations

from collections import deque
from types import FunctionType
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
    share them instead of each holding a copy.
    """
    options = {}
    for name in base.CONFIG_ATTRS:  # type: ignore[attr-defined]
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

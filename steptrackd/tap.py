"""
The ``twistd steptrack`` command line: its options, and the service they
describe.

Everything here runs inside twistd; the plugin in ``twisted/plugins`` only
names this module, so that listing twistd's plugins imports none of
Autobahn or Klein.
"""

from __future__ import annotations

import atexit
import re
from collections.abc import Callable
from typing import Any

from twisted.application.service import IService
from twisted.internet.endpoints import serverFromString
from twisted.python import usage

from . import __version__
from .server import ProtocolLimits, SteptrackService
from .store import (
    DEFAULT_DEDUPE_RETENTION,
    DEFAULT_STORE,
    STORE_KINDS,
    check_store_url,
    open_store,
)
from .supervisor import Supervisor, exit_with_status_of, usable_cores
from .update import MAX_SAFE_INTEGER

DEFAULT_WS_LISTEN = r"tcp6:8081:interface=\:\:"
DEFAULT_REST_LISTEN = r"tcp6:8080:interface=\:\:"

_DEFAULTS = ProtocolLimits()
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{text!r} is not a positive whole number")
    return value


def _duration(text: str) -> float:
    match = _DURATION.match(str(text))
    if match is None:
        raise ValueError(f"{text!r} is not a duration such as 30, 30s, 15m, 12h or 7d")
    number, unit = match.groups()
    return float(number) * _UNITS[unit]


def _seconds(seconds: float) -> str:
    """Show a default duration the way a user would type it."""
    for unit in ("d", "h", "m"):
        if seconds >= _UNITS[unit] and seconds % _UNITS[unit] == 0:
            return f"{int(seconds // _UNITS[unit])}{unit}"
    return f"{seconds:g}s"


# Sockets a worker can share. Not unix: (each worker that stops listening
# would remove the shared socket file) nor systemd: (which may be one).
_SHAREABLE_ENDPOINTS = frozenset({"tcp", "tcp6"})
MAX_WORKERS = 64
"""More would only take turns on the cores, at about 20 MB each."""
_DURATION_HELP = " Seconds, or a number with s, m, h or d."
_CONVERSIONS: dict[str, Callable[[str], Any]] = {
    "max-message-size": _positive_int,
    "max-new-steps": _positive_int,
    "max-batch": _positive_int,
    "dedupe-retention": _duration,
    "handshake-timeout": _duration,
    "ping-interval": _duration,
    "ping-timeout": _duration,
}


class Options(usage.Options):
    """Options of ``twistd steptrack``."""

    synopsis = "[options]"
    longdesc = (
        "Runs steptrack: devices send step updates over WebSocket, apps "
        "read each user's total over REST. Listen options take Twisted "
        "endpoint descriptions (tcp:, tcp6:, ssl:, unix:, systemd:); "
        "the defaults listen on all IPv4 and IPv6 addresses. With the "
        "SQLite store it runs one worker process per CPU core (--workers), "
        "all sharing the ports and the database."
    )

    optParameters = [
        [
            "ws-listen",
            None,
            DEFAULT_WS_LISTEN,
            "Endpoint for WebSocket updates.",
        ],
        [
            "rest-listen",
            None,
            DEFAULT_REST_LISTEN,
            "Endpoint for the REST API.",
        ],
        [
            "store",
            None,
            DEFAULT_STORE,
            f"Where totals are kept: {STORE_KINDS}.",
        ],
        [
            "workers",
            None,
            "auto",
            "Worker processes serving both APIs over one SQLite store; auto "
            f"is one per usable CPU core ({usable_cores()} here). With one, "
            "the daemon is a single process. The memory store, and listen "
            f"endpoints other than tcp: and tcp6:, need one. At most {MAX_WORKERS}.",
        ],
        [
            "max-message-size",
            None,
            _DEFAULTS.max_message_size,
            "Largest WebSocket message in bytes; larger ones close the "
            "connection with 1009.",
        ],
        [
            "max-new-steps",
            None,
            _DEFAULTS.max_new_steps,
            "Largest newSteps one update may carry.",
        ],
        [
            "max-batch",
            None,
            _DEFAULTS.max_batch,
            "Most updates in one message of protocol v2 (steptrack.v2).",
        ],
        [
            "dedupe-retention",
            None,
            _seconds(DEFAULT_DEDUPE_RETENTION),
            "How long an applied update_id is remembered, so that a resend "
            "is not counted twice." + _DURATION_HELP,
        ],
        [
            "handshake-timeout",
            None,
            _seconds(_DEFAULTS.handshake_timeout),
            "Time a client has to finish the WebSocket opening handshake."
            + _DURATION_HELP,
        ],
        [
            "ping-interval",
            None,
            _seconds(_DEFAULTS.ping_interval),
            "Time between keepalive pings on idle connections; 0 turns them "
            "off." + _DURATION_HELP,
        ],
        [
            "ping-timeout",
            None,
            _seconds(_DEFAULTS.ping_timeout),
            "Time a client has to answer a ping before it is dropped." + _DURATION_HELP,
        ],
    ]

    def opt_version(self) -> None:
        """Show the steptrack version and exit."""
        print(f"steptrack {__version__}")
        raise SystemExit(0)

    def postOptions(self) -> None:
        # Values arrive as strings from the command line and as the
        # defaults above; both are converted here, so that an error can name
        # its option.
        for name, convert in _CONVERSIONS.items():
            try:
                self[name] = convert(str(self[name]))
            except ValueError as e:
                raise usage.UsageError(f"--{name}: {e}") from None
        if self["max-new-steps"] > MAX_SAFE_INTEGER:
            raise usage.UsageError(
                f"--max-new-steps: at most {MAX_SAFE_INTEGER} (2^53 - 1), the "
                "largest total a JSON client reads exactly"
            )
        if self["dedupe-retention"] <= 0:
            raise usage.UsageError("--dedupe-retention must be more than 0")
        if self["handshake-timeout"] <= 0:
            raise usage.UsageError("--handshake-timeout must be more than 0")
        if self["ping-interval"] > 0 and self["ping-timeout"] <= 0:
            raise usage.UsageError(
                "--ping-timeout must be more than 0 while pings are on"
            )
        for option in ("ws-listen", "rest-listen"):
            try:
                # Parsing needs no reactor; the real one is used later.
                serverFromString(None, self[option])
            except Exception as e:
                raise usage.UsageError(
                    f"--{option}: {self[option]!r} is not a usable endpoint "
                    f"description: {e}"
                ) from None
        try:
            check_store_url(self["store"])
        except ValueError as e:
            raise usage.UsageError(f"--store: {e}") from None
        self["workers"] = self._workers(str(self["workers"]))

    def _workers(self, text: str) -> int:
        shareable = self["store"].startswith("sqlite:") and all(
            self[option].split(":", 1)[0] in _SHAREABLE_ENDPOINTS
            for option in ("ws-listen", "rest-listen")
        )
        if text == "auto":
            return min(usable_cores(), MAX_WORKERS) if shareable else 1
        try:
            workers = _positive_int(text)
        except ValueError as e:
            raise usage.UsageError(f"--workers: {e} or auto") from None
        if workers > MAX_WORKERS:
            raise usage.UsageError(f"--workers: at most {MAX_WORKERS}")
        if workers > 1 and not shareable:
            raise usage.UsageError(
                "--workers: more than one worker needs the sqlite: store and "
                "tcp: or tcp6: listen endpoints"
            )
        return workers

    def limits(self) -> ProtocolLimits:
        return ProtocolLimits(
            max_message_size=self["max-message-size"],
            max_new_steps=self["max-new-steps"],
            max_batch=self["max-batch"],
            handshake_timeout=self["handshake-timeout"],
            ping_interval=self["ping-interval"],
            ping_timeout=self["ping-timeout"],
        )


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    if options["workers"] > 1:
        supervisor = Supervisor(
            reactor,
            serverFromString(reactor, options["ws-listen"]),
            serverFromString(reactor, options["rest-listen"]),
            options["store"][len("sqlite:") :],
            options["workers"],
            dedupe_retention=options["dedupe-retention"],
            limits=options.limits(),
            ws_description=options["ws-listen"],
            rest_description=options["rest-listen"],
        )
        atexit.register(exit_with_status_of, supervisor)
        return supervisor
    store = open_store(options["store"], reactor, options["dedupe-retention"])
    return SteptrackService(
        reactor,
        serverFromString(reactor, options["ws-listen"]),
        serverFromString(reactor, options["rest-listen"]),
        store,
        options.limits(),
        ws_description=options["ws-listen"],
        rest_description=options["rest-listen"],
        as_daemon=True,
    )

"""
One worker process of a daemon that runs several (see :mod:`.supervisor`).

A worker runs the whole service, both APIs over a shared SQLite store, on
listening sockets it inherits from its parent, and reports to the parent
only through its log: JSON log events on its standard output, which the
parent relays into the daemon's log. Its standard input is a pipe from the
parent that is never written to: when it reaches end of file, the parent
has gone, however it went, and the worker shuts down cleanly rather than
live on as an orphan.

Started as ``python -m steptrackd.worker SETTINGS`` by the parent, never by
hand.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import sys
from dataclasses import dataclass
from typing import Any, Final

from twisted.internet.endpoints import AdoptedStreamServerEndpoint
from twisted.internet.process import ProcessReader
from twisted.internet.task import LoopingCall
from twisted.logger import Logger, globalLogBeginner, jsonFileLogObserver
from twisted.python.failure import Failure

from .server import (
    ProtocolLimits,
    SteptrackService,
    describe_address,
    stop_on_sigterm,
)

# The descriptors a worker inherits (see Supervisor._spawn).
PARENT_FD: Final = 0
"""A pipe from the parent; end of file means the parent is gone."""
LOG_FD: Final = 1
"""JSON log events for the parent."""
WS_FD: Final = 3
"""The WebSocket listening socket."""
REST_FD: Final = 4
"""The REST listening socket."""
LOCK_FD: Final = 5
"""The database lock file, held by every process of the daemon."""
HEARTBEAT_FD: Final = 6
"""A pipe to the parent, written to every ``HEARTBEAT_INTERVAL`` seconds."""

HEARTBEAT_INTERVAL: Final = 1.0

READY_FIELD: Final = "steptrack_worker_ready"
"""Set in the log event a worker emits once it serves both APIs."""

# Named: run with -m, this module is __main__.
_log = Logger(namespace="steptrackd.worker")


@dataclass(frozen=True)
class WorkerSettings:
    """What a worker is told by its parent, as JSON on its command line."""

    index: int
    database: str
    """Path of the SQLite database, already migrated by the parent."""
    ws_family: int
    rest_family: int
    dedupe_retention: float
    limits: ProtocolLimits

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> WorkerSettings:
        fields = json.loads(text)
        fields["limits"] = ProtocolLimits(**fields["limits"])
        return cls(**fields)


class _Parent:
    """Watches the pipe from the parent (a ``ProcessReader``'s process)."""

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self.watching = True
        """False once the worker stops: then the pipe closes as everything does."""

    def childDataReceived(self, name: str, data: bytes) -> None:
        """The parent writes nothing; anything it did write means nothing."""

    def childConnectionLost(self, name: str, reason: Failure) -> None:
        if self.watching:
            self.watching = False
            _log.warn("The parent process is gone: shutting down")
            self._reactor.stop()


def _beat() -> None:
    """
    Tell the parent this worker's reactor still turns: a worker that stops
    beating (stopped, or stuck) while it may hold the database's write lock
    would stall every worker's writes, so the parent replaces it.
    """
    with contextlib.suppress(BlockingIOError, BrokenPipeError):
        os.write(HEARTBEAT_FD, b".")


def run(settings: WorkerSettings, reactor: Any) -> int:
    """Serve until stopped; returns the process's exit status."""
    # Imported here: it is the store the parent checked, and only a
    # worker's reactor thread should start its writer thread.
    from .sqlite_store import SQLiteStore

    store = SQLiteStore(
        settings.database,
        reactor,
        dedupe_retention=settings.dedupe_retention,
        shared=True,
    )
    service = SteptrackService(
        reactor,
        AdoptedStreamServerEndpoint(reactor, WS_FD, settings.ws_family),
        AdoptedStreamServerEndpoint(reactor, REST_FD, settings.rest_family),
        store,
        settings.limits,
        announce=False,
    )
    status = 0

    def cannot_start(reason: str) -> None:
        nonlocal status
        status = 1
        _log.critical(
            "Worker {index} cannot start: {reason}",
            index=settings.index,
            reason=reason,
        )
        reactor.stop()

    def ready(ports: list[Any]) -> None:
        _log.info(
            "Worker {index} (pid {pid}) serving WebSocket updates on "
            "{ws_address} and REST totals on {rest_address}",
            index=settings.index,
            pid=os.getpid(),
            ws_address=describe_address(ports[0]),
            rest_address=describe_address(ports[1]),
            **{READY_FIELD: True},
        )

    def start() -> None:
        try:
            service.privilegedStartService()
            service.startService()
        except Exception as e:
            cannot_start(str(e))
            return
        service.started.addCallbacks(
            ready, lambda failure: cannot_start(failure.getErrorMessage())
        )

    def stop() -> Any:
        parent.watching = False
        if service.running:
            return service.stopService()
        return None

    parent = _Parent(reactor)
    ProcessReader(reactor, parent, "parent", PARENT_FD)
    heartbeat = LoopingCall(_beat)
    heartbeat.clock = reactor
    reactor.callWhenRunning(heartbeat.start, HEARTBEAT_INTERVAL)
    # SIGINT stays ignored: the parent alone answers ^C (see main).
    reactor.callWhenRunning(stop_on_sigterm, reactor, sigint=False)
    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger("before", "shutdown", stop)
    reactor.run()
    _log.info("Worker {index} stopped", index=settings.index)
    return status


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("steptrackd.worker is started by twistd steptrack", file=sys.stderr)
        return 2
    settings = WorkerSettings.from_json(argv[1])
    os.set_blocking(HEARTBEAT_FD, False)
    # ^C in a terminal reaches the whole process group: the parent alone
    # decides, and stops its workers in order. (Twisted installs its own
    # SIGINT handler only over the default one.)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    log_file = os.fdopen(LOG_FD, "w", encoding="utf-8", errors="replace")
    globalLogBeginner.beginLoggingTo(
        [jsonFileLogObserver(log_file)], redirectStandardIO=False
    )
    from twisted.internet import reactor

    return run(settings, reactor)


if __name__ == "__main__":
    sys.exit(main(sys.argv))

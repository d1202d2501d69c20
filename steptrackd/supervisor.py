"""
Several worker processes, one per core: the parent that supervises them.

One Python process uses one core (the GIL), however many threads it has. To
use the whole machine, ``twistd steptrack`` runs as a parent that

- binds both listening sockets (so a port in use fails the start at once),
- takes the database's lock and migrates the database,
- starts the workers (:mod:`.worker`), each running the whole service on
  copies of both sockets and on the same database (the kernel hands each
  new connection to one of them; their stores cooperate, see
  :mod:`.sqlite_store`),
- relays their log events into its own log, tagged with the worker,
- starts a new worker in place of one that died,
- on SIGTERM, stops every worker (each closes its connections with 1001 and
  commits what it acknowledged) and exits 0 once all have ended.

The parent serves nothing itself and keeps no connection. A worker whose
parent is gone, even by SIGKILL, shuts itself down.

This module knows processes and file descriptors; what a worker serves is
:class:`.server.SteptrackService`'s business.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from collections.abc import Sequence
from typing import IO, Any, Final, cast

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks, succeed
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import (
    IDelayedCall,
    IListeningPort,
    IStreamServerEndpoint,
)
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger, eventFromJSON, globalLogPublisher
from twisted.python.failure import Failure

from .server import (
    CannotStart,
    Listener,
    ProtocolLimits,
    exit_if_any_failed,
    log_started,
    stop_on_sigterm,
)
from .store import StoreUnusable
from .worker import (
    HEARTBEAT_FD,
    HEARTBEAT_INTERVAL,
    LOCK_FD,
    LOG_FD,
    PARENT_FD,
    READY_FIELD,
    REST_FD,
    WS_FD,
    WorkerSettings,
)

_log = Logger()

_RECORD_SEPARATOR: Final = b"\x1e"
_ADOPTABLE_FAMILIES: Final = (socket.AF_INET, socket.AF_INET6)


def usable_cores() -> int:
    """The cores this process may run on (a container or ``taskset`` may cap it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class _Unused(Factory):
    """The parent's factory: it never accepts, its workers do."""

    noisy = False

    def __init__(self, prefix: str) -> None:
        self._prefix = prefix

    def logPrefix(self) -> str:
        return self._prefix


class _Worker(ProcessProtocol):
    """One worker process, seen from the parent."""

    def __init__(self, supervisor: Supervisor, index: int) -> None:
        self.supervisor = supervisor
        self.index = index
        self.pid: int | None = None
        self.ready = False
        self.last_beat = supervisor.reactor.seconds()
        self.killed = False
        self.has_ended = False
        self._end_waiters: list[Deferred[None]] = []
        self._events = bytearray()
        self._errors = bytearray()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.pid = self.transport.pid

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == HEARTBEAT_FD:
            self.last_beat = self.supervisor.reactor.seconds()
        elif childFD == LOG_FD:
            self._relay_events(data)
        else:
            self._relay_errors(data)

    def _relay_events(self, data: bytes) -> None:
        self._events += data
        *records, rest = self._events.split(_RECORD_SEPARATOR)
        if rest.endswith(b"\n"):
            records.append(rest)
            rest = bytearray()
        self._events = bytearray(rest)
        for record in records:
            if record.strip():
                self._relay_event(bytes(record))

    def _relay_event(self, record: bytes) -> None:
        try:
            event = eventFromJSON(record.decode("utf-8", "replace"))
        except ValueError:
            _log.warn(
                "Worker {index} wrote an unreadable log record: {record!r}",
                index=self.index,
                record=record[:200],
            )
            return
        level = event.get("log_level")
        namespace = event.get("log_namespace", "-")
        level_name = getattr(level, "name", "-")
        event["log_system"] = f"worker {self.index} {namespace}#{level_name}"
        globalLogPublisher(event)
        if event.get(READY_FIELD) and not self.ready:
            self.ready = True
            self.supervisor.worker_ready(self)

    def _relay_errors(self, data: bytes) -> None:
        # Only what escapes the worker's log lands on its stderr: a crash
        # before logging began, or the interpreter's own last words.
        self._errors += data
        *lines, rest = self._errors.split(b"\n")
        self._errors = bytearray(rest)
        for line in lines:
            self._relay_error_line(bytes(line))

    def _relay_error_line(self, line: bytes) -> None:
        if line.strip():
            _log.error(
                "Worker {index}: {line}",
                index=self.index,
                line=line.decode("utf-8", "replace"),
            )

    def processEnded(self, reason: Failure) -> None:
        if self._errors:
            self._relay_error_line(bytes(self._errors))
        self.supervisor.worker_ended(self, reason)
        self.has_ended = True
        waiters, self._end_waiters = self._end_waiters, []
        for waiter in waiters:
            if not waiter.called:  # not if a timeout cancelled the wait
                waiter.callback(None)

    def when_ended(self) -> Deferred[None]:
        """A new Deferred that fires once the process has ended."""
        if self.has_ended:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._end_waiters.append(waiter)
        return waiter

    def signal(self, name: str) -> None:
        if self.transport is not None and not self.has_ended:
            with contextlib.suppress(ProcessExitedAlready):
                self.transport.signalProcess(name)


class Supervisor(Service):
    """
    Runs ``count`` workers on both endpoints and the SQLite database at
    ``database``. What ``twistd steptrack`` runs with more than one worker.
    """

    name = "supervisor"
    restart_delay = 1.0
    """Seconds before a worker that died is replaced."""
    hang_timeout = 10.0
    """
    Seconds without a heartbeat after which a worker that served is killed
    (and so replaced): stopped or stuck, it may hold the database's write
    lock, and every other worker's writes would wait for it.
    """
    stop_timeout = 4.5
    """
    Seconds the workers have to end after SIGTERM before they are killed:
    within the 5 s the contract gives a stopping daemon. A worker needs at
    most its close timeout plus a second to close its connections.
    """

    def __init__(
        self,
        reactor: Any,
        ws_endpoint: IStreamServerEndpoint,
        rest_endpoint: IStreamServerEndpoint,
        database: str,
        count: int,
        *,
        dedupe_retention: float,
        limits: ProtocolLimits,
        ws_description: str | None = None,
        rest_description: str | None = None,
    ) -> None:
        self.reactor = reactor
        self.database = database
        self.count = count
        self.dedupe_retention = dedupe_retention
        self.limits = limits
        self.listeners = [
            Listener(
                "WebSocket updates",
                ws_endpoint,
                _Unused("steptrack WebSocket"),
                ws_description,
            ),
            Listener(
                "REST totals",
                rest_endpoint,
                _Unused("steptrack REST"),
                rest_description,
            ),
        ]
        self.workers: dict[int, _Worker] = {}
        self._lock: IO[bytes] | None = None
        self._announced = False
        self._stopping = False
        self._restarts: dict[int, IDelayedCall] = {}
        self._watch: LoopingCall | None = None
        self.exit_status = 0
        """What the daemon's exit status should be: 1 if it could not start."""

    # -- starting --

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        for listener in self.listeners:
            listener.privilegedStartService()
        exit_if_any_failed(self.listeners)
        for listener in self.listeners:
            port = self._port(listener)
            family = getattr(port, "addressFamily", None)
            if family not in _ADOPTABLE_FAMILIES or not hasattr(port, "fileno"):
                message = (
                    f"steptrack: {listener.description} cannot be shared by "
                    "workers (only TCP sockets can); "
                    "run with --workers 1"
                )
                _log.critical(message)
                raise CannotStart(message)
            # The workers accept; the parent only keeps the socket open.
            cast(Any, port).stopReading()

    @staticmethod
    def _port(listener: Listener) -> IListeningPort:
        if listener.port is None:
            message = (
                f"steptrack: {listener.description} does not listen at once, "
                "so it cannot be shared by workers; run with --workers 1"
            )
            _log.critical(message)
            raise CannotStart(message)
        return listener.port

    def startService(self) -> None:
        # After privileges are shed: the database belongs to the daemon's user.
        from .sqlite_store import lock_database, open_database

        try:
            self._lock = lock_database(self.database)
            open_database(self.database).close()
        except StoreUnusable as e:
            message = f"steptrack: cannot open the store: {e}"
            _log.critical(message)
            raise CannotStart(message) from None
        super().startService()
        self.reactor.callWhenRunning(stop_on_sigterm, self.reactor)
        self._watch = LoopingCall(self._kill_the_hung)
        self._watch.clock = self.reactor
        self._watch.start(HEARTBEAT_INTERVAL, now=False)
        for index in range(1, self.count + 1):
            self._spawn(index)

    def _spawn(self, index: int) -> None:
        self._restarts.pop(index, None)
        ws_port, rest_port = (self._port(listener) for listener in self.listeners)
        settings = WorkerSettings(
            index=index,
            database=self.database,
            ws_family=int(cast(Any, ws_port).addressFamily),
            rest_family=int(cast(Any, rest_port).addressFamily),
            dedupe_retention=self.dedupe_retention,
            limits=self.limits,
        )
        worker = _Worker(self, index)
        assert self._lock is not None
        self.reactor.spawnProcess(
            worker,
            sys.executable,
            [sys.executable, "-m", "steptrackd.worker", settings.to_json()],
            env=os.environ.copy(),
            childFDs={
                PARENT_FD: "w",
                LOG_FD: "r",
                2: "r",
                WS_FD: cast(Any, ws_port).fileno(),
                REST_FD: cast(Any, rest_port).fileno(),
                LOCK_FD: self._lock.fileno(),
                HEARTBEAT_FD: "r",
            },
        )
        self.workers[index] = worker

    def worker_ready(self, worker: _Worker) -> None:
        if self._announced or not all(w.ready for w in self.workers.values()):
            return
        self._announced = True
        ws_port, rest_port = (self._port(listener) for listener in self.listeners)
        pids = ", ".join(str(w.pid) for w in self.workers.values())
        log_started(
            ws_port,
            rest_port,
            f"store sqlite:{self.database}; {self.count} workers (pids {pids})",
        )

    def worker_ended(self, worker: _Worker, reason: Failure) -> None:
        if self.workers.get(worker.index) is worker:
            del self.workers[worker.index]
        if self._stopping:
            return
        if not self._announced:
            # A worker that cannot start now will not start a second later
            # either: the daemon as a whole cannot start.
            _log.critical(
                "steptrack: worker {index} ended while starting ({reason}); stopping",
                index=worker.index,
                reason=reason.getErrorMessage(),
            )
            self.exit_status = 1
            self.reactor.stop()
            return
        _log.error(
            "Worker {index} (pid {pid}) ended unexpectedly ({reason}); "
            "starting a new one in {delay} s",
            index=worker.index,
            pid=worker.pid,
            reason=reason.getErrorMessage(),
            delay=self.restart_delay,
        )
        self._restarts[worker.index] = self.reactor.callLater(
            self.restart_delay, self._spawn, worker.index
        )

    def _kill_the_hung(self) -> None:
        now = self.reactor.seconds()
        for worker in list(self.workers.values()):
            silent = now - worker.last_beat
            if worker.ready and not worker.killed and silent > self.hang_timeout:
                worker.killed = True
                _log.error(
                    "Worker {index} (pid {pid}) has not answered for {silent:.0f} s: "
                    "killing it",
                    index=worker.index,
                    pid=worker.pid,
                    silent=silent,
                )
                worker.signal("KILL")

    # -- stopping --

    @inlineCallbacks
    def stopService(self) -> Any:
        Service.stopService(self)
        self._stopping = True
        if self._watch is not None and self._watch.running:
            self._watch.stop()
        for restart in self._restarts.values():
            if restart.active():
                restart.cancel()
        self._restarts.clear()
        workers = list(self.workers.values())
        for worker in workers:
            worker.signal("TERM")
        yield self._ended(workers, self.stop_timeout)
        for worker in workers:
            if not worker.has_ended:
                _log.error(
                    "Worker {index} (pid {pid}) did not stop in time: killed",
                    index=worker.index,
                    pid=worker.pid,
                )
                worker.signal("KILL")
        yield self._ended(workers, self.stop_timeout)
        yield DeferredList([listener.stopService() for listener in self.listeners])
        if self._lock is not None:
            self._lock.close()
            self._lock = None
        _log.info("steptrack stopped")

    def _ended(self, workers: Sequence[_Worker], timeout: float) -> Deferred[Any]:
        """Fires when every worker has ended, or after ``timeout`` seconds."""
        # consumeErrors: the timeout cancels the waits, on purpose.
        all_ended: Deferred[Any] = DeferredList(
            [worker.when_ended() for worker in workers], consumeErrors=True
        )
        return all_ended.addTimeout(timeout, self.reactor).addErrback(
            lambda failure: None
        )


def exit_with_status_of(supervisor: Supervisor) -> None:
    """
    Registered with ``atexit`` by the twistd plugin: ends the process with
    the supervisor's exit status once twistd has finished (pidfile removed,
    log written). twistd itself always ends with 0 after its reactor stops,
    and a worker's failure to start is found only once the reactor runs.
    """
    if supervisor.exit_status:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(supervisor.exit_status)

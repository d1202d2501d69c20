"""
The assembly: a store, the WebSocket adapter and the REST adapter, put
together into one service, and the programmatic API around it.

:class:`SteptrackService` is what ``twistd steptrack`` runs and what
:func:`start_server` starts. Starting opens the store, then listens; stopping
runs in the reverse order and in sequence (a ``MultiService`` would stop its
children all at once): stop listening, close every WebSocket connection with
1001 and every HTTP connection, then close the store, so that the store
finishes with nothing left that could still write to it.
"""

from __future__ import annotations

import contextlib
import signal
from dataclasses import dataclass
from typing import Any, cast

from twisted.application.service import MultiService, Service
from twisted.internet.defer import (
    Deferred,
    DeferredList,
    FirstError,
    gatherResults,
    inlineCallbacks,
    maybeDeferred,
    succeed,
)
from twisted.internet.error import ReactorNotRunning
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IReactorTime,
    IStreamServerEndpoint,
    ITCPTransport,
)
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.server import Site

from . import __version__, footprint
from .rejections import RejectionCounter
from .rest import totals_site
from .store import IStepStore, StoreUnusable
from .update import DEFAULT_MAX_NEW_STEPS, UpdateDecoder
from .websocket import DEFAULT_MAX_BATCH, StepUpdateFactory

_log = Logger()


@dataclass(frozen=True)
class ProtocolLimits:
    """The limits every device connection is held to (contract section 5)."""

    max_message_size: int = 64 * 1024
    """Largest message, and frame, in bytes; bigger ones close with 1009."""
    max_new_steps: int = DEFAULT_MAX_NEW_STEPS
    max_batch: int = DEFAULT_MAX_BATCH
    """Most updates in one protocol v2 message."""
    handshake_timeout: float = 10.0
    """Seconds a client has to complete the opening handshake."""
    ping_interval: float = 30.0
    """Seconds between keepalive pings; 0 turns them off."""
    ping_timeout: float = 30.0
    """Seconds a peer has to answer a ping before it is dropped."""
    close_timeout: float = 2.0
    """Seconds a peer has to answer our close frame before it is dropped."""


class CannotStart(SystemExit, Exception):
    """
    The daemon cannot start (a port is taken, say). Raised while twistd
    starts the service: as an ``Exception`` twistd reports it to the shell
    that started a daemonized process and removes its pidfile; as a
    ``SystemExit`` it ends ``twistd -n`` with its message and status 1
    instead of a traceback.
    """


def describe_address(port: IListeningPort) -> str:
    """``[::]:8081``, ``127.0.0.1:8080`` or a UNIX socket path."""
    address = port.getHost()
    host = getattr(address, "host", None)
    if host is None:
        name = getattr(address, "name", address)
        return name.decode() if isinstance(name, bytes) else str(name)
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{getattr(address, 'port', '?')}"


def exit_if_any_failed(listeners: list[Listener]) -> None:
    """
    Raise :class:`CannotStart` if a listener has already failed to listen,
    as the endpoints that bind at once (TCP, UNIX, systemd) do.
    """
    failures: list[tuple[Listener, Failure]] = []

    def note(failure: Failure, listener: Listener) -> None:
        # Consumed: each failure is reported below, not as unhandled.
        failures.append((listener, failure))

    for listener in listeners:
        assert listener.listening is not None
        listener.listening.addErrback(note, listener)
    if failures:
        listener, failure = failures[0]
        # The error first: a daemonizing twistd shows only the start of it.
        message = (
            f"steptrack: {failure.getErrorMessage()} "
            f"(listening for {listener.name} on {listener.description})"
        )
        _log.critical(message)
        raise CannotStart(message)


def log_started(ws_port: IListeningPort, rest_port: IListeningPort, how: str) -> None:
    """The start-up lines: where the daemon listens, its version, ``how`` it runs."""
    _log.info(
        "WebSocket updates: listening on {ws_address}",
        ws_address=describe_address(ws_port),
    )
    _log.info(
        "REST totals: listening on {rest_address}",
        rest_address=describe_address(rest_port),
    )
    _log.info("steptrack {version} started; {how}", version=__version__, how=how)


def stop_on_sigterm(reactor: Any, *, sigint: bool = True) -> None:
    """
    Handle SIGTERM here rather than in Twisted: twistd re-raises the signal
    that stopped the reactor once it has shut down, so the process would end
    "killed by SIGTERM" instead of with status 0 after a clean stop.

    With ``sigint``, SIGINT too, as Twisted does (the process then ends by
    the signal, as shells expect), but so that a SIGINT that comes while
    the daemon already stops changes nothing, where Twisted's own handler
    would log a traceback for stopping a stopping reactor.
    """

    def stop(signum: int, frame: object) -> None:
        _log.info("SIGTERM: shutting down")
        reactor.callFromThread(stop_once)

    def stop_once() -> None:
        # A second SIGTERM (systemd's and a supervisor's, say) changes nothing.
        with contextlib.suppress(ReactorNotRunning):
            reactor.stop()

    def interrupt(signum: int, frame: object) -> None:
        # What Twisted's own handler does: twistd re-raises this signal
        # once the reactor has stopped.
        reactor._exitSignal = signum
        reactor.callFromThread(stop_once)

    signal.signal(signal.SIGTERM, stop)
    if sigint:
        signal.signal(signal.SIGINT, interrupt)


class Listener(Service):
    """
    Listens on one endpoint with one factory while running. Unlike
    twisted's own endpoint service it exposes the bound port and lets the
    caller decide what a failure to listen means.
    """

    def __init__(
        self,
        name: str,
        endpoint: IStreamServerEndpoint,
        factory: IProtocolFactory,
        description: str | None = None,
    ) -> None:
        self.name = name
        self.endpoint = endpoint
        self.description = description or repr(endpoint)
        self.factory = factory
        self.port: IListeningPort | None = None
        self.listening: Deferred[IListeningPort] | None = None

    def privilegedStartService(self) -> None:
        # Bind here, before twistd sheds root privileges.
        super().privilegedStartService()
        self.listening = self.endpoint.listen(self.factory)
        self.listening.addCallback(self._listening)

    def _listening(self, port: IListeningPort) -> IListeningPort:
        self.port = port
        return port

    def startService(self) -> None:
        if self.listening is None:
            self.privilegedStartService()
        super().startService()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        listening, self.listening = self.listening, None
        port, self.port = self.port, None
        if port is not None:
            stopping = port.stopListening()
            return stopping if stopping is not None else succeed(None)
        if listening is not None:
            listening.cancel()
            listening.addErrback(lambda failure: None)
        return succeed(None)


class _TrackedChannel(HTTPChannel):
    """An HTTP connection that its site knows about, so it can be closed."""

    factory: _TotalsSite

    def connectionMade(self) -> None:
        super().connectionMade()
        # The WebSocket connections' transports are of the same class, and
        # a burst of HTTP connections at start could otherwise cost each of
        # them a dictionary: see the function's docstring.
        footprint.settle_transport_attributes(self.transport)
        self.factory.channels.add(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        try:
            super().connectionLost(reason)
        finally:
            self.factory.channels.discard(self)
            for waiter in self.factory.channel_waiters.pop(self, []):
                waiter.callback(None)


class _TotalsSite(Site):
    """The REST site, keeping track of its open connections."""

    protocol = _TrackedChannel  # type: ignore[assignment]
    noisy = False

    def logPrefix(self) -> str:
        return "steptrack REST"

    def __init__(self, site: Site) -> None:
        super().__init__(site.resource, requestFactory=site.requestFactory)
        self.displayTracebacks = False
        self.channels: set[_TrackedChannel] = set()
        self.channel_waiters: dict[_TrackedChannel, list[Deferred[None]]] = {}

    def log(self, request: object) -> None:
        """No access log: it costs time on every request."""

    def close_connections(self, reactor: IReactorTime, timeout: float) -> Deferred[Any]:
        """
        Close idle connections now and busy ones once their response is
        written; drop whatever is still open after ``timeout`` seconds.
        """
        waits = []
        for channel in list(self.channels):
            waiter: Deferred[None] = Deferred()
            self.channel_waiters.setdefault(channel, []).append(waiter)
            waits.append(waiter)
            channel.persistent = False
            if not channel.requests and channel.transport is not None:
                channel.transport.loseConnection()
        closed = DeferredList(waits)
        deadline = reactor.callLater(timeout, self._drop_all)
        closed.addBoth(lambda result: deadline.cancel() if deadline.active() else None)
        return closed

    def _drop_all(self) -> None:
        for channel in list(self.channels):
            if channel.transport is not None:
                cast(ITCPTransport, channel.transport).abortConnection()


class SteptrackService(MultiService):
    """
    Both APIs and their store, as one service.

    Children, in start order: the store, the invalid-update counter, the
    WebSocket listener, the REST listener.
    """

    def __init__(
        self,
        reactor: Any,
        ws_endpoint: IStreamServerEndpoint,
        rest_endpoint: IStreamServerEndpoint,
        store: IStepStore,
        limits: ProtocolLimits = ProtocolLimits(),
        *,
        ws_description: str | None = None,
        rest_description: str | None = None,
        as_daemon: bool = False,
        announce: bool = True,
    ) -> None:
        super().__init__()
        self.reactor = reactor
        self.store = store
        self.limits = limits
        self._as_daemon = as_daemon
        self._announce = announce
        store.setServiceParent(self)
        self.rejections = RejectionCounter(reactor)
        self.rejections.setServiceParent(self)
        self.ws_factory = StepUpdateFactory(
            store,
            self.rejections,
            reactor=reactor,
            decoder=UpdateDecoder(limits.max_new_steps),
            max_message_size=limits.max_message_size,
            handshake_timeout=limits.handshake_timeout,
            ping_interval=limits.ping_interval,
            ping_timeout=limits.ping_timeout,
            close_timeout=limits.close_timeout,
            max_batch=limits.max_batch,
        )
        self.rest_site = _TotalsSite(totals_site(store))
        self.rest_site.reactor = reactor
        self.ws_listener = Listener(
            "WebSocket updates", ws_endpoint, self.ws_factory, ws_description
        )
        self.ws_listener.setServiceParent(self)
        self.rest_listener = Listener(
            "REST totals", rest_endpoint, self.rest_site, rest_description
        )
        self.rest_listener.setServiceParent(self)

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        if self._as_daemon:
            exit_if_any_failed([self.ws_listener, self.rest_listener])

    def startService(self) -> None:
        try:
            super().startService()
        except StoreUnusable as e:
            if not self._as_daemon:
                raise
            message = f"steptrack: cannot open the store: {e}"
            _log.critical(message)
            raise CannotStart(message) from None
        if self._as_daemon:
            self.reactor.callWhenRunning(stop_on_sigterm, self.reactor)
        assert self.ws_listener.listening and self.rest_listener.listening
        self.started = gatherResults(
            [self.ws_listener.listening, self.rest_listener.listening],
            consumeErrors=True,
        )
        if self._as_daemon:
            # The start-up lines say the daemon is ready, SIGTERM included:
            # log them once the reactor runs and our handler is in place.
            self.reactor.callWhenRunning(
                self.started.addCallbacks, self._log_started, self._cannot_listen
            )
        elif self._announce:
            self.started.addCallback(self._log_started)

    def _log_started(self, ports: list[IListeningPort]) -> list[IListeningPort]:
        log_started(ports[0], ports[1], f"store {self.store.description}")
        return ports

    def _cannot_listen(self, failure: Failure) -> None:
        # Only an endpoint that binds asynchronously gets here; the usual
        # ones fail in privilegedStartService.
        _log.failure("steptrack cannot listen; stopping", failure)
        self.reactor.stop()

    @inlineCallbacks
    def stopService(self) -> Any:
        # Not MultiService.stopService: that stops every child at once, and
        # the store must be closed last.
        Service.stopService(self)
        timeout = self.limits.close_timeout + 1.0
        yield DeferredList(
            [self.ws_listener.stopService(), self.rest_listener.stopService()]
        )
        yield DeferredList(
            [
                self.ws_factory.close_connections(timeout),
                self.rest_site.close_connections(self.reactor, timeout),
            ]
        )
        yield maybeDeferred(self.rejections.stopService)
        yield self.store.stopService()
        if self._announce:
            _log.info("steptrack stopped")


@dataclass
class RunningServer:
    """A server started by :func:`start_server`."""

    service: SteptrackService
    ws_port: IListeningPort
    rest_port: IListeningPort

    @property
    def ws_address(self) -> Any:
        return self.ws_port.getHost()

    @property
    def rest_address(self) -> Any:
        return self.rest_port.getHost()

    def close(self) -> Deferred[None]:
        """
        Stop listening, close every connection (WebSockets with 1001), then
        close the store. Fires when all of it is done and both ports are
        free to bind again.
        """
        return Deferred.fromCoroutine(self._close())

    async def _close(self) -> None:
        await self.service.stopService()


def start_server(
    reactor: Any,
    ws_endpoint: IStreamServerEndpoint,
    rest_endpoint: IStreamServerEndpoint,
    store: IStepStore,
    limits: ProtocolLimits = ProtocolLimits(),
) -> Deferred[RunningServer]:
    """
    Start both APIs over ``store`` on the given endpoints. Fires with a
    :class:`RunningServer` once both are listening; fails, with nothing
    left running, if either cannot listen.
    """
    service = SteptrackService(reactor, ws_endpoint, rest_endpoint, store, limits)
    service.privilegedStartService()
    service.startService()

    def started(ports: list[IListeningPort]) -> RunningServer:
        return RunningServer(service, ports[0], ports[1])

    def failed(failure: Failure) -> Deferred[Any]:
        if failure.check(FirstError):
            failure = cast(FirstError, failure.value).subFailure
        stopping = service.stopService()
        stopping.addBoth(lambda _: failure)
        return stopping

    return service.started.addCallbacks(started, failed)

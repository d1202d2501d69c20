"""
The real ``twistd --nodaemon steptrack`` process, end to end.

Each test starts the daemon the way an operator does, on ephemeral ports on
127.0.0.1 or ::1, talks to it with real clients, and stops it with SIGTERM.
What is tested here is the process itself: its command line, its log, its
signals and its exit status. What the APIs do with each kind of update or
request is tested in memory and over sockets elsewhere, much faster.
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred, TimeoutError, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import (
    ProcessDone,
    ProcessExitedAlready,
    ProcessTerminated,
)
from twisted.internet.protocol import ProcessProtocol, Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

from steptrackd import __version__
from steptrackd.tap import Options

from .clients import http, open_ws, wait_for_total

reactor: Any = global_reactor

TWISTD = Path(sys.executable).parent / "twistd"
RUN = ("--nodaemon", "--pidfile=", "steptrack")
LOOPBACK = (
    "--ws-listen",
    "tcp:0:interface=127.0.0.1",
    "--rest-listen",
    "tcp:0:interface=127.0.0.1",
)
DUAL_STACK_ENDPOINT = r"tcp6:0:interface=\:\:"
DUAL_STACK = ("--ws-listen", DUAL_STACK_ENDPOINT, "--rest-listen", DUAL_STACK_ENDPOINT)

START_TIMEOUT = 20.0
"""Generous: a start normally takes about a second, but CI machines stall."""
STOP_TIMEOUT = 5.0
"""The contract's bound (section 6) on SIGTERM, and on any prompt exit."""
MAX_SAFE_INTEGER = 2**53 - 1
UNKNOWN_USER = b'{"error": "User doesn\'t exist"}'


@dataclass(frozen=True)
class Exit:
    """How a process ended: an exit status, or the signal that killed it."""

    code: int | None
    signal: int | None


@dataclass(frozen=True)
class Ports:
    """The ports a daemon logged as bound."""

    ws: int
    rest: int


class Daemon(ProcessProtocol):
    """One ``twistd`` process: everything it printed, and how it ended."""

    def __init__(self) -> None:
        self.pid: int | None = None
        self.output = bytearray()
        """stdout and stderr together, in the order they arrived."""
        self.exit: Exit | None = None
        self._exit_waiters: list[Deferred[Exit]] = []

    @property
    def log(self) -> str:
        return self.output.decode("utf-8", "replace")

    def connectionMade(self) -> None:
        assert self.transport is not None
        # Kept: the transport forgets the pid once the process is reaped.
        self.pid = self.transport.pid

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        self.output += data

    def processEnded(self, reason: Failure) -> None:
        # Called once all output is in and the process is reaped.
        status = reason.value
        assert isinstance(status, (ProcessDone, ProcessTerminated)), reason
        self.exit = Exit(status.exitCode, status.signal)
        waiters, self._exit_waiters = self._exit_waiters, []
        for waiter in waiters:
            if not waiter.called:
                waiter.callback(self.exit)

    def exited(self, timeout: float) -> Deferred[Exit]:
        """
        Fires with how the process ended, or fails with ``TimeoutError`` if it
        is still running after ``timeout`` seconds.
        """
        if self.exit is not None:
            return succeed(self.exit)
        waiter: Deferred[Exit] = Deferred()
        self._exit_waiters.append(waiter)
        return waiter.addTimeout(timeout, reactor)

    def send_signal(self, name: str) -> None:
        """Send signal ``name`` ("TERM", "KILL") to this process, by its pid."""
        if self.exit is not None:
            return
        assert self.transport is not None
        with contextlib.suppress(ProcessExitedAlready):
            self.transport.signalProcess(name)

    async def stop(self) -> Exit:
        """SIGTERM, then how the process ended; fails if it takes over 5 s."""
        self.send_signal("TERM")
        try:
            return await self.exited(STOP_TIMEOUT)
        except TimeoutError:
            raise AssertionError(
                f"still running {STOP_TIMEOUT} s after SIGTERM; output:\n{self.log}"
            ) from None

    async def wait_for_line(
        self, pattern: str, timeout: float = START_TIMEOUT
    ) -> re.Match[str]:
        """Poll the output until a line matches ``pattern``; fail at the deadline."""
        deadline = reactor.seconds() + timeout
        while True:
            match = re.search(pattern, self.log, re.MULTILINE)
            if match is not None:
                return match
            if self.exit is not None or reactor.seconds() > deadline:
                state = self.exit or "still running"
                raise AssertionError(
                    f"no line matches {pattern!r} ({state}); output:\n{self.log}"
                )
            await deferLater(reactor, 0.02, lambda: None)

    async def listening(self) -> Ports:
        """The ports from the start-up log, once the daemon says it started."""
        ws = await self.wait_for_line(r"WebSocket updates: listening on \S+:(\d+)$")
        rest = await self.wait_for_line(r"REST totals: listening on \S+:(\d+)$")
        await self.wait_for_line(r"steptrack \S+ started; store ")
        return Ports(int(ws[1]), int(rest[1]))


class Daemons:
    """Starts ``twistd`` processes, and makes sure none outlives its fixture."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._spawned: list[Daemon] = []

    def spawn(self, *arguments: str) -> Daemon:
        """Run ``twistd`` with ``arguments`` (after ``twistd`` itself)."""
        daemon = Daemon()
        reactor.spawnProcess(
            daemon,
            str(TWISTD),
            [str(TWISTD), *arguments],
            env=dict(os.environ),
            # Anything twistd might write by default lands here, not in the repo.
            path=str(self._directory),
        )
        self._spawned.append(daemon)
        return daemon

    async def start(self, *options: str) -> tuple[Daemon, Ports]:
        """Run ``twistd -n steptrack`` with ``options``; wait until it listens."""
        daemon = self.spawn(*RUN, *options)
        return daemon, await daemon.listening()

    async def stop_all(self) -> None:
        """Stop what still runs: SIGTERM, then SIGKILL as the last resort."""
        errors: list[Exception] = []
        for daemon in self._spawned:
            # One daemon that cannot be stopped must not spare the others.
            try:
                await self._stop_or_kill(daemon)
            except Exception as e:
                errors.append(e)
        if errors:
            raise errors[0]

    @staticmethod
    async def _stop_or_kill(daemon: Daemon) -> None:
        if daemon.exit is not None:
            return
        daemon.send_signal("TERM")
        try:
            await daemon.exited(STOP_TIMEOUT)
        except TimeoutError:
            daemon.send_signal("KILL")
            await daemon.exited(STOP_TIMEOUT)


@dataclass(frozen=True)
class Running:
    """A daemon that has logged its ports."""

    daemon: Daemon
    ports: Ports


@pytest_twisted.async_yield_fixture(scope="module")
async def dual_stack(
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Running]:
    """
    One daemon on ``tcp6:0:interface=\\:\\:`` for the tests that only read
    its log or connect to it, each with usernames of its own.
    """
    running = Daemons(tmp_path_factory.mktemp("dual-stack"))
    try:
        daemon, ports = await running.start(*DUAL_STACK)
        yield Running(daemon, ports)
    finally:
        await running.stop_all()


def assert_no_traceback(log: str) -> None:
    assert "Traceback" not in log, log
    assert "unhandled error" not in log.lower(), log


@pytest_twisted.ensureDeferred
async def test_updates_become_totals_and_sigterm_stops_cleanly(
    daemons: Daemons,
) -> None:
    """Updates become exact totals; SIGTERM then closes with 1001 and exits 0."""
    daemon, ports = await daemons.start(*LOOPBACK)
    phone = await open_ws(reactor, "127.0.0.1", ports.ws)
    watch = await open_ws(reactor, "127.0.0.1", ports.ws)
    first = {
        "update_id": "u-1",
        "username": "luisa",
        "ts": 1_666_960_429_981,
        "newSteps": 108,
    }
    phone.send_update(first)
    # The same update_id for another user is another update.
    watch.send_update(
        {
            "update_id": "u-1",
            "username": "marco",
            "ts": 1_666_960_400_000,
            "newSteps": 40,
        },
        binary=True,
    )
    phone.sendMessage(b'{"username": "luisa", "ts": 1, "newSteps": ', isBinary=False)
    phone.send_update(first, binary=True)  # a resend: ignored
    phone.send_update(  # late: adds its steps, leaves ts alone
        {
            "update_id": "u-2",
            "username": "luisa",
            "ts": 1_666_960_000_000,
            "newSteps": 12,
        }
    )
    watch.send_update(
        {"username": "marco", "ts": 1_666_960_500_000, "newSteps": 2.0}, binary=True
    )
    phone.send_update({"username": "zoë", "ts": 1_666_960_429_982, "newSteps": 1})
    await phone.barrier()
    await watch.barrier()

    rest = ("127.0.0.1", ports.rest)
    expected = {
        "luisa": {"cumulativeSteps": 120, "ts": 1_666_960_429_981},
        "marco": {"cumulativeSteps": 42, "ts": 1_666_960_500_000},
        "zoë": {"cumulativeSteps": 1, "ts": 1_666_960_429_982},
    }
    for username, total in expected.items():
        await wait_for_total(reactor, *rest, username, total)
    unknown = await http("GET", *rest, "/users/nobody/steps", reactor=reactor)
    assert (unknown.status, unknown.body) == (404, UNKNOWN_USER)
    assert not phone.closed.called, "the invalid update closed the connection"

    exit = await daemon.stop()
    closes = [await phone.closed, await watch.closed]
    assert [closed.code for closed in closes] == [1001, 1001]
    assert_no_traceback(daemon.log)
    assert "steptrack stopped" in daemon.log
    assert exit == Exit(code=0, signal=None), daemon.log


@pytest_twisted.ensureDeferred
async def test_dual_stack_answers_on_ipv4_and_ipv6(dual_stack: Running) -> None:
    """Listening on tcp6 ``::``, both APIs answer on 127.0.0.1 and on ::1."""
    hosts = ("127.0.0.1", "::1")
    for host in hosts:
        client = await open_ws(reactor, host, dual_stack.ports.ws)
        client.send_update({"username": f"sent via {host}", "ts": 7, "newSteps": 3})
        await client.barrier()
        client.sendClose(1000)
        assert (await client.closed).code == 1000
    for rest_host in hosts:
        for ws_host in hosts:
            await wait_for_total(
                reactor,
                rest_host,
                dual_stack.ports.rest,
                f"sent via {ws_host}",
                {"cumulativeSteps": 3, "ts": 7},
            )


@pytest_twisted.ensureDeferred
async def test_start_up_log_names_bound_ports_version_and_store(
    dual_stack: Running,
) -> None:
    """The start-up log shows each bound port, the version and the store, once."""
    ws_port, rest_port = dual_stack.ports.ws, dual_stack.ports.rest
    lines = dual_stack.daemon.log.splitlines()

    def only_line(fragment: str) -> str:
        found = [line for line in lines if fragment in line]
        assert len(found) == 1, (fragment, lines)
        return found[0]

    ws_line = only_line("WebSocket updates: listening on")
    assert ws_line.endswith(f"WebSocket updates: listening on [::]:{ws_port}")
    rest_line = only_line("REST totals: listening on")
    assert rest_line.endswith(f"REST totals: listening on [::]:{rest_port}")
    started = only_line(" started; store ")
    assert f"steptrack {__version__} started; store sqlite:steptrack.sqlite3" in started
    assert 0 not in (ws_port, rest_port) and ws_port != rest_port
    # The logged ports are the bound ones: each answers its own protocol.
    answer = await http(
        "GET", "127.0.0.1", rest_port, "/users/x/steps", reactor=reactor
    )
    assert (answer.status, answer.body) == (404, UNKNOWN_USER)
    client = await open_ws(reactor, "::1", ws_port)
    client.sendClose(1000)
    await client.closed


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("taken", ["websocket", "rest", "both"])
async def test_port_in_use_exits_at_once_with_a_clear_message(
    dual_stack: Running, daemons: Daemons, taken: str
) -> None:
    """On a port already held, it exits non-zero at once, naming the endpoint."""
    held_ws = rf"tcp6:{dual_stack.ports.ws}:interface=\:\:"
    # IPv4 on the port of a dual-stack listener clashes too.
    held_rest = f"tcp:{dual_stack.ports.rest}:interface=127.0.0.1"
    held = {"websocket": [held_ws], "rest": [held_rest], "both": [held_ws, held_rest]}
    ws_listen = held_ws if held_ws in held[taken] else LOOPBACK[1]
    rest_listen = held_rest if held_rest in held[taken] else LOOPBACK[3]

    daemon = daemons.spawn(*RUN, "--ws-listen", ws_listen, "--rest-listen", rest_listen)
    try:
        exit = await daemon.exited(STOP_TIMEOUT)
    except TimeoutError:
        raise AssertionError(f"still running; output:\n{daemon.log}") from None

    assert exit.signal is None and exit.code not in (0, None), (exit, daemon.log)
    messages = [line for line in daemon.log.splitlines() if "already in use" in line]
    assert any(endpoint in line for line in messages for endpoint in held[taken]), (
        f"no line names the endpoint ({held[taken]}) and the error:\n{daemon.log}"
    )
    assert " object at 0x" not in daemon.log, daemon.log
    assert_no_traceback(daemon.log)


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--max-message-size", "0"),
        ("--max-message-size", "abc"),
        ("--max-new-steps", "-5"),
        ("--dedupe-retention", "-1"),
        ("--dedupe-retention", "0"),
        ("--handshake-timeout", "0"),
        ("--ping-interval", "soon"),
        ("--ws-listen", "nonsense:1"),
        ("--rest-listen", "tcp:notaport"),
        ("--store", "bogus:"),
    ],
)
async def test_bad_option_value_is_a_usage_error(
    daemons: Daemons, option: str, value: str
) -> None:
    """A bad option value exits non-zero with a usage error naming the option."""
    daemon = daemons.spawn(*RUN, *LOOPBACK, option, value)
    exit = await daemon.exited(START_TIMEOUT)
    assert exit.signal is None and exit.code not in (0, None), (exit, daemon.log)
    assert "Usage:" in daemon.log
    # The usage text lists every option; the error is the last line.
    error = daemon.log.strip().splitlines()[-1]
    assert option.lstrip("-") in error, error
    assert value in error, error
    assert "listening on" not in daemon.log
    assert_no_traceback(daemon.log)


def _help_entries(text: str) -> dict[str, str]:
    """``name`` -> the help of ``--name``, on one line, from twistd's usage text."""
    entries: dict[str, list[str]] = {}
    name: str | None = None
    for line in text.splitlines():
        option = re.match(r"\s+--([\w-]+)=?(?:\s+(.*))?$", line)
        if option is not None:
            name = option[1]
            entries[name] = [option[2] or ""]
        elif name is not None and line.startswith(" ") and line.strip():
            entries[name].append(line.strip())
        else:
            name = None
    return {name: " ".join(words) for name, words in entries.items()}


@pytest_twisted.ensureDeferred
async def test_help_lists_every_option_with_its_default(daemons: Daemons) -> None:
    """``twistd steptrack --help`` exits 0 and gives every option its default."""
    daemon = daemons.spawn("steptrack", "--help")
    exit = await daemon.exited(START_TIMEOUT)
    assert exit == Exit(code=0, signal=None), daemon.log
    entries = _help_entries(daemon.log)
    parameters: list[list[Any]] = Options.optParameters  # type: ignore[assignment]
    for name, _, default, *_ in parameters:
        assert name in entries, (name, daemon.log)
        assert f"[default: {default}]" in entries[name], (name, entries[name])
    contract_defaults = {
        "ws-listen": r"tcp6:8081:interface=\:\:",
        "rest-listen": r"tcp6:8080:interface=\:\:",
        "store": "sqlite:steptrack.sqlite3",
        "max-message-size": str(64 * 1024),
    }
    for name, default in contract_defaults.items():
        assert f"[default: {default}]" in entries[name], (name, entries[name])
    assert_no_traceback(daemon.log)


@pytest_twisted.ensureDeferred
async def test_sigterm_with_no_client_exits_0_quickly(daemons: Daemons) -> None:
    """SIGTERM with nothing connected exits 0 within 5 s, saying it stopped."""
    daemon, _ = await daemons.start(*LOOPBACK)
    exit = await daemon.stop()
    assert_no_traceback(daemon.log)
    assert "steptrack stopped" in daemon.log
    assert exit == Exit(code=0, signal=None), daemon.log


class _RawConnection(Protocol):
    """A TCP client that records what it receives and when it is closed."""

    def __init__(self) -> None:
        self.received = b""
        self.lost: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost.callback(None)


@pytest_twisted.ensureDeferred
async def test_sigterm_with_http_keepalive_open_exits_0_quickly(
    daemons: Daemons,
) -> None:
    """SIGTERM with an idle HTTP keep-alive connection open still exits 0 in 5 s."""
    daemon, ports = await daemons.start(*LOOPBACK)
    connection = _RawConnection()
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", ports.rest)
    await connectProtocol(endpoint, connection)
    assert connection.transport is not None
    connection.transport.write(
        b"GET /users/nobody/steps HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    )
    deadline = reactor.seconds() + START_TIMEOUT
    # The end of a chunked response: the whole answer is in.
    while not connection.received.endswith(b"\r\n0\r\n\r\n"):
        assert reactor.seconds() < deadline, connection.received
        await deferLater(reactor, 0.01, lambda: None)
    assert not connection.lost.called, "the server closed a keep-alive connection"

    exit = await daemon.stop()
    await connection.lost
    assert_no_traceback(daemon.log)
    assert "steptrack stopped" in daemon.log
    assert exit == Exit(code=0, signal=None), daemon.log


@pytest_twisted.ensureDeferred
async def test_invalid_updates_are_summarised_in_the_log(daemons: Daemons) -> None:
    """Invalid updates are counted by reason and logged as one warning summary."""
    # A per-update maximum of 2^53 - 1 lets two updates overflow a total.
    daemon, ports = await daemons.start(
        *LOOPBACK, "--max-new-steps", str(MAX_SAFE_INTEGER)
    )
    client = await open_ws(reactor, "127.0.0.1", ports.ws)
    client.sendMessage(b"{not json", isBinary=False)
    client.sendMessage(b"\xff\xfe not UTF-8", isBinary=True)
    client.sendMessage(b"[1, 2]", isBinary=False)
    client.send_update({"username": "", "ts": 1, "newSteps": 1})
    client.send_update({"username": "ana", "ts": -1, "newSteps": 1})
    client.send_update({"username": "ana", "ts": True, "newSteps": 1})
    client.send_update({"username": "ana", "ts": 1, "newSteps": 1.5})
    client.send_update({"username": "ana", "ts": 1, "newSteps": 1, "update_id": ""})
    client.send_update({"username": "big", "ts": 1, "newSteps": MAX_SAFE_INTEGER})
    client.send_update({"username": "big", "ts": 2, "newSteps": 1})  # overflows
    await client.barrier()
    await wait_for_total(
        reactor,
        "127.0.0.1",
        ports.rest,
        "big",
        {"cumulativeSteps": MAX_SAFE_INTEGER, "ts": 1},
    )
    # The summary is due every 10 s; stopping logs the pending one at once.
    await daemon.stop()

    summaries = [line for line in daemon.log.splitlines() if "Ignored " in line]
    assert summaries, daemon.log
    # Normally one line; two if a periodic summary fell inside the test.
    count = 0
    by_reason: dict[str, int] = {}
    for line in summaries:
        assert "#warn]" in line, line
        match = re.search(r"Ignored (\d+) invalid update\(s\)", line)
        assert match is not None, line
        count += int(match[1])
        for reason, n in re.findall(r"([a-z_]+) x(\d+) \(e\.g\. ", line):
            by_reason[reason] = by_reason.get(reason, 0) + int(n)
    assert count == 9, summaries
    assert by_reason == {
        "not_json": 2,
        "not_an_object": 1,
        "bad_username": 1,
        "bad_ts": 2,
        "bad_new_steps": 1,
        "bad_update_id": 1,
        "total_overflow": 1,
    }, summaries


@pytest_twisted.ensureDeferred
async def test_default_store_keeps_totals_across_a_restart(
    daemons: Daemons, tmp_path: Path
) -> None:
    """With no --store, totals and remembered ids survive SIGTERM and a restart."""
    daemon, ports = await daemons.start(*LOOPBACK)
    client = await open_ws(reactor, "127.0.0.1", ports.ws)
    client.send_update({"username": "kept", "ts": 5, "newSteps": 7, "update_id": "k1"})
    expected = {"cumulativeSteps": 7, "ts": 5}
    await wait_for_total(reactor, "127.0.0.1", ports.rest, "kept", expected)
    assert await daemon.stop() == Exit(code=0, signal=None), daemon.log
    assert (tmp_path / "steptrack.sqlite3").exists()

    again, ports = await daemons.start(*LOOPBACK)
    result = await http("GET", "127.0.0.1", ports.rest, "/users/kept/steps")
    assert result.json() == expected
    client = await open_ws(reactor, "127.0.0.1", ports.ws)
    client.send_update({"username": "kept", "ts": 9, "newSteps": 7, "update_id": "k1"})
    client.send_update({"username": "kept", "ts": 1, "newSteps": 1})
    await wait_for_total(
        reactor, "127.0.0.1", ports.rest, "kept", {"cumulativeSteps": 8, "ts": 5}
    )
    assert await again.stop() == Exit(code=0, signal=None), again.log


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    ("store", "message"),
    [
        ("sqlite:{tmp}/missing/steps.sqlite3", "directory does not exist"),
        ("sqlite:{tmp}/garbage.sqlite3", "cannot use"),
        ("sqlite:{tmp}/foreign.sqlite3", "not a steptrack database"),
    ],
)
async def test_unusable_database_stops_the_start(
    daemons: Daemons, tmp_path: Path, store: str, message: str
) -> None:
    """An unusable database: exit 1 at once, with a clear line, no traceback."""
    (tmp_path / "garbage.sqlite3").write_bytes(b"not a database" * 200)
    foreign = sqlite3.connect(tmp_path / "foreign.sqlite3")
    foreign.execute("CREATE TABLE other (x)")
    foreign.close()
    daemon = daemons.spawn(*RUN, *LOOPBACK, "--store", store.format(tmp=tmp_path))
    exit = await daemon.exited(STOP_TIMEOUT)
    assert exit == Exit(code=1, signal=None), daemon.log
    lines = [line for line in daemon.log.splitlines() if message in line]
    assert lines and str(tmp_path) in lines[0], daemon.log
    assert_no_traceback(daemon.log)

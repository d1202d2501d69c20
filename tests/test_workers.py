"""
The real daemon with several worker processes.

Each test runs ``twistd -n steptrack --workers 2`` on a SQLite file and
finds out, from ``/proc``, which worker process serves each of its
connections, so that what it checks across workers really crosses them.
The kernel decides which worker accepts a connection; to have one on each
worker, a test stops the other workers for the moment it connects. Linux
only, as the daemon's supervisor is.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sqlite3
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import TypeVar, cast

import pytest_twisted
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import ITransport
from twisted.internet.task import deferLater

from steptrackd.supervisor import Supervisor

from .clients import RawClient, RecordingClient, open_ws, raw_connect, wait_for_total
from .test_e2e import (
    LOOPBACK,
    START_TIMEOUT,
    STOP_TIMEOUT,
    Daemon,
    Daemons,
    Exit,
    Ports,
    assert_no_traceback,
    reactor,
)

WORKERS = ("--workers", "2")
HANG_TIMEOUT = Supervisor.hang_timeout

Client = TypeVar("Client")


def worker_pids(daemon: Daemon) -> list[int]:
    """The workers' pids, from the parent's start-up line."""
    match = re.search(r"\d+ workers \(pids ([\d, ]+)\)", daemon.log)
    assert match is not None, daemon.log
    return [int(pid) for pid in match[1].split(", ")]


def serving_pid(server_port: int, client_port: int, pids: Iterable[int]) -> int | None:
    """
    Which of ``pids`` holds the server end of the TCP connection from
    ``client_port`` to ``server_port`` on this machine, if any.
    """
    sockets = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, remote, inode = fields[1], fields[2], fields[9]
            if (
                int(local.rsplit(":", 1)[1], 16) == server_port
                and int(remote.rsplit(":", 1)[1], 16) == client_port
            ):
                sockets.add(f"socket:[{inode}]")
    for pid in pids:
        try:
            descriptors = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for descriptor in descriptors:
            try:
                if os.readlink(f"/proc/{pid}/fd/{descriptor}") in sockets:
                    return pid
            except OSError:
                continue
    return None


def local_port(transport: object) -> int:
    """The local TCP port of a client's transport."""
    address = cast(ITransport, transport).getHost()
    assert isinstance(address, (IPv4Address, IPv6Address)), address
    return address.port


def running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def one_per_worker(
    pids: list[int],
    server_port: int,
    connect: Callable[[], Awaitable[tuple[Client, int]]],
) -> dict[int, Client]:
    """
    Connect with ``connect`` (which returns the client and its local port,
    once the server has answered it) once for each worker in ``pids``. The
    kernel hands a new connection to whichever worker takes it first, and
    an idle machine may favour one: so while each connection is made, every
    other worker is stopped (SIGSTOP) for that moment, and the one left
    running must be the one that serves it.
    """
    found: dict[int, Client] = {}
    for pid in pids:
        others = [other for other in pids if other != pid]
        for other in others:
            os.kill(other, signal.SIGSTOP)
        try:
            client, client_port = await connect()
        finally:
            for other in others:
                os.kill(other, signal.SIGCONT)
        assert serving_pid(server_port, client_port, pids) == pid, (pid, pids)
        found[pid] = client
    return found


async def ws_per_worker(pids: list[int], ports: Ports) -> dict[int, RecordingClient]:
    async def connect() -> tuple[RecordingClient, int]:
        client = await open_ws(reactor, "127.0.0.1", ports.ws)
        assert client.transport is not None
        return client, local_port(client.transport)

    return await one_per_worker(pids, ports.ws, connect)


def complete_response(data: bytes) -> tuple[int, bytes] | None:
    """Status and body of the HTTP/1.1 response in ``data``, once it is whole."""
    head, separator, body = data.partition(b"\r\n\r\n")
    if not separator:
        return None
    status = int(head.split()[1])
    length = re.search(rb"(?im)^content-length: *(\d+)\r?$", head)
    if length is not None:
        size = int(length[1])
        return (status, body[:size]) if len(body) >= size else None
    # Chunked: size lines and chunks, up to the empty last chunk.
    content = b""
    while True:
        size_line, found, body = body.partition(b"\r\n")
        if not found:
            return None
        size = int(size_line.split(b";")[0], 16)
        if len(body) < size + 2:
            return None
        if size == 0:
            return status, content
        content, body = content + body[:size], body[size + 2 :]


class KeepAlive:
    """One keep-alive HTTP/1.1 connection, so it stays with one worker."""

    def __init__(self, client: RawClient) -> None:
        self.client = client

    async def get(self, path: str) -> tuple[int, bytes]:
        self.client.data = b""
        self.client.send(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode("ascii")
        )
        deadline = reactor.seconds() + START_TIMEOUT
        while True:
            response = complete_response(self.client.data)
            if response is not None:
                return response
            assert reactor.seconds() < deadline, self.client.data
            assert not self.client.lost.called, "the server closed the connection"
            await deferLater(reactor, 0.005, lambda: None)

    async def wait_for(self, path: str, expected: object) -> None:
        """Poll ``path`` on this connection until it answers ``expected``."""
        deadline = reactor.seconds() + START_TIMEOUT
        while True:
            status, body = await self.get(path)
            if status == 200 and json.loads(body) == expected:
                return
            assert reactor.seconds() < deadline, (status, body)
            await deferLater(reactor, 0.005, lambda: None)


async def rest_per_worker(pids: list[int], ports: Ports) -> dict[int, KeepAlive]:
    async def connect() -> tuple[KeepAlive, int]:
        connection = KeepAlive(await raw_connect(reactor, ports.rest))
        # Answered, so accepted: a worker holds it now.
        await connection.get("/users/nobody/steps")
        transport = connection.client.transport
        assert transport is not None
        return connection, local_port(transport)

    return await one_per_worker(pids, ports.rest, connect)


async def wait_until_gone(pids: Iterable[int], timeout: float) -> None:
    deadline = reactor.seconds() + timeout
    while any(running(pid) for pid in pids):
        assert reactor.seconds() < deadline, [p for p in pids if running(p)]
        await deferLater(reactor, 0.02, lambda: None)


async def two_workers(
    daemons: Daemons,
) -> tuple[Daemon, Ports, list[int], dict[int, RecordingClient]]:
    """A daemon with two workers, their pids, and a device on each."""
    daemon, ports = await daemons.start(*LOOPBACK, *WORKERS)
    pids = worker_pids(daemon)
    return daemon, ports, pids, await ws_per_worker(pids, ports)


async def new_worker(
    daemon: Daemon, known: list[int], timeout: float = START_TIMEOUT
) -> int:
    """The pid of the first worker that started serving and is not in ``known``."""
    deadline = reactor.seconds() + timeout
    while True:
        for match in re.finditer(r"Worker \d+ \(pid (\d+)\) serving", daemon.log):
            if int(match[1]) not in known:
                return int(match[1])
        assert reactor.seconds() < deadline, daemon.log
        await deferLater(reactor, 0.02, lambda: None)


async def counts_then_stops(
    daemon: Daemon, ports: Ports, device: RecordingClient, workers: list[int]
) -> None:
    """
    An update sent by ``device`` still becomes a total; then SIGTERM stops
    the daemon with status 0 and none of ``workers`` outlives it.
    """
    username = f"counted-after-{local_port(device.transport)}"
    device.send_update(update(username, "1", 6, 7))
    await device.barrier()
    await wait_for_total(
        reactor, "127.0.0.1", ports.rest, username, {"cumulativeSteps": 6, "ts": 7}
    )
    assert (await daemon.stop()) == Exit(code=0, signal=None), daemon.log
    await wait_until_gone(workers, STOP_TIMEOUT)


def update(username: str, update_id: str, steps: int, ts: int) -> dict[str, object]:
    return {"update_id": update_id, "username": username, "ts": ts, "newSteps": steps}


@pytest_twisted.ensureDeferred
async def test_an_update_sent_through_every_worker_counts_once(
    daemons: Daemons, tmp_path: Path
) -> None:
    """The same update ids through every worker at once: each counted once."""
    database = tmp_path / "steps.sqlite3"
    daemon, ports = await daemons.start(
        *LOOPBACK, *WORKERS, "--store", f"sqlite:{database}"
    )
    pids = worker_pids(daemon)
    assert len(pids) == 2 and all(running(pid) for pid in pids)
    devices = await ws_per_worker(pids, ports)
    readers = await rest_per_worker(pids, ports)

    # Every worker gets all 200 updates, in a different order.
    updates = [update(f"u{i % 5}", f"id-{i}", i + 1, 1000 + i) for i in range(200)]
    for turn, device in enumerate(devices.values()):
        for sent in updates if turn % 2 == 0 else updates[::-1]:
            device.send_update(sent)
    for device in devices.values():
        await device.barrier()

    expected = {}
    for user in range(5):
        mine = [u for u in updates if u["username"] == f"u{user}"]
        expected[f"u{user}"] = {
            "cumulativeSteps": sum(int(str(u["newSteps"])) for u in mine),
            "ts": max(int(str(u["ts"])) for u in mine),
        }
    for username, total in expected.items():
        for reader in readers.values():
            await reader.wait_for(f"/users/{username}/steps", total)
    exit = await daemon.stop()
    assert exit == Exit(code=0, signal=None), daemon.log
    assert_no_traceback(daemon.log)
    # What every worker showed is what the database holds.
    with contextlib.closing(sqlite3.connect(database)) as db:
        stored = {
            username: {"cumulativeSteps": steps, "ts": ts}
            for username, steps, ts in db.execute(
                "SELECT username, steps, ts FROM totals"
            )
        }
    assert stored == expected


@pytest_twisted.ensureDeferred
async def test_a_total_is_read_alike_through_every_worker(daemons: Daemons) -> None:
    """Updates sent to one worker are read through every worker's REST API."""
    daemon, ports, pids, devices = await two_workers(daemons)
    readers = await rest_per_worker(pids, ports)

    for pid, device in devices.items():
        device.send_update(update(f"sent-to-{pid}", "a", 7, 42))
        device.send_update(update(f"sent-to-{pid}", "b", 5, 41))
        await device.barrier()
    for sender in devices:
        for reader in readers.values():
            await reader.wait_for(
                f"/users/sent-to-{sender}/steps",
                {"cumulativeSteps": 12, "ts": 42},
            )
    await daemon.stop()
    assert_no_traceback(daemon.log)


@pytest_twisted.ensureDeferred
async def test_sigterm_closes_every_workers_connections_and_exits_0(
    daemons: Daemons,
) -> None:
    """SIGTERM: each worker closes its devices with 1001; all exit, status 0."""
    daemon, ports, pids, devices = await two_workers(daemons)
    readers = await rest_per_worker(pids, ports)

    exit = await daemon.stop()

    assert exit == Exit(code=0, signal=None), daemon.log
    assert [(await d.closed).code for d in devices.values()] == [1001] * len(pids)
    for reader in readers.values():
        await reader.client.lost
    await wait_until_gone(pids, STOP_TIMEOUT)
    assert_no_traceback(daemon.log)
    assert daemon.log.count("steptrack stopped") == 1, daemon.log


@pytest_twisted.ensureDeferred
async def test_workers_end_when_the_parent_is_killed(daemons: Daemons) -> None:
    """After SIGKILL of the parent no worker lives on, and nothing is lost."""
    daemon, ports, pids, devices = await two_workers(daemons)
    for pid, device in devices.items():
        device.send_update(update(f"kept-by-{pid}", "x", 3, 9))
        await device.barrier()
    for pid in pids:
        await wait_for_total(
            reactor,
            "127.0.0.1",
            ports.rest,
            f"kept-by-{pid}",
            {"cumulativeSteps": 3, "ts": 9},
        )

    daemon.send_signal("KILL")
    assert (await daemon.exited(STOP_TIMEOUT)).signal == signal.SIGKILL
    await wait_until_gone(pids, STOP_TIMEOUT)
    assert [(await d.closed).code for d in devices.values()] == [1001] * len(pids)

    # The database is free again, and holds everything.
    again, ports = await daemons.start(*LOOPBACK, *WORKERS)
    for pid in pids:
        await wait_for_total(
            reactor,
            "127.0.0.1",
            ports.rest,
            f"kept-by-{pid}",
            {"cumulativeSteps": 3, "ts": 9},
        )
    assert (await again.stop()) == Exit(code=0, signal=None), again.log


@pytest_twisted.ensureDeferred
async def test_a_worker_that_dies_is_replaced(daemons: Daemons) -> None:
    """A worker killed by a signal is logged and replaced; the daemon serves on."""
    daemon, ports, pids, devices = await two_workers(daemons)
    victim, survivor = pids
    os.kill(victim, signal.SIGKILL)

    replacement = await new_worker(daemon, pids)
    assert re.search(rf"pid {victim}\) ended unexpectedly", daemon.log), daemon.log
    assert not devices[survivor].closed.called, "the other worker's device was cut"

    now = [survivor, replacement]
    fresh = await ws_per_worker(now, ports)
    await counts_then_stops(daemon, ports, fresh[replacement], now)


@pytest_twisted.ensureDeferred
async def test_one_worker_is_one_process(daemons: Daemons) -> None:
    """``--workers 1`` runs everything in the twistd process itself."""
    daemon, ports = await daemons.start(*LOOPBACK, "--workers", "1")
    assert " workers (pids " not in daemon.log
    device = await open_ws(reactor, "127.0.0.1", ports.ws)
    assert device.transport is not None
    assert daemon.pid is not None
    server_pid = serving_pid(ports.ws, local_port(device.transport), [daemon.pid])
    assert server_pid == daemon.pid
    assert (await daemon.stop()) == Exit(code=0, signal=None), daemon.log


@pytest_twisted.ensureDeferred
async def test_a_stopped_worker_is_killed_and_replaced(daemons: Daemons) -> None:
    """A worker that stops answering (SIGSTOP) is killed, so others can write."""
    daemon, ports, pids, devices = await two_workers(daemons)
    stopped, survivor = pids
    os.kill(stopped, signal.SIGSTOP)
    try:
        replacement = await new_worker(daemon, pids, timeout=HANG_TIMEOUT + 10)
    finally:
        if running(stopped):
            os.kill(stopped, signal.SIGCONT)
    assert re.search(rf"pid {stopped}\) has not answered for", daemon.log), daemon.log

    await counts_then_stops(daemon, ports, devices[survivor], [survivor, replacement])
    assert_no_traceback(daemon.log)


@pytest_twisted.ensureDeferred
async def test_sigint_while_stopping_is_quiet(daemons: Daemons) -> None:
    """SIGTERM then SIGINT (Ctrl-C) at once: one clean stop, no traceback."""
    daemon, _, pids, devices = await two_workers(daemons)
    daemon.send_signal("TERM")
    daemon.send_signal("INT")
    exit = await daemon.exited(STOP_TIMEOUT)
    assert exit in (Exit(0, None), Exit(None, signal.SIGINT)), daemon.log
    assert [(await d.closed).code for d in devices.values()] == [1001] * len(pids)
    await wait_until_gone(pids, STOP_TIMEOUT)
    assert_no_traceback(daemon.log)
    assert daemon.log.count("steptrack stopped") == 1, daemon.log

"""
Reads of totals answered directly, without Klein's routing, against the
same reads answered through Klein: the same requests to two sites over one
store, one with direct reads on and one with them off, must get the same
bytes back, on in-memory connections and over real sockets. Klein's own
render method is watched, to show which way each request went.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any
from urllib.parse import quote

import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from klein.resource import KleinResource
from twisted.internet import reactor as global_reactor
from twisted.internet.address import UNIXAddress
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, capturedLogs
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.server import Site

from steptrackd import rest
from steptrackd.server import RunningServer, start_server
from steptrackd.store import MemoryStore, Total
from steptrackd.update import Update

from .clients import raw_connect
from .test_rest import (
    CLIENT_ADDRESS,
    SERVER_ADDRESS,
    FailingStore,
    RaisingStore,
    exchange,
    memory_site,
)
from .test_store import result_of

reactor: Any = global_reactor

TIMEOUT = 5.0
"""Seconds any one exchange over a socket may take before the test fails."""

USERS = ["luisa", "a/b", "/", "//x//", "with space", "é😀", "100%", "steps"]


@pytest.fixture(autouse=True)
def one_date(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    Both ways format the Date header with Twisted's ``datetimeToString``,
    which reads the time through ``gmtime``: make that say one time always,
    so that answers compare byte for byte even across a second's edge.
    """
    frozen = time.gmtime(1666960429)
    monkeypatch.setattr(http, "gmtime", lambda *seconds: frozen)
    monkeypatch.setattr(rest, "_http_date", rest._HTTPDate())


class KleinRenders:
    """How many requests Klein's resource has rendered."""

    def __init__(self) -> None:
        self.count = 0


@pytest.fixture
def klein_renders(monkeypatch: pytest.MonkeyPatch) -> KleinRenders:
    """Counts every request Klein's resource renders during the test."""
    renders = KleinRenders()
    render = KleinResource.render

    def counting(self: KleinResource, request: Any) -> Any:
        renders.count += 1
        return render(self, request)

    monkeypatch.setattr(KleinResource, "render", counting)
    return renders


def store_with(users: list[str]) -> MemoryStore:
    store = MemoryStore(Clock())
    store.startService()
    result_of(
        store.apply(
            [Update(name, 1666960429981 + n, 10 + n) for n, name in enumerate(users)]
        )
    )
    return store


@pytest.fixture
def store() -> Iterator[MemoryStore]:
    store = store_with(USERS)
    yield store
    result_of(store.close())


def request(
    method: bytes,
    target: bytes,
    host: bytes | None = b"localhost:8080",
    extra: bytes = b"",
) -> bytes:
    host_line = b"" if host is None else b"Host: " + host + b"\r\n"
    return method + b" " + target + b" HTTP/1.1\r\n" + host_line + extra + b"\r\n"


def users_path(username: str) -> bytes:
    return b"/users/" + quote(username, safe="").encode("ascii") + b"/steps"


# Requests that read a total: answered directly when direct reads are on.
READS = [
    *(request(b"GET", users_path(name)) for name in USERS),
    *(request(b"HEAD", users_path(name)) for name in USERS),
    request(b"GET", b"/users/nobody/steps"),
    request(b"HEAD", b"/users/nobody/steps"),
    request(b"GET", b"/users/a%2fb/steps"),
    request(b"GET", b"/users/%6C%75%69%73%61/steps"),
    request(b"GET", b"/users/%c3%a9%f0%9f%98%80/steps"),
    request(b"GET", b"/users/luisa/steps?cache=bust&x=%zz"),
    request(b"GET", b"/users/luisa/steps?"),
    request(b"GET", b"http://other.example:9/users/luisa/steps"),
    request(b"GET", b"HTTPS://u@localhost/users/a%2Fb/steps?q"),
    request(b"GET", b"/users/luisa/steps", extra=b"Connection: keep-alive\r\n"),
    request(b"GET", b"/users/luisa/steps", extra=b"Cookie: a=b\r\nAccept: */*\r\n"),
    request(b"GET", b"/users/luisa/steps", extra=b"Content-Length: 5\r\n") + b"hello",
    request(b"GET", b"/users/luisa/steps", host=b"[::1]:8080"),
    request(b"GET", b"/users/luisa/steps", host=b"LocalHost"),
    request(b"GET", b"/users/luisa/steps", host=b""),
    request(b"GET", b"/users/luisa/steps", host=b"b\xc3\xbccher.example"),
    request(b"GET", b"/users/luisa/steps", host=b"xn--bcher-kva.example:80"),
    request(b"GET", b"/users/luisa/steps").replace(b"HTTP/1.1", b"HTTP/1.0"),
]

# Requests that do not read a total, or not as the route would: through
# Klein (or refused before it) on both sites.
OTHERS = [
    request(b"get", b"/users/luisa/steps"),
    request(b"Head", b"/users/luisa/steps"),
    request(b"POST", b"/users/luisa/steps", extra=b"Content-Length: 2\r\n") + b"{}",
    request(b"DELETE", b"/users/luisa/steps"),
    request(b"OPTIONS", b"/users/luisa/steps"),
    request(b"GET", b"/users//steps"),
    request(b"GET", b"/users/steps"),
    request(b"GET", b"/users/a/b/steps"),
    request(b"GET", b"/users/luisa/steps/"),
    request(b"GET", b"/users/luisa/steps/steps"),
    request(b"GET", b"/users/luisa"),
    request(b"GET", b"/USERS/luisa/steps"),
    request(b"GET", b"//users/luisa/steps"),
    request(b"GET", b"/users/%zz/steps"),
    request(b"GET", b"/users/%ff/steps"),
    request(b"GET", b"/users/luisa%/steps"),
    request(b"GET", b"/users/luisa/steps", host=b".."),
    request(b"GET", b"/users/luisa/steps", host=b"a" * 64),
    request(b"GET", b"/users/luisa/steps", host=b"\xff\xfe"),
    request(b"GET", b"/users/luisa/steps", host=None).replace(b"HTTP/1.1", b"HTTP/1.0"),
    request(b"GET", b"/"),
]


def both_ways(store: MemoryStore, data: bytes) -> tuple[bytes, bytes]:
    """What a site with direct reads and one without write back for ``data``."""
    direct, direct_closing = exchange(memory_site(store), data)
    klein, klein_closing = exchange(memory_site(store, direct_reads=False), data)
    assert direct_closing == klein_closing
    return direct, klein


@pytest.mark.parametrize("data", READS)
def test_a_read_is_answered_directly_as_klein_answers_it(
    store: MemoryStore, klein_renders: KleinRenders, data: bytes
) -> None:
    """A read of a total skips Klein, and gets the bytes Klein's route sends."""
    direct, direct_renders = exchange(memory_site(store), data)[0], klein_renders.count
    klein = exchange(memory_site(store, direct_reads=False), data)[0]
    assert direct_renders == 0
    assert klein_renders.count == 1
    assert direct == klein
    assert re.match(rb"HTTP/1\.[01] (200 OK|404 Not Found)\r\n", direct)


@pytest.mark.parametrize("data", OTHERS)
def test_any_other_request_goes_the_same_way_either_way(
    store: MemoryStore, klein_renders: KleinRenders, data: bytes
) -> None:
    """Anything but a read takes the same way on both sites, to the same bytes."""
    direct = exchange(memory_site(store), data)[0]
    direct_renders, klein_renders.count = klein_renders.count, 0
    klein = exchange(memory_site(store, direct_reads=False), data)[0]
    assert direct_renders == klein_renders.count
    assert direct == klein
    assert direct.startswith((b"HTTP/1.1 ", b"HTTP/1.0 "))


def test_one_connection_many_requests(store: MemoryStore) -> None:
    """Every request above, pipelined on one keep-alive connection, then a close."""
    batch = b"".join([*READS, *OTHERS, *READS]).replace(b"HTTP/1.0", b"HTTP/1.1")
    batch += request(b"GET", b"/users/luisa/steps", extra=b"Connection: close\r\n")
    direct, klein = both_ways(store, batch)
    assert direct == klein
    assert direct.count(b"HTTP/1.1 ") == 2 * len(READS) + len(OTHERS) + 1


def test_the_same_host_is_judged_the_same_every_time(
    store: MemoryStore, klein_renders: KleinRenders
) -> None:
    """Hosts are remembered as judged, good or bad, and only so many of them."""
    hosts = [b"host-%d.example" % n for n in range(100)]
    hosts += [b"a..%d" % n for n in range(100)]
    data = b"".join(request(b"GET", b"/users/luisa/steps", host) for host in hosts)
    direct, klein = both_ways(store, data + data)
    assert direct == klein
    assert direct.count(b"HTTP/1.1 200 OK\r\n") == 200
    assert direct.count(b"HTTP/1.1 400 Bad Request\r\n") == 200


def any_encoding(username: str, data: st.DataObject) -> bytes:
    """``username`` percent-encoded, each byte escaped or not, upper or lower."""
    literal = set(
        b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~!$&'()*+,;=:@"
    )
    out = b""
    for byte in username.encode("utf-8"):
        how = data.draw(st.sampled_from(["literal", "upper", "lower"]))
        if how == "literal" and byte in literal:
            out += bytes([byte])
        else:
            escape = b"%%%02X" % byte
            out += escape.lower() if how == "lower" else escape
    return out


@settings(max_examples=300, deadline=None)
@given(
    username=st.text(min_size=1, max_size=40),
    known=st.booleans(),
    method=st.sampled_from([b"GET", b"HEAD"]),
    data=st.data(),
)
def test_any_username_any_encoding_same_bytes(
    username: str, known: bool, method: bytes, data: st.DataObject
) -> None:
    """Whatever the username and however it is encoded, both ways answer alike."""
    store = store_with([username] if known else [])
    target = b"/users/" + any_encoding(username, data) + b"/steps"
    direct, klein = both_ways(store, request(method, target))
    assert direct == klein


PATH_PIECES = [b"/", b"users", b"steps", b"%", b"%2F", b"%2f", b"%25", b"a", b"%zz"]
PATH_PIECES += [b"%C3", b"%A9", b"\xc3\xa9", b"\xff", b"?", b"#", b"..", b";", b"%00"]


@settings(max_examples=300, deadline=None)
@given(
    pieces=st.lists(st.sampled_from(PATH_PIECES), max_size=12),
    method=st.sampled_from([b"GET", b"HEAD", b"get", b"PUT"]),
)
def test_any_path_same_bytes(pieces: list[bytes], method: bytes) -> None:
    """Paths made of the pieces that matter to routing get the same answer both ways."""
    store = store_with(USERS)
    target = b"/users/" + b"".join(pieces) + b"/steps"
    direct, klein = both_ways(store, request(method, target))
    assert direct == klein


def fault_events(events: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    return [
        (event["log_format"], str(event["log_failure"].value))
        for event in events
        if event.get("log_level") == LogLevel.critical
    ]


@pytest.mark.parametrize("store_class", [FailingStore, RaisingStore])
def test_a_store_fault_is_answered_and_logged_the_same(
    store_class: type[MemoryStore],
) -> None:
    """A store's fault is the same 500 and the same logged failure, once, either way."""
    store = store_class(Clock())
    data = request(b"GET", b"/users/luisa/steps")
    with capturedLogs() as direct_events:
        direct = exchange(memory_site(store), data)[0]
    with capturedLogs() as klein_events:
        klein = exchange(memory_site(store, direct_reads=False), data)[0]
    assert direct == klein
    assert direct.startswith(b"HTTP/1.1 500 Internal Server Error\r\n")
    assert fault_events(direct_events) == fault_events(klein_events)
    assert len(fault_events(direct_events)) == 1


class LaterStore(MemoryStore):
    """A store that answers reads only when told to, as a database would."""

    def __init__(self) -> None:
        super().__init__(Clock())
        self.pending: list[tuple[Deferred[Total | None], Total | None]] = []
        self.cancelled = 0

    def total(self, username: str) -> Deferred[Total | None]:
        def cancel(reading: Deferred[Total | None]) -> None:
            self.cancelled += 1

        reading: Deferred[Total | None] = Deferred(cancel)
        self.pending.append((reading, result_of(super().total(username))))
        return reading

    def answer(self) -> None:
        pending, self.pending = self.pending, []
        for reading, total in pending:
            reading.callback(total)


class Connection:
    """A site on an in-memory connection that stays open until told."""

    def __init__(self, site: Site) -> None:
        self.channel = site.buildProtocol(CLIENT_ADDRESS)
        assert self.channel is not None
        self.transport = StringTransport(
            hostAddress=SERVER_ADDRESS, peerAddress=CLIENT_ADDRESS
        )
        self.channel.makeConnection(self.transport)

    def close(self) -> None:
        self.channel.connectionLost(Failure(ConnectionDone()))


@pytest.mark.parametrize("direct_reads", [True, False])
def test_a_store_that_answers_later(direct_reads: bool) -> None:
    """Reads wait for a store that answers later, and are answered as Klein does."""
    store = LaterStore()
    store.apply_now([Update("luisa", 5, 3)])
    reference_store = MemoryStore(Clock())
    reference_store.apply_now([Update("luisa", 5, 3)])
    reference = Connection(memory_site(reference_store, direct_reads=False))
    connection = Connection(memory_site(store, direct_reads))
    for target in [b"/users/luisa/steps", b"/users/nobody/steps"]:
        data = request(b"GET", target)
        connection.channel.dataReceived(data)
        assert connection.transport.value() == b""
        store.answer()
        reference.channel.dataReceived(data)
        assert connection.transport.value() == reference.transport.value()
        connection.transport.clear()
        reference.transport.clear()


@pytest.mark.parametrize("direct_reads", [True, False])
def test_a_client_that_leaves_before_the_store_answers(direct_reads: bool) -> None:
    """The read is cancelled, nothing is written, and nothing is logged as a fault."""
    store = LaterStore()
    connection = Connection(memory_site(store, direct_reads))
    connection.channel.dataReceived(request(b"GET", b"/users/luisa/steps"))
    with capturedLogs() as events:
        connection.close()
    assert store.cancelled == 1
    assert connection.transport.value() == b""
    assert not [e for e in events if e["log_level"] > LogLevel.info]


def test_the_date_is_the_one_twisted_gives() -> None:
    """The Date header's value, formatted once a second, is Twisted's for now."""
    date = rest._HTTPDate()
    before = http.datetimeToString()
    value = date.now()
    after = http.datetimeToString()
    assert value in (before, after)


# -- over real sockets --


@pytest_twisted.async_yield_fixture
async def two_sites() -> AsyncIterator[tuple[int, int]]:
    """
    The daemon (direct reads) and a Klein-only site over the same store, on
    real sockets: their ports.
    """
    store = store_with(USERS)
    running: RunningServer = await start_server(
        reactor,
        TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"),
        TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"),
        store,
    )
    klein_site = rest.totals_site(store, direct_reads=False)
    klein_port: Any = await TCP4ServerEndpoint(
        reactor, 0, interface="127.0.0.1"
    ).listen(klein_site)
    yield running.rest_address.port, klein_port.getHost().port
    await klein_port.stopListening()
    await running.close()


async def send_and_read(port: int, data: bytes, piece: int) -> bytes:
    """
    Send ``data`` on one connection, ``piece`` bytes a write with a reactor
    turn between writes; everything the server sent once it closes.
    """
    client = await raw_connect(reactor, port)
    for start in range(0, len(data), piece):
        client.send(data[start : start + piece])
        await deferLater(reactor, 0, lambda: None)
    await client.lost.addTimeout(TIMEOUT, reactor)
    return client.data


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("piece", [1 << 20, 7])
async def test_over_sockets_the_same_bytes_either_way(
    two_sites: tuple[int, int], klein_renders: KleinRenders, piece: int
) -> None:
    """Over sockets, pipelined or in small pieces, both sites send the same bytes."""
    direct_port, klein_port = two_sites
    batch = b"".join([*READS, *OTHERS]).replace(b"HTTP/1.0", b"HTTP/1.1")
    batch += request(b"GET", b"/users/luisa/steps", extra=b"Connection: close\r\n")
    direct = await send_and_read(direct_port, batch, piece)
    klein = await send_and_read(klein_port, batch, piece)
    assert direct == klein
    assert direct.count(b"HTTP/1.1 ") == len(READS) + len(OTHERS) + 1


@pytest_twisted.ensureDeferred
async def test_over_sockets_reads_skip_klein(
    two_sites: tuple[int, int], klein_renders: KleinRenders
) -> None:
    """The daemon answers reads without Klein; the Klein-only site through it."""
    direct_port, klein_port = two_sites
    batch = b"".join(READS).replace(b"HTTP/1.0", b"HTTP/1.1")
    batch += request(b"GET", b"/users/luisa/steps", extra=b"Connection: close\r\n")
    direct = await send_and_read(direct_port, batch, 1 << 20)
    assert klein_renders.count == 0
    klein = await send_and_read(klein_port, batch, 1 << 20)
    assert klein_renders.count == len(READS) + 1
    assert direct == klein


@pytest.mark.parametrize("direct_reads", [True, False])
def test_no_host_on_a_unix_socket(store: MemoryStore, direct_reads: bool) -> None:
    """On a UNIX socket, an HTTP/1.0 request with no Host is answered, not a 500."""
    address = UNIXAddress(b"/run/steptrack/rest.sock")
    channel = memory_site(store, direct_reads).buildProtocol(address)
    assert channel is not None
    transport = StringTransport(hostAddress=address, peerAddress=UNIXAddress(None))
    channel.makeConnection(transport)
    with capturedLogs() as events:
        channel.dataReceived(b"GET /users/luisa/steps HTTP/1.0\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.0 200 OK\r\n")
    assert transport.value().endswith(b'{"cumulativeSteps":10,"ts":1666960429981}')
    assert not [e for e in events if e["log_level"] > LogLevel.info]

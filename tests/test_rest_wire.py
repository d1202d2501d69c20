"""
The REST listener over a real socket, fed raw bytes: what no HTTP client
library will send (lower-case methods, absolute-form targets, bad Host
headers, bodies far over the limit), as the daemon's own site answers it.
"""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import msgspec
import pytest
import pytest_twisted
from twisted.internet import reactor as global_reactor
from twisted.internet.endpoints import (
    TCP4ServerEndpoint,
)
from twisted.internet.task import deferLater
from twisted.logger import LogLevel, capturedLogs

from steptrackd.rest import MAX_REQUEST_BODY
from steptrackd.server import RunningServer, start_server
from steptrackd.store import MemoryStore
from steptrackd.update import Update

from .clients import RawClient, raw_connect

reactor: Any = global_reactor

TIMEOUT = 5.0
"""Seconds any one exchange may take before the test fails."""


@pytest_twisted.async_yield_fixture
async def server() -> AsyncIterator[RunningServer]:
    store = MemoryStore(reactor)
    running = await start_server(
        reactor,
        TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"),
        TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"),
        store,
    )
    await store.apply([Update("luisa", 1666960429981, 108), Update("a/b", 5, 3)])
    yield running
    await running.close()


async def _connect(server: RunningServer) -> RawClient:
    return await raw_connect(reactor, server.rest_address.port)


async def _until_closed(client: RawClient) -> None:
    """Wait for the connection to end; fail after ``TIMEOUT`` seconds."""
    await client.lost.addTimeout(TIMEOUT, reactor)


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return msgspec.json.decode(self.body)


def parse_reply(data: bytes) -> Reply:
    """The one HTTP response in ``data``, its body de-chunked if need be."""
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        chunks, rest = [], body
        while True:
            size, _, rest = rest.partition(b"\r\n")
            if int(size, 16) == 0:
                break
            chunks.append(rest[: int(size, 16)])
            rest = rest[int(size, 16) + 2 :]
        body = b"".join(chunks)
    else:
        body = body[: int(headers.get("content-length", len(body)))]
    return Reply(int(status_line.split(" ")[1]), headers, body)


async def exchange(server: RunningServer, request: bytes) -> Reply:
    """Send one request that asks for the connection to close; parse the reply."""
    client = await _connect(server)
    client.send(request)
    await _until_closed(client)
    return parse_reply(client.data)


def request_bytes(
    method: bytes, target: bytes, host: bytes = b"localhost", extra: bytes = b""
) -> bytes:
    return (
        method + b" " + target + b" HTTP/1.1\r\nHost: " + host + b"\r\n"
        b"Connection: close\r\n" + extra + b"\r\n"
    )


def assert_json_reply(reply: Reply) -> None:
    assert reply.headers["content-type"] == "application/json"
    assert reply.headers["cache-control"] == "no-store"
    msgspec.json.decode(reply.body)


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("method", [b"get", b"Get", b"head"])
async def test_methods_are_case_sensitive(server: RunningServer, method: bytes) -> None:
    """A method that is not exactly GET or HEAD is a 405 on the path, 404 elsewhere."""
    reply = await exchange(server, request_bytes(method, b"/users/luisa/steps"))
    assert reply.status == 405
    assert reply.headers["allow"] == "GET, HEAD"
    assert set(reply.json()) == {"error"}
    assert_json_reply(reply)
    elsewhere = await exchange(server, request_bytes(method, b"/nowhere"))
    assert elsewhere.status == 404
    assert_json_reply(elsewhere)


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (b"http://localhost/users/luisa/steps", (108, 1666960429981)),
        (b"HTTP://Other.Example:8080/users/luisa/steps?x=1", (108, 1666960429981)),
        (b"https://user@localhost/users/%6C%75%69%73%61/steps", (108, 1666960429981)),
        (b"http://localhost/users/a%2Fb/steps", (3, 5)),
    ],
)
async def test_absolute_form_target_is_read_as_its_path(
    server: RunningServer, target: bytes, expected: tuple[int, int]
) -> None:
    """http://host/path (RFC 9112 3.2.2) is routed by its path; the host is ignored."""
    reply = await exchange(server, request_bytes(b"GET", target))
    assert reply.status == 200
    steps, ts = expected
    assert reply.json() == {"cumulativeSteps": steps, "ts": ts}
    assert_json_reply(reply)


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("host", [b"..", b"a" * 64, b"\xff\xfe"])
async def test_unusable_host_is_a_quiet_json_400(
    server: RunningServer, host: bytes
) -> None:
    """The daemon answers a bad Host with a JSON 400 and logs no fault for it."""
    with capturedLogs() as events:
        reply = await exchange(
            server, request_bytes(b"GET", b"/users/luisa/steps", host)
        )
    assert reply.status == 400
    assert "Host" in reply.json()["error"]
    assert_json_reply(reply)
    assert not [e for e in events if e["log_level"] > LogLevel.info]
    assert not [e for e in events if "log_failure" in e or e.get("isError")]


@pytest.fixture
def temporary_files(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Every temporary file opened during the test (Twisted spools bodies so)."""
    opened: list[object] = []
    real = tempfile.TemporaryFile

    def recording(*args: Any, **kwargs: Any) -> Any:
        opened.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(tempfile, "TemporaryFile", recording)
    return opened


def assert_413(data: bytes) -> None:
    reply = parse_reply(data)
    assert reply.status == 413
    assert reply.headers["connection"] == "close"
    assert set(reply.json()) == {"error"}
    assert_json_reply(reply)


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("expect", [b"", b"Expect: 100-continue\r\n"])
async def test_declared_oversized_body_is_refused_before_it_is_sent(
    server: RunningServer, temporary_files: list[object], expect: bytes
) -> None:
    """A Content-Length over the limit gets a 413, and no 100 Continue, at once."""
    client = await _connect(server)
    client.send(
        request_bytes(b"PUT", b"/users/luisa/steps", extra=expect)[:-2]
        + b"Content-Length: 10737418240\r\n\r\n"
    )
    await _until_closed(client)
    assert not client.data.startswith(b"HTTP/1.1 100")
    assert_413(client.data)
    assert temporary_files == []


@pytest_twisted.ensureDeferred
async def test_body_limit_is_exact(server: RunningServer) -> None:
    """A body of exactly the limit is read (then the PUT refused); one more is not."""
    at_limit = await exchange(
        server,
        request_bytes(b"PUT", b"/users/luisa/steps")[:-2]
        + b"Content-Length: %d\r\n\r\n" % MAX_REQUEST_BODY
        + b"x" * MAX_REQUEST_BODY,
    )
    assert at_limit.status == 405
    client = await _connect(server)
    client.send(
        request_bytes(b"PUT", b"/users/luisa/steps")[:-2]
        + b"Content-Length: %d\r\n\r\n" % (MAX_REQUEST_BODY + 1)
    )
    await _until_closed(client)
    assert_413(client.data)


async def _stream_until_cut_off(client: RawClient, piece: bytes) -> int:
    """
    Keep sending ``piece`` until the server closes the connection; fail if
    it still reads after 64 MiB or ``TIMEOUT`` seconds. Returns bytes sent.
    """
    sent = 0
    deadline = reactor.seconds() + TIMEOUT
    while not client.lost.called:
        assert sent < 64 * 1024 * 1024, "the server kept reading the body"
        assert reactor.seconds() < deadline, "the server kept the connection open"
        client.send(piece)
        sent += len(piece)
        await deferLater(reactor, 0.001, lambda: None)
    return sent


@pytest_twisted.ensureDeferred
async def test_streamed_body_is_cut_off_and_never_kept(
    server: RunningServer, temporary_files: list[object]
) -> None:
    """A client streaming a huge body gets a 413 and is cut off; nothing is spooled."""
    client = await _connect(server)
    client.send(
        request_bytes(b"PUT", b"/users/luisa/steps")[:-2]
        + b"Content-Length: 10737418240\r\n\r\n"
    )
    await _stream_until_cut_off(client, b"x" * 65536)
    assert_413(client.data)
    assert temporary_files == []


@pytest_twisted.ensureDeferred
async def test_chunked_body_is_refused_once_over_the_limit(
    server: RunningServer, temporary_files: list[object]
) -> None:
    """Chunked bodies count as they arrive: past the limit they get a 413, cut off."""
    client = await _connect(server)
    client.send(
        request_bytes(b"PUT", b"/users/luisa/steps")[:-2]
        + b"Transfer-Encoding: chunked\r\n\r\n"
    )
    piece = b"x" * 1000
    await _stream_until_cut_off(client, b"%x\r\n%s\r\n" % (len(piece), piece))
    assert_413(client.data)
    assert temporary_files == []


@pytest_twisted.ensureDeferred
async def test_chunked_body_ending_just_past_the_limit_is_not_answered_twice(
    server: RunningServer,
) -> None:
    """A chunked body whose end arrives with its excess gets the one 413 only."""
    client = await _connect(server)
    piece = b"x" * (MAX_REQUEST_BODY + 1)
    client.send(
        request_bytes(b"PUT", b"/users/luisa/steps")[:-2]
        + b"Transfer-Encoding: chunked\r\n\r\n"
        + b"%x\r\n%s\r\n0\r\n\r\n" % (len(piece), piece)
    )
    await _until_closed(client)
    assert_413(client.data)
    assert client.data.count(b"HTTP/1.1") == 1

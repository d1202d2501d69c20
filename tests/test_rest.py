"""
The REST adapter against every row of contract section 4, over a memory
store, three ways: the daemon's site on an in-memory connection (its own
request class, so reads of totals take the direct way), the same with
direct reads off (everything through Klein), and the root resource alone
under treq's stub client.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any, Protocol
from urllib.parse import quote

import pytest
from treq.testing import StubTreq
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, capturedLogs
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.server import Site

from steptrackd.rest import totals_site
from steptrackd.store import MemoryStore, Total
from steptrackd.update import Update

from .test_store import result_of

SERVER_ADDRESS = IPv4Address("TCP", "127.0.0.1", 8080)
CLIENT_ADDRESS = IPv4Address("TCP", "127.0.0.1", 50123)


class Answer:
    def __init__(self, status: int, headers: Headers, body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name)
        return values[0] if values else None

    def json(self) -> Any:
        return json.loads(self.body)


class Client(Protocol):
    def request(
        self, method: str, path: str, headers: dict[bytes, list[bytes]] | None = None
    ) -> Answer: ...


class StubClient:
    """The site's root resource under treq's stub client (and Twisted's
    own request class): always the way through Klein."""

    def __init__(self, store: MemoryStore) -> None:
        self.stub: Any = StubTreq(totals_site(store).resource)

    def request(
        self, method: str, path: str, headers: dict[bytes, list[bytes]] | None = None
    ) -> Answer:
        response = result_of(
            self.stub.request(method, "http://localhost:8080" + path, headers=headers)
        )
        body = result_of(self.stub.content(response))
        return Answer(response.code, response.headers, body)


def memory_site(store: MemoryStore, direct_reads: bool = True) -> Site:
    """The daemon's REST site, with its timers on a clock of its own."""
    site = totals_site(store, direct_reads)
    site.reactor = Clock()
    return site


def exchange(site: Site, data: bytes) -> tuple[bytes, bool]:
    """
    Everything ``site`` writes back when ``data`` arrives on one in-memory
    connection, and whether it then closes the connection.
    """
    channel = site.buildProtocol(CLIENT_ADDRESS)
    assert channel is not None
    transport = StringTransport(hostAddress=SERVER_ADDRESS, peerAddress=CLIENT_ADDRESS)
    channel.makeConnection(transport)
    channel.dataReceived(data)
    written, closing = transport.value(), transport.disconnecting
    channel.connectionLost(Failure(ConnectionDone()))
    return written, closing


def parse_response(data: bytes, head_only: bool = False) -> Answer:
    """The one HTTP response in ``data``, its body de-chunked if need be."""
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.split(b"\r\n")
    headers = Headers()
    for line in lines:
        name, _, value = line.partition(b":")
        headers.addRawHeader(name.strip(), value.strip())
    if head_only:
        body = b""
    elif headers.getRawHeaders(b"Transfer-Encoding") == [b"chunked"]:
        chunks = []
        while True:
            size_line, _, body = body.partition(b"\r\n")
            size = int(size_line, 16)
            if size == 0:
                break
            chunks.append(body[:size])
            body = body[size + 2 :]
        body = b"".join(chunks)
    else:
        length = headers.getRawHeaders(b"Content-Length")
        assert length is not None, "no length: the response is cut off"
        body = body[: int(length[0])]
    return Answer(int(status_line.split(b" ")[1]), headers, body)


class SiteClient:
    """The daemon's REST site on an in-memory connection, a request each."""

    def __init__(self, store: MemoryStore, direct_reads: bool = True) -> None:
        self.site = memory_site(store, direct_reads)

    def request(
        self, method: str, path: str, headers: dict[bytes, list[bytes]] | None = None
    ) -> Answer:
        fields = {b"Host": [b"localhost:8080"], **(headers or {})}
        data = method.encode("ascii") + b" " + path.encode("ascii") + b" HTTP/1.1\r\n"
        for name, values in fields.items():
            data += b"".join(name + b": " + value + b"\r\n" for value in values)
        written, _ = exchange(self.site, data + b"\r\n")
        return parse_response(written, head_only=method == "HEAD")


CLIENTS: dict[str, Callable[[MemoryStore], Client]] = {
    "direct": SiteClient,
    "klein": lambda store: SiteClient(store, direct_reads=False),
    "resource": StubClient,
}


@pytest.fixture(params=list(CLIENTS))
def client_kind(request: pytest.FixtureRequest) -> str:
    """Which way the request goes: see the module docstring."""
    kind: str = request.param
    return kind


@pytest.fixture
def store() -> Iterator[MemoryStore]:
    store = MemoryStore(Clock())
    store.startService()
    result_of(store.apply([Update("luisa", 1666960429981, 108)]))
    yield store
    result_of(store.close())


@pytest.fixture
def client(store: MemoryStore, client_kind: str) -> Client:
    return CLIENTS[client_kind](store)


def assert_json_response(answer: Answer) -> None:
    assert answer.header("Content-Type") == "application/json"
    assert answer.header("Cache-Control") == "no-store"
    json.loads(answer.body)


def test_known_user(client: Client) -> None:
    """200 with exactly cumulativeSteps and ts, integers as integers."""
    answer = client.request("GET", "/users/luisa/steps")
    assert answer.status == 200
    assert answer.body == b'{"cumulativeSteps":108,"ts":1666960429981}'
    assert_json_response(answer)


def test_unknown_user(client: Client) -> None:
    """404 with exactly {"error": "User doesn't exist"}."""
    answer = client.request("GET", "/users/nobody/steps")
    assert answer.status == 404
    assert answer.json() == {"error": "User doesn't exist"}
    assert_json_response(answer)


def test_head_is_get_without_a_body(client: Client) -> None:
    """HEAD answers as GET would, with headers and no body."""
    known = client.request("HEAD", "/users/luisa/steps")
    unknown = client.request("HEAD", "/users/nobody/steps")
    assert (known.status, known.body) == (200, b"")
    assert (unknown.status, unknown.body) == (404, b"")
    assert known.header("Content-Type") == "application/json"
    assert known.header("Cache-Control") == "no-store"


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
def test_other_methods_are_not_allowed(client: Client, method: str) -> None:
    """Any other method on the path is 405 with Allow: GET, HEAD and a JSON error."""
    answer = client.request(method, "/users/luisa/steps")
    assert answer.status == 405
    assert answer.header("Allow") == "GET, HEAD"
    assert set(answer.json()) == {"error"}
    assert_json_response(answer)


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/users",
        "/users/",
        "/users/luisa",
        "/users/luisa/steps/",
        "/users/luisa/steps/extra",
        "/users//steps",
        "//users/luisa/steps",
        "/users/a/b/steps",
        "/USERS/luisa/steps",
        "/favicon.ico",
    ],
)
def test_unknown_paths(client: Client, path: str) -> None:
    """Anything but /users/{one segment}/steps is a JSON 404, never a redirect."""
    answer = client.request("GET", path)
    assert answer.status == 404
    assert set(answer.json()) == {"error"}
    assert answer.json() != {"error": "User doesn't exist"}
    assert_json_response(answer)


@pytest.mark.parametrize(
    "path",
    [
        "/users/a%/steps",
        "/users/a%2/steps",
        "/users/a%zz/steps",
        "/users/%ff/steps",
        "/users/%c3/steps",
        "/nowhere%g0",
    ],
)
def test_malformed_percent_encoding(client: Client, path: str) -> None:
    """A bad escape, or bytes that are not UTF-8 once decoded, is a JSON 400."""
    answer = client.request("GET", path)
    assert answer.status == 400
    assert set(answer.json()) == {"error"}
    assert_json_response(answer)


@pytest.mark.parametrize(
    "username",
    [
        "a/b",
        "/",
        "/a",
        "a/",
        "//x//",
        "with space",
        "é😀",
        "100%",
        "a?b#c",
        "toString",
        "__proto__",
        "..",
        "+plus+",
        "x" * 256,
    ],
)
def test_any_valid_username_reads_back(
    store: MemoryStore, client: Client, username: str
) -> None:
    """Names with /, spaces, non-ASCII, % or odd names read back percent-encoded."""
    result_of(store.apply([Update(username, 5, 3)]))
    answer = client.request("GET", f"/users/{quote(username, safe='')}/steps")
    assert (answer.status, answer.json()) == (200, {"cumulativeSteps": 3, "ts": 5})


def test_percent_encoded_plain_letters_are_the_same_user(client: Client) -> None:
    """%6C%75%69%73%61 is luisa: escapes are decoded, whatever they encode."""
    answer = client.request("GET", "/users/%6C%75%69%73%61/steps")
    assert answer.json() == {"cumulativeSteps": 108, "ts": 1666960429981}


def test_query_string_is_ignored(client: Client) -> None:
    """A query string does not change what is read."""
    answer = client.request("GET", "/users/luisa/steps?cache=bust")
    assert answer.status == 200


def test_float_ts_is_rendered_as_sent(store: MemoryStore, client: Client) -> None:
    """A fractional ts comes back as the same JSON number."""
    result_of(store.apply([Update("f", 1.5, 2)]))
    assert client.request("GET", "/users/f/steps").json() == {
        "cumulativeSteps": 2,
        "ts": 1.5,
    }


class FailingStore(MemoryStore):
    def total(self, username: str) -> Deferred[Total | None]:
        return fail(RuntimeError("disk on fire: /secret/path"))


class RaisingStore(MemoryStore):
    def total(self, username: str) -> Deferred[Total | None]:
        raise RuntimeError("disk on fire: /secret/path")


@pytest.mark.parametrize("store_class", [FailingStore, RaisingStore])
def test_fault_is_a_500_with_no_traceback(
    store_class: type[MemoryStore], client_kind: str
) -> None:
    """A fault inside the server is a JSON 500; the traceback goes to the log only."""
    client = CLIENTS[client_kind](store_class(Clock()))
    with capturedLogs() as events:
        answer = client.request("GET", "/users/luisa/steps")
    assert answer.status == 500
    assert answer.json() == {"error": "Internal server error"}
    assert b"secret" not in answer.body
    assert b"Traceback" not in answer.body
    assert_json_response(answer)
    failures = [e for e in events if e.get("log_level") == LogLevel.critical]
    assert any("disk on fire" in str(e.get("log_failure")) for e in failures)


BAD_HOSTS = [b"..", b"a..b", b".example", b"a" * 64 + b".com", b"a" * 254, b"\xff\xfe"]


@pytest.mark.parametrize("host", BAD_HOSTS)
def test_unusable_host_is_a_json_400(client: Client, host: bytes) -> None:
    """A Host that is no usable name is a JSON 400 naming it, not a logged fault."""
    with capturedLogs() as events:
        answer = client.request("GET", "/users/luisa/steps", {b"Host": [host]})
    assert answer.status == 400
    assert_json_response(answer)
    shown = host[:100].decode("utf-8", "backslashreplace")
    assert shown in answer.json()["error"]
    assert not [e for e in events if e["log_level"] > LogLevel.info]
    assert not [e for e in events if "log_failure" in e or e.get("isError")]

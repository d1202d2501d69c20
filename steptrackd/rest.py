"""
The REST adapter: apps read a user's total over HTTP.

Routes are methods of :class:`TotalsAPI`, a Klein application that reads
from a store. :func:`totals_site` wraps it in a ``Site`` that speaks only
JSON: every response, errors included, is a JSON body with
``Content-Type: application/json`` and ``Cache-Control: no-store``, and a
fault inside the server is logged, never shown. Its requests refuse a body
over :data:`MAX_REQUEST_BODY` as it arrives, and take a request target in
absolute form (``http://host/path``) as its path.

Reading a total is the one request apps make all the time, so it has a
shorter way through: a request that the totals route would match, and that
would reach the store there, is answered before Twisted's resource lookup
and without Klein's routing, by the same code with the same result, byte
for byte. Everything else goes the long way, through Klein.

It does not know how totals are written (``websocket``) or kept (``store``).
"""

from __future__ import annotations

import re
import time
from io import BytesIO
from typing import Any

import msgspec
from klein import Klein
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import datetimeToString
from twisted.web.http_headers import Headers
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import Request, Site, version
from werkzeug.exceptions import BadHost, HTTPException, MethodNotAllowed
from werkzeug.routing import BaseConverter

from .store import IStepStore, Total

USER_NOT_FOUND = b'{"error": "User doesn\'t exist"}'

MAX_REQUEST_BODY = 64 * 1024
"""
Most bytes of request body accepted. No route reads a body; this only
lets a client send a small one without being cut off.
"""

_JSON_HEADERS = (
    (b"Content-Type", b"application/json"),
    (b"Cache-Control", b"no-store"),
)

_encode = msgspec.json.encode
_READ_METHODS = (b"GET", b"HEAD")
# How many Host header values the REST root remembers as checked.
_HOSTS_REMEMBERED = 64
# A '%' not followed by two hex digits.
_BAD_PERCENT = re.compile(rb"%(?![0-9A-Fa-f]{2})")
_PERCENT_ESCAPE = re.compile(rb"%([0-9A-Fa-f]{2})")
# The scheme and authority of a request target in absolute form.
_ABSOLUTE_FORM = re.compile(rb"https?://[^/?#]*", re.IGNORECASE)


class BadPath(Exception):
    """The request path is not well-formed percent-encoded UTF-8."""


def decode_segment(segment: bytes) -> str:
    """
    Percent-decode one path segment strictly: every ``%`` must start an
    escape of two hex digits, and the result must be UTF-8.
    """
    if b"%" not in segment:
        raw = segment
    elif _BAD_PERCENT.search(segment):
        raise BadPath("malformed percent-encoding in the path")
    else:
        raw = _PERCENT_ESCAPE.sub(lambda m: bytes([int(m.group(1), 16)]), segment)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadPath("the path is not UTF-8 once percent-decoded") from None


def error_body(message: str) -> bytes:
    return _encode({"error": message})


def origin_form(target: bytes) -> bytes:
    """
    The path and query of a request target. A target in absolute form
    (``http://host/path?query``, which RFC 9112 section 3.2.2 says a server
    must accept) loses its scheme and authority; the API does not depend on
    the host, so the authority is ignored. Any other target is kept as sent.
    """
    match = _ABSOLUTE_FORM.match(target)
    if match is None:
        return target
    rest = target[match.end() :]
    return rest if rest.startswith(b"/") else b"/" + rest


def _shown(value: bytes, limit: int = 100) -> str:
    """``value`` as text fit to quote in an error message."""
    text = value.decode("utf-8", "backslashreplace")
    return text if len(text) <= limit else text[:limit] + "..."


class _AnyText(BaseConverter):
    """
    Any text of one character or more, slashes and line breaks included.

    werkzeug's own ``path`` converter will not match text that starts with
    a ``/`` (nor, for some paths, text with a line break), so the usernames
    ``/`` and ``/a``, sent as ``%2F`` and ``%2Fa``, would be unknown paths.
    Which user is meant is read from the raw path anyway (see
    :meth:`TotalsAPI.steps`): the route only needs to match.
    """

    regex = "(?s:.+?)"
    part_isolating = False


class TotalsAPI:
    """
    ``GET /users/{username}/steps``: a user's total, from ``store``.
    """

    app = Klein()
    # werkzeug would answer "//" or a trailing "/" with a redirect; a JSON
    # API answers them as the unknown paths they are.
    app.url_map.merge_slashes = False
    app.url_map.strict_slashes = False
    app.url_map.converters["any_text"] = _AnyText

    log = Logger()

    def __init__(self, store: IStepStore) -> None:
        self.store = store

    @app.route("/users/<any_text:_username>/steps", methods=["GET", "HEAD"])
    def steps(self, request: IRequest, _username: str) -> Deferred[bytes] | bytes:
        # werkzeug upper-cases the method before matching it, but methods
        # are case-sensitive (RFC 9110 section 9.1): "get" is not GET.
        if request.method not in _READ_METHODS:
            raise MethodNotAllowed(valid_methods=["GET", "HEAD"])
        # Twisted decodes %2F to "/" before routing, so the route matches
        # "a/b" for both /users/a%2Fb/steps and /users/a/b/steps. The raw
        # path tells them apart: the username is exactly one segment.
        segments = request.path.split(b"/")
        if len(segments) != 4:
            return self._not_found(request)
        username = decode_segment(segments[2])
        return self.store.total(username).addCallback(self._render_total, request)

    def read_total(self, request: Request, username: str) -> None:
        """
        Answer a GET or HEAD of ``username``'s total as :meth:`steps` does
        under Klein, without the routing: the same calls on ``request`` in
        the same order (the body is written, then the request finished), and
        a fault answered and logged by the same handler. The caller has set
        the headers every response carries.
        """
        try:
            reading = self.store.total(username)
        except Exception:
            reading = fail()
        if reading.called:
            reading.addCallbacks(
                self._send_total,
                self._send_fault,
                callbackArgs=(request,),
                errbackArgs=(request,),
            )
        else:
            self._send_total_later(request, reading)

    def _send_total(self, total: Total | None, request: Request) -> None:
        try:
            body = self._render_total(total, request)
        except Exception:
            body = self._fault(request, Failure())
        request.write(body)
        request.finish()

    def _send_fault(self, failure: Failure, request: Request) -> None:
        request.write(self._fault(request, failure))
        request.finish()

    def _send_total_later(
        self, request: Request, reading: Deferred[Total | None]
    ) -> None:
        """
        :meth:`read_total` for a store that answers later. If the client
        goes first, stop waiting and write nothing, as Klein does.
        """
        lost: list[Failure] = []

        def client_left(failure: Failure) -> None:
            lost.append(failure)
            reading.cancel()

        def send(total: Total | None) -> None:
            if not lost:
                self._send_total(total, request)

        def fault(failure: Failure) -> None:
            if not lost:
                self._send_fault(failure, request)
            elif not failure.check(CancelledError):
                self.log.failure("Fault after the client left", failure)

        request.notifyFinish().addErrback(client_left)
        reading.addCallbacks(send, fault)

    @staticmethod
    def _render_total(total: Total | None, request: IRequest) -> bytes:
        if total is None:
            request.setResponseCode(404)
            return USER_NOT_FOUND
        return _encode({"cumulativeSteps": total.cumulative_steps, "ts": total.ts})

    @staticmethod
    def _not_found(request: IRequest) -> bytes:
        request.setResponseCode(404)
        return error_body("Not found")

    @app.handle_errors(BadPath)
    def bad_path(self, request: IRequest, failure: Failure) -> bytes:
        request.setResponseCode(400)
        return error_body(str(failure.value))

    @app.handle_errors(HTTPException)
    def http_error(self, request: IRequest, failure: Failure) -> bytes:
        error = failure.value
        assert isinstance(error, HTTPException)
        if isinstance(error, MethodNotAllowed):
            request.setHeader(b"Allow", b"GET, HEAD")
            request.setResponseCode(405)
            return error_body("Method not allowed: use GET or HEAD")
        # Routing can only fail as "not found" here (werkzeug's redirects
        # are turned off above); any other code is kept as werkzeug chose.
        code = error.code or 404
        request.setResponseCode(code)
        return error_body("Not found" if code == 404 else str(error.name))

    @app.handle_errors(Exception)
    def server_fault(self, request: IRequest, failure: Failure) -> bytes:
        return self._fault(request, failure)

    def _fault(self, request: IRequest, failure: Failure) -> bytes:
        self.log.failure(
            "Fault while answering {method} {path}",
            failure,
            method=request.method,
            path=request.path,
        )
        request.setResponseCode(500)
        return error_body("Internal server error")


class _JSONOnlyResource(Resource):
    """
    The root of the REST site: sets the headers every response carries,
    rejects a badly encoded path or an unusable Host before routing, and
    hands the rest to Klein.

    It also tells its requests (see :meth:`_QuietRequest.process`) which of
    them read a total and can skip the routing, with
    :meth:`username_to_read`. Klein's routing (werkzeug's URL map bound to
    the request, the match, and Klein's rendering around the route) costs
    more per request than all the rest of a read. ``direct_reads=False``
    sends every request through Klein; tests compare the two.
    """

    isLeaf = True
    log = Logger()

    def __init__(self, api: TotalsAPI, direct_reads: bool = True) -> None:
        super().__init__()
        self.api = api
        self._routes = api.app.resource()
        self._direct_reads = direct_reads
        # Whether each Host header value seen passes the checks below and
        # werkzeug's. Bounded, as clients choose the values: past the bound
        # a new value is checked on every request.
        self._usable_hosts: dict[bytes, bool] = {}

    def render(self, request: Any) -> Any:
        for name, value in _JSON_HEADERS:
            request.setHeader(name, value)
        try:
            # One pass over the whole path: a '/' byte never occurs inside a
            # UTF-8 sequence, so this fails exactly when some segment would.
            decode_segment(request.path)
        except BadPath as e:
            request.setResponseCode(400)
            return error_body(str(e))
        # Klein binds werkzeug's URL map to the Host the client sent, though
        # no route depends on it: Klein answers a Host that is not UTF-8 in
        # plain text, and werkzeug raises BadHost for one it cannot
        # IDNA-encode (an empty label, or one over 63 characters) before
        # Klein's error handlers are in place. Either is the client's error
        # (RFC 9112 section 3.2), so it gets a JSON 400 here.
        try:
            request.getRequestHostname().decode("utf-8")
        except UnicodeDecodeError:
            return self._bad_host(request)
        try:
            return self._routes.render(request)
        except BadHost:
            return self._bad_host(request)

    def username_to_read(self, request: Request) -> str | None:
        """
        The username whose total ``request`` reads, if :meth:`render` would
        hand it to Klein and Klein would route it to :meth:`TotalsAPI.steps`
        and on to the store: a GET or HEAD of ``/users/{segment}/steps``,
        one non-empty segment that decodes, with a Host header that Klein
        accepts. ``None`` for any other request, or with ``direct_reads``
        off.
        """
        if request.method not in _READ_METHODS or not self._direct_reads:
            return None
        path = request.path
        # 14 bytes at least: the prefix and suffix do not overlap, and the
        # segment between them is not empty.
        if not (
            len(path) >= 14 and path.startswith(b"/users/") and path.endswith(b"/steps")
        ):
            return None
        segment = path[7:-6]
        if b"/" in segment:
            return None
        host = request.getHeader(b"Host")
        # Without a Host header, Twisted takes the address the connection
        # came in on, which is not the same on every connection.
        if host is None:
            return None
        usable = self._usable_hosts.get(host)
        if usable is None:
            usable = self._klein_accepts_host(request)
            if len(self._usable_hosts) < _HOSTS_REMEMBERED:
                self._usable_hosts[host] = usable
        if not usable:
            return None
        try:
            return decode_segment(segment)
        except BadPath:
            return None

    def _klein_accepts_host(self, request: Request) -> bool:
        """
        Whether :meth:`render` and Klein would accept the request's Host: it
        decodes as UTF-8, and werkzeug can bind the URL map to it (the port
        Klein adds plays no part). With a Host header, this depends on the
        header's value alone: Twisted takes the host from any value.
        """
        try:
            name = request.getRequestHostname().decode("utf-8")
            self.api.app.url_map.bind(name)
        except Exception:
            return False
        return True

    def _bad_host(self, request: Any) -> bytes:
        host = _shown(request.getHeader(b"Host") or b"")
        # Not warn: a client can send one on every request, and the log
        # would say nothing the client was not told.
        self.log.debug(
            "Bad Host header {host} from {peer}",
            host=host,
            peer=request.getClientAddress(),
        )
        request.setResponseCode(400)
        return error_body(f'Bad Host header "{host}": not a usable host name')


class _QuietRequest(Request):
    """
    A request whose failures are answered in JSON, never as HTML, and whose
    body is refused, with a JSON 413, as soon as it is over
    :data:`MAX_REQUEST_BODY`.

    This relies on what ``HTTPChannel`` does with a request: it calls
    ``gotLength`` once the headers are in, before any of the body and before
    it answers ``Expect: 100-continue``; it hands every piece of the body to
    ``handleContentChunk`` as it arrives, de-chunked; and it calls
    ``requestReceived`` only once the whole body is in. ``Request`` itself
    would spool a body of 100 kB or more to a temporary file, and answer
    only after the last byte.
    """

    _body_size = 0
    _body_refused = False

    def gotLength(self, length: int | None) -> None:
        self.content = BytesIO()
        if length is not None and length > MAX_REQUEST_BODY:
            # Answered with the 413 instead of "100 Continue" (RFC 9110
            # section 10.1.1): the channel looks for Expect after this call.
            self.requestHeaders.removeHeader(b"Expect")
            self._refuse_body()

    def handleContentChunk(self, data: bytes) -> None:
        if self._body_refused:
            return
        self._body_size += len(data)
        if self._body_size > MAX_REQUEST_BODY:
            self._refuse_body()
            return
        assert self.content is not None
        self.content.write(data)

    def _refuse_body(self) -> None:
        """
        Answer 413 and close the connection. Closing stops the transport
        reading, so nothing more the client sends is read or kept. The
        request is never processed, so the response is written on the
        channel directly, as Twisted's own 400 for a malformed request is.

        Closing with unread data makes the kernel reset the connection, so a
        client that sends its whole body before reading may see the reset
        instead of the 413; reading and discarding for a while before
        closing (a lingering close) would fix that.
        """
        self._body_refused = True
        body = error_body(
            f"Request body too large: at most {MAX_REQUEST_BODY} bytes, "
            "and no route reads one"
        )
        headers = Headers()
        for name, value in (
            *_JSON_HEADERS,
            (b"Content-Length", b"%d" % len(body)),
            (b"Connection", b"close"),
        ):
            headers.setRawHeaders(name, [value])
        self.channel.writeHeaders(b"HTTP/1.1", b"413", b"Content Too Large", headers)
        self.channel.write(body)
        self.channel.loseConnection()

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._body_refused:
            # The end of a refused body came in the same read as its excess.
            return
        super().requestReceived(command, origin_form(path), version)

    def getRequestHostname(self) -> bytes:
        """
        As Twisted's, but a request with no Host header (HTTP/1.0 allows
        that) on a UNIX socket is taken as sent to ``localhost``: Twisted
        would fall back on the host of the socket's address, which a UNIX
        socket does not have, and fail.
        """
        if self.getHeader(b"Host") is None and not isinstance(
            self.getHost(), IPv4Address | IPv6Address
        ):
            return b"localhost"
        hostname: bytes = super().getRequestHostname()
        return hostname

    def process(self) -> None:
        """
        Answer a read of a total directly (see
        :meth:`_JSONOnlyResource.username_to_read`); hand any other request
        to Twisted, which finds the resource and renders it.
        """
        site: Site = self.channel.site  # type: ignore[attr-defined]
        root = site.resource
        username = None
        if isinstance(root, _JSONOnlyResource):
            username = root.username_to_read(self)
        if username is None:
            super().process()
            return
        try:
            # What Request.process and then the root's render would set, in
            # the same order, so the bytes sent are the same.
            self.site = site
            self.setHeader(b"Server", version)
            self.setHeader(b"Date", _http_date.now())
            for name, value in _JSON_HEADERS:
                self.setHeader(name, value)
            root.api.read_total(self, username)
        except BaseException:
            self.processingFailed(Failure())

    def processingFailed(self, reason: Failure) -> None:
        TotalsAPI.log.failure("Fault while answering a request", reason)
        if not self.startedWriting:
            self.setResponseCode(500)
            for name, value in _JSON_HEADERS:
                self.setHeader(name, value)
            self.write(error_body("Internal server error"))
        self.finish()


class _HTTPDate:
    """
    The ``Date`` header's value for the current second, as Twisted's
    ``datetimeToString()`` gives it, formatted once a second rather than
    once a request.

    It reads the system clock, not the reactor's, as Twisted's own ``Date``
    header does: a direct answer and one through Klein, in the same second,
    must say the same.
    """

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def now(self) -> bytes:
        second = int(time.time())
        if second != self._second:
            self._value = datetimeToString(second)
            self._second = second
        return self._value


_http_date = _HTTPDate()


def totals_site(store: IStepStore, direct_reads: bool = True) -> Site:
    """
    The REST API over ``store``, ready to listen on an endpoint.
    ``direct_reads=False`` routes reads of totals through Klein too (see
    :class:`_JSONOnlyResource`); the answers are the same.
    """
    root = _JSONOnlyResource(TotalsAPI(store), direct_reads)
    site = Site(root, requestFactory=_QuietRequest)
    site.displayTracebacks = False
    # Twisted's access log costs time per request and says nothing the
    # operator cannot get from a proxy in front.
    site.log = lambda request: None  # type: ignore[method-assign]
    return site

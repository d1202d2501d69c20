"""
The REST adapter: apps read a user's total over HTTP.

Routes are methods of :class:`TotalsAPI`, a Klein application that reads
from a store. :func:`totals_site` wraps it in a ``Site`` that speaks only
JSON: every response, errors included, is a JSON body with
``Content-Type: application/json`` and ``Cache-Control: no-store``, and a
fault inside the server is logged, never shown.

It does not know how totals are written (``websocket``) or kept (``store``).
"""

from __future__ import annotations

import re
from typing import Any

import msgspec
from klein import Klein
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from .store import IStepStore, Total

USER_NOT_FOUND = b'{"error": "User doesn\'t exist"}'

_encode = msgspec.json.encode
# A '%' not followed by two hex digits.
_BAD_PERCENT = re.compile(rb"%(?![0-9A-Fa-f]{2})")
_PERCENT_ESCAPE = re.compile(rb"%([0-9A-Fa-f]{2})")


class BadPath(Exception):
    """The request path is not well-formed percent-encoded UTF-8."""


def decode_segment(segment: bytes) -> str:
    """
    Percent-decode one path segment strictly: every ``%`` must start an
    escape of two hex digits, and the result must be UTF-8.
    """
    if _BAD_PERCENT.search(segment):
        raise BadPath("malformed percent-encoding in the path")
    raw = _PERCENT_ESCAPE.sub(lambda m: bytes([int(m.group(1), 16)]), segment)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadPath("the path is not UTF-8 once percent-decoded") from None


def error_body(message: str) -> bytes:
    return _encode({"error": message})


class TotalsAPI:
    """
    ``GET /users/{username}/steps``: a user's total, from ``store``.
    """

    app = Klein()
    # werkzeug would answer "//" or a trailing "/" with a redirect; a JSON
    # API answers them as the unknown paths they are.
    app.url_map.merge_slashes = False
    app.url_map.strict_slashes = False

    log = Logger()

    def __init__(self, store: IStepStore) -> None:
        self.store = store

    @app.route("/users/<path:_username>/steps", methods=["GET", "HEAD"])
    def steps(self, request: IRequest, _username: str) -> Deferred[bytes] | bytes:
        # Twisted decodes %2F to "/" before routing, so the route matches
        # "a/b" for both /users/a%2Fb/steps and /users/a/b/steps. The raw
        # path tells them apart: the username is exactly one segment.
        segments = request.path.split(b"/")
        if len(segments) != 4:
            return self._not_found(request)
        username = decode_segment(segments[2])
        return self.store.total(username).addCallback(self._render_total, request)

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
    rejects a badly encoded path before routing, and hands the rest to Klein.
    """

    isLeaf = True

    def __init__(self, api: TotalsAPI) -> None:
        super().__init__()
        self._api = api
        self._routes = api.app.resource()

    def render(self, request: Any) -> Any:
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Cache-Control", b"no-store")
        try:
            for segment in request.path.split(b"/"):
                decode_segment(segment)
        except BadPath as e:
            request.setResponseCode(400)
            return error_body(str(e))
        return self._routes.render(request)


class _QuietRequest(Request):
    """A request whose failures are answered in JSON, never as HTML."""

    def processingFailed(self, reason: Failure) -> None:
        TotalsAPI.log.failure("Fault while answering a request", reason)
        if not self.startedWriting:
            self.setResponseCode(500)
            self.setHeader(b"Content-Type", b"application/json")
            self.setHeader(b"Cache-Control", b"no-store")
            self.write(error_body("Internal server error"))
        self.finish()


def totals_site(store: IStepStore) -> Site:
    """The REST API over ``store``, ready to listen on an endpoint."""
    site = Site(_JSONOnlyResource(TotalsAPI(store)), requestFactory=_QuietRequest)
    site.displayTracebacks = False
    # Twisted's access log costs time per request and says nothing the
    # operator cannot get from a proxy in front.
    site.log = lambda request: None  # type: ignore[method-assign]
    return site

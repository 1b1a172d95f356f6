"""The per-request path, top to bottom.

    snap   = holder.current                      one reference read; the request finishes on it
    target = canonicalise(raw target)            400 on anything ambiguous
    match  = snap.router.match(path, method)     404 / 405
    ident  = snap.auth.admit(headers, route)     X-API-Key | Bearer JWT: 400 / 401 / 403 (data_plane.auth)
    limits = limiter.admit(tenant, route)        429 (503 in closed mode without Redis)
    proxy  = forward(route, target, tenant)      502 / 504

Every failure is a :class:`~data_plane.errors.GatewayError`, turned into the SPEC's error
body by :func:`error_response` — the one place statuses become responses.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import secrets
import time
from typing import Final

from aiohttp import web

from data_plane.auth import oauth
from data_plane.auth.failures import FailureTracker
from data_plane.errors import (
    GatewayError,
    MethodNotAllowed,
    NotReady,
    PayloadTooLarge,
    RouteNotFound,
    Unauthenticated,
)
from data_plane.proxy import Proxy
from data_plane.ratelimit.base import Limits
from data_plane.ratelimit.limiter import RateLimiter
from data_plane.request import Target, canonicalise, check_message
from data_plane.router import CompiledRoute, request_host
from data_plane.snapshot import Compiled, Holder
from data_plane.upstream.client import UpstreamClient
from data_plane.upstream.websocket import WebSocketClient
from data_plane.usage.recorder import ROUTE, TENANT, Recorder
from shared.settings import Settings
from shared.snapshot import Tenant

log = logging.getLogger(__name__)

_REQUEST_ID: Final = re.compile(r"^[A-Za-z0-9._\-]{1,128}$")
_WWW_AUTHENTICATE: Final = 'ApiKey realm="tenantgate", header="X-API-Key"'


class _RequestIds:
    """New request ids: 64 random bits drawn once per process, then a counter (28 hex digits).

    Unique across nodes, workers and restarts as long as no two processes draw the same
    prefix (1 in 2**64 per pair), at the cost of a string format per request instead of
    16 bytes from the OS's random source (``uuid4``). A forked child draws its own prefix.
    """

    def __init__(self) -> None:
        self.reset()
        os.register_at_fork(after_in_child=self.reset)

    def reset(self) -> None:
        self._prefix = secrets.token_hex(8)
        self._counter = itertools.count(1)

    def next(self) -> str:
        return f"{self._prefix}{next(self._counter):012x}"


_new_request_id: Final = _RequestIds().next


def request_id(request: web.BaseRequest) -> str:
    """The client's X-Request-ID if it sent a valid one, else a new id."""
    sent = request.headers.get("X-Request-ID")
    if sent is not None and _REQUEST_ID.match(sent):
        return sent
    return _new_request_id()


def error_response(exc: GatewayError, rid: str) -> web.Response:
    body = json.dumps({"error": {"code": exc.code, "message": exc.message, "request_id": rid}})
    response = web.Response(status=exc.status, text=body, content_type="application/json")
    response.headers["X-Request-ID"] = rid
    if exc.status == 400:
        # A malformed or ambiguous message: nothing more is read from this connection, so
        # bytes after it (a smuggled request) are never parsed as a request of their own.
        response.force_close()
    for name, value in exc.headers:
        response.headers[name] = value
    if isinstance(exc, Unauthenticated) and "WWW-Authenticate" not in response.headers:
        response.headers["WWW-Authenticate"] = _WWW_AUTHENTICATE
    elif isinstance(exc, MethodNotAllowed):
        response.headers["Allow"] = ", ".join(exc.allow)
    elif isinstance(exc, NotReady):
        response.headers["Retry-After"] = "1"
    return response


class Pipeline:
    def __init__(
        self,
        holder: Holder,
        client: UpstreamClient,
        settings: Settings,
        limiter: RateLimiter | None = None,
        websockets: WebSocketClient | None = None,
        recorder: Recorder | None = None,
        failures: FailureTracker | None = None,
    ) -> None:
        self._holder = holder
        self._recorder = recorder
        self._failures = failures
        self._proxy = Proxy(client, settings, websockets)
        self._limiter = limiter

    async def _forward_limited(
        self,
        request: web.BaseRequest,
        snap: Compiled,
        route: CompiledRoute,
        target: Target,
        tenant: Tenant,
        rid: str,
        limits: Limits,
    ) -> web.StreamResponse:
        """Rate limits, quota and concurrency (429), then forward; the concurrency lease is
        given back however the exchange ends, and every answer carries the limit headers."""
        assert self._limiter is not None
        admission = await self._limiter.admit(limits)
        try:
            return await self._proxy.forward(request, snap, route, target, tenant, rid, admission.headers)
        except GatewayError as exc:
            exc.headers = (*exc.headers, *admission.headers)
            raise
        finally:
            self._limiter.release(admission)

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """Answer one request, then record it: usage, metrics, access log (memory only)."""
        started = time.perf_counter()
        rid = request_id(request)
        try:
            response = await self._answer(request, rid)
        except BaseException:
            # The answer broke off after it had started; aiohttp cuts the connection.
            if self._recorder is not None:
                self._recorder.record(request, None, request.get(ROUTE), request.get(TENANT), rid, started)
            raise
        if self._recorder is not None:
            self._recorder.record(request, response, request.get(ROUTE), request.get(TENANT), rid, started)
        return response

    async def _answer(self, request: web.BaseRequest, rid: str) -> web.StreamResponse:
        snap = self._holder.current
        try:
            if snap is None:
                raise NotReady("no configuration loaded yet")
            target = canonicalise(request.raw_path)
            check_message(request.version, request.headers)
            if target.path in oauth.PATHS:  # the gateway's own endpoints: never shadowed by a route
                return await oauth.serve(request, target.path, snap.auth.token_service, rid)
            headers = request.headers
            host = request_host(headers.get("Host"))
            match = snap.router.match(target.path, request.method, host, headers)
            if match is None:
                raise RouteNotFound("no route matches this request")
            route = match.route
            request[ROUTE] = route
            if request.method not in route.methods:
                raise MethodNotAllowed(snap.router.allow_header(target.path, host, headers))
            try:
                identity = snap.auth.admit(headers, target.raw_query, route)
            except GatewayError as exc:
                if self._failures is not None:
                    self._failures.add(self._proxy.client_ip(request), exc)
                raise
            tenant = identity.tenant if identity is not None else None
            request[TENANT] = tenant
            limit = route.route.max_body_bytes
            if limit and request.content_length is not None and request.content_length > limit:
                raise PayloadTooLarge(f"the request body is larger than this route's limit of {limit} bytes")
            if tenant is not None and self._limiter is not None:
                limits = self._limiter.limits_for(snap, route, tenant)
                if limits is not None:
                    return await self._forward_limited(request, snap, route, target, tenant, rid, limits)
            return await self._proxy.forward(request, snap, route, target, tenant, rid)
        except GatewayError as exc:
            if exc.tenant is not None:
                request[TENANT] = exc.tenant
            return error_response(exc, rid)

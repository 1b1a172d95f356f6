"""The per-request path, top to bottom.

    snap   = holder.current                      one reference read; the request finishes on it
    target = canonicalise(raw target)            400 on anything ambiguous
    match  = snap.router.match(path, method)     404 / 405
    tenant = authenticate(X-API-Key, snap)       401; inactive tenant 403
    proxy  = forward(route, target, tenant)      502 / 504

Every failure is a :class:`~data_plane.errors.GatewayError`, turned into the SPEC's error
body by :func:`error_response` — the one place statuses become responses.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from typing import Final

from aiohttp import web

from data_plane.auth import apikey
from data_plane.errors import (
    BadRequest,
    Forbidden,
    GatewayError,
    MethodNotAllowed,
    NotReady,
    PayloadTooLarge,
    RouteNotFound,
    Unauthenticated,
)
from data_plane.proxy import Proxy
from data_plane.request import canonicalise
from data_plane.router import CompiledRoute, request_host
from data_plane.snapshot import Compiled, Holder
from data_plane.upstream.client import UpstreamClient
from shared.settings import Settings
from shared.snapshot import Tenant

log = logging.getLogger(__name__)

_REQUEST_ID: Final = re.compile(r"^[A-Za-z0-9._\-]{1,128}$")
_WWW_AUTHENTICATE: Final = 'ApiKey realm="tenantgate", header="X-API-Key"'


def request_id(request: web.BaseRequest) -> str:
    sent = request.headers.get("X-Request-ID")
    if sent is not None and _REQUEST_ID.match(sent):
        return sent
    return uuid.uuid4().hex


def error_response(exc: GatewayError, rid: str) -> web.Response:
    body = json.dumps({"error": {"code": exc.code, "message": exc.message, "request_id": rid}})
    response = web.Response(status=exc.status, text=body, content_type="application/json")
    response.headers["X-Request-ID"] = rid
    for name, value in exc.headers:
        response.headers[name] = value
    if isinstance(exc, Unauthenticated):
        response.headers["WWW-Authenticate"] = _WWW_AUTHENTICATE
    elif isinstance(exc, MethodNotAllowed):
        response.headers["Allow"] = ", ".join(exc.allow)
    elif isinstance(exc, NotReady):
        response.headers["Retry-After"] = "1"
    return response


class Pipeline:
    def __init__(self, holder: Holder, client: UpstreamClient, settings: Settings) -> None:
        self._holder = holder
        self._proxy = Proxy(client, settings)

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        rid = request_id(request)
        snap = self._holder.current
        try:
            if snap is None:
                raise NotReady("no configuration loaded yet")
            target = canonicalise(request.raw_path)
            headers = request.headers
            host = request_host(headers.get("Host"))
            match = snap.router.match(target.path, request.method, host, headers)
            if match is None:
                raise RouteNotFound("no route matches this request")
            route = match.route
            if request.method not in route.methods:
                raise MethodNotAllowed(snap.router.allow_header(target.path, host, headers))
            tenant = self._authenticate(request, snap, route)
            if route.tenants or route.tiers or route.scopes:
                authorise(route, tenant)
            limit = route.route.max_body_bytes
            if limit and request.content_length is not None and request.content_length > limit:
                raise PayloadTooLarge(f"the request body is larger than this route's limit of {limit} bytes")
            return await self._proxy.forward(request, snap, route, target, tenant, rid)
        except GatewayError as exc:
            return error_response(exc, rid)

    @staticmethod
    def _authenticate(request: web.BaseRequest, snap: Compiled, route: CompiledRoute) -> Tenant | None:
        keys = request.headers.getall(apikey.HEADER, ())
        if len(keys) > 1:
            raise BadRequest("more than one X-API-Key header", code="conflicting_credentials")
        if not keys:
            if route.route.auth_required:
                raise Unauthenticated("missing credentials: send X-API-Key", code="missing_credentials")
            return None
        tenant = apikey.authenticate(keys[0], snap)
        if not tenant.is_active:
            raise Forbidden("this tenant is inactive", code="tenant_inactive")
        return tenant


def authorise(route: CompiledRoute, tenant: Tenant | None) -> None:
    """The route's access rules: which tenants, which tiers, which JWT scopes."""
    if tenant is None:
        raise Unauthenticated("this route needs credentials: send X-API-Key", code="missing_credentials")
    if route.tenants and tenant.id not in route.tenants:
        raise Forbidden("this tenant may not use this route", code="tenant_not_allowed")
    if route.tiers and tenant.tier not in route.tiers:
        raise Forbidden("this tenant's tier may not use this route", code="tier_not_allowed")
    if route.scopes:
        # Scopes come only with a JWT; an API key grants none.
        raise Forbidden("this route requires token scopes that an API key does not carry", code="insufficient_scope")

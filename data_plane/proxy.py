"""Forwarding an admitted request to its upstream and streaming the answer back.

Only what the pipeline admitted reaches here: the route, the canonical target that was
matched, and the authenticated tenant. The upstream URL is built from the raw path that was
matched (see :meth:`Target.url`), so nothing between authorisation and the upstream can
re-normalise it.
"""

from __future__ import annotations

import logging
import time
from ipaddress import ip_address
from typing import Any, Final

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from data_plane import websocket
from data_plane.errors import PayloadTooLarge, UpstreamError, UpstreamUnavailable
from data_plane.metrics import UPSTREAM_TIME
from data_plane.request import CONTINUE, Target, expects_continue, strip_segments
from data_plane.router import CompiledRoute
from data_plane.snapshot import Compiled
from data_plane.upstream.client import HOP_BY_HOP, BodyCounter, UpstreamBrokenOff, UpstreamClient
from data_plane.upstream.dispatch import Dispatcher, RequestBody
from data_plane.upstream.http1 import Response
from data_plane.upstream.websocket import WebSocketClient
from shared.settings import Settings
from shared.snapshot import Tenant

log = logging.getLogger(__name__)

# Never forwarded from the client: the gateway's credentials (it consumed them; an upstream
# must trust X-Tenant-ID instead; an ``Authorization: Bearer`` is dropped in
# ``_upstream_headers``, other schemes are the upstream's own business), identities and
# client addresses only the gateway may assert,
# values the gateway sets itself, method overrides (the method that was authorised is the
# one sent) and the path overrides some frameworks honour (X-Original-URL, X-Rewrite-URL),
# which would let a client reach a path other than the one that was authorised.
_DROP_REQUEST: Final = HOP_BY_HOP | {
    "host",
    "x-api-key",
    "x-request-id",
    "expect",
    "forwarded",
    "x-real-ip",
    "x-http-method-override",
    "x-method-override",
    "x-http-method",
    "x-original-url",
    "x-rewrite-url",
}
_DROP_PREFIXES: Final = ("x-tenant-", "x-consumer-", "x-forwarded-")
_DROP_RESPONSE: Final = HOP_BY_HOP


class Proxy:
    def __init__(self, client: UpstreamClient, settings: Settings, websockets: WebSocketClient | None = None) -> None:
        self._client = client
        self._dispatcher = Dispatcher(client)
        self._websockets = websockets
        self._trusted = settings.trusted_proxies

    async def forward(
        self,
        request: web.BaseRequest,
        snap: Compiled,
        route: CompiledRoute,
        target: Target,
        tenant: Tenant | None,
        rid: str,
        extra_headers: tuple[tuple[str, str], ...] = (),
    ) -> web.StreamResponse:
        """``extra_headers`` are set on the response after the upstream's (e.g. RateLimit)."""
        pool = snap.upstreams[route.route.id]
        raw_path = strip_segments(target.raw_path, route.strip_count) if route.route.strip_prefix else target.raw_path
        headers = self._upstream_headers(request, tenant, rid)
        key = (
            pool.hash_key(tenant.id if tenant is not None else None, self.client_ip(request), request.headers)
            if pool.hash_on
            else None
        )
        if route.route.websocket and self._websockets is not None and websocket.is_upgrade(request.headers):
            url = self._dispatcher.choose_url(pool, raw_path, target.raw_query, key)
            return await websocket.relay(
                request, self._websockets, url, CIMultiDict(headers), route.route.timeout_ms / 1000, rid
            )
        if request.body_exists and expects_continue(request.version, request.headers):
            # Admitted: now ask the client for the body (the upstream never sees Expect).
            await request.writer.write(CONTINUE)
        body = RequestBody(request.content, BodyCounter(route.route.max_body_bytes)) if request.body_exists else None
        sent = time.perf_counter()
        try:
            exchange = await self._dispatcher.open(pool, request.method, raw_path, target.raw_query, headers, body, key)
        except UpstreamError:
            if body is not None and body.counter.exceeded:
                raise PayloadTooLarge(
                    f"the request body is larger than this route's limit of {body.counter.limit} bytes"
                ) from None
            raise
        up = exchange.response
        request[UPSTREAM_TIME] = time.perf_counter() - sent  # to response headers, retries included
        try:
            if up.status < 200:
                # A 101 (or other 1xx) as the final answer: this request was not a WebSocket
                # upgrade (Upgrade is never forwarded on plain requests), so it is a broken upstream.
                raise UpstreamUnavailable("the upstream switched protocols unasked", code="upstream_error")
            # A body already here goes out with the head in one write; one still to come must
            # not hold the head back (a stream's client sees the status as soon as it is known).
            response_class = _HeadWithBody if exchange.body_ready else web.StreamResponse
            headers_out = _response_headers(up.headers, extra_headers)
            headers_out.append(("X-Request-ID", rid))
            headers_out.extend(extra_headers)
            response = response_class(status=up.status, reason=up.reason, headers=headers_out)
            whole = exchange.complete_body()
            await response.prepare(request)
            if whole is not None:
                await response.write_eof(whole)  # head and body in one write, no stream to follow
                return response
            client = request.protocol
            paced = client if isinstance(client, PacedHandler) else None
            if paced is not None:
                paced.relay_from(up)
            try:
                async for chunk in exchange.body():
                    await response.write(chunk)
                    if client.writing_paused:
                        # Nothing more is read until the client has taken this: aiohttp's own
                        # write waits only every 64 KiB written, so a stalled client would
                        # get one more chunk queued for it first.
                        await request.writer.drain()
            except UpstreamBrokenOff as exc:
                # The status line is gone already: all that is left is to cut the connection.
                log.warning("upstream broke off mid-response", extra={"request_id": rid, "error": str(exc)})
                raise
            finally:
                if paced is not None:
                    paced.relay_from(None)
            await response.write_eof()
            return response
        finally:
            # Returns the connection to the pool only if the body was read to its end.
            exchange.close()

    def client_ip(self, request: web.BaseRequest) -> str:
        """The client's address: the peer, or behind trusted proxies the nearest address in
        ``X-Forwarded-For`` that is not one of them (what a client cannot forge by prepending)."""
        peer = request.remote or ""
        if not self._trusted or not _is_trusted(peer, self._trusted):
            return peer
        hops = [hop.strip() for value in request.headers.getall("X-Forwarded-For", ()) for hop in value.split(",")]
        for hop in reversed(hops):
            if hop and not _is_trusted(hop, self._trusted):
                return hop
        return next((hop for hop in hops if hop), peer)

    def _upstream_headers(self, request: web.BaseRequest, tenant: Tenant | None, rid: str) -> list[tuple[str, str]]:
        """The request headers sent upstream, in order: the client's that may go, then the
        gateway's own (every one of those the client sent was dropped, so none is doubled)."""
        incoming = request.headers
        connection_tokens = _connection_tokens(incoming.getall("Connection", ()))
        pairs: list[tuple[str, str]] = []
        for name, value in incoming.items():
            verdict = _REQUEST_VERDICTS.get(name)
            if verdict is None:
                verdict = _request_verdict(name)
            if verdict is _DROP or (verdict is _AUTHORIZATION and _is_bearer(value)):
                continue
            if connection_tokens and name.lower() in connection_tokens:
                continue
            pairs.append((name, value))
        # Every X-Request-ID, X-Tenant-* and X-Forwarded-* the client sent was dropped above:
        # the gateway's own are added, not set over them.
        pairs.append(("X-Request-ID", rid))
        if tenant is not None:
            pairs.append(("X-Tenant-ID", tenant.id))
        peer = request.remote or ""
        forwarded_for = peer
        proto = request.scheme
        host = incoming.get("Host", "")
        if self._trusted and _is_trusted(peer, self._trusted):
            prior = incoming.getall("X-Forwarded-For", ())
            if prior:
                forwarded_for = ", ".join([*prior, peer])
            proto = incoming.get("X-Forwarded-Proto", proto)
            host = incoming.get("X-Forwarded-Host", host)
        pairs.append(("X-Forwarded-For", forwarded_for))
        pairs.append(("X-Forwarded-Proto", proto))
        if host:
            pairs.append(("X-Forwarded-Host", host))
        return pairs


# What a request header's name alone decides, remembered per name as the client spelled it
# (clients send the same few names over and over); bounded so that made-up names cannot grow it.
_KEEP: Final = "keep"
_DROP: Final = "drop"
_AUTHORIZATION: Final = "authorization"  # dropped when it carries a Bearer token
_VERDICTS_MAX: Final = 1024
_REQUEST_VERDICTS: dict[str, str] = {}
_RESPONSE_DROPS: dict[str, bool] = {}


def _request_verdict(name: str) -> str:
    lowered = name.lower()
    if lowered in _DROP_REQUEST or lowered.startswith(_DROP_PREFIXES):
        verdict = _DROP
    else:
        verdict = _AUTHORIZATION if lowered == "authorization" else _KEEP
    if len(_REQUEST_VERDICTS) < _VERDICTS_MAX:
        _REQUEST_VERDICTS[name] = verdict
    return verdict


def _response_headers(upstream: CIMultiDictProxy[str], replaced: tuple[tuple[str, str], ...]) -> list[tuple[str, str]]:
    """The upstream's response headers without hop-by-hop ones, those its ``Connection``
    names, its ``X-Request-ID`` and any of the names in ``replaced``: the gateway sets those
    itself after these (one list, made into the response's multidict once)."""
    connection_tokens = _connection_tokens(upstream.getall("Connection", ()))
    replaced_names = _replaced_names(replaced) if replaced else None
    pairs: list[tuple[str, str]] = []
    for name, value in upstream.items():
        drop = _RESPONSE_DROPS.get(name)
        if drop is None:
            lowered = name.lower()
            drop = lowered in _DROP_RESPONSE or lowered == "x-request-id"
            if len(_RESPONSE_DROPS) < _VERDICTS_MAX:
                _RESPONSE_DROPS[name] = drop
        if drop:
            continue
        if connection_tokens or replaced_names:
            lowered = name.lower()
            if (connection_tokens and lowered in connection_tokens) or (replaced_names and lowered in replaced_names):
                continue
        pairs.append((name, value))
    return pairs


_REPLACED_NAMES: dict[tuple[str, ...], frozenset[str]] = {}


def _replaced_names(replaced: tuple[tuple[str, str], ...]) -> frozenset[str]:
    """The lowered names of ``replaced`` (the same few sets every time: remembered, bounded)."""
    names = tuple([name for name, _ in replaced])
    lowered = _REPLACED_NAMES.get(names)
    if lowered is None:
        lowered = frozenset(name.lower() for name in names)
        if len(_REPLACED_NAMES) < _VERDICTS_MAX:
            _REPLACED_NAMES[names] = lowered
    return lowered


class _HeadWithBody(web.StreamResponse):
    """A response whose head is written together with the first body chunk (or the end of the
    body): one ``write()`` syscall instead of two. aiohttp buffers the head when this class
    attribute is false, as its own ``web.Response`` does; older versions ignore it."""

    _send_headers_immediately = False


def _is_bearer(authorization: str) -> bool:
    scheme = authorization.split(None, 1)
    return bool(scheme) and scheme[0].lower() == "bearer"


_NO_TOKENS: Final[frozenset[str]] = frozenset()
# The tokens of a single Connection value (upstreams send the same "keep-alive" or "close"
# every time): remembered, bounded like the header verdicts.
_CONNECTION_TOKENS: dict[str, frozenset[str]] = {}


def _connection_tokens(values: list[str] | tuple[str, ...]) -> frozenset[str]:
    if not values:
        return _NO_TOKENS
    if len(values) == 1:
        tokens = _CONNECTION_TOKENS.get(values[0])
        if tokens is None:
            tokens = _tokens(values)
            if len(_CONNECTION_TOKENS) < _VERDICTS_MAX:
                _CONNECTION_TOKENS[values[0]] = tokens
        return tokens
    return _tokens(values)


def _tokens(values: list[str] | tuple[str, ...]) -> frozenset[str]:
    return frozenset(token.strip().lower() for value in values for token in value.split(",") if token.strip())


class PacedHandler(web.RequestHandler):
    """A client connection whose flow control reaches the upstream: while a streamed answer
    is relayed to it, the upstream connection the answer comes from is not read while this
    connection's transport takes no more writes (past its high-water mark), and is read again
    once the transport has drained (below its low-water mark). A client slower than its
    upstream sets the pace of both, and one that stops reading holds no more of the answer in
    the gateway than what the two connections buffer, a few hundred KiB: the rest waits in the
    upstream's socket and the upstream itself."""

    __slots__ = ("_source",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._source: Response | None = None

    def relay_from(self, source: Response | None) -> None:
        """The upstream response relayed to this client from now on (None: relaying ended;
        a hold this connection put on the previous one is released)."""
        previous, self._source = self._source, source
        if previous is not None:
            previous.release_hold()
        if source is not None and self.writing_paused:
            source.hold()

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._source is not None:
            self._source.hold()

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._source is not None:
            self._source.release_hold()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._source = None  # the exchange is closed by the request's own end
        super().connection_lost(exc)


def _is_trusted(peer: str, networks: tuple[object, ...]) -> bool:
    try:
        addr = ip_address(peer)
    except ValueError:
        return False
    return any(addr in net for net in networks)  # type: ignore[operator]

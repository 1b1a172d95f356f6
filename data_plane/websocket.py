"""Proxying a WebSocket on a route with ``websocket: true``.

The upgrade request goes through the whole pipeline first (canonical path, route,
credentials, access rules, limits), exactly like any request. Then:

1. the client's handshake is checked (400 if it is not a valid WebSocket upgrade);
2. the upstream handshake is made with the same path, query and cleaned headers, offering the
   client's subprotocols (502/504 if the upstream refuses or is unreachable — the client has
   not been upgraded yet, so it gets a normal error answer);
3. the client is upgraded with the subprotocol the upstream chose, and messages are relayed
   both ways as they come: text, binary, ping and pong (none are answered by the gateway);
4. a close from either side is passed to the other with its code and reason; a side that
   vanishes without a close frame gets the other closed with 1001 (client gone) or 1014
   (upstream gone, "bad gateway"); no message either way for the route's ``timeout_ms``
   closes both with 1001 "idle timeout" (as nginx's read timeout does for Kong); a worker that
   starts draining closes both with 1001 "going away".

An ``Upgrade`` on a route without ``websocket: true`` is not refused: like any hop-by-hop
header it is dropped and the request is proxied as plain HTTP (RFC 9110 §7.8 lets a server
ignore Upgrade). So no upgrade of any kind (``h2c`` included) ever reaches an upstream that
was not declared to take it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Final

from aiohttp import WSCloseCode, WSMsgType, web
from multidict import CIMultiDict, MultiMapping
from yarl import URL

from data_plane.errors import BadRequest
from data_plane.upstream.websocket import MAX_MESSAGE_BYTES, UpstreamWebSocket, WebSocketClient

log = logging.getLogger(__name__)

# Handshake headers each hop makes for itself; never copied from the client to the upstream.
HANDSHAKE_HEADERS: Final = frozenset(
    {"sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions", "sec-websocket-protocol"}
)
_UPSTREAM_GONE: Final = 1014  # RFC 6455 registry: "Bad Gateway"
# Codes that must not appear in a close frame (RFC 6455 §7.4.1); a peer sending none is read as 0.
_NOT_SENDABLE: Final = frozenset({1004, 1005, 1006, 1015})

Peer = web.WebSocketResponse | UpstreamWebSocket


def is_upgrade(headers: MultiMapping[str]) -> bool:
    """Whether the request asks to become a WebSocket (``Upgrade: websocket``)."""
    return headers.get("Upgrade", "").strip().lower() == "websocket"


def client_protocols(headers: MultiMapping[str]) -> tuple[str, ...]:
    values = headers.getall("Sec-WebSocket-Protocol", ())
    return tuple(p.strip() for value in values for p in value.split(",") if p.strip())


async def relay(
    request: web.BaseRequest,
    client: WebSocketClient,
    url: URL,
    headers: CIMultiDict[str],
    idle_timeout_s: float,
    request_id: str,
) -> web.StreamResponse:
    """Upgrade the client, connect the upstream and relay until either side closes."""
    probe = web.WebSocketResponse()
    if not probe.can_prepare(request).ok:
        raise BadRequest("not a valid WebSocket upgrade request", code="bad_websocket_handshake")
    for name in HANDSHAKE_HEADERS:
        headers.popall(name, None)
    upstream = await client.connect(url, headers, client_protocols(request.headers), idle_timeout_s)
    try:
        downstream = web.WebSocketResponse(
            protocols=(upstream.protocol,) if upstream.protocol else (),
            autoping=False,
            autoclose=False,
            compress=False,
            max_msg_size=MAX_MESSAGE_BYTES,
        )
        downstream.headers["X-Request-ID"] = request_id
        await downstream.prepare(request)
        await _bridge(downstream, upstream, idle_timeout_s, client.shutting_down)
        return downstream
    finally:
        if not upstream.closed:
            await upstream.close(code=WSCloseCode.GOING_AWAY)


async def _bridge(
    downstream: web.WebSocketResponse,
    upstream: UpstreamWebSocket,
    idle_timeout_s: float,
    shutting_down: asyncio.Event,
) -> None:
    loop = asyncio.get_running_loop()
    last_activity = [loop.time()]
    from_client = asyncio.create_task(_pump(downstream, upstream, last_activity))
    from_upstream = asyncio.create_task(_pump(upstream, downstream, last_activity))
    shutdown = asyncio.create_task(shutting_down.wait())
    pumps = {from_client, from_upstream}
    try:
        while True:
            remaining = last_activity[0] + idle_timeout_s - loop.time()
            if remaining <= 0 or shutdown.done():
                why = b"idle timeout" if remaining <= 0 else b"going away"
                await asyncio.gather(
                    downstream.close(code=WSCloseCode.GOING_AWAY, message=why),
                    upstream.close(code=WSCloseCode.GOING_AWAY, message=why),
                )
                return
            done, _ = await asyncio.wait({*pumps, shutdown}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            if done & pumps:
                break
        if from_client in done:
            closed_by = _outcome(from_client)
            # Closing one side ends the other pump's pending receive.
            code, reason = closed_by if closed_by is not None else (int(WSCloseCode.GOING_AWAY), "")
            await upstream.close(code=code, message=reason.encode())
            await downstream.close(code=code, message=reason.encode())
        else:
            closed_by = _outcome(from_upstream)
            code, reason = closed_by if closed_by is not None else (_UPSTREAM_GONE, "upstream closed")
            await downstream.close(code=code, message=reason.encode())
            await upstream.close(code=code, message=reason.encode())
    finally:
        for task in (*pumps, shutdown):
            task.cancel()
        await asyncio.gather(*pumps, shutdown, return_exceptions=True)


def _outcome(task: asyncio.Task[tuple[int, str] | None]) -> tuple[int, str] | None:
    if task.cancelled() or task.exception() is not None:
        return None
    return task.result()


async def _pump(source: Peer, sink: Peer, last_activity: list[float]) -> tuple[int, str] | None:
    """Relay messages until ``source`` sends a close frame (its code and reason are returned)
    or goes away without one (None)."""
    loop = asyncio.get_running_loop()
    while True:
        msg = await source.receive()
        last_activity[0] = loop.time()
        kind = msg.type
        if kind is WSMsgType.TEXT:
            await sink.send_str(msg.data)
        elif kind is WSMsgType.BINARY:
            await sink.send_bytes(msg.data)
        elif kind is WSMsgType.PING:
            await sink.ping(msg.data)
        elif kind is WSMsgType.PONG:
            await sink.pong(msg.data)
        elif kind is WSMsgType.CLOSE:
            code = int(msg.data)
            if code < 1000 or code in _NOT_SENDABLE:
                code = int(WSCloseCode.OK)
            return code, msg.extra or ""
        else:  # CLOSING, CLOSED, ERROR: gone without a close frame
            return None

"""data_plane.listener: what the proxy port answers when the pipeline never gets to (a message
aiohttp's parser refuses) or fails unexpectedly: the SPEC error body, never a traceback."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web

from data_plane.listener import proxy_server
from tests.integration.rawhttp import RawResponse, parse

pytestmark = pytest.mark.unit

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


async def _ok(request: web.BaseRequest) -> web.StreamResponse:
    return web.Response(text=f"{request.method} {request.raw_path}")


async def _boom(request: web.BaseRequest) -> web.StreamResponse:
    raise RuntimeError("secret internal detail")


async def _serve(handler: Handler) -> tuple[web.ServerRunner, int]:
    runner = web.ServerRunner(proxy_server(handler), handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server = site._server
    assert isinstance(server, asyncio.base_events.Server)
    port: int = server.sockets[0].getsockname()[1]
    return runner, port


async def _exchange(port: int, data: bytes) -> RawResponse:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), timeout=10)  # the server closes after an error
    writer.close()
    return parse(raw)


@pytest.fixture
async def ok_port() -> AsyncIterator[int]:
    runner, port = await _serve(_ok)
    yield port
    await runner.cleanup()


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("cl-te", b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
        ("crlf-injection", b"GET /a HTTP/1.1\r\nHost: x\r\nX-A: a\rX-B: b\r\n\r\n"),
        ("bad-method", b"G\x01T /a HTTP/1.1\r\nHost: x\r\n\r\n"),
        ("huge-header", b"GET /a HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 20_000 + b"\r\n\r\n"),
    ],
)
async def test_parser_refusal_gets_the_error_body(ok_port: int, name: str, data: bytes) -> None:
    resp = await _exchange(ok_port, data)

    assert resp.status == 400
    error = resp.json()["error"]
    assert error["code"] == "malformed_request"
    assert error["request_id"] == resp.header("X-Request-ID")
    assert b"aaaa" not in resp.body  # the offending bytes are not echoed back


async def test_unexpected_error_is_500_without_detail() -> None:
    runner, port = await _serve(_boom)
    try:
        resp = await _exchange(port, b"GET /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    finally:
        await runner.cleanup()

    assert resp.status == 500
    assert resp.json()["error"]["code"] == "internal_error"
    assert b"secret" not in resp.body and b"Traceback" not in resp.body
    assert json.loads(resp.body)["error"]["request_id"] == resp.header("X-Request-ID")

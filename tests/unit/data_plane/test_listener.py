"""data_plane.listener: what the proxy port answers when the pipeline never gets to (a message
aiohttp's parser refuses) or fails unexpectedly: the SPEC error body, never a traceback."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web

from data_plane import listener
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


async def _refuse_unread(request: web.BaseRequest) -> web.StreamResponse:
    """Answers before reading the body, as the pipeline does for a 413 on Content-Length."""
    return web.Response(status=413, text="too large")


async def _until_closed(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes its side."""
    return await asyncio.wait_for(reader.read(), timeout=10)


@pytest.fixture
async def refusing() -> AsyncIterator[tuple[web.Server, int]]:
    server = proxy_server(_refuse_unread)
    runner = web.ServerRunner(server, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    assert isinstance(site._server, asyncio.base_events.Server)
    yield server, site._server.sockets[0].getsockname()[1]
    await runner.cleanup()


def _send_then_read(port: int, body: int) -> tuple[int, bytes]:
    """A client that sends its whole body before it reads (no Expect: 100-continue)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % body)
        block, sent = b"b" * 65536, 0
        while sent < body:
            sent += sock.send(block[: body - sent])
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return sent, answer


async def test_an_answer_before_the_body_closes_the_connection_once_the_client_sent_it(
    refusing: tuple[web.Server, int],
) -> None:
    server, port = refusing
    sent, answer = await asyncio.to_thread(_send_then_read, port, 32 * 1024 * 1024)

    resp = parse(answer)
    assert sent == 32 * 1024 * 1024  # the body was taken in (and dropped), not refused with a reset
    assert resp.status == 413
    assert resp.header("Connection") == "close"
    await _wait(lambda: not server.connections)  # the handler heard of the connection's end


async def test_a_client_still_sending_gets_the_answer_and_eof_at_once(refusing: tuple[web.Server, int]) -> None:
    _, port = refusing
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n" + b"b" * 65536)

    resp = parse(await _until_closed(reader))  # the server shut its side after the answer

    assert resp.status == 413
    writer.close()


async def test_a_lingering_client_that_goes_quiet_is_closed_after_the_lingering_time(
    refusing: tuple[web.Server, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, port = refusing
    monkeypatch.setattr(listener, "LINGERING_TIME_S", 0.2)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n" + b"b" * 1000)
    assert parse(await _until_closed(reader)).status == 413

    await _wait(lambda: not server.connections)  # closed by the server although the client stays

    assert not writer.is_closing()
    writer.close()


async def test_a_body_that_arrived_whole_keeps_the_connection_alive(refusing: tuple[web.Server, int]) -> None:
    _, port = refusing
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    small = b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
    writer.write(small + small[:-5] + b"hello")  # two requests, each body whole with its head
    head = await asyncio.wait_for(reader.readuntil(b"too large"), timeout=10)
    second = await asyncio.wait_for(reader.readuntil(b"too large"), timeout=10)

    assert b"413" in head and b"413" in second
    assert b"connection: close" not in (head + second).lower()
    writer.close()


async def _wait(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)

"""data_plane.upstream.client against a real local server: the upstream receives the headers
the gateway chose and nothing of the HTTP client's own making."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import RawTestServer
from multidict import CIMultiDict

from data_plane.upstream.client import UpstreamClient, response_body, try_timeout

pytestmark = pytest.mark.unit


async def _echo_headers(request: web.BaseRequest) -> web.Response:
    """Answers with every header line as received, then the body."""
    body = await request.read()
    lines = [f"{name.decode()}: {value.decode()}" for name, value in request.raw_headers]
    return web.Response(text="\n".join([*lines, f"body={body.decode()}"]))


async def _send(method: str, body: AsyncIterator[bytes] | None, headers: CIMultiDict[str]) -> list[str]:
    server = RawTestServer(_echo_headers)
    await server.start_server()
    client = UpstreamClient()
    await client.start()
    try:
        target = server.make_url("/echo").with_query("a=1")
        response = await client.send(method, target, headers, body, try_timeout(5.0))
        text = b"".join([chunk async for chunk in response_body(response)]).decode()
        response.release()
        return text.splitlines()
    finally:
        await client.close()
        await server.close()


async def test_get_carries_exactly_the_given_headers_and_host() -> None:
    lines = await _send("GET", None, CIMultiDict([("X-Request-ID", "r1"), ("X-Tenant-ID", "t1")]))
    names = {line.split(":", 1)[0].lower() for line in lines if ":" in line}
    assert names == {"host", "x-request-id", "x-tenant-id"}
    assert "X-Request-ID: r1" in lines and "body=" in lines


async def test_streamed_post_body_arrives_with_the_clients_framing() -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b"hello "
        yield b"world"

    lines = await _send("POST", body(), CIMultiDict([("Content-Type", "text/plain")]))
    lowered = [line.lower() for line in lines]
    assert "content-type: text/plain" in lowered and "transfer-encoding: chunked" in lowered
    assert not any(line.startswith(("user-agent", "accept")) for line in lowered)
    assert lines[-1] == "body=hello world"


async def test_a_body_without_content_type_goes_as_octet_stream() -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b"x"

    lines = await _send("POST", body(), CIMultiDict())
    assert lines[1:] == ["Content-Type: application/octet-stream", "Transfer-Encoding: chunked", "body=x"]
    assert lines[0].startswith("Host: 127.0.0.1:")

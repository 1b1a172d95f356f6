"""WebSocket proxying through a real data plane to a real upstream: messages of every kind both
ways, close codes and reasons passed on, the idle timeout, credentials checked on the upgrade,
and what a route without ``websocket: true`` does with an upgrade."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import WSMsgType

from tests.integration.harness import wait_for
from tests.integration.proxy_env import ProxyEnv, proxy_env

pytestmark = pytest.mark.integration

RECEIVE_TIMEOUT_S = 10.0


@dataclass
class Env:
    proxy: ProxyEnv
    key: str

    def url(self, path: str) -> str:
        return self.proxy.dp.proxy_url + path


@pytest.fixture(scope="module")
def env(postgres_admin_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp: Path = tmp_path_factory.mktemp("websocket")
    with proxy_env(postgres_admin_url, redis_url, tmp) as proxy:
        tenant = proxy.tenant("Sockets")
        proxy.route(path="/ws/*", websocket=True, timeout_ms=30_000)
        proxy.route(path="/wsidle/*", websocket=True, timeout_ms=1_000)
        proxy.route(path="/plain/*")
        yield Env(proxy, tenant["api_key"])


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def _receive(ws: aiohttp.ClientWebSocketResponse) -> aiohttp.WSMessage:
    return await ws.receive(timeout=RECEIVE_TIMEOUT_S)


async def test_text_and_binary_messages_flow_both_ways(env: Env, session: aiohttp.ClientSession) -> None:
    async with session.ws_connect(
        env.url("/ws/echo?ws=1&case=ws-echo"), headers={"X-API-Key": env.key}, protocols=("chat.v2", "chat.v1")
    ) as ws:
        assert ws.protocol == "chat.v2"  # the upstream's choice, passed back to the client
        rid = ws._response.headers["X-Request-ID"]
        await ws.send_str("hello")
        assert (await _receive(ws)).data == "hello"
        await ws.send_bytes(b"\x00\x01binary\xff")
        msg = await _receive(ws)
        assert (msg.type, msg.data) == (WSMsgType.BINARY, b"\x00\x01binary\xff")
        big = "x" * 1_000_000
        await ws.send_str(big)
        assert (await _receive(ws)).data == big

    (entry,) = env.proxy.seen("case=ws-echo")
    headers = {name.lower(): value for name, value in entry["headers"]}
    assert "x-api-key" not in headers
    assert headers["x-request-id"] == rid
    assert headers["x-forwarded-for"] == "127.0.0.1"
    assert "x-tenant-id" in headers
    assert entry["ws_messages"][0] == "hello"


async def test_pings_and_pongs_are_relayed_not_answered(env: Env, session: aiohttp.ClientSession) -> None:
    async with session.ws_connect(env.url("/ws/ping?ws=1"), headers={"X-API-Key": env.key}, autoping=False) as ws:
        # Client ping: the upstream gets it (and says so), its pong comes back to the client.
        await ws.ping(b"from-client")
        kinds = {}
        for _ in range(2):
            msg = await _receive(ws)
            kinds[msg.type] = msg.data
        assert kinds[WSMsgType.PONG] == b"from-client"
        assert kinds[WSMsgType.TEXT] == "got-ping:from-client"
        # Upstream ping: the client gets it, its pong reaches the upstream.
        await ws.send_str("ping:from-upstream")
        msg = await _receive(ws)
        assert (msg.type, msg.data) == (WSMsgType.PING, b"from-upstream")
        await ws.pong(msg.data)
        assert (await _receive(ws)).data == "pong:from-upstream"


async def test_client_close_code_and_reason_reach_the_upstream(env: Env, session: aiohttp.ClientSession) -> None:
    ws = await session.ws_connect(env.url("/ws/c?ws=1&case=ws-client-close"), headers={"X-API-Key": env.key})
    await ws.send_str("before close")
    assert (await _receive(ws)).data == "before close"
    await ws.close(code=4001, message=b"client says bye")

    assert ws.close_code == 4001
    entry = _wait_for_close(env, "case=ws-client-close")
    assert entry["ws_close"] == [4001, "client says bye"]


async def test_upstream_close_code_and_reason_reach_the_client(env: Env, session: aiohttp.ClientSession) -> None:
    async with session.ws_connect(env.url("/ws/u?ws=1"), headers={"X-API-Key": env.key}) as ws:
        await ws.send_str("close:4002:upstream done")
        msg = await _receive(ws)
        assert (msg.type, msg.data, msg.extra) == (WSMsgType.CLOSE, 4002, "upstream done")


async def test_idle_connection_is_closed_after_the_route_timeout(env: Env, session: aiohttp.ClientSession) -> None:
    async with session.ws_connect(env.url("/wsidle/x?ws=1&case=ws-idle"), headers={"X-API-Key": env.key}) as ws:
        await ws.send_str("one")
        assert (await _receive(ws)).data == "one"
        msg = await _receive(ws)  # nothing more is sent: the gateway closes after 1 s idle
        assert (msg.type, msg.data, msg.extra) == (WSMsgType.CLOSE, 1001, "idle timeout")
    entry = _wait_for_close(env, "case=ws-idle")
    assert entry["ws_close"] == [1001, "idle timeout"]


async def test_upgrade_without_credentials_is_refused_before_the_upstream(
    env: Env, session: aiohttp.ClientSession
) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError) as exc_info:
        await session.ws_connect(env.url("/ws/x?ws=1&case=ws-nokey"))

    assert exc_info.value.status == 401
    assert env.proxy.seen("case=ws-nokey") == []


async def test_upgrade_on_a_route_without_websocket_is_proxied_as_plain_http(
    env: Env, session: aiohttp.ClientSession
) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError) as exc_info:
        await session.ws_connect(env.url("/plain/x?ws=1&case=ws-plain"), headers={"X-API-Key": env.key})

    assert exc_info.value.status == 200  # an ordinary answer, no switch of protocol
    (entry,) = env.proxy.seen("case=ws-plain")
    headers = {name.lower() for name, _ in entry["headers"]}
    assert "upgrade" not in headers and "connection" not in headers


async def test_upstream_refusing_the_upgrade_is_502(env: Env, session: aiohttp.ClientSession) -> None:
    # Without ?ws=1 the recorder answers the handshake with a plain 200.
    with pytest.raises(aiohttp.WSServerHandshakeError) as exc_info:
        await session.ws_connect(env.url("/ws/refuse"), headers={"X-API-Key": env.key})

    assert exc_info.value.status == 502


async def test_invalid_handshake_on_a_websocket_route_is_400(env: Env, session: aiohttp.ClientSession) -> None:
    async with session.get(
        env.url("/ws/bad?ws=1&case=ws-bad-handshake"),
        headers={"X-API-Key": env.key, "Upgrade": "websocket", "Connection": "Upgrade"},  # no key, no version
    ) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["code"] == "bad_websocket_handshake"
    assert env.proxy.seen("case=ws-bad-handshake") == []


def _wait_for_close(env: Env, marker: str) -> dict[str, object]:
    def closed() -> dict[str, object] | None:
        entries = env.proxy.seen(marker)
        return entries[0] if entries and "ws_close" in entries[0] else None

    result: dict[str, object] = wait_for(closed, timeout=10, what=f"the upstream to see the close of {marker}")
    return result

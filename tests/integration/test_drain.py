"""Graceful shutdown of a real data plane: on SIGTERM it stops accepting connections, lets the
requests in flight finish (within TENANTGATE_DRAIN_TIMEOUT_S), then exits cleanly. One control
plane and upstream serve the module; each test starts (and terminates) its own data plane."""

from __future__ import annotations

import asyncio
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from tests.integration.harness import Response, http, wait_for
from tests.integration.proxy_env import ProxyEnv, proxy_env

pytestmark = pytest.mark.integration


@dataclass
class Env:
    proxy: ProxyEnv
    key: str


@pytest.fixture(scope="module")
def env(postgres_admin_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp: Path = tmp_path_factory.mktemp("drain")
    with proxy_env(postgres_admin_url, redis_url, tmp) as proxy:
        key = proxy.tenant("Drained")["api_key"]
        proxy.route(path="/slow/*", timeout_ms=60_000)
        proxy.route(path="/ws/*", websocket=True, timeout_ms=60_000)
        yield Env(proxy, key)


@pytest.fixture
def draining(env: Env, request: pytest.FixtureRequest) -> Iterator[ProxyEnv]:
    """A data plane of the test's own, with the drain timeout the test is parametrised with."""
    proxy = env.proxy.with_data_plane(TENANTGATE_DRAIN_TIMEOUT_S=str(request.param))
    try:
        yield proxy
    finally:
        proxy.dp.proc.stop()


def _refuses_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except ConnectionRefusedError:
        return True


def _in_background(proxy: ProxyEnv, path: str, key: str) -> tuple[threading.Thread, list[Response | BaseException]]:
    result: list[Response | BaseException] = []

    def run() -> None:
        try:
            result.append(http("GET", proxy.dp.proxy_url + path, headers={"X-API-Key": key}, timeout=30))
        except BaseException as exc:  # handed to the test thread
            result.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


@pytest.mark.parametrize("draining", [8], indirect=True)
def test_sigterm_finishes_requests_in_flight_and_refuses_new_ones(env: Env, draining: ProxyEnv) -> None:
    thread, result = _in_background(draining, "/slow/x?sleep=3&case=in-flight", env.key)
    wait_for(lambda: draining.seen("case=in-flight"), timeout=10, what="the slow request to reach the upstream")

    sent_at = time.monotonic()
    draining.dp.proc.popen.send_signal(signal.SIGTERM)
    wait_for(lambda: _refuses_connections(draining.port), timeout=5, what="the listener to close")
    readyz = http("GET", draining.dp.status_url + "/readyz")
    assert (readyz.status, readyz.json()["error"]["code"]) == (503, "draining")
    thread.join(timeout=30)

    assert result, "the request in flight got no answer"
    answer = result[0]
    assert isinstance(answer, Response), answer
    assert answer.status == 200
    assert answer.json()["query"] == "sleep=3&case=in-flight"
    assert draining.dp.proc.popen.wait(timeout=15) == 0
    assert time.monotonic() - sent_at < 8  # it left as soon as the request was done
    assert _refuses_connections(draining.port)


@pytest.mark.parametrize("draining", [1], indirect=True)
def test_drain_is_bounded_by_the_drain_timeout(env: Env, draining: ProxyEnv) -> None:
    thread, result = _in_background(draining, "/slow/x?sleep=30&case=stuck", env.key)
    wait_for(lambda: draining.seen("case=stuck"), timeout=10, what="the stuck request to reach the upstream")

    sent_at = time.monotonic()
    draining.dp.proc.popen.send_signal(signal.SIGTERM)
    code = draining.dp.proc.popen.wait(timeout=15)
    waited = time.monotonic() - sent_at
    thread.join(timeout=15)

    assert code == 0
    assert waited < 10, f"the worker took {waited:.1f}s to exit with a 1 s drain timeout"
    # The request that outlived the drain was cut, not answered.
    assert result and not (isinstance(result[0], Response) and result[0].status == 200)


@pytest.mark.parametrize("draining", [30], indirect=True)
def test_sigterm_closes_open_websockets_with_going_away(env: Env, draining: ProxyEnv) -> None:
    async def talk_then_terminate() -> aiohttp.WSMessage:
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(
                draining.dp.proxy_url + "/ws/x?ws=1&case=ws-drain", headers={"X-API-Key": env.key}
            ) as ws,
        ):
            await ws.send_str("hi")
            assert (await ws.receive(timeout=10)).data == "hi"
            draining.dp.proc.popen.send_signal(signal.SIGTERM)
            return await ws.receive(timeout=10)

    sent_at = time.monotonic()
    msg = asyncio.run(talk_then_terminate())

    assert (msg.type, msg.data, msg.extra) == (aiohttp.WSMsgType.CLOSE, 1001, "going away")
    assert draining.dp.proc.popen.wait(timeout=15) == 0
    assert time.monotonic() - sent_at < 10  # closed at once, not after the 30 s drain timeout
    entry = wait_for(
        lambda: next((e for e in draining.seen("case=ws-drain") if "ws_close" in e), None),
        timeout=10,
        what="the upstream to see the close",
    )
    assert entry["ws_close"] == [1001, "going away"]

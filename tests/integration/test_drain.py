"""Graceful shutdown of a real data plane: on SIGTERM it stops accepting connections, lets the
requests in flight finish (within TENANTGATE_DRAIN_TIMEOUT_S), then exits cleanly."""

from __future__ import annotations

import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from tests.integration.harness import Response, http, wait_for
from tests.integration.proxy_env import ProxyEnv, proxy_env

pytestmark = pytest.mark.integration


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


def test_sigterm_finishes_requests_in_flight_and_refuses_new_ones(
    postgres_admin_url: str, redis_url: str, tmp_path: Path
) -> None:
    with proxy_env(postgres_admin_url, redis_url, tmp_path, TENANTGATE_DRAIN_TIMEOUT_S="8") as proxy:
        key = proxy.tenant("Drained")["api_key"]
        proxy.route(path="/slow/*", timeout_ms=30_000)
        thread, result = _in_background(proxy, "/slow/x?sleep=2&case=in-flight", key)
        wait_for(lambda: proxy.seen("case=in-flight"), timeout=10, what="the slow request to reach the upstream")

        sent_at = time.monotonic()
        proxy.dp.proc.popen.send_signal(signal.SIGTERM)
        wait_for(lambda: _refuses_connections(proxy.port), timeout=5, what="the listener to close")
        thread.join(timeout=30)

        assert result, "the request in flight got no answer"
        answer = result[0]
        assert isinstance(answer, Response), answer
        assert answer.status == 200
        assert answer.json()["query"] == "sleep=2&case=in-flight"
        assert proxy.dp.proc.popen.wait(timeout=15) == 0
        assert time.monotonic() - sent_at < 8  # it left as soon as the request was done
        assert _refuses_connections(proxy.port)


def test_drain_is_bounded_by_the_drain_timeout(postgres_admin_url: str, redis_url: str, tmp_path: Path) -> None:
    with proxy_env(postgres_admin_url, redis_url, tmp_path, TENANTGATE_DRAIN_TIMEOUT_S="1") as proxy:
        key = proxy.tenant("Stuck")["api_key"]
        proxy.route(path="/slow/*", timeout_ms=60_000)
        thread, result = _in_background(proxy, "/slow/x?sleep=30&case=stuck", key)
        wait_for(lambda: proxy.seen("case=stuck"), timeout=10, what="the stuck request to reach the upstream")

        sent_at = time.monotonic()
        proxy.dp.proc.popen.send_signal(signal.SIGTERM)
        code = proxy.dp.proc.popen.wait(timeout=15)
        waited = time.monotonic() - sent_at
        thread.join(timeout=15)

        assert code == 0
        assert waited < 10, f"the worker took {waited:.1f}s to exit with a 1 s drain timeout"
        # The request that outlived the drain was cut, not answered.
        assert result and not (isinstance(result[0], Response) and result[0].status == 200)

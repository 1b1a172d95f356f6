"""Closed failure mode against a Redis that is up and healthy but not instant: a data plane must
answer 503 only when Redis is unreachable (SPEC §4), so a healthy Redis behind a slower link, or
a node that has just started, must not turn requests into 503s."""

from __future__ import annotations

import signal
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.integration.harness import (
    ControlPlane,
    DataPlane,
    Processes,
    http,
    start_control_plane,
    start_data_plane,
    start_echo,
    wait_for,
)
from tests.resilience.support import Figures, SlowLink, respawn

pytestmark = [pytest.mark.resilience, pytest.mark.integration]

REQUESTS = 20


@dataclass
class Gateway:
    cp: ControlPlane
    key: str
    echo: str


@pytest.fixture
def gateway(procs: Processes, database_url: str) -> Gateway:
    cp = start_control_plane(procs, database_url)
    echo = start_echo(procs)
    tenant = cp.api("POST", "/admin/tenants", {"name": "closed-mode", "tier": "enterprise"})
    assert tenant.status == 201, tenant.body
    route = cp.api("POST", "/admin/routes", {"path": "/svc/*", "upstream": echo})
    assert route.status == 201, route.body
    return Gateway(cp, tenant.json()["api_key"], echo)


@pytest.fixture
def link(redis_url: str, request: pytest.FixtureRequest) -> Iterator[tuple[SlowLink, str]]:
    """The test's Redis behind a link that delays each command by the parametrised seconds."""
    parts = urlsplit(redis_url)
    slow = SlowLink(parts.port or 6379, request.param)
    try:
        yield slow, urlunsplit(parts._replace(netloc=f"127.0.0.1:{slow.port}"))
    finally:
        slow.stop()


def _closed_data_plane(procs: Processes, gateway: Gateway, redis: str, **env: str) -> DataPlane:
    dp = start_data_plane(procs, gateway.cp.cluster_addr, redis, TENANTGATE_RATELIMIT_FAILURE_MODE="closed", **env)
    wait_for(lambda: dp.status()["redis_ok"], what="the data plane to reach Redis")
    return dp


@pytest.mark.parametrize("link", [0.06], indirect=True)
def test_closed_mode_serves_while_a_healthy_redis_answers_in_60ms(
    procs: Processes, gateway: Gateway, link: tuple[SlowLink, str], figures: Figures
) -> None:
    dp = _closed_data_plane(procs, gateway, link[1])
    statuses = Counter(dp.get("/svc/x", headers={"X-API-Key": gateway.key}).status for _ in range(REQUESTS))
    redis_ok = dp.status()["redis_ok"]
    figures.add(
        "closed mode, healthy Redis 60 ms away",
        "every request 200",
        statuses == Counter({200: REQUESTS}),
        statuses=dict(statuses),
        redis_ok=redis_ok,
    )
    assert redis_ok
    assert statuses == Counter({200: REQUESTS})


@pytest.mark.parametrize("link", [0.15], indirect=True)
def test_closed_mode_node_answers_from_the_moment_it_is_ready(
    procs: Processes, gateway: Gateway, link: tuple[SlowLink, str], figures: Figures
) -> None:
    dp = _closed_data_plane(procs, gateway, link[1], TENANTGATE_RATELIMIT_TIMEOUT_MS="2000")
    assert dp.get("/svc/x", headers={"X-API-Key": gateway.key}).status == 200
    assert dp.proc.stop(signal.SIGTERM) == 0
    dp.proc = respawn(procs, dp.proc, ["-m", "data_plane"])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if http("GET", dp.status_url + "/readyz", timeout=1).status == 200:
                break
        except OSError:
            continue
    statuses = Counter(dp.get("/svc/x", headers={"X-API-Key": gateway.key}).status for _ in range(5))
    figures.add(
        "closed mode, first requests after a restart is ready",
        "every request 200",
        statuses == Counter({200: 5}),
        statuses=dict(statuses),
    )
    assert statuses == Counter({200: 5})

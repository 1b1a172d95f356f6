"""data_plane.upstream.health: thresholds, one checker per target following the snapshot."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from data_plane.upstream.health import HealthMonitor
from data_plane.upstream.pool import Registry, RoutePool, compile_pools
from shared.snapshot import HealthCheck, Route, Upstream

pytestmark = pytest.mark.unit

A, B = "http://a.internal:80", "http://b.internal:80"


class FakeProber:
    """Answers health probes per host; records each (host, path)."""

    def __init__(self) -> None:
        self.status: dict[str, int | None] = {}
        self.probes: list[tuple[str, str]] = []

    async def probe(self, url: Any, timeout_s: float) -> int | None:
        self.probes.append((url.host, url.raw_path))
        return self.status.get(url.host, 200)


class Ticks:
    """A sleep that only yields: each checker does one probe per tick."""

    def __init__(self) -> None:
        self.asked: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.asked.append(seconds)
        await asyncio.sleep(0)


def _route(rid: str, urls: tuple[str, ...], check: HealthCheck | None) -> Route:
    return Route(
        id=rid,
        path=f"/{rid}/*",
        methods=("GET",),
        upstreams=tuple(Upstream(u, 1) for u in urls),
        auth_required=False,
        rate_limit=0,
        timeout_ms=1000,
        strip_prefix=False,
        priority=0,
        health_check=check,
    )


def _monitor(pools: dict[str, RoutePool], registry: Registry) -> tuple[HealthMonitor, FakeProber, Ticks]:
    prober, ticks = FakeProber(), Ticks()
    monitor = HealthMonitor(prober, lambda: pools, registry, random.Random(1), ticks)  # type: ignore[arg-type]
    return monitor, prober, ticks


async def _ticks(n: int) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def test_unhealthy_after_n_failures_and_back_after_m_passes() -> None:
    registry = Registry()
    check = HealthCheck(path="/health?deep=1", interval_s=5, healthy=2, unhealthy=3)
    pools = compile_pools([_route("r1", (A, B), check)], registry)
    monitor, prober, ticks = _monitor(pools, registry)
    a = registry.endpoints[A]
    prober.status["a.internal"] = 503
    monitor.reconcile(pools)
    while sum(1 for host, _ in prober.probes if host == "a.internal") < 2:
        await _ticks(1)
    assert a.healthy  # two failures: not yet
    while sum(1 for host, _ in prober.probes if host == "a.internal") < 3:
        await _ticks(1)
    assert not a.healthy and registry.endpoints[B].healthy
    prober.status["a.internal"] = 200
    count = len(prober.probes)
    while len(prober.probes) < count + 4:  # two more probes of each target
        await _ticks(1)
    assert a.healthy
    assert ("a.internal", "/health") in prober.probes
    assert all(4.5 <= s <= 5.5 for s in ticks.asked)  # interval_s with ±10 % jitter
    await monitor.stop()


async def test_one_checker_per_target_the_shortest_interval_wins() -> None:
    registry = Registry()
    slow = HealthCheck(path="/slow", interval_s=30, healthy=1, unhealthy=1)
    fast = HealthCheck(path="/fast", interval_s=2, healthy=1, unhealthy=1)
    pools = compile_pools([_route("r1", (A,), slow), _route("r2", (A, B), fast)], registry)
    monitor, prober, _ = _monitor(pools, registry)
    monitor.reconcile(pools)
    await _ticks(3)
    assert {path for _, path in prober.probes} == {"/fast"}
    assert sorted(monitor._checkers) == [A, B]
    await monitor.stop()


async def test_checkers_follow_the_snapshot_and_unchecked_targets_are_healthy() -> None:
    registry = Registry()
    check = HealthCheck(path="/health", interval_s=1, healthy=1, unhealthy=1)
    first = compile_pools([_route("r1", (A, B), check)], registry)
    monitor, prober, _ = _monitor(first, registry)
    prober.status["b.internal"] = 500
    monitor.reconcile(first)
    await _ticks(3)
    b = registry.endpoints[B]
    assert not b.healthy

    # The next snapshot drops the health check and target A: A's checker stops, B is no
    # longer judged (so healthy), and the registry forgets A.
    second = compile_pools([_route("r1", (B,), None)], registry)
    monitor.reconcile(second)
    await _ticks(3)
    assert monitor._checkers == {}
    assert b.healthy and registry.endpoints[B] is b
    assert A not in registry.endpoints

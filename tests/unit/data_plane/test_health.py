"""data_plane.upstream.health: thresholds, one checker per target following the snapshot."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
from typing import Any

import pytest

from data_plane.upstream import health
from data_plane.upstream.endpoint import Endpoint
from data_plane.upstream.health import HealthMonitor
from data_plane.upstream.pool import Registry, RoutePool, compile_pools
from shared.snapshot import CircuitBreaker, HealthCheck, Route, Upstream

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


def _shaped(rid: str, rng: random.Random) -> Route:
    """A route with 1 to 3 of six targets, maybe a check (one of three), retries, a breaker."""
    checks = (
        None,
        HealthCheck(path="/a", interval_s=5, healthy=1, unhealthy=1),
        HealthCheck(path="/b", interval_s=2, healthy=1, unhealthy=1),
        HealthCheck(path="/c", interval_s=5, healthy=2, unhealthy=2),
    )
    urls = tuple(rng.sample([f"http://t{i}.internal:80" for i in range(6)], rng.randint(1, 3)))
    breaker = rng.choice((None, CircuitBreaker(0.5, 10, 10, 5, 1), CircuitBreaker(0.9, 5, 10, 5, 1)))
    return dataclasses.replace(
        _route(rid, urls, rng.choice(checks)), retries=rng.choice((0, 1)), circuit_breaker=breaker
    )


def _rebuilt(pools: dict[str, RoutePool]) -> dict[str, tuple[HealthCheck, Endpoint]]:
    """The checkers a monitor starting afresh would run: per target, the check with the
    shortest interval, then of the lowest route id."""
    wanted: dict[str, tuple[HealthCheck, Endpoint]] = {}
    for route_id in sorted(pools):
        check = pools[route_id].health_check
        if check is None:
            continue
        for member in pools[route_id].members:
            held = wanted.get(member.endpoint.url)
            if held is None or check.interval_s < held[0].interval_s:
                wanted[member.endpoint.url] = (check, member.endpoint)
    return wanted


async def test_following_changes_gives_what_a_rebuild_gives() -> None:
    rng = random.Random(7)
    registry = Registry()
    routes = {f"r{i:02d}": _shaped(f"r{i:02d}", rng) for i in range(30)}
    pools = compile_pools(routes.values(), registry)
    monitor, _, _ = _monitor(pools, registry)
    monitor.reconcile(pools)
    tasks = dict(monitor._checkers)
    for step in range(60):
        if step % 10 == 9:  # a whole new table: every pool new, same routes
            pools = compile_pools(routes.values(), registry)
        else:  # a delta: a few routes changed, added or removed; the other pools shared
            pools = dict(pools)
            for _ in range(rng.randint(1, 4)):
                rid = f"r{rng.randrange(40):02d}"
                if rid in pools and rng.random() < 0.3:
                    del pools[rid]
                    routes.pop(rid)
                else:
                    routes[rid] = _shaped(rid, rng)
                    pools.update(compile_pools([routes[rid]], registry))
        monitor.reconcile(pools)
        want = _rebuilt(pools)
        assert {url: (c, e) for url, (c, e, _) in monitor._checkers.items()} == want
        # A checker whose target and check did not change kept running.
        for url, (_, _, task) in monitor._checkers.items():
            if url in tasks and tasks[url][:2] == monitor._checkers[url][:2]:
                assert task is tasks[url][2]
        tasks = dict(monitor._checkers)
        # Every member uses the registry's state for its target (shared, kept across snapshots).
        for pool in pools.values():
            for member in pool.members:
                assert registry.endpoints[member.endpoint.url] is member.endpoint
                if member.breaker is not None:
                    assert registry.breakers[(member.endpoint.url, member.breaker.config)] is member.breaker
        # Once nothing else is being compiled, the registry holds exactly what the pools name.
        monitor.reconcile(pools)
        named = {m.endpoint.url for p in pools.values() for m in p.members}
        assert set(registry.endpoints) == named
        assert set(registry.breakers) == {
            (m.endpoint.url, m.breaker.config) for p in pools.values() for m in p.members if m.breaker is not None
        }
        assert {rid for rid, p in pools.items() if p.budget is not None} <= set(registry.budgets) <= set(pools)
        for url in {f"http://t{i}.internal:80" for i in range(6)} - named:
            assert url not in monitor._claims and url not in monitor._checkers
    await monitor.stop()


async def test_state_a_compile_asked_for_outlives_one_pruning() -> None:
    registry = Registry()
    check = HealthCheck(path="/health", interval_s=1, healthy=1, unhealthy=1)
    current = compile_pools([_route("r1", (A,), check)], registry)
    monitor, _, _ = _monitor(current, registry)
    monitor.reconcile(current)
    # Compiled but not current yet (a compile still running, or a snapshot to be rejected).
    pending = compile_pools([_route("r2", (B,), None)], registry)
    b = registry.endpoints[B]
    monitor.reconcile(current)
    assert registry.endpoints[B] is b
    monitor.reconcile(current)
    assert B not in registry.endpoints and A in registry.endpoints
    del pending
    await monitor.stop()


async def test_a_whole_table_is_followed_in_slices_between_other_tasks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(health, "STEP_S", 0.0)  # yield after every slice
    registry = Registry()
    check = HealthCheck(path="/health", interval_s=1, healthy=1, unhealthy=1)
    routes = [_route(f"r{i}", (A, B), check if i % 7 == 0 else None) for i in range(2000)]
    pools = {"now": compile_pools(routes, registry)}
    slices = len(routes) // health.STEP_ROUTES

    async def idle(seconds: float) -> None:
        await asyncio.sleep(0)

    monitor = HealthMonitor(FakeProber(), lambda: pools["now"], registry, random.Random(1), idle)  # type: ignore[arg-type]
    steps = sum(1 for _ in monitor.reconciling(compile_pools(routes, Registry())))
    assert steps >= 2 * slices  # walked in slices, not all at once
    running = asyncio.create_task(monitor.run())
    while len(monitor._held) < len(routes):
        await asyncio.sleep(0)
    first = set(monitor._held.values())
    pools["now"] = compile_pools(routes, registry)  # a whole new table
    turns = 0
    while set(monitor._held.values()) & first:
        turns += 1
        await asyncio.sleep(0)
    assert turns >= slices  # other tasks ran while the monitor followed the table
    assert sorted(monitor._checkers) == [A, B]
    running.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await running


async def test_a_route_changing_only_its_check_restarts_the_checker() -> None:
    registry = Registry()
    slow = HealthCheck(path="/slow", interval_s=30, healthy=1, unhealthy=1)
    fast = HealthCheck(path="/fast", interval_s=2, healthy=1, unhealthy=1)
    first = compile_pools([_route("r1", (A,), slow)], registry)
    monitor, prober, _ = _monitor(first, registry)
    monitor.reconcile(first)
    await _ticks(2)
    second = compile_pools([_route("r1", (A,), fast)], registry)  # same target and breaker
    monitor.reconcile(second)
    assert monitor._checkers[A][0] == fast
    count = len(prober.probes)
    await _ticks(2)
    assert ("a.internal", "/fast") in prober.probes[count:]
    third = compile_pools([_route("r1", (A,), None)], registry)
    monitor.reconcile(third)
    assert monitor._checkers == {}
    await monitor.stop()

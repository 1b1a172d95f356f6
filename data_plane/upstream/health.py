"""Active health checks: one checker per target per worker, following the current snapshot.

A target is checked when at least one route naming it has a ``health_check``; if routes
disagree, the setting with the shortest interval wins (then the lowest route id), so one
target is never probed twice. Every ``interval_s`` (±10 % jitter, so workers spread out) the
checker sends ``GET <target base><path>``, bounded by ``min(interval_s, PROBE_TIMEOUT_S)``;
a 2xx or 3xx answer is a pass. ``unhealthy`` failures in a row take the target out of
service, ``healthy`` passes in a row bring it back. Targets start healthy (the first probe
goes out at once), and a target that stops being checked is healthy again.

The monitor notices a new snapshot within ``RECONCILE_S``, starts and stops checkers, and
lets the registry forget targets no route names any more. It works from what changed: the
pools that are not the ones it holds (a delta shares every other pool with the snapshot
before), and only the targets those name. Finding them is one pass over the route ids; a
whole new table (every pool new) is walked in slices of at most ``STEP_S``, yielding to the
event loop in between, so requests never wait on it for long.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Generator, Mapping
from typing import Final

from data_plane.upstream import metrics
from data_plane.upstream.client import UpstreamClient
from data_plane.upstream.endpoint import Endpoint
from data_plane.upstream.pool import REGISTRY, Registry, RoutePool
from shared.snapshot import HealthCheck

RECONCILE_S: Final = 0.25
PROBE_TIMEOUT_S: Final = 5.0
JITTER: Final = 0.1
# The longest the monitor holds the event loop at once while following a new snapshot, and
# how many routes it handles between looks at the clock.
STEP_S: Final = 0.001
STEP_ROUTES: Final = 256

log = logging.getLogger(__name__)

Pools = Mapping[str, RoutePool]


class HealthMonitor:
    def __init__(
        self,
        client: UpstreamClient,
        current: Callable[[], Pools | None],
        registry: Registry = REGISTRY,
        rng: random.Random | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._client = client
        self._sleep = sleep
        self._current = current
        self._registry = registry
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not a secret
        self._seen: Pools | None = None
        # Route id → pool, as of the last snapshot followed (its pools are held by the registry).
        self._held: dict[str, RoutePool] = {}
        # Target URL → route id → (check, endpoint) of each held route checking it, and the
        # route whose check applies (shortest interval, then lowest route id).
        self._claims: dict[str, dict[str, tuple[HealthCheck, Endpoint]]] = {}
        self._winners: dict[str, str] = {}
        self._checkers: dict[str, tuple[HealthCheck, Endpoint, asyncio.Task[None]]] = {}

    async def run(self) -> None:
        """Follow the snapshot until cancelled; then stop every checker."""
        try:
            while True:
                pools = self._current()
                if pools is not None and pools is not self._seen:
                    self._seen = pools
                    started = time.perf_counter()
                    for _ in self.reconciling(pools):
                        if time.perf_counter() - started >= STEP_S:
                            await asyncio.sleep(0)
                            started = time.perf_counter()
                await self._sleep(RECONCILE_S)
        finally:
            await self.stop()

    def reconcile(self, pools: Pools) -> None:
        """:meth:`reconciling` all at once."""
        for _ in self.reconciling(pools):
            pass

    def reconciling(self, pools: Pools) -> Generator[None, None, None]:
        """Make the checkers and the registry follow ``pools``; yields every ``STEP_ROUTES``
        routes (or targets) handled. ``pools`` must not change meanwhile (snapshots never do)."""
        held, registry = self._held, self._registry
        added: list[RoutePool] = []
        dropped: list[RoutePool] = []
        kept = 0
        old: RoutePool | None = None
        for n, (route_id, pool) in enumerate(pools.items(), 1):
            old = held.get(route_id)
            if old is pool:
                kept += 1
            elif old is not None and old.state == pool.state and old.health_check == pool.health_check:
                held[route_id] = pool  # the same targets, breakers and check: nothing to follow
                kept += 1
            else:
                added.append(pool)
                if old is not None:
                    dropped.append(old)
            if n % STEP_ROUTES == 0:
                yield
        old = None
        if kept + len(dropped) < len(held):  # some held routes are gone from the snapshot
            for n, route_id in enumerate(list(held), 1):
                if route_id not in pools:
                    dropped.append(held[route_id])
                if n % STEP_ROUTES == 0:
                    yield
        dirty: set[str] = set()
        # Popped one at a time: a pool nothing else holds any more is freed in its own slice.
        n = 0
        while dropped:
            pool = dropped.pop()
            n += 1
            registry.release(pool)
            self._unclaim(pool, dirty)
            del held[pool.route_id]
            del pool
            if n % STEP_ROUTES == 0:
                yield
        for n, pool in enumerate(added, 1):
            registry.hold(pool)
            self._claim(pool, dirty)
            held[pool.route_id] = pool
            if n % STEP_ROUTES == 0:
                yield
        yield from registry.pruning(STEP_ROUTES)
        for n, url in enumerate(dirty, 1):
            self._follow(url)
            if n % STEP_ROUTES == 0:
                yield

    def _claim(self, pool: RoutePool, dirty: set[str]) -> None:
        check = pool.health_check
        if check is None:
            return
        route_id = pool.route_id
        for member in pool.members:
            url = member.endpoint.url
            claims = self._claims.setdefault(url, {})
            if route_id in claims:  # the route names the target twice: its first member counts
                continue
            claims[route_id] = (check, member.endpoint)
            dirty.add(url)
            winner = self._winners.get(url)
            if winner is None:
                if len(claims) == 1:
                    self._winners[url] = route_id
                # else the winner left in this round: chosen again in _follow
            elif _before(check, route_id, claims[winner][0], winner):
                self._winners[url] = route_id

    def _unclaim(self, pool: RoutePool, dirty: set[str]) -> None:
        if pool.health_check is None:
            return
        route_id = pool.route_id
        for member in pool.members:
            url = member.endpoint.url
            claims = self._claims.get(url)
            if claims is None or claims.pop(route_id, None) is None:
                continue
            dirty.add(url)
            if self._winners.get(url) == route_id:
                del self._winners[url]
            if not claims:
                del self._claims[url]

    def _follow(self, url: str) -> None:
        """Start, keep, restart or stop the checker of ``url`` after its claims changed."""
        claims = self._claims.get(url)
        wanted: tuple[HealthCheck, Endpoint] | None = None
        if claims:
            winner = self._winners.get(url)
            if winner is None:
                winner = self._winners[url] = min(claims, key=lambda rid: (claims[rid][0].interval_s, rid))
            wanted = claims[winner]
        running = self._checkers.get(url)
        if running is not None:
            check, endpoint, task = running
            if wanted is not None and wanted[0] == check and wanted[1] is endpoint:
                return
            task.cancel()
            del self._checkers[url]
            if wanted is None:
                endpoint.healthy = True
                metrics.TARGET_HEALTHY.labels(url).set(1)
        if wanted is not None:
            check, endpoint = wanted
            task = asyncio.create_task(self._check(endpoint, check), name=f"health-check {url}")
            self._checkers[url] = (check, endpoint, task)

    async def stop(self) -> None:
        """Cancel every checker and wait for them to end."""
        tasks = [task for _, _, task in self._checkers.values()]
        self._checkers.clear()
        for task in tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _check(self, endpoint: Endpoint, check: HealthCheck) -> None:
        path, _, query = check.path.partition("?")
        url = endpoint.target.url(path, query)
        timeout_s = min(float(check.interval_s), PROBE_TIMEOUT_S)
        gauge = metrics.TARGET_HEALTHY.labels(endpoint.url)
        gauge.set(1 if endpoint.healthy else 0)
        passes = failures = 0
        while True:
            status = await self._client.probe(url, timeout_s)
            if status is not None and 200 <= status < 400:
                passes, failures = passes + 1, 0
                if not endpoint.healthy and passes >= check.healthy:
                    endpoint.healthy = True
                    gauge.set(1)
                    log.info("upstream target healthy again", extra={"target": endpoint.url})
            else:
                failures, passes = failures + 1, 0
                if endpoint.healthy and failures >= check.unhealthy:
                    endpoint.healthy = False
                    gauge.set(0)
                    log.warning(
                        "upstream target failed its health check",
                        extra={"target": endpoint.url, "status": status, "failures": failures},
                    )
            await self._sleep(check.interval_s * (1 + JITTER * (2 * self._rng.random() - 1)))


def _before(check: HealthCheck, route_id: str, other: HealthCheck, other_id: str) -> bool:
    """Does ``check`` (of ``route_id``) win over ``other``: a shorter interval, then a lower id."""
    return (check.interval_s, route_id) < (other.interval_s, other_id)

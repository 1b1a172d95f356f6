"""Active health checks: one checker per target per worker, following the current snapshot.

A target is checked when at least one route naming it has a ``health_check``; if routes
disagree, the setting with the shortest interval wins (then the lowest route id), so one
target is never probed twice. Every ``interval_s`` (±10 % jitter, so workers spread out) the
checker sends ``GET <target base><path>``, bounded by ``min(interval_s, PROBE_TIMEOUT_S)``;
a 2xx or 3xx answer is a pass. ``unhealthy`` failures in a row take the target out of
service, ``healthy`` passes in a row bring it back. Targets start healthy (the first probe
goes out at once), and a target that stops being checked is healthy again.

The monitor notices a new snapshot within ``RECONCILE_S``, starts and stops checkers, and
lets the registry forget targets no route names any more.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable, Mapping
from typing import Final

from data_plane.upstream import metrics
from data_plane.upstream.client import UpstreamClient
from data_plane.upstream.endpoint import Endpoint
from data_plane.upstream.pool import REGISTRY, Registry, RoutePool
from shared.snapshot import HealthCheck

RECONCILE_S: Final = 0.25
PROBE_TIMEOUT_S: Final = 5.0
JITTER: Final = 0.1

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
        self._checkers: dict[str, tuple[HealthCheck, Endpoint, asyncio.Task[None]]] = {}

    async def run(self) -> None:
        """Follow the snapshot until cancelled; then stop every checker."""
        try:
            while True:
                pools = self._current()
                if pools is not None and pools is not self._seen:
                    self._seen = pools
                    self.reconcile(pools)
                await self._sleep(RECONCILE_S)
        finally:
            await self.stop()

    def reconcile(self, pools: Pools) -> None:
        self._registry.retain(pools.values())
        wanted: dict[str, tuple[HealthCheck, Endpoint]] = {}
        for route_id in sorted(pools):
            pool = pools[route_id]
            check = pool.health_check
            if check is None:
                continue
            for member in pool.members:
                url = member.endpoint.url
                held = wanted.get(url)
                if held is None or check.interval_s < held[0].interval_s:
                    wanted[url] = (check, member.endpoint)
        for url, (check, endpoint, task) in list(self._checkers.items()):
            keep = wanted.get(url)
            if keep is not None and keep[0] == check and keep[1] is endpoint:
                del wanted[url]
                continue
            task.cancel()
            del self._checkers[url]
            if keep is None:
                endpoint.healthy = True
                metrics.TARGET_HEALTHY.labels(url).set(1)
        for url, (check, endpoint) in wanted.items():
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

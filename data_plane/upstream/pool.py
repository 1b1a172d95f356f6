"""Per-route upstream pools, compiled once per snapshot, over target state that outlives snapshots.

    Registry (one per worker, lives as long as the process)
      endpoints   URL → Endpoint        health, ejection, requests in flight
      breakers    (URL, settings) → Breaker
      budgets     route id → RetryBudget
    RoutePool (one per route per snapshot, immutable but for the balancer's own counters)
      members     (Endpoint, Breaker | None, weight) per upstream of the route
      balancer    round robin | least connections | consistent hash

A snapshot that keeps a target keeps its state: the new pool is built over the same
Endpoint and Breaker objects. The health monitor tells the registry which pools became
current (:meth:`Registry.hold`) and which stopped being (:meth:`Registry.release`), then
:meth:`Registry.pruning` forgets what no current route names: the cost follows what changed,
not how many routes there are.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from typing import Final

import aiohttp
from prometheus_client import Gauge

from data_plane.errors import ServiceUnavailable
from data_plane.metrics import BatchedCounter, BatchedHistogram, batched_counter, batched_histogram
from data_plane.upstream import metrics
from data_plane.upstream.balancer import Balancer, ConsistentHash, LeastConnections, RoundRobin
from data_plane.upstream.breaker import Breaker
from data_plane.upstream.client import try_timeout
from data_plane.upstream.endpoint import Endpoint
from data_plane.upstream.retry import RetryBudget
from shared.snapshot import CircuitBreaker as BreakerConfig
from shared.snapshot import HealthCheck, Route

# The deadline for a response head across all tries is this many times the route's timeout:
# one full try, and the retries share one more timeout's worth.
DEADLINE_FACTOR: Final = 2

Clock = Callable[[], float]

log = logging.getLogger(__name__)


class Registry:
    """This worker's upstream state, keyed so that it survives snapshot swaps.

    Snapshots may be compiled in a worker thread while the event loop prunes: the maps are
    changed under a lock (compile time only; the request path never takes it). The state
    objects themselves are touched only by the event loop."""

    def __init__(self, clock: Clock = time.monotonic, rng: random.Random | None = None) -> None:
        self.clock = clock
        self.rng = rng or random.Random()  # noqa: S311 - load balancing, not a secret
        self.endpoints: dict[str, Endpoint] = {}
        self.breakers: dict[tuple[str, BreakerConfig], Breaker] = {}
        self.budgets: dict[str, RetryBudget] = {}
        self._lock = threading.Lock()
        # What was asked for since the last pruning (URLs, route ids, new breakers): a compile
        # running meanwhile (for a snapshot not yet current) must not lose it.
        self._touched_urls: set[str] = set()
        self._touched_routes: set[str] = set()
        self._touched_breakers: set[tuple[str, BreakerConfig]] = set()
        # How many members of the held pools name each URL and breaker, and the held pools'
        # route ids; event loop only.
        self._held_urls: dict[str, int] = {}
        self._held_breakers: dict[tuple[str, BreakerConfig], int] = {}
        self._held_routes: set[str] = set()
        # Keys no held pool names any more, and keys kept by the last pruning although no held
        # pool names them (asked for meanwhile): the only ones a pruning has to look at.
        self._loose_urls: set[str] = set()
        self._loose_breakers: set[tuple[str, BreakerConfig]] = set()
        self._loose_routes: set[str] = set()

    def endpoint(self, url: str) -> Endpoint:
        with self._lock:
            self._touched_urls.add(url)
            endpoint = self.endpoints.get(url)
            if endpoint is None:
                endpoint = self.endpoints[url] = Endpoint(url)
            return endpoint

    def breaker(self, url: str, config: BreakerConfig) -> Breaker:
        with self._lock:
            return self._breaker(url, config)

    def _breaker(self, url: str, config: BreakerConfig) -> Breaker:
        key = (url, config)
        breaker = self.breakers.get(key)
        if breaker is None:
            state = metrics.BREAKER_STATE.labels(url)
            state.set(0)

            def changed(new: int, state: Gauge = state, url: str = url) -> None:
                state.set(new)
                metrics.BREAKER_TRANSITIONS.labels(url, ("closed", "half_open", "open")[new]).inc()

            breaker = self.breakers[key] = Breaker(config, changed)
            self._touched_breakers.add(key)
        return breaker

    def budget(self, route_id: str) -> RetryBudget:
        with self._lock:
            self._touched_routes.add(route_id)
            budget = self.budgets.get(route_id)
            if budget is None:
                budget = self.budgets[route_id] = RetryBudget()
            return budget

    # -- following the current snapshot (event loop) ----------------------------------------

    def hold(self, pool: RoutePool) -> None:
        """``pool`` is part of the current snapshot: keep what it names."""
        self._held_routes.add(pool.route_id)
        urls, breakers = self._held_urls, self._held_breakers
        for member in pool.members:
            url = member.endpoint.url
            urls[url] = urls.get(url, 0) + 1
            if member.breaker is not None:
                key = (url, member.breaker.config)
                breakers[key] = breakers.get(key, 0) + 1

    def release(self, pool: RoutePool) -> None:
        """``pool`` (held before) is no longer part of the current snapshot."""
        self._held_routes.discard(pool.route_id)
        self._loose_routes.add(pool.route_id)
        urls, breakers = self._held_urls, self._held_breakers
        for member in pool.members:
            url = member.endpoint.url
            left = urls[url] - 1
            if left:
                urls[url] = left
            else:
                del urls[url]
                self._loose_urls.add(url)
            if member.breaker is not None:
                key = (url, member.breaker.config)
                left = breakers[key] - 1
                if left:
                    breakers[key] = left
                else:
                    del breakers[key]
                    self._loose_breakers.add(key)

    def pruning(self, step: int = 256) -> Generator[None, None, None]:
        """Forget state no held pool refers to and no compile asked for since the previous
        pruning; yields every ``step`` keys looked at (only the loose and the asked-for ones)."""
        with self._lock:
            urls, self._touched_urls = self._touched_urls, set()
            routes, self._touched_routes = self._touched_routes, set()
            new_breakers, self._touched_breakers = self._touched_breakers, set()
        loose_urls, self._loose_urls = self._loose_urls | urls, set()
        loose_breakers, self._loose_breakers = self._loose_breakers | new_breakers, set()
        loose_routes, self._loose_routes = self._loose_routes | routes, set()
        # Asked for since the sets were swapped: kept too (and looked at again next time).
        asked_urls, asked_routes = self._touched_urls, self._touched_routes
        seen = 0
        for url in loose_urls:
            if url not in self._held_urls:
                with self._lock:
                    if url in urls or url in asked_urls:
                        self._loose_urls.add(url)
                    else:
                        self.endpoints.pop(url, None)
            seen += 1
            if seen % step == 0:
                yield
        for key in loose_breakers:
            if key not in self._held_breakers:
                with self._lock:
                    if key[0] in urls or key[0] in asked_urls:
                        self._loose_breakers.add(key)
                    else:
                        self.breakers.pop(key, None)
            seen += 1
            if seen % step == 0:
                yield
        for route_id in loose_routes:
            if route_id not in self._held_routes:
                with self._lock:
                    if route_id in routes or route_id in asked_routes:
                        self._loose_routes.add(route_id)
                    else:
                        self.budgets.pop(route_id, None)
            seen += 1
            if seen % step == 0:
                yield


# The default registry of this process. Each data plane worker is its own process, so this is
# per worker; tests build their own.
REGISTRY: Final = Registry()


class Member:
    __slots__ = ("_requests", "breaker", "endpoint", "weight")

    def __init__(self, endpoint: Endpoint, breaker: Breaker | None, weight: int) -> None:
        self.endpoint = endpoint
        self.breaker = breaker
        self.weight = weight
        self._requests: dict[str, BatchedCounter] | None = None  # made on the first try: most routes idle

    def count(self, route_id: str, result: str) -> None:
        children = self._requests
        if children is None:
            children = self._requests = {}
        child = children.get(result)
        if child is None:
            child = children[result] = batched_counter(metrics.REQUESTS, route_id, self.endpoint.url, result)
        child.inc()


class RoutePool:
    """One route's targets and how to choose among them."""

    __slots__ = (
        "_latency",
        "balancer",
        "budget",
        "deadline_s",
        "hash_header",
        "hash_on",
        "health_check",
        "members",
        "retries",
        "route_id",
        "state",
        "timeout",
        "timeout_s",
    )

    def __init__(self, route: Route, registry: Registry) -> None:
        self.route_id = route.id
        config = route.circuit_breaker
        self.members = tuple(
            [
                Member(
                    registry.endpoint(u.url),
                    registry.breaker(u.url, config) if config is not None else None,
                    max(1, u.weight),
                )
                for u in route.upstreams
            ]
        )
        # The target state this pool uses: a pool of the next snapshot with the same (and the
        # same health check) needs no bookkeeping when it replaces this one.
        self.state = tuple([(m.endpoint, m.breaker) for m in self.members])
        weights = [m.weight for m in self.members]
        # What consistent hashing keys on: "tenant", "ip" or "header" (+ hash_header); "" otherwise.
        self.hash_on, self.hash_header = "", ""
        if route.load_balancing == "consistent_hash":
            self.hash_on, _, self.hash_header = (route.hash_on or "tenant").partition(":")
        self.balancer: Balancer
        if route.load_balancing == "least_connections":
            self.balancer = LeastConnections([m.endpoint for m in self.members], weights, registry.rng)
        elif route.load_balancing == "consistent_hash":
            self.balancer = ConsistentHash([m.endpoint.url for m in self.members], weights)
        else:
            self.balancer = RoundRobin(weights)
        self.retries = route.retries
        self.timeout_s = route.timeout_ms / 1000
        self.timeout: aiohttp.ClientTimeout = try_timeout(self.timeout_s)
        self.deadline_s = self.timeout_s * DEADLINE_FACTOR
        # Only a route that retries needs a budget (and counts its requests).
        self.budget: RetryBudget | None = registry.budget(route.id) if route.retries else None
        self.health_check: HealthCheck | None = route.health_check
        self._latency: BatchedHistogram | None = None

    # -- choosing ------------------------------------------------------------------------

    def hash_key(self, tenant_id: str | None, peer: str | None, headers: Mapping[str, str]) -> bytes | None:
        """The consistent-hash key of a request; None (balance round-robin) when it has none."""
        hash_on = self.hash_on
        if not hash_on:
            return None
        if hash_on == "tenant":
            value = tenant_id
        elif hash_on == "ip":
            value = peer
        else:
            value = headers.get(self.hash_header)
        return value.encode("utf-8", "surrogateescape") if value else None

    def pick(self, now: float, key: bytes | None, tried: Sequence[int] = ()) -> int | None:
        """A member that may take a request now, preferring ones not in ``tried``; None if none may."""
        if len(self.members) == 1:  # the common route: no list, no balancer
            only = self.members[0]
            usable = only.endpoint.in_service(now) and (only.breaker is None or only.breaker.allows(now))
            return 0 if usable else None
        candidates = self._candidates(now, tried)
        if not candidates and tried:
            candidates = self._candidates(now, ())
        if not candidates:
            return None
        return self.balancer.pick(candidates, key)

    def _candidates(self, now: float, tried: Sequence[int]) -> list[int]:
        return [
            i
            for i, m in enumerate(self.members)
            if m.endpoint.in_service(now) and (m.breaker is None or m.breaker.allows(now)) and i not in tried
        ]

    def unavailable(self, now: float) -> ServiceUnavailable:
        """Why no member may take a request: an open circuit, or no healthy target."""
        circuit_waits = [
            m.breaker.retry_after(now) for m in self.members if m.breaker is not None and m.endpoint.in_service(now)
        ]
        if circuit_waits:
            wait = min(circuit_waits)
            self._shed("circuit_open")
            return ServiceUnavailable(
                "the upstream's circuit breaker is open",
                code="circuit_open",
                headers=(("Retry-After", str(wait)),),
            )
        waits = [
            m.endpoint.ejected_until - now if m.endpoint.ejected(now) else self._health_interval() for m in self.members
        ]
        self._shed("no_healthy_upstream")
        return ServiceUnavailable(
            "no healthy upstream target",
            code="no_healthy_upstream",
            headers=(("Retry-After", str(max(1, math.ceil(min(waits, default=1.0))))),),
        )

    def _health_interval(self) -> float:
        return float(self.health_check.interval_s) if self.health_check is not None else 1.0

    def _shed(self, reason: str) -> None:
        metrics.SHED.labels(self.route_id, reason).inc()

    # -- learning ------------------------------------------------------------------------

    def record(self, index: int, ticket: int, ok: bool, now: float) -> None:
        """The outcome of a try: feeds the target's breaker and outlier detection."""
        member = self.members[index]
        if member.breaker is not None:
            member.breaker.record(ticket, ok, now)
        endpoint = member.endpoint
        if ok:
            endpoint.record_success()
        elif endpoint.record_failure() and self._may_eject(now):
            seconds = endpoint.eject(now)
            metrics.EJECTIONS.labels(endpoint.url).inc()
            log.warning(
                "upstream target ejected after consecutive failures", extra={"target": endpoint.url, "seconds": seconds}
            )

    def _may_eject(self, now: float) -> bool:
        """At most half of the route's targets may be ejected at once: never all, never a lone one."""
        ejected = sum(1 for m in self.members if m.endpoint.ejected(now))
        return (ejected + 1) * 2 <= len(self.members)

    def observe_latency(self, seconds: float) -> None:
        latency = self._latency
        if latency is None:
            latency = self._latency = batched_histogram(metrics.LATENCY, self.route_id)
        latency.observe(seconds)


def compile_pools(routes: Iterable[Route], registry: Registry = REGISTRY) -> dict[str, RoutePool]:
    """Route id → its pool, for one snapshot."""
    return {route.id: RoutePool(route, registry) for route in routes}

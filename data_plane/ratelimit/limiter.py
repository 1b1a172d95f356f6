"""The limits stage of the pipeline: which limits apply, who decides them, what the client sees.

    limits = limiter.limits_for(snap, route, tenant)   dict lookup (built once per snapshot)
    admission = await limiter.admit(limits)            one Redis round trip, shared with the
                                                       other requests of this loop tick → 429
    ... forward, with admission.headers ...
    limiter.release(admission)                         concurrency lease back (batched too)

Redis decides while its circuit is closed. When it is open (or a decision fails),
``RATELIMIT_FAILURE_MODE=open`` decides on the local limiter (limit ÷ live nodes) and
``closed`` answers 503; both recover on their own when the circuit closes. A route in shadow
mode is decided and counted like any other but its refusals are not enforced.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Final

from data_plane.errors import ServiceUnavailable, TooManyRequests
from data_plane.ratelimit import headers as rl_headers
from data_plane.ratelimit import metrics
from data_plane.ratelimit.base import (
    BURST,
    HOUR,
    MINUTE,
    QUOTA,
    ROUTE,
    Backend,
    Kind,
    LimiterUnavailable,
    Limits,
    Policy,
)
from data_plane.ratelimit.local import LocalBackend
from data_plane.ratelimit.redis import RedisBackend, tenant_keys
from data_plane.router import CompiledRoute
from shared.settings import Settings
from shared.snapshot import Tenant

# An admitted request leaves a limit "near" when this fraction or less of it remains.
NEAR_LIMIT_FRACTION: Final = 0.1
CLOSED_RETRY_AFTER: Final = (("Retry-After", "1"),)

_MESSAGES: Final = {
    Kind.MINUTE: ("rate_limited", "this tenant's per-minute rate limit is exceeded"),
    Kind.HOUR: ("rate_limited", "this tenant's per-hour rate limit is exceeded"),
    Kind.ROUTE: ("rate_limited", "this tenant's rate limit on this route is exceeded"),
    Kind.BURST: ("rate_limited", "this tenant's burst allowance on this route is used up"),
    Kind.QUOTA: ("quota_exceeded", "this tenant's monthly quota is used up"),
    Kind.CONCURRENCY: ("concurrency_limit_exceeded", "this tenant has too many requests in flight"),
}


@dataclass(frozen=True, slots=True)
class Admission:
    """An admitted request: the headers for its response and the lease to give back."""

    headers: tuple[tuple[str, str], ...]
    limits: Limits
    lease: str
    backend: Backend | None


class RateLimiter:
    def __init__(self, settings: Settings, redis: RedisBackend) -> None:
        self._redis = redis
        self._minute_s = settings.ratelimit_minute_s
        self._local = LocalBackend(settings.ratelimit_minute_s, lambda: redis.live_nodes)
        self._open = settings.ratelimit_failure_mode == "open"
        redis.on_recover(self._local.clear)
        self._snap: object = None
        self._cache: dict[tuple[str, str], Limits | None] = {}

    @property
    def mode(self) -> str:
        """``redis`` while Redis decides, else ``local`` (open mode) or ``closed``."""
        if self._redis.ok:
            return "redis"
        return "local" if self._open else "closed"

    def limits_for(self, snap: object, route: CompiledRoute, tenant: Tenant) -> Limits | None:
        """The limits of ``tenant`` on ``route`` in snapshot ``snap``; None when none applies."""
        if snap is not self._snap:
            self._cache = {}
            self._snap = snap
        key = (tenant.id, route.route.id)
        try:
            return self._cache[key]
        except KeyError:
            limits = self._cache[key] = self._build(route, tenant)
            return limits

    def _build(self, route: CompiledRoute, tenant: Tenant) -> Limits | None:
        r = route.route
        burst = r.burst if r.rate_limit > 0 else 0
        if not (
            tenant.rate_limit_per_minute
            or tenant.rate_limit_per_hour
            or r.rate_limit
            or tenant.monthly_quota
            or tenant.max_concurrency
        ):
            return None
        minute = self._minute_s
        candidates = (
            Policy("minute", tenant.rate_limit_per_minute, minute, MINUTE),
            Policy("hour", tenant.rate_limit_per_hour, 60 * minute, HOUR),
            Policy("route", r.rate_limit, minute, ROUTE),
            Policy("burst", burst, math.ceil(burst * minute / r.rate_limit) if burst else 0, BURST),
            Policy("month", tenant.monthly_quota, 0, QUOTA),
        )
        policies = tuple(p for p in candidates if p.quota > 0)
        limits = Limits(
            tenant_id=tenant.id,
            route_id=r.id,
            per_minute=tenant.rate_limit_per_minute,
            per_hour=tenant.rate_limit_per_hour,
            route_limit=r.rate_limit,
            burst=burst,
            monthly_quota=tenant.monthly_quota,
            max_concurrency=tenant.max_concurrency,
            keys=tenant_keys(tenant.id, r.id),
            policies=policies,
            policy_header=rl_headers.policy_header(policies),
            shadow=r.rate_limit_shadow,
        )
        return replace(limits, wire=self._redis.wire(limits))

    async def admit(self, limits: Limits) -> Admission:
        """Decide every limit of one request; raises TooManyRequests (429) or, in closed mode
        without Redis, ServiceUnavailable (503)."""
        lease = self._redis.next_lease() if limits.max_concurrency else ""
        backend: Backend = self._redis
        try:
            decision = await self._redis.decide(limits, lease)
        except LimiterUnavailable:
            metrics.UNAVAILABLE.inc()
            if not self._open:
                if limits.shadow:
                    return Admission((), limits, "", None)
                raise ServiceUnavailable(
                    "rate limits cannot be decided right now", code="ratelimit_unavailable", headers=CLOSED_RETRY_AFTER
                ) from None
            backend = self._local
            decision = self._local.decide_now(limits)
        else:
            if decision.allowed:
                self._local.record(limits)
            if limits.monthly_quota:
                self._local.remember_quota(limits.tenant_id, decision.remaining[QUOTA])
        headers = rl_headers.response_headers(limits, decision)
        if decision.allowed:
            metrics.ALLOWED.inc()
            for p in limits.policies:
                if decision.remaining[p.slot] <= p.quota * NEAR_LIMIT_FRACTION:
                    metrics.NEAR_LIMIT.inc()
                    break
            return Admission(headers, limits, lease if limits.max_concurrency else "", backend)
        if limits.shadow:
            # Counted, not enforced: the client sees the limits but no refusal.
            metrics.SHADOW_REJECTED[decision.kind].inc()
            return Admission(tuple(h for h in headers if h[0] != "Retry-After"), limits, "", None)
        metrics.REJECTED[decision.kind].inc()
        code, message = _MESSAGES[decision.kind]
        raise TooManyRequests(message, code=code, headers=headers)

    def release(self, admission: Admission) -> None:
        if admission.lease and admission.backend is not None:
            admission.backend.release(admission.limits, admission.lease)

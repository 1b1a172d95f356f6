"""What every limiter backend decides, and the per-(tenant, route) limit descriptor it decides on.

A :class:`Limits` is built once per snapshot for each (tenant, route) pair that is used (see
:class:`~data_plane.ratelimit.limiter.RateLimiter`): the Redis keys, the script arguments (and
the Redis commands encoded from them) and the ``RateLimit-Policy`` value never change while that
snapshot serves, so a request only looks it up. A backend answers a :class:`Decision` for it;
both backends (Redis and the local fallback) implement :class:`Backend`.
"""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING, Final, Protocol

if TYPE_CHECKING:
    from data_plane.ratelimit.redis import Wire


class Kind(IntEnum):
    """Which limit decided: the rejecting one, or NONE when the request was admitted."""

    NONE = 0
    MINUTE = 1
    HOUR = 2
    ROUTE = 3
    BURST = 4
    QUOTA = 5
    CONCURRENCY = 6


KIND_NAMES: Final = {
    Kind.NONE: "none",
    Kind.MINUTE: "minute",
    Kind.HOUR: "hour",
    Kind.ROUTE: "route",
    Kind.BURST: "burst",
    Kind.QUOTA: "quota",
    Kind.CONCURRENCY: "concurrency",
}

# The windowed limits in the order the script reports them (index into Decision.remaining).
MINUTE, HOUR, ROUTE, BURST, QUOTA = range(5)


@dataclass(frozen=True, slots=True)
class Policy:
    """One quota policy advertised in ``RateLimit-Policy``: ``slot`` indexes the decision."""

    name: str
    quota: int
    window_s: int
    slot: int


@dataclass(frozen=True, slots=True)
class Limits:
    """Every limit that applies to one tenant on one route."""

    tenant_id: str
    route_id: str
    per_minute: int
    per_hour: int
    route_limit: int
    burst: int
    monthly_quota: int
    max_concurrency: int
    # Redis keys, all in the tenant's hash slot: minute, hour, route window, route bucket,
    # quota, leases.
    keys: tuple[str, str, str, str, str, str]
    policies: tuple[Policy, ...]
    # The RateLimit-Policy header value (constant for this snapshot).
    policy_header: str
    shadow: bool = False
    # The Redis commands, encoded (built with the limits by the limiter; a backend encodes
    # them itself for limits made without).
    wire: Wire | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    """A backend's answer. ``remaining``/``reset_ms`` are indexed by :data:`MINUTE` … :data:`QUOTA`
    (0 where the limit does not apply); ``retry_ms`` is when a retry can succeed (rejections)."""

    allowed: bool
    kind: Kind
    retry_ms: int
    remaining: tuple[int, int, int, int, int]
    reset_ms: tuple[int, int, int, int, int]


class Backend(Protocol):
    def decide(self, limits: Limits, lease: str) -> Awaitable[Decision]:
        """Decide every limit of one request at once; when admitted with a concurrency limit,
        ``lease`` is held until :meth:`release`. Raises ``LimiterUnavailable`` when it cannot decide."""
        ...

    def release(self, limits: Limits, lease: str) -> None:
        """Give back a concurrency lease. Never blocks and never raises."""
        ...


class LimiterUnavailable(Exception):
    """The backend could not decide in time (Redis down, slow, or its circuit open)."""

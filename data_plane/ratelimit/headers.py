"""Rate-limit response headers.

``RateLimit-Policy`` and ``RateLimit`` follow draft-ietf-httpapi-ratelimit-headers-10 (Structured
Field lists of named items): ``RateLimit-Policy: "minute";q=300;w=60, "hour";q=5000;w=3600`` and
``RateLimit: "minute";r=12;t=41, "hour";r=4712;t=3541`` (``r`` remaining, ``t`` seconds until
the oldest counted request leaves the window, i.e. until ``r`` grows). The monthly quota is the
policy ``"month"`` (no ``w``: months differ in length; its ``t`` is the time to the 1st, UTC).
The route's token bucket is ``"burst"``, with ``w`` the time it takes to refill.

``X-RateLimit-Limit/Remaining/Reset`` describe the policy with the fewest requests remaining;
``X-RateLimit-Reset`` is in seconds from now, like ``t``. A 429 carries ``Retry-After``: whole
seconds, rounded up, until every limit that refused the request can admit it.
"""

from __future__ import annotations

import math

from data_plane.ratelimit.base import Decision, Kind, Limits, Policy


def policy_header(policies: tuple[Policy, ...]) -> str:
    parts = []
    for p in policies:
        window = f";w={p.window_s}" if p.window_s else ""
        parts.append(f'"{p.name}";q={p.quota}{window}')
    return ", ".join(parts)


def retry_after_s(retry_ms: int) -> int:
    return max(1, math.ceil(retry_ms / 1000))


def response_headers(limits: Limits, decision: Decision) -> tuple[tuple[str, str], ...]:
    """The headers for a response decided by ``decision`` (admitted or refused)."""
    rejected_slot = decision.kind - 1 if not decision.allowed and decision.kind != Kind.CONCURRENCY else -1
    items = []
    low_remaining = -1
    low_quota = low_reset = 0
    for p in limits.policies:
        remaining = decision.remaining[p.slot]
        reset = math.ceil(decision.reset_ms[p.slot] / 1000)
        if p.slot == rejected_slot:
            remaining, reset = 0, retry_after_s(decision.retry_ms)
        items.append(f'"{p.name}";r={remaining};t={reset}')
        if low_remaining < 0 or remaining < low_remaining:
            low_remaining, low_quota, low_reset = remaining, p.quota, reset
    headers: list[tuple[str, str]] = []
    if items:
        headers += [
            ("RateLimit-Policy", limits.policy_header),
            ("RateLimit", ", ".join(items)),
            ("X-RateLimit-Limit", str(low_quota)),
            ("X-RateLimit-Remaining", str(low_remaining)),
            ("X-RateLimit-Reset", str(low_reset)),
        ]
    if not decision.allowed:
        headers.append(("Retry-After", str(retry_after_s(decision.retry_ms))))
    return tuple(headers)

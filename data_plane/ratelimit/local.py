"""The fallback limiter: the same limits decided in this worker's memory while Redis is away.

Every node falls back on its own, so each enforces its share: limit ÷ live nodes (the count
last seen in the Redis heartbeats, remembered while Redis is down), at least 1. The monthly
quota cannot be counted locally, so each worker allows its share of what Redis last said was
remaining for the tenant (nothing is enforced for a tenant this worker never saw decided).
The windows are the same N+1 sub-bucket sliding windows as the Redis script's, on a
monotonic clock passed in. The windows are kept warm while Redis decides (:meth:`record`
counts every request Redis admitted here), so a fallback starts from what this node has
just admitted rather than from zero: a node that already served its share of the window
admits no more when Redis goes away.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from typing import Final

from data_plane.ratelimit.base import BURST, HOUR, MINUTE, QUOTA, ROUTE, Decision, Kind, Limits

N: Final = 120


class SlidingWindow:
    """Counts of the last N+1 sub-buckets of ``span_ms`` / N each."""

    __slots__ = ("_bucket", "_buckets", "total")

    def __init__(self, span_ms: float) -> None:
        self._bucket = span_ms / N
        self._buckets: deque[list[int]] = deque()  # [bucket index, count], oldest first
        self.total = 0

    def advance(self, now_ms: float) -> int:
        """Drop expired buckets; returns the current bucket index."""
        k = math.floor(now_ms / self._bucket)
        buckets = self._buckets
        while buckets and buckets[0][0] < k - N:
            self.total -= buckets.popleft()[1]
        return k

    def add(self, k: int) -> None:
        if self._buckets and self._buckets[-1][0] == k:
            self._buckets[-1][1] += 1
        else:
            self._buckets.append([k, 1])
        self.total += 1

    def retry_ms(self, now_ms: float, need: int) -> int:
        acc = 0
        for index, count in self._buckets:
            acc += count
            if acc >= need:
                return math.ceil((index + N + 1) * self._bucket - now_ms)
        return math.ceil(self._bucket)

    def reset_ms(self, now_ms: float) -> int:
        if not self._buckets:
            return 0
        return math.ceil((self._buckets[0][0] + N + 1) * self._bucket - now_ms)


class TokenBucket:
    __slots__ = ("stamp", "tokens")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp


class LocalBackend:
    def __init__(
        self,
        minute_s: float,
        live_nodes: Callable[[], int],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._minute_ms = minute_s * 1000
        self._live_nodes = live_nodes
        self._clock = clock
        self._windows: dict[tuple[str, int], SlidingWindow] = {}
        self._route_windows: dict[tuple[str, str], SlidingWindow] = {}
        self._buckets: dict[tuple[str, str], TokenBucket] = {}
        self._in_flight: dict[str, int] = {}
        # Quota remaining as Redis last reported it, and what was used here since.
        self._quota_seen: dict[str, int] = {}
        self._quota_used: dict[str, int] = {}

    def remember_quota(self, tenant_id: str, remaining: int) -> None:
        self._quota_seen[tenant_id] = remaining

    def clear(self) -> None:
        """Redis decides again: forget the fallback's own buckets and quota use. The windows
        stay (they age by themselves); in-flight counts too (those requests release here)."""
        self._buckets.clear()
        self._quota_used.clear()

    def record(self, limits: Limits) -> None:
        """Count one request Redis admitted (its windows only)."""
        now = self._clock() * 1000
        if limits.per_minute > 0:
            window = self._tenant_window(limits.tenant_id, 0, self._minute_ms)
            window.add(window.advance(now))
        if limits.per_hour > 0:
            window = self._tenant_window(limits.tenant_id, 1, 60 * self._minute_ms)
            window.add(window.advance(now))
        if limits.route_limit > 0:
            window = self._route_window(limits.tenant_id, limits.route_id)
            window.add(window.advance(now))

    def _tenant_window(self, tenant_id: str, which: int, span_ms: float) -> SlidingWindow:
        window = self._windows.get((tenant_id, which))
        if window is None:
            window = self._windows[(tenant_id, which)] = SlidingWindow(span_ms)
        return window

    def _route_window(self, tenant_id: str, route_id: str) -> SlidingWindow:
        window = self._route_windows.get((tenant_id, route_id))
        if window is None:
            window = self._route_windows[(tenant_id, route_id)] = SlidingWindow(self._minute_ms)
        return window

    async def decide(self, limits: Limits, lease: str) -> Decision:
        return self.decide_now(limits)

    def decide_now(self, limits: Limits) -> Decision:
        now = self._clock() * 1000
        nodes = max(1, self._live_nodes())
        remaining = [0, 0, 0, 0, 0]
        reset = [0, 0, 0, 0, 0]
        allowed = True
        kind = Kind.NONE
        retry = rate_retry = 0

        def reject(which: Kind, ms: int) -> None:
            # As the script does: the quota names the rejection, else the rate limit that
            # frees last, else concurrency; Retry-After waits for every failing limit.
            nonlocal allowed, kind, retry, rate_retry
            allowed = False
            if which != Kind.CONCURRENCY and ms > rate_retry:
                rate_retry = ms
                if kind != Kind.QUOTA:
                    kind = which
            if which == Kind.QUOTA or (which == Kind.CONCURRENCY and kind == Kind.NONE):
                kind = which
            retry = max(retry, ms)

        windows: list[tuple[int, SlidingWindow, int, int]] = []  # slot, window, share, bucket
        for slot, limit, which, span in (
            (MINUTE, limits.per_minute, 0, self._minute_ms),
            (HOUR, limits.per_hour, 1, 60 * self._minute_ms),
        ):
            if limit > 0:
                window = self._tenant_window(limits.tenant_id, which, span)
                windows.append((slot, window, max(1, limit // nodes), window.advance(now)))
        if limits.route_limit > 0:
            window = self._route_window(limits.tenant_id, limits.route_id)
            windows.append((ROUTE, window, max(1, limits.route_limit // nodes), window.advance(now)))
        for slot, window, share, _ in windows:
            if window.total + 1 > share:
                reject(Kind(slot + 1), window.retry_ms(now, window.total + 1 - share))

        bucket: TokenBucket | None = None
        rate = limits.route_limit / nodes / self._minute_ms
        capacity = max(1.0, limits.burst / nodes)
        if limits.burst > 0 and rate > 0:
            bkey = (limits.tenant_id, limits.route_id)
            bucket = self._buckets.get(bkey)
            if bucket is None:
                bucket = self._buckets[bkey] = TokenBucket(capacity, now)
            bucket.tokens = min(capacity, bucket.tokens + max(0.0, now - bucket.stamp) * rate)
            bucket.stamp = now
            if bucket.tokens < 1:
                reject(Kind.BURST, math.ceil((1 - bucket.tokens) / rate))

        quota_share = -1
        used = self._quota_used.get(limits.tenant_id, 0)
        if limits.monthly_quota > 0 and limits.tenant_id in self._quota_seen:
            quota_share = self._quota_seen[limits.tenant_id] // nodes
            if used + 1 > quota_share:
                # The month's end is not known here; come back when Redis may be.
                reject(Kind.QUOTA, 60_000)

        if limits.max_concurrency > 0:
            share = max(1, limits.max_concurrency // nodes)
            if self._in_flight.get(limits.tenant_id, 0) >= share:
                reject(Kind.CONCURRENCY, 1000)

        if allowed:
            for _, window, _, k in windows:
                window.add(k)
            if bucket is not None:
                bucket.tokens -= 1
            if quota_share >= 0:
                used += 1
                self._quota_used[limits.tenant_id] = used
            if limits.max_concurrency > 0:
                self._in_flight[limits.tenant_id] = self._in_flight.get(limits.tenant_id, 0) + 1
        for slot, window, share, _ in windows:
            remaining[slot] = max(0, share - window.total)
            reset[slot] = window.reset_ms(now)
        if bucket is not None:
            remaining[BURST] = max(0, math.floor(bucket.tokens))
            reset[BURST] = math.ceil((capacity - bucket.tokens) / rate)
        if quota_share >= 0:
            remaining[QUOTA] = max(0, quota_share - used)
        return Decision(allowed, kind, retry, tuple(remaining), tuple(reset))  # type: ignore[arg-type]

    def release(self, limits: Limits, lease: str) -> None:
        count = self._in_flight.get(limits.tenant_id, 0)
        if count <= 1:
            self._in_flight.pop(limits.tenant_id, None)
        else:
            self._in_flight[limits.tenant_id] = count - 1

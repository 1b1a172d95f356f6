"""decide.lua against the real local Redis, on a fixed clock: exact counts, honest retry times,
nothing consumed by a rejected request, calendar months, leases."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
import redis

from data_plane.ratelimit.base import BURST, HOUR, MINUTE, QUOTA, ROUTE, Decision, Kind
from data_plane.ratelimit.redis import SCRIPT, parse_reply, tenant_keys

pytestmark = pytest.mark.unit

MINUTE_MS = 60_000
T0 = int(datetime(2026, 3, 10, 12, 0, tzinfo=UTC).timestamp() * 1000)


class Script:
    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.tenant = uuid.uuid4().hex
        self.route = "r1"
        self.leases = 0

    def decide(
        self,
        now: int,
        *,
        minute: int = 0,
        hour: int = 0,
        route: int = 0,
        burst: int = 0,
        quota: int = 0,
        concurrency: int = 0,
        lease: str = "",
        tenant: str | None = None,
    ) -> Decision:
        keys = tenant_keys(tenant or self.tenant, self.route)
        if concurrency and not lease:
            self.leases += 1
            lease = f"lease-{self.leases}"
        args = (minute, hour, route, burst, quota, concurrency, lease, 10_000, MINUTE_MS, now)
        return parse_reply(self.client.eval(SCRIPT, 6, *keys, *args))  # type: ignore[no-untyped-call]

    def admitted(self, count: int, now: int, **limits: int) -> int:
        return sum(self.decide(now, **limits).allowed for _ in range(count))


@pytest.fixture
def script(redis_url: str) -> Iterator[Script]:
    client = redis.Redis.from_url(redis_url)
    yield Script(client)
    client.close()


def test_minute_window_admits_exactly_the_limit(script: Script) -> None:
    assert script.admitted(25, T0, minute=10) == 10
    refused = script.decide(T0, minute=10)
    assert (refused.allowed, refused.kind) == (False, Kind.MINUTE)


def test_retry_after_is_exact_and_never_early(script: Script) -> None:
    for offset in range(0, 10_000, 1000):  # one request a second for 10 s
        assert script.decide(T0 + offset, minute=10).allowed
    refused = script.decide(T0 + 20_000, minute=10)
    assert not refused.allowed
    at = T0 + 20_000 + refused.retry_ms
    assert not script.decide(at - 1, minute=10).allowed
    assert script.decide(at, minute=10).allowed
    # The first request has left the window, and nothing else yet.
    assert not script.decide(at, minute=10).allowed


def test_no_window_of_a_minute_ever_holds_more_than_the_limit(script: Script) -> None:
    # The fixed-window failure: a full minute's worth just before a boundary and again just after.
    boundary = (T0 // MINUTE_MS + 1) * MINUTE_MS
    assert script.admitted(10, boundary - 100, minute=10) == 10
    assert script.admitted(10, boundary + 100, minute=10) == 0
    assert script.admitted(10, boundary - 100 + MINUTE_MS + 500, minute=10) == 10


def test_hour_window_and_its_retry(script: Script) -> None:
    assert script.admitted(8, T0, minute=100, hour=5) == 5
    refused = script.decide(T0 + 60_000, minute=100, hour=5)
    assert refused.kind == Kind.HOUR
    # T0 starts a 30 s bucket: its requests leave after the hour and that one bucket.
    assert T0 + 60_000 + refused.retry_ms == T0 + 3_600_000 + 30_000
    assert not script.decide(T0 + 3_629_999, minute=100, hour=5).allowed
    assert script.decide(T0 + 3_630_000, minute=100, hour=5).allowed


def test_a_rejected_request_consumes_no_other_limit(script: Script) -> None:
    limits = {"minute": 100, "hour": 1000, "route": 3, "quota": 50}
    assert script.admitted(3, T0, **limits) == 3
    before = script.decide(T0, minute=100, hour=1000, quota=50, tenant=None)  # another route would see this
    assert script.admitted(20, T0, **limits) == 0
    after = script.decide(T0, minute=100, hour=1000, quota=50)
    assert before.remaining[MINUTE] - 1 == after.remaining[MINUTE]
    assert before.remaining[HOUR] - 1 == after.remaining[HOUR]
    assert before.remaining[QUOTA] - 1 == after.remaining[QUOTA]


def test_route_limit_is_independent_of_the_tenant_limit(script: Script) -> None:
    assert script.admitted(5, T0, minute=100, route=2) == 2
    script.route = "r2"
    assert script.admitted(5, T0, minute=100, route=2) == 2
    script.route = "r3"
    assert script.admitted(100, T0, minute=100) == 96


def test_burst_bucket_refills_at_the_route_rate(script: Script) -> None:
    # 60 a minute = one a second, at most 5 at once.
    assert script.admitted(10, T0, route=60, burst=5) == 5
    refused = script.decide(T0, route=60, burst=5)
    assert refused.kind == Kind.BURST and refused.retry_ms == 1000
    assert script.admitted(3, T0 + 1000, route=60, burst=5) == 1
    assert script.admitted(10, T0 + 4000, route=60, burst=5) == 3
    assert script.decide(T0 + 4000, route=60, burst=5).remaining[BURST] == 0


def test_quota_runs_to_the_end_of_the_calendar_month(script: Script) -> None:
    end_of_feb = int(datetime(2028, 2, 29, 23, 59, 30, tzinfo=UTC).timestamp() * 1000)
    march = int(datetime(2028, 3, 1, tzinfo=UTC).timestamp() * 1000)
    assert script.admitted(5, end_of_feb, quota=3) == 3
    refused = script.decide(end_of_feb, quota=3)
    assert (refused.kind, refused.retry_ms, refused.reset_ms[QUOTA]) == (Kind.QUOTA, 30_000, 30_000)
    assert not script.decide(march - 1, quota=3).allowed
    first = script.decide(march, quota=3)
    assert first.allowed and first.remaining[QUOTA] == 2


@pytest.mark.parametrize(
    ("when", "next_month"),
    [
        (datetime(2026, 12, 31, 23, 0, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC)),
        (datetime(2027, 2, 1, 0, 0, tzinfo=UTC), datetime(2027, 3, 1, tzinfo=UTC)),
        (datetime(2000, 2, 15, tzinfo=UTC), datetime(2000, 3, 1, tzinfo=UTC)),
        (datetime(2026, 4, 30, 12, tzinfo=UTC), datetime(2026, 5, 1, tzinfo=UTC)),
    ],
)
def test_month_end_is_the_first_of_the_next_month_utc(script: Script, when: datetime, next_month: datetime) -> None:
    now = int(when.timestamp() * 1000)
    decision = script.decide(now, quota=10)
    assert decision.reset_ms[QUOTA] == int(next_month.timestamp() * 1000) - now


def test_quota_rejection_names_the_quota_even_when_a_window_also_refuses(script: Script) -> None:
    assert script.admitted(2, T0, minute=2, quota=2) == 2
    refused = script.decide(T0, minute=2, quota=2)
    assert refused.kind == Kind.QUOTA
    assert refused.retry_ms > MINUTE_MS


def test_concurrency_leases_are_held_released_and_expire(script: Script) -> None:
    keys = tenant_keys(script.tenant, script.route)
    assert script.decide(T0, concurrency=2, lease="a").allowed
    assert script.decide(T0, concurrency=2, lease="b").allowed
    refused = script.decide(T0, concurrency=2, lease="c")
    assert (refused.allowed, refused.kind) == (False, Kind.CONCURRENCY)
    script.client.zrem(keys[5], "a")
    assert script.decide(T0, concurrency=2, lease="c").allowed
    # Leases of a node that died (never released, never renewed) expire after their ttl.
    assert not script.decide(T0 + 9_999, concurrency=2, lease="d").allowed
    assert script.decide(T0 + 10_001, concurrency=2, lease="d").allowed


def test_a_concurrency_refusal_consumes_no_rate(script: Script) -> None:
    assert script.decide(T0, minute=10, concurrency=1, lease="a").allowed
    assert script.admitted(5, T0, minute=10, concurrency=1) == 0
    assert script.decide(T0, minute=10).remaining[MINUTE] == 8


def test_remaining_and_reset_describe_the_window(script: Script) -> None:
    first = script.decide(T0, minute=10, route=4)
    assert first.remaining[MINUTE] == 9 and first.remaining[ROUTE] == 3
    # The request just counted leaves the window after 60 s and at most one 0.5 s bucket.
    assert MINUTE_MS <= first.reset_ms[MINUTE] <= MINUTE_MS + 500


def test_every_key_of_a_tenant_shares_one_cluster_slot() -> None:
    from redis.crc import key_slot

    slots = {key_slot(key.encode()) for key in tenant_keys("tenant-a", "route-9")}
    assert len(slots) == 1


def test_every_key_expires_but_never_before_its_counts_leave_the_window(script: Script) -> None:
    keys = tenant_keys(script.tenant, script.route)
    limits = {"minute": 10, "hour": 100, "route": 10, "burst": 5, "quota": 1000, "concurrency": 3}
    assert script.decide(T0, **limits).allowed
    # Later in the same 0.5 s bucket: the window keys' expiry, set by the bucket's first
    # request, must still cover this request's stay in the window (bucket end + one minute).
    later = T0 + 400
    assert script.decide(later, **limits).allowed
    ttl = {key: script.client.pttl(key) for key in keys}
    assert all(t > 0 for t in ttl.values()), ttl
    bucket_end = (T0 // 500 + 1) * 500
    assert ttl[keys[0]] >= bucket_end + MINUTE_MS - later  # the minute window
    assert ttl[keys[2]] >= bucket_end + MINUTE_MS - later  # the route window
    hour_bucket_end = (T0 // 30_000 + 1) * 30_000
    assert ttl[keys[1]] >= hour_bucket_end + 60 * MINUTE_MS - later
    # The quota outlives the month (it ends at the 1st of April, UTC).
    april = int(datetime(2026, 4, 1, tzinfo=UTC).timestamp() * 1000)
    assert ttl[keys[4]] >= april - later


def test_a_refused_request_still_forgets_the_buckets_that_left_the_window(script: Script) -> None:
    assert script.admitted(2, T0, minute=10, quota=10) == 2
    assert script.admitted(8, T0 + 30_000, minute=10, quota=10) == 8
    # A minute later the first two have left the minute window; the quota refuses this one.
    refused = script.decide(T0 + 61_000, minute=10, quota=10)
    assert (refused.allowed, refused.kind) == (False, Kind.QUOTA)
    assert refused.remaining[MINUTE] == 2
    # The window forgot them for good: eight counted, so two more fit, then no more.
    assert script.decide(T0 + 61_000, minute=10).remaining[MINUTE] == 1
    assert script.admitted(3, T0 + 61_000, minute=10) == 1

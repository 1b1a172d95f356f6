"""data_plane.upstream.retry and dispatch: which tries are retried, where, and within which budget;
plus picking around unhealthy, ejected and open-circuit targets. The upstream is a fake client."""

from __future__ import annotations

import random
from typing import Any

import pytest
from prometheus_client import REGISTRY

from data_plane import metrics
from data_plane.errors import ServiceUnavailable, UpstreamTimeout, UpstreamUnavailable
from data_plane.upstream.client import BodyCounter, BodyTooLarge
from data_plane.upstream.dispatch import Dispatcher, RequestBody
from data_plane.upstream.endpoint import BASE_EJECTION_S, CONSECUTIVE_FAILURES
from data_plane.upstream.pool import Registry, RoutePool
from data_plane.upstream.retry import RetryBudget
from shared.snapshot import CircuitBreaker, HealthCheck, Route, Upstream

pytestmark = pytest.mark.unit

URLS = ("http://a.internal:80", "http://b.internal:80", "http://c.internal:80")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeResponse:
    def __init__(self, status: int) -> None:
        self.status = status
        self.released = False

    def release(self) -> None:
        self.released = True


class FakeClient:
    """Answers per target host: a status, or an exception to raise."""

    def __init__(self, clock: Clock, answers: dict[str, Any]) -> None:
        self.clock = clock
        self.answers = answers
        self.sent: list[tuple[str, str]] = []
        self.cost_s = 0.0

    async def send(
        self, method: str, target: Any, raw_path: str, raw_query: str, headers: Any, body: Any, timeout: Any
    ) -> FakeResponse:
        self.sent.append((method, target.host))
        if body is not None:
            try:
                async for _ in body:
                    pass
            except BodyTooLarge as exc:  # as the real client maps it
                raise UpstreamUnavailable("aborted", code="upstream_error") from exc
        self.clock.now += self.cost_s
        answer = self.answers.get(target.host, 200)
        if isinstance(answer, Exception):
            raise answer
        return FakeResponse(answer)


def _route(n: int = 2, **fields: Any) -> Route:
    return Route(
        id="r1",
        path="/x/*",
        methods=("GET", "POST", "PUT"),
        upstreams=tuple(Upstream(u, 1) for u in URLS[:n]),
        auth_required=False,
        rate_limit=0,
        timeout_ms=1000,
        strip_prefix=False,
        priority=0,
        **fields,
    )


def _setup(answers: dict[str, Any], n: int = 2, **fields: Any) -> tuple[Clock, FakeClient, RoutePool, Dispatcher]:
    clock = Clock()
    registry = Registry(clock, random.Random(3))
    client = FakeClient(clock, answers)
    pool = RoutePool(_route(n, **fields), registry)
    return clock, client, pool, Dispatcher(client, clock)  # type: ignore[arg-type]


async def _send(dispatcher: Dispatcher, pool: RoutePool, method: str = "GET", body: RequestBody | None = None) -> int:
    exchange = await dispatcher.open(pool, method, "/x/1", "", [], body, None)
    status: int = exchange.response.status
    exchange.close()
    return status


class _Content:
    """A request body of one chunk, read at most once (like the client's stream)."""

    def __init__(self) -> None:
        self.chunks = [b"payload"]

    async def readany(self) -> bytes:
        return self.chunks.pop() if self.chunks else b""


def _body(limit: int = 0) -> RequestBody:
    return RequestBody(_Content(), BodyCounter(limit))  # type: ignore[arg-type]


# -- retry budget ----------------------------------------------------------------------------


def test_budget_allows_the_floor_then_a_fifth_of_requests() -> None:
    budget = RetryBudget(ratio=0.2, min_per_s=1, window_s=10)
    assert sum(budget.try_spend(0.0) for _ in range(50)) == 10  # the floor: 1/s over 10 s
    for _ in range(100):
        budget.record_request(0.0)
    assert sum(budget.try_spend(0.0) for _ in range(50)) == 20  # + 20 % of 100


def test_budget_forgets_outside_its_window() -> None:
    budget = RetryBudget(ratio=0.2, min_per_s=1, window_s=10)
    assert sum(budget.try_spend(5.0) for _ in range(20)) == 10
    assert not budget.try_spend(14.9)
    assert budget.try_spend(15.0)


# -- retries -----------------------------------------------------------------------------------


async def test_get_is_retried_on_another_target_after_a_503() -> None:
    _, client, pool, dispatcher = _setup({"a.internal": 503}, retries=2)
    assert await _send(dispatcher, pool) == 200
    assert client.sent == [("GET", "a.internal"), ("GET", "b.internal")]


async def test_post_is_not_retried() -> None:
    _, client, pool, dispatcher = _setup({"a.internal": 503}, retries=2)
    assert await _send(dispatcher, pool, "POST") == 503
    assert client.sent == [("POST", "a.internal")]


async def test_a_body_already_streamed_is_not_replayed() -> None:
    _, client, pool, dispatcher = _setup({"a.internal": 503}, retries=2)
    assert await _send(dispatcher, pool, "PUT", _body()) == 503
    assert client.sent == [("PUT", "a.internal")]


async def test_a_body_not_read_before_a_connect_error_is_replayed() -> None:
    refused = UpstreamUnavailable("cannot connect", code="upstream_connect_error")
    _, client, pool, dispatcher = _setup({"a.internal": refused}, retries=1)

    async def unread(*args: Any) -> FakeResponse:
        client.sent.append(("PUT", args[1].host))
        if args[1].host == "a.internal":
            raise refused  # failed before reading the body
        assert args[5] is not None
        chunks = [c async for c in args[5]]
        assert chunks == [b"payload"]
        return FakeResponse(201)

    client.send = unread  # type: ignore[method-assign]
    assert await _send(dispatcher, pool, "PUT", _body()) == 201
    assert client.sent == [("PUT", "a.internal"), ("PUT", "b.internal")]


async def test_other_5xx_and_4xx_are_answers_not_retried() -> None:
    _, client, pool, dispatcher = _setup({"a.internal": 500}, retries=2)
    assert await _send(dispatcher, pool) == 500
    assert len(client.sent) == 1


async def test_retries_stop_at_the_routes_count_and_give_the_last_answer() -> None:
    _, client, pool, dispatcher = _setup({h: 503 for h in ("a.internal", "b.internal", "c.internal")}, 3, retries=2)
    assert await _send(dispatcher, pool) == 503
    assert sorted(host for _, host in client.sent) == ["a.internal", "b.internal", "c.internal"]


async def test_a_connect_error_on_the_last_try_is_502() -> None:
    refused = UpstreamUnavailable("cannot connect", code="upstream_connect_error")
    _, client, pool, dispatcher = _setup({"a.internal": refused, "b.internal": refused}, retries=1)
    with pytest.raises(UpstreamUnavailable) as caught:
        await _send(dispatcher, pool)
    assert caught.value.status == 502 and len(client.sent) == 2


async def test_no_retry_once_the_deadline_is_spent() -> None:
    timeout = UpstreamTimeout("slow")
    _, client, pool, dispatcher = _setup({"a.internal": timeout, "b.internal": timeout, "c.internal": timeout}, 3)
    pool.retries = 5
    client.cost_s = 1.0  # each try takes the whole per-try timeout; the deadline is 2 s
    with pytest.raises(UpstreamTimeout):
        await _send(dispatcher, pool)
    assert len(client.sent) == 2


async def test_the_budget_stops_retries_against_a_failing_upstream() -> None:
    _, client, pool, dispatcher = _setup({"a.internal": 503}, 1, retries=3)
    exhausted = _sample("tenantgate_upstream_retry_budget_exhausted_total", route="r1")
    for _ in range(100):
        assert await _send(dispatcher, pool) == 503
    # 100 requests: retries ≤ 20 % of 100 + 3/s x 10 s = 50, where 300 were asked for.
    assert len(client.sent) == 100 + 50
    assert _sample("tenantgate_upstream_retry_budget_exhausted_total", route="r1") > exhausted


# -- picking ---------------------------------------------------------------------------------


async def test_an_open_breaker_sends_traffic_to_the_other_target_then_sheds() -> None:
    breaker = CircuitBreaker(failure_rate=0.5, min_requests=2, window_s=10, open_s=30, half_open_requests=1)
    clock, client, pool, dispatcher = _setup({"a.internal": 503, "b.internal": 503}, circuit_breaker=breaker)
    statuses = [await _send(dispatcher, pool) for _ in range(4)]
    assert statuses == [503] * 4 and len(client.sent) == 4  # a, b, a (opens), b (opens)
    with pytest.raises(ServiceUnavailable) as caught:
        await _send(dispatcher, pool)
    assert caught.value.code == "circuit_open" and dict(caught.value.headers)["Retry-After"] == "30"
    assert len(client.sent) == 4
    clock.now += 30
    client.answers.clear()
    assert await _send(dispatcher, pool) == 200  # a half-open probe


async def test_no_healthy_target_is_503_with_retry_after() -> None:
    check = HealthCheck(path="/health", interval_s=5, healthy=2, unhealthy=3)
    _, client, pool, dispatcher = _setup({}, health_check=check)
    for member in pool.members:
        member.endpoint.healthy = False
    with pytest.raises(ServiceUnavailable) as caught:
        await _send(dispatcher, pool)
    assert caught.value.code == "no_healthy_upstream" and dict(caught.value.headers)["Retry-After"] == "5"
    assert client.sent == []


async def test_outlier_ejection_grows_and_never_takes_the_last_target() -> None:
    clock, client, pool, dispatcher = _setup({"a.internal": 502})
    for _ in range(2 * CONSECUTIVE_FAILURES):
        await _send(dispatcher, pool)
    a, b = (m.endpoint for m in pool.members)
    assert a.ejected(clock.now) and a.ejected_until == clock.now + BASE_EJECTION_S
    client.answers["b.internal"] = 502
    for _ in range(2 * CONSECUTIVE_FAILURES):
        assert await _send(dispatcher, pool) == 502
    assert not b.ejected(clock.now)  # ejecting b too would leave nothing
    clock.now = a.ejected_until
    client.answers.pop("b.internal")
    for _ in range(2 * CONSECUTIVE_FAILURES):
        await _send(dispatcher, pool)
    assert a.ejected_until == clock.now + 2 * BASE_EJECTION_S  # the second ejection lasts twice as long


async def test_in_flight_counts_follow_the_exchange() -> None:
    _, _, pool, dispatcher = _setup({})
    exchange = await dispatcher.open(pool, "GET", "/x", "", [], None, None)
    assert sum(m.endpoint.active for m in pool.members) == 1
    exchange.close()
    exchange.close()
    assert sum(m.endpoint.active for m in pool.members) == 0


async def test_a_client_body_over_the_limit_is_not_held_against_the_target() -> None:
    breaker = CircuitBreaker(failure_rate=0.5, min_requests=2, window_s=10, open_s=30, half_open_requests=1)
    clock, client, pool, dispatcher = _setup({}, 1, circuit_breaker=breaker, retries=2)
    for _ in range(10):
        with pytest.raises(UpstreamUnavailable):
            await _send(dispatcher, pool, "PUT", _body(limit=3))
    member = pool.members[0]
    assert member.breaker is not None and member.breaker.allows(clock.now)
    assert member.endpoint.consecutive_failures == 0 and len(client.sent) == 10  # and no retries


def _sample(name: str, **labels: str) -> float:
    metrics.flush()  # per-try counts are batched until a scrape
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_tries_retries_sheds_and_breaker_changes_are_counted_in_metrics() -> None:
    breaker = CircuitBreaker(failure_rate=0.5, min_requests=2, window_s=10, open_s=30, half_open_requests=1)
    _, _, pool, dispatcher = _setup({"a.internal": 503, "b.internal": 503}, retries=1, circuit_breaker=breaker)
    a = URLS[0]
    before = {
        "a503": _sample("tenantgate_upstream_requests_total", route="r1", target=a, result="5xx"),
        "retries": _sample("tenantgate_upstream_retries_total", route="r1"),
        "opened": _sample("tenantgate_upstream_breaker_transitions_total", target=a, state="open"),
        "shed": _sample("tenantgate_upstream_shed_total", route="r1", reason="circuit_open"),
    }
    for _ in range(2):
        assert await _send(dispatcher, pool) == 503  # a then b, b then a: both breakers open
    with pytest.raises(ServiceUnavailable):
        await _send(dispatcher, pool)
    assert _sample("tenantgate_upstream_requests_total", route="r1", target=a, result="5xx") == before["a503"] + 2
    assert _sample("tenantgate_upstream_retries_total", route="r1") == before["retries"] + 2
    assert _sample("tenantgate_upstream_breaker_transitions_total", target=a, state="open") == before["opened"] + 1
    assert _sample("tenantgate_upstream_breaker_state", target=a) == 2
    assert _sample("tenantgate_upstream_shed_total", route="r1", reason="circuit_open") == before["shed"] + 1

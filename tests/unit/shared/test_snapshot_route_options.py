"""shared.snapshot: the route fields beyond the seed shape (load balancing, matching conditions,
access restrictions, resilience), their protobuf round trip and their validation.

One fully populated valid route, and one bad route per validation failure.
"""

from __future__ import annotations

import dataclasses

import pytest

from shared import snapshot as model
from shared._generated.tenantgate.v1 import snapshot_pb2 as pb
from shared.errors import InvalidSnapshot
from shared.snapshot import CircuitBreaker, HealthCheck, Route, Snapshot, Tenant, Upstream

pytestmark = pytest.mark.unit

BREAKER = CircuitBreaker(failure_rate=0.5, min_requests=20, window_s=10, open_s=30, half_open_requests=3)
CHECK = HealthCheck(path="/health", interval_s=5, healthy=2, unhealthy=3)


def _route(**overrides: object) -> Route:
    values: dict[str, object] = dict(
        id="r1",
        path="/api/users/*",
        methods=("GET",),
        upstreams=(Upstream("http://a.internal:3000", 3), Upstream("http://b.internal:3000", 1)),
        auth_required=True,
        rate_limit=100,
        timeout_ms=5000,
        strip_prefix=False,
        priority=0,
        load_balancing="consistent_hash",
        hash_on="header:X-User-ID",
        host="api.example.com",
        headers=(("x-region", "eu west"), ("x-version", "2")),
        tenants=("t1", "t-deleted"),
        tiers=("enterprise", "premium"),
        scopes=("users:read", "users:write"),
        retries=2,
        websocket=True,
        max_body_bytes=1024,
        circuit_breaker=BREAKER,
        health_check=CHECK,
        burst=20,
    )
    values.update(overrides)
    return Route(**values)  # type: ignore[arg-type]


def _snapshot(*routes: Route) -> Snapshot:
    tenant = Tenant("t1", "Acme", "premium", 1000, 50_000, 0, 0, True)
    return Snapshot(version=3, built_at_ms=1_700_000_000_000, tenants=(tenant,), api_keys=(), routes=routes)


def _round_trip(snap: Snapshot) -> Snapshot:
    msg = pb.Snapshot()
    msg.ParseFromString(model.to_proto(snap).SerializeToString())
    return model.from_proto(msg)


def _assert_invalid(route: Route, message: str) -> None:
    with pytest.raises(InvalidSnapshot) as exc_info:
        model.validate(_snapshot(route))
    assert str(exc_info.value) == f"route r1: {message}"


# --- round trip ---


def test_every_route_field_round_trips_through_proto() -> None:
    snap = _snapshot(_route())
    assert _round_trip(snap) == snap


def test_seed_shaped_route_keeps_the_defaults() -> None:
    route = Route("r1", "/a", (), (Upstream("http://a", 1),), True, 0, 30_000, False, 0)

    back = _round_trip(_snapshot(route)).routes[0]

    assert back == route
    assert (back.load_balancing, back.hash_on, back.host, back.headers) == ("round_robin", "", "", ())
    assert (back.max_body_bytes, back.circuit_breaker, back.health_check, back.burst) == (10_485_760, None, None, 0)


def test_absent_options_stay_absent_on_the_wire() -> None:
    msg = model.to_proto(_snapshot(_route(circuit_breaker=None, health_check=None))).routes[0]

    assert not msg.HasField("circuit_breaker")
    assert not msg.HasField("health_check")


def test_to_proto_carries_headers_as_a_map_and_breaker_as_a_message() -> None:
    msg = model.to_proto(_snapshot(_route())).routes[0]

    assert dict(msg.headers) == {"x-region": "eu west", "x-version": "2"}
    assert msg.circuit_breaker.failure_rate == 0.5
    assert msg.health_check.path == "/health"
    assert list(msg.tenants) == ["t1", "t-deleted"]


def test_headers_come_back_sorted_whatever_the_map_order() -> None:
    msg = model.to_proto(_snapshot(_route(headers=()))).routes[0]
    msg.headers["x-z"] = "1"
    msg.headers["x-a"] = "2"

    assert model.from_proto(pb.Snapshot(version=3, routes=[msg])).routes[0].headers == (("x-a", "2"), ("x-z", "1"))


def test_snapshot_from_before_the_new_fields_means_round_robin_and_no_body_limit() -> None:
    old = pb.Route(
        id="r1", path="/a", upstreams=[pb.Upstream(url="http://a", weight=1)], auth_required=True, timeout_ms=1000
    )

    route = model.from_proto(pb.Snapshot(version=3, routes=[old])).routes[0]

    assert (route.load_balancing, route.max_body_bytes, route.retries) == ("round_robin", 0, 0)


@pytest.mark.parametrize("hash_on", ["tenant", "ip", "header:X-Session", "header:x_b"])
def test_valid_hash_on(hash_on: str) -> None:
    model.validate(_snapshot(_route(hash_on=hash_on)))


def test_route_for_a_tenant_missing_from_the_snapshot_is_valid() -> None:
    # A deleted tenant's id stays on the route, which then serves nobody rather than everybody.
    model.validate(_snapshot(_route(tenants=("gone",))))


def test_burst_needs_no_more_than_a_rate_limit_and_zero_body_limit_is_unlimited() -> None:
    model.validate(_snapshot(_route(burst=1, rate_limit=1, max_body_bytes=0)))


# --- validation failures: one bad route per failure ---


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"upstreams": (Upstream("http://a", 10_001),)}, "upstream weight must be at most 10000"),
        ({"upstreams": tuple(Upstream(f"http://h{i}", 1) for i in range(65))}, "at most 64 upstreams"),
        ({"load_balancing": "random"}, "unknown load_balancing 'random'"),
        ({"hash_on": ""}, "consistent_hash needs hash_on"),
        ({"hash_on": "cookie:x"}, "hash_on must be 'tenant', 'ip' or 'header:<Name>' with a valid header name"),
        ({"hash_on": "header:"}, "hash_on must be 'tenant', 'ip' or 'header:<Name>' with a valid header name"),
        ({"hash_on": "header:a b"}, "hash_on must be 'tenant', 'ip' or 'header:<Name>' with a valid header name"),
        (
            {"host": "API.example.com"},
            "host must be a host name (lower case in a snapshot) without port, like api.example.com",
        ),
        (
            {"host": "api.example.com:443"},
            "host must be a host name (lower case in a snapshot) without port, like api.example.com",
        ),
        ({"headers": (("x a", "1"),)}, "header name 'x a' is not a valid HTTP token"),
        ({"headers": (("X-Version", "2"),)}, "header name 'X-Version' must be lower case"),
        (
            {"headers": (("x-a", "1\r\nx-b: 2"),)},
            "header values must be 1..1024 visible ASCII characters without leading or trailing space",
        ),
        (
            {"headers": (("x-a", " 1"),)},
            "header values must be 1..1024 visible ASCII characters without leading or trailing space",
        ),
        ({"headers": tuple((f"x-{i}", "1") for i in range(17))}, "at most 16 header matches"),
        ({"tenants": ("t1", "t1")}, "tenants must be distinct, non-empty ids"),
        ({"tenants": ("",)}, "tenants must be distinct, non-empty ids"),
        ({"tiers": ("gold",)}, "unknown tiers ['gold']"),
        ({"scopes": ("a b",)}, "scope 'a b' is not a valid scope token (RFC 6749)"),
        ({"retries": 11}, "retries must be 0..10"),
        ({"retries": -1}, "retries must be 0..10"),
        ({"max_body_bytes": -1}, "max_body_bytes must not be negative"),
        ({"burst": -1}, "burst must not be negative"),
        ({"rate_limit": 0}, "burst needs a rate_limit"),
    ],
)
def test_bad_route_option_is_invalid(overrides: dict[str, object], message: str) -> None:
    _assert_invalid(_route(**overrides), message)


@pytest.mark.parametrize(
    ("breaker", "message"),
    [
        ({"failure_rate": 0.0}, "circuit_breaker.failure_rate must be in (0, 1]"),
        ({"failure_rate": 1.01}, "circuit_breaker.failure_rate must be in (0, 1]"),
        ({"failure_rate": float("nan")}, "circuit_breaker.failure_rate must be in (0, 1]"),
        ({"min_requests": 0}, "circuit_breaker.min_requests must be 1..1000000"),
        ({"window_s": 3601}, "circuit_breaker.window_s must be 1..3600"),
        ({"open_s": 0}, "circuit_breaker.open_s must be 1..3600"),
        ({"half_open_requests": 1001}, "circuit_breaker.half_open_requests must be 1..1000"),
    ],
)
def test_bad_circuit_breaker_is_invalid(breaker: dict[str, object], message: str) -> None:
    values: dict[str, object] = {**dataclasses.asdict(BREAKER), **breaker}
    _assert_invalid(_route(circuit_breaker=CircuitBreaker(**values)), message)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("check", "message"),
    [
        ({"path": "health"}, "health_check.path must start with '/' and hold only visible ASCII characters"),
        ({"path": "/a b"}, "health_check.path must start with '/' and hold only visible ASCII characters"),
        ({"interval_s": 0}, "health_check.interval_s must be 1..3600"),
        ({"healthy": 0}, "health_check.healthy must be 1..100"),
        ({"unhealthy": 101}, "health_check.unhealthy must be 1..100"),
    ],
)
def test_bad_health_check_is_invalid(check: dict[str, object], message: str) -> None:
    values: dict[str, object] = {**dataclasses.asdict(CHECK), **check}
    _assert_invalid(_route(health_check=HealthCheck(**values)), message)  # type: ignore[arg-type]


def test_bad_option_is_refused_on_the_wire_too() -> None:
    with pytest.raises(InvalidSnapshot, match="route r1: unknown tiers"):
        _round_trip(_snapshot(_route(tiers=("gold",))))

"""shared.snapshot: protobuf round trip and whole-snapshot validation.

One small valid snapshot, and one bad-snapshot builder per validation failure.
"""

from __future__ import annotations

import dataclasses
import hashlib

import pytest

from shared import snapshot as model
from shared._generated.tenantgate.v1 import snapshot_pb2 as pb
from shared.errors import InvalidSnapshot, TenantgateError
from shared.snapshot import ApiKey, Route, Snapshot, Tenant, Upstream

pytestmark = pytest.mark.unit

HASH_A = hashlib.sha256(b"tg_key-a").digest()
HASH_B = hashlib.sha256(b"tg_key-b").digest()


def _tenant(id: str = "t1", **overrides: object) -> Tenant:
    values: dict[str, object] = dict(
        id=id,
        name=f"Tenant {id}",
        tier="premium",
        rate_limit_per_minute=1000,
        rate_limit_per_hour=50_000,
        monthly_quota=1_000_000,
        max_concurrency=100,
        is_active=True,
    )
    values.update(overrides)
    return Tenant(**values)  # type: ignore[arg-type]


def _route(id: str = "r1", **overrides: object) -> Route:
    values: dict[str, object] = dict(
        id=id,
        path="/api/users/*",
        methods=("GET", "POST"),
        upstreams=(Upstream("http://user-service:3000", 1),),
        auth_required=True,
        rate_limit=100,
        timeout_ms=30_000,
        strip_prefix=False,
        priority=0,
    )
    values.update(overrides)
    return Route(**values)  # type: ignore[arg-type]


def _snapshot(**overrides: object) -> Snapshot:
    values: dict[str, object] = dict(
        version=7,
        built_at_ms=1_700_000_000_123,
        tenants=(_tenant("t1"), _tenant("t2", tier="free", is_active=False, monthly_quota=0)),
        api_keys=(ApiKey("k1", "t1", HASH_A), ApiKey("k2", "t2", HASH_B)),
        routes=(
            _route("r1"),
            _route(
                "r2",
                path="/orders/{id}",
                methods=(),
                upstreams=(Upstream("https://orders.internal:8443/base", 3), Upstream("http://10.0.0.2", 1)),
                auth_required=False,
                rate_limit=0,
                timeout_ms=model.MAX_TIMEOUT_MS,
                strip_prefix=True,
                priority=-5,
            ),
        ),
    )
    values.update(overrides)
    return Snapshot(**values)  # type: ignore[arg-type]


def _round_trip(snap: Snapshot) -> Snapshot:
    wire = model.to_proto(snap).SerializeToString()
    msg = pb.Snapshot()
    msg.ParseFromString(wire)
    return model.from_proto(msg)


def _assert_invalid(snap: Snapshot, message: str) -> None:
    with pytest.raises(InvalidSnapshot) as exc_info:
        _round_trip(snap)
    assert str(exc_info.value) == message


# --- round trip ---


def test_round_trip_through_proto_is_lossless() -> None:
    snap = _snapshot()
    assert _round_trip(snap) == snap


def test_from_proto_without_serialisation_is_lossless() -> None:
    snap = _snapshot()
    assert model.from_proto(model.to_proto(snap)) == snap


def test_to_proto_fields() -> None:
    msg = model.to_proto(_snapshot())
    assert msg.version == 7
    assert msg.built_at_ms == 1_700_000_000_123
    assert [t.id for t in msg.tenants] == ["t1", "t2"]
    assert msg.tenants[1].tier == "free"
    assert msg.tenants[1].is_active is False
    assert msg.api_keys[0].key_hash == HASH_A
    assert list(msg.routes[0].methods) == ["GET", "POST"]
    assert [(u.url, u.weight) for u in msg.routes[1].upstreams] == [
        ("https://orders.internal:8443/base", 3),
        ("http://10.0.0.2", 1),
    ]
    assert msg.routes[1].priority == -5
    assert msg.routes[1].strip_prefix is True


def test_from_proto_returns_tuples_and_bytes() -> None:
    snap = _round_trip(_snapshot())
    assert isinstance(snap.tenants, tuple)
    assert isinstance(snap.routes[0].methods, tuple)
    assert isinstance(snap.routes[0].upstreams, tuple)
    assert type(snap.api_keys[0].key_hash) is bytes


def test_snapshot_without_keys_or_routes_is_valid() -> None:
    snap = _snapshot(api_keys=(), routes=())
    assert _round_trip(snap) == snap


def test_empty_methods_mean_every_method_and_are_valid() -> None:
    snap = _snapshot(routes=(_route(methods=()),))
    assert _round_trip(snap).routes[0].methods == ()


def test_every_http_method_is_accepted() -> None:
    methods = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE")
    assert _round_trip(_snapshot(routes=(_route(methods=methods),))).routes[0].methods == methods


@pytest.mark.parametrize(
    "url",
    ["http://h", "https://h:443", "http://h/base/path", "http://[::1]:8080", "http://10.0.0.1:65535"],
)
def test_valid_upstream_urls(url: str) -> None:
    model.validate_upstream_url(url)
    assert _round_trip(_snapshot(routes=(_route(upstreams=(Upstream(url, 1),)),))).routes[0].upstreams == (
        Upstream(url, 1),
    )


def test_timeout_of_one_ms_is_valid() -> None:
    assert _round_trip(_snapshot(routes=(_route(timeout_ms=1),))).routes[0].timeout_ms == 1


def test_zero_limits_are_valid() -> None:
    t = _tenant(rate_limit_per_minute=0, rate_limit_per_hour=0, monthly_quota=0, max_concurrency=0)
    assert _round_trip(_snapshot(tenants=(t,), api_keys=())).tenants == (t,)


# --- validation failures: one bad snapshot per failure ---


def test_zero_version_is_invalid() -> None:
    _assert_invalid(_snapshot(version=0), "version must be positive")


def test_duplicate_tenant_id_is_invalid() -> None:
    _assert_invalid(
        _snapshot(tenants=(_tenant("t1"), _tenant("t1")), api_keys=()),
        "tenant id 't1' is empty or duplicated",
    )


def test_empty_tenant_id_is_invalid() -> None:
    _assert_invalid(_snapshot(tenants=(_tenant(""),), api_keys=()), "tenant id '' is empty or duplicated")


def test_unknown_tier_is_invalid() -> None:
    _assert_invalid(_snapshot(tenants=(_tenant("t1", tier="gold"),), api_keys=()), "tenant t1: unknown tier 'gold'")


@pytest.mark.parametrize("field", ["rate_limit_per_minute", "rate_limit_per_hour", "monthly_quota", "max_concurrency"])
def test_negative_tenant_limit_is_invalid(field: str) -> None:
    _assert_invalid(
        _snapshot(tenants=(_tenant("t1", **{field: -1}),), api_keys=()),
        "tenant t1: limits must not be negative",
    )


def test_duplicate_api_key_id_is_invalid() -> None:
    _assert_invalid(
        _snapshot(api_keys=(ApiKey("k1", "t1", HASH_A), ApiKey("k1", "t2", HASH_B))),
        "api key id 'k1' is empty or duplicated",
    )


def test_empty_api_key_id_is_invalid() -> None:
    _assert_invalid(_snapshot(api_keys=(ApiKey("", "t1", HASH_A),)), "api key id '' is empty or duplicated")


def test_key_of_unknown_tenant_is_invalid() -> None:
    _assert_invalid(_snapshot(api_keys=(ApiKey("k1", "t-missing", HASH_A),)), "api key k1: unknown tenant 't-missing'")


@pytest.mark.parametrize("length", [0, 1, 31, 33, 64])
def test_key_hash_of_wrong_length_is_invalid(length: int) -> None:
    _assert_invalid(
        _snapshot(api_keys=(ApiKey("k1", "t1", b"\x01" * length),)),
        "api key k1: hash must be 32 unique bytes",
    )


def test_duplicate_key_hash_is_invalid() -> None:
    _assert_invalid(
        _snapshot(api_keys=(ApiKey("k1", "t1", HASH_A), ApiKey("k2", "t2", HASH_A))),
        "api key k2: hash must be 32 unique bytes",
    )


def test_duplicate_route_id_is_invalid() -> None:
    _assert_invalid(
        _snapshot(routes=(_route("r1"), _route("r1", path="/other"))), "route id 'r1' is empty or duplicated"
    )


def test_empty_route_id_is_invalid() -> None:
    _assert_invalid(_snapshot(routes=(_route(""),)), "route id '' is empty or duplicated")


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("api", "path must start with '/'"),
        ("/a/*/b", "'*' is only allowed as the last segment"),
        ("/a/../b", "path must not contain empty, '.' or '..' segments"),
        ("/a/", "path must not end with '/' (use '/*' for a prefix)"),
        ("/{1x}", "bad parameter segment '{1x}': expected {name}"),
        ("/a;b", "segment 'a;b' has characters not allowed in a path"),
    ],
)
def test_bad_pattern_is_invalid(path: str, reason: str) -> None:
    _assert_invalid(_snapshot(routes=(_route(path=path),)), f"route r1: {reason}")


def test_unknown_method_is_invalid() -> None:
    _assert_invalid(
        _snapshot(routes=(_route(methods=("GET", "get", "BREW")),)),
        "route r1: unknown methods ['BREW', 'get']",
    )


def test_route_without_upstream_is_invalid() -> None:
    _assert_invalid(_snapshot(routes=(_route(upstreams=()),)), "route r1: no upstream")


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("ftp://files:21", "scheme must be http or https"),
        ("ws://h", "scheme must be http or https"),
        ("unix:///tmp/s.sock", "scheme must be http or https"),
        ("user-service:3000", "scheme must be http or https"),
        ("//h/path", "scheme must be http or https"),
        ("http://", "must name a host"),
        ("http:///path", "must name a host"),
        ("http://user:pw@h", "must not carry credentials"),
        ("http://user@h", "must not carry credentials"),
        ("http://h/?x=1", "must not have a query or fragment"),
        ("http://h/#top", "must not have a query or fragment"),
        ("http://h?", "must not have a query or fragment"),
        ("http://h:0", "port must not be 0"),
    ],
)
def test_bad_upstream_url_is_invalid(url: str, reason: str) -> None:
    _assert_invalid(_snapshot(routes=(_route(upstreams=(Upstream(url, 1),)),)), f"route r1: upstream {url!r}: {reason}")


@pytest.mark.parametrize("url", ["http://h:99999", "http://h:port"])
def test_upstream_url_with_unparseable_port_is_invalid(url: str) -> None:
    with pytest.raises(InvalidSnapshot) as exc_info:
        _round_trip(_snapshot(routes=(_route(upstreams=(Upstream(url, 1),)),)))
    assert str(exc_info.value).startswith(f"route r1: upstream {url!r}: not a valid URL: ")


def test_zero_weight_is_invalid() -> None:
    _assert_invalid(
        _snapshot(routes=(_route(upstreams=(Upstream("http://a", 1), Upstream("http://b", 0))),)),
        "route r1: upstream weight must be positive",
    )


def test_negative_weight_is_invalid() -> None:
    # Not representable in the proto (uint32): validated on the model directly.
    snap = _snapshot(routes=(_route(upstreams=(Upstream("http://a", -1),)),))
    with pytest.raises(InvalidSnapshot) as exc_info:
        model.validate(snap)
    assert str(exc_info.value) == "route r1: upstream weight must be positive"


@pytest.mark.parametrize("timeout_ms", [0, model.MAX_TIMEOUT_MS + 1])
def test_bad_timeout_is_invalid(timeout_ms: int) -> None:
    _assert_invalid(_snapshot(routes=(_route(timeout_ms=timeout_ms),)), "route r1: timeout_ms must be 1..3600000")


def test_negative_timeout_is_invalid() -> None:
    snap = _snapshot(routes=(_route(timeout_ms=-1),))
    with pytest.raises(InvalidSnapshot) as exc_info:
        model.validate(snap)
    assert str(exc_info.value) == "route r1: timeout_ms must be 1..3600000"


def test_negative_route_rate_limit_is_invalid() -> None:
    _assert_invalid(_snapshot(routes=(_route(rate_limit=-1),)), "route r1: rate_limit must not be negative")


def test_invalid_snapshot_is_a_tenantgate_error() -> None:
    with pytest.raises(TenantgateError):
        _round_trip(_snapshot(version=0))


def test_first_bad_route_is_named_even_after_good_ones() -> None:
    snap = _snapshot(routes=(_route("r1"), _route("r2", path="/x", timeout_ms=0), _route("r3", upstreams=())))
    _assert_invalid(snap, "route r2: timeout_ms must be 1..3600000")


def test_snapshot_model_is_frozen() -> None:
    snap = _snapshot()
    with pytest.raises(dataclasses.FrozenInstanceError):
        snap.version = 8  # type: ignore[misc]


def test_the_config_epoch_round_trips_and_is_bounded() -> None:
    snap = dataclasses.replace(_snapshot(), epoch="0b6c8f5e-2f43-4c3b-9a3e-7d1f1b0e5a11")
    assert _round_trip(snap) == snap
    assert model.to_proto(snap).epoch == snap.epoch
    assert model.to_proto(_snapshot()).epoch == ""  # unknown: every node takes it whole
    _assert_invalid(dataclasses.replace(snap, epoch="e" * 65), "epoch longer than 64 characters")

"""``/admin/routes`` against real Postgres: every field, every endpoint, its errors and who may call it.

One control plane serves the module (starting one per case would dominate the run time); each
test works on paths of its own so that the routes of one never clash with another's.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from tests.integration.harness import (
    ControlPlane,
    Processes,
    Response,
    start_control_plane,
    start_data_plane,
    wait_for,
)

pytestmark = pytest.mark.integration

FULL_ROUTE: dict[str, Any] = {
    "upstreams": [{"url": "http://users-a.internal:3000", "weight": 3}, {"url": "http://users-b.internal:3000"}],
    "methods": ["post", "GET"],
    "auth_required": True,
    "rate_limit": 100,
    "burst": 20,
    "load_balancing": "consistent_hash",
    "hash_on": "header:X-User-ID",
    "host": "API.Example.com",
    "headers": {"X-Version": "2"},
    "tiers": ["premium", "enterprise"],
    "scopes": ["users:read", "users:write"],
    "timeout_ms": 5000,
    "retries": 2,
    "strip_prefix": True,
    "websocket": True,
    "max_body_bytes": 1024,
    "rate_limit_shadow": True,
    "priority": 7,
    "is_active": True,
    "circuit_breaker": {
        "failure_rate": 0.25,
        "min_requests": 10,
        "window_s": 20,
        "open_s": 15,
        "half_open_requests": 2,
    },
    "health_check": {"path": "/healthz", "interval_s": 3, "healthy": 1, "unhealthy": 4},
}


async def _admin_execute(url: str, sql: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def cp(postgres_admin_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """One control plane on a database of its own for the whole module."""
    name = f"tg_test_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin_execute(postgres_admin_url, f'CREATE DATABASE "{name}"'))
    processes = Processes(Path(tmp_path_factory.mktemp("admin-routes")))
    try:
        database_url = urlunsplit(urlsplit(postgres_admin_url)._replace(path=f"/{name}"))
        yield start_control_plane(processes, database_url)
    finally:
        processes.stop_all()
        asyncio.run(_admin_execute(postgres_admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def _unique() -> str:
    return f"/r{uuid.uuid4().hex[:10]}"


def _created(resp: Response) -> dict[str, Any]:
    assert resp.status == 201, resp.body
    body: dict[str, Any] = resp.json()
    return body


def _route(cp: ControlPlane, **fields: Any) -> dict[str, Any]:
    body = {"path": f"{_unique()}/*", "upstream": "http://svc.internal:3000", **fields}
    return _created(cp.api("POST", "/admin/routes", body))


def _tenant(cp: ControlPlane) -> str:
    tenant_id: str = _created(cp.api("POST", "/admin/tenants", {"name": "Acme"}))["id"]
    return tenant_id


def _token(cp: ControlPlane, role: str, tenant_id: str | None = None) -> str:
    body = {"name": f"{role}-token", "role": role, **({"tenant_id": tenant_id} if tenant_id else {})}
    token: str = _created(cp.api("POST", "/admin/tokens", body))["token"]
    return token


def _error(resp: Response, status: int) -> dict[str, Any]:
    assert resp.status == status, resp.body
    error: dict[str, Any] = resp.json()["error"]
    return error


def _without_version(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != "config_version"}


# --- create and read ---


def test_route_with_every_field_round_trips_through_get(cp: ControlPlane) -> None:
    tenant_id = _tenant(cp)
    path = f"{_unique()}/{{id}}"

    created = _created(cp.api("POST", "/admin/routes", {"path": path, **FULL_ROUTE, "tenants": [tenant_id.upper()]}))
    got = cp.api("GET", f"/admin/routes/{created['id']}")
    listed = cp.api("GET", "/admin/routes")
    config = cp.api("GET", "/admin/config")

    assert created == {
        "id": created["id"],
        "path": path,
        "upstream": "http://users-a.internal:3000",
        "upstreams": [
            {"url": "http://users-a.internal:3000", "weight": 3},
            {"url": "http://users-b.internal:3000", "weight": 1},
        ],
        "methods": ["GET", "POST"],
        "auth_required": True,
        "rate_limit": 100,
        "burst": 20,
        "timeout_ms": 5000,
        "retries": 2,
        "strip_prefix": True,
        "priority": 7,
        "is_active": True,
        "load_balancing": "consistent_hash",
        "hash_on": "header:X-User-ID",
        "host": "api.example.com",
        "headers": {"x-version": "2"},
        "tenants": [tenant_id],
        "tiers": ["enterprise", "premium"],
        "scopes": ["users:read", "users:write"],
        "websocket": True,
        "max_body_bytes": 1024,
        "rate_limit_shadow": True,
        "circuit_breaker": FULL_ROUTE["circuit_breaker"],
        "health_check": FULL_ROUTE["health_check"],
        "created_at": created["created_at"],
        "updated_at": created["updated_at"],
        "config_version": created["config_version"],
    }
    assert got.status == 200
    assert got.json() == _without_version(created)
    assert _without_version(created) in listed.json()["items"]
    assert _without_version(created) in config.json()["routes"]


def test_seed_shape_gets_every_default(cp: ControlPlane) -> None:
    path = f"{_unique()}/*"

    resp = cp.api(
        "POST",
        "/admin/routes",
        {"path": path, "upstream": "http://user-service:3000", "methods": ["GET", "POST"], "rate_limit": 100},
    )

    body = _created(resp)
    assert resp.headers["x-config-version"] == str(body["config_version"])
    assert body["upstream"] == "http://user-service:3000"
    assert body["upstreams"] == [{"url": "http://user-service:3000", "weight": 1}]
    defaults = {k: body[k] for k in body if k not in ("id", "path", "upstream", "upstreams", "methods", "rate_limit")}
    assert {k: v for k, v in defaults.items() if k not in ("created_at", "updated_at", "config_version")} == {
        "auth_required": True,
        "burst": None,
        "timeout_ms": 30_000,
        "retries": 0,
        "strip_prefix": False,
        "priority": 0,
        "is_active": True,
        "load_balancing": "round_robin",
        "hash_on": None,
        "host": None,
        "headers": {},
        "tenants": [],
        "tiers": [],
        "scopes": [],
        "websocket": False,
        "max_body_bytes": 10_485_760,
        "rate_limit_shadow": False,
        "circuit_breaker": None,
        "health_check": None,
    }


def test_consistent_hash_defaults_hash_on_to_tenant(cp: ControlPlane) -> None:
    assert _route(cp, load_balancing="consistent_hash")["hash_on"] == "tenant"


def test_circuit_breaker_and_health_check_members_default(cp: ControlPlane) -> None:
    body = _route(cp, circuit_breaker={"failure_rate": 1}, health_check={})

    assert body["circuit_breaker"] == {
        "failure_rate": 1.0,
        "min_requests": 20,
        "window_s": 10,
        "open_s": 30,
        "half_open_requests": 3,
    }
    assert body["health_check"] == {"path": "/health", "interval_s": 5, "healthy": 2, "unhealthy": 3}


def test_list_holds_items_in_creation_order(cp: ControlPlane) -> None:
    first, second = _route(cp), _route(cp, is_active=False)

    ids = [r["id"] for r in cp.api("GET", "/admin/routes").json()["items"]]

    assert ids.index(first["id"]) < ids.index(second["id"])


# --- conflicts ---


def test_identical_active_route_with_overlapping_methods_is_409(cp: ControlPlane) -> None:
    path = f"{_unique()}/*"
    base = {"path": path, "upstream": "http://a.internal", "host": "api.example.com", "headers": {"X-V": "2"}}
    _created(cp.api("POST", "/admin/routes", {**base, "methods": ["GET", "POST"]}))

    same_method = cp.api("POST", "/admin/routes", {**base, "methods": ["POST"], "host": "API.example.com"})
    every_method = cp.api("POST", "/admin/routes", {**base, "headers": {"x-v": "2"}})

    assert _error(same_method, 409)["code"] == "route_conflict"
    assert _error(every_method, 409)["code"] == "route_conflict"


@pytest.mark.parametrize(
    "difference",
    [
        {"methods": ["DELETE"]},
        {"host": "other.example.com"},
        {"host": None},
        {"headers": {"X-V": "3"}},
        {"headers": {}},
        {"priority": 1},
        {"is_active": False},
    ],
)
def test_route_differing_in_match_is_not_a_conflict(cp: ControlPlane, difference: dict[str, Any]) -> None:
    base = {
        "path": f"{_unique()}/*",
        "upstream": "http://a.internal",
        "methods": ["GET"],
        "host": "api.example.com",
        "headers": {"X-V": "2"},
    }
    _created(cp.api("POST", "/admin/routes", base))

    _created(cp.api("POST", "/admin/routes", {**base, **difference}))


def test_patch_into_another_routes_match_is_409_but_its_own_is_fine(cp: ControlPlane) -> None:
    path = f"{_unique()}/*"
    _created(cp.api("POST", "/admin/routes", {"path": path, "upstream": "http://a.internal", "methods": ["GET"]}))
    other = _created(cp.api("POST", "/admin/routes", {"path": path, "upstream": "http://b.internal", "priority": 1}))

    clash = cp.api("PATCH", f"/admin/routes/{other['id']}", {"priority": 0})
    itself = cp.api("PATCH", f"/admin/routes/{other['id']}", {"priority": 1, "upstream": "http://c.internal"})

    assert _error(clash, 409)["code"] == "route_conflict"
    assert itself.status == 200, itself.body


def test_reactivating_into_an_active_routes_match_is_409(cp: ControlPlane) -> None:
    path = f"{_unique()}/*"
    _created(cp.api("POST", "/admin/routes", {"path": path, "upstream": "http://a.internal"}))
    idle = _created(
        cp.api("POST", "/admin/routes", {"path": path, "upstream": "http://b.internal", "is_active": False})
    )

    resp = cp.api("PATCH", f"/admin/routes/{idle['id']}", {"is_active": True})

    assert _error(resp, 409)["code"] == "route_conflict"


# --- invalid fields ---

_BAD_FIELDS: list[tuple[dict[str, Any], str]] = [
    ({"path": "api"}, "path"),
    ({"path": "/a/*/b"}, "path"),
    ({"upstream": "ftp://files:21"}, "upstream"),
    ({"upstream": "http://h/ x"}, "upstream"),
    ({"upstream": "http://169.254.169.254/latest"}, "upstream"),
    ({"upstream": "http://[fe80::1]:80"}, "upstream"),
    ({"upstream": "http://metadata.google.internal"}, "upstream"),
    ({"upstream": None, "upstreams": [{"url": "http://169.254.169.254"}]}, "upstreams"),
    ({"upstream": None, "upstreams": []}, "upstreams"),
    ({"upstream": None, "upstreams": [{"url": "http://a", "weight": 0}]}, "upstreams.0.weight"),
    ({"upstream": None, "upstreams": [{"url": "http://a", "weight": 10_001}]}, "upstreams.0.weight"),
    ({"upstream": None, "upstreams": [{"url": "http://a"}, {"url": "http://a"}]}, "upstreams"),
    ({"upstream": None, "upstreams": [{"url": "http://a", "extra": 1}]}, "upstreams.0.extra"),
    ({"upstreams": [{"url": "http://a"}]}, "upstream"),  # both
    ({"upstream": None}, "upstream"),  # neither
    ({"methods": ["BREW"]}, "methods"),
    ({"methods": "GET"}, "methods"),
    ({"auth_required": "yes"}, "auth_required"),
    ({"rate_limit": 0}, "rate_limit"),
    ({"rate_limit": "100"}, "rate_limit"),
    ({"burst": 10}, "burst"),  # no rate_limit
    ({"rate_limit": 10, "burst": 0}, "burst"),
    ({"timeout_ms": 0}, "timeout_ms"),
    ({"timeout_ms": 3_600_001}, "timeout_ms"),
    ({"retries": -1}, "retries"),
    ({"retries": 11}, "retries"),
    ({"priority": 1.5}, "priority"),
    ({"load_balancing": "random"}, "load_balancing"),
    ({"load_balancing": "consistent_hash", "hash_on": "cookie:x"}, "hash_on"),
    ({"load_balancing": "consistent_hash", "hash_on": "header:"}, "hash_on"),
    ({"hash_on": "tenant"}, "hash_on"),  # round_robin hashes nothing
    ({"host": "api.example.com:8443"}, "host"),
    ({"host": "bad host"}, "host"),
    ({"host": "-x.example.com"}, "host"),
    ({"headers": {"bad name": "1"}}, "headers"),
    ({"headers": {"X-A": "a\r\nb"}}, "headers"),
    ({"headers": {"X-A": ""}}, "headers"),
    ({"headers": {"X-A": "1", "x-a": "2"}}, "headers"),
    ({"headers": {"X-A": 1}}, "headers.X-A"),
    ({"headers": {f"X-{i}": "1" for i in range(17)}}, "headers"),
    ({"tenants": ["not-a-uuid"]}, "tenants"),
    ({"tenants": [str(uuid.uuid4())]}, "tenants"),  # no such tenant
    ({"tiers": ["gold"]}, "tiers.0"),
    ({"scopes": ["bad scope"]}, "scopes"),
    ({"scopes": ['quote"d']}, "scopes"),
    ({"websocket": 1}, "websocket"),
    ({"max_body_bytes": -1}, "max_body_bytes"),
    ({"circuit_breaker": {"failure_rate": 0}}, "circuit_breaker.failure_rate"),
    ({"circuit_breaker": {"failure_rate": 1.5}}, "circuit_breaker.failure_rate"),
    ({"circuit_breaker": {"min_requests": 0}}, "circuit_breaker.min_requests"),
    ({"circuit_breaker": {"window_s": 0}}, "circuit_breaker.window_s"),
    ({"circuit_breaker": {"open_s": 3601}}, "circuit_breaker.open_s"),
    ({"circuit_breaker": {"half_open_requests": 0}}, "circuit_breaker.half_open_requests"),
    ({"circuit_breaker": {"bogus": 1}}, "circuit_breaker.bogus"),
    ({"circuit_breaker": True}, "circuit_breaker"),
    ({"health_check": {"path": "health"}}, "health_check.path"),
    ({"health_check": {"interval_s": 0}}, "health_check.interval_s"),
    ({"health_check": {"healthy": 0}}, "health_check.healthy"),
    ({"health_check": {"unhealthy": 101}}, "health_check.unhealthy"),
    ({"shadow": True}, "shadow"),
    ({"id": str(uuid.uuid4())}, "id"),
]


@pytest.mark.parametrize(("fields", "field"), _BAD_FIELDS)
def test_invalid_field_on_create_is_422_naming_it(cp: ControlPlane, fields: dict[str, Any], field: str) -> None:
    body = {"path": f"{_unique()}/*", "upstream": "http://svc.internal:3000", **fields}
    body = {k: v for k, v in body.items() if not (k == "upstream" and v is None)}

    error = _error(cp.api("POST", "/admin/routes", body), 422)

    assert error["code"] == "invalid_request"
    assert error["message"].startswith(f"{field}:"), error["message"]


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"upstream": "http://169.254.169.254"}, "upstream"),
        ({"upstreams": [{"url": "http://ok.internal"}, {"url": "http://[fe80::1]"}]}, "upstreams"),
        ({"upstream": "http://a.internal", "upstreams": [{"url": "http://b.internal"}]}, "upstream"),
        ({"upstream": None}, "upstream"),
        ({"upstreams": None}, "upstreams"),
        ({"methods": None}, "methods"),
        ({"path": None}, "path"),
        ({"headers": None}, "headers"),
        ({"tenants": [str(uuid.uuid4())]}, "tenants"),
        ({"burst": 5}, "burst"),  # the route has no rate_limit
        ({"hash_on": "ip"}, "hash_on"),  # the route is round_robin
        ({"load_balancing": "consistent_hash", "hash_on": None}, "hash_on"),
        ({"max_body_bytes": -5}, "max_body_bytes"),
        ({"circuit_breaker": {"failure_rate": 2}}, "circuit_breaker.failure_rate"),
        ({"is_active": None}, "is_active"),
        ({"created_at": "2020-01-01T00:00:00Z"}, "created_at"),
    ],
)
def test_invalid_field_on_patch_is_422_naming_it(cp: ControlPlane, fields: dict[str, Any], field: str) -> None:
    route = _route(cp)

    error = _error(cp.api("PATCH", f"/admin/routes/{route['id']}", fields), 422)

    assert error["message"].startswith(f"{field}:"), error["message"]
    assert _without_version(cp.api("GET", f"/admin/routes/{route['id']}").json()) == _without_version(route)


def test_upstream_at_the_control_planes_own_ports_is_422(cp: ControlPlane) -> None:
    admin_port = urlsplit(cp.admin_url).port
    cluster_port = int(cp.cluster_addr.rsplit(":", 1)[1])
    urls = [
        f"http://127.0.0.1:{admin_port}",
        f"http://localhost:{admin_port}/admin",
        f"http://[::1]:{cluster_port}",
        f"https://127.0.0.2:{cluster_port}",
    ]

    for url in urls:
        error = _error(cp.api("POST", "/admin/routes", {"path": f"{_unique()}/*", "upstream": url}), 422)
        assert error["message"].startswith("upstream:"), (url, error)


def test_route_for_an_existing_tenant_is_accepted(cp: ControlPlane) -> None:
    tenant_id = _tenant(cp)

    assert _route(cp, tenants=[tenant_id, tenant_id])["tenants"] == [tenant_id]


# --- update ---


def test_patch_of_one_field_keeps_the_others(cp: ControlPlane) -> None:
    route = _created(cp.api("POST", "/admin/routes", {"path": f"{_unique()}/*", **FULL_ROUTE}))

    resp = cp.api("PATCH", f"/admin/routes/{route['id']}", {"timeout_ms": 1234})

    assert resp.status == 200, resp.body
    patched = resp.json()
    assert patched["timeout_ms"] == 1234
    assert patched["config_version"] > route["config_version"]
    assert resp.headers["x-config-version"] == str(patched["config_version"])
    changed = ("timeout_ms", "updated_at", "config_version")
    assert {k: v for k, v in patched.items() if k not in changed} == {
        k: v for k, v in route.items() if k not in changed
    }
    assert _without_version(cp.api("GET", f"/admin/routes/{route['id']}").json()) == _without_version(patched)


def test_patch_replaces_upstreams_with_either_field(cp: ControlPlane) -> None:
    route = _route(cp)
    url = f"/admin/routes/{route['id']}"

    many = cp.api(
        "PATCH", url, {"upstreams": [{"url": "http://x.internal", "weight": 2}, {"url": "http://y.internal"}]}
    )
    one = cp.api("PATCH", url, {"upstream": "http://z.internal"})

    assert many.json()["upstream"] == "http://x.internal"
    assert many.json()["upstreams"] == [
        {"url": "http://x.internal", "weight": 2},
        {"url": "http://y.internal", "weight": 1},
    ]
    assert one.json()["upstreams"] == [{"url": "http://z.internal", "weight": 1}]


def test_patch_null_turns_an_option_off(cp: ControlPlane) -> None:
    route = _route(
        cp,
        host="api.example.com",
        rate_limit=10,
        burst=5,
        circuit_breaker={},
        health_check={},
        load_balancing="consistent_hash",
        hash_on="ip",
    )

    resp = cp.api(
        "PATCH",
        f"/admin/routes/{route['id']}",
        {"host": None, "burst": None, "circuit_breaker": None, "health_check": None},
    )

    assert resp.status == 200, resp.body
    body = resp.json()
    assert (body["host"], body["burst"], body["circuit_breaker"], body["health_check"]) == (None, None, None, None)
    assert (body["rate_limit"], body["hash_on"]) == (10, "ip")


def test_patch_turning_off_a_parent_option_clears_its_dependant(cp: ControlPlane) -> None:
    route = _route(cp, rate_limit=10, burst=5, load_balancing="consistent_hash", hash_on="ip")

    resp = cp.api("PATCH", f"/admin/routes/{route['id']}", {"rate_limit": None, "load_balancing": "least_connections"})

    assert resp.status == 200, resp.body
    body = resp.json()
    assert (body["rate_limit"], body["burst"], body["load_balancing"], body["hash_on"]) == (
        None,
        None,
        "least_connections",
        None,
    )


def test_patch_to_consistent_hash_defaults_hash_on(cp: ControlPlane) -> None:
    route = _route(cp)

    resp = cp.api("PATCH", f"/admin/routes/{route['id']}", {"load_balancing": "consistent_hash"})

    assert resp.json()["hash_on"] == "tenant"


# --- delete, unknown ids, versions ---


def test_delete_then_get_is_404(cp: ControlPlane) -> None:
    route = _route(cp)
    url = f"/admin/routes/{route['id']}"

    deleted = cp.api("DELETE", url)

    assert deleted.status == 200, deleted.body
    assert deleted.json() == {"id": route["id"], "deleted": True, "config_version": deleted.json()["config_version"]}
    assert deleted.json()["config_version"] > route["config_version"]
    assert deleted.headers["x-config-version"] == str(deleted.json()["config_version"])
    assert cp.api("GET", url).status == 404
    assert cp.api("DELETE", url).status == 404
    assert route["id"] not in [r["id"] for r in cp.api("GET", "/admin/routes").json()["items"]]


@pytest.mark.parametrize("route_id", [str(uuid.uuid4()), "not-a-uuid", "1"])
@pytest.mark.parametrize("method", ["GET", "PATCH", "DELETE"])
def test_unknown_or_malformed_id_is_404(cp: ControlPlane, route_id: str, method: str) -> None:
    resp = cp.api(method, f"/admin/routes/{route_id}", {"priority": 1} if method == "PATCH" else None)

    assert _error(resp, 404)["code"] == "not_found"


def test_config_version_strictly_increases_with_every_write(cp: ControlPlane) -> None:
    first = _route(cp)
    second = _route(cp)
    patched = cp.api("PATCH", f"/admin/routes/{first['id']}", {"priority": 3}).json()
    deleted = cp.api("DELETE", f"/admin/routes/{second['id']}").json()
    refused = cp.api("POST", "/admin/routes", {"path": "bad", "upstream": "http://a"})

    versions = [first["config_version"], second["config_version"], patched["config_version"], deleted["config_version"]]

    assert versions == sorted(set(versions))
    assert refused.status == 422 and "x-config-version" not in refused.headers
    assert cp.api("GET", "/admin/config").json()["version"] == versions[-1]


def test_refused_write_changes_nothing(cp: ControlPlane) -> None:
    route = _route(cp)
    before = cp.api("GET", "/admin/config").json()["version"]

    cp.api("POST", "/admin/routes", {"path": route["path"], "upstream": "http://b.internal"})  # 409
    cp.api("POST", "/admin/routes", {"path": f"{_unique()}/*", "upstream": "http://b", "tenants": [str(uuid.uuid4())]})

    assert cp.api("GET", "/admin/config").json()["version"] == before


# --- who may call ---


def test_viewer_reads_routes_but_cannot_write_them(cp: ControlPlane) -> None:
    route = _route(cp)
    viewer = _token(cp, "viewer")
    url = f"/admin/routes/{route['id']}"

    assert cp.api("GET", "/admin/routes", token=viewer).status == 200
    assert cp.api("GET", url, token=viewer).json() == _without_version(route)
    for method, path, body in [
        ("POST", "/admin/routes", {"path": f"{_unique()}/*", "upstream": "http://a.internal"}),
        ("PATCH", url, {"priority": 5}),
        ("DELETE", url, None),
    ]:
        assert _error(cp.api(method, path, body, token=viewer), 403)["code"] == "admin_required"
    assert cp.api("GET", url).json() == _without_version(route)


def test_tenant_admin_may_not_touch_routes(cp: ControlPlane) -> None:
    route = _route(cp)
    token = _token(cp, "tenant_admin", _tenant(cp))
    url = f"/admin/routes/{route['id']}"

    for method, path, body in [
        ("GET", "/admin/routes", None),
        ("GET", url, None),
        ("POST", "/admin/routes", {"path": f"{_unique()}/*", "upstream": "http://a.internal"}),
        ("PATCH", url, {"priority": 5}),
        ("DELETE", url, None),
    ]:
        assert cp.api(method, path, body, token=token).status == 403, (method, path)


def test_routes_need_a_token(cp: ControlPlane) -> None:
    assert _error(cp.api("GET", "/admin/routes", token=""), 401)["code"] == "missing_credentials"
    assert cp.api("POST", "/admin/routes", {"path": "/x", "upstream": "http://a"}, token="wrong").status == 401


# --- the snapshot ---


def test_route_with_every_field_is_accepted_by_a_data_plane(
    procs: Processes, database_url: str, redis_url: str
) -> None:
    own = start_control_plane(procs, database_url)
    dp = start_data_plane(procs, own.cluster_addr, redis_url)
    tenant_id = _tenant(own)

    route = _created(own.api("POST", "/admin/routes", {"path": "/full/*", **FULL_ROUTE, "tenants": [tenant_id]}))

    wait_for(
        lambda: dp.status()["config_version"] >= route["config_version"],
        what="the data plane to accept the snapshot with every route field",
    )

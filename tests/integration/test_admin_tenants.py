"""The tenant, key and token admin API against real Postgres, and its effect on a data plane."""

from __future__ import annotations

import concurrent.futures
import uuid

import pytest

from tests.integration.harness import (
    ControlPlane,
    DataPlane,
    Processes,
    start_control_plane,
    start_data_plane,
    start_echo,
    wait_for,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def cp(procs: Processes, database_url: str) -> ControlPlane:
    return start_control_plane(procs, database_url)


def _tenant(cp: ControlPlane, name: str = "Acme", **fields: object) -> dict[str, object]:
    resp = cp.api("POST", "/admin/tenants", {"name": name, **fields})
    assert resp.status == 201, resp.body
    body: dict[str, object] = resp.json()
    return body


def _token(cp: ControlPlane, role: str, tenant_id: object = None) -> str:
    body = {"name": f"{role}-token", "role": role, **({"tenant_id": tenant_id} if tenant_id else {})}
    resp = cp.api("POST", "/admin/tokens", body)
    assert resp.status == 201, resp.body
    token: str = resp.json()["token"]
    return token


def test_tenant_crud(cp: ControlPlane) -> None:
    created = _tenant(cp, "Acme", tier="basic")

    got = cp.api("GET", f"/admin/tenants/{created['id']}")
    patched = cp.api("PATCH", f"/admin/tenants/{created['id']}", {"rate_limit_per_minute": 5, "name": "Acme 2"})
    deleted = cp.api("DELETE", f"/admin/tenants/{created['id']}")
    gone = cp.api("GET", f"/admin/tenants/{created['id']}")

    assert got.status == 200 and "api_key" not in got.json()
    assert got.json()["rate_limit_per_minute"] == 600
    assert patched.status == 200
    assert (patched.json()["name"], patched.json()["rate_limit_per_minute"]) == ("Acme 2", 5)
    assert patched.json()["rate_limit_per_hour"] == 20_000  # untouched
    assert deleted.status == 200 and deleted.json()["deleted"] is True
    assert gone.status == 404


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": ""}, "name"),
        ({"name": "x", "tier": "gold"}, "tier"),
        ({"name": "x", "rate_limit_per_minute": -1}, "rate_limit_per_minute"),
        ({"name": "x", "rate_limit_per_minute": "10"}, "rate_limit_per_minute"),
        ({"name": "x", "monthly_quota": 1.5}, "monthly_quota"),
        ({"name": "x", "api_key": "mine"}, "api_key"),
        ({"name": "x", "id": str(uuid.uuid4())}, "id"),
    ],
)
def test_invalid_tenant_is_422_naming_the_field(cp: ControlPlane, body: dict[str, object], field: str) -> None:
    resp = cp.api("POST", "/admin/tenants", body)

    assert resp.status == 422
    assert resp.json()["error"]["message"].startswith(field)


def test_unknown_or_malformed_tenant_id_is_404(cp: ControlPlane) -> None:
    assert cp.api("GET", f"/admin/tenants/{uuid.uuid4()}").status == 404
    assert cp.api("GET", "/admin/tenants/not-a-uuid").status == 404
    assert cp.api("PATCH", f"/admin/tenants/{uuid.uuid4()}", {"name": "x"}).status == 404
    assert cp.api("DELETE", f"/admin/tenants/{uuid.uuid4()}").status == 404


def test_pagination_sees_every_tenant_once_while_rows_are_inserted(cp: ControlPlane) -> None:
    first = [_tenant(cp, f"t{i}")["id"] for i in range(7)]
    seen: list[object] = []
    cursor = None
    inserted: list[object] = []
    while True:
        path = "/admin/tenants?limit=3" + (f"&cursor={cursor}" if cursor else "")
        page = cp.api("GET", path).json()
        seen += [t["id"] for t in page["items"]]
        if len(inserted) < 2:
            inserted.append(_tenant(cp, f"late{len(inserted)}")["id"])
        cursor = page["next_cursor"]
        if cursor is None:
            break

    assert seen == first + inserted
    assert cp.api("GET", "/admin/tenants?cursor=garbage").status == 422
    assert cp.api("GET", "/admin/tenants?limit=0").status == 422


def test_concurrent_writers_get_strictly_increasing_versions(cp: ControlPlane) -> None:
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda i: cp.api("POST", "/admin/tenants", {"name": f"c{i}"}), range(40)))

    versions = [r.json()["config_version"] for r in results]
    assert all(r.status == 201 for r in results)
    assert len(set(versions)) == 40
    page = cp.api("GET", "/admin/tenants?limit=500").json()
    assert len(page["items"]) == 40


def test_keys_rotate_list_without_secret_and_revoke(cp: ControlPlane) -> None:
    tenant = _tenant(cp)
    second = cp.api("POST", f"/admin/tenants/{tenant['id']}/keys")
    listed = cp.api("GET", f"/admin/tenants/{tenant['id']}/keys")

    assert second.status == 201 and second.json()["key"].startswith(second.json()["prefix"])
    items = listed.json()["items"]
    assert len(items) == 2
    assert all("key" not in item and len(item["prefix"]) < 16 for item in items)
    assert str(tenant["api_key"]) not in listed.body.decode()

    revoked = cp.api("DELETE", f"/admin/tenants/{tenant['id']}/keys/{second.json()['id']}")
    assert revoked.status == 200 and revoked.json()["revoked_at"] is not None
    assert cp.api("DELETE", f"/admin/tenants/{tenant['id']}/keys/{uuid.uuid4()}").status == 404


def test_viewer_reads_but_cannot_write(cp: ControlPlane) -> None:
    tenant = _tenant(cp)
    viewer = _token(cp, "viewer")

    assert cp.api("GET", "/admin/tenants", token=viewer).status == 200
    assert cp.api("GET", f"/admin/tenants/{tenant['id']}/keys", token=viewer).status == 200
    assert cp.api("POST", "/admin/tenants", {"name": "x"}, token=viewer).status == 403
    assert cp.api("POST", f"/admin/tenants/{tenant['id']}/keys", token=viewer).status == 403
    assert cp.api("PATCH", f"/admin/tenants/{tenant['id']}", {"name": "y"}, token=viewer).status == 403
    assert cp.api("POST", "/admin/tokens", {"name": "n", "role": "admin"}, token=viewer).status == 403


def test_tenant_admin_sees_and_manages_only_its_own_tenant(cp: ControlPlane) -> None:
    a, b = _tenant(cp, "A"), _tenant(cp, "B")
    token = _token(cp, "tenant_admin", a["id"])

    listing = cp.api("GET", "/admin/tenants", token=token).json()["items"]
    assert [t["id"] for t in listing] == [a["id"]]
    assert cp.api("GET", f"/admin/tenants/{a['id']}", token=token).status == 200
    assert cp.api("POST", f"/admin/tenants/{a['id']}/keys", token=token).status == 201
    # Its own limits, tier and state are not its to change; mass assignment does nothing.
    assert cp.api("PATCH", f"/admin/tenants/{a['id']}", {"tier": "enterprise"}, token=token).status == 403
    assert cp.api("GET", f"/admin/tenants/{a['id']}").json()["tier"] == "free"
    # Everything of B is invisible.
    for method, path in [
        ("GET", f"/admin/tenants/{b['id']}"),
        ("PATCH", f"/admin/tenants/{b['id']}"),
        ("DELETE", f"/admin/tenants/{b['id']}"),
        ("GET", f"/admin/tenants/{b['id']}/keys"),
        ("POST", f"/admin/tenants/{b['id']}/keys"),
    ]:
        resp = cp.api(method, path, {"name": "z"} if method == "PATCH" else None, token=token)
        assert resp.status == 404, (method, path, resp.body)
    # Global objects are not its business.
    assert cp.api("POST", "/admin/tenants", {"name": "C"}, token=token).status == 403
    assert cp.api("GET", "/admin/config", token=token).status == 403
    assert cp.api("GET", "/admin/tokens", token=token).status == 403


def test_revoked_token_stops_working(cp: ControlPlane) -> None:
    resp = cp.api("POST", "/admin/tokens", {"name": "ops", "role": "viewer"})
    token, token_id = resp.json()["token"], resp.json()["id"]
    assert cp.api("GET", "/admin/tenants", token=token).status == 200

    assert cp.api("DELETE", f"/admin/tokens/{token_id}").status == 200

    assert cp.api("GET", "/admin/tenants", token=token).status == 401
    listed = cp.api("GET", "/admin/tokens").json()["items"]
    assert token not in str(listed) and listed[0]["revoked_at"] is not None


@pytest.mark.parametrize(
    "body",
    [
        {"name": "t", "role": "tenant_admin"},
        {"name": "t", "role": "admin", "tenant_id": str(uuid.uuid4())},
        {"name": "t", "role": "root"},
    ],
)
def test_token_role_and_tenant_must_agree(cp: ControlPlane, body: dict[str, object]) -> None:
    assert cp.api("POST", "/admin/tokens", body).status == 422


def test_config_shows_routes_and_tenants_at_one_version(cp: ControlPlane) -> None:
    _tenant(cp)
    route = cp.api("POST", "/admin/routes", {"path": "/x/*", "upstream": "http://127.0.0.1:9"}).json()

    config = cp.api("GET", "/admin/config").json()

    assert config["version"] == route["config_version"]
    assert [r["id"] for r in config["routes"]] == [route["id"]]
    assert len(config["tenants"]) == 1 and "api_key" not in config["tenants"][0]


def test_every_write_is_audited(cp: ControlPlane, database_url: str) -> None:
    import asyncio

    import asyncpg

    tenant = _tenant(cp)
    cp.api("PATCH", f"/admin/tenants/{tenant['id']}", {"rate_limit_per_minute": 7})

    async def rows() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(database_url)
        try:
            return await conn.fetch(
                """SELECT actor, action, object_type, before, after FROM audit_log
                    WHERE object_type IN ('tenant', 'api_key') ORDER BY id"""
            )
        finally:
            await conn.close()

    log = asyncio.run(rows())
    assert [(r["action"], r["object_type"]) for r in log] == [
        ("create", "tenant"),
        ("create", "api_key"),
        ("update", "tenant"),
    ]
    assert all(r["actor"] == "bootstrap" for r in log)
    assert '"rate_limit_per_minute": 7' in log[2]["after"]
    assert str(tenant["api_key"]) not in str([dict(r) for r in log])


def _data_plane_with_route(procs: Processes, cp: ControlPlane, redis_url: str) -> DataPlane:
    dp = start_data_plane(procs, cp.cluster_addr, redis_url)
    route = cp.api("POST", "/admin/routes", {"path": "/api/*", "upstream": start_echo(procs)}).json()
    wait_for(lambda: dp.status()["config_version"] >= route["config_version"], what="route on the data plane")
    return dp


def _served(dp: DataPlane, cp: ControlPlane, version: int) -> bool:
    return bool(dp.status()["config_version"] >= version)


def test_rotation_revocation_deactivation_and_deletion_reach_the_data_plane(
    procs: Processes, cp: ControlPlane, redis_url: str
) -> None:
    dp = _data_plane_with_route(procs, cp, redis_url)
    tenant = _tenant(cp)
    second = cp.api("POST", f"/admin/tenants/{tenant['id']}/keys").json()
    wait_for(lambda: _served(dp, cp, second["config_version"]), what="keys on the data plane")
    first_key, second_key = str(tenant["api_key"]), second["key"]
    assert dp.get("/api/x", {"X-API-Key": first_key}).status == 200
    assert dp.get("/api/x", {"X-API-Key": second_key}).status == 200

    revoked = cp.api("DELETE", f"/admin/tenants/{tenant['id']}/keys/{second['id']}").json()
    wait_for(lambda: _served(dp, cp, revoked["config_version"]), what="revocation")
    assert dp.get("/api/x", {"X-API-Key": second_key}).status == 401
    assert dp.get("/api/x", {"X-API-Key": first_key}).status == 200

    inactive = cp.api("PATCH", f"/admin/tenants/{tenant['id']}", {"is_active": False}).json()
    wait_for(lambda: _served(dp, cp, inactive["config_version"]), what="deactivation")
    resp = dp.get("/api/x", {"X-API-Key": first_key})
    assert resp.status == 403 and resp.json()["error"]["code"] == "tenant_inactive"

    deleted = cp.api("DELETE", f"/admin/tenants/{tenant['id']}").json()
    wait_for(lambda: _served(dp, cp, deleted["config_version"]), what="deletion")
    assert dp.get("/api/x", {"X-API-Key": first_key}).status == 401


def test_admin_api_answers_503_while_postgres_is_gone_and_recovers(procs: Processes, database_url: str) -> None:
    from tests.integration.faults import Forwarder, postgres_target, through

    forwarder = Forwarder(postgres_target(database_url)).start()
    try:
        cp = start_control_plane(procs, through(database_url, forwarder))
        tenant = _tenant(cp, "before")

        forwarder.cut()
        during = cp.api("POST", "/admin/tenants", {"name": "during"})
        read = cp.api("GET", f"/admin/tenants/{tenant['id']}")
        ready = cp.api("GET", "/readyz")

        assert during.status == 503 and during.json()["error"]["code"] == "database_unavailable"
        assert read.status == 503 and ready.status == 503
        assert cp.proc.alive()

        forwarder.restore()
        wait_for(lambda: cp.api("GET", "/readyz").status == 200, what="control plane recovery")
        after = cp.api("POST", "/admin/tenants", {"name": "after"})
        assert after.status == 201
        names = [t["name"] for t in cp.api("GET", "/admin/tenants").json()["items"]]
        assert names == ["before", "after"]  # nothing half-written, nothing lost
    finally:
        forwarder.stop()


def test_tenant_named_by_a_route_cannot_be_deleted(cp: ControlPlane) -> None:
    tenant = _tenant(cp)
    route = cp.api(
        "POST", "/admin/routes", {"path": "/t/*", "upstream": "http://127.0.0.1:9", "tenants": [tenant["id"]]}
    )
    assert route.status == 201, route.body

    refused = cp.api("DELETE", f"/admin/tenants/{tenant['id']}")
    assert refused.status == 409 and refused.json()["error"]["code"] == "tenant_in_use"
    assert route.json()["id"] in refused.json()["error"]["message"]

    assert cp.api("PATCH", f"/admin/routes/{route.json()['id']}", {"tenants": []}).status == 200
    assert cp.api("DELETE", f"/admin/tenants/{tenant['id']}").status == 200

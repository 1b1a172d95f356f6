"""``GET /admin/nodes`` and the NACK path: a snapshot a data plane refuses leaves it serving
the old config, shows as ``nacked`` with the reason, and the next good version heals it."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from tests.integration.harness import (
    Processes,
    http,
    start_control_plane,
    start_data_plane,
    start_echo,
    wait_for,
)

pytestmark = pytest.mark.integration


async def _corrupt_route_path(database_url: str, route_id: str) -> int:
    """Commit a route path no data plane accepts (no leading slash), as any writer would:
    bump the version, change the row, notify. The admin API would refuse it; Postgres does not."""
    conn = await asyncpg.connect(database_url)
    try:
        async with conn.transaction():
            version: int = await conn.fetchval(
                "UPDATE config_version SET version = version + 1 WHERE id = 1 RETURNING version"
            )
            await conn.execute("UPDATE routes SET path_pattern = 'broken/*' WHERE id = $1::uuid", route_id)
            await conn.execute("SELECT pg_notify('tenantgate_config', $1)", str(version))
        return version
    finally:
        await conn.close()


def test_nacked_snapshot_keeps_the_old_config_and_shows_in_nodes(
    procs: Processes, database_url: str, redis_url: str
) -> None:
    cp = start_control_plane(procs, database_url)
    dp = start_data_plane(procs, cp.cluster_addr, redis_url, TENANTGATE_NODE_ID="dp-one")
    upstream = start_echo(procs)
    tenant = cp.api("POST", "/admin/tenants", {"name": "A", "tier": "enterprise"}).json()
    key = tenant["api_key"]
    route = cp.api("POST", "/admin/routes", {"path": "/api/*", "upstream": upstream}).json()
    good = route["config_version"]
    wait_for(lambda: dp.get("/api/x", {"X-API-Key": key}).status == 200, what="the route")

    def node() -> dict[str, object]:
        resp = cp.api("GET", "/admin/nodes")
        assert resp.status == 200, resp.body
        [only] = resp.json()
        return dict(only)

    wait_for(lambda: node()["status"] == "synced", what="node synced")
    synced = node()
    assert (synced["node_id"], synced["config_version"], synced["last_error"]) == ("dp-one", good, None)
    assert str(synced["address"]).startswith("ipv4:127.0.0.1:")

    bad = asyncio.run(_corrupt_route_path(database_url, route["id"]))
    wait_for(lambda: node()["status"] == "nacked", what="node nacked")
    nacked = node()
    assert nacked["config_version"] == good
    assert nacked["last_error"] == f"route {route['id']}: path must start with '/'"
    assert dp.status()["config_version"] == good
    assert dp.get("/api/x", {"X-API-Key": key}).status == 200  # the old config keeps serving
    assert "snapshot rejected; keeping the previous one" in dp.proc.log()
    # Both planes count it, and say which version they hold and that the stream is up.
    cp_metrics = http("GET", cp.admin_url + "/metrics").body.decode()
    dp_metrics = http("GET", dp.status_url + "/metrics").body.decode()
    assert "tenantgate_cp_config_nacks_total 1.0" in cp_metrics
    assert f"tenantgate_cp_config_version {float(bad)}" in cp_metrics
    assert "tenantgate_cp_connected_nodes 1.0" in cp_metrics
    assert "tenantgate_dp_config_nacks_total 1.0" in dp_metrics
    assert f"tenantgate_dp_config_version {float(good)}" in dp_metrics
    assert "tenantgate_dp_cp_connected 1.0" in dp_metrics

    # The next good version (the path fixed) comes whole and heals the node.
    fixed = cp.api("PATCH", f"/admin/routes/{route['id']}", {"path": "/v2/*"}).json()["config_version"]
    assert fixed > bad
    wait_for(lambda: dp.get("/v2/x", {"X-API-Key": key}).status == 200, what="the fixed route")
    wait_for(lambda: node()["status"] == "synced", what="node synced again")
    assert node()["config_version"] == fixed and node()["last_error"] is None
    assert dp.get("/api/x", {"X-API-Key": key}).status == 404


def test_nodes_is_readable_by_admin_and_viewer_only(procs: Processes, database_url: str, redis_url: str) -> None:
    cp = start_control_plane(procs, database_url)
    start_data_plane(procs, cp.cluster_addr, redis_url, TENANTGATE_NODE_ID="dp-roles")
    tid = cp.api("POST", "/admin/tenants", {"name": "A"}).json()["id"]
    viewer = cp.api("POST", "/admin/tokens", {"name": "v", "role": "viewer"}).json()["token"]
    tenant_admin = cp.api("POST", "/admin/tokens", {"name": "t", "role": "tenant_admin", "tenant_id": tid}).json()[
        "token"
    ]
    wait_for(lambda: [n["node_id"] for n in cp.api("GET", "/admin/nodes").json()] == ["dp-roles"], what="node")
    assert cp.api("GET", "/admin/nodes", token=viewer).json()[0]["node_id"] == "dp-roles"
    refused = cp.api("GET", "/admin/nodes", token=tenant_admin)
    assert refused.status == 403 and refused.json()["error"]["code"] == "forbidden"
    assert cp.api("GET", "/admin/nodes", token="").status == 401

"""The data plane keeps serving without its control plane: from memory while the control
plane is gone, and from disk when it restarts meanwhile."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import threading
import time
from collections.abc import Callable

import asyncpg
import pytest

from tests.integration.harness import (
    DataPlane,
    Processes,
    Response,
    start_control_plane,
    start_data_plane,
    start_echo,
    wait_for,
)

pytestmark = pytest.mark.integration


def test_data_plane_restarted_while_control_plane_is_down_serves_from_disk(
    procs: Processes, database_url: str, redis_url: str
) -> None:
    cp = start_control_plane(procs, database_url)
    data_dir = procs.tmp / "dp-state"
    dp = start_data_plane(procs, cp.cluster_addr, redis_url, TENANTGATE_DATA_DIR=str(data_dir))
    upstream = start_echo(procs)
    key = cp.api("POST", "/admin/tenants", {"name": "A"}).json()["api_key"]
    version = cp.api("POST", "/admin/routes", {"path": "/api/*", "upstream": upstream}).json()["config_version"]
    wait_for(lambda: dp.status()["config_version"] >= version, what="route on the data plane")
    snapshot = data_dir / "snapshot.pb"
    wait_for(snapshot.exists, what="snapshot saved to disk")

    cp.proc.stop(signal.SIGKILL)
    assert dp.get("/api/x", {"X-API-Key": key}).status == 200  # from memory
    wait_for(lambda: not dp.status()["cp_connected"], what="data plane to notice the control plane is gone")
    dp.proc.stop()
    restarted = start_data_plane(procs, cp.cluster_addr, redis_url, TENANTGATE_DATA_DIR=str(data_dir))

    status = restarted.status()
    assert (status["snapshot_source"], status["cp_connected"], status["config_version"]) == ("disk", False, version)
    assert restarted.get("/api/x", {"X-API-Key": key}).status == 200
    assert restarted.get("/api/x").status == 401
    assert stat.S_IMODE(os.stat(snapshot).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(data_dir).st_mode) == 0o700

    # The control plane returns on the same address: the node reconnects by itself.
    start_control_plane(procs, database_url, TENANTGATE_CLUSTER_LISTEN=cp.cluster_addr)
    wait_for(lambda: restarted.status()["cp_connected"], timeout=30, what="reconnection")
    assert restarted.status()["config_version"] == version


# A tenant whose limits the traffic of these tests never reaches.
UNLIMITED = {"name": "A", "tier": "enterprise", "rate_limit_per_minute": 10**6, "rate_limit_per_hour": 10**8}


def _served(dp: DataPlane, path: str, key: str | None, status: int) -> bool:
    return dp.get(path, {"X-API-Key": key} if key else None).status == status


def test_every_kind_of_admin_change_is_served_by_the_data_plane(
    procs: Processes, database_url: str, redis_url: str
) -> None:
    cp = start_control_plane(procs, database_url)
    dp = start_data_plane(procs, cp.cluster_addr, redis_url)
    upstream = start_echo(procs)
    latencies: dict[str, float] = {}

    def change(name: str, method: str, path: str, body: object, served: Callable[[], bool]) -> Response:
        resp = cp.api(method, path, body)
        assert resp.status in (200, 201, 204), (name, resp.status, resp.body)
        started = time.monotonic()
        wait_for(served, what=f"{name} served by the data plane")
        latencies[name] = time.monotonic() - started
        return resp

    route = change(
        "route create",
        "POST",
        "/admin/routes",
        {"path": "/api/*", "upstream": upstream},
        lambda: _served(dp, "/api/x", None, 401),  # the route is live and wants a key
    ).json()
    tenant = cp.api("POST", "/admin/tenants", {"name": "A", "tier": "free"})
    started = time.monotonic()
    key, tid = tenant.json()["api_key"], tenant.json()["id"]
    wait_for(lambda: _served(dp, "/api/x", key, 200), what="the new tenant's key")
    latencies["tenant create"] = time.monotonic() - started
    change(
        "route update",
        "PATCH",
        f"/admin/routes/{route['id']}",
        {"tiers": ["premium"]},
        lambda: _served(dp, "/api/x", key, 403),
    )
    change(
        "tenant update", "PATCH", f"/admin/tenants/{tid}", {"tier": "premium"}, lambda: _served(dp, "/api/x", key, 200)
    )
    second = cp.api("POST", f"/admin/tenants/{tid}/keys", {}).json()
    started = time.monotonic()
    wait_for(lambda: _served(dp, "/api/x", second["key"], 200), what="the new key")
    latencies["key create"] = time.monotonic() - started
    change(
        "key revoke",
        "DELETE",
        f"/admin/tenants/{tid}/keys/{second['id']}",
        None,
        lambda: _served(dp, "/api/x", second["key"], 401),
    )
    assert _served(dp, "/api/x", key, 200)  # the other key lives on
    change(
        "tenant deactivate",
        "PATCH",
        f"/admin/tenants/{tid}",
        {"is_active": False},
        lambda: _served(dp, "/api/x", key, 403),
    )
    change("tenant delete", "DELETE", f"/admin/tenants/{tid}", None, lambda: _served(dp, "/api/x", key, 401))
    change(
        "route methods update",
        "PATCH",
        f"/admin/routes/{route['id']}",
        {"methods": ["POST"]},
        lambda: _served(dp, "/api/x", None, 405),
    )
    change("route delete", "DELETE", f"/admin/routes/{route['id']}", None, lambda: _served(dp, "/api/x", None, 404))
    # Deltas carried every change: the stream sent one full snapshot, at connection.
    log = dp.proc.log()
    assert log.count("kind=full") == 1, log
    assert log.count("kind=delta") >= 9, log
    print("propagation seconds:", {k: round(v, 3) for k, v in latencies.items()})


def test_control_plane_killed_under_traffic_loses_no_request_and_data_planes_catch_up(
    procs: Processes, database_url: str, redis_url: str
) -> None:
    cp = start_control_plane(procs, database_url)
    dps = [start_data_plane(procs, cp.cluster_addr, redis_url) for _ in range(2)]
    upstream = start_echo(procs)
    key = cp.api("POST", "/admin/tenants", UNLIMITED).json()["api_key"]
    version = cp.api("POST", "/admin/routes", {"path": "/api/*", "upstream": upstream}).json()["config_version"]
    for dp in dps:
        wait_for(lambda dp=dp: dp.status()["config_version"] >= version, what="route on every data plane")

    stop = threading.Event()
    results: list[int] = []
    errors: list[str] = []

    def client(dp: DataPlane) -> None:
        while not stop.is_set():
            try:
                results.append(dp.get("/api/x", {"X-API-Key": key}).status)
            except OSError as exc:
                errors.append(repr(exc))

    clients = [threading.Thread(target=client, args=(dps[i % 2],)) for i in range(4)]
    for thread in clients:
        thread.start()
    try:
        wait_for(lambda: len(results) > 50, what="traffic before the kill")
        cp.proc.stop(signal.SIGKILL)
        for dp in dps:
            wait_for(lambda dp=dp: not dp.status()["cp_connected"], what="data plane to notice")
        served_before = len(results)
        wait_for(lambda: len(results) > served_before + 100, what="traffic while the control plane is down")
    finally:
        stop.set()
        for thread in clients:
            thread.join(timeout=30)
    assert errors == []
    assert set(results) == {200}, {s: results.count(s) for s in set(results)}

    # A control plane returns on the same address; changes made through it reach both nodes.
    back = start_control_plane(procs, database_url, TENANTGATE_CLUSTER_LISTEN=cp.cluster_addr)
    version = back.api("POST", "/admin/routes", {"path": "/new/*", "upstream": upstream}).json()["config_version"]
    for dp in dps:
        wait_for(lambda dp=dp: dp.get("/new/x", {"X-API-Key": key}).status == 200, what="catch up after the outage")
        assert dp.status()["cp_connected"] and dp.status()["config_version"] == version


async def _restore_older_database(database_url: str) -> None:
    """What restoring an older backup does to the config: fewer objects, a lower version."""
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("DELETE FROM routes; DELETE FROM config_changes; UPDATE config_version SET version = 2")
    finally:
        await conn.close()


def test_data_plane_ahead_of_a_restored_database_gets_its_config_whole(
    procs: Processes, database_url: str, redis_url: str
) -> None:
    cp = start_control_plane(procs, database_url)
    dp = start_data_plane(procs, cp.cluster_addr, redis_url)
    upstream = start_echo(procs)
    key = cp.api("POST", "/admin/tenants", UNLIMITED).json()["api_key"]
    for path in ("/a/*", "/b/*", "/c/*"):
        ahead = cp.api("POST", "/admin/routes", {"path": path, "upstream": upstream}).json()["config_version"]
    wait_for(lambda: dp.status()["config_version"] == ahead, what="the routes on the data plane")
    cp.proc.stop()
    asyncio.run(_restore_older_database(database_url))

    back = start_control_plane(procs, database_url, TENANTGATE_CLUSTER_LISTEN=cp.cluster_addr)
    # The node's version (5) is one this database never reached: after a grace it is sent
    # the config as it is here, whole, and serves it.
    wait_for(lambda: dp.get("/a/x", {"X-API-Key": key}).status == 404, timeout=40, what="the restored config")
    assert dp.status()["config_version"] == 2 < ahead
    assert "holds a version this config never reached" in back.proc.log()
    version = back.api("POST", "/admin/routes", {"path": "/d/*", "upstream": upstream}).json()["config_version"]
    wait_for(lambda: dp.get("/d/x", {"X-API-Key": key}).status == 200, what="a change after the restore")
    assert dp.status()["config_version"] == version

"""The data plane keeps serving without its control plane: from memory while the control
plane is gone, and from disk when it restarts meanwhile."""

from __future__ import annotations

import os
import signal
import stat

import pytest

from tests.integration.harness import (
    Processes,
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

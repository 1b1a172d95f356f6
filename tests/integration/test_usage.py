"""Usage metering end to end: real control plane, two data planes, an echo upstream.

Every tenant's request count in the usage API must equal what it sent, exactly, through a
control plane killed and restarted mid-traffic (the data planes spool and drain) and a data
plane restarted with batches still on its disk.
"""

from __future__ import annotations

import json
import signal
import urllib.parse
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.integration.harness import (
    ControlPlane,
    DataPlane,
    Processes,
    http,
    start_control_plane,
    start_data_plane,
    start_echo,
    wait_for,
)

pytestmark = pytest.mark.integration

FLUSH = {"TENANTGATE_USAGE_FLUSH_INTERVAL_S": "0.2"}
HIGH_LIMITS = {"tier": "enterprise", "rate_limit_per_minute": 1_000_000, "rate_limit_per_hour": 10_000_000}


def _create_tenants(cp: ControlPlane, count: int) -> list[dict[str, Any]]:
    tenants = []
    for i in range(count):
        resp = cp.api("POST", "/admin/tenants", {"name": f"usage tenant {i}", **HIGH_LIMITS})
        assert resp.status == 201, resp.body
        tenants.append(resp.json())
    return tenants


def _synced(dps: list[DataPlane], version: int) -> None:
    for dp in dps:
        wait_for(lambda dp=dp: dp.status()["config_version"] >= version, what="data plane synced")


def _usage(cp: ControlPlane, tenant_id: str, **params: str) -> dict[str, Any]:
    query = urllib.parse.urlencode({"granularity": "day", **params})
    resp = cp.api("GET", f"/admin/tenants/{tenant_id}/usage?{query}")
    assert resp.status == 200, resp.body
    body: dict[str, Any] = resp.json()
    return body


def _totals(cp: ControlPlane, tenants: list[dict[str, Any]]) -> dict[str, int]:
    return {t["id"]: _usage(cp, t["id"])["totals"]["requests"] for t in tenants}


def _send(dps: list[DataPlane], tenants: list[dict[str, Any]], rounds: int, sent: Counter[str]) -> None:
    """``rounds`` requests per tenant, alternating data planes; each must reach the upstream."""
    for i in range(rounds):
        for j, tenant in enumerate(tenants):
            dp = dps[(i + j) % len(dps)]
            resp = dp.get(f"/u/item/{i}?q=hidden-{i}", headers={"X-API-Key": tenant["api_key"]})
            assert resp.status == 200, resp.body
            sent[tenant["id"]] += 1


def _spooled(dp: DataPlane) -> float:
    text = http("GET", dp.status_url + "/metrics").body.decode()
    for line in text.splitlines():
        if line.startswith("tenantgate_dp_usage_spool_batches"):
            return float(line.split()[-1])
    return 0.0


def _restart(procs: Processes, cp: ControlPlane) -> ControlPlane:
    """The control plane again, on the same ports and database (the data planes know its address)."""
    proc = procs.spawn("control-plane", ["-m", "control_plane"], cp.proc.env)
    wait_for(lambda: _answers_ready(cp.admin_url), what=f"control plane ready again\n{proc.log()}")
    return ControlPlane(proc, cp.admin_url, cp.cluster_addr)


def _answers_ready(admin_url: str) -> bool:
    return http("GET", admin_url + "/readyz", timeout=2).status == 200


def _exact(cp: ControlPlane, tenants: list[dict[str, Any]], sent: Counter[str], what: str) -> None:
    wait_for(lambda: _totals(cp, tenants) == dict(sent), timeout=30, what=what)


def test_usage_is_exact_across_control_plane_and_data_plane_restarts(
    procs: Processes, database_url: str, redis_url: str, tmp_path: Path
) -> None:
    cp = start_control_plane(procs, database_url)
    echo = start_echo(procs)
    tenants = _create_tenants(cp, 3)
    outsider = cp.api("POST", "/admin/tenants", {"name": "not on the route", **HIGH_LIMITS}).json()
    route = cp.api(
        "POST",
        "/admin/routes",
        {"path": "/u/*", "upstream": echo, "tenants": [t["id"] for t in tenants]},
    ).json()
    dp1_dir, dp2_dir = tmp_path / "dp1", tmp_path / "dp2"
    dp1 = start_data_plane(procs, cp.cluster_addr, redis_url, TENANTGATE_DATA_DIR=str(dp1_dir), **FLUSH)
    dp2 = start_data_plane(procs, cp.cluster_addr, redis_url, TENANTGATE_DATA_DIR=str(dp2_dir), **FLUSH)
    _synced([dp1, dp2], route["config_version"])
    sent: Counter[str] = Counter()

    # Steady traffic through both data planes.
    _send([dp1, dp2], tenants, 20, sent)
    # Refused before a tenant is known: nobody's usage.
    assert dp1.get("/u/x").status == 401
    assert dp1.get("/nowhere", headers={"X-API-Key": tenants[0]["api_key"]}).status == 404
    # Refused with the tenant known: the tenant's usage, counted as rejected, not as admitted.
    assert dp2.get("/u/x", headers={"X-API-Key": outsider["api_key"]}).status == 403
    _exact(cp, tenants, sent, "usage of the first traffic")
    outsider_usage = _usage(cp, outsider["id"])
    assert outsider_usage["totals"]["requests"] == 1
    assert outsider_usage["totals"]["rejected"] == 1
    assert outsider_usage["quota"]["used"] == 0

    # The control plane is killed mid-traffic: the data planes spool, then drain when it returns.
    cp.proc.stop(signal.SIGKILL)
    _send([dp1, dp2], tenants, 15, sent)
    wait_for(lambda: _spooled(dp1) > 0 and _spooled(dp2) > 0, what="both data planes spooling")
    cp = _restart(procs, cp)
    _send([dp1, dp2], tenants, 5, sent)
    _exact(cp, tenants, sent, "usage after the control plane came back")
    wait_for(lambda: _spooled(dp1) == 0 and _spooled(dp2) == 0, what="spools drained")

    # A data plane stopped with batches on disk (the control plane down again) sends them
    # after it restarts, under a new node id (the default one changes with the process).
    cp.proc.stop(signal.SIGKILL)
    _send([dp1], tenants, 10, sent)
    wait_for(lambda: _spooled(dp1) > 0, what="data plane spooling")
    assert dp1.proc.stop(signal.SIGTERM) == 0
    assert list((dp1_dir / "usage").glob("*/*.batch")), "the stopped data plane left its batches on disk"
    dp1 = start_data_plane(procs, cp.cluster_addr, redis_url, TENANTGATE_DATA_DIR=str(dp1_dir), **FLUSH)
    cp = _restart(procs, cp)
    _exact(cp, tenants, sent, "usage after the data plane restarted with a spool")
    wait_for(lambda: _spooled(dp1) == 0, what="restarted data plane's spool drained")
    assert not list((dp1_dir / "usage").glob("*/*.batch"))

    # A data plane stopped before its next report (its interval is a minute) reports on the way out.
    dp3 = start_data_plane(procs, cp.cluster_addr, redis_url, TENANTGATE_USAGE_FLUSH_INTERVAL_S="60")
    _synced([dp3], route["config_version"])
    _send([dp3], tenants, 3, sent)
    assert dp3.proc.stop(signal.SIGTERM) == 0
    assert _totals(cp, tenants) == dict(sent)  # stored before the process exited

    # Nothing is counted twice, however long we wait.
    _send([dp2], tenants[:1], 1, sent)
    _exact(cp, tenants, sent, "one more request")
    assert _totals(cp, tenants) == dict(sent)
    print("usage per tenant:", dict(sent))

    # The access log: one JSON line per request, with its id and without the query string.
    lines = [json.loads(line) for line in dp2.proc.log().splitlines() if line.startswith('{"ts"')]
    access = [entry for entry in lines if entry.get("type") == "access"]
    assert access, dp2.proc.log()[-2000:]
    entry = next(e for e in access if e["status"] == 200)
    assert entry["route_id"] == route["id"] and entry["tenant_id"] in {t["id"] for t in tenants}
    assert entry["path"].startswith("/u/item/") and "?" not in entry["path"]
    assert entry["request_id"] and entry["duration_ms"] >= entry["upstream_ms"] >= 0
    assert "hidden-" not in dp2.proc.log() and tenants[0]["api_key"] not in dp2.proc.log()

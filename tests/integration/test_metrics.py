"""Prometheus on a data plane with two workers: whichever worker answers a scrape, it counts
every worker's requests; and the usage of both workers adds up to what was sent."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from tests.integration.harness import (
    DataPlane,
    Processes,
    http,
    start_control_plane,
    start_data_plane,
    start_echo,
    wait_for,
)

pytestmark = pytest.mark.integration

REQUESTS = 60


def _request_total(dp: DataPlane, route_id: str) -> tuple[float, str]:
    text = http("GET", dp.status_url + "/metrics").body.decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("tenantgate_dp_requests_total{") and f'route="{route_id}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total, text


def _access_nodes(dp: DataPlane) -> set[str]:
    nodes = set()
    for line in dp.proc.log().splitlines():
        if line.startswith("{") and '"type":"access"' in line:
            nodes.add(json.loads(line)["node_id"])
    return nodes


def _workers_seen(dp: DataPlane, version: int, seen: dict[str, Any]) -> bool:
    status = dp.status()
    if status["config_version"] >= version:
        seen[status["node_id"]] = status
    return len(seen) == 2


def test_a_scrape_counts_every_workers_requests(procs: Processes, database_url: str, redis_url: str) -> None:
    cp = start_control_plane(procs, database_url)
    echo = start_echo(procs)
    tenant = cp.api(
        "POST", "/admin/tenants", {"name": "m", "tier": "enterprise", "rate_limit_per_minute": 100000}
    ).json()
    route = cp.api("POST", "/admin/routes", {"path": "/m/*", "upstream": echo}).json()
    dp = start_data_plane(
        procs, cp.cluster_addr, redis_url, TENANTGATE_WORKERS="2", TENANTGATE_USAGE_FLUSH_INTERVAL_S="0.2"
    )
    # Both workers up and on the route's version (each status call is a new connection; the
    # kernel spreads them over the workers sharing the port).
    seen: dict[str, Any] = {}
    wait_for(lambda: _workers_seen(dp, route["config_version"], seen), what="both workers serving")

    for i in range(REQUESTS):
        resp = dp.get(f"/m/{i}", headers={"X-API-Key": tenant["api_key"]})
        assert resp.status == 200, resp.body
    # Both workers answered some of them (their access log lines name them).
    wait_for(lambda: _access_nodes(dp) == set(seen), what="access log lines of both workers")
    # Whichever worker answers the scrape, the total is every request. (A worker counts a
    # request just after its last byte went out, so the very first scrape may be early.)
    wait_for(lambda: _request_total(dp, route["id"])[0] == REQUESTS, what="every request counted")
    for _ in range(6):
        total, text = _request_total(dp, route["id"])
        assert total == REQUESTS, text
    assert 'status_class="2xx"' in text and 'tier="enterprise"' in text
    assert tenant["id"] not in text and tenant["api_key"] not in text  # no tenant labels by default
    assert re.search(r"^tenantgate_dp_request_duration_seconds_count\{status_class=\"2xx\"\} 60\.0$", text, re.M)
    assert re.search(r"^tenantgate_dp_upstream_duration_seconds_count 60\.0$", text, re.M)
    # Other modules' families are exposed too, merged across workers.
    assert "tenantgate_dp_usage_spool_batches" in text

    # Usage: each worker reports as its own node; together, exactly what was sent.
    def reported() -> int:
        body = cp.api("GET", f"/admin/tenants/{tenant['id']}/usage?granularity=day").json()
        requests: int = body["totals"]["requests"]
        return requests

    wait_for(lambda: reported() == REQUESTS, what="usage of both workers")

"""docker-compose.yml's topology as local processes (scripts/local_cluster.py): two control
planes, three data planes behind HAProxy running deploy/haproxy/haproxy.cfg, the echo upstream,
the machine's Postgres (a fresh database) and Redis. One cluster for the module; the tests that
stop a node run last."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from scripts.local_cluster import ROOT, LocalCluster, fresh_database, haproxy_binary, local_address, smoke
from tests.integration.harness import http, wait_for

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        haproxy_binary() is None, reason="haproxy is not installed (apt-get install haproxy); .ci/run installs it"
    ),
]


@pytest.fixture(scope="module")
def cluster(
    postgres_admin_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[LocalCluster]:
    workdir: Path = tmp_path_factory.mktemp("cluster")
    with (
        fresh_database(postgres_admin_url) as database_url,
        LocalCluster(database_url, redis_url, workdir, workers=1) as local,
    ):
        yield local
        failed = [
            item
            for item in request.session.items
            if item.module is request.module and getattr(getattr(item, "rep_call", None), "failed", False)
        ]
        if failed:
            print(local.logs())


def _admin(cluster: LocalCluster, cp: str, method: str, path: str, body: Any = None) -> Any:
    resp = http(
        method, cluster.admin_url(cp) + path, headers={"Authorization": f"Bearer {cluster.admin_token}"}, json_body=body
    )
    assert resp.status < 300, (cp, method, path, resp.status, resp.body)
    return resp.json()


def _tenant_and_route(cluster: LocalCluster, cp: str, prefix: str) -> str:
    tenant = _admin(
        cluster, cp, "POST", "/admin/tenants", {"name": f"{prefix}-{uuid.uuid4().hex[:6]}", "tier": "enterprise"}
    )
    _admin(cluster, cp, "POST", "/admin/routes", {"path": f"/{prefix}/*", "upstream": cluster.echo_url})
    key: str = tenant["api_key"]
    return key


def _served_by_each(cluster: LocalCluster, path: str, key: str, nodes: set[str]) -> None:
    seen: set[str] = set()

    def every_node_served() -> bool:
        resp = http("GET", cluster.proxy_url + path, headers={"X-API-Key": key})
        if resp.status == 200:
            seen.add(resp.headers["x-served-by"])
        return seen == nodes

    wait_for(every_node_served, what=f"{path} served by every one of {sorted(nodes)} (so far {sorted(seen)})")


def test_smoke_every_data_plane_serves_changes_made_on_either_control_plane(cluster: LocalCluster) -> None:
    report = smoke(cluster)

    assert report.data_planes == ["dp1", "dp2", "dp3"]
    # Each phase is bounded by the smoke test's deadline; these are the measured times.
    print(
        f"through the balancer: route on cp1 served by all in {report.first_served_by_all_s:.3f}s, "
        f"key made on cp2 in {report.new_key_served_by_all_s:.3f}s, "
        f"revoked on cp2 in {report.revoked_everywhere_s:.3f}s ({report.requests} requests)"
    )


def test_the_balancer_replaces_forwarding_headers_a_client_sends(cluster: LocalCluster) -> None:
    key = _tenant_and_route(cluster, "cp1", "forwarded")
    _served_by_each(cluster, "/forwarded/x", key, {"dp1", "dp2", "dp3"})
    spoofed = {
        "X-API-Key": key,
        "X-Forwarded-For": "203.0.113.7",
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "evil.example",
    }

    seen = http("GET", cluster.proxy_url + "/forwarded/x", headers=spoofed).json()["headers"]

    # The balancer says the client is 127.0.0.1; the data plane trusts it and adds the balancer.
    assert seen["X-Forwarded-For"] == "127.0.0.1, 127.0.0.1"
    assert seen["X-Forwarded-Proto"] == "http"
    assert seen["X-Forwarded-Host"] == urlsplit(cluster.proxy_url).netloc
    assert "X-API-Key" not in seen


def test_every_target_prometheus_scrapes_serves_metrics(cluster: LocalCluster) -> None:
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    targets = [
        (job["job_name"], job.get("metrics_path", "/metrics"), target)
        for job in config["scrape_configs"]
        for static in job["static_configs"]
        for target in static["targets"]
    ]

    for job, path, target in targets:
        host, _, port = target.rpartition(":")
        resp = http("GET", f"http://{local_address(cluster.topology, host, int(port))}{path}")
        assert resp.status == 200, (job, target, resp.status)
        assert b"# TYPE " in resp.body, (job, target)


def test_a_data_plane_that_stops_is_taken_out_without_failing_a_request(cluster: LocalCluster) -> None:
    key = _tenant_and_route(cluster, "cp1", "drain")
    _served_by_each(cluster, "/drain/x", key, {"dp1", "dp2", "dp3"})
    failures: list[tuple[int, str]] = []
    served: list[str] = []
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            try:
                resp = http("GET", cluster.proxy_url + "/drain/x", headers={"X-API-Key": key}, timeout=5)
            except OSError as exc:
                failures.append((0, repr(exc)))
                continue
            if resp.status != 200:
                failures.append((resp.status, resp.body.decode(errors="replace")))
            else:
                served.append(resp.headers["x-served-by"])

    thread = threading.Thread(target=traffic)
    thread.start()
    try:
        wait_for(lambda: len(served) > 20, what="traffic flowing")
        cluster.stop_service("dp3")
        before = len(served)
        wait_for(lambda: len(served) > before + 50, what="traffic after dp3 stopped")
    finally:
        stop.set()
        thread.join()

    assert failures == []
    assert "dp3" not in served[before:]


def test_data_planes_follow_the_other_control_plane_when_one_stops(cluster: LocalCluster) -> None:
    nodes = {r.service.name for r in cluster.running if r.service.kind == "data-plane" and r.proc.poll() is None}

    cluster.stop_service("cp1")
    key = _tenant_and_route(cluster, "cp2", "failover")

    # Streams that were on cp1 reconnect through the balancer, which now sends them to cp2.
    _served_by_each(cluster, "/failover/x", key, nodes)
    for node in nodes:
        status = http("GET", cluster.status_url(node) + "/status").json()
        assert status["cp_connected"] is True, (node, status)

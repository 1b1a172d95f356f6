"""Route conditions and access rules enforced on a real data plane: host and header matching,
allowed tenants and tiers, scopes, and the body size limit — and the upstream sees nothing of
what was refused."""

from __future__ import annotations

from collections.abc import Iterator
from http.client import HTTPConnection

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


class Cluster:
    def __init__(self, cp: ControlPlane, dp: DataPlane, upstream: str) -> None:
        self.cp, self.dp, self.upstream = cp, dp, upstream

    def route(self, **fields: object) -> dict[str, object]:
        resp = self.cp.api("POST", "/admin/routes", {"upstream": self.upstream, **fields})
        assert resp.status == 201, resp.body
        body: dict[str, object] = resp.json()
        self.sync(int(str(body["config_version"])))
        return body

    def tenant(self, name: str, tier: str = "free") -> dict[str, object]:
        resp = self.cp.api("POST", "/admin/tenants", {"name": name, "tier": tier})
        assert resp.status == 201, resp.body
        body: dict[str, object] = resp.json()
        self.sync(int(str(body["config_version"])))
        return body

    def sync(self, version: int) -> None:
        wait_for(lambda: self.dp.status()["config_version"] >= version, what=f"version {version} on the data plane")


@pytest.fixture
def cluster(procs: Processes, database_url: str, redis_url: str) -> Iterator[Cluster]:
    cp = start_control_plane(procs, database_url)
    dp = start_data_plane(procs, cp.cluster_addr, redis_url)
    yield Cluster(cp, dp, start_echo(procs))


def test_host_condition_selects_the_route(cluster: Cluster) -> None:
    key = str(cluster.tenant("A")["api_key"])
    cluster.route(path="/svc/*", host="api.example.com", upstream=cluster.upstream + "/by-host")
    cluster.route(path="/svc/*", upstream=cluster.upstream + "/default")

    by_host = cluster.dp.get("/svc/x", {"X-API-Key": key, "Host": "API.example.com:8000"})
    other = cluster.dp.get("/svc/x", {"X-API-Key": key, "Host": "other.example.com"})

    assert by_host.json()["path"] == "/by-host/svc/x"
    assert other.json()["path"] == "/default/svc/x"


def test_header_condition_selects_the_route(cluster: Cluster) -> None:
    key = str(cluster.tenant("A")["api_key"])
    cluster.route(path="/v/*", headers={"X-Version": "2"}, upstream=cluster.upstream + "/v2")
    cluster.route(path="/v/*", upstream=cluster.upstream + "/v1")

    assert cluster.dp.get("/v/a", {"X-API-Key": key, "X-Version": "2"}).json()["path"] == "/v2/v/a"
    assert cluster.dp.get("/v/a", {"X-API-Key": key, "X-Version": "3"}).json()["path"] == "/v1/v/a"
    assert cluster.dp.get("/v/a", {"X-API-Key": key}).json()["path"] == "/v1/v/a"


def test_only_listed_tenants_pass(cluster: Cluster) -> None:
    a, b = cluster.tenant("A"), cluster.tenant("B")
    cluster.route(path="/only-a/*", tenants=[a["id"]])

    allowed = cluster.dp.get("/only-a/x", {"X-API-Key": str(a["api_key"])})
    refused = cluster.dp.get("/only-a/x", {"X-API-Key": str(b["api_key"])})
    anonymous = cluster.dp.get("/only-a/x")

    assert allowed.status == 200
    assert refused.status == 403 and refused.json()["error"]["code"] == "tenant_not_allowed"
    assert anonymous.status == 401


def test_only_listed_tiers_pass_even_without_auth_required(cluster: Cluster) -> None:
    free, premium = cluster.tenant("F", "free"), cluster.tenant("P", "premium")
    cluster.route(path="/premium/*", tiers=["premium", "enterprise"], auth_required=False)

    assert cluster.dp.get("/premium/x", {"X-API-Key": str(premium["api_key"])}).status == 200
    assert cluster.dp.get("/premium/x", {"X-API-Key": str(free["api_key"])}).status == 403
    assert cluster.dp.get("/premium/x").status == 401


def test_route_with_scopes_refuses_api_keys(cluster: Cluster) -> None:
    key = str(cluster.tenant("A")["api_key"])
    cluster.route(path="/scoped/*", scopes=["orders:read"])

    resp = cluster.dp.get("/scoped/x", {"X-API-Key": key})

    assert resp.status == 403 and resp.json()["error"]["code"] == "insufficient_scope"


def test_open_route_needs_no_key_and_serves_a_wrong_one_anonymously(cluster: Cluster) -> None:
    key = str(cluster.tenant("A")["api_key"])
    tenant_id = cluster.cp.api("GET", "/admin/tenants").json()["items"][0]["id"]
    cluster.route(path="/public/*", auth_required=False)

    anonymous = cluster.dp.get("/public/x")
    identified = cluster.dp.get("/public/x", {"X-API-Key": key})
    wrong = cluster.dp.get("/public/x", {"X-API-Key": "tg_not-a-key"})

    assert anonymous.status == 200 and "X-Tenant-ID" not in anonymous.json()["headers"]
    assert identified.json()["headers"]["X-Tenant-ID"] == tenant_id
    # Like Kong's anonymous consumer: an invalid credential on an open route is ignored.
    assert wrong.status == 200 and "X-Tenant-ID" not in wrong.json()["headers"]


def _chunked_post(dp: DataPlane, path: str, key: str, chunks: list[bytes]) -> tuple[int, bytes]:
    host, port = dp.proxy_url.removeprefix("http://").split(":")
    conn = HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("POST", path, body=iter(chunks), headers={"X-API-Key": key}, encode_chunked=True)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_body_over_the_limit_is_413_whether_announced_or_streamed(cluster: Cluster) -> None:
    key = str(cluster.tenant("A")["api_key"])
    cluster.route(path="/upload/*", max_body_bytes=1000)
    url = cluster.dp.proxy_url + "/upload/x"

    small = http("POST", url, headers={"X-API-Key": key}, body=b"a" * 1000)
    announced = http("POST", url, headers={"X-API-Key": key}, body=b"a" * 1001)
    streamed_ok = _chunked_post(cluster.dp, "/upload/x", key, [b"b" * 500, b"b" * 500])
    streamed_big = _chunked_post(cluster.dp, "/upload/x", key, [b"c" * 600, b"c" * 600])

    assert small.status == 200 and small.json()["body_bytes"] == 1000
    assert announced.status == 413 and announced.json()["error"]["code"] == "payload_too_large"
    assert streamed_ok[0] == 200
    assert streamed_big[0] == 413

"""API keys on a real data plane: header only, case-sensitive, revocation and tenant state within
one snapshot, several keys at once, and never forwarded. Every refusal is checked to have
reached no upstream."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.auth_support import AuthCluster, auth_cluster, raw_request
from tests.integration.harness import Processes, start_data_plane

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster(postgres_admin_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthCluster]:
    tmp: Path = tmp_path_factory.mktemp("auth-keys")
    yield from auth_cluster(postgres_admin_url, redis_url, tmp)


def test_key_in_header_passes_and_is_not_forwarded(cluster: AuthCluster) -> None:
    tenant = cluster.tenant()
    prefix = cluster.route()

    received = cluster.passed(prefix + "/x", {"X-API-Key": tenant["api_key"]})

    assert received["headers"]["X-Tenant-ID"] == tenant["id"]
    assert not {"x-api-key", "authorization"} & {h.lower() for h in received["headers"]}


def test_missing_key_is_401_with_both_challenges(cluster: AuthCluster) -> None:
    prefix = cluster.route()

    resp = cluster.refused(prefix + "/x", {}, 401, "missing_credentials")

    challenge = resp.headers["www-authenticate"]
    assert 'ApiKey realm="tenantgate"' in challenge and 'Bearer realm="tenantgate"' in challenge


@pytest.mark.parametrize(
    "query",
    ["api_key={key}", "API_KEY={key}", "apikey={key}", "x-api-key={key}", "page=2&key={key}", "api%5Fkey={key}"],
)
def test_key_in_the_query_string_is_400_and_not_echoed(cluster: AuthCluster, query: str) -> None:
    tenant = cluster.tenant()
    prefix = cluster.route(auth_required=False)
    key = tenant["api_key"]

    # Refused even alongside a valid header key, and even on a route that needs no credential.
    for headers in ({}, {"X-API-Key": key}):
        resp = cluster.refused(f"{prefix}/x?{query.format(key=key)}", headers, 400, "credential_in_query")
        assert key.encode() not in resp.body
    assert key not in cluster.dp.proc.log()


def test_case_altered_and_mangled_keys_are_401(cluster: AuthCluster) -> None:
    key = cluster.tenant()["api_key"]
    prefix = cluster.route()

    for wrong in (key.upper(), key.lower(), key.swapcase(), key[:-1], key + "x", "tg_unknown"):
        resp = cluster.refused(prefix + "/x", {"X-API-Key": wrong}, 401, "invalid_api_key")
        assert resp.headers["www-authenticate"].startswith("ApiKey")
        assert wrong.encode() not in resp.body


def test_two_keys_of_one_tenant_work_and_a_revoked_one_stops(cluster: AuthCluster) -> None:
    tenant = cluster.tenant()
    prefix = cluster.route()
    second = cluster.write("POST", f"/admin/tenants/{tenant['id']}/keys")

    for key in (tenant["api_key"], second["key"]):
        assert cluster.passed(prefix + "/x", {"X-API-Key": key})["headers"]["X-Tenant-ID"] == tenant["id"]

    first_id = next(
        k["id"]
        for k in cluster.cp.api("GET", f"/admin/tenants/{tenant['id']}/keys").json()["items"]
        if k["id"] != second["id"]
    )
    cluster.write("DELETE", f"/admin/tenants/{tenant['id']}/keys/{first_id}", expect=200)

    cluster.refused(prefix + "/x", {"X-API-Key": tenant["api_key"]}, 401, "invalid_api_key")
    cluster.passed(prefix + "/x", {"X-API-Key": second["key"]})


def test_inactive_tenant_is_403_from_the_next_snapshot_and_back_when_reactivated(cluster: AuthCluster) -> None:
    tenant = cluster.tenant()
    prefix = cluster.route()
    headers = {"X-API-Key": tenant["api_key"]}
    cluster.passed(prefix + "/x", headers)

    cluster.write("PATCH", f"/admin/tenants/{tenant['id']}", {"is_active": False}, expect=200)
    resp = cluster.refused(prefix + "/x", headers, 403, "tenant_inactive")
    assert "inactive" in resp.json()["error"]["message"]

    cluster.write("PATCH", f"/admin/tenants/{tenant['id']}", {"is_active": True}, expect=200)
    cluster.passed(prefix + "/x", headers)


def test_deleted_tenants_key_is_401(cluster: AuthCluster) -> None:
    tenant = cluster.tenant()
    prefix = cluster.route()
    cluster.passed(prefix + "/x", {"X-API-Key": tenant["api_key"]})

    cluster.write("DELETE", f"/admin/tenants/{tenant['id']}", expect=200)

    cluster.refused(prefix + "/x", {"X-API-Key": tenant["api_key"]}, 401, "invalid_api_key")


def test_repeated_key_header_is_400(cluster: AuthCluster) -> None:
    a, b = cluster.tenant(), cluster.tenant()
    prefix = cluster.route()
    before = len(cluster.upstream.requests)

    for keys in ((a["api_key"], b["api_key"]), (a["api_key"], a["api_key"])):
        resp = raw_request(cluster.dp, "GET", prefix + "/x", [("X-API-Key", k) for k in keys])
        assert resp.status == 400 and resp.json()["error"]["code"] == "conflicting_credentials"
    assert len(cluster.upstream.requests) == before


def test_open_route_identifies_a_valid_key_and_ignores_an_invalid_one(cluster: AuthCluster) -> None:
    tenant = cluster.tenant()
    prefix = cluster.route(auth_required=False)

    anonymous = cluster.passed(prefix + "/x", {})
    identified = cluster.passed(prefix + "/x", {"X-API-Key": tenant["api_key"]})
    wrong = cluster.passed(prefix + "/x", {"X-API-Key": "tg_wrong"})

    assert "X-Tenant-ID" not in anonymous["headers"]
    assert identified["headers"]["X-Tenant-ID"] == tenant["id"]
    assert "X-Tenant-ID" not in wrong["headers"] and "X-API-Key" not in wrong["headers"]


def test_route_rules_need_a_valid_credential_even_when_auth_is_not_required(cluster: AuthCluster) -> None:
    premium = cluster.tenant("premium")
    prefix = cluster.route(auth_required=False, tiers=["premium"])

    cluster.passed(prefix + "/x", {"X-API-Key": premium["api_key"]})
    cluster.refused(prefix + "/x", {}, 401, "missing_credentials")
    cluster.refused(prefix + "/x", {"X-API-Key": "tg_wrong"}, 401, "invalid_api_key")
    cluster.refused(prefix + "/x", {"X-API-Key": cluster.tenant("free")["api_key"]}, 403, "tier_not_allowed")


def test_refused_clients_are_reported_by_address_once_per_interval(
    cluster: AuthCluster, procs: Processes, redis_url: str
) -> None:
    # A data plane of this test's own, so stopping it reports what it counted; started after
    # the route exists, so its first snapshot (it is ready only with one) has the route.
    prefix = cluster.route()
    dp = start_data_plane(procs, cluster.cp.cluster_addr, redis_url)
    for i in range(7):
        assert dp.get(f"{prefix}/x", headers={"X-API-Key": f"tg_guess{i:02d}" + "x" * 30}).status == 401
    assert dp.proc.stop() == 0
    log = dp.proc.log()
    assert "authentication failures" in log and "top_clients=127.0.0.1=7" in log, log
    assert "tg_guess" not in log  # the guesses themselves are never logged

"""The gateway's OAuth 2.0 client credentials endpoint and JWKS on real data planes: tokens from
one node work on another, RFC 6749 errors, revocation, tenant state and signing key rotation."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode

import jwt as pyjwt
import pytest

from tests.integration.auth_support import AuthCluster, auth_cluster, basic
from tests.integration.harness import DataPlane, Response, http

pytestmark = pytest.mark.integration

FORM = {"Content-Type": "application/x-www-form-urlencoded"}
SCOPES = ["orders:read", "orders:write"]


@pytest.fixture(scope="module")
def cluster(postgres_admin_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthCluster]:
    tmp = tmp_path_factory.mktemp("auth-oauth")
    yield from auth_cluster(postgres_admin_url, redis_url, tmp, data_planes=2)


def _client(cluster: AuthCluster, tenant_id: str, scopes: list[str] = SCOPES) -> dict[str, Any]:
    return cluster.write("POST", f"/admin/tenants/{tenant_id}/oauth-clients", {"name": "svc", "scopes": scopes})


def _token_request(
    dp: DataPlane, form: dict[str, str], headers: dict[str, str] | None = None, body: bytes | None = None
) -> Response:
    return http(
        "POST",
        dp.proxy_url + "/oauth/token",
        headers={**FORM, **(headers or {})},
        body=body or urlencode(form).encode(),
    )


def _token(cluster: AuthCluster, client: dict[str, Any], dp: DataPlane | None = None, **form: str) -> str:
    resp = _token_request(
        dp or cluster.dp,
        {"grant_type": "client_credentials", **form},
        {"Authorization": basic(client["client_id"], client["client_secret"])},
    )
    assert resp.status == 200, resp.body
    token: str = resp.json()["access_token"]
    return token


def _error(resp: Response, status: int, error: str) -> None:
    assert resp.status == status, (resp.status, resp.body)
    assert resp.json()["error"] == error and resp.json()["error_description"]
    assert resp.headers["cache-control"] == "no-store"


def test_token_from_one_node_works_on_another_and_verifies_with_the_published_keys(cluster: AuthCluster) -> None:
    tenant = cluster.tenant()
    client = _client(cluster, tenant["id"])
    prefix = cluster.route()
    first, second = cluster.dps

    resp = _token_request(
        first,
        {"grant_type": "client_credentials"},
        {"Authorization": basic(client["client_id"], client["client_secret"])},
    )

    assert resp.status == 200, resp.body
    assert resp.headers["cache-control"] == "no-store"
    body = resp.json()
    assert body["token_type"] == "Bearer" and body["expires_in"] > 0 and body["scope"] == " ".join(SCOPES)
    received = cluster.passed(prefix + "/x", {"Authorization": f"Bearer {body['access_token']}"}, dp=second)
    assert received["headers"]["X-Tenant-ID"] == tenant["id"]

    jwks = http("GET", second.proxy_url + "/.well-known/jwks.json")
    assert jwks.status == 200 and jwks.headers["content-type"].startswith("application/json")
    keys = {k["kid"]: k for k in jwks.json()["keys"]}
    assert all("d" not in k for k in keys.values())
    header = pyjwt.get_unverified_header(body["access_token"])
    assert header["alg"] == "ES256" and header["kid"] in keys
    claims = pyjwt.decode(
        body["access_token"],
        pyjwt.PyJWK(keys[header["kid"]]).key,
        algorithms=["ES256"],
        audience="tenantgate",
        issuer="tenantgate",
    )
    assert claims["sub"] == client["client_id"] and claims["tenant_id"] == tenant["id"]


def test_body_credentials_and_a_narrower_scope(cluster: AuthCluster) -> None:
    tenant = cluster.tenant()
    client = _client(cluster, tenant["id"])
    read_only = cluster.route(scopes=["orders:read"])
    write = cluster.route(scopes=["orders:write"])
    form = {
        "grant_type": "client_credentials",
        "client_id": client["client_id"],
        "client_secret": client["client_secret"],
        "scope": "orders:read",
    }

    resp = _token_request(cluster.dp, form)

    assert resp.status == 200 and resp.json()["scope"] == "orders:read"
    bearer = {"Authorization": f"Bearer {resp.json()['access_token']}"}
    cluster.passed(read_only + "/x", bearer)
    cluster.refused(write + "/x", bearer, 403, "insufficient_scope")


def test_gateway_token_of_tenant_a_on_a_route_only_for_b_is_403(cluster: AuthCluster) -> None:
    a, b = cluster.tenant(), cluster.tenant()
    prefix = cluster.route(tenants=[b["id"]])
    token = _token(cluster, _client(cluster, a["id"]))

    cluster.refused(prefix + "/x", {"Authorization": f"Bearer {token}"}, 403, "tenant_not_allowed")


def test_rfc6749_errors(cluster: AuthCluster) -> None:
    client = _client(cluster, cluster.tenant()["id"])
    good = {"Authorization": basic(client["client_id"], client["client_secret"])}
    grant = {"grant_type": "client_credentials"}
    dp = cluster.dp

    _error(
        _token_request(dp, {"grant_type": "password", "username": "u", "password": "p"}, good),
        400,
        "unsupported_grant_type",
    )
    _error(_token_request(dp, {}, good), 400, "invalid_request")
    wrong = _token_request(dp, grant, {"Authorization": basic(client["client_id"], client["client_secret"] + "x")})
    _error(wrong, 401, "invalid_client")
    assert wrong.headers["www-authenticate"].startswith("Basic")
    _error(_token_request(dp, grant), 401, "invalid_client")
    _error(_token_request(dp, {**grant, "scope": "orders:read admin"}, good), 400, "invalid_scope")
    both = {**grant, "client_id": client["client_id"], "client_secret": client["client_secret"]}
    _error(_token_request(dp, both, good), 400, "invalid_request")
    as_json = http(
        "POST",
        dp.proxy_url + "/oauth/token",
        headers=good,
        json_body={"grant_type": "client_credentials"},
    )
    _error(as_json, 400, "invalid_request")
    huge = _token_request(dp, {}, good, body=b"grant_type=client_credentials&pad=" + b"x" * 100_000)
    _error(huge, 413, "invalid_request")
    repeated = _token_request(dp, {}, good, body=b"grant_type=client_credentials&grant_type=client_credentials")
    _error(repeated, 400, "invalid_request")

    get = http("GET", dp.proxy_url + "/oauth/token")
    assert get.status == 405 and get.headers["allow"] == "POST"


def test_routes_do_not_shadow_the_gateways_endpoints(cluster: AuthCluster) -> None:
    tenant = cluster.tenant()
    client = _client(cluster, tenant["id"])
    for path in ("/oauth/*", "/.well-known/*"):
        cluster.write("POST", "/admin/routes", {"path": path, "upstream": cluster.upstream.url, "auth_required": False})
    before = len(cluster.upstream.requests)

    assert _token(cluster, client)
    assert http("GET", cluster.dp.proxy_url + "/.well-known/jwks.json").json()["keys"]
    assert len(cluster.upstream.requests) == before
    # Other paths under those prefixes are the routes'.
    cluster.passed("/oauth/authorize", {})


def test_revoked_client_loses_its_tokens_and_its_secret(cluster: AuthCluster) -> None:
    tenant = cluster.tenant()
    client = _client(cluster, tenant["id"])
    prefix = cluster.route()
    token = _token(cluster, client)
    bearer = {"Authorization": f"Bearer {token}"}
    cluster.passed(prefix + "/x", bearer)

    cluster.write("DELETE", f"/admin/tenants/{tenant['id']}/oauth-clients/{client['id']}", expect=200)

    cluster.refused(prefix + "/x", bearer, 401, "invalid_token")
    again = _token_request(
        cluster.dp,
        {"grant_type": "client_credentials"},
        {"Authorization": basic(client["client_id"], client["client_secret"])},
    )
    _error(again, 401, "invalid_client")


def test_inactive_tenant_gets_no_token_and_its_tokens_are_403(cluster: AuthCluster) -> None:
    tenant = cluster.tenant()
    client = _client(cluster, tenant["id"])
    prefix = cluster.route()
    bearer = {"Authorization": f"Bearer {_token(cluster, client)}"}

    cluster.write("PATCH", f"/admin/tenants/{tenant['id']}", {"is_active": False}, expect=200)

    cluster.refused(prefix + "/x", bearer, 403, "tenant_inactive")
    resp = _token_request(
        cluster.dp,
        {"grant_type": "client_credentials"},
        {"Authorization": basic(client["client_id"], client["client_secret"])},
    )
    _error(resp, 400, "unauthorized_client")


def _jwks_kids(dp: DataPlane) -> list[str]:
    return [k["kid"] for k in http("GET", dp.proxy_url + "/.well-known/jwks.json").json()["keys"]]


def test_signing_key_rotation_keeps_the_previous_key_until_the_next_rotation(cluster: AuthCluster) -> None:
    client = _client(cluster, cluster.tenant()["id"])
    prefix = cluster.route()
    old_token = _token(cluster, client)
    old_kid = pyjwt.get_unverified_header(old_token)["kid"]

    rotated = cluster.write("POST", "/admin/signing-keys/rotate")

    new_token = _token(cluster, client, dp=cluster.dps[1])
    assert pyjwt.get_unverified_header(new_token)["kid"] == rotated["kid"] != old_kid
    for dp in cluster.dps:
        assert _jwks_kids(dp)[-2:] == [old_kid, rotated["kid"]]
    cluster.passed(prefix + "/x", {"Authorization": f"Bearer {old_token}"})
    cluster.passed(prefix + "/x", {"Authorization": f"Bearer {new_token}"})

    cluster.write("POST", "/admin/signing-keys/rotate")

    assert old_kid not in _jwks_kids(cluster.dp)
    cluster.refused(prefix + "/x", {"Authorization": f"Bearer {old_token}"}, 401, "invalid_token")
    cluster.passed(prefix + "/x", {"Authorization": f"Bearer {new_token}"})
    listed = cluster.cp.api("GET", "/admin/signing-keys").json()["items"]
    assert [k["retired_at"] is None for k in listed][:3] == [True, True, False]
    assert all("private" not in str(k).lower() and "d" not in k["public_jwk"] for k in listed)


def test_expect_100_continue_is_answered_before_the_body_is_sent(cluster: AuthCluster) -> None:
    client = _client(cluster, cluster.tenant()["id"])
    body = urlencode({"grant_type": "client_credentials"}).encode()
    host, port = cluster.dp.proxy_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        head = (
            "POST /oauth/token HTTP/1.1\r\n"
            f"Host: {host}\r\n"
            f"Authorization: {basic(client['client_id'], client['client_secret'])}\r\n"
            "Content-Type: application/x-www-form-urlencoded\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Expect: 100-continue\r\n"
            "Connection: close\r\n\r\n"
        )
        sock.sendall(head.encode())
        assert sock.recv(64).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(body)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert b'"access_token"' in answer

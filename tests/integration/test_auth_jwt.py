"""JWT bearer tokens on a real data plane, from issuers configured through the admin API: the
attack suite (each refusal with its exact status and nothing reaching the upstream), tenant
isolation, scopes, conflicting credentials and issuer removal."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from tests.integration.auth_support import AuthCluster, JsonServer, auth_cluster, b64, claims, forge, sign
from tests.integration.harness import wait_for

pytestmark = pytest.mark.integration

ISS_A = "https://idp-a.example.com/"
ISS_B = "hs-issuer-b"
AUD = "orders-api"
HS_SECRET = "b" * 48
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
FOREIGN_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
INVALID_TOKEN = 'Bearer realm="tenantgate", error="invalid_token"'


@dataclass
class World:
    cluster: AuthCluster
    a: dict[str, Any]  # tenant with an RS256 issuer (inline JWKS, kid "a1")
    b: dict[str, Any]  # tenant with an HS256 issuer
    c: dict[str, Any]  # tenant with an ES256 issuer whose keys the control plane fetched from jwks_uri
    c_issuer: str
    route: str  # auth required, any tenant


def _rsa_jwk(key: rsa.RSAPrivateKey, kid: str) -> dict[str, Any]:
    return {**RSAAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": kid, "alg": "RS256", "use": "sig"}


@pytest.fixture(scope="module")
def world(postgres_admin_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    jwks = JsonServer({"keys": [{**ECAlgorithm.to_jwk(EC_KEY.public_key(), as_dict=True), "kid": "c1"}]})
    try:
        for cluster in auth_cluster(postgres_admin_url, redis_url, tmp_path_factory.mktemp("auth-jwt")):
            a, b, c = cluster.tenant(), cluster.tenant(), cluster.tenant()
            cluster.write(
                "POST",
                f"/admin/tenants/{a['id']}/jwt-issuers",
                {
                    "issuer": ISS_A,
                    "audience": AUD,
                    "algorithms": ["RS256"],
                    "jwks": {"keys": [_rsa_jwk(RSA_KEY, "a1")]},
                },
            )
            cluster.write(
                "POST",
                f"/admin/tenants/{b['id']}/jwt-issuers",
                {"issuer": ISS_B, "audience": AUD, "algorithms": ["HS256"], "hs256_secret": HS_SECRET},
            )
            c_issuer = cluster.write(
                "POST",
                f"/admin/tenants/{c['id']}/jwt-issuers",
                {"issuer": "http://127.0.0.1/c", "audience": AUD, "algorithms": ["ES256"], "jwks_uri": jwks.url},
            )
            # The control plane fetches the jwks_uri in the background and publishes the keys.
            issuer_url = f"/admin/tenants/{c['id']}/jwt-issuers/{c_issuer['id']}"
            cp = cluster.cp
            wait_for(lambda: cp.api("GET", issuer_url).json()["keys"], what="jwks_uri keys fetched")  # noqa: B023
            cluster.sync(cluster.cp.api("GET", "/admin/config").json()["version"])
            yield World(cluster, a, b, c, c_issuer["id"], cluster.route())
    finally:
        jwks.stop()


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _token_a(**overrides: Any) -> str:
    payload = {**claims(ISS_A, AUD), **overrides}
    return sign({k: v for k, v in payload.items() if v is not None}, RSA_KEY, "RS256", kid="a1")


def test_valid_tokens_of_each_issuer_pass_with_their_tenant(world: World) -> None:
    c = world.cluster
    tokens = {
        world.a["id"]: _token_a(),
        world.b["id"]: sign(claims(ISS_B, AUD), HS_SECRET.encode(), "HS256"),
        world.c["id"]: sign(claims("http://127.0.0.1/c", AUD), EC_KEY, "ES256", kid="c1"),
    }
    for tenant_id, token in tokens.items():
        received = c.passed(world.route + "/x", _bearer(token))
        assert received["headers"]["X-Tenant-ID"] == tenant_id
        assert "Authorization" not in received["headers"]  # the credential stays at the gateway


def test_lower_case_bearer_scheme_and_cached_repeats(world: World) -> None:
    token = _token_a()
    for _ in range(3):
        world.cluster.passed(world.route + "/x", {"Authorization": f"bearer {token}"})


def _alg_confusion() -> str:
    """HS256 "signed" with the issuer's RSA public key as the HMAC secret."""
    pem = RSA_KEY.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "a1"}).encode())
    payload = b64(json.dumps(claims(ISS_A, AUD)).encode())
    signature = hmac.new(pem, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{b64(signature)}"


def _tampered_payload() -> str:
    header, _, signature = _token_a().split(".")
    return f"{header}.{b64(json.dumps(claims(ISS_A, AUD, sub='admin')).encode())}.{signature}"


def _tampered_signature() -> str:
    header, payload, signature = _token_a().split(".")
    return f"{header}.{payload}.{signature[:10]}{'A' if signature[10] != 'A' else 'B'}{signature[11:]}"


ATTACKS: dict[str, Any] = {
    "alg none": lambda: forge({"alg": "none", "typ": "JWT"}, claims(ISS_A, AUD), b""),
    "alg None with kid": lambda: forge({"alg": "None", "kid": "a1"}, claims(ISS_A, AUD)),
    "alg NONE": lambda: forge({"alg": "NONE"}, claims(ISS_A, AUD)),
    "alg confusion (RS256 public key as HS256 secret)": _alg_confusion,
    "kid path traversal": lambda: sign(claims(ISS_A, AUD), RSA_KEY, "RS256", kid="../../../../../dev/null"),
    "kid injection": lambda: sign(claims(ISS_A, AUD), RSA_KEY, "RS256", kid="a1' UNION SELECT 'x"),
    "kid absolute path": lambda: sign(claims(ISS_A, AUD), RSA_KEY, "RS256", kid="/etc/passwd"),
    "jku to a foreign key set": lambda: sign(
        claims(ISS_A, AUD), FOREIGN_KEY, "RS256", kid="a1", jku="http://127.0.0.1:1/jwks.json"
    ),
    "x5u to a foreign certificate": lambda: sign(
        claims(ISS_A, AUD), FOREIGN_KEY, "RS256", kid="a1", x5u="http://127.0.0.1:1/cert.pem"
    ),
    "embedded jwk": lambda: sign(claims(ISS_A, AUD), FOREIGN_KEY, "RS256", kid="a1", jwk=_rsa_jwk(FOREIGN_KEY, "a1")),
    "foreign key, no kid": lambda: sign(claims(ISS_A, AUD), FOREIGN_KEY, "RS256"),
    "crit header": lambda: sign(claims(ISS_A, AUD), RSA_KEY, "RS256", kid="a1", crit=["exp"]),
    "expired": lambda: _token_a(iat=claims(ISS_A, AUD)["iat"] - 3600, exp=claims(ISS_A, AUD)["iat"] - 120),
    "nbf in the future": lambda: _token_a(nbf=claims(ISS_A, AUD)["iat"] + 600),
    "iat in the future": lambda: _token_a(iat=claims(ISS_A, AUD)["iat"] + 600, exp=claims(ISS_A, AUD)["iat"] + 900),
    "missing exp": lambda: _token_a(exp=None),
    "missing iat": lambda: _token_a(iat=None),
    "missing sub": lambda: _token_a(sub=None),
    "missing aud": lambda: _token_a(aud=None),
    "wrong iss": lambda: _token_a(iss="https://evil.example.com/"),
    "issuer prefix trick": lambda: _token_a(iss=ISS_A + "evil"),
    "issuer without trailing slash": lambda: _token_a(iss=ISS_A.rstrip("/")),
    "wrong aud": lambda: _token_a(aud="other-api"),
    "audience prefix": lambda: _token_a(aud=AUD + "-x"),
    "oversized": lambda: _token_a(pad="x" * 9000),
    "tampered payload": _tampered_payload,
    "tampered signature": _tampered_signature,
    "HS256 token of tenant B's issuer signed with a guessed secret": lambda: sign(
        claims(ISS_B, AUD), b"g" * 48, "HS256"
    ),
    "ES256 token claiming tenant A's issuer": lambda: sign(claims(ISS_A, AUD), EC_KEY, "ES256", kid="a1"),
    "not a JWT": lambda: "not-a-token",
    "empty": lambda: "",
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_attack_is_401_invalid_token_and_reaches_nothing(world: World, attack: str) -> None:
    token = ATTACKS[attack]()
    resp = world.cluster.refused(world.route + "/x", _bearer(token), 401, "invalid_token")
    assert resp.headers["www-authenticate"] == INVALID_TOKEN


def test_token_of_tenant_a_on_a_route_only_for_b_is_403(world: World) -> None:
    c = world.cluster
    prefix = c.route(tenants=[world.b["id"]])

    c.refused(prefix + "/x", _bearer(_token_a()), 403, "tenant_not_allowed")
    c.passed(prefix + "/x", _bearer(sign(claims(ISS_B, AUD), HS_SECRET.encode(), "HS256")))


def test_tenant_claims_in_the_token_do_not_choose_the_tenant(world: World) -> None:
    c = world.cluster
    prefix = c.route(tenants=[world.b["id"]])
    token = _token_a(tenant_id=world.b["id"], tid=world.b["id"], tenant=world.b["id"])

    c.refused(prefix + "/x", _bearer(token), 403, "tenant_not_allowed")


def test_scopes_from_scope_or_scp(world: World) -> None:
    c = world.cluster
    prefix = c.route(scopes=["orders:read", "orders:write"])

    c.passed(prefix + "/x", _bearer(_token_a(scope="orders:read orders:write profile")))
    c.passed(prefix + "/x", _bearer(_token_a(scp=["orders:write", "orders:read"])))
    resp = c.refused(prefix + "/x", _bearer(_token_a(scope="orders:read")), 403, "insufficient_scope")
    assert 'error="insufficient_scope"' in resp.headers["www-authenticate"]
    c.refused(prefix + "/x", _bearer(_token_a()), 403, "insufficient_scope")
    c.refused(prefix + "/x", {"X-API-Key": world.a["api_key"]}, 403, "insufficient_scope")


def test_key_and_token_of_different_tenants_conflict(world: World) -> None:
    c = world.cluster
    both = {"X-API-Key": world.b["api_key"], **_bearer(_token_a())}
    c.refused(world.route + "/x", both, 400, "conflicting_credentials")

    same = {"X-API-Key": world.a["api_key"], **_bearer(_token_a(scope="orders:read"))}
    assert c.passed(world.route + "/x", same)["headers"]["X-Tenant-ID"] == world.a["id"]


def test_one_invalid_credential_of_two_is_401(world: World) -> None:
    c = world.cluster
    c.refused(world.route + "/x", {"X-API-Key": world.a["api_key"], **_bearer("x.y.z")}, 401, "invalid_token")
    c.refused(world.route + "/x", {"X-API-Key": "tg_wrong", **_bearer(_token_a())}, 401, "invalid_api_key")


def test_open_route_ignores_an_invalid_token(world: World) -> None:
    c = world.cluster
    prefix = c.route(auth_required=False)

    assert "X-Tenant-ID" not in c.passed(prefix + "/x", _bearer(ATTACKS["alg none"]()))["headers"]
    assert c.passed(prefix + "/x", _bearer(_token_a()))["headers"]["X-Tenant-ID"] == world.a["id"]


def test_removed_issuer_stops_its_cached_tokens_at_the_next_snapshot(world: World) -> None:
    c = world.cluster
    token = sign(claims("http://127.0.0.1/c", AUD, sub="cached"), EC_KEY, "ES256", kid="c1")
    c.passed(world.route + "/x", _bearer(token))

    c.write("DELETE", f"/admin/tenants/{world.c['id']}/jwt-issuers/{world.c_issuer}", expect=200)

    c.refused(world.route + "/x", _bearer(token), 401, "invalid_token")


def test_inactive_tenants_token_is_403(world: World) -> None:
    c = world.cluster
    tenant = c.tenant()
    issuer = "https://idp-inactive.example.com/"
    c.write(
        "POST",
        f"/admin/tenants/{tenant['id']}/jwt-issuers",
        {"issuer": issuer, "audience": AUD, "algorithms": ["RS256"], "jwks": {"keys": [_rsa_jwk(RSA_KEY, "i1")]}},
    )
    token = sign(claims(issuer, AUD), RSA_KEY, "RS256", kid="i1")
    c.passed(world.route + "/x", _bearer(token))

    c.write("PATCH", f"/admin/tenants/{tenant['id']}", {"is_active": False}, expect=200)

    c.refused(world.route + "/x", _bearer(token), 403, "tenant_inactive")

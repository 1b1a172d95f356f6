"""JWT issuers, OAuth clients and the gateway's signing key, through the admin API of a real
control plane on real Postgres, and what of them the snapshot carries."""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import asyncpg
import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from control_plane.store import config as config_store
from control_plane.store.db import Database
from shared import snapshot as model
from tests.integration.harness import ControlPlane, Processes, start_control_plane, wait_for

pytestmark = pytest.mark.integration

HS256_SECRET = "an-hs256-secret-that-is-long-enough-0123456789"


@pytest.fixture
def cp(procs: Processes, database_url: str) -> ControlPlane:
    return start_control_plane(procs, database_url)


def _tenant(cp: ControlPlane, name: str = "Acme") -> str:
    resp = cp.api("POST", "/admin/tenants", {"name": name})
    assert resp.status == 201, resp.body
    tenant_id: str = resp.json()["id"]
    return tenant_id


def _token(cp: ControlPlane, role: str, tenant_id: str | None = None) -> str:
    body = {"name": f"{role}-token", "role": role, **({"tenant_id": tenant_id} if tenant_id else {})}
    resp = cp.api("POST", "/admin/tokens", body)
    assert resp.status == 201, resp.body
    token: str = resp.json()["token"]
    return token


def _rsa_jwk(kid: str) -> dict[str, Any]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return {**RSAAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": kid, "use": "sig", "alg": "RS256"}


def _ec_public_pem() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def _issuer_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "issuer": "https://auth.example.com/",
        "audience": "orders-api",
        "algorithms": ["RS256"],
        "jwks": {"keys": [_rsa_jwk("k1")]},
    }
    body.update(overrides)
    return body


def _snapshot(database_url: str) -> model.Snapshot:
    """The snapshot the control plane would send now, through the wire form (so validated)."""

    async def load() -> model.Snapshot:
        db = await Database.connect(database_url)
        try:
            return await config_store.load_snapshot(db)
        finally:
            await db.close()

    wire = model.to_proto(asyncio.run(load())).SerializeToString()
    msg = model.pb.Snapshot()
    msg.ParseFromString(wire)
    return model.from_proto(msg)


def _fetch(database_url: str, sql: str, *args: object) -> list[asyncpg.Record]:
    async def run() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(database_url)
        try:
            rows: list[asyncpg.Record] = await conn.fetch(sql, *args)
            return rows
        finally:
            await conn.close()

    return asyncio.run(run())


def _audit_text(database_url: str) -> str:
    rows = _fetch(database_url, "SELECT object_type, before::text AS b, after::text AS a FROM audit_log")
    return "\n".join(f"{r['object_type']} {r['b']} {r['a']}" for r in rows)


class JwksServer:
    """A small identity provider on a random loopback port, in a thread of its own."""

    def __init__(self) -> None:
        self.documents: dict[str, tuple[int, Any]] = {}
        self.hits: dict[str, int] = {}
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.port = 0

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.hits[request.path] = self.hits.get(request.path, 0) + 1
        status, body = self.documents.get(request.path, (404, {"error": "not found"}))
        if 300 <= status < 400:
            raise web.HTTPFound(location=str(body))
        return web.json_response(body, status=status)

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


@pytest.fixture
def idp() -> Iterator[JwksServer]:
    server = JwksServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


# --- JWT issuers ---


def test_issuer_with_inline_jwks_create_list_get_delete(cp: ControlPlane) -> None:
    tid = _tenant(cp)
    base = f"/admin/tenants/{tid}/jwt-issuers"

    created = cp.api("POST", base, _issuer_body())
    listed = cp.api("GET", base)
    got = cp.api("GET", f"{base}/{created.json()['id']}")
    deleted = cp.api("DELETE", f"{base}/{created.json()['id']}")
    gone = cp.api("GET", f"{base}/{created.json()['id']}")
    deleted_again = cp.api("DELETE", f"{base}/{created.json()['id']}")

    assert created.status == 201, created.body
    body = created.json()
    assert int(created.headers["x-config-version"]) == body["config_version"]
    assert (body["tenant_id"], body["issuer"], body["audience"]) == (tid, "https://auth.example.com/", "orders-api")
    assert body["algorithms"] == ["RS256"] and body["key_source"] == "jwks"
    assert body["keys"] == [{"kid": "k1", "kty": "RSA", "alg": "RS256", "use": "sig"}]
    assert body["jwks_uri"] is None and body["jwks_fetched_at"] is None and body["jwks_error"] is None
    assert listed.status == 200 and [i["id"] for i in listed.json()["items"]] == [body["id"]]
    assert got.status == 200 and got.json() == {k: v for k, v in body.items() if k != "config_version"}
    assert deleted.status == 200 and deleted.json()["deleted"] is True
    assert deleted.json()["config_version"] > body["config_version"]
    assert gone.status == 404 and deleted_again.status == 404
    assert cp.api("GET", base).json()["items"] == []


def test_pem_and_hs256_issuers_reach_the_snapshot_and_the_secret_is_never_returned(
    cp: ControlPlane, database_url: str
) -> None:
    tid = _tenant(cp)
    base = f"/admin/tenants/{tid}/jwt-issuers"
    pem = _ec_public_pem()

    from_pem = cp.api(
        "POST", base, _issuer_body(issuer="pem-issuer", algorithms=["ES256"], jwks=None, public_key_pem=pem)
    )
    from_secret = cp.api(
        "POST", base, _issuer_body(issuer="hs-issuer", algorithms=["HS256"], jwks=None, hs256_secret=HS256_SECRET)
    )
    listed = cp.api("GET", base)
    got = cp.api("GET", f"{base}/{from_secret.json()['id']}")

    assert from_pem.status == 201, from_pem.body
    assert from_pem.json()["public_key_pem"] == pem and from_pem.json()["key_source"] == "public_key_pem"
    assert [(k["kid"], k["kty"]) for k in from_pem.json()["keys"]] == [(None, "EC")]
    assert from_secret.status == 201, from_secret.body
    assert from_secret.json()["key_source"] == "hs256_secret" and from_secret.json()["keys"] == []
    for resp in (from_secret, listed, got):
        assert HS256_SECRET.encode() not in resp.body
        assert b'hs256_secret":' not in resp.body
    assert HS256_SECRET not in _audit_text(database_url)

    snap = _snapshot(database_url)
    by_issuer = {i.issuer: i for i in snap.jwt_issuers}
    assert by_issuer["hs-issuer"].hs256_secret == HS256_SECRET.encode()
    assert json.loads(by_issuer["hs-issuer"].jwks_json) == {"keys": []}
    assert HS256_SECRET not in repr(by_issuer["hs-issuer"])
    pem_keys = json.loads(by_issuer["pem-issuer"].jwks_json)["keys"]
    assert len(pem_keys) == 1
    expected = serialization.load_pem_public_key(pem.encode())
    assert jwt.PyJWK(pem_keys[0]).key.public_numbers() == expected.public_numbers()
    assert by_issuer["pem-issuer"].hs256_secret == b""


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"algorithms": ["none"]}, "algorithms"),
        ({"algorithms": ["RS256", "HS256"]}, "algorithms"),
        ({"algorithms": ["RS1"]}, "algorithms"),
        ({"issuer": "http://auth.example.com/"}, "issuer"),
        ({"issuer": "x" * 513}, "issuer"),
        ({"jwks": None}, "jwks"),
        ({"jwks_uri": "https://auth.example.com/jwks"}, "jwks_uri"),
        ({"jwks": {"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}}, "jwks"),
        ({"jwks": None, "jwks_uri": "http://169.254.169.254/jwks"}, "jwks_uri"),
        ({"jwks": None, "jwks_uri": "http://auth.example.com/jwks"}, "jwks_uri"),
        (
            {"jwks": None, "public_key_pem": "-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----"},
            "public_key_pem",
        ),
        ({"jwks": None, "algorithms": ["HS256"], "hs256_secret": "too-short"}, "hs256_secret"),
        ({"jwks": None, "hs256_secret": HS256_SECRET}, "hs256_secret"),
        ({"audience": 5}, "audience"),
        ({"extra": True}, "extra"),
    ],
    ids=[
        "alg_none",
        "hs_mixed_with_rs",
        "unknown_alg",
        "http_issuer",
        "issuer_too_long",
        "no_key_source",
        "two_key_sources",
        "symmetric_jwk",
        "link_local_jwks_uri",
        "http_jwks_uri",
        "bad_pem",
        "short_secret",
        "secret_with_rs256",
        "audience_not_a_string",
        "unknown_field",
    ],
)
def test_invalid_issuer_is_422_naming_the_field(cp: ControlPlane, overrides: dict[str, Any], field: str) -> None:
    tid = _tenant(cp)
    body = {k: v for k, v in _issuer_body(**overrides).items() if v is not None}

    resp = cp.api("POST", f"/admin/tenants/{tid}/jwt-issuers", body)

    assert resp.status == 422, resp.body
    assert resp.json()["error"]["message"].startswith(field), resp.json()
    assert HS256_SECRET not in resp.body.decode()


def test_duplicate_issuer_is_409_per_tenant_and_unknown_ids_are_404(cp: ControlPlane) -> None:
    a, b = _tenant(cp, "A"), _tenant(cp, "B")

    first = cp.api("POST", f"/admin/tenants/{a}/jwt-issuers", _issuer_body())
    again = cp.api("POST", f"/admin/tenants/{a}/jwt-issuers", _issuer_body(audience="other"))
    other_tenant = cp.api("POST", f"/admin/tenants/{b}/jwt-issuers", _issuer_body(audience="other"))
    # Another tenant cannot claim the same issuer and audience: a token must name one tenant.
    claimed = cp.api("POST", f"/admin/tenants/{b}/jwt-issuers", _issuer_body())
    no_tenant = cp.api("POST", f"/admin/tenants/{uuid.uuid4()}/jwt-issuers", _issuer_body())
    bad_id = cp.api("GET", f"/admin/tenants/{a}/jwt-issuers/not-a-uuid")
    wrong_tenant = cp.api("GET", f"/admin/tenants/{b}/jwt-issuers/{first.json()['id']}")

    assert first.status == 201 and other_tenant.status == 201
    assert again.status == 409 and again.json()["error"]["code"] == "duplicate_issuer"
    assert claimed.status == 409 and claimed.json()["error"]["code"] == "duplicate_issuer"
    assert no_tenant.status == 404
    assert bad_id.status == 404 and wrong_tenant.status == 404


def test_jwks_uri_keys_are_fetched_by_the_control_plane(cp: ControlPlane, database_url: str, idp: JwksServer) -> None:
    tid = _tenant(cp)
    base = f"/admin/tenants/{tid}/jwt-issuers"
    ec_key = {**ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP256R1()).public_key(), as_dict=True), "kid": "e1"}
    idp.documents["/good/jwks.json"] = (200, {"keys": [_rsa_jwk("r1"), ec_key, {"kty": "oct", "k": "c2VjcmV0"}]})
    idp.documents["/broken/jwks.json"] = (500, {"error": "down"})
    idp.documents["/moved/jwks.json"] = (302, idp.url("/good/jwks.json"))

    good = cp.api("POST", base, _issuer_body(jwks=None, jwks_uri=idp.url("/good/jwks.json")))
    broken = cp.api("POST", base, _issuer_body(issuer="broken", jwks=None, jwks_uri=idp.url("/broken/jwks.json")))
    moved = cp.api("POST", base, _issuer_body(issuer="moved", jwks=None, jwks_uri=idp.url("/moved/jwks.json")))
    assert (good.status, broken.status, moved.status) == (201, 201, 201), (good.body, broken.body, moved.body)
    assert good.json()["keys"] == [] and good.json()["key_source"] == "jwks_uri"

    fetched = wait_for(
        lambda: (r := cp.api("GET", f"{base}/{good.json()['id']}").json())["jwks_fetched_at"] and r,
        timeout=15,
        what="the jwks_uri keys to be fetched",
    )
    failed = wait_for(
        lambda: (r := cp.api("GET", f"{base}/{broken.json()['id']}").json())["jwks_error"] and r,
        timeout=15,
        what="the broken jwks_uri to record an error",
    )
    redirected = wait_for(
        lambda: (r := cp.api("GET", f"{base}/{moved.json()['id']}").json())["jwks_error"] and r,
        timeout=15,
        what="the redirecting jwks_uri to record an error",
    )

    # Only the RS256 key fits the issuer's algorithms; the EC and symmetric keys are dropped.
    assert [(k["kid"], k["kty"]) for k in fetched["keys"]] == [("r1", "RSA")]
    assert fetched["jwks_error"] is None
    assert "HTTP 500" in failed["jwks_error"] and failed["keys"] == [] and failed["jwks_fetched_at"] is None
    assert "redirects are not followed" in redirected["jwks_error"]
    assert idp.hits.get("/good/jwks.json") == 1  # the redirect was not followed
    # The new keys bumped the config version, as the fetcher, without key material in the trail.
    [bump] = _fetch(
        database_url,
        "SELECT actor, config_version, after::text AS after FROM audit_log"
        " WHERE action = 'update_keys' AND object_id = $1",
        good.json()["id"],
    )
    assert bump["actor"] == "jwks-fetcher" and bump["config_version"] > good.json()["config_version"]
    assert json.loads(bump["after"]) == {"kids": ["r1"]}
    snap = _snapshot(database_url)
    in_snapshot = {i.issuer: json.loads(i.jwks_json)["keys"] for i in snap.jwt_issuers}
    assert [k["kid"] for k in in_snapshot["https://auth.example.com/"]] == ["r1"]
    assert in_snapshot["broken"] == []


# --- OAuth clients ---


def test_oauth_client_secret_is_returned_once_and_revocation_leaves_the_snapshot(
    cp: ControlPlane, database_url: str
) -> None:
    tid = _tenant(cp)
    base = f"/admin/tenants/{tid}/oauth-clients"

    created = cp.api("POST", base, {"name": "billing job", "scopes": ["orders:read", "orders.write", "orders:read"]})
    secret = created.json()["client_secret"]
    listed = cp.api("GET", base)
    got = cp.api("GET", f"{base}/{created.json()['id']}")
    snap_before = _snapshot(database_url)
    revoked = cp.api("DELETE", f"{base}/{created.json()['id']}")
    revoked_again = cp.api("DELETE", f"{base}/{created.json()['id']}")
    snap_after = _snapshot(database_url)

    assert created.status == 201, created.body
    body = created.json()
    assert set(body) == {"id", "client_id", "client_secret", "name", "scopes", "created_at", "config_version"}
    assert body["scopes"] == ["orders:read", "orders.write"] and body["name"] == "billing job"
    assert len(secret) >= 32 and body["client_id"] != secret
    for resp in (listed, got, revoked):
        assert secret.encode() not in resp.body and b"client_secret" not in resp.body
    assert [c["client_id"] for c in listed.json()["items"]] == [body["client_id"]]
    assert got.json()["revoked_at"] is None
    assert secret not in _audit_text(database_url)
    [client] = snap_before.oauth_clients
    assert (client.tenant_id, client.client_id, client.scopes) == (
        tid,
        body["client_id"],
        ("orders:read", "orders.write"),
    )
    assert client.secret_hash == hashlib.sha256(secret.encode()).digest()
    assert revoked.status == 200 and revoked.json()["revoked_at"] is not None
    assert revoked_again.status == 200 and revoked_again.json()["revoked_at"] == revoked.json()["revoked_at"]
    assert snap_after.oauth_clients == ()
    assert cp.api("DELETE", f"{base}/{uuid.uuid4()}").status == 404


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"scopes": ["read"]}, "name"),
        ({"name": "  "}, "name"),
        ({"name": "x", "scopes": ["has space"]}, "scopes"),
        ({"name": "x", "scopes": ["s" * 65]}, "scopes"),
        ({"name": "x", "scopes": [f"s{i}" for i in range(51)]}, "scopes"),
        ({"name": "x", "secret": "mine"}, "secret"),
    ],
    ids=["missing_name", "blank_name", "scope_with_space", "scope_too_long", "too_many_scopes", "own_secret"],
)
def test_invalid_oauth_client_is_422_naming_the_field(cp: ControlPlane, body: dict[str, Any], field: str) -> None:
    tid = _tenant(cp)

    resp = cp.api("POST", f"/admin/tenants/{tid}/oauth-clients", body)

    assert resp.status == 422, resp.body
    assert resp.json()["error"]["message"].startswith(field), resp.json()


# --- who may do what ---


def test_tenant_admin_manages_only_its_own_tenant_and_viewer_only_reads(cp: ControlPlane) -> None:
    a, b = _tenant(cp, "A"), _tenant(cp, "B")
    admin_a = _token(cp, "tenant_admin", a)
    viewer = _token(cp, "viewer")
    b_issuer = cp.api("POST", f"/admin/tenants/{b}/jwt-issuers", _issuer_body(audience="api-of-b")).json()["id"]
    b_client = cp.api("POST", f"/admin/tenants/{b}/oauth-clients", {"name": "b"}).json()["id"]

    own_issuer = cp.api("POST", f"/admin/tenants/{a}/jwt-issuers", _issuer_body(), token=admin_a)
    own_client = cp.api("POST", f"/admin/tenants/{a}/oauth-clients", {"name": "a"}, token=admin_a)
    assert own_issuer.status == 201 and own_client.status == 201
    assert cp.api("GET", f"/admin/tenants/{a}/jwt-issuers", token=admin_a).status == 200
    assert cp.api("GET", f"/admin/tenants/{a}/oauth-clients", token=admin_a).status == 200
    assert cp.api("DELETE", f"/admin/tenants/{a}/jwt-issuers/{own_issuer.json()['id']}", token=admin_a).status == 200
    assert cp.api("DELETE", f"/admin/tenants/{a}/oauth-clients/{own_client.json()['id']}", token=admin_a).status == 200

    others = [
        ("GET", f"/admin/tenants/{b}/jwt-issuers", None),
        ("GET", f"/admin/tenants/{b}/jwt-issuers/{b_issuer}", None),
        ("POST", f"/admin/tenants/{b}/jwt-issuers", _issuer_body(issuer="sneaky")),
        ("DELETE", f"/admin/tenants/{b}/jwt-issuers/{b_issuer}", None),
        ("GET", f"/admin/tenants/{b}/oauth-clients", None),
        ("GET", f"/admin/tenants/{b}/oauth-clients/{b_client}", None),
        ("POST", f"/admin/tenants/{b}/oauth-clients", {"name": "sneaky"}),
        ("DELETE", f"/admin/tenants/{b}/oauth-clients/{b_client}", None),
    ]
    for method, path, body in others:
        resp = cp.api(method, path, body, token=admin_a)
        assert resp.status == 404, (method, path, resp.body)
    # B's issuer and client are untouched.
    assert cp.api("GET", f"/admin/tenants/{b}/jwt-issuers/{b_issuer}").status == 200
    assert cp.api("GET", f"/admin/tenants/{b}/oauth-clients/{b_client}").json()["revoked_at"] is None

    for method, path, body in others:
        resp = cp.api(method, path, body, token=viewer)
        assert resp.status == (200 if method == "GET" else 403), (method, path, resp.body)
    assert cp.api("GET", f"/admin/tenants/{b}/jwt-issuers", token="").status == 401


# --- the gateway's signing key ---


def test_signing_key_is_created_once_and_carried_in_the_snapshot(
    procs: Processes, database_url: str, cp: ControlPlane
) -> None:
    start_control_plane(procs, database_url)  # a second replica on the same database

    rows = _fetch(database_url, "SELECT kid FROM signing_keys WHERE retired_at IS NULL")
    snap = _snapshot(database_url)

    assert len(rows) == 1
    [key] = snap.signing_keys
    assert key.kid == rows[0]["kid"] and key.algorithm == "ES256"
    assert key.private_key_pem not in repr(key)
    private = serialization.load_pem_private_key(key.private_key_pem.encode(), password=None)
    public_jwk = json.loads(key.public_jwk_json)
    assert public_jwk["kid"] == key.kid and "d" not in public_jwk
    token = jwt.encode({"sub": "x"}, private, algorithm="ES256", headers={"kid": key.kid})
    assert jwt.decode(token, jwt.PyJWK(public_jwk).key, algorithms=["ES256"]) == {"sub": "x"}
    audit = _audit_text(database_url)
    assert "signing_key" in audit and "PRIVATE KEY" not in audit
    assert cp.api("GET", "/healthz").status == 200

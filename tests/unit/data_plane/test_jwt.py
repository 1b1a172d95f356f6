"""data_plane.auth.jwt: which tokens a snapshot's issuers accept, and the attacks they refuse."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from typing import Any

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from data_plane.auth import jwt as tokens
from data_plane.auth.jwt import InvalidToken, Verifier
from shared.snapshot import JwtIssuer, OAuthClient, SigningKey, Tenant

pytestmark = pytest.mark.unit

ISS_A = "https://idp.example.com/"
HS_SECRET = b"s" * 40


def _tenant(id: str) -> Tenant:
    return Tenant(id, id.upper(), "basic", 60, 1000, 0, 0, True)


A, B, C = _tenant("a"), _tenant("b"), _tenant("c")
TENANTS = {t.id: t for t in (A, B, C)}

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
ED_KEY = ed25519.Ed25519PrivateKey.generate()


def _jwk(public: Any, kind: Any, kid: str | None) -> dict[str, Any]:
    jwk = dict(kind.to_jwk(public, as_dict=True))
    if kid is not None:
        jwk["kid"] = kid
    return jwk


def _issuer(id: str, tenant: str, issuer: str, audience: str, algorithms: tuple[str, ...], **keys: Any) -> JwtIssuer:
    return JwtIssuer(
        id=id,
        tenant_id=tenant,
        issuer=issuer,
        audience=audience,
        algorithms=algorithms,
        jwks_json=json.dumps({"keys": keys.get("jwks", [])}),
        hs256_secret=keys.get("secret", b""),
    )


ISSUERS = (
    _issuer("i1", "a", ISS_A, "api-a", ("RS256",), jwks=[_jwk(RSA_KEY.public_key(), RSAAlgorithm, "rsa-1")]),
    # The same identity provider for another tenant, told apart by the audience.
    _issuer("i2", "b", ISS_A, "api-b", ("ES256",), jwks=[_jwk(EC_KEY.public_key(), ECAlgorithm, None)]),
    _issuer("i3", "c", "hs-issuer", "api-c", ("HS256",), secret=HS_SECRET),
    _issuer("i4", "c", "ed-issuer", "api-c", ("EdDSA",), jwks=[_jwk(ED_KEY.public_key(), OKPAlgorithm, "ed")]),
    # A tenant cannot pose as the gateway: an issuer named like it is never consulted.
    _issuer(
        "i5",
        "c",
        tokens.GATEWAY_ISSUER,
        tokens.GATEWAY_AUDIENCE,
        ("RS256",),
        jwks=[_jwk(OTHER_RSA_KEY.public_key(), RSAAlgorithm, "evil")],
    ),
)


def _claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {"iss": ISS_A, "aud": "api-a", "sub": "user-1", "iat": now, "exp": now + 300}
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def _rs256(claims: dict[str, Any] | None = None, key: Any = RSA_KEY, **headers: Any) -> str:
    return pyjwt.encode(claims or _claims(), key, algorithm="RS256", headers={"kid": "rsa-1", **headers})


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _forge(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    return ".".join((_b64(json.dumps(header).encode()), _b64(json.dumps(claims).encode()), _b64(signature)))


@pytest.fixture
def verifier() -> Verifier:
    return Verifier(ISSUERS, TENANTS, {}, ())


def _refused(verifier: Verifier, token: str) -> InvalidToken:
    with pytest.raises(InvalidToken) as exc_info:
        verifier.verify(token)
    exc = exc_info.value
    assert exc.status == 401 and exc.code == "invalid_token"
    assert exc.headers == (("WWW-Authenticate", 'Bearer realm="tenantgate", error="invalid_token"'),)
    return exc


# --- accepted ---


def test_rs256_token_names_its_issuers_tenant(verifier: Verifier) -> None:
    identity = verifier.verify(_rs256(_claims(scope="orders:read orders:write", tenant_id="b")))
    assert identity.tenant == A  # the issuer's tenant, whatever a claim says
    assert identity.scopes == {"orders:read", "orders:write"}
    assert identity.subject == "user-1" and identity.via_bearer


def test_same_issuer_other_audience_is_the_other_tenant(verifier: Verifier) -> None:
    token = pyjwt.encode(_claims(aud="api-b", scp=["a", "b"]), EC_KEY, algorithm="ES256")
    identity = verifier.verify(token)
    assert identity.tenant == B and identity.scopes == {"a", "b"}


def test_hs256_and_eddsa_issuers(verifier: Verifier) -> None:
    hs = pyjwt.encode(_claims(iss="hs-issuer", aud="api-c"), HS_SECRET, algorithm="HS256")
    ed = pyjwt.encode(_claims(iss="ed-issuer", aud="api-c"), ED_KEY, algorithm="EdDSA", headers={"kid": "ed"})
    assert verifier.verify(hs).tenant == C
    assert verifier.verify(ed).tenant == C


def test_audience_list_containing_the_issuers_audience(verifier: Verifier) -> None:
    assert verifier.verify(_rs256(_claims(aud=["other", "api-a"]))).tenant == A


def test_clock_skew_within_the_leeway_is_tolerated(verifier: Verifier) -> None:
    now = int(time.time())
    token = _rs256(_claims(iat=now + 10, nbf=now + 10, exp=now - 10))
    assert verifier.verify(token).tenant == A


# --- refused ---


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
def test_alg_none_is_refused(verifier: Verifier, alg: str) -> None:
    _refused(verifier, _forge({"alg": alg, "typ": "JWT", "kid": "rsa-1"}, _claims()))
    _refused(verifier, _forge({"alg": alg}, _claims(), b"anything"))


def test_rs256_public_key_used_as_hs256_secret_is_refused(verifier: Verifier) -> None:
    pem = RSA_KEY.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    header = {"alg": "HS256", "kid": "rsa-1", "typ": "JWT"}
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(_claims()).encode())}"
    signature = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
    exc = _refused(verifier, f"{signing_input}.{_b64(signature)}")
    assert "algorithm" in exc.message


@pytest.mark.parametrize(
    "kid", ["../../../../dev/null", "/etc/passwd", "rsa-1' OR '1'='1", "rsa-1\x00", "http://evil.example/key", ""]
)
def test_kid_is_only_an_index(verifier: Verifier, kid: str) -> None:
    # Signed with the right key even: a kid that names no key of the issuer finds nothing.
    _refused(verifier, _rs256(kid=kid))


def test_non_string_kid_is_refused(verifier: Verifier) -> None:
    assert "kid" in _refused(verifier, _forge({"alg": "RS256", "kid": ["rsa-1"]}, _claims(), b"sig")).message


@pytest.mark.parametrize("header", ["jku", "x5u"])
def test_key_urls_in_the_header_are_ignored(verifier: Verifier, header: str) -> None:
    token = _rs256(key=OTHER_RSA_KEY, **{header: "https://evil.example/jwks.json"})
    _refused(verifier, token)


def test_embedded_jwk_is_ignored(verifier: Verifier) -> None:
    evil = _jwk(OTHER_RSA_KEY.public_key(), RSAAlgorithm, "rsa-1")
    _refused(verifier, _rs256(key=OTHER_RSA_KEY, jwk=evil))


def test_crit_header_is_refused(verifier: Verifier) -> None:
    _refused(verifier, _rs256(crit=["exp"]))


def test_signed_by_another_key_is_refused(verifier: Verifier) -> None:
    assert "signature" in _refused(verifier, _rs256(key=OTHER_RSA_KEY)).message


def test_tampered_payload_is_refused(verifier: Verifier) -> None:
    header, _, signature = _rs256().split(".")
    tampered = _b64(json.dumps(_claims(sub="admin")).encode())
    _refused(verifier, f"{header}.{tampered}.{signature}")


def test_tampered_signature_is_refused(verifier: Verifier) -> None:
    token = _rs256()
    flipped = token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1]
    _refused(verifier, flipped)


def test_expired_token_is_refused(verifier: Verifier) -> None:
    now = int(time.time())
    assert "expired" in _refused(verifier, _rs256(_claims(iat=now - 600, exp=now - 60))).message


@pytest.mark.parametrize("claim", ["nbf", "iat"])
def test_token_from_the_future_is_refused(verifier: Verifier, claim: str) -> None:
    future = int(time.time()) + 120
    token = _rs256(_claims(**{claim: future, "exp": future + 300}))
    assert "not valid yet" in _refused(verifier, token).message


@pytest.mark.parametrize("claim", ["exp", "iat", "sub"])
def test_missing_required_claim_is_refused(verifier: Verifier, claim: str) -> None:
    assert claim in _refused(verifier, _rs256(_claims(**{claim: None}))).message


@pytest.mark.parametrize("claims", [_claims(iss=None), _claims(aud=None), _claims(aud=7), _claims(sub="")])
def test_missing_issuer_or_audience_is_refused(verifier: Verifier, claims: dict[str, Any]) -> None:
    _refused(verifier, _rs256(claims))


@pytest.mark.parametrize("iss", [ISS_A + "evil", ISS_A[:-1], "https://IDP.example.com/", "https://idp.example.com"])
def test_issuer_must_match_exactly(verifier: Verifier, iss: str) -> None:
    _refused(verifier, _rs256(_claims(iss=iss)))


@pytest.mark.parametrize("aud", ["api-a-evil", "API-A", "api", ["api-c"], []])
def test_wrong_audience_is_refused(verifier: Verifier, aud: object) -> None:
    _refused(verifier, _rs256(_claims(aud=aud)))


def test_audience_naming_two_tenants_is_refused(verifier: Verifier) -> None:
    token = pyjwt.encode(_claims(aud=["api-a", "api-b"]), EC_KEY, algorithm="ES256")
    assert "more than one tenant" in _refused(verifier, token).message


def test_algorithm_of_another_issuer_is_refused(verifier: Verifier) -> None:
    # Issuer A accepts only RS256: an ES256 token for its audience is refused, even signed by B's key.
    _refused(verifier, pyjwt.encode(_claims(), EC_KEY, algorithm="ES256"))


def test_oversized_token_is_refused_before_parsing(verifier: Verifier) -> None:
    token = _rs256(_claims(padding="x" * tokens.MAX_TOKEN_BYTES))
    assert "larger" in _refused(verifier, token).message


@pytest.mark.parametrize("token", ["", "a.b", "a.b.c.d", "...", "!!.!!.!!", _b64(b"[1]") + ".e30.e30", "eyJ.eyJ.sig"])
def test_malformed_tokens_are_refused(verifier: Verifier, token: str) -> None:
    _refused(verifier, token)


def test_tenant_issuer_cannot_pose_as_the_gateway(verifier: Verifier) -> None:
    claims = _claims(iss=tokens.GATEWAY_ISSUER, aud=tokens.GATEWAY_AUDIENCE, tenant_id="c")
    _refused(verifier, pyjwt.encode(claims, OTHER_RSA_KEY, algorithm="RS256", headers={"kid": "evil"}))


# --- the gateway's own tokens ---

GATEWAY_KEY = ec.generate_private_key(ec.SECP256R1())
CLIENT = OAuthClient("oc1", "b", "client-b", b"h" * 32, ("orders:read",))


def _signing_key(private: Any, kid: str) -> SigningKey:
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    return SigningKey(kid, "ES256", pem, json.dumps({**ECAlgorithm.to_jwk(private.public_key(), as_dict=True)}))


def _gateway_token(**overrides: Any) -> str:
    claims = _claims(
        iss=tokens.GATEWAY_ISSUER, aud=tokens.GATEWAY_AUDIENCE, sub="client-b", tenant_id="b", scope="orders:read admin"
    )
    claims.update(overrides)
    return pyjwt.encode(claims, GATEWAY_KEY, algorithm="ES256", headers={"kid": "gw-1"})


def _gateway_verifier(clients: dict[str, OAuthClient] | None = None) -> Verifier:
    clients = {"client-b": CLIENT} if clients is None else clients
    return Verifier(ISSUERS, TENANTS, clients, (_signing_key(GATEWAY_KEY, "gw-1"),))


def test_gateway_token_names_its_clients_tenant_and_no_more_than_its_scopes() -> None:
    identity = _gateway_verifier().verify(_gateway_token())
    assert identity.tenant == B
    assert identity.scopes == {"orders:read"}  # "admin" is not the client's to have


def test_gateway_token_of_a_revoked_client_is_refused() -> None:
    token = _gateway_token()
    assert _gateway_verifier().verify(token).tenant == B
    # Revocation: the next snapshot no longer holds the client.
    assert "revoked" in _refused(_gateway_verifier({}), token).message


def test_gateway_token_claiming_another_tenant_is_refused() -> None:
    _refused(_gateway_verifier(), _gateway_token(tenant_id="a"))


def test_gateway_token_needs_a_kid_of_a_live_signing_key() -> None:
    claims = _claims(iss=tokens.GATEWAY_ISSUER, aud=tokens.GATEWAY_AUDIENCE, sub="client-b", tenant_id="b")
    _refused(_gateway_verifier(), pyjwt.encode(claims, GATEWAY_KEY, algorithm="ES256"))
    _refused(_gateway_verifier(), pyjwt.encode(claims, GATEWAY_KEY, algorithm="ES256", headers={"kid": "gw-2"}))


# --- the cache ---


class _CountingDecode:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        real: Callable[..., Any] = pyjwt.decode

        def counting(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(tokens.pyjwt, "decode", counting)


def test_verified_token_is_cached_until_it_expires(monkeypatch: pytest.MonkeyPatch) -> None:
    decode = _CountingDecode(monkeypatch)
    now = [time.time()]
    verifier = Verifier(ISSUERS, TENANTS, {}, (), clock=lambda: now[0])
    token = _rs256(_claims(exp=int(now[0]) + 60))

    first = verifier.verify(token)
    again = verifier.verify(token)
    assert again is first and decode.calls == 1

    now[0] += 61  # past exp: verified afresh (and accepted here only thanks to the leeway)
    verifier.verify(token)
    assert decode.calls == 2


def test_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    decode = _CountingDecode(monkeypatch)
    verifier = Verifier(ISSUERS, TENANTS, {}, (), cache_size=2)
    first, second, third = (_rs256(_claims(sub=f"user-{n}")) for n in range(3))
    for token in (first, second, third):
        verifier.verify(token)
    verifier.verify(third)
    assert decode.calls == 3  # the newest is still cached
    verifier.verify(first)
    assert decode.calls == 4  # the oldest was dropped


def test_refused_tokens_are_not_cached(monkeypatch: pytest.MonkeyPatch, verifier: Verifier) -> None:
    decode = _CountingDecode(monkeypatch)
    token = _rs256(key=OTHER_RSA_KEY)
    for _ in range(2):
        _refused(verifier, token)
    assert decode.calls == 2


def test_a_new_snapshot_without_the_issuer_refuses_its_cached_tokens(verifier: Verifier) -> None:
    token = _rs256()
    assert verifier.verify(token).tenant == A
    next_snapshot = Verifier(ISSUERS[1:], TENANTS, {}, ())
    _refused(next_snapshot, token)


def test_the_control_plane_refuses_tenant_issuers_named_like_the_gateway() -> None:
    from control_plane.api.issuers import RESERVED_ISSUERS, check_issuer

    assert tokens.GATEWAY_ISSUER in RESERVED_ISSUERS
    with pytest.raises(ValueError, match="gateway"):
        check_issuer(tokens.GATEWAY_ISSUER)


@pytest.mark.parametrize(
    ("claims", "scopes"),
    [
        ({"scope": "a b  c"}, {"a", "b", "c"}),
        ({"scp": ["a", "b", 3]}, {"a", "b"}),
        ({"scp": "a b"}, {"a", "b"}),
        ({"scope": ["a"]}, {"a"}),
        ({"scope": "a", "scp": ["b"]}, {"a"}),
        ({}, set()),
    ],
)
def test_scopes_from_scope_or_scp(verifier: Verifier, claims: dict[str, Any], scopes: set[str]) -> None:
    assert verifier.verify(_rs256(_claims(**claims))).scopes == scopes

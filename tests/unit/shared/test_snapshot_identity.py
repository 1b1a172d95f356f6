"""shared.snapshot, identity part: JWT issuers, OAuth clients and signing keys survive the wire
and a snapshot with a bad one is refused whole.

One valid snapshot, and one bad-snapshot builder per validation failure.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest

from shared import snapshot as model
from shared._generated.tenantgate.v1 import snapshot_pb2 as pb
from shared.errors import InvalidSnapshot
from shared.snapshot import JwtIssuer, OAuthClient, SigningKey, Snapshot, Tenant

pytestmark = pytest.mark.unit

SECRET = b"s" * 32
PEM = "-----BEGIN PRIVATE KEY-----\nMIGH\n-----END PRIVATE KEY-----\n"
JWKS = json.dumps({"keys": [{"kty": "RSA", "n": "abc", "e": "AQAB", "kid": "k1"}]})
TENANT = Tenant("t1", "Acme", "premium", 1000, 50_000, 0, 0, True)


def _issuer(id: str = "i1", **overrides: object) -> JwtIssuer:
    values: dict[str, object] = dict(
        id=id,
        tenant_id="t1",
        issuer=f"https://{id}.example.com/",
        audience="api",
        algorithms=("RS256",),
        jwks_json=JWKS,
    )
    values.update(overrides)
    return JwtIssuer(**values)  # type: ignore[arg-type]


def _client(id: str = "c1", **overrides: object) -> OAuthClient:
    values: dict[str, object] = dict(
        id=id, tenant_id="t1", client_id=f"tgc_{id}", secret_hash=hashlib.sha256(id.encode()).digest(), scopes=("a:b",)
    )
    values.update(overrides)
    return OAuthClient(**values)  # type: ignore[arg-type]


def _signing_key(**overrides: object) -> SigningKey:
    values: dict[str, object] = dict(kid="kid1", algorithm="ES256", private_key_pem=PEM, public_jwk_json='{"kty":"EC"}')
    values.update(overrides)
    return SigningKey(**values)  # type: ignore[arg-type]


def _snapshot(**overrides: object) -> Snapshot:
    values: dict[str, object] = dict(
        version=3,
        built_at_ms=1,
        tenants=(TENANT,),
        api_keys=(),
        routes=(),
        jwt_issuers=(
            _issuer("i1"),
            _issuer("i2", algorithms=("HS256",), jwks_json='{"keys":[]}', hs256_secret=SECRET),
            _issuer("i3", algorithms=("ES256", "ES384", "EdDSA", "PS256")),
        ),
        oauth_clients=(_client("c1"), _client("c2", scopes=())),
        signing_keys=(_signing_key(),),
    )
    values.update(overrides)
    return Snapshot(**values)  # type: ignore[arg-type]


def _round_trip(snap: Snapshot) -> Snapshot:
    msg = pb.Snapshot()
    msg.ParseFromString(model.to_proto(snap).SerializeToString())
    return model.from_proto(msg)


def _assert_invalid(snap: Snapshot, message: str) -> None:
    with pytest.raises(InvalidSnapshot) as exc_info:
        _round_trip(snap)
    assert str(exc_info.value) == message


def test_round_trip_through_proto_is_lossless() -> None:
    snap = _snapshot()
    assert _round_trip(snap) == snap


def test_identity_defaults_to_none_for_snapshots_built_without_it() -> None:
    snap = Snapshot(version=1, built_at_ms=0, tenants=(), api_keys=(), routes=())
    assert (snap.jwt_issuers, snap.oauth_clients, snap.signing_keys) == ((), (), ())
    assert _round_trip(snap) == snap


def test_repr_never_shows_secrets() -> None:
    text = repr(_snapshot())
    assert SECRET.decode() not in text and "PRIVATE KEY" not in text
    assert hashlib.sha256(b"c1").digest().hex() not in text and repr(hashlib.sha256(b"c1").digest()) not in text


# --- one bad snapshot per failure ---


def test_duplicate_issuer_id_is_refused() -> None:
    _assert_invalid(
        _snapshot(jwt_issuers=(_issuer("i1"), _issuer("i1", issuer="x"))), "jwt issuer id 'i1' is empty or duplicated"
    )


def test_issuer_of_unknown_tenant_is_refused() -> None:
    _assert_invalid(_snapshot(jwt_issuers=(_issuer(tenant_id="t9"),)), "jwt issuer i1: unknown tenant 't9'")


def test_same_issuer_twice_for_one_tenant_is_refused() -> None:
    _assert_invalid(
        _snapshot(jwt_issuers=(_issuer("i1", issuer="x"), _issuer("i2", issuer="x"))),
        "jwt issuer i2: issuer must be 1..512 chars, unique per tenant",
    )


def test_empty_audience_is_refused() -> None:
    _assert_invalid(_snapshot(jwt_issuers=(_issuer(audience=""),)), "jwt issuer i1: audience must not be empty")


def test_alg_none_is_refused() -> None:
    _assert_invalid(
        _snapshot(jwt_issuers=(_issuer(algorithms=("none",)),)),
        "jwt issuer i1: algorithms 'none' is never accepted: tokens must be signed",
    )


def test_hs256_mixed_with_rs256_is_refused() -> None:
    _assert_invalid(
        _snapshot(jwt_issuers=(_issuer(algorithms=("HS256", "RS256"), hs256_secret=SECRET),)),
        "jwt issuer i1: algorithms must not mix HS256 with asymmetric algorithms",
    )


def test_hs256_with_short_secret_is_refused() -> None:
    _assert_invalid(
        _snapshot(jwt_issuers=(_issuer(algorithms=("HS256",), hs256_secret=b"short"),)),
        "jwt issuer i1: HS256 needs a secret of 32+ bytes",
    )


def test_secret_on_asymmetric_issuer_is_refused() -> None:
    _assert_invalid(
        _snapshot(jwt_issuers=(_issuer(hs256_secret=SECRET),)), "jwt issuer i1: hs256_secret is only for HS256"
    )


@pytest.mark.parametrize(
    ("jwks_json", "message"),
    [
        ("{", "jwks_json is not JSON"),
        ("[]", "jwks_json is not a JSON object"),
        ('{"keys": {}}', "jwks_json must hold a list of at most 100 keys"),
        (json.dumps({"keys": [{"kty": "RSA"}] * 101}), "jwks_json must hold a list of at most 100 keys"),
        ('{"keys": [{"n": "x"}]}', "jwks_json: every key must be an object with a kty"),
    ],
    ids=["not_json", "not_an_object", "keys_not_a_list", "too_many_keys", "key_without_kty"],
)
def test_bad_jwks_json_is_refused(jwks_json: str, message: str) -> None:
    _assert_invalid(_snapshot(jwt_issuers=(_issuer(jwks_json=jwks_json),)), f"jwt issuer i1: {message}")


def test_client_of_unknown_tenant_is_refused() -> None:
    _assert_invalid(_snapshot(oauth_clients=(_client(tenant_id="t9"),)), "oauth client c1: unknown tenant 't9'")


def test_duplicate_client_id_is_refused() -> None:
    _assert_invalid(
        _snapshot(oauth_clients=(_client("c1"), _client("c2", client_id="tgc_c1"))),
        "oauth client c2: client_id is empty or duplicated",
    )


def test_client_secret_hash_of_wrong_length_is_refused() -> None:
    _assert_invalid(
        _snapshot(oauth_clients=(_client(secret_hash=b"x" * 31),)), "oauth client c1: secret hash must be 32 bytes"
    )


def test_client_with_bad_scope_is_refused() -> None:
    _assert_invalid(
        _snapshot(oauth_clients=(_client(scopes=("a b",)),)),
        "oauth client c1: scope 'a b' must be 1..64 characters of A-Z a-z 0-9 : . _ -",
    )


def test_client_with_too_many_scopes_is_refused() -> None:
    scopes = tuple(f"s{i}" for i in range(51))
    _assert_invalid(_snapshot(oauth_clients=(_client(scopes=scopes),)), "oauth client c1: at most 50 scopes")


def test_duplicate_signing_key_is_refused() -> None:
    _assert_invalid(
        _snapshot(signing_keys=(_signing_key(), _signing_key())), "signing key kid 'kid1' is empty or duplicated"
    )


def test_signing_key_with_unknown_algorithm_is_refused() -> None:
    _assert_invalid(
        _snapshot(signing_keys=(_signing_key(algorithm="RS256"),)), "signing key kid1: unknown algorithm 'RS256'"
    )


def test_signing_key_without_pkcs8_pem_is_refused() -> None:
    _assert_invalid(
        _snapshot(signing_keys=(_signing_key(private_key_pem="nope"),)),
        "signing key kid1: private_key_pem must be a PKCS#8 PEM",
    )


def test_signing_key_with_bad_public_jwk_is_refused() -> None:
    _assert_invalid(
        _snapshot(signing_keys=(_signing_key(public_jwk_json="[]"),)),
        "signing key kid1: public_jwk_json is not a JSON object",
    )


def test_a_bad_identity_entry_refuses_the_whole_snapshot() -> None:
    good = _snapshot()
    bad = dataclasses.replace(good, jwt_issuers=(*good.jwt_issuers, _issuer("i9", tenant_id="nobody")))
    with pytest.raises(InvalidSnapshot):
        _round_trip(bad)

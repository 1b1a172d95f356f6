"""control_plane.api.issuers: what a JWT issuer may look like, and which key source fits which algorithms."""

from __future__ import annotations

from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import RSAAlgorithm
from pydantic import ValidationError

from control_plane.api.issuers import IssuerCreate, check_algorithms, check_issuer, new_issuer
from control_plane.errors import Unprocessable

pytestmark = pytest.mark.unit

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_JWK = {**RSAAlgorithm.to_jwk(RSA_KEY.public_key(), as_dict=True), "kid": "k1"}
EC_PEM = (
    ec.generate_private_key(ec.SECP256R1())
    .public_key()
    .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    .decode()
)
SECRET = "s" * 32


def _body(**fields: Any) -> IssuerCreate:
    values: dict[str, Any] = {"issuer": "https://auth.example.com/", "audience": "api", "algorithms": ["RS256"]}
    values.update(fields)
    return IssuerCreate(**{k: v for k, v in values.items() if v is not None})


def _refusal(body: IssuerCreate) -> str:
    with pytest.raises(Unprocessable) as exc_info:
        new_issuer(body)
    return exc_info.value.message


# --- issuer ---


@pytest.mark.parametrize(
    "issuer",
    [
        "https://auth.example.com/",
        "https://login.example.com/tenant/v2.0",
        "acme-auth",
        "http://localhost:8080/realms/x",
    ],
)
def test_accepted_issuer(issuer: str) -> None:
    assert check_issuer(issuer) == issuer


@pytest.mark.parametrize(
    ("issuer", "message"),
    [
        ("http://auth.example.com/", "a URL issuer must be https"),
        ("ftp://auth.example.com/", "a URL issuer must be https"),
        (" padded", "must be printable text without leading or trailing space"),
        ("tab\there", "must be printable text"),
        ("https://[bad/", "is not a valid URL"),
    ],
    ids=["http_remote", "ftp", "padded", "control_character", "broken_url"],
)
def test_refused_issuer(issuer: str, message: str) -> None:
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(")):
        check_issuer(issuer)


def test_issuer_longer_than_512_is_refused() -> None:
    with pytest.raises(ValidationError, match="at most 512 characters"):
        _body(issuer="x" * 513, jwks={"keys": [RSA_JWK]})


# --- algorithms ---


def test_algorithms_are_deduplicated_in_order() -> None:
    assert check_algorithms(["RS256", "PS256", "RS256"]) == ["RS256", "PS256"]


@pytest.mark.parametrize(
    ("algorithms", "message"),
    [
        ([], "must name at least one algorithm"),
        (["none"], "'none' is never accepted"),
        (["RS256", "NONE"], "'none' is never accepted"),
        (["HS256", "RS256"], "must not mix HS256 with asymmetric algorithms"),
        (["HS384"], "unknown ['HS384']"),
        (["rs256"], "unknown ['rs256']"),
    ],
    ids=["empty", "none", "none_upper_case", "hs_with_rs", "hs384", "lower_case"],
)
def test_refused_algorithms(algorithms: list[str], message: str) -> None:
    with pytest.raises(ValueError) as exc_info:
        check_algorithms(algorithms)
    assert str(exc_info.value).startswith(message)


# --- key source ---


def test_each_key_source_makes_an_issuer_with_only_that_source() -> None:
    inline = new_issuer(_body(jwks={"keys": [RSA_JWK]}))
    uri = new_issuer(_body(jwks_uri="https://auth.example.com/jwks"))
    pem = new_issuer(_body(algorithms=["ES256"], public_key_pem=EC_PEM))
    secret = new_issuer(_body(algorithms=["HS256"], hs256_secret=SECRET))

    assert inline.jwks == {"keys": [RSA_JWK]} and inline.jwks_uri is None
    assert uri.jwks_uri == "https://auth.example.com/jwks" and uri.jwks is None
    assert pem.public_key_pem == EC_PEM and pem.algorithms == ("ES256",)
    assert secret.hs256_secret == SECRET.encode() and secret.public_key_pem is None


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({}, "jwks: give one key source"),
        ({"jwks": {"keys": [RSA_JWK]}, "jwks_uri": "https://a/j"}, "jwks_uri: give exactly one key source"),
        ({"algorithms": ["HS256"], "hs256_secret": "s" * 31}, "hs256_secret: must be at least 32 bytes"),
        ({"hs256_secret": SECRET}, 'hs256_secret: is only for algorithms ["HS256"]'),
        ({"algorithms": ["HS256"], "jwks": {"keys": [RSA_JWK]}}, "algorithms: HS256 needs hs256_secret"),
        ({"jwks": {"keys": []}}, "jwks: must hold 1..100 keys"),
        ({"jwks": {"keys": [{**RSA_JWK, "d": "x"}]}}, "jwks: keys[0] holds private key members"),
        ({"jwks_uri": "http://example.com/jwks"}, "jwks_uri: must be https"),
        ({"jwks_uri": "https://169.254.169.254/jwks"}, "jwks_uri: link-local and metadata addresses"),
        ({"public_key_pem": EC_PEM}, "public_key_pem: an EC secp256r1 key does not fit the algorithms ['RS256']"),
        ({"public_key_pem": "nope"}, "public_key_pem: is not a PEM public key"),
    ],
    ids=[
        "no_source",
        "two_sources",
        "short_secret",
        "secret_for_rs256",
        "hs256_without_secret",
        "empty_jwks",
        "private_jwk",
        "http_jwks_uri",
        "metadata_jwks_uri",
        "pem_of_wrong_type",
        "garbage_pem",
    ],
)
def test_key_source_that_does_not_fit_is_refused_naming_the_field(fields: dict[str, Any], message: str) -> None:
    assert _refusal(_body(**fields)).startswith(message)


def test_secret_length_counts_utf8_bytes() -> None:
    eleven_three_byte_chars = "€" * 11  # 33 bytes
    assert new_issuer(_body(algorithms=["HS256"], hs256_secret=eleven_three_byte_chars)).hs256_secret


def test_unknown_field_and_wrong_types_are_refused() -> None:
    with pytest.raises(ValidationError, match="extra"):
        _body(jwks={"keys": [RSA_JWK]}, extra=1)
    with pytest.raises(ValidationError, match="jwks"):
        _body(jwks=[RSA_JWK])
    with pytest.raises(ValidationError, match="algorithms"):
        _body(algorithms="RS256", jwks={"keys": [RSA_JWK]})

"""control_plane.jwks: which keys an issuer may hold, where they may be fetched from, and the fetch."""

from __future__ import annotations

import datetime
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from control_plane import jwks

pytestmark = pytest.mark.unit

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
ED_KEY = ed25519.Ed25519PrivateKey.generate()


def _pem(public: Any) -> str:
    text: str = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    return text


def _rsa_jwk(**extra: Any) -> dict[str, Any]:
    return {**RSAAlgorithm.to_jwk(RSA_KEY.public_key(), as_dict=True), **extra}


def _ec_jwk(**extra: Any) -> dict[str, Any]:
    return {**ECAlgorithm.to_jwk(EC_KEY.public_key(), as_dict=True), **extra}


# --- single keys ---


def test_public_rsa_jwk_fits_rs256() -> None:
    jwk = _rsa_jwk(kid="k1", use="sig")
    assert jwks.check_jwk(jwk, ["RS256"]) is jwk


def test_ed25519_jwk_without_alg_fits_eddsa() -> None:
    assert jwks.check_jwk(OKPAlgorithm.to_jwk(ED_KEY.public_key(), as_dict=True), ["EdDSA"])


@pytest.mark.parametrize(
    ("jwk", "algorithms", "message"),
    [
        ([], ["RS256"], "must be a JSON object"),
        ({"n": "x"}, ["RS256"], "needs a kty"),
        ({"kty": "oct", "k": "c2VjcmV0"}, ["RS256"], "symmetric (oct) keys are not accepted"),
        (_rsa_jwk(d="AQAB"), ["RS256"], "holds private key members ['d']"),
        (_rsa_jwk(use="enc"), ["RS256"], 'use must be "sig"'),
        (_rsa_jwk(kid=""), ["RS256"], "kid must be a string"),
        (_rsa_jwk(alg="RS512"), ["RS256"], "alg 'RS512' is not one of the issuer's algorithms"),
        ({"kty": "RSA", "n": "!!", "e": "AQAB"}, ["RS256"], "is not a usable JWK"),
        (_ec_jwk(), ["RS256"], "an EC secp256r1 key fits none of the algorithms ['RS256']"),
        (_ec_jwk(), ["ES384"], "fits none of the algorithms ['ES384']"),
        (_rsa_jwk(), ["ES256"], "an RSA-2048 key fits none"),
    ],
    ids=[
        "not_an_object",
        "no_kty",
        "symmetric",
        "private_member",
        "encryption_key",
        "empty_kid",
        "alg_not_listed",
        "garbage_modulus",
        "ec_key_for_rs256",
        "p256_key_for_es384",
        "rsa_key_for_es256",
    ],
)
def test_unusable_jwk_is_refused_saying_why(jwk: Any, algorithms: list[str], message: str) -> None:
    with pytest.raises(ValueError) as exc_info:
        jwks.check_jwk(jwk, algorithms)
    assert message in str(exc_info.value)


def test_small_rsa_key_is_refused() -> None:
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()  # noqa: S505 - the point
    with pytest.raises(ValueError, match="at least 2048 bits"):
        jwks.check_jwk(RSAAlgorithm.to_jwk(small, as_dict=True), ["RS256"])


# --- key sets ---


def test_inline_jwks_returns_only_the_keys_member() -> None:
    assert jwks.check_jwks({"keys": [_rsa_jwk(kid="a")], "other": 1}, ["RS256"]) == {"keys": [_rsa_jwk(kid="a")]}


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ([], 'must be a JWKS object: {"keys": [...]}'),
        ({"keys": {}}, 'must be a JWKS object: {"keys": [...]}'),
        ({"keys": []}, "must hold 1..100 keys, not 0"),
        ({"keys": [_rsa_jwk()] * 101}, "must hold 1..100 keys, not 101"),
        ({"keys": [_rsa_jwk(kid="a"), _rsa_jwk(kid="a")]}, "keys[1] repeats kid 'a'"),
        ({"keys": [_rsa_jwk(), {"kty": "oct", "k": "x"}]}, "keys[1] symmetric (oct) keys are not accepted"),
    ],
    ids=["not_an_object", "keys_not_a_list", "empty", "too_many", "repeated_kid", "one_bad_key"],
)
def test_bad_inline_jwks_is_refused(value: Any, message: str) -> None:
    with pytest.raises(ValueError) as exc_info:
        jwks.check_jwks(value, ["RS256"])
    assert str(exc_info.value).startswith(message)


def test_fetched_jwks_keeps_only_usable_keys() -> None:
    fetched = {"keys": [_ec_jwk(kid="e"), {"kty": "oct", "k": "x"}, _rsa_jwk(kid="r"), _rsa_jwk(kid="r"), 7]}
    assert jwks.usable_keys(fetched, ["RS256"]) == {"keys": [_rsa_jwk(kid="r")]}


def test_fetched_jwks_without_a_usable_key_is_an_error() -> None:
    with pytest.raises(ValueError, match="none of its 1 keys fits the algorithms"):
        jwks.usable_keys({"keys": [_ec_jwk()]}, ["RS256"])


# --- PEM keys ---


def test_pem_key_must_fit_every_algorithm() -> None:
    jwks.check_public_key_pem(_pem(RSA_KEY.public_key()), ["RS256", "PS256"])
    jwks.check_public_key_pem(_pem(EC_KEY.public_key()), ["ES256"])
    jwks.check_public_key_pem(_pem(ED_KEY.public_key()), ["EdDSA"])
    with pytest.raises(ValueError, match=r"an RSA-2048 key does not fit the algorithms \['ES256'\]"):
        jwks.check_public_key_pem(_pem(RSA_KEY.public_key()), ["RS256", "ES256"])


def test_certificate_pem_is_accepted() -> None:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "idp")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(EC_KEY.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(EC_KEY, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    jwks.check_public_key_pem(pem, ["ES256"])


@pytest.mark.parametrize(
    ("pem", "message"),
    [
        ("hello", "is not a PEM public key or certificate"),
        (
            RSA_KEY.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ).decode(),
            "is a private key; give the public key",
        ),
    ],
    ids=["garbage", "private_key"],
)
def test_bad_pem_is_refused(pem: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        jwks.check_public_key_pem(pem, ["RS256"])


def test_pem_converts_to_a_jwks_of_the_same_key_without_kid() -> None:
    document = json.loads(jwks.pem_to_jwks_json(_pem(EC_KEY.public_key())))
    [key] = document["keys"]
    assert "kid" not in key and key["use"] == "sig"
    assert jwt.PyJWK(key).key.public_numbers() == EC_KEY.public_key().public_numbers()


def test_thumbprint_matches_rfc_7638_example() -> None:
    jwk = {
        "kty": "RSA",
        "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECP"
        "ebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368"
        "QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2"
        "NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
        "e": "AQAB",
        "alg": "RS256",
        "kid": "2011-04-29",
    }
    assert jwks.thumbprint(jwk) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


# --- where keys may come from ---


@pytest.mark.parametrize(
    "url",
    [
        "https://auth.example.com/.well-known/jwks.json",
        "https://10.1.2.3/jwks?tenant=a",
        "http://127.0.0.1:8080/jwks",
        "http://localhost/jwks",
        "http://[::1]:9000/jwks",
    ],
)
def test_allowed_jwks_uri(url: str) -> None:
    jwks.check_jwks_uri(url)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://auth.example.com/jwks", "must be an https URL"),
        ("http://auth.example.com/jwks", "must be https (http only for loopback hosts)"),
        ("https:///jwks", "must name a host"),
        ("https://user:pw@auth.example.com/jwks", "must not carry credentials"),
        ("https://auth.example.com/jwks#x", "must not have a fragment"),
        ("https://auth.example.com:99999/jwks", "is not a valid URL"),
        ("http://169.254.169.254/latest/meta-data", "link-local and metadata addresses are not allowed"),
        ("https://[fe80::1]/jwks", "link-local and metadata addresses are not allowed"),
        ("https://[::ffff:169.254.169.254]/jwks", "link-local and metadata addresses are not allowed"),
        ("https://metadata.google.internal/jwks", "link-local and metadata addresses are not allowed"),
        ("https://0.0.0.0/jwks", "link-local and metadata addresses are not allowed"),
    ],
    ids=[
        "ftp",
        "http_remote",
        "no_host",
        "credentials",
        "fragment",
        "bad_port",
        "aws_metadata",
        "ipv6_link_local",
        "mapped_link_local",
        "gcp_metadata",
        "unspecified",
    ],
)
def test_refused_jwks_uri(url: str, message: str) -> None:
    with pytest.raises(ValueError) as exc_info:
        jwks.check_jwks_uri(url)
    assert str(exc_info.value).startswith(message)


# --- fetching ---


@pytest.fixture
async def idp() -> AsyncIterator[tuple[str, dict[str, web.StreamResponse]]]:
    """A local identity provider: ``responses[path]`` is what it answers on ``path``."""
    responses: dict[str, web.StreamResponse] = {}

    async def handle(request: web.Request) -> web.StreamResponse:
        return responses[request.path]

    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}", responses
    finally:
        await runner.cleanup()


async def test_fetch_keeps_the_usable_keys(idp: tuple[str, dict[str, web.StreamResponse]]) -> None:
    base, responses = idp
    responses["/jwks"] = web.json_response({"keys": [_rsa_jwk(kid="r"), _ec_jwk(kid="e")]})
    async with jwks.new_session() as session:
        assert await jwks.fetch_jwks(session, base + "/jwks", ["ES256"]) == {"keys": [_ec_jwk(kid="e")]}


@pytest.mark.parametrize(
    ("response", "message"),
    [
        (web.Response(status=503), "HTTP 503 from jwks_uri"),
        (web.Response(status=302, headers={"Location": "/elsewhere"}), "(redirects are not followed)"),
        (web.Response(body=b"x" * (jwks.MAX_JWKS_BYTES + 1)), "the JWKS is larger than 262144 bytes"),
        (web.Response(text="<html>"), "the jwks_uri response is not JSON"),
        (web.json_response({"keys": [{"kty": "oct", "k": "x"}]}), "the JWKS none of its 1 keys fits"),
        (web.json_response(["not", "a", "jwks"]), "the JWKS must be a JWKS object"),
    ],
    ids=["server_error", "redirect", "too_large", "not_json", "no_usable_key", "not_a_jwks"],
)
async def test_fetch_failure_says_why(
    idp: tuple[str, dict[str, web.StreamResponse]], response: web.StreamResponse, message: str
) -> None:
    base, responses = idp
    responses["/jwks"] = response
    async with jwks.new_session() as session:
        with pytest.raises(jwks.JwksFetchError) as exc_info:
            await jwks.fetch_jwks(session, base + "/jwks", ["RS256"])
    assert message in str(exc_info.value)


async def test_fetch_of_oversized_chunked_body_stops_at_the_cap(
    idp: tuple[str, dict[str, web.StreamResponse]],
) -> None:
    base, responses = idp

    class Endless(web.StreamResponse):
        async def prepare(self, request: web.BaseRequest) -> Any:
            writer = await super().prepare(request)
            for _ in range(64):
                await self.write(b"x" * 16384)
            await self.write_eof()
            return writer

    responses["/jwks"] = Endless()
    async with jwks.new_session() as session:
        with pytest.raises(jwks.JwksFetchError, match="larger than"):
            await jwks.fetch_jwks(session, base + "/jwks", ["RS256"])


async def test_fetch_of_link_local_uri_never_connects() -> None:
    async with jwks.new_session() as session:
        with pytest.raises(jwks.JwksFetchError, match="link-local"):
            await jwks.fetch_jwks(session, "http://169.254.169.254/jwks", ["RS256"])


async def test_fetch_that_cannot_connect_is_an_error() -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        with pytest.raises(jwks.JwksFetchError, match="cannot fetch jwks_uri"):
            await jwks.fetch_jwks(session, "http://127.0.0.1:1/jwks", ["RS256"])

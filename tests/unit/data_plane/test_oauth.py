"""data_plane.auth.oauth: the client credentials grant, its RFC 6749 errors, and the JWKS."""

from __future__ import annotations

import base64
import json
from typing import Any

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from data_plane.auth import jwt as tokens
from data_plane.auth.jwt import Verifier
from data_plane.auth.oauth import OAuthError, TokenService, parse_basic, parse_form
from shared import keys
from shared.snapshot import OAuthClient, SigningKey, Tenant

pytestmark = pytest.mark.unit

NOW = 1_800_000_000
SECRET = "tgcs_the-client-secret"
ACTIVE = Tenant("t1", "T1", "basic", 60, 1000, 0, 0, True)
INACTIVE = Tenant("t2", "T2", "basic", 60, 1000, 0, 0, False)
CLIENT = OAuthClient("o1", "t1", "tgc_one", keys.hash_key(SECRET), ("orders:read", "orders:write"))
SLEEPER = OAuthClient("o2", "t2", "tgc_two", keys.hash_key(SECRET + "2"), ("a",))
CLIENTS = {c.client_id: c for c in (CLIENT, SLEEPER)}
TENANTS = {t.id: t for t in (ACTIVE, INACTIVE)}


def _signing_key(kid: str) -> tuple[SigningKey, ec.EllipticCurvePrivateKey]:
    private = ec.generate_private_key(ec.SECP256R1())
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    public = {**ECAlgorithm.to_jwk(private.public_key(), as_dict=True), "kid": kid, "alg": "ES256", "use": "sig"}
    return SigningKey(kid, "ES256", pem, json.dumps(public)), private


OLD, _ = _signing_key("old")
CURRENT, CURRENT_PRIVATE = _signing_key("current")


@pytest.fixture
def service() -> TokenService:
    return TokenService(CLIENTS, TENANTS, (OLD, CURRENT), clock=lambda: NOW)


def _grant(service: TokenService, form: dict[str, str], basic: tuple[str, str] | None = None) -> dict[str, Any]:
    return service.grant(form, basic)


def _error(service: TokenService, form: dict[str, str], basic: tuple[str, str] | None = None) -> OAuthError:
    with pytest.raises(OAuthError) as exc_info:
        service.grant(form, basic)
    return exc_info.value


BODY_AUTH = {"grant_type": "client_credentials", "client_id": "tgc_one", "client_secret": SECRET}


def test_token_is_an_es256_jwt_of_the_current_key_for_the_clients_tenant(service: TokenService) -> None:
    result = _grant(service, BODY_AUTH)
    assert result["token_type"] == "Bearer"
    assert result["expires_in"] == 3600
    assert result["scope"] == "orders:read orders:write"  # all the client's scopes by default
    header = pyjwt.get_unverified_header(result["access_token"])
    assert header["alg"] == "ES256" and header["kid"] == "current" and header["typ"] == "at+jwt"
    claims = pyjwt.decode(
        result["access_token"],
        CURRENT_PRIVATE.public_key(),
        algorithms=["ES256"],
        audience=tokens.GATEWAY_AUDIENCE,
        options={"verify_exp": False, "verify_iat": False, "verify_nbf": False},
    )
    assert claims["iss"] == tokens.GATEWAY_ISSUER
    assert claims["sub"] == claims["client_id"] == "tgc_one"
    assert claims["tenant_id"] == "t1"
    assert (claims["iat"], claims["exp"]) == (NOW, NOW + 3600)


def test_token_verifies_on_a_data_plane_of_the_same_snapshot() -> None:
    service = TokenService(CLIENTS, TENANTS, (OLD, CURRENT))
    token = _grant(service, {**BODY_AUTH, "scope": "orders:read"})["access_token"]
    identity = Verifier((), TENANTS, CLIENTS, (OLD, CURRENT)).verify(token)
    assert identity.tenant == ACTIVE and identity.scopes == {"orders:read"}
    # After rotation the previous key is still published, so its tokens keep working.
    newer, _ = _signing_key("newer")
    assert Verifier((), TENANTS, CLIENTS, (CURRENT, newer)).verify(token).tenant == ACTIVE


def test_basic_authentication(service: TokenService) -> None:
    result = _grant(service, {"grant_type": "client_credentials"}, ("tgc_one", SECRET))
    assert result["scope"] == "orders:read orders:write"


def test_requested_scope_subset(service: TokenService) -> None:
    assert _grant(service, {**BODY_AUTH, "scope": "orders:write"})["scope"] == "orders:write"


@pytest.mark.parametrize("scope", ["admin", "orders:read admin", "orders:*", "orders:read  orders:write"])
def test_scope_beyond_the_clients_is_invalid_scope(service: TokenService, scope: str) -> None:
    exc = _error(service, {**BODY_AUTH, "scope": scope})
    assert (exc.error, exc.status) == ("invalid_scope", 400)


@pytest.mark.parametrize(
    ("form", "basic"),
    [
        ({**BODY_AUTH, "client_secret": SECRET + "x"}, None),
        ({**BODY_AUTH, "client_secret": SECRET.upper()}, None),
        ({**BODY_AUTH, "client_id": "tgc_nobody"}, None),
        ({"grant_type": "client_credentials", "client_id": "tgc_one"}, None),
        ({"grant_type": "client_credentials"}, None),
        ({"grant_type": "client_credentials"}, ("tgc_one", "wrong")),
        # The stored hash is not the secret.
        ({**BODY_AUTH, "client_secret": keys.hash_key(SECRET).hex()}, None),
    ],
)
def test_failed_client_authentication_is_invalid_client(
    service: TokenService, form: dict[str, str], basic: tuple[str, str] | None
) -> None:
    exc = _error(service, form, basic)
    assert (exc.error, exc.status) == ("invalid_client", 401)


def test_basic_and_body_secret_together_is_invalid_request(service: TokenService) -> None:
    exc = _error(service, BODY_AUTH, ("tgc_one", SECRET))
    assert (exc.error, exc.status) == ("invalid_request", 400)


def test_body_client_id_other_than_basic_is_invalid_request(service: TokenService) -> None:
    exc = _error(service, {"grant_type": "client_credentials", "client_id": "tgc_two"}, ("tgc_one", SECRET))
    assert exc.error == "invalid_request"


@pytest.mark.parametrize("grant", ["password", "authorization_code", "refresh_token", "CLIENT_CREDENTIALS"])
def test_other_grant_types_are_unsupported(service: TokenService, grant: str) -> None:
    assert _error(service, {**BODY_AUTH, "grant_type": grant}).error == "unsupported_grant_type"


def test_missing_grant_type_is_invalid_request(service: TokenService) -> None:
    assert _error(service, {"client_id": "tgc_one", "client_secret": SECRET}).error == "invalid_request"


def test_client_of_an_inactive_tenant_is_unauthorized(service: TokenService) -> None:
    form = {"grant_type": "client_credentials", "client_id": "tgc_two", "client_secret": SECRET + "2"}
    assert _error(service, form).error == "unauthorized_client"


def test_no_signing_key_yet_is_503() -> None:
    exc = _error(TokenService(CLIENTS, TENANTS, ()), BODY_AUTH)
    assert (exc.error, exc.status) == ("temporarily_unavailable", 503)


def test_jwks_publishes_every_live_public_key_and_no_private_part(service: TokenService) -> None:
    document = json.loads(service.jwks_body)
    assert [k["kid"] for k in document["keys"]] == ["old", "current"]
    assert all("d" not in k for k in document["keys"])


# --- request parsing ---

FORM = "application/x-www-form-urlencoded"


def test_form_is_parsed_blank_values_dropped() -> None:
    body = b"grant_type=client_credentials&scope=&client_id=a%2Bb&client_secret=x+y"
    assert parse_form(FORM, body) == {"grant_type": "client_credentials", "client_id": "a+b", "client_secret": "x y"}


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/json", b'{"grant_type": "client_credentials"}'),
        ("text/plain", b"grant_type=client_credentials"),
        ("", b"grant_type=client_credentials"),
        (FORM, b"grant_type=client_credentials&grant_type=password"),
        (FORM, "grant_type=caf\u00e9".encode()),
        (FORM, b"scope=%ff%fe"),
        (FORM, b"&".join(b"a%d=1" % n for n in range(50))),
    ],
)
def test_malformed_form_is_invalid_request(content_type: str, body: bytes) -> None:
    with pytest.raises(OAuthError) as exc_info:
        parse_form(content_type, body)
    assert (exc_info.value.error, exc_info.value.status) == ("invalid_request", 400)


def _basic(text: str) -> str:
    return "Basic " + base64.b64encode(text.encode()).decode()


def test_basic_credentials_are_form_decoded() -> None:
    assert parse_basic([_basic("tgc_one:se%3Acret+x")]) == ("tgc_one", "se:cret x")
    assert parse_basic(["basic " + base64.b64encode(b"id:secret").decode()]) == ("id", "secret")
    assert parse_basic([]) is None


@pytest.mark.parametrize(
    "values", [[_basic("no-colon")], [_basic(":secret")], [_basic("id:")], ["Basic !!!"], ["Bearer abc"]]
)
def test_malformed_basic_is_invalid_client(values: list[str]) -> None:
    with pytest.raises(OAuthError) as exc_info:
        parse_basic(values)
    assert (exc_info.value.error, exc_info.value.status) == ("invalid_client", 401)


def test_two_authorization_headers_are_invalid_request() -> None:
    with pytest.raises(OAuthError) as exc_info:
        parse_basic([_basic("a:b"), _basic("c:d")])
    assert exc_info.value.error == "invalid_request"

"""The gateway's OAuth 2.0 authorization server: ``POST /oauth/token`` (client credentials,
RFC 6749 §4.4) and ``GET /.well-known/jwks.json`` (the public keys its tokens are signed with).

Every data plane answers both from its snapshot: the OAuth clients (secrets as SHA-256 hashes)
and the signing keys the control plane generates and rotates. The newest key signs; the keys
before it stay published, and accepted, while tokens they signed may still be live. Tokens are
verified like any issuer's (:mod:`data_plane.auth.jwt`), with the tenant of the client they
name.

Errors follow RFC 6749 §5.2 (``{"error", "error_description"}``), not the gateway's error
body: that is what OAuth client libraries parse.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final
from urllib.parse import parse_qsl, unquote_plus

import jwt as pyjwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization

from data_plane.auth.jwt import GATEWAY_AUDIENCE, GATEWAY_ISSUER, TENANT_CLAIM
from data_plane.auth.metrics import OAUTH_TOKENS
from data_plane.errors import MethodNotAllowed
from data_plane.request import CONTINUE, expects_continue
from shared.snapshot import OAuthClient, SigningKey, Tenant

TOKEN_PATH: Final = "/oauth/token"  # noqa: S105 - a path, not a secret
JWKS_PATH: Final = "/.well-known/jwks.json"
PATHS: Final = frozenset({TOKEN_PATH, JWKS_PATH})
TOKEN_TTL_S: Final = 3600
MAX_BODY_BYTES: Final = 4096
MAX_FORM_FIELDS: Final = 16
GRANT_TYPE: Final = "client_credentials"
FORM_TYPE: Final = "application/x-www-form-urlencoded"
JWKS_MAX_AGE_S: Final = 60

_NO_STORE: Final = {"Cache-Control": "no-store", "Pragma": "no-cache"}
_BASIC_CHALLENGE: Final = 'Basic realm="tenantgate"'
# Compared against when the client_id is unknown, so that a wrong id costs what a wrong secret does.
_NO_SECRET: Final = hashlib.sha256(b"\x00no client").digest()


class OAuthError(Exception):
    """An RFC 6749 §5.2 error: ``error`` is the code, the message its description."""

    def __init__(self, error: str, description: str, status: int = 400) -> None:
        super().__init__(description)
        self.error = error
        self.description = description
        self.status = status


def _invalid_client(description: str) -> OAuthError:
    return OAuthError("invalid_client", description, 401)


@functools.lru_cache(maxsize=16)
def _private_key(pem: str) -> Any:
    return serialization.load_pem_private_key(pem.encode(), password=None)


class TokenService:
    """The token endpoint's state for one snapshot: clients by ``client_id``, the current signing
    key, and the JWKS document, serialised once."""

    __slots__ = ("_clients", "_clock", "_signer", "_tenants", "jwks_body")

    def __init__(
        self,
        clients: Mapping[str, OAuthClient],
        tenants: Mapping[str, Tenant],
        signing_keys: Sequence[SigningKey],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._clients = clients
        self._tenants = tenants
        self._clock = clock
        # The snapshot lists live keys oldest first: the newest signs.
        self._signer = signing_keys[-1] if signing_keys else None
        keys = [json.loads(k.public_jwk_json) for k in signing_keys]
        self.jwks_body = json.dumps({"keys": keys}, separators=(",", ":")).encode()

    def grant(self, form: Mapping[str, str], basic: tuple[str, str] | None) -> dict[str, Any]:
        """The token response for a parsed request; :class:`OAuthError` saying why not."""
        grant_type = form.get("grant_type")
        if grant_type is None:
            raise OAuthError("invalid_request", "grant_type is required")
        client = self._authenticate(form, basic)
        if grant_type != GRANT_TYPE:
            raise OAuthError("unsupported_grant_type", f"only grant_type={GRANT_TYPE} is supported")
        tenant = self._tenants.get(client.tenant_id)
        if tenant is None or not tenant.is_active:
            raise OAuthError("unauthorized_client", "the client's tenant is inactive")
        scopes = self._scopes(form.get("scope"), client)
        if self._signer is None:
            raise OAuthError("temporarily_unavailable", "no signing key is configured yet", 503)
        now = int(self._clock())
        claims = {
            "iss": GATEWAY_ISSUER,
            "aud": GATEWAY_AUDIENCE,
            "sub": client.client_id,
            "client_id": client.client_id,
            TENANT_CLAIM: tenant.id,
            "scope": " ".join(scopes),
            "iat": now,
            "nbf": now,
            "exp": now + TOKEN_TTL_S,
            "jti": secrets.token_urlsafe(16),
        }
        signer = self._signer
        token = pyjwt.encode(
            claims,
            _private_key(signer.private_key_pem),
            algorithm=signer.algorithm,
            headers={"kid": signer.kid, "typ": "at+jwt"},
        )
        return {"access_token": token, "token_type": "Bearer", "expires_in": TOKEN_TTL_S, "scope": claims["scope"]}

    def _authenticate(self, form: Mapping[str, str], basic: tuple[str, str] | None) -> OAuthClient:
        if basic is not None:
            if "client_secret" in form:
                raise OAuthError("invalid_request", "send the client credentials in HTTP Basic or the body, not both")
            client_id, secret = basic
            if form.get("client_id", client_id) != client_id:
                raise OAuthError("invalid_request", "client_id in the body differs from HTTP Basic")
        else:
            client_id, secret = form.get("client_id", ""), form.get("client_secret", "")
            if not client_id or not secret:
                raise _invalid_client("client authentication is required (HTTP Basic or client_id and client_secret)")
        client = self._clients.get(client_id)
        digest = hashlib.sha256(secret.encode("utf-8", "surrogateescape")).digest()
        matches = hmac.compare_digest(digest, client.secret_hash if client is not None else _NO_SECRET)
        if client is None or not matches:
            raise _invalid_client("client authentication failed")
        return client

    @staticmethod
    def _scopes(requested: str | None, client: OAuthClient) -> tuple[str, ...]:
        if requested is None:
            return client.scopes
        wanted = list(dict.fromkeys(requested.split(" ")))
        if "" in wanted:
            raise OAuthError("invalid_scope", "scope must be scope tokens separated by single spaces")
        beyond = [s for s in wanted if s not in client.scopes]
        if beyond:
            raise OAuthError("invalid_scope", "the requested scope exceeds what this client may be granted")
        return tuple(wanted)


def parse_form(content_type: str, body: bytes) -> dict[str, str]:
    """The parameters of a form-encoded body. Parameters without a value count as absent
    (RFC 6749 §3.1); a repeated one is an error."""
    if content_type != FORM_TYPE:
        raise OAuthError("invalid_request", f"the body must be {FORM_TYPE}")
    try:
        pairs = parse_qsl(body.decode("ascii"), keep_blank_values=True, errors="strict", max_num_fields=MAX_FORM_FIELDS)
    except (UnicodeDecodeError, ValueError):
        raise OAuthError("invalid_request", "the body is not a valid form") from None
    form: dict[str, str] = {}
    for name, value in pairs:
        if name in form:
            raise OAuthError("invalid_request", f"parameter {name} is repeated")
        if value:
            form[name] = value
    return form


def parse_basic(values: Sequence[str]) -> tuple[str, str] | None:
    """``client_id, client_secret`` from HTTP Basic (each form-encoded first, RFC 6749 §2.3.1)."""
    if not values:
        return None
    if len(values) > 1:
        raise OAuthError("invalid_request", "more than one Authorization header")
    scheme, _, credentials = values[0].strip().partition(" ")
    if scheme.lower() != "basic":
        raise _invalid_client("only HTTP Basic client authentication is supported here")
    try:
        decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        raise _invalid_client("malformed HTTP Basic credentials") from None
    client_id, sep, secret = decoded.partition(":")
    if not sep or not client_id or not secret:
        raise _invalid_client("malformed HTTP Basic credentials")
    return unquote_plus(client_id), unquote_plus(secret)


async def _read_body(request: web.BaseRequest) -> bytes:
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise OAuthError("invalid_request", f"the body is larger than {MAX_BODY_BYTES} bytes", 413)
    if request.body_exists and expects_continue(request.version, request.headers):
        await request.writer.write(CONTINUE)  # the declared size is acceptable: ask for the body
    body = bytearray()
    while chunk := await request.content.read(MAX_BODY_BYTES + 1 - len(body)):
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise OAuthError("invalid_request", f"the body is larger than {MAX_BODY_BYTES} bytes", 413)
    return bytes(body)


def _json(status: int, payload: dict[str, Any], rid: str, extra: Mapping[str, str] = _NO_STORE) -> web.Response:
    response = web.Response(status=status, text=json.dumps(payload), content_type="application/json")
    response.headers.update(extra)
    response.headers["X-Request-ID"] = rid
    return response


async def serve(request: web.BaseRequest, path: str, service: TokenService, rid: str) -> web.Response:
    """Answer ``path`` (one of :data:`PATHS`); raises :class:`MethodNotAllowed` for other methods."""
    if path == JWKS_PATH:
        if request.method not in ("GET", "HEAD"):
            raise MethodNotAllowed(("GET", "HEAD"))
        response = web.Response(body=service.jwks_body, content_type="application/json")
        response.headers["Cache-Control"] = f"public, max-age={JWKS_MAX_AGE_S}"
        response.headers["X-Request-ID"] = rid
        return response
    if request.method != "POST":
        raise MethodNotAllowed(("POST",))
    try:
        body = await _read_body(request)
        form = parse_form(request.content_type, body)
        result = service.grant(form, parse_basic(request.headers.getall("Authorization", ())))
    except OAuthError as exc:
        OAUTH_TOKENS.labels(exc.error).inc()
        headers = {**_NO_STORE, "WWW-Authenticate": _BASIC_CHALLENGE} if exc.status == 401 else _NO_STORE
        return _json(exc.status, {"error": exc.error, "error_description": exc.description}, rid, headers)
    OAUTH_TOKENS.labels("issued").inc()
    return _json(200, result, rid)

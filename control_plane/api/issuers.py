"""``/admin/tenants/{id}/jwt-issuers``: the identity providers whose JWTs authenticate a tenant.

Each issuer has exactly one key source: an inline ``jwks``, a ``jwks_uri`` that the control
plane fetches and refreshes itself, a ``public_key_pem``, or an ``hs256_secret``. The secret is
stored as given and never returned; the public keys in effect are listed as ``keys``.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import replace
from datetime import datetime
from typing import Annotated, Any, Final
from urllib.parse import urlsplit

from fastapi import APIRouter, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator

from control_plane import jwks as keysets
from control_plane.api.deps import Caller, State, committed, object_id
from control_plane.errors import Unprocessable
from control_plane.store import issuers as store
from shared.snapshot import (
    HMAC_JWT_ALGORITHMS,
    JWT_ALGORITHMS,
    MAX_ISSUER_LENGTH,
    MIN_HS256_SECRET_BYTES,
    validate_jwt_algorithms,
)

router = APIRouter(prefix="/admin/tenants/{tenant_id}/jwt-issuers", tags=["jwt issuers"])
# Every tenant's issuers at once, for operators' tools (tenantgate export/apply).
global_router = APIRouter(prefix="/admin/jwt-issuers", tags=["jwt issuers"])

KEY_SOURCES: Final = ("jwks", "jwks_uri", "public_key_pem", "hs256_secret")
MAX_AUDIENCE_LENGTH: Final = 512
MAX_JWKS_URI_LENGTH: Final = 2048
MAX_SECRET_CHARS: Final = 4096
_LOOPBACK_NAMES: Final = frozenset({"localhost", "localhost.localdomain"})
# The issuer of the data planes' own tokens (POST /oauth/token): data planes check tokens with
# this ``iss`` against the gateway's signing keys only, so a tenant's issuer by that name could
# never be used.
RESERVED_ISSUERS: Final = frozenset({"tenantgate"})


def check_text(value: str) -> str:
    if value != value.strip() or not value.isprintable():
        raise ValueError("must be printable text without leading or trailing space")
    return value


def check_issuer(value: str) -> str:
    """An issuer is matched exactly against the ``iss`` claim: any printable string, but one
    that looks like a URL must be https (http only for a loopback host, for development)."""
    check_text(value)
    if value in RESERVED_ISSUERS:
        raise ValueError(f"{value!r} is the gateway's own token issuer")
    if "://" not in value:
        return value
    try:
        parts = urlsplit(value)
        host = (parts.hostname or "").lower()
    except ValueError:
        raise ValueError("is not a valid URL") from None
    if parts.scheme == "https" and host:
        return value
    if parts.scheme == "http" and _is_loopback(host):
        return value
    raise ValueError("a URL issuer must be https (http only for loopback hosts)")


def _is_loopback(host: str) -> bool:
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_algorithms(value: list[str]) -> list[str]:
    """Distinct, known algorithms, never ``none``, never HS256 with an asymmetric one."""
    distinct = list(dict.fromkeys(value))
    validate_jwt_algorithms(distinct)
    return distinct


class IssuerCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    issuer: Annotated[
        str, Field(min_length=1, max_length=MAX_ISSUER_LENGTH, examples=["https://auth.example.com/"])
    ] = Field(description='Matched exactly against the token\'s "iss" claim.')
    audience: Annotated[str, Field(min_length=1, max_length=MAX_AUDIENCE_LENGTH)] = Field(
        description='The token\'s "aud" claim must be or contain this value.'
    )
    algorithms: Annotated[list[str], Field(min_length=1, max_length=len(JWT_ALGORITHMS))] = Field(
        description=f"Accepted signing algorithms, from {sorted(JWT_ALGORITHMS)}.", examples=[["RS256"]]
    )
    jwks: dict[str, Any] | None = Field(None, description='An inline JWKS: {"keys": [...]}, public keys only.')
    jwks_uri: Annotated[str, Field(min_length=1, max_length=MAX_JWKS_URI_LENGTH)] | None = Field(
        None, description="Fetched by the control plane (https) and refreshed every 10 minutes."
    )
    public_key_pem: Annotated[str, Field(min_length=1, max_length=keysets.MAX_PEM_CHARS)] | None = None
    hs256_secret: Annotated[str, Field(min_length=1, max_length=MAX_SECRET_CHARS)] | None = Field(
        None, description=f"For HS256 only, at least {MIN_HS256_SECRET_BYTES} bytes. Never returned."
    )

    _issuer = field_validator("issuer")(check_issuer)
    _audience = field_validator("audience")(check_text)
    _algorithms = field_validator("algorithms")(check_algorithms)


def new_issuer(body: IssuerCreate) -> store.NewIssuer:
    """Check that exactly one key source is given and that it fits the algorithms; raise
    :class:`Unprocessable` naming the field."""
    given = [name for name in KEY_SOURCES if getattr(body, name) is not None]
    if not given:
        raise Unprocessable("jwks", "give one key source: jwks, jwks_uri, public_key_pem or hs256_secret")
    if len(given) > 1:
        raise Unprocessable(given[1], f"give exactly one key source, not {' and '.join(given)}")
    algorithms = tuple(body.algorithms)
    hmac = set(algorithms) <= HMAC_JWT_ALGORITHMS
    base = store.NewIssuer(issuer=body.issuer, audience=body.audience, algorithms=algorithms)
    if body.hs256_secret is not None:
        secret = body.hs256_secret.encode()
        if not hmac:
            raise Unprocessable("hs256_secret", 'is only for algorithms ["HS256"]')
        if len(secret) < MIN_HS256_SECRET_BYTES:
            raise Unprocessable("hs256_secret", f"must be at least {MIN_HS256_SECRET_BYTES} bytes")
        return replace(base, hs256_secret=secret)
    if hmac:
        raise Unprocessable("algorithms", "HS256 needs hs256_secret as the key source")
    if body.jwks is not None:
        try:
            return replace(base, jwks=keysets.check_jwks(body.jwks, algorithms))
        except ValueError as exc:
            raise Unprocessable("jwks", str(exc)) from None
    if body.jwks_uri is not None:
        try:
            keysets.check_jwks_uri(body.jwks_uri)
        except ValueError as exc:
            raise Unprocessable("jwks_uri", str(exc)) from None
        return replace(base, jwks_uri=body.jwks_uri)
    assert body.public_key_pem is not None
    try:
        keysets.check_public_key_pem(body.public_key_pem, algorithms)
    except ValueError as exc:
        raise Unprocessable("public_key_pem", str(exc)) from None
    return replace(base, public_key_pem=body.public_key_pem)


class KeyOut(BaseModel):
    kid: str | None
    kty: str
    alg: str | None
    use: str | None


class IssuerOut(BaseModel):
    id: str
    tenant_id: str
    issuer: str
    audience: str
    algorithms: list[str]
    key_source: str = Field(description="jwks, jwks_uri, public_key_pem or hs256_secret (never returned).")
    jwks: dict[str, Any] | None
    jwks_uri: str | None
    public_key_pem: str | None
    keys: list[KeyOut] = Field(
        description="The public keys in effect: inline, last fetched from jwks_uri, or from the PEM key."
    )
    jwks_fetched_at: datetime | None = Field(description="For jwks_uri: when the keys were last fetched.")
    jwks_error: str | None = Field(description="For jwks_uri: why the last fetch failed; cleared by a success.")
    created_at: datetime


class IssuerCreated(IssuerOut):
    config_version: int


class IssuerList(BaseModel):
    items: list[IssuerOut]


class IssuerDeleted(BaseModel):
    id: str
    deleted: bool
    config_version: int


def _effective_keys(issuer: store.IssuerRecord) -> list[Any]:
    if issuer.jwks is not None:
        keys: list[Any] = issuer.jwks.get("keys", [])
    elif issuer.fetched_jwks is not None:
        keys = issuer.fetched_jwks.get("keys", [])
    elif issuer.public_key_pem is not None:
        keys = json.loads(keysets.snapshot_pem_jwks(issuer.id, issuer.public_key_pem))["keys"]
    else:
        keys = []
    return [k for k in keys if isinstance(k, dict)]


def issuer_out(issuer: store.IssuerRecord) -> dict[str, Any]:
    return {
        "id": issuer.id,
        "tenant_id": issuer.tenant_id,
        "issuer": issuer.issuer,
        "audience": issuer.audience,
        "algorithms": list(issuer.algorithms),
        "key_source": issuer.key_source,
        "jwks": issuer.jwks,
        "jwks_uri": issuer.jwks_uri,
        "public_key_pem": issuer.public_key_pem,
        "keys": [
            {"kid": k.get("kid"), "kty": str(k.get("kty")), "alg": k.get("alg"), "use": k.get("use")}
            for k in _effective_keys(issuer)
        ],
        "jwks_fetched_at": issuer.jwks_fetched_at,
        "jwks_error": issuer.jwks_error,
        "created_at": issuer.created_at,
    }


@router.post("", status_code=201, response_model=IssuerCreated)
async def create_issuer(
    tenant_id: str, body: IssuerCreate, state: State, caller: Caller, response: Response
) -> dict[str, Any]:
    """Add a JWT issuer. A jwks_uri is fetched right away; its keys appear in ``keys``."""
    tid = object_id(tenant_id, "tenant")
    caller.require_tenant_manage(tid)
    issuer, version = await store.create(state.db, caller.actor, tid, new_issuer(body))
    committed(state, response, version)
    return {**issuer_out(issuer), "config_version": version}


@router.get("", response_model=IssuerList)
async def list_issuers(tenant_id: str, state: State, caller: Caller) -> dict[str, Any]:
    tid = object_id(tenant_id, "tenant")
    caller.require_tenant_read(tid)
    return {"items": [issuer_out(i) for i in await store.list_for_tenant(state.db, tid)]}


@global_router.get("", response_model=IssuerList)
async def list_all_issuers(state: State, caller: Caller) -> dict[str, Any]:
    """Every tenant's issuers (admin and viewer tokens)."""
    caller.require_global_read()
    return {"items": [issuer_out(i) for i in await store.list_all(state.db)]}


@router.get("/{issuer_id}", response_model=IssuerOut)
async def get_issuer(tenant_id: str, issuer_id: str, state: State, caller: Caller) -> dict[str, Any]:
    tid = object_id(tenant_id, "tenant")
    caller.require_tenant_read(tid)
    return issuer_out(await store.get(state.db, tid, object_id(issuer_id, "JWT issuer")))


@router.delete("/{issuer_id}", response_model=IssuerDeleted)
async def delete_issuer(
    tenant_id: str, issuer_id: str, state: State, caller: Caller, response: Response
) -> dict[str, Any]:
    """Delete an issuer: its tokens stop being accepted on every data plane."""
    tid = object_id(tenant_id, "tenant")
    caller.require_tenant_manage(tid)
    iid = object_id(issuer_id, "JWT issuer")
    version = await store.delete(state.db, caller.actor, tid, iid)
    committed(state, response, version)
    return {"id": iid, "deleted": True, "config_version": version}

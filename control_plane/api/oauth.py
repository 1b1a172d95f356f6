"""``/admin/tenants/{id}/oauth-clients``: OAuth clients of one tenant, which obtain access tokens
from ``POST /oauth/token`` (client credentials) on any data plane. The secret is returned once,
at creation, and stored only as a hash."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator

from control_plane.api.deps import Caller, State, committed, object_id
from control_plane.store import oauth as store
from shared.snapshot import MAX_CLIENT_SCOPES, validate_client_scope

router = APIRouter(prefix="/admin/tenants/{tenant_id}/oauth-clients", tags=["oauth clients"])


def check_name(value: str) -> str:
    value = value.strip()
    if not value or not value.isprintable():
        raise ValueError("must be non-empty printable text")
    return value


def check_scopes(value: list[str]) -> list[str]:
    """Each a token of ``[A-Za-z0-9:._-]{1,64}``; duplicates dropped, order kept."""
    for scope in value:
        validate_client_scope(scope)
    return list(dict.fromkeys(value))


class ClientCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: Annotated[str, Field(min_length=1, max_length=255)]
    scopes: Annotated[list[str], Field(max_length=MAX_CLIENT_SCOPES)] = Field(
        default_factory=list, description="Scopes the client may be granted.", examples=[["orders:read"]]
    )

    _name = field_validator("name")(check_name)
    _scopes = field_validator("scopes")(check_scopes)


class ClientOut(BaseModel):
    id: str
    client_id: str = Field(description="Public: sent as client_id to POST /oauth/token.")
    name: str
    scopes: list[str]
    created_at: datetime
    revoked_at: datetime | None


class ClientCreated(BaseModel):
    id: str
    client_id: str
    client_secret: str = Field(description="The client secret. Shown only in this response.")
    name: str
    scopes: list[str]
    created_at: datetime
    config_version: int


class ClientList(BaseModel):
    items: list[ClientOut]


class ClientRevoked(ClientOut):
    config_version: int


def _out(c: store.ClientRecord) -> dict[str, Any]:
    return {
        "id": c.id,
        "client_id": c.client_id,
        "name": c.name,
        "scopes": list(c.scopes),
        "created_at": c.created_at,
        "revoked_at": c.revoked_at,
    }


@router.post("", status_code=201, response_model=ClientCreated)
async def create_client(
    tenant_id: str, body: ClientCreate, state: State, caller: Caller, response: Response
) -> dict[str, Any]:
    tid = object_id(tenant_id, "tenant")
    caller.require_tenant_manage(tid)
    created = await store.create(state.db, caller.actor, tid, body.name, tuple(body.scopes))
    committed(state, response, created.config_version)
    c = created.client
    return {
        "id": c.id,
        "client_id": c.client_id,
        "client_secret": created.secret,
        "name": c.name,
        "scopes": list(c.scopes),
        "created_at": c.created_at,
        "config_version": created.config_version,
    }


@router.get("", response_model=ClientList)
async def list_clients(tenant_id: str, state: State, caller: Caller) -> dict[str, Any]:
    """Every client of the tenant, revoked ones included; never a secret."""
    tid = object_id(tenant_id, "tenant")
    caller.require_tenant_read(tid)
    return {"items": [_out(c) for c in await store.list_for_tenant(state.db, tid)]}


@router.get("/{oauth_client_id}", response_model=ClientOut)
async def get_client(tenant_id: str, oauth_client_id: str, state: State, caller: Caller) -> dict[str, Any]:
    """One client by its ``id`` (the object id, not the public ``client_id``)."""
    tid = object_id(tenant_id, "tenant")
    caller.require_tenant_read(tid)
    return _out(await store.get(state.db, tid, object_id(oauth_client_id, "OAuth client")))


@router.delete("/{oauth_client_id}", response_model=ClientRevoked)
async def revoke_client(
    tenant_id: str, oauth_client_id: str, state: State, caller: Caller, response: Response
) -> dict[str, Any]:
    """Revoke a client (by its ``id``): its secret stops working on every data plane."""
    tid = object_id(tenant_id, "tenant")
    caller.require_tenant_manage(tid)
    client, version = await store.revoke(state.db, caller.actor, tid, object_id(oauth_client_id, "OAuth client"))
    committed(state, response, version)
    return {**_out(client), "config_version": version}

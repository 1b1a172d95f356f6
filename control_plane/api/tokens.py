"""``/admin/tokens``: admin API tokens with roles. Only ``admin`` manages them."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from control_plane.api.deps import Caller, State, committed, object_id
from control_plane.errors import Unprocessable
from control_plane.store import tokens as store

router = APIRouter(prefix="/admin/tokens", tags=["tokens"])

Role = Literal["admin", "tenant_admin", "viewer"]


class TokenCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: Annotated[str, Field(min_length=1, max_length=255)]
    role: Role
    tenant_id: str | None = Field(None, description="Required for tenant_admin, refused otherwise.")

    @field_validator("name")
    @classmethod
    def _printable(cls, value: str) -> str:
        value = value.strip()
        if not value or not value.isprintable():
            raise ValueError("must be non-empty printable text")
        return value

    @model_validator(mode="after")
    def _tenant_matches_role(self) -> TokenCreate:
        if (self.role == "tenant_admin") != (self.tenant_id is not None):
            raise ValueError("tenant_id is required for role tenant_admin and only for it")
        return self


class TokenOut(BaseModel):
    id: str
    name: str
    role: Role
    tenant_id: str | None
    prefix: str
    created_by: str
    created_at: datetime
    revoked_at: datetime | None


class TokenCreated(TokenOut):
    token: str = Field(description="The token. Shown only in this response.")
    config_version: int


class TokenRevoked(TokenOut):
    config_version: int


class TokenList(BaseModel):
    items: list[TokenOut]


def _out(t: store.TokenRecord) -> dict[str, Any]:
    return {
        "id": t.id,
        "name": t.name,
        "role": t.role,
        "tenant_id": t.tenant_id,
        "prefix": t.prefix,
        "created_by": t.created_by,
        "created_at": t.created_at,
        "revoked_at": t.revoked_at,
    }


@router.post("", status_code=201, response_model=TokenCreated)
async def create_token(body: TokenCreate, state: State, caller: Caller, response: Response) -> dict[str, Any]:
    caller.require_admin()
    tenant_id = None
    if body.tenant_id is not None:
        try:
            tenant_id = str(uuid.UUID(body.tenant_id))
        except ValueError:
            raise Unprocessable("tenant_id", "not a tenant id") from None
    created = await store.create(state.db, caller.actor, body.name, body.role, tenant_id)
    committed(state, response, created.config_version)
    return {**_out(created.token), "token": created.secret, "config_version": created.config_version}


@router.get("", response_model=TokenList)
async def list_tokens(state: State, caller: Caller) -> dict[str, Any]:
    caller.require_admin()
    return {"items": [_out(t) for t in await store.list_all(state.db)]}


@router.delete("/{token_id}", response_model=TokenRevoked)
async def revoke_token(token_id: str, state: State, caller: Caller, response: Response) -> dict[str, Any]:
    caller.require_admin()
    token, version = await store.revoke(state.db, caller.actor, object_id(token_id, "admin token"))
    committed(state, response, version)
    return {**_out(token), "config_version": version}

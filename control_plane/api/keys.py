"""``/admin/tenants/{id}/keys``: API keys of one tenant. Several may be live at once (rotation);
the plaintext is returned once, at creation."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Response
from pydantic import BaseModel, Field

from control_plane.api.deps import Caller, State, committed, object_id
from control_plane.store import tenants as store

router = APIRouter(prefix="/admin/tenants/{tenant_id}/keys", tags=["keys"])


class KeyOut(BaseModel):
    id: str
    prefix: str = Field(description="The first characters of the key, to tell keys apart.")
    created_at: datetime
    revoked_at: datetime | None


class KeyCreated(BaseModel):
    id: str
    key: str = Field(description="The API key. Shown only in this response.")
    prefix: str
    created_at: datetime
    config_version: int


class KeyList(BaseModel):
    items: list[KeyOut]


class KeyRevoked(KeyOut):
    config_version: int


def _out(k: store.KeyRecord) -> dict[str, Any]:
    return {"id": k.id, "prefix": k.prefix, "created_at": k.created_at, "revoked_at": k.revoked_at}


@router.post("", status_code=201, response_model=KeyCreated)
async def create_key(tenant_id: str, state: State, caller: Caller, response: Response) -> dict[str, Any]:
    tid = object_id(tenant_id, "tenant")
    caller.require_tenant_manage(tid)
    key, secret, version = await store.create_key(state.db, caller.actor, tid)
    committed(state, response, version)
    return {"id": key.id, "key": secret, "prefix": key.prefix, "created_at": key.created_at, "config_version": version}


@router.get("", response_model=KeyList)
async def list_keys(tenant_id: str, state: State, caller: Caller) -> dict[str, Any]:
    tid = object_id(tenant_id, "tenant")
    caller.require_tenant_read(tid)
    return {"items": [_out(k) for k in await store.list_keys(state.db, tid)]}


@router.delete("/{key_id}", response_model=KeyRevoked)
async def revoke_key(tenant_id: str, key_id: str, state: State, caller: Caller, response: Response) -> dict[str, Any]:
    """Revoke a key: it stops working on every data plane within the propagation bound."""
    tid = object_id(tenant_id, "tenant")
    caller.require_tenant_manage(tid)
    key, version = await store.revoke_key(state.db, caller.actor, tid, object_id(key_id, "key"))
    committed(state, response, version)
    return {**_out(key), "config_version": version}

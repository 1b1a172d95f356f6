"""``/admin/tenants``: create, list (cursor pages), read, update, delete."""

from __future__ import annotations

import base64
import binascii
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator

from control_plane.api.deps import Caller, State, committed, object_id
from control_plane.errors import Unprocessable
from control_plane.store import tenants as store
from control_plane.tiers import DEFAULT_TIER, TIERS

router = APIRouter(prefix="/admin/tenants", tags=["tenants"])

Limit = Annotated[int, Field(ge=0, le=2_147_483_647)]
Quota = Annotated[int, Field(ge=0, le=2**62)]
Tier = Literal["free", "basic", "premium", "enterprise"]
Name = Annotated[str, Field(min_length=1, max_length=255)]
DEFAULT_PAGE: int = 50
MAX_PAGE: int = 500


def _clean_name(value: str | None) -> str | None:
    if value is None:
        return None  # PATCH rejects explicit nulls after validation, naming the field
    value = value.strip()
    if not value or not value.isprintable():
        raise ValueError("must be non-empty printable text")
    return value


class TenantCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: Name
    tier: Tier = DEFAULT_TIER
    rate_limit_per_minute: Limit | None = None
    rate_limit_per_hour: Limit | None = None
    monthly_quota: Quota | None = Field(None, description="Requests per calendar month (UTC); 0: unlimited.")
    max_concurrency: Limit | None = Field(None, description="In-flight requests across the cluster; 0: unlimited.")

    _name = field_validator("name")(_clean_name)


class TenantUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: Name | None = None
    tier: Tier | None = None
    rate_limit_per_minute: Limit | None = None
    rate_limit_per_hour: Limit | None = None
    monthly_quota: Quota | None = None
    max_concurrency: Limit | None = None
    is_active: bool | None = None

    _name = field_validator("name")(_clean_name)


class TenantOut(BaseModel):
    id: str
    name: str
    tier: Tier
    rate_limit_per_minute: int
    rate_limit_per_hour: int
    monthly_quota: int
    max_concurrency: int
    is_active: bool
    created_at: datetime
    updated_at: datetime


class TenantCreated(TenantOut):
    api_key: str = Field(description="The tenant's first API key. Shown only in this response.")
    config_version: int


class TenantWritten(TenantOut):
    config_version: int


class TenantPage(BaseModel):
    items: list[TenantOut]
    next_cursor: str | None = Field(description="Pass as ?cursor= for the next page; null on the last page.")


class Deleted(BaseModel):
    id: str
    deleted: bool
    config_version: int


def tenant_out(t: store.TenantRecord) -> dict[str, Any]:
    return {
        "id": t.id,
        "name": t.name,
        "tier": t.tier,
        "rate_limit_per_minute": t.rate_limit_per_minute,
        "rate_limit_per_hour": t.rate_limit_per_hour,
        "monthly_quota": t.monthly_quota,
        "max_concurrency": t.max_concurrency,
        "is_active": t.is_active,
        "created_at": t.created_at,
        "updated_at": t.updated_at,
    }


def _encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"t:{seq}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> int:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        kind, _, seq = text.partition(":")
        if kind != "t" or not seq.isdigit():
            raise ValueError(cursor)
        return int(seq)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise Unprocessable("cursor", "not a cursor from a previous page") from None


@router.post("", status_code=201, response_model=TenantCreated)
async def create_tenant(body: TenantCreate, state: State, caller: Caller, response: Response) -> dict[str, Any]:
    """Create a tenant and its first API key. Omitted limits take the tier's defaults."""
    caller.require_admin()
    defaults = TIERS[body.tier]
    created = await store.create(
        state.db,
        caller.actor,
        store.NewTenant(
            name=body.name,
            tier=body.tier,
            rate_limit_per_minute=_or(body.rate_limit_per_minute, defaults.rate_limit_per_minute),
            rate_limit_per_hour=_or(body.rate_limit_per_hour, defaults.rate_limit_per_hour),
            monthly_quota=_or(body.monthly_quota, defaults.monthly_quota),
            max_concurrency=_or(body.max_concurrency, defaults.max_concurrency),
        ),
    )
    committed(state, response, created.config_version)
    return {**tenant_out(created.tenant), "api_key": created.api_key, "config_version": created.config_version}


@router.get("", response_model=TenantPage)
async def list_tenants(
    state: State,
    caller: Caller,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = DEFAULT_PAGE,
    cursor: Annotated[str | None, Query(max_length=64)] = None,
) -> dict[str, Any]:
    """Tenants in creation order. A ``tenant_admin`` token sees only its own tenant."""
    after = _decode_cursor(cursor) if cursor else 0
    only = caller.tenant_id if caller.role == "tenant_admin" else None
    page = await store.list_page(state.db, limit, after, only_id=only)
    return {
        "items": [tenant_out(t) for t in page.items],
        "next_cursor": _encode_cursor(page.next_after) if page.next_after is not None else None,
    }


@router.get("/{tenant_id}", response_model=TenantOut)
async def get_tenant(tenant_id: str, state: State, caller: Caller) -> dict[str, Any]:
    tid = object_id(tenant_id, "tenant")
    caller.require_tenant_read(tid)
    return tenant_out(await store.get(state.db, tid))


@router.patch("/{tenant_id}", response_model=TenantWritten)
async def update_tenant(
    tenant_id: str, body: TenantUpdate, state: State, caller: Caller, response: Response
) -> dict[str, Any]:
    """Change a tenant. Changing the tier does not change limits that are not sent."""
    tid = object_id(tenant_id, "tenant")
    caller.require_tenant_read(tid)
    caller.require_admin()  # a tenant_admin may not change its own limits, tier or state
    changes = body.model_dump(exclude_unset=True)
    for name, value in changes.items():
        if value is None:
            raise Unprocessable(name, "must not be null")
    tenant, version = await store.update(state.db, caller.actor, tid, changes)
    committed(state, response, version)
    return {**tenant_out(tenant), "config_version": version}


@router.delete("/{tenant_id}", response_model=Deleted)
async def delete_tenant(tenant_id: str, state: State, caller: Caller, response: Response) -> dict[str, Any]:
    """Delete a tenant and its keys; its keys stop working on every data plane."""
    tid = object_id(tenant_id, "tenant")
    caller.require_tenant_read(tid)
    caller.require_admin()
    version = await store.delete(state.db, caller.actor, tid)
    committed(state, response, version)
    return {"id": tid, "deleted": True, "config_version": version}


def _or(value: int | None, default: int) -> int:
    return default if value is None else value

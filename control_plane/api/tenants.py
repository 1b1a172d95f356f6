"""``/admin/tenants``."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator

from control_plane.api.deps import Caller, State, committed
from control_plane.store import tenants as store
from control_plane.tiers import DEFAULT_TIER, TIERS

router = APIRouter(prefix="/admin/tenants", tags=["tenants"])

Limit = Annotated[int, Field(ge=0, le=2_147_483_647)]
Tier = Literal["free", "basic", "premium", "enterprise"]


class TenantCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: Annotated[str, Field(min_length=1, max_length=255)]
    tier: Tier = DEFAULT_TIER
    rate_limit_per_minute: Limit | None = None
    rate_limit_per_hour: Limit | None = None
    monthly_quota: Annotated[int, Field(ge=0, le=2**62)] | None = None
    max_concurrency: Limit | None = None

    @field_validator("name")
    @classmethod
    def _printable(cls, value: str) -> str:
        value = value.strip()
        if not value or not value.isprintable():
            raise ValueError("must be non-empty printable text")
        return value


class TenantCreated(BaseModel):
    id: str
    name: str
    tier: Tier
    api_key: str = Field(description="The tenant's first API key. Shown only in this response.")
    rate_limit_per_minute: int
    rate_limit_per_hour: int
    monthly_quota: int
    max_concurrency: int
    is_active: bool
    created_at: datetime
    config_version: int


@router.post("", status_code=201, response_model=TenantCreated)
async def create_tenant(
    body: TenantCreate, state: State, caller: Caller, response: Response
) -> TenantCreated:
    caller.require_admin()
    defaults = TIERS[body.tier]
    created = await store.create(
        state.db,
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
    t = created.tenant
    return TenantCreated(
        id=t.id,
        name=t.name,
        tier=t.tier,  # type: ignore[arg-type]
        api_key=created.api_key,
        rate_limit_per_minute=t.rate_limit_per_minute,
        rate_limit_per_hour=t.rate_limit_per_hour,
        monthly_quota=t.monthly_quota,
        max_concurrency=t.max_concurrency,
        is_active=t.is_active,
        created_at=t.created_at,
        config_version=created.config_version,
    )


def _or(value: int | None, default: int) -> int:
    return default if value is None else value

"""Tenants and their API keys."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg

from control_plane.store.config import bump_version
from control_plane.store.db import Database
from shared import keys


@dataclass(frozen=True, slots=True)
class NewTenant:
    name: str
    tier: str
    rate_limit_per_minute: int
    rate_limit_per_hour: int
    monthly_quota: int
    max_concurrency: int


@dataclass(frozen=True, slots=True)
class TenantRecord:
    id: str
    name: str
    tier: str
    rate_limit_per_minute: int
    rate_limit_per_hour: int
    monthly_quota: int
    max_concurrency: int
    is_active: bool
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Created:
    tenant: TenantRecord
    api_key: str  # plaintext, returned to the operator once
    config_version: int


_COLUMNS = (
    "id::text, name, tier, rate_limit_per_minute, rate_limit_per_hour, monthly_quota, max_concurrency,"
    " is_active, created_at"
)


def _record(row: asyncpg.Record) -> TenantRecord:
    return TenantRecord(**dict(row))


async def create(db: Database, new: NewTenant) -> Created:
    """Insert a tenant with its first API key and bump the config version, atomically."""
    api_key = keys.generate_api_key()
    async with db.transaction() as conn:
        row = await conn.fetchrow(
            f"""INSERT INTO tenants (name, tier, rate_limit_per_minute, rate_limit_per_hour,
                                     monthly_quota, max_concurrency)
                VALUES ($1, $2, $3, $4, $5, $6) RETURNING {_COLUMNS}""",
            new.name,
            new.tier,
            new.rate_limit_per_minute,
            new.rate_limit_per_hour,
            new.monthly_quota,
            new.max_concurrency,
        )
        await conn.execute(
            "INSERT INTO api_keys (tenant_id, key_hash, prefix) VALUES ($1::uuid, $2, $3)",
            row["id"],
            keys.hash_key(api_key),
            keys.display_prefix(api_key),
        )
        version = await bump_version(conn)
    return Created(_record(row), api_key, version)

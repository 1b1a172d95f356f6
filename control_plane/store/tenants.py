"""Tenants and their API keys. Every write bumps the config version and is audited, in one
transaction with the change."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from datetime import datetime
from typing import Any, Final

import asyncpg

from control_plane.errors import Conflict, NotFound
from control_plane.store.audit import Actor, record
from control_plane.store.config import bump_version
from control_plane.store.db import Database
from shared import keys

# Live keys a tenant may hold at once: enough for any rotation scheme, bounded for the snapshot.
MAX_LIVE_KEYS: Final = 50


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
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class KeyRecord:
    id: str
    tenant_id: str
    prefix: str
    created_at: datetime
    revoked_at: datetime | None


@dataclass(frozen=True, slots=True)
class Created:
    tenant: TenantRecord
    api_key: str  # plaintext, returned to the operator once
    config_version: int


@dataclass(frozen=True, slots=True)
class Page:
    items: list[TenantRecord]
    next_after: int | None  # the seq to continue after, None on the last page


COLUMNS: Final = (
    "id::text, name, tier, rate_limit_per_minute, rate_limit_per_hour, monthly_quota, max_concurrency,"
    " is_active, created_at, updated_at"
)
KEY_COLUMNS: Final = "id::text, tenant_id::text, prefix, created_at, revoked_at"
UPDATABLE: Final = frozenset(
    {"name", "tier", "rate_limit_per_minute", "rate_limit_per_hour", "monthly_quota", "max_concurrency", "is_active"}
)


def from_row(row: asyncpg.Record) -> TenantRecord:
    return TenantRecord(**{f.name: row[f.name] for f in fields(TenantRecord)})


def _key(row: asyncpg.Record) -> KeyRecord:
    return KeyRecord(**dict(row))


async def create(db: Database, actor: Actor, new: NewTenant) -> Created:
    """Insert a tenant with its first API key."""
    api_key = keys.generate_api_key()
    async with db.transaction() as conn:
        version = await bump_version(conn)
        row = await conn.fetchrow(
            f"""INSERT INTO tenants (name, tier, rate_limit_per_minute, rate_limit_per_hour,
                                     monthly_quota, max_concurrency)
                VALUES ($1, $2, $3, $4, $5, $6) RETURNING {COLUMNS}""",
            new.name,
            new.tier,
            new.rate_limit_per_minute,
            new.rate_limit_per_hour,
            new.monthly_quota,
            new.max_concurrency,
        )
        tenant = from_row(row)
        key_id = await conn.fetchval(
            "INSERT INTO api_keys (tenant_id, key_hash, prefix) VALUES ($1::uuid, $2, $3) RETURNING id::text",
            tenant.id,
            keys.hash_key(api_key),
            keys.display_prefix(api_key),
        )
        await record(conn, actor, "create", "tenant", tenant.id, version, after=asdict(tenant))
        await record(conn, actor, "create", "api_key", key_id, version, after={"tenant_id": tenant.id})
    return Created(tenant, api_key, version)


async def get(db: Database, tenant_id: str) -> TenantRecord:
    async with db.connection() as conn:
        row = await conn.fetchrow(f"SELECT {COLUMNS} FROM tenants WHERE id = $1::uuid", tenant_id)
    if row is None:
        raise NotFound("no such tenant")
    return from_row(row)


async def list_page(db: Database, limit: int, after: int, only_id: str | None = None) -> Page:
    """Tenants in creation order after the cursor ``after`` (a seq). Rows inserted while a
    client pages through appear on a later page, never twice and never in place of another."""
    async with db.connection() as conn:
        rows = await conn.fetch(
            f"""SELECT {COLUMNS}, seq FROM tenants
                 WHERE seq > $1 AND ($3::uuid IS NULL OR id = $3::uuid)
                 ORDER BY seq LIMIT $2""",
            after,
            limit + 1,
            only_id,
        )
    more = len(rows) > limit
    rows = rows[:limit]
    return Page([from_row(r) for r in rows], rows[-1]["seq"] if more and rows else None)


async def update(db: Database, actor: Actor, tenant_id: str, changes: dict[str, Any]) -> tuple[TenantRecord, int]:
    unknown = set(changes) - UPDATABLE
    assert not unknown, f"not updatable: {unknown}"
    async with db.transaction() as conn:
        version = await bump_version(conn)
        before_row = await conn.fetchrow(f"SELECT {COLUMNS} FROM tenants WHERE id = $1::uuid FOR UPDATE", tenant_id)
        if before_row is None:
            raise NotFound("no such tenant")
        before = from_row(before_row)
        if changes:
            names = sorted(changes)
            assignments = ", ".join(f"{name} = ${i + 2}" for i, name in enumerate(names))
            row = await conn.fetchrow(
                f"UPDATE tenants SET {assignments}, updated_at = now() WHERE id = $1::uuid RETURNING {COLUMNS}",
                tenant_id,
                *(changes[n] for n in names),
            )
            after = from_row(row)
        else:
            after = before
        await record(conn, actor, "update", "tenant", tenant_id, version, before=asdict(before), after=asdict(after))
    return after, version


async def delete(db: Database, actor: Actor, tenant_id: str) -> int:
    """Delete a tenant with its keys; every key stops working once the snapshot propagates."""
    async with db.transaction() as conn:
        version = await bump_version(conn)
        # A route restricted to this tenant would otherwise keep a dangling id (or, emptied,
        # open up to every tenant): the operator decides what that route becomes.
        using = await conn.fetch(
            "SELECT id::text FROM routes WHERE $1::uuid = ANY(tenants) ORDER BY seq LIMIT 5", tenant_id
        )
        if using:
            ids = ", ".join(r["id"] for r in using)
            raise Conflict(
                f"routes still name this tenant in their tenants list ({ids}); change them first",
                code="tenant_in_use",
            )
        row = await conn.fetchrow(f"DELETE FROM tenants WHERE id = $1::uuid RETURNING {COLUMNS}", tenant_id)
        if row is None:
            raise NotFound("no such tenant")
        await record(conn, actor, "delete", "tenant", tenant_id, version, before=asdict(from_row(row)))
    return version


async def create_key(db: Database, actor: Actor, tenant_id: str) -> tuple[KeyRecord, str, int]:
    api_key = keys.generate_api_key()
    async with db.transaction() as conn:
        version = await bump_version(conn)
        # Lock the tenant row: concurrent key creations for one tenant count live keys in turn.
        exists = await conn.fetchval("SELECT 1 FROM tenants WHERE id = $1::uuid FOR UPDATE", tenant_id)
        if exists is None:
            raise NotFound("no such tenant")
        live = await conn.fetchval(
            "SELECT count(*) FROM api_keys WHERE tenant_id = $1::uuid AND revoked_at IS NULL", tenant_id
        )
        if live >= MAX_LIVE_KEYS:
            raise Conflict(
                f"a tenant may hold at most {MAX_LIVE_KEYS} live keys; revoke one first", code="too_many_keys"
            )
        row = await conn.fetchrow(
            f"""INSERT INTO api_keys (tenant_id, key_hash, prefix) VALUES ($1::uuid, $2, $3)
                RETURNING {KEY_COLUMNS}""",
            tenant_id,
            keys.hash_key(api_key),
            keys.display_prefix(api_key),
        )
        key = _key(row)
        await record(conn, actor, "create", "api_key", key.id, version, after=asdict(key))
    return key, api_key, version


async def list_keys(db: Database, tenant_id: str) -> list[KeyRecord]:
    async with db.connection() as conn:
        exists = await conn.fetchval("SELECT 1 FROM tenants WHERE id = $1::uuid", tenant_id)
        if exists is None:
            raise NotFound("no such tenant")
        rows = await conn.fetch(
            f"SELECT {KEY_COLUMNS} FROM api_keys WHERE tenant_id = $1::uuid ORDER BY created_at, id", tenant_id
        )
    return [_key(r) for r in rows]


async def revoke_key(db: Database, actor: Actor, tenant_id: str, key_id: str) -> tuple[KeyRecord, int]:
    async with db.transaction() as conn:
        version = await bump_version(conn)
        before = await conn.fetchrow(
            f"SELECT {KEY_COLUMNS} FROM api_keys WHERE id = $1::uuid AND tenant_id = $2::uuid FOR UPDATE",
            key_id,
            tenant_id,
        )
        if before is None:
            raise NotFound("no such key for this tenant")
        row = await conn.fetchrow(
            f"UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE id = $1::uuid RETURNING {KEY_COLUMNS}",
            key_id,
        )
        key = _key(row)
        await record(conn, actor, "revoke", "api_key", key_id, version, before=asdict(_key(before)), after=asdict(key))
    return key, version

"""Admin tokens: stored as SHA-256 hashes, looked up by hash."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime

import asyncpg

from control_plane.errors import NotFound, Unprocessable
from control_plane.store.audit import Actor, record
from control_plane.store.config import bump_version
from control_plane.store.db import Database
from shared import keys


@dataclass(frozen=True, slots=True)
class TokenRecord:
    id: str
    name: str
    role: str
    tenant_id: str | None
    prefix: str
    created_by: str
    created_at: datetime
    revoked_at: datetime | None


@dataclass(frozen=True, slots=True)
class Created:
    token: TokenRecord
    secret: str  # plaintext, shown once
    config_version: int


_COLUMNS = "id::text, name, role, tenant_id::text, prefix, created_by, created_at, revoked_at"


def _record(row: asyncpg.Record) -> TokenRecord:
    return TokenRecord(**dict(row))


async def find_live_by_hash(db: Database, token_hash: bytes) -> TokenRecord | None:
    async with db.connection() as conn:
        row = await conn.fetchrow(
            f"SELECT {_COLUMNS} FROM admin_tokens WHERE token_hash = $1 AND revoked_at IS NULL", token_hash
        )
    return _record(row) if row is not None else None


async def create(db: Database, actor: Actor, name: str, role: str, tenant_id: str | None) -> Created:
    secret = keys.generate_token()
    async with db.transaction() as conn:
        version = await bump_version(conn)
        if tenant_id is not None:
            exists = await conn.fetchval("SELECT 1 FROM tenants WHERE id = $1::uuid", tenant_id)
            if exists is None:
                raise Unprocessable("tenant_id", "no such tenant")
        row = await conn.fetchrow(
            f"""INSERT INTO admin_tokens (name, role, tenant_id, token_hash, prefix, created_by)
                VALUES ($1, $2, $3::uuid, $4, $5, $6) RETURNING {_COLUMNS}""",
            name,
            role,
            tenant_id,
            keys.hash_key(secret),
            secret[: len(keys.ADMIN_TOKEN_PREFIX) + keys.DISPLAY_PREFIX_CHARS],
            actor.name,
        )
        token = _record(row)
        await record(conn, actor, "create", "admin_token", token.id, version, after=asdict(token))
    return Created(token, secret, version)


async def list_all(db: Database) -> list[TokenRecord]:
    async with db.connection() as conn:
        rows = await conn.fetch(f"SELECT {_COLUMNS} FROM admin_tokens ORDER BY seq")
    return [_record(r) for r in rows]


async def revoke(db: Database, actor: Actor, token_id: str) -> tuple[TokenRecord, int]:
    async with db.transaction() as conn:
        version = await bump_version(conn)
        before = await conn.fetchrow(f"SELECT {_COLUMNS} FROM admin_tokens WHERE id = $1::uuid FOR UPDATE", token_id)
        if before is None:
            raise NotFound("no such admin token")
        row = await conn.fetchrow(
            f"""UPDATE admin_tokens SET revoked_at = coalesce(revoked_at, now())
                WHERE id = $1::uuid RETURNING {_COLUMNS}""",
            token_id,
        )
        token = _record(row)
        await record(
            conn, actor, "revoke", "admin_token", token.id, version, before=asdict(_record(before)), after=asdict(token)
        )
    return token, version

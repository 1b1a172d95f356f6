"""Tenants' OAuth clients (client credentials grant). The secret is returned once, at creation,
and stored only as its SHA-256 hash; every write bumps the config version and is audited."""

from __future__ import annotations

import secrets
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Final

import asyncpg

from control_plane.errors import Conflict, NotFound
from control_plane.store.audit import Actor, record
from control_plane.store.config import bump_version
from control_plane.store.db import Database
from shared import keys

CLIENT_ID_PREFIX: Final = "tgc_"
CLIENT_SECRET_PREFIX: Final = "tgcs_"  # noqa: S105 - a prefix, not a secret
# The client_id is public; 128 random bits only make it unguessable as an identifier.
CLIENT_ID_RANDOM_BYTES: Final = 16
# Live clients a tenant may hold at once: enough for any rotation scheme, bounded for the snapshot.
MAX_LIVE_CLIENTS: Final = 50


@dataclass(frozen=True, slots=True)
class ClientRecord:
    id: str
    tenant_id: str
    name: str
    client_id: str
    scopes: tuple[str, ...]
    created_at: datetime
    revoked_at: datetime | None


@dataclass(frozen=True, slots=True)
class Created:
    client: ClientRecord
    secret: str  # plaintext, returned to the operator once
    config_version: int


_COLUMNS: Final = "id::text, tenant_id::text, name, client_id, scopes, created_at, revoked_at"


def _record(row: asyncpg.Record) -> ClientRecord:
    return ClientRecord(**{**dict(row), "scopes": tuple(row["scopes"])})


def generate_client_id() -> str:
    return CLIENT_ID_PREFIX + secrets.token_urlsafe(CLIENT_ID_RANDOM_BYTES)


async def create(db: Database, actor: Actor, tenant_id: str, name: str, scopes: tuple[str, ...]) -> Created:
    secret = keys.generate_token(CLIENT_SECRET_PREFIX)
    async with db.transaction() as conn:
        version = await bump_version(conn)
        # Lock the tenant row: concurrent creations for one tenant count live clients in turn.
        exists = await conn.fetchval("SELECT 1 FROM tenants WHERE id = $1::uuid FOR UPDATE", tenant_id)
        if exists is None:
            raise NotFound("no such tenant")
        live = await conn.fetchval(
            "SELECT count(*) FROM oauth_clients WHERE tenant_id = $1::uuid AND revoked_at IS NULL", tenant_id
        )
        if live >= MAX_LIVE_CLIENTS:
            raise Conflict(
                f"a tenant may hold at most {MAX_LIVE_CLIENTS} live OAuth clients; revoke one first",
                code="too_many_clients",
            )
        row = await conn.fetchrow(
            f"""INSERT INTO oauth_clients (tenant_id, name, client_id, secret_hash, scopes)
                VALUES ($1::uuid, $2, $3, $4, $5) RETURNING {_COLUMNS}""",
            tenant_id,
            name,
            generate_client_id(),
            keys.hash_key(secret),
            list(scopes),
        )
        client = _record(row)
        await record(conn, actor, "create", "oauth_client", client.id, version, after=asdict(client))
    return Created(client, secret, version)


async def list_for_tenant(db: Database, tenant_id: str) -> list[ClientRecord]:
    async with db.connection() as conn:
        exists = await conn.fetchval("SELECT 1 FROM tenants WHERE id = $1::uuid", tenant_id)
        if exists is None:
            raise NotFound("no such tenant")
        rows = await conn.fetch(
            f"SELECT {_COLUMNS} FROM oauth_clients WHERE tenant_id = $1::uuid ORDER BY seq", tenant_id
        )
    return [_record(r) for r in rows]


async def get(db: Database, tenant_id: str, client_row_id: str) -> ClientRecord:
    async with db.connection() as conn:
        row = await conn.fetchrow(
            f"SELECT {_COLUMNS} FROM oauth_clients WHERE id = $1::uuid AND tenant_id = $2::uuid",
            client_row_id,
            tenant_id,
        )
    if row is None:
        raise NotFound("no such OAuth client for this tenant")
    return _record(row)


async def revoke(db: Database, actor: Actor, tenant_id: str, client_row_id: str) -> tuple[ClientRecord, int]:
    """Revoke a client: it leaves the snapshot, so its secret stops working on every data plane."""
    async with db.transaction() as conn:
        version = await bump_version(conn)
        before = await conn.fetchrow(
            f"SELECT {_COLUMNS} FROM oauth_clients WHERE id = $1::uuid AND tenant_id = $2::uuid FOR UPDATE",
            client_row_id,
            tenant_id,
        )
        if before is None:
            raise NotFound("no such OAuth client for this tenant")
        row = await conn.fetchrow(
            f"""UPDATE oauth_clients SET revoked_at = coalesce(revoked_at, now())
                WHERE id = $1::uuid RETURNING {_COLUMNS}""",
            client_row_id,
        )
        client = _record(row)
        await record(
            conn,
            actor,
            "revoke",
            "oauth_client",
            client.id,
            version,
            before=asdict(_record(before)),
            after=asdict(client),
        )
    return client, version

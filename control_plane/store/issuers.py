"""Tenants' JWT issuers. Every admin write bumps the config version and is audited, in one
transaction with the change.

An HS256 issuer's secret is written here and read only by the snapshot builder
(``store/config.py``): no record returned from this module carries it, so it can reach neither
an API response nor the audit trail.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import asyncpg

from control_plane.errors import Conflict, NotFound
from control_plane.store.audit import Actor, record
from control_plane.store.config import bump_version
from control_plane.store.db import Database

# Issuers a tenant may hold: plenty for any migration between identity providers, bounded for the snapshot.
MAX_ISSUERS_PER_TENANT: Final = 20
FETCHER: Final = Actor("jwks-fetcher", "system")


@dataclass(frozen=True, slots=True)
class NewIssuer:
    issuer: str
    audience: str
    algorithms: tuple[str, ...]
    # Exactly one of the four.
    jwks: dict[str, Any] | None = None
    jwks_uri: str | None = None
    public_key_pem: str | None = None
    hs256_secret: bytes | None = None


@dataclass(frozen=True, slots=True)
class IssuerRecord:
    id: str
    tenant_id: str
    issuer: str
    audience: str
    algorithms: tuple[str, ...]
    key_source: str  # "jwks" | "jwks_uri" | "public_key_pem" | "hs256_secret"
    jwks: dict[str, Any] | None
    jwks_uri: str | None
    public_key_pem: str | None
    fetched_jwks: dict[str, Any] | None
    jwks_fetched_at: datetime | None
    jwks_error: str | None
    created_at: datetime


@dataclass(frozen=True, slots=True)
class UriIssuer:
    """What the JWKS fetcher needs of one jwks_uri issuer."""

    id: str
    jwks_uri: str
    algorithms: tuple[str, ...]
    fetched_age_s: float | None  # seconds since the last good fetch, by the database clock
    jwks_error: str | None


_COLUMNS: Final = (
    "id::text, tenant_id::text, issuer, audience, algorithms, jwks::text AS jwks, jwks_uri, public_key_pem,"
    " hs256_secret IS NOT NULL AS has_secret, fetched_jwks::text AS fetched_jwks, jwks_fetched_at, jwks_error,"
    " created_at"
)


def _json(text: str | None) -> dict[str, Any] | None:
    return None if text is None else dict(json.loads(text))


def _record(row: asyncpg.Record) -> IssuerRecord:
    if row["jwks"] is not None:
        source = "jwks"
    elif row["jwks_uri"] is not None:
        source = "jwks_uri"
    elif row["public_key_pem"] is not None:
        source = "public_key_pem"
    else:
        source = "hs256_secret"
    return IssuerRecord(
        id=row["id"],
        tenant_id=row["tenant_id"],
        issuer=row["issuer"],
        audience=row["audience"],
        algorithms=tuple(row["algorithms"]),
        key_source=source,
        jwks=_json(row["jwks"]),
        jwks_uri=row["jwks_uri"],
        public_key_pem=row["public_key_pem"],
        fetched_jwks=_json(row["fetched_jwks"]),
        jwks_fetched_at=row["jwks_fetched_at"],
        jwks_error=row["jwks_error"],
        created_at=row["created_at"],
    )


def _kids(jwks: dict[str, Any] | None) -> list[Any] | None:
    return None if jwks is None else [k.get("kid") for k in jwks.get("keys", []) if isinstance(k, dict)]


def audit_view(issuer: IssuerRecord) -> dict[str, Any]:
    """What the audit trail keeps of an issuer: no key material, only key ids."""
    return {
        "id": issuer.id,
        "tenant_id": issuer.tenant_id,
        "issuer": issuer.issuer,
        "audience": issuer.audience,
        "algorithms": list(issuer.algorithms),
        "key_source": issuer.key_source,
        "jwks_uri": issuer.jwks_uri,
        "kids": _kids(issuer.jwks),
    }


async def create(db: Database, actor: Actor, tenant_id: str, new: NewIssuer) -> tuple[IssuerRecord, int]:
    sources = (new.jwks, new.jwks_uri, new.public_key_pem, new.hs256_secret)
    assert sum(s is not None for s in sources) == 1, "exactly one key source"
    async with db.transaction() as conn:
        version = await bump_version(conn)
        exists = await conn.fetchval("SELECT 1 FROM tenants WHERE id = $1::uuid FOR UPDATE", tenant_id)
        if exists is None:
            raise NotFound("no such tenant")
        count = await conn.fetchval("SELECT count(*) FROM jwt_issuers WHERE tenant_id = $1::uuid", tenant_id)
        if count >= MAX_ISSUERS_PER_TENANT:
            raise Conflict(
                f"a tenant may hold at most {MAX_ISSUERS_PER_TENANT} JWT issuers; delete one first",
                code="too_many_issuers",
            )
        taken = await conn.fetchval(
            "SELECT 1 FROM jwt_issuers WHERE tenant_id = $1::uuid AND issuer = $2", tenant_id, new.issuer
        )
        if taken is not None:
            raise Conflict(f"this tenant already has the issuer {new.issuer!r}", code="duplicate_issuer")
        claimed = await conn.fetchval(
            "SELECT 1 FROM jwt_issuers WHERE issuer = $1 AND audience = $2", new.issuer, new.audience
        )
        if claimed is not None:
            # A token's (iss, aud) must name one tenant, or tenant resolution would be ambiguous.
            raise Conflict("this issuer and audience are already registered", code="duplicate_issuer")
        row = await conn.fetchrow(
            f"""INSERT INTO jwt_issuers (tenant_id, issuer, audience, algorithms, jwks, jwks_uri, public_key_pem,
                                         hs256_secret)
                VALUES ($1::uuid, $2, $3, $4, $5::jsonb, $6, $7, $8) RETURNING {_COLUMNS}""",
            tenant_id,
            new.issuer,
            new.audience,
            list(new.algorithms),
            None if new.jwks is None else json.dumps(new.jwks),
            new.jwks_uri,
            new.public_key_pem,
            new.hs256_secret,
        )
        issuer = _record(row)
        await record(conn, actor, "create", "jwt_issuer", issuer.id, version, after=audit_view(issuer))
    return issuer, version


async def list_for_tenant(db: Database, tenant_id: str) -> list[IssuerRecord]:
    async with db.connection() as conn:
        exists = await conn.fetchval("SELECT 1 FROM tenants WHERE id = $1::uuid", tenant_id)
        if exists is None:
            raise NotFound("no such tenant")
        rows = await conn.fetch(
            f"SELECT {_COLUMNS} FROM jwt_issuers WHERE tenant_id = $1::uuid ORDER BY seq", tenant_id
        )
    return [_record(r) for r in rows]


async def list_all(db: Database) -> list[IssuerRecord]:
    """Every tenant's issuers, by tenant then creation (for ``tenantgate export``/``apply``)."""
    async with db.connection() as conn:
        rows = await conn.fetch(f"SELECT {_COLUMNS} FROM jwt_issuers ORDER BY tenant_id, seq")
    return [_record(r) for r in rows]


async def get(db: Database, tenant_id: str, issuer_id: str) -> IssuerRecord:
    async with db.connection() as conn:
        row = await conn.fetchrow(
            f"SELECT {_COLUMNS} FROM jwt_issuers WHERE id = $1::uuid AND tenant_id = $2::uuid", issuer_id, tenant_id
        )
    if row is None:
        raise NotFound("no such JWT issuer for this tenant")
    return _record(row)


async def delete(db: Database, actor: Actor, tenant_id: str, issuer_id: str) -> int:
    """Delete an issuer: its tokens stop verifying once the snapshot propagates."""
    async with db.transaction() as conn:
        version = await bump_version(conn)
        row = await conn.fetchrow(
            f"DELETE FROM jwt_issuers WHERE id = $1::uuid AND tenant_id = $2::uuid RETURNING {_COLUMNS}",
            issuer_id,
            tenant_id,
        )
        if row is None:
            raise NotFound("no such JWT issuer for this tenant")
        await record(conn, actor, "delete", "jwt_issuer", issuer_id, version, before=audit_view(_record(row)))
    return version


# --- for the JWKS fetcher ---


async def list_uri_issuers(db: Database) -> list[UriIssuer]:
    async with db.connection() as conn:
        rows = await conn.fetch(
            """SELECT id::text, jwks_uri, algorithms, jwks_error,
                      extract(epoch FROM now() - jwks_fetched_at)::float8 AS fetched_age_s
                 FROM jwt_issuers WHERE jwks_uri IS NOT NULL ORDER BY seq"""
        )
    return [
        UriIssuer(r["id"], r["jwks_uri"], tuple(r["algorithms"]), r["fetched_age_s"], r["jwks_error"]) for r in rows
    ]


class _Gone(Exception):
    """The issuer was deleted while its keys were being fetched: roll the version bump back."""


async def save_fetched(db: Database, issuer_id: str, jwks: dict[str, Any]) -> int | None:
    """Store freshly fetched keys and clear the fetch error. Returns the new config version if
    the keys changed (bumped and audited), None if they did not (no bump: nothing a data plane
    sees changed) or the issuer is gone."""
    async with db.connection() as conn:
        stored = await conn.fetchval(
            "SELECT fetched_jwks::text FROM jwt_issuers WHERE id = $1::uuid AND jwks_uri IS NOT NULL", issuer_id
        )
    if stored is not None and json.loads(stored) == jwks:
        async with db.connection() as conn:
            await conn.execute(
                "UPDATE jwt_issuers SET jwks_fetched_at = now(), jwks_error = NULL WHERE id = $1::uuid", issuer_id
            )
        return None
    # Changed (or first keys). The version is bumped before the issuer row is touched, in the
    # order every admin write takes its locks.
    try:
        async with db.transaction() as conn:
            version = await bump_version(conn)
            updated = await conn.fetchval(
                """UPDATE jwt_issuers SET fetched_jwks = $2::jsonb, jwks_fetched_at = now(), jwks_error = NULL
                    WHERE id = $1::uuid AND jwks_uri IS NOT NULL RETURNING id::text""",
                issuer_id,
                json.dumps(jwks),
            )
            if updated is None:
                raise _Gone
            await record(
                conn,
                FETCHER,
                "update_keys",
                "jwt_issuer",
                issuer_id,
                version,
                before={"kids": _kids(_json(stored))},
                after={"kids": _kids(jwks)},
            )
    except _Gone:
        return None
    return version


async def save_fetch_error(db: Database, issuer_id: str, error: str) -> None:
    """Record why the last fetch failed; the last good keys stay (nothing a data plane sees changes)."""
    async with db.connection() as conn:
        await conn.execute("UPDATE jwt_issuers SET jwks_error = $2 WHERE id = $1::uuid", issuer_id, error[:1000])

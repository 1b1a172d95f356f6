"""The config version and the consistent read that a snapshot is built from."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Final

import asyncpg

from control_plane.store.db import Database
from shared import snapshot as model

if TYPE_CHECKING:
    from control_plane.store.routes import RouteRecord
    from control_plane.store.tenants import TenantRecord

# Every committed change is announced on this channel (payload: the new version) so that
# every control-plane replica rebuilds its snapshot.
NOTIFY_CHANNEL: Final = "tenantgate_config"


async def bump_version(conn: asyncpg.Connection) -> int:
    """Increment the config version inside the caller's transaction and return it.

    The row lock this takes serialises writers, so versions strictly increase in commit order.
    """
    version: int = await conn.fetchval(
        "UPDATE config_version SET version = version + 1, updated_at = now() WHERE id = 1 RETURNING version"
    )
    await conn.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, str(version))
    return version


async def current_version(db: Database) -> int:
    async with db.connection() as conn:
        version: int = await conn.fetchval("SELECT version FROM config_version WHERE id = 1")
        return version


async def load_snapshot(db: Database) -> model.Snapshot:
    """Read everything a data plane needs in one repeatable-read transaction, so the version
    and the content agree."""
    from control_plane.store import routes  # routes imports bump_version from here

    async with db.transaction(isolation="repeatable_read") as conn:
        version = await conn.fetchval("SELECT version FROM config_version WHERE id = 1")
        tenant_rows = await conn.fetch(
            """SELECT id::text, name, tier, rate_limit_per_minute, rate_limit_per_hour,
                      monthly_quota, max_concurrency, is_active
                 FROM tenants ORDER BY seq"""
        )
        key_rows = await conn.fetch(
            "SELECT id::text, tenant_id::text, key_hash FROM api_keys WHERE revoked_at IS NULL ORDER BY id"
        )
        route_rows = await conn.fetch(f"SELECT {routes.COLUMNS} FROM routes WHERE is_active ORDER BY seq")
        issuer_rows = await conn.fetch(
            """SELECT id::text, tenant_id::text, issuer, audience, algorithms,
                      coalesce(jwks, fetched_jwks)::text AS jwks_json, public_key_pem, hs256_secret
                 FROM jwt_issuers ORDER BY seq"""
        )
        client_rows = await conn.fetch(
            """SELECT id::text, tenant_id::text, client_id, secret_hash, scopes
                 FROM oauth_clients WHERE revoked_at IS NULL ORDER BY seq"""
        )
        signing_rows = await conn.fetch(
            """SELECT kid, algorithm, private_key_pem, public_jwk::text AS public_jwk_json
                 FROM signing_keys WHERE retired_at IS NULL ORDER BY created_at, kid"""
        )
    return model.Snapshot(
        version=version,
        built_at_ms=model.now_ms(),
        tenants=tuple(
            model.Tenant(
                id=r["id"],
                name=r["name"],
                tier=r["tier"],
                rate_limit_per_minute=r["rate_limit_per_minute"],
                rate_limit_per_hour=r["rate_limit_per_hour"],
                monthly_quota=r["monthly_quota"],
                max_concurrency=r["max_concurrency"],
                is_active=r["is_active"],
            )
            for r in tenant_rows
        ),
        api_keys=tuple(
            model.ApiKey(id=r["id"], tenant_id=r["tenant_id"], key_hash=bytes(r["key_hash"])) for r in key_rows
        ),
        routes=tuple(routes.to_model(routes.from_row(r)) for r in route_rows),
        jwt_issuers=tuple(_jwt_issuer(r) for r in issuer_rows),
        oauth_clients=tuple(
            model.OAuthClient(
                id=r["id"],
                tenant_id=r["tenant_id"],
                client_id=r["client_id"],
                secret_hash=bytes(r["secret_hash"]),
                scopes=tuple(r["scopes"]),
            )
            for r in client_rows
        ),
        signing_keys=tuple(model.SigningKey(**dict(r)) for r in signing_rows),
    )


def _jwt_issuer(r: asyncpg.Record) -> model.JwtIssuer:
    """An issuer with its effective keys: inline, last fetched from jwks_uri, or from its PEM."""
    from control_plane.jwks import EMPTY_JWKS, snapshot_pem_jwks

    if r["jwks_json"] is not None:
        jwks_json = r["jwks_json"]
    elif r["public_key_pem"] is not None:
        jwks_json = snapshot_pem_jwks(r["id"], r["public_key_pem"])
    else:
        jwks_json = EMPTY_JWKS  # HS256, or a jwks_uri not fetched yet
    return model.JwtIssuer(
        id=r["id"],
        tenant_id=r["tenant_id"],
        issuer=r["issuer"],
        audience=r["audience"],
        algorithms=tuple(r["algorithms"]),
        jwks_json=jwks_json,
        hs256_secret=bytes(r["hs256_secret"] or b""),
    )


@dataclass(frozen=True, slots=True)
class ConfigView:
    version: int
    updated_at: datetime
    routes: list[RouteRecord]
    tenants: list[TenantRecord]


async def read_all(db: Database) -> ConfigView:
    """Routes and tenants as the admin API shows them, at one version (repeatable read)."""
    from control_plane.store import routes, tenants

    async with db.transaction(isolation="repeatable_read") as conn:
        row = await conn.fetchrow("SELECT version, updated_at FROM config_version WHERE id = 1")
        route_rows = await conn.fetch(f"SELECT {routes.COLUMNS} FROM routes ORDER BY seq")
        tenant_rows = await conn.fetch(f"SELECT {tenants.COLUMNS} FROM tenants ORDER BY seq")
    return ConfigView(
        row["version"],
        row["updated_at"],
        [routes.from_row(r) for r in route_rows],
        [tenants.from_row(r) for r in tenant_rows],
    )

"""The config version and the consistent read that a snapshot is built from."""

from __future__ import annotations

from typing import Final

import asyncpg

from control_plane.store.db import Database
from shared import snapshot as model

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
        route_rows = await conn.fetch(
            """SELECT id::text, path_pattern, upstream_url, methods, auth_required, rate_limit_override,
                      timeout_ms, strip_prefix, priority
                 FROM routes WHERE is_active ORDER BY seq"""
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
            model.ApiKey(id=r["id"], tenant_id=r["tenant_id"], key_hash=bytes(r["key_hash"]))
            for r in key_rows
        ),
        routes=tuple(
            model.Route(
                id=r["id"],
                path=r["path_pattern"],
                methods=tuple(r["methods"]),
                upstreams=(model.Upstream(url=r["upstream_url"], weight=1),),
                auth_required=r["auth_required"],
                rate_limit=r["rate_limit_override"] or 0,
                timeout_ms=r["timeout_ms"],
                strip_prefix=r["strip_prefix"],
                priority=r["priority"],
            )
            for r in route_rows
        ),
    )

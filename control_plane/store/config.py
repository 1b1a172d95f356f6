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


# Past this many changed objects, one full read is cheaper than fetching them by id.
MAX_CHANGED_OBJECTS: Final = 20_000
KINDS: Final = ("tenant", "api_key", "route", "jwt_issuer", "oauth_client", "signing_key")


@dataclass(frozen=True, slots=True)
class ConfigRows:
    """Snapshot objects read at one version, by id.

    ``full``: every live object (a whole snapshot). Otherwise only the objects changed since
    the version asked for, with ``None`` for those gone from the snapshot (deleted, revoked,
    retired or deactivated). Routes come with their ``seq``: their order in the snapshot.
    ``epoch``: the database's config epoch (migration 0008) the version counts in."""

    version: int
    full: bool
    tenants: dict[str, model.Tenant | None]
    api_keys: dict[str, model.ApiKey | None]
    routes: dict[str, tuple[int, model.Route] | None]
    jwt_issuers: dict[str, model.JwtIssuer | None]
    oauth_clients: dict[str, model.OAuthClient | None]
    signing_keys: dict[str, model.SigningKey | None]
    epoch: str = ""

    @property
    def changed(self) -> int:
        return sum(
            len(d)
            for d in (
                self.tenants,
                self.api_keys,
                self.routes,
                self.jwt_issuers,
                self.oauth_clients,
                self.signing_keys,
            )
        )


async def load_snapshot(db: Database) -> model.Snapshot:
    """Read everything a data plane needs in one repeatable-read transaction, so the version
    and the content agree."""
    rows = await load_rows(db)
    return model.Snapshot(
        version=rows.version,
        epoch=rows.epoch,
        built_at_ms=model.now_ms(),
        tenants=tuple(t for t in rows.tenants.values() if t is not None),
        api_keys=tuple(k for k in rows.api_keys.values() if k is not None),
        routes=tuple(r[1] for r in rows.routes.values() if r is not None),
        jwt_issuers=tuple(i for i in rows.jwt_issuers.values() if i is not None),
        oauth_clients=tuple(c for c in rows.oauth_clients.values() if c is not None),
        signing_keys=tuple(k for k in rows.signing_keys.values() if k is not None),
    )


async def load_rows(db: Database) -> ConfigRows:
    """Every live snapshot object at the current version (one repeatable-read transaction)."""
    async with db.transaction(isolation="repeatable_read") as conn:
        row = await conn.fetchrow("SELECT version, epoch FROM config_version WHERE id = 1")
        return await _read(conn, row["version"], None, row["epoch"])


async def load_changes(db: Database, since: int, epoch: str) -> ConfigRows | None:
    """The objects changed after version ``since`` of ``epoch``, read at the current version;
    None when the database's epoch is another (its versions are another history), when the
    change log no longer reaches back that far, or when so much changed that a full read is
    cheaper: then call :func:`load_rows`."""
    async with db.transaction(isolation="repeatable_read") as conn:
        row = await conn.fetchrow("SELECT version, epoch FROM config_version WHERE id = 1")
        version: int = row["version"]
        if row["epoch"] != epoch:
            return None
        if version <= since:
            return ConfigRows(version, False, {}, {}, {}, {}, {}, {}, epoch)
        pruned: int = await conn.fetchval("SELECT version FROM config_changes_pruned WHERE id = 1")
        if pruned > since:
            return None
        changes = await conn.fetch(
            f"SELECT DISTINCT kind, object_id FROM config_changes WHERE version > $1 LIMIT {MAX_CHANGED_OBJECTS + 1}",
            since,
        )
        if len(changes) > MAX_CHANGED_OBJECTS:
            return None
        ids: dict[str, list[str]] = {kind: [] for kind in KINDS}
        for row in changes:
            if row["kind"] in ids:
                ids[row["kind"]].append(row["object_id"])
        return await _read(conn, version, ids, epoch)


async def prune_changes(db: Database, older_than_s: float) -> None:
    """Drop change-log rows older than ``older_than_s`` and remember the newest version dropped."""
    async with db.transaction() as conn:
        dropped = await conn.fetchval(
            """WITH gone AS (DELETE FROM config_changes WHERE changed_at < now() - make_interval(secs => $1)
                             RETURNING version)
               SELECT max(version) FROM gone""",
            older_than_s,
        )
        if dropped is not None:
            await conn.execute("UPDATE config_changes_pruned SET version = greatest(version, $1) WHERE id = 1", dropped)


def _where(live: str, key: str, cast: str, ids: list[str] | None) -> tuple[str, tuple[object, ...]]:
    if ids is None:
        return f"WHERE {live}", ()
    return f"WHERE {live} AND {key} = ANY($1::{cast}[])", (ids,)


async def _read(conn: asyncpg.Connection, version: int, ids: dict[str, list[str]] | None, epoch: str) -> ConfigRows:
    """Read the live objects (all, or those named in ``ids`` by kind); a named object that is
    not live comes back as None."""
    from control_plane.store import routes  # routes imports bump_version from here

    def wanted(kind: str) -> list[str] | None:
        return None if ids is None else ids[kind]

    async def fetch(sql: str, kind: str, live: str, key: str, cast: str = "uuid") -> list[asyncpg.Record]:
        if ids is not None and not ids[kind]:
            return []
        where, args = _where(live, key, cast, wanted(kind))
        return list(await conn.fetch(sql.format(where=where), *args))

    tenant_rows = await fetch(
        """SELECT id::text, name, tier, rate_limit_per_minute, rate_limit_per_hour,
                  monthly_quota, max_concurrency, is_active
             FROM tenants {where} ORDER BY seq""",
        "tenant",
        "true",
        "id",
    )
    key_rows = await fetch(
        "SELECT id::text, tenant_id::text, key_hash FROM api_keys {where} ORDER BY id",
        "api_key",
        "revoked_at IS NULL",
        "id",
    )
    route_rows = await fetch(
        f"SELECT seq AS route_seq, {routes.COLUMNS} FROM routes {{where}} ORDER BY seq", "route", "is_active", "id"
    )
    issuer_rows = await fetch(
        """SELECT id::text, tenant_id::text, issuer, audience, algorithms,
                  coalesce(jwks, fetched_jwks)::text AS jwks_json, public_key_pem, hs256_secret
             FROM jwt_issuers {where} ORDER BY seq""",
        "jwt_issuer",
        "true",
        "id",
    )
    client_rows = await fetch(
        """SELECT id::text, tenant_id::text, client_id, secret_hash, scopes
             FROM oauth_clients {where} ORDER BY seq""",
        "oauth_client",
        "revoked_at IS NULL",
        "id",
    )
    signing_rows = await fetch(
        """SELECT kid, algorithm, private_key_pem, public_jwk::text AS public_jwk_json
             FROM signing_keys {where} ORDER BY created_at, kid""",
        "signing_key",
        "retired_at IS NULL",
        "kid",
        "text",
    )

    def gone(kind: str) -> dict[str, None]:
        return {} if ids is None else dict.fromkeys(ids[kind])

    def route(r: asyncpg.Record) -> tuple[int, model.Route]:
        values = dict(r)
        seq: int = values.pop("route_seq")
        return seq, routes.to_model(routes.from_row(values))

    return ConfigRows(
        version=version,
        full=ids is None,
        tenants=gone("tenant")
        | {
            r["id"]: model.Tenant(
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
        },
        api_keys=gone("api_key")
        | {
            r["id"]: model.ApiKey(id=r["id"], tenant_id=r["tenant_id"], key_hash=bytes(r["key_hash"])) for r in key_rows
        },
        routes=gone("route") | {r["id"]: route(r) for r in route_rows},
        jwt_issuers=gone("jwt_issuer") | {r["id"]: _jwt_issuer(r) for r in issuer_rows},
        oauth_clients=gone("oauth_client")
        | {
            r["id"]: model.OAuthClient(
                id=r["id"],
                tenant_id=r["tenant_id"],
                client_id=r["client_id"],
                secret_hash=bytes(r["secret_hash"]),
                scopes=tuple(r["scopes"]),
            )
            for r in client_rows
        },
        signing_keys=gone("signing_key") | {r["kid"]: model.SigningKey(**dict(r)) for r in signing_rows},
        epoch=epoch,
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

"""Routes. Every write bumps the config version and is audited, in one transaction with the change.

Writes are checked against the rest of the table under the version row lock (taken first, so
concurrent writers run one after another): an active route may not duplicate another's match
(:class:`Conflict`), and ``tenants`` must name existing tenants (:class:`Unprocessable`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Final

import asyncpg

from control_plane.errors import Conflict, NotFound, Unprocessable
from control_plane.store.audit import Actor, record
from control_plane.store.config import bump_version
from control_plane.store.db import Database
from shared import snapshot as model
from shared.snapshot import CircuitBreaker, HealthCheck, Upstream

# hash_on when a route asks for consistent_hash without saying on what: one tenant's
# requests stick to one target.
DEFAULT_HASH_ON: Final = "tenant"


@dataclass(frozen=True, slots=True)
class NewRoute:
    """A route as written: ``None`` is "off" for the optional fields (the admin API's nulls)."""

    path: str
    upstreams: tuple[Upstream, ...]
    methods: tuple[str, ...] = ()  # empty: every method
    auth_required: bool = True
    rate_limit: int | None = None
    burst: int | None = None
    timeout_ms: int = 30_000
    retries: int = 0
    strip_prefix: bool = False
    priority: int = 0
    is_active: bool = True
    load_balancing: str = model.DEFAULT_LOAD_BALANCING
    hash_on: str | None = None
    host: str | None = None
    headers: dict[str, str] = field(default_factory=dict)  # lower-case names
    tenants: tuple[str, ...] = ()  # empty: every tenant
    tiers: tuple[str, ...] = ()  # empty: every tier
    scopes: tuple[str, ...] = ()
    websocket: bool = False
    max_body_bytes: int = model.DEFAULT_MAX_BODY_BYTES  # 0: unlimited
    rate_limit_shadow: bool = False
    circuit_breaker: CircuitBreaker | None = None
    health_check: HealthCheck | None = None


@dataclass(frozen=True, slots=True)
class RouteRecord:
    id: str
    path: str
    upstreams: tuple[Upstream, ...]
    methods: tuple[str, ...]
    auth_required: bool
    rate_limit: int | None
    burst: int | None
    timeout_ms: int
    retries: int
    strip_prefix: bool
    priority: int
    is_active: bool
    load_balancing: str
    hash_on: str | None
    host: str | None
    headers: dict[str, str]
    tenants: tuple[str, ...]
    tiers: tuple[str, ...]
    scopes: tuple[str, ...]
    websocket: bool
    max_body_bytes: int
    circuit_breaker: CircuitBreaker | None
    health_check: HealthCheck | None
    rate_limit_shadow: bool
    created_at: datetime
    updated_at: datetime

    @property
    def upstream(self) -> str:
        """The first upstream: what the seed's single ``upstream`` field shows."""
        return self.upstreams[0].url


@dataclass(frozen=True, slots=True)
class Created:
    route: RouteRecord
    config_version: int


COLUMNS: Final = (
    "id::text, path_pattern AS path, upstreams::text, methods, auth_required, rate_limit_override AS rate_limit,"
    " burst, timeout_ms, retries, strip_prefix, priority, is_active, load_balancing, hash_on, host, headers::text,"
    " tenants::text[], tiers, scopes, websocket, max_body_bytes, circuit_breaker::text, health_check::text,"
    " rate_limit_shadow, created_at, updated_at"
)
# Every field a PATCH may change: those of NewRoute.
UPDATABLE: Final = frozenset(f.name for f in dataclasses.fields(NewRoute))
# The columns a write sets, in the order of _params(), with the cast each parameter needs.
_WRITTEN: Final = (
    ("path_pattern", ""),
    ("upstream_url", ""),
    ("upstreams", "::jsonb"),
    ("methods", ""),
    ("auth_required", ""),
    ("rate_limit_override", ""),
    ("burst", ""),
    ("timeout_ms", ""),
    ("retries", ""),
    ("strip_prefix", ""),
    ("priority", ""),
    ("is_active", ""),
    ("load_balancing", ""),
    ("hash_on", ""),
    ("host", ""),
    ("headers", "::jsonb"),
    ("tenants", "::uuid[]"),
    ("tiers", ""),
    ("scopes", ""),
    ("websocket", ""),
    ("max_body_bytes", ""),
    ("circuit_breaker", "::jsonb"),
    ("health_check", "::jsonb"),
    ("rate_limit_shadow", ""),
)
_INSERT: Final = (
    f"INSERT INTO routes ({', '.join(col for col, _ in _WRITTEN)})"
    f" VALUES ({', '.join(f'${i}{cast}' for i, (_, cast) in enumerate(_WRITTEN, 1))}) RETURNING {COLUMNS}"
)
# The route id is the parameter after the written columns.
_UPDATE: Final = (
    f"UPDATE routes SET {', '.join(f'{col} = ${i}{cast}' for i, (col, cast) in enumerate(_WRITTEN, 1))},"
    f" updated_at = now() WHERE id = ${len(_WRITTEN) + 1}::uuid RETURNING {COLUMNS}"
)


def from_row(row: asyncpg.Record) -> RouteRecord:
    values = dict(row)
    values["upstreams"] = tuple(Upstream(u["url"], u["weight"]) for u in json.loads(values["upstreams"]))
    for name in ("methods", "tenants", "tiers", "scopes"):
        values[name] = tuple(values[name])
    values["headers"] = json.loads(values["headers"])
    cb, hc = values["circuit_breaker"], values["health_check"]
    values["circuit_breaker"] = None if cb is None else CircuitBreaker(**json.loads(cb))
    values["health_check"] = None if hc is None else HealthCheck(**json.loads(hc))
    return RouteRecord(**values)


def to_model(r: RouteRecord) -> model.Route:
    """The route as the snapshot carries it (zero values for "off")."""
    return model.Route(
        id=r.id,
        path=r.path,
        methods=r.methods,
        upstreams=r.upstreams,
        auth_required=r.auth_required,
        rate_limit=r.rate_limit or 0,
        timeout_ms=r.timeout_ms,
        strip_prefix=r.strip_prefix,
        priority=r.priority,
        load_balancing=r.load_balancing,
        hash_on=r.hash_on or "",
        host=r.host or "",
        headers=tuple(sorted(r.headers.items())),
        tenants=r.tenants,
        tiers=r.tiers,
        scopes=r.scopes,
        retries=r.retries,
        websocket=r.websocket,
        max_body_bytes=r.max_body_bytes,
        circuit_breaker=r.circuit_breaker,
        health_check=r.health_check,
        burst=r.burst or 0,
        rate_limit_shadow=r.rate_limit_shadow,
    )


def _settle(route: NewRoute, sent: set[str]) -> NewRoute:
    """Resolve the options that only mean something with another one set.

    ``hash_on`` belongs to ``consistent_hash`` (default ``tenant`` there, cleared otherwise) and
    ``burst`` to ``rate_limit`` (cleared with it). Sending one explicitly where it cannot apply
    is refused rather than dropped.
    """
    changes: dict[str, Any] = {}
    if route.load_balancing == "consistent_hash":
        if route.hash_on is None:
            if "hash_on" in sent:
                raise Unprocessable("hash_on", "load_balancing consistent_hash needs hash_on")
            changes["hash_on"] = DEFAULT_HASH_ON
    elif route.hash_on is not None:
        if "hash_on" in sent:
            raise Unprocessable("hash_on", "only applies with load_balancing consistent_hash")
        changes["hash_on"] = None
    if route.rate_limit is None and route.burst is not None:
        if "burst" in sent:
            raise Unprocessable("burst", "needs a rate_limit on the route")
        changes["burst"] = None
    return dataclasses.replace(route, **changes) if changes else route


async def _check(conn: asyncpg.Connection, route: NewRoute, route_id: str | None) -> None:
    if route.is_active:
        clash = await conn.fetchval(
            """SELECT id::text FROM routes
                WHERE is_active AND path_pattern = $1 AND priority = $2
                  AND host IS NOT DISTINCT FROM $3 AND headers = $4::jsonb
                  AND (cardinality(methods) = 0 OR cardinality($5::varchar[]) = 0 OR methods && $5)
                  AND ($6::uuid IS NULL OR id <> $6::uuid)
                ORDER BY seq LIMIT 1""",
            route.path,
            route.priority,
            route.host,
            json.dumps(route.headers),
            list(route.methods),
            route_id,
        )
        if clash is not None:
            raise Conflict(
                f"route {clash} already serves {route.path} with the same host, headers and priority for these methods",
                code="route_conflict",
            )
    if route.tenants:
        missing = await conn.fetch(
            """SELECT t::text FROM unnest($1::uuid[]) AS t
                WHERE NOT EXISTS (SELECT 1 FROM tenants WHERE id = t) ORDER BY 1""",
            list(route.tenants),
        )
        if missing:
            raise Unprocessable("tenants", f"no such tenants: {', '.join(r[0] for r in missing)}")


def _params(route: NewRoute) -> tuple[Any, ...]:
    """Column values in the order of ``_WRITTEN``."""
    return (
        route.path,
        route.upstreams[0].url,
        json.dumps([{"url": u.url, "weight": u.weight} for u in route.upstreams]),
        list(route.methods),
        route.auth_required,
        route.rate_limit,
        route.burst,
        route.timeout_ms,
        route.retries,
        route.strip_prefix,
        route.priority,
        route.is_active,
        route.load_balancing,
        route.hash_on,
        route.host,
        json.dumps(route.headers, sort_keys=True),
        list(route.tenants),
        list(route.tiers),
        list(route.scopes),
        route.websocket,
        route.max_body_bytes,
        None if route.circuit_breaker is None else json.dumps(asdict(route.circuit_breaker)),
        None if route.health_check is None else json.dumps(asdict(route.health_check)),
        route.rate_limit_shadow,
    )


def _as_new(r: RouteRecord) -> NewRoute:
    return NewRoute(**{name: getattr(r, name) for name in UPDATABLE})


async def create(db: Database, actor: Actor, new: NewRoute, sent: set[str] | None = None) -> Created:
    """Insert a route and bump the config version, atomically.

    ``sent`` names the fields the caller gave explicitly (default: every non-``None`` one).
    """
    route = _settle(new, sent if sent is not None else {k for k in UPDATABLE if getattr(new, k) is not None})
    async with db.transaction() as conn:
        version = await bump_version(conn)
        await _check(conn, route, None)
        row = await conn.fetchrow(_INSERT, *_params(route))
        created = from_row(row)
        await record(conn, actor, "create", "route", created.id, version, after=asdict(created))
    return Created(created, version)


async def list_all(db: Database) -> list[RouteRecord]:
    async with db.connection() as conn:
        rows = await conn.fetch(f"SELECT {COLUMNS} FROM routes ORDER BY seq")
    return [from_row(r) for r in rows]


async def get(db: Database, route_id: str) -> RouteRecord:
    async with db.connection() as conn:
        row = await conn.fetchrow(f"SELECT {COLUMNS} FROM routes WHERE id = $1::uuid", route_id)
    if row is None:
        raise NotFound("no such route")
    return from_row(row)


async def update(db: Database, actor: Actor, route_id: str, changes: dict[str, Any]) -> tuple[RouteRecord, int]:
    """Change only the fields in ``changes`` (``None`` turns an optional field off); the result
    is checked whole, as if it were created."""
    unknown = set(changes) - UPDATABLE
    assert not unknown, f"not updatable: {unknown}"
    async with db.transaction() as conn:
        version = await bump_version(conn)
        before_row = await conn.fetchrow(f"SELECT {COLUMNS} FROM routes WHERE id = $1::uuid FOR UPDATE", route_id)
        if before_row is None:
            raise NotFound("no such route")
        before = from_row(before_row)
        route = _settle(dataclasses.replace(_as_new(before), **changes), set(changes))
        await _check(conn, route, route_id)
        row = await conn.fetchrow(_UPDATE, *_params(route), route_id)
        after = from_row(row)
        await record(conn, actor, "update", "route", route_id, version, before=asdict(before), after=asdict(after))
    return after, version


async def delete(db: Database, actor: Actor, route_id: str) -> int:
    async with db.transaction() as conn:
        version = await bump_version(conn)
        row = await conn.fetchrow(f"DELETE FROM routes WHERE id = $1::uuid RETURNING {COLUMNS}", route_id)
        if row is None:
            raise NotFound("no such route")
        await record(conn, actor, "delete", "route", route_id, version, before=asdict(from_row(row)))
    return version

"""Routes."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg

from control_plane.errors import Conflict
from control_plane.store.config import bump_version
from control_plane.store.db import Database


@dataclass(frozen=True, slots=True)
class NewRoute:
    path: str
    upstream: str
    methods: tuple[str, ...]  # empty: every method
    auth_required: bool
    rate_limit: int | None
    timeout_ms: int
    strip_prefix: bool
    priority: int
    is_active: bool


@dataclass(frozen=True, slots=True)
class RouteRecord:
    id: str
    path: str
    upstream: str
    methods: tuple[str, ...]
    auth_required: bool
    rate_limit: int | None
    timeout_ms: int
    strip_prefix: bool
    priority: int
    is_active: bool
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Created:
    route: RouteRecord
    config_version: int


_COLUMNS = (
    "id::text, path_pattern AS path, upstream_url AS upstream, methods, auth_required,"
    " rate_limit_override AS rate_limit, timeout_ms, strip_prefix, priority, is_active, created_at"
)


def _record(row: asyncpg.Record) -> RouteRecord:
    values = dict(row)
    values["methods"] = tuple(values["methods"])
    return RouteRecord(**values)


async def create(db: Database, new: NewRoute) -> Created:
    """Insert a route and bump the config version, atomically.

    Two active routes with the same path, priority and an overlapping method set would be
    ambiguous, so the second is refused with :class:`Conflict`. The version bump happens
    first: its row lock serialises concurrent writers, so the overlap check cannot race.
    """
    async with db.transaction() as conn:
        version = await bump_version(conn)
        if new.is_active:
            clash = await conn.fetchval(
                """SELECT id::text FROM routes
                    WHERE is_active AND path_pattern = $1 AND priority = $2
                      AND (cardinality(methods) = 0 OR cardinality($3::varchar[]) = 0 OR methods && $3)
                    LIMIT 1""",
                new.path,
                new.priority,
                list(new.methods),
            )
            if clash is not None:
                raise Conflict(
                    f"route {clash} already serves {new.path} for these methods", code="route_conflict"
                )
        row = await conn.fetchrow(
            f"""INSERT INTO routes (path_pattern, upstream_url, methods, auth_required, rate_limit_override,
                                    timeout_ms, strip_prefix, priority, is_active)
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING {_COLUMNS}""",
            new.path,
            new.upstream,
            list(new.methods),
            new.auth_required,
            new.rate_limit,
            new.timeout_ms,
            new.strip_prefix,
            new.priority,
            new.is_active,
        )
    return Created(_record(row), version)

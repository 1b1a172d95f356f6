"""The audit trail: who changed what, when, with the object before and after.

Every admin write calls :func:`record` inside its own transaction, after bumping the config
version, so the trail and the change commit or roll back together.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg


@dataclass(frozen=True, slots=True)
class Actor:
    """Who made a change, as the audit trail names them."""

    name: str
    role: str


def _json(value: Any) -> str | None:
    if value is None:
        return None
    return json.dumps(value, default=_default, sort_keys=True)


def _default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return None  # hashes never go into the trail
    if isinstance(value, tuple | frozenset | set):
        return list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


async def record(
    conn: asyncpg.Connection,
    actor: Actor,
    action: str,
    object_type: str,
    object_id: str,
    version: int,
    *,
    before: dict[str, Any] | None = None,
    after: dict[str, Any] | None = None,
) -> None:
    await conn.execute(
        """INSERT INTO audit_log (actor, actor_role, action, object_type, object_id, before, after, config_version)
           VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7::jsonb, $8)""",
        actor.name,
        actor.role,
        action,
        object_type,
        object_id,
        _json(before),
        _json(after),
        version,
    )

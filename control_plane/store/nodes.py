"""Data-plane nodes as every control-plane replica last saw them (``cluster_nodes``).

Each replica writes the nodes connected to it; any replica reads the whole table to answer
``GET /admin/nodes``. A row belongs to the stream ``session`` that wrote it last: when a node
moves to another replica, the old replica's late "disconnected" write no longer matches and
changes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from control_plane.store.db import Database

# Longest node error kept; a NACK reason is for people, not a log archive.
MAX_ERROR_LENGTH: Final = 1000


@dataclass(frozen=True, slots=True)
class NodeWrite:
    """One node's state as a replica knows it now."""

    node_id: str
    address: str
    software_version: str
    session: str
    connected: bool
    config_version: int
    nacked_version: int
    last_error: str


@dataclass(frozen=True, slots=True)
class NodeRecord:
    node_id: str
    address: str
    replica: str
    connected: bool
    config_version: int
    nacked_version: int
    last_error: str | None
    last_seen: datetime
    # Seconds since last_seen, by the database's clock (replicas' clocks may differ).
    age_s: float


_UPSERT: Final = """
INSERT INTO cluster_nodes (node_id, address, software_version, replica, session, connected,
                           config_version, nacked_version, last_error, last_seen)
VALUES ($1, $2, $3, $4, $5::uuid, $6, $7, $8, $9, now())
ON CONFLICT (node_id) DO UPDATE SET
    address = EXCLUDED.address, software_version = EXCLUDED.software_version,
    replica = EXCLUDED.replica, session = EXCLUDED.session, connected = EXCLUDED.connected,
    config_version = EXCLUDED.config_version, nacked_version = EXCLUDED.nacked_version,
    last_error = EXCLUDED.last_error, last_seen = now()
"""

# A stream that ended writes only if the row is still its own (or there is none yet).
_DISCONNECT: Final = _UPSERT + " WHERE cluster_nodes.session = EXCLUDED.session"


def _params(replica: str, n: NodeWrite) -> tuple[object, ...]:
    return (
        n.node_id,
        n.address,
        n.software_version,
        replica,
        n.session,
        n.connected,
        n.config_version,
        n.nacked_version,
        n.last_error[:MAX_ERROR_LENGTH] or None,
    )


async def upsert(db: Database, replica: str, nodes: Sequence[NodeWrite]) -> None:
    """Record connected nodes (a Hello, ACK or NACK, or the periodic heartbeat)."""
    if not nodes:
        return
    async with db.connection() as conn:
        await conn.executemany(_UPSERT, [_params(replica, n) for n in nodes])


async def disconnected(db: Database, replica: str, node: NodeWrite) -> None:
    async with db.connection() as conn:
        await conn.execute(_DISCONNECT, *_params(replica, node))


async def list_all(db: Database) -> tuple[int, list[NodeRecord]]:
    """The current config version and every node, ordered by id."""
    async with db.connection() as conn:
        version: int = await conn.fetchval("SELECT version FROM config_version WHERE id = 1")
        rows = await conn.fetch(
            """SELECT node_id, address, replica, connected, config_version, nacked_version, last_error,
                      last_seen, extract(epoch FROM now() - last_seen)::float8 AS age_s
                 FROM cluster_nodes ORDER BY node_id"""
        )
    return version, [NodeRecord(**dict(r)) for r in rows]


async def prune(db: Database, older_than_s: float) -> int:
    """Forget nodes no replica has seen for ``older_than_s``; returns how many."""
    async with db.connection() as conn:
        result: str = await conn.execute(
            "DELETE FROM cluster_nodes WHERE last_seen < now() - make_interval(secs => $1)", older_than_s
        )
    return int(result.rsplit(" ", 1)[-1])

"""Usage counters: stored once per batch, rolled up by age, read back per tenant.

Exactly once: a batch is stored in one transaction that first records ``(node_id, seq)`` in
``usage_batches`` and then adds its counters; a batch already recorded changes nothing. A
batch whose transaction fails leaves no trace, and the data plane sends it again.

Rollup: minute rows older than :data:`MINUTE_ROWS_KEPT` move (delete + add, one transaction)
into hour rows, hour rows older than :data:`HOUR_ROWS_KEPT` into day rows, so queries over
long ranges read few rows. A row is in exactly one table, so sums over the three are exact.
Replicas take turns through a transaction-scoped advisory lock; the one that does not get it
skips that round.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final, Literal

import asyncpg

from control_plane.store.db import Database

Granularity = Literal["minute", "hour", "day"]

MINUTE_ROWS_KEPT: Final = timedelta(days=2)
HOUR_ROWS_KEPT: Final = timedelta(days=60)
# A data plane resends a batch right after a lost acknowledgement, never weeks later.
BATCH_IDS_KEPT: Final = timedelta(days=30)
ROLLUP_LOCK_ID: Final = 0x7467_7573  # "tgus"
# A batch rolled back by Postgres (deadlock with a rollup, serialisation) is stored again, whole.
INGEST_ATTEMPTS: Final = 3

_COUNTERS: Final = "requests, errors, rejected, bytes_in, bytes_out, latency"
_ADD_COUNTERS: Final = """
    requests = u.requests + EXCLUDED.requests,
    errors = u.errors + EXCLUDED.errors,
    rejected = u.rejected + EXCLUDED.rejected,
    bytes_in = u.bytes_in + EXCLUDED.bytes_in,
    bytes_out = u.bytes_out + EXCLUDED.bytes_out,
    latency = usage_add_buckets(u.latency, EXCLUDED.latency)"""
_KEY: Final = "(tenant_id, start, route_id, status_class)"
_SUMS: Final = """sum(requests)::bigint AS requests, sum(errors)::bigint AS errors,
    sum(rejected)::bigint AS rejected, sum(bytes_in)::bigint AS bytes_in,
    sum(bytes_out)::bigint AS bytes_out, usage_sum_buckets(latency) AS latency"""


@dataclass(frozen=True, slots=True)
class Record:
    tenant_id: str
    route_id: str
    minute: datetime
    status_class: int
    requests: int
    errors: int
    rejected: int
    bytes_in: int
    bytes_out: int
    latency: Sequence[int]


@dataclass(frozen=True, slots=True)
class Point:
    start: datetime
    requests: int
    errors: int
    rejected: int
    bytes_in: int
    bytes_out: int
    latency: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Rollup:
    minute_rows: int
    hour_rows: int
    batch_ids: int


async def ingest(db: Database, node_id: str, seq: int, records: Sequence[Record]) -> bool:
    """Store one batch. True if stored now; False if it had been stored before (nothing changes).

    Batches of several nodes for the same (tenant, route, minute) land at once: rows are upserted
    in key order, so two batches lock shared rows in the same order and never deadlock; a
    transaction Postgres still rolls back (a serialisation failure) is run again, whole."""
    ordered = sorted(records, key=lambda r: (r.tenant_id, r.minute, r.route_id, r.status_class))
    for attempt in range(INGEST_ATTEMPTS):
        try:
            return await _ingest(db, node_id, seq, ordered)
        except asyncpg.exceptions.TransactionRollbackError:
            if attempt == INGEST_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")


async def _ingest(db: Database, node_id: str, seq: int, records: Sequence[Record]) -> bool:
    async with db.transaction() as conn:
        fresh = await conn.fetchval(
            "INSERT INTO usage_batches (node_id, seq) VALUES ($1, $2) ON CONFLICT DO NOTHING RETURNING true",
            node_id,
            seq,
        )
        if not fresh:
            return False
        if records:
            await conn.executemany(
                f"""INSERT INTO usage_minute AS u (tenant_id, route_id, start, status_class, {_COUNTERS})
                    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
                    ON CONFLICT {_KEY} DO UPDATE SET {_ADD_COUNTERS}""",
                [
                    (
                        r.tenant_id,
                        r.route_id,
                        r.minute,
                        r.status_class,
                        r.requests,
                        r.errors,
                        r.rejected,
                        r.bytes_in,
                        r.bytes_out,
                        list(r.latency),
                    )
                    for r in records
                ],
            )
    return True


async def rollup(db: Database, now: datetime) -> Rollup | None:
    """Move old minute rows into hours and old hour rows into days; forget old batch ids.
    None if another replica holds the rollup lock."""
    minute_cutoff = _truncate(now - MINUTE_ROWS_KEPT, "hour")
    hour_cutoff = _truncate(now - HOUR_ROWS_KEPT, "day")
    async with db.transaction() as conn:
        if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", ROLLUP_LOCK_ID):
            return None
        moved_minutes = await _move(conn, "usage_minute", "usage_hour", "hour", minute_cutoff)
        moved_hours = await _move(conn, "usage_hour", "usage_day", "day", hour_cutoff)
        status = await conn.execute("DELETE FROM usage_batches WHERE received_at < $1", now - BATCH_IDS_KEPT)
    return Rollup(moved_minutes, moved_hours, int(status.split()[-1]))


async def _move(conn: asyncpg.Connection, source: str, target: str, unit: str, cutoff: datetime) -> int:
    count: int = await conn.fetchval(
        f"""WITH moved AS (DELETE FROM {source} WHERE start < $1 RETURNING *),
                 added AS (
                    INSERT INTO {target} AS u (tenant_id, start, route_id, status_class, {_COUNTERS})
                    SELECT tenant_id, date_trunc('{unit}', start, 'UTC'), route_id, status_class, {_SUMS}
                    FROM moved GROUP BY 1, 2, 3, 4
                    ON CONFLICT {_KEY} DO UPDATE SET {_ADD_COUNTERS})
            SELECT count(*) FROM moved""",
        cutoff,
    )
    return count


async def series(db: Database, tenant_id: str, start: datetime, end: datetime, unit: Granularity) -> list[Point]:
    """The tenant's counters in ``[start, end)`` summed per ``unit``, only periods with data,
    oldest first. Periods already rolled up to a coarser table appear at that table's start."""
    rows_in_range = " UNION ALL ".join(
        f"SELECT start, {_COUNTERS} FROM {table} WHERE tenant_id = $1 AND start >= $2 AND start < $3"
        for table in ("usage_minute", "usage_hour", "usage_day")
    )
    async with db.connection() as conn:
        rows = await conn.fetch(
            f"""SELECT date_trunc('{_unit(unit)}', start, 'UTC') AS period, {_SUMS}
                FROM ({rows_in_range}) AS r GROUP BY period ORDER BY period""",
            tenant_id,
            start,
            end,
        )
    return [
        Point(
            row["period"],
            row["requests"],
            row["errors"],
            row["rejected"],
            row["bytes_in"],
            row["bytes_out"],
            tuple(row["latency"] or ()),
        )
        for row in rows
    ]


async def admitted_since(db: Database, tenant_id: str, since: datetime) -> int:
    """Requests of the tenant since ``since`` that were not refused (403/429)."""
    parts = " UNION ALL ".join(
        f"SELECT requests - rejected AS n FROM {table} WHERE tenant_id = $1 AND start >= $2"
        for table in ("usage_minute", "usage_hour", "usage_day")
    )
    async with db.connection() as conn:
        used: int = await conn.fetchval(f"SELECT coalesce(sum(n), 0)::bigint FROM ({parts}) AS r", tenant_id, since)
    return used


def _unit(unit: Granularity) -> str:
    if unit not in ("minute", "hour", "day"):
        raise ValueError(f"unknown granularity {unit!r}")
    return unit


def _truncate(moment: datetime, unit: Literal["hour", "day"]) -> datetime:
    moment = moment.astimezone(UTC)
    if unit == "hour":
        return moment.replace(minute=0, second=0, microsecond=0)
    return moment.replace(hour=0, minute=0, second=0, microsecond=0)

"""The usage store against real Postgres: each batch counted once, rollups that move rows
without changing any sum, and the admitted-requests count behind the monthly quota."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest

from control_plane.store import usage
from control_plane.store.db import Database
from control_plane.store.migrate import migrate
from shared.usage import BUCKET_COUNT

pytestmark = pytest.mark.integration

TENANT = str(uuid.uuid4())
ROUTE = str(uuid.uuid4())
NOW = datetime(2026, 3, 15, 12, 30, tzinfo=UTC)


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    database = await Database.connect(database_url)
    async with database.connection() as conn:
        await migrate(conn)
    yield database
    await database.close()


def _record(minute: datetime, requests: int = 1, status_class: int = 2, rejected: int = 0) -> usage.Record:
    latency = [0] * BUCKET_COUNT
    latency[3] = requests
    return usage.Record(
        TENANT, ROUTE, minute, status_class, requests, 0, rejected, 10 * requests, 20 * requests, latency
    )


async def _total(db: Database, unit: usage.Granularity = "day") -> int:
    points = await usage.series(db, TENANT, NOW - timedelta(days=400), NOW + timedelta(days=1), unit)
    return sum(p.requests for p in points)


async def test_a_batch_sent_again_is_not_counted_twice(db: Database) -> None:
    records = [_record(NOW, 5), _record(NOW, 2, status_class=5)]
    assert await usage.ingest(db, "node-a", 1, records) is True
    assert await usage.ingest(db, "node-a", 1, records) is False
    # The same seq from another node is another batch.
    assert await usage.ingest(db, "node-b", 1, records) is True
    assert await _total(db) == 14


async def test_concurrent_resends_of_one_batch_count_once(db: Database) -> None:
    records = [_record(NOW, 3)]
    results = await asyncio.gather(*(usage.ingest(db, "node-a", 7, records) for _ in range(5)))
    assert sorted(results) == [False, False, False, False, True]
    assert await _total(db) == 3


async def test_nodes_reporting_the_same_rows_at_once_never_deadlock(db: Database) -> None:
    # Every node's batch touches the same 30 (minute, status) rows, each in its own order: the
    # order in which two transactions would lock shared rows if they wrote them as given.
    keys = [(NOW - timedelta(minutes=m), sc) for m in range(15) for sc in (2, 5)]
    sent = 0
    for round_ in range(4):
        batches = []
        for node in range(6):
            order = keys[node % 2 :: 1] + keys[: node % 2] if node % 3 else list(reversed(keys))
            random.Random(round_ * 10 + node).shuffle(order)
            batches.append([_record(minute, 1, status_class=sc) for minute, sc in order])
        results = await asyncio.gather(*(usage.ingest(db, f"node-{n}", round_ + 1, b) for n, b in enumerate(batches)))
        assert results == [True] * 6
        sent += sum(len(b) for b in batches)
    assert await _total(db) == sent


async def test_counters_of_one_minute_add_up_and_latency_buckets_merge(db: Database) -> None:
    await usage.ingest(db, "node-a", 1, [_record(NOW, 4)])
    await usage.ingest(db, "node-b", 1, [_record(NOW, 6)])
    [point] = await usage.series(db, TENANT, NOW, NOW + timedelta(minutes=1), "minute")
    assert (point.requests, point.bytes_in, point.bytes_out) == (10, 100, 200)
    assert point.latency[3] == 10 and sum(point.latency) == 10


async def test_rollup_moves_old_rows_without_changing_any_sum(db: Database) -> None:
    old = NOW - timedelta(days=3)
    older = NOW - timedelta(days=90)
    await usage.ingest(
        db,
        "node-a",
        1,
        [_record(NOW, 1), _record(old, 2), _record(old + timedelta(minutes=1), 3), _record(older, 4)],
    )
    before = {unit: await _total(db, unit) for unit in ("minute", "hour", "day")}
    assert before == {"minute": 10, "hour": 10, "day": 10}

    done = await usage.rollup(db, NOW)
    assert done is not None and done.minute_rows == 3  # the two from three days ago and the one from 90
    assert {unit: await _total(db, unit) for unit in ("minute", "hour", "day")} == before
    # The rolled-up minutes now answer as one point at their hour's start.
    points = await usage.series(db, TENANT, old - timedelta(hours=1), old + timedelta(hours=1), "minute")
    assert [(p.start, p.requests) for p in points] == [(old.replace(minute=0), 5)]
    # A batch for an old minute arriving late is rolled up on the next round, still exactly once.
    await usage.ingest(db, "node-late", 1, [_record(old, 7)])
    await usage.rollup(db, NOW)
    assert await _total(db) == 17

    again = await usage.rollup(db, NOW + timedelta(days=61))
    assert again is not None and again.hour_rows == 2  # three days ago's hour and 90 days ago's
    assert {unit: await _total(db, unit) for unit in ("minute", "hour", "day")} == {"minute": 17, "hour": 17, "day": 17}
    points = await usage.series(db, TENANT, old - timedelta(days=1), old + timedelta(days=1), "hour")
    assert [(p.start, p.requests) for p in points] == [(old.replace(hour=0, minute=0), 12)]


async def test_rollup_is_taken_by_one_replica_at_a_time(db: Database) -> None:
    await usage.ingest(db, "node-a", 1, [_record(NOW - timedelta(days=3), 2)])
    results = await asyncio.gather(*(usage.rollup(db, NOW) for _ in range(4)))
    assert sum(r.minute_rows for r in results if r is not None) == 1
    assert await _total(db) == 2


async def test_admitted_requests_leave_out_refusals(db: Database) -> None:
    month_start = NOW.replace(day=1, hour=0, minute=0)
    await usage.ingest(
        db,
        "node-a",
        1,
        [
            _record(NOW, 10),
            _record(NOW, 4, status_class=4, rejected=4),
            _record(month_start - timedelta(minutes=1), 100),  # last month
        ],
    )
    assert await usage.admitted_since(db, TENANT, month_start) == 10
    assert await usage.admitted_since(db, str(uuid.uuid4()), month_start) == 0

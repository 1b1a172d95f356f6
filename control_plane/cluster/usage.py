"""``ReportUsage``: data planes' usage batches into Postgres, each exactly once; and the
scheduled rollup of old rows.

The servicer (``ClusterService.ReportUsage`` in watch.py, which checks the cluster token)
delegates here. Each batch is stored in its own transaction as it arrives; the answer comes
after the last one, so a data plane that gets it may forget every batch it sent. If
Postgres fails mid-stream the call fails with UNAVAILABLE; batches stored before the failure
come again and are recognised by ``(node_id, seq)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Final

import grpc
from grpc import aio

from control_plane import metrics
from control_plane.errors import StoreUnavailable
from control_plane.store import usage as store
from control_plane.store.db import Database
from shared._generated.tenantgate.v1 import cluster_pb2
from shared.usage import BUCKET_COUNT

log = logging.getLogger(__name__)

ROLLUP_INTERVAL_S: Final = 300.0
MAX_COUNTER: Final = 2**62  # bigint headroom for sums
MAX_SEQ: Final = 2**63 - 1


class UsageIngest:
    def __init__(self, db: Database) -> None:
        self._db = db
        self._rollups: asyncio.Task[None] | None = None

    async def report(
        self, batches: AsyncIterator[cluster_pb2.UsageBatch], context: aio.ServicerContext
    ) -> cluster_pb2.UsageAck:
        stored = duplicates = 0
        async for batch in batches:
            if not batch.node_id or not 0 < batch.seq <= MAX_SEQ:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a usage batch needs node_id and seq > 0")
            records = self._records(batch)
            try:
                fresh = await store.ingest(self._db, batch.node_id, batch.seq, records)
            except StoreUnavailable as exc:
                log.warning("cannot store usage: Postgres unavailable", extra={"error": str(exc)})
                await context.abort(grpc.StatusCode.UNAVAILABLE, "the control plane's database is unavailable")
            if fresh:
                stored += 1
                metrics.USAGE_BATCHES.labels(result="stored").inc()
                metrics.USAGE_RECORDS.inc(len(records))
            else:
                duplicates += 1
                metrics.USAGE_BATCHES.labels(result="duplicate").inc()
                log.info("usage batch received again; not counted twice", extra={"node_id": batch.node_id})
        return cluster_pb2.UsageAck(stored=stored, duplicates=duplicates)

    @staticmethod
    def _records(batch: cluster_pb2.UsageBatch) -> list[store.Record]:
        records = []
        for r in batch.records:
            try:
                tenant_id, route_id = str(uuid.UUID(r.tenant_id)), str(uuid.UUID(r.route_id))
            except ValueError:
                # Not a tenant's usage (ids are UUIDs); said, never silently.
                metrics.USAGE_INVALID_RECORDS.inc()
                log.warning(
                    "usage record with an invalid tenant or route id ignored",
                    extra={"node_id": batch.node_id, "seq": batch.seq},
                )
                continue
            buckets = [min(c, MAX_COUNTER) for c in r.latency_buckets[:BUCKET_COUNT]]
            records.append(
                store.Record(
                    tenant_id=tenant_id,
                    route_id=route_id,
                    minute=datetime.fromtimestamp(r.minute - r.minute % 60, UTC),
                    status_class=min(r.status_class, 9),
                    requests=min(r.requests, MAX_COUNTER),
                    errors=min(r.errors, MAX_COUNTER),
                    rejected=min(r.rejected, MAX_COUNTER),
                    bytes_in=min(r.bytes_in, MAX_COUNTER),
                    bytes_out=min(r.bytes_out, MAX_COUNTER),
                    latency=buckets + [0] * (BUCKET_COUNT - len(buckets)),
                )
            )
        return records

    # --- rollup schedule ---

    def start(self) -> None:
        self._rollups = asyncio.create_task(self._rollup_loop(), name="usage-rollup")

    async def stop(self) -> None:
        if self._rollups is not None:
            self._rollups.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._rollups

    async def _rollup_loop(self) -> None:
        while True:
            try:
                done = await store.rollup(self._db, datetime.now(UTC))
            except StoreUnavailable as exc:
                log.warning("usage rollup skipped: Postgres unavailable", extra={"error": str(exc)})
            else:
                if done is not None and (done.minute_rows or done.hour_rows):
                    log.info(
                        "usage rolled up",
                        extra={"minute_rows": done.minute_rows, "hour_rows": done.hour_rows},
                    )
            await asyncio.sleep(ROLLUP_INTERVAL_S)

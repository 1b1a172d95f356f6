"""The ``ReportUsage`` client: every flush interval, the aggregated counters become spooled
batches, and the spool is sent to the control plane oldest first.

A batch leaves the spool only once the control plane has answered for it. If the control
plane is unreachable the batches wait on disk (bounded by ``TENANTGATE_USAGE_SPOOL_MAX_BYTES``)
and go out in order when it returns. At the bound, new counters are not written to disk but
held in memory, merged by (tenant, route, minute, status class), and spooled as soon as there
is room; this is logged at error level and shown by ``tenantgate_dp_usage_spool_full``. At
shutdown the last counters are written even past the bound: a full disk is the only way
they are lost, and that is counted in ``tenantgate_dp_usage_dropped_records_total``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Final

import grpc
from grpc import aio

from data_plane.usage import aggregator as agg
from data_plane.usage import metrics
from data_plane.usage.spool import CorruptBatch, Spool
from shared._generated.tenantgate.v1 import cluster_pb2, cluster_pb2_grpc
from shared.settings import Settings

log = logging.getLogger(__name__)

MAX_RECORDS_PER_BATCH: Final = 5_000
MAX_BATCHES_PER_CALL: Final = 50
SEND_TIMEOUT_S: Final = 5.0
FINAL_SEND_TIMEOUT_S: Final = 3.0
FULL_LOG_EVERY_S: Final = 60.0
# Reconnect soon after the control plane returns, rather than after gRPC's default backoff (up to 2 min).
CHANNEL_OPTIONS: Final = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.enable_retries", 0),
]


class UsageReporter:
    def __init__(self, settings: Settings, aggregator: agg.Aggregator, spool: Spool) -> None:
        assert settings.cluster_token is not None
        self._interval = settings.usage_flush_interval_s
        self._addr = str(settings.cp_addr)
        # TLS to the control plane exactly as the config stream does it (TENANTGATE_CLUSTER_TLS_CA).
        self._ca = settings.cluster_tls_ca.read_bytes() if settings.cluster_tls_ca is not None else None
        self._metadata = (("authorization", f"Bearer {settings.cluster_token.reveal()}"),)
        self._node_id = settings.node_id
        self._aggregator = aggregator
        self._spool = spool
        self._held: agg.Counts = {}
        self._lock = asyncio.Lock()
        self._channel: aio.Channel | None = None
        self._full_logged_at = float("-inf")
        self.last_error = ""

    async def start(self) -> None:
        await asyncio.to_thread(self._spool.open)
        self._update_gauges()
        if self._spool.batches:
            log.info("usage batches waiting to be sent", extra={"batches": self._spool.batches})

    async def run(self) -> None:
        """Flush every interval until cancelled."""
        while True:
            await asyncio.sleep(self._interval)
            try:
                # Shielded: cancelling this loop at shutdown must not lose counters mid-flush;
                # close() waits for this flush (the lock) and then makes the last one.
                await asyncio.shield(self.flush())
            except Exception:  # the next interval tries again; the batches are on disk
                log.exception("usage flush failed")

    async def flush(self, *, final: bool = False) -> None:
        async with self._lock:
            await self._spool_counts(final)
            await self._send(FINAL_SEND_TIMEOUT_S if final else SEND_TIMEOUT_S)
            self._update_gauges()

    async def close(self) -> None:
        """Spool and try once to send what is pending (call after the proxy has drained)."""
        try:
            await self.flush(final=True)
        finally:
            if self._spool.batches:
                log.info(
                    "usage batches left on disk; sent when this node starts again",
                    extra={"batches": self._spool.batches},
                )
            if self._channel is not None:
                await self._channel.close()
            self._spool.close()

    # --- counters → spool ---

    async def _spool_counts(self, final: bool) -> None:
        counts = self._aggregator.drain()
        if self._held:
            counts = agg.merge(self._held, counts)
            self._held = {}
        if not counts:
            return
        if self._spool.full and not final:
            self._hold(counts)
            return
        batches = list(agg.batches(counts, self._node_id, self._spool.next_seq, MAX_RECORDS_PER_BATCH))
        try:
            await asyncio.to_thread(self._append_all, batches)
        except OSError as exc:
            if final:
                metrics.DROPPED_RECORDS.inc(len(counts))
                log.error(
                    "cannot write the last usage batch to disk; its counters are lost",
                    extra={"records": len(counts), "error": str(exc)},
                )
            else:
                log.error(
                    "cannot write usage batch to disk; holding it in memory",
                    extra={"records": len(counts), "error": str(exc)},
                )
                self._held = counts

    def _append_all(self, batches: list[cluster_pb2.UsageBatch]) -> None:
        # The bound was checked for this flush as a whole: its batches are written together.
        for batch in batches:
            self._spool.append(batch, force=True)

    def _hold(self, counts: agg.Counts) -> None:
        self._held = counts
        now = time.monotonic()
        if now - self._full_logged_at >= FULL_LOG_EVERY_S:
            self._full_logged_at = now
            log.error(
                "usage spool is full: new usage is held in memory until the control plane takes batches"
                " (raise TENANTGATE_USAGE_SPOOL_MAX_BYTES or restore the control plane)",
                extra={
                    "spool_bytes": self._spool.size_bytes,
                    "max_bytes": self._spool.max_bytes,
                    "held_records": len(counts),
                    "last_error": self.last_error,
                },
            )

    # --- spool → control plane ---

    async def _send(self, call_timeout_s: float) -> None:
        while self._spool.batches:
            paths = self._spool.pending(MAX_BATCHES_PER_CALL)
            batches, corrupt = await asyncio.to_thread(self._read_all, paths)
            for error in corrupt:
                metrics.DROPPED_RECORDS.inc()
                log.error("a spooled usage batch is unreadable; set aside", extra={"error": error})
            sent = [p for p in paths if p in batches]
            if not sent:
                continue
            try:
                ack = await self._stub().ReportUsage(
                    iter(batches.values()), metadata=self._metadata, timeout=call_timeout_s
                )
            except aio.AioRpcError as exc:
                metrics.SEND_FAILURES.inc()
                self._failed(exc)
                return
            await asyncio.to_thread(self._spool.remove, sent)
            metrics.BATCHES_SENT.inc(len(sent))
            if self.last_error:
                log.info("usage reporting resumed", extra={"cp_addr": self._addr})
                self.last_error = ""
            log.debug("usage batches sent", extra={"stored": ack.stored, "duplicates": ack.duplicates})

    def _read_all(self, paths: list[Path]) -> tuple[dict[Path, cluster_pb2.UsageBatch], list[str]]:
        batches: dict[Path, cluster_pb2.UsageBatch] = {}
        corrupt: list[str] = []
        for path in paths:
            try:
                batches[path] = self._spool.read(path)
            except CorruptBatch as exc:
                corrupt.append(str(exc))
        return batches, corrupt

    def _stub(self) -> cluster_pb2_grpc.ClusterStub:
        if self._channel is None:
            if self._ca is None:
                self._channel = aio.insecure_channel(self._addr, options=CHANNEL_OPTIONS)
            else:
                credentials = grpc.ssl_channel_credentials(root_certificates=self._ca)
                self._channel = aio.secure_channel(self._addr, credentials, CHANNEL_OPTIONS)
        return cluster_pb2_grpc.ClusterStub(self._channel)

    def _failed(self, exc: aio.AioRpcError) -> None:
        code = exc.code()
        if code == grpc.StatusCode.UNAUTHENTICATED:
            message = f"the control plane at {self._addr} refused the cluster token; check TENANTGATE_CLUSTER_TOKEN"
        else:
            message = f"cannot report usage to {self._addr}: {code.name} {exc.details()}"
        if message != self.last_error:
            log.warning(message, extra={"spooled_batches": self._spool.batches})
        self.last_error = message

    def _update_gauges(self) -> None:
        metrics.SPOOL_BYTES.set(self._spool.size_bytes)
        metrics.SPOOL_BATCHES.set(self._spool.batches)
        metrics.SPOOL_FULL.set(1 if self._held else 0)
        metrics.HELD_RECORDS.set(len(self._held))

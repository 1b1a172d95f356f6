"""The access log: one JSON line per request on standard output, off the request path.

A request appends one tuple to an in-memory buffer (after the sampling decision, so an
unsampled request costs one random draw); a background task formats the buffer every
:data:`FLUSH_INTERVAL_S` and writes it in one call from a thread, so a slow terminal or pipe
never stalls the event loop. If the writer falls behind by :data:`MAX_PENDING` lines, further
lines are dropped and counted in ``tenantgate_dp_access_log_dropped_total``.

A line holds the request id, tenant id, route id, method, the path without its query string
(which may carry secrets), status, durations, and byte counts. Never a header, a credential
or a query string.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import time
from typing import Final

from prometheus_client import Counter

from shared.settings import Settings

log = logging.getLogger(__name__)

FLUSH_INTERVAL_S: Final = 0.25
MAX_PENDING: Final = 100_000
MAX_PATH_CHARS: Final = 2048

DROPPED: Final = Counter(
    "tenantgate_dp_access_log_dropped",
    "Access log lines dropped because the writer fell behind.",
)

# ts, request id, tenant id, route id, method, path, status, duration ms, upstream ms, bytes in, bytes out
Line = tuple[float, str, str | None, str | None, str, str, int, float, float | None, int, int]


class AccessLog:
    def __init__(self, settings: Settings, fd: int = 1, rng: random.Random | None = None) -> None:
        self.enabled = settings.access_log and settings.access_log_sample > 0
        self._sample = settings.access_log_sample
        self._node_id = settings.node_id
        self._fd = fd
        self._random = (rng or random.Random()).random  # noqa: S311 - sampling, not a secret
        self._pending: list[Line] = []

    def record(
        self,
        request_id: str,
        tenant_id: str | None,
        route_id: str | None,
        method: str,
        raw_path: str,
        status: int,
        duration_ms: float,
        upstream_ms: float | None,
        bytes_in: int,
        bytes_out: int,
    ) -> None:
        """Buffer one line (call only when :attr:`enabled`)."""
        if self._sample < 1.0 and self._random() >= self._sample:
            return
        if len(self._pending) >= MAX_PENDING:
            DROPPED.inc()
            return
        self._pending.append(
            (
                time.time(),
                request_id,
                tenant_id,
                route_id,
                method,
                raw_path,
                status,
                duration_ms,
                upstream_ms,
                bytes_in,
                bytes_out,
            )
        )

    async def run(self) -> None:
        """Write buffered lines every interval until cancelled."""
        while True:
            await asyncio.sleep(FLUSH_INTERVAL_S)
            await asyncio.shield(self.flush())

    async def flush(self) -> None:
        if not self._pending:
            return
        lines, self._pending = self._pending, []
        data = self.format(lines)
        try:
            await asyncio.to_thread(_write_all, self._fd, data)
        except OSError as exc:
            DROPPED.inc(len(lines))
            log.warning("cannot write the access log", extra={"error": str(exc), "lines": len(lines)})

    def format(self, lines: list[Line]) -> bytes:
        out = []
        for ts, rid, tenant, route, method, raw_path, status, duration, upstream, bytes_in, bytes_out in lines:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"
            entry = {
                "ts": stamp,
                "type": "access",
                "node_id": self._node_id,
                "request_id": rid,
                "tenant_id": tenant,
                "route_id": route,
                "method": method,
                "path": raw_path.partition("?")[0][:MAX_PATH_CHARS],
                "status": status,
                "duration_ms": round(duration, 3),
                "upstream_ms": None if upstream is None else round(upstream, 3),
                "bytes_in": bytes_in,
                "bytes_out": bytes_out,
            }
            out.append(json.dumps(entry, separators=(",", ":"), ensure_ascii=True))
        out.append("")
        return "\n".join(out).encode()

    async def close(self) -> None:
        await self.flush()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]

"""The access log: one JSON line per request on standard output, off the request path.

A request appends one tuple to an in-memory buffer (after the sampling decision, so an
unsampled request costs one random draw); a background task formats the buffer every
:data:`FLUSH_INTERVAL_S` and writes it in one call — from a thread when standard output is a
pipe or terminal, so a slow reader never stalls the event loop; directly when it is a file.
If the writer falls behind by :data:`MAX_PENDING` lines, further lines are dropped and
counted in ``tenantgate_dp_access_log_dropped_total``.

A line holds the request id, tenant id, route id, method, the path without its query string
(which may carry secrets), status, durations, and byte counts. Never a header, a credential
or a query string.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import stat
import time
from json.encoder import encode_basestring_ascii as _quote
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
        # Everything between the timestamp and the request id is the same on every line.
        self._head = f',"type":"access","node_id":{_quote(self._node_id)},"request_id":'
        # A regular file (or /dev/null) takes a write at memory speed: a thread hand-off per
        # flush would cost more than it saves. A pipe or terminal can block: it gets a thread.
        self._direct = _never_blocks(fd)

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
            if self._direct:
                _write_all(self._fd, data)
            else:
                await asyncio.to_thread(_write_all, self._fd, data)
        except OSError as exc:
            DROPPED.inc(len(lines))
            log.warning("cannot write the access log", extra={"error": str(exc), "lines": len(lines)})

    def format(self, lines: list[Line]) -> bytes:
        """The lines as JSON, built from fixed pieces: every string is quoted and escaped by
        the json module's own (C) string encoder, so a hostile path or method stays one valid
        JSON value; the timestamp's seconds are formatted once per second; durations are written
        with three decimals (``format`` is three times faster than ``repr(round())``)."""
        out = []
        head = self._head
        second, stamp = -1, ""
        for ts, rid, tenant, route, method, raw_path, status, duration, upstream, bytes_in, bytes_out in lines:
            whole = int(ts)
            if whole != second:
                second, stamp = whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
            out.append(
                f'{{"ts":"{stamp}.{int(ts % 1 * 1000):03d}Z"{head}{_quote(rid)},'
                f'"tenant_id":{_NULL if tenant is None else _quote(tenant)},'
                f'"route_id":{_NULL if route is None else _quote(route)},'
                f'"method":{_quote(method)},'
                f'"path":{_quote(raw_path.partition("?")[0][:MAX_PATH_CHARS])},'
                f'"status":{status:d},"duration_ms":{duration:.3f},'
                f'"upstream_ms":{_NULL if upstream is None else f"{upstream:.3f}"},'
                f'"bytes_in":{bytes_in:d},"bytes_out":{bytes_out:d}}}'
            )
        out.append("")
        return "\n".join(out).encode()

    async def close(self) -> None:
        await self.flush()


_NULL: Final = "null"


def _never_blocks(fd: int) -> bool:
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return False
    return stat.S_ISREG(mode) or (stat.S_ISCHR(mode) and os.path.realpath(f"/proc/self/fd/{fd}") == os.devnull)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]

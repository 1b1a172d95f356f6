"""What every finished request leaves behind: Prometheus counts, the tenant's usage counters,
and an access log line. Called once per request at the end of the pipeline; it only adds to
memory (no I/O, no await) — the reporter and the access log write later, elsewhere.

Whose usage a request is: a request whose tenant was identified counts for that tenant,
whatever its answer (including 403 and 429 refusals, counted as ``rejected``). A request
refused before any tenant was known (no route, bad or missing credentials) is nobody's
usage; it still shows in the metrics and the access log.
"""

from __future__ import annotations

import time
from typing import Final

from aiohttp import web

from data_plane.accesslog import AccessLog
from data_plane.metrics import UPSTREAM_BATCH, UPSTREAM_TIME, RequestMetrics
from data_plane.router import CompiledRoute
from data_plane.usage.aggregator import Aggregator
from shared.snapshot import Tenant

# A request whose answer broke off mid-stream is recorded with this status.
BROKEN_OFF_STATUS = 502
# Set by the pipeline as soon as it knows them, read back here once the answer is done.
ROUTE: Final = web.RequestKey("tenantgate_route", CompiledRoute)
TENANT: Final[web.RequestKey[Tenant | None]] = web.RequestKey("tenantgate_tenant")


class Recorder:
    __slots__ = ("_access", "_aggregator", "_metrics")

    def __init__(self, aggregator: Aggregator, metrics: RequestMetrics, access_log: AccessLog) -> None:
        self._aggregator = aggregator
        self._metrics = metrics
        self._access = access_log

    def record(
        self,
        request: web.BaseRequest,
        response: web.StreamResponse | None,
        route: CompiledRoute | None,
        tenant: Tenant | None,
        request_id: str,
        started: float,
    ) -> None:
        """``response`` is None when the answer broke off after it had started; ``started`` is
        ``time.perf_counter()`` when the request arrived."""
        seconds = time.perf_counter() - started
        if response is None:
            status, bytes_out = BROKEN_OFF_STATUS, 0
        else:
            status, bytes_out = response.status, _bytes_out(response)
        bytes_in = request.content.total_bytes
        upstream = request.get(UPSTREAM_TIME)
        if upstream is not None:
            UPSTREAM_BATCH.observe(upstream)
        route_id = route.route.id if route is not None else "none"
        status_class = status // 100
        if tenant is None:
            self._metrics.observe(route_id, status_class, "none", "none", seconds)
        else:
            self._metrics.observe(route_id, status_class, tenant.tier, tenant.id, seconds)
            self._aggregator.record(tenant.id, route_id, time.time(), status, bytes_in, bytes_out, seconds * 1000)
        if self._access.enabled:
            self._access.record(
                request_id,
                tenant.id if tenant is not None else None,
                route.route.id if route is not None else None,
                request.method,
                request.raw_path,
                status,
                seconds * 1000,
                upstream * 1000 if upstream is not None else None,
                bytes_in,
                bytes_out,
            )


def _bytes_out(response: web.StreamResponse) -> int:
    if response.prepared:
        # Streamed by the proxy: everything written to the client, status line and headers included.
        return response.body_length
    body = response.body if isinstance(response, web.Response) else None
    return len(body) if isinstance(body, bytes | bytearray) else 0

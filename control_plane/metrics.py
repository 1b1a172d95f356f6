"""Prometheus on the control plane: ``GET /metrics`` on the admin port, without a token.

It is unauthenticated, as scrape endpoints usually are, so it shows nothing an anonymous
caller should not see: no tokens, no tenant or key ids, no request paths with ids in them
(admin requests are labelled by route template, ``/admin/tenants/{tenant_id}``). Families
declared by any module on the default registry are exposed without being listed here (config
version and connected nodes come from ``cluster/metrics.py``).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Final

from fastapi import FastAPI, Request, Response
from prometheus_client import REGISTRY, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

ADMIN_REQUESTS: Final = Counter(
    "tenantgate_cp_admin_requests",
    "Admin API requests, by method, route template and status class.",
    ["method", "route", "status_class"],
)
ADMIN_SECONDS: Final = Histogram(
    "tenantgate_cp_admin_request_duration_seconds",
    "Admin API request durations, by method and route template.",
    ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
USAGE_BATCHES: Final = Counter(
    "tenantgate_cp_usage_batches",
    'Usage batches received from data planes: result "stored" (counted) or "duplicate" (sent again, not counted).',
    ["result"],
)
USAGE_RECORDS: Final = Counter(
    "tenantgate_cp_usage_records",
    "Usage records stored (one per tenant, route, minute and status class of a batch).",
)
USAGE_INVALID_RECORDS: Final = Counter(
    "tenantgate_cp_usage_invalid_records",
    "Usage records ignored because their tenant or route id is not a UUID.",
)

_UNMATCHED: Final = "unmatched"


def install(app: FastAPI) -> None:
    """Add ``GET /metrics`` and count every admin request."""

    @app.get("/metrics", include_in_schema=False)
    async def metrics_endpoint() -> Response:
        return Response(generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST})

    @app.middleware("http")
    async def count(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        started = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            route = request.scope.get("route")
            template = getattr(route, "path", _UNMATCHED)
            if template != "/metrics":
                ADMIN_REQUESTS.labels(request.method, template, f"{status // 100}xx").inc()
                ADMIN_SECONDS.labels(request.method, template).observe(time.perf_counter() - started)

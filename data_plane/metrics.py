"""Prometheus on the data plane: the request families, the worker's Redis gauge, and the
``/metrics`` exposition on the status port.

Families are declared at module level by the module that owns them (this one for requests
and connectivity, ``usage/metrics.py``, ``ratelimit/``, ``upstream/`` …) on the default
registry; the exposition picks up every one of them without being told.

With ``--workers N`` each worker is its own process: the supervisor points
``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory before the workers start, every worker's
values go to files there, and whichever worker answers a scrape merges all of them
(:class:`prometheus_client.multiprocess.MultiProcessCollector`), so a scrape counts every
worker's requests. Gauges therefore always name a ``multiprocess_mode``.

Tenant ids are not labels unless ``TENANTGATE_METRICS_TENANT_LABELS=1``: one series per
tenant does not scale to thousands of tenants.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Final

from aiohttp import web
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess as prom_multiprocess
from prometheus_client.exposition import CONTENT_TYPE_LATEST

METRICS_DIR: Final = "metrics"
# Seconds; from sub-millisecond gateway work to long upstream calls.
LATENCY_BUCKETS_S: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
STATUS_CLASSES: Final = ("0xx", "1xx", "2xx", "3xx", "4xx", "5xx")
GAUGE_REFRESH_S: Final = 1.0

REQUESTS: Final = Counter(
    "tenantgate_dp_requests",
    "Requests answered by the data plane, by route id, status class and tenant tier"
    ' (route "none": no route matched; tier "none": no tenant known).',
    ["route", "status_class", "tier"],
)
REQUESTS_BY_TENANT: Final = Counter(
    "tenantgate_dp_tenant_requests",
    "Requests by tenant too (only with TENANTGATE_METRICS_TENANT_LABELS=1; in addition to tenantgate_dp_requests).",
    ["route", "status_class", "tier", "tenant"],
)
REQUEST_SECONDS: Final = Histogram(
    "tenantgate_dp_request_duration_seconds",
    "Time from receiving a request to the end of its answer, as the gateway saw it.",
    ["status_class"],
    buckets=LATENCY_BUCKETS_S,
)
UPSTREAM_SECONDS: Final = Histogram(
    "tenantgate_dp_upstream_duration_seconds",
    "Time from sending a request upstream to receiving the upstream's response headers.",
    buckets=LATENCY_BUCKETS_S,
)
REDIS_UP: Final = Gauge(
    "tenantgate_dp_redis_up",
    "1 when Redis answers (0 if any live worker cannot reach it).",
    multiprocess_mode="livemin",
)

# The time the upstream took to answer with headers, set by the proxy for the recorder.
UPSTREAM_TIME: Final = web.RequestKey("tenantgate_upstream_seconds", float)


class RequestMetrics:
    """The per-request counter and histogram, with label children cached so that a request
    costs a dict lookup per family rather than a ``labels()`` call."""

    __slots__ = ("_by_tenant", "_children", "_durations", "_tenant_children")

    def __init__(self, *, tenant_labels: bool) -> None:
        self._by_tenant = tenant_labels
        self._children: dict[tuple[str, int, str], Counter] = {}
        self._tenant_children: dict[tuple[str, int, str, str], Counter] = {}
        self._durations = [REQUEST_SECONDS.labels(status_class=c) for c in STATUS_CLASSES]

    def observe(self, route_id: str, status_class: int, tier: str, tenant_id: str, seconds: float) -> None:
        key = (route_id, status_class, tier)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = REQUESTS.labels(route_id, STATUS_CLASSES[status_class], tier)
        child.inc()
        if self._by_tenant:
            tenant_key = (route_id, status_class, tier, tenant_id)
            by_tenant = self._tenant_children.get(tenant_key)
            if by_tenant is None:
                by_tenant = self._tenant_children[tenant_key] = REQUESTS_BY_TENANT.labels(
                    route_id, STATUS_CLASSES[status_class], tier, tenant_id
                )
            by_tenant.inc()
        self._durations[status_class].observe(seconds)


def prepare_multiprocess_dir(data_dir: Path) -> Path:
    """A fresh, empty directory for the workers' metric files (called by the supervisor before
    any worker starts; files of an earlier run would add stale counts)."""
    path = data_dir / METRICS_DIR
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True, mode=0o700)
    return path


def mark_worker_dead(pid: int, multiprocess_dir: Path) -> None:
    """Drop a dead worker's live gauges (its counters stay: they still count)."""
    prom_multiprocess.mark_process_dead(pid, str(multiprocess_dir))  # type: ignore[no-untyped-call]


class Exposition:
    """``GET /metrics`` for one worker: its own registry, or every worker's files merged."""

    def __init__(self, multiprocess_dir: Path | None, refresh: Callable[[], None] | None = None) -> None:
        self._dir = multiprocess_dir
        self._refresh = refresh

    def render(self) -> bytes:
        """Blocking (reads the workers' files): call off the event loop."""
        if self._dir is None:
            return generate_latest(REGISTRY)
        registry = CollectorRegistry()
        prom_multiprocess.MultiProcessCollector(registry, path=str(self._dir))  # type: ignore[no-untyped-call]
        return generate_latest(registry)

    async def handle(self, _: web.Request) -> web.Response:
        if self._refresh is not None:
            self._refresh()
        body = await asyncio.to_thread(self.render)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


class WorkerGauges:
    """Keeps this worker's Redis connectivity gauge current (the config version and the
    control plane connection are the config client's: ``data_plane/cluster.py``)."""

    def __init__(self, redis_ok: Callable[[], bool]) -> None:
        self._redis_ok = redis_ok

    def refresh(self) -> None:
        REDIS_UP.set(1 if self._redis_ok() else 0)

    async def run(self) -> None:
        while True:
            self.refresh()
            await asyncio.sleep(GAUGE_REFRESH_S)

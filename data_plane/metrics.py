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

The families counted on every request (requests, durations, upstream tries and latency) are
counted in plain numbers first (:class:`BatchedCounter`, :class:`BatchedHistogram`) and
added to their Prometheus children by :func:`flush`: before every scrape this worker
answers, once a second (so a scrape answered by another worker is at most that late), and
when the worker stops. A Prometheus ``inc`` takes a lock (and with ``--workers`` writes a
memory-mapped file), a histogram ``observe`` two or three of them: per request, that was
more than the counting itself.
"""

from __future__ import annotations

import asyncio
import shutil
from bisect import bisect_left
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


class BatchedCounter:
    """A counter child's increments, held until :func:`flush` adds them in one ``inc``."""

    __slots__ = ("_child", "count")

    def __init__(self, child: Counter) -> None:
        self._child = child
        self.count = 0

    def inc(self) -> None:
        self.count += 1

    def flush(self) -> None:
        count = self.count
        if count:
            self.count = 0
            self._child.inc(count)


class BatchedHistogram:
    """A histogram child's observations as bucket counts and a sum, held until :func:`flush`
    adds them to the child's own bucket and sum values (what its ``observe`` adds to, one
    observation at a time). Bucket ``i`` counts values at most its upper bound, as Prometheus does."""

    __slots__ = ("_bounds", "_child", "_counts", "_pending", "_sum")

    def __init__(self, child: Histogram) -> None:
        self._child = child
        self._bounds: tuple[float, ...] = tuple(child._upper_bounds)
        self._counts = [0] * len(self._bounds)
        self._sum = 0.0
        self._pending = False

    def observe(self, amount: float) -> None:
        self._sum += amount
        self._counts[bisect_left(self._bounds, amount)] += 1
        self._pending = True

    def flush(self) -> None:
        if not self._pending:
            return
        counts, total = self._counts, self._sum
        self._counts, self._sum, self._pending = [0] * len(self._bounds), 0.0, False
        child = self._child
        child._sum.inc(total)
        buckets = child._buckets
        for i, count in enumerate(counts):
            if count:
                buckets[i].inc(count)


_BATCHED: list[BatchedCounter | BatchedHistogram] = []
_COUNTERS: dict[tuple[Counter, tuple[str, ...]], BatchedCounter] = {}
_HISTOGRAMS: dict[tuple[Histogram, tuple[str, ...]], BatchedHistogram] = {}


def batched_counter(family: Counter, *labels: str) -> BatchedCounter:
    """The batched child of ``family`` with ``labels`` (one per child, for the process's life,
    like the Prometheus child itself)."""
    key = (family, labels)
    batched = _COUNTERS.get(key)
    if batched is None:
        batched = _COUNTERS[key] = BatchedCounter(family.labels(*labels) if labels else family)
        _BATCHED.append(batched)
    return batched


def batched_histogram(family: Histogram, *labels: str) -> BatchedHistogram:
    """The batched child of ``family`` with ``labels`` (see :func:`batched_counter`)."""
    key = (family, labels)
    batched = _HISTOGRAMS.get(key)
    if batched is None:
        batched = _HISTOGRAMS[key] = BatchedHistogram(family.labels(*labels) if labels else family)
        _BATCHED.append(batched)
    return batched


def flush() -> None:
    """Add every batched count to its Prometheus child."""
    for batched in _BATCHED:
        batched.flush()


UPSTREAM_BATCH: Final = batched_histogram(UPSTREAM_SECONDS)


class RequestMetrics:
    """The per-request counter and histogram, batched (see :func:`flush`), with the batched
    children cached so that a request costs a dict lookup per family."""

    __slots__ = ("_by_tenant", "_children", "_durations", "_tenant_children")

    def __init__(self, *, tenant_labels: bool) -> None:
        self._by_tenant = tenant_labels
        self._children: dict[tuple[str, int, str], BatchedCounter] = {}
        self._tenant_children: dict[tuple[str, int, str, str], BatchedCounter] = {}
        self._durations = [batched_histogram(REQUEST_SECONDS, c) for c in STATUS_CLASSES]

    def observe(self, route_id: str, status_class: int, tier: str, tenant_id: str, seconds: float) -> None:
        key = (route_id, status_class, tier)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = batched_counter(REQUESTS, route_id, STATUS_CLASSES[status_class], tier)
        child.inc()
        if self._by_tenant:
            tenant_key = (route_id, status_class, tier, tenant_id)
            by_tenant = self._tenant_children.get(tenant_key)
            if by_tenant is None:
                by_tenant = self._tenant_children[tenant_key] = batched_counter(
                    REQUESTS_BY_TENANT, route_id, STATUS_CLASSES[status_class], tier, tenant_id
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
        """Before a scrape, and once a second: the Redis gauge, and the batched counts."""
        REDIS_UP.set(1 if self._redis_ok() else 0)
        flush()

    async def run(self) -> None:
        while True:
            self.refresh()
            await asyncio.sleep(GAUGE_REFRESH_S)

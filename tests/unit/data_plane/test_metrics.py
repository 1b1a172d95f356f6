"""data_plane.metrics: request counts by route, status class and tier; tenant ids only on request."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram

from data_plane.metrics import LATENCY_BUCKETS_S, RequestMetrics, batched_counter, batched_histogram, flush

pytestmark = pytest.mark.unit


def _sample(name: str, **labels: str) -> float | None:
    flush()  # the request families are batched until a scrape
    return REGISTRY.get_sample_value(name, labels)


def test_tenant_labels_only_when_asked() -> None:
    labels = {"route": "route-unit", "status_class": "2xx", "tier": "free"}
    before = _sample("tenantgate_dp_requests_total", **labels) or 0.0
    RequestMetrics(tenant_labels=False).observe("route-unit", 2, "free", "tenant-x", 0.01)
    RequestMetrics(tenant_labels=True).observe("route-unit", 2, "free", "tenant-y", 0.01)
    assert _sample("tenantgate_dp_requests_total", **labels) == before + 2  # always counted
    assert _sample("tenantgate_dp_tenant_requests_total", **labels, tenant="tenant-x") is None
    assert _sample("tenantgate_dp_tenant_requests_total", **labels, tenant="tenant-y") == 1.0


def _samples(registry: CollectorRegistry) -> list[tuple[str, str, float]]:
    return sorted(
        (s.name.split("_", 1)[1], repr(sorted(s.labels.items())), s.value)
        for family in registry.collect()
        for s in family.samples
        if not s.name.endswith("_created")
    )


def test_batched_counts_reach_prometheus_exactly_as_direct_ones_at_a_flush() -> None:
    values = [0.0, 0.0004, 0.001, 0.0011, 0.003, 0.05, 0.7, 2.5, 29.9, 30.0, 31.0, 1e9]
    direct, batched = CollectorRegistry(), CollectorRegistry()
    h_direct = Histogram("a_seconds", "x", ["k"], buckets=LATENCY_BUCKETS_S, registry=direct)
    c_direct = Counter("a_hits", "x", ["k"], registry=direct)
    h = batched_histogram(Histogram("b_seconds", "x", ["k"], buckets=LATENCY_BUCKETS_S, registry=batched), "v")
    c = batched_counter(Counter("b_hits", "x", ["k"], registry=batched), "v")
    for value in values:
        h_direct.labels("v").observe(value)
        c_direct.labels("v").inc()
        h.observe(value)
        c.inc()
    assert all(s[2] == 0 for s in _samples(batched))  # nothing until a flush
    flush()
    assert _samples(batched) == _samples(direct)
    h.observe(0.002)
    flush()
    flush()  # a second flush adds nothing twice
    h_direct.labels("v").observe(0.002)
    assert _samples(batched) == _samples(direct)

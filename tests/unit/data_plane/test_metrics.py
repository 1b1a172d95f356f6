"""data_plane.metrics: request counts by route, status class and tier; tenant ids only on request."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY

from data_plane.metrics import RequestMetrics

pytestmark = pytest.mark.unit


def _sample(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def test_tenant_labels_only_when_asked() -> None:
    labels = {"route": "route-unit", "status_class": "2xx", "tier": "free"}
    before = _sample("tenantgate_dp_requests_total", **labels) or 0.0
    RequestMetrics(tenant_labels=False).observe("route-unit", 2, "free", "tenant-x", 0.01)
    RequestMetrics(tenant_labels=True).observe("route-unit", 2, "free", "tenant-y", 0.01)
    assert _sample("tenantgate_dp_requests_total", **labels) == before + 2  # always counted
    assert _sample("tenantgate_dp_tenant_requests_total", **labels, tenant="tenant-x") is None
    assert _sample("tenantgate_dp_tenant_requests_total", **labels, tenant="tenant-y") == 1.0

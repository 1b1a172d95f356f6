"""Refused authentications counted by client and tenant, bounded, reported once per interval."""

from __future__ import annotations

import logging

import pytest
from prometheus_client import REGISTRY

from data_plane.auth import failures
from data_plane.auth.failures import FailureTracker
from data_plane.errors import Forbidden, Unauthenticated
from shared.snapshot import Tenant

pytestmark = pytest.mark.unit


def _tenant(tid: str) -> Tenant:
    return Tenant(id=tid, name=tid, tier="free", rate_limit_per_minute=60, rate_limit_per_hour=1000,
                  monthly_quota=0, max_concurrency=0, is_active=False)  # fmt: skip


def test_the_worst_clients_are_reported_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    tracker = FailureTracker()
    for client, times in (("203.0.113.9", 50), ("198.51.100.7", 3), ("192.0.2.1", 7)):
        for _ in range(times):
            tracker.add(client, Unauthenticated("invalid API key", code="invalid_api_key"))
    with caplog.at_level(logging.WARNING, logger="data_plane.auth.failures"):
        tracker.report()
        tracker.report()  # nothing new: nothing said
    (record,) = caplog.records
    assert record.failures == 60  # type: ignore[attr-defined]
    assert record.top_clients == "203.0.113.9=50, 192.0.2.1=7, 198.51.100.7=3"  # type: ignore[attr-defined]


def test_distinct_clients_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(failures, "MAX_CLIENTS", 3)
    tracker = FailureTracker()
    for i in range(10):
        tracker.add(f"10.0.0.{i}", Unauthenticated("nope"))
    total, top = tracker.take()
    assert total == 10
    assert dict(top) == {"10.0.0.0": 1, "10.0.0.1": 1, "10.0.0.2": 1, "other": 7}


def _by_tenant(tenant: str, code: str) -> float:
    value = REGISTRY.get_sample_value("tenantgate_auth_failures_by_tenant_total", {"tenant": tenant, "code": code})
    return value or 0.0


def test_tenant_failures_are_labelled_only_when_tenant_labels_are_on() -> None:
    refused = Forbidden("this tenant is inactive", code="tenant_inactive")
    refused.tenant = _tenant("t-labels-on")
    FailureTracker(tenant_labels=True).add("192.0.2.1", refused)
    assert _by_tenant("t-labels-on", "tenant_inactive") == 1
    refused.tenant = _tenant("t-labels-off")
    FailureTracker().add("192.0.2.1", refused)
    assert _by_tenant("t-labels-off", "tenant_inactive") == 0

"""Prometheus families of the upstream layer. Labels are route ids and target URLs only
(both bounded by configuration), never tenants. Children are looked up once per route or
target and kept on the pool objects, not per request."""

from __future__ import annotations

from typing import Final

from prometheus_client import Counter, Gauge, Histogram

# result: 2xx 3xx 4xx 5xx (the upstream answered), connect_error, timeout, invalid_response.
REQUESTS: Final = Counter(
    "tenantgate_upstream_requests",
    "Tries sent to upstream targets, by result.",
    ("route", "target", "result"),
)
RETRIES: Final = Counter("tenantgate_upstream_retries", "Tries beyond the first.", ("route",))
BUDGET_EXHAUSTED: Final = Counter(
    "tenantgate_upstream_retry_budget_exhausted",
    "Retries not made because the route's retry budget was spent.",
    ("route",),
)
# reason: no_healthy_upstream, circuit_open.
SHED: Final = Counter(
    "tenantgate_upstream_shed",
    "Requests answered 503 without touching any upstream.",
    ("route", "reason"),
)
BREAKER_STATE: Final = Gauge(
    "tenantgate_upstream_breaker_state",
    "Circuit breaker state per target: 0 closed, 1 half-open, 2 open (the worst worker's).",
    ("target",),
    multiprocess_mode="max",
)
BREAKER_TRANSITIONS: Final = Counter(
    "tenantgate_upstream_breaker_transitions",
    "Circuit breaker state changes, by the state entered.",
    ("target", "state"),
)
TARGET_HEALTHY: Final = Gauge(
    "tenantgate_upstream_target_healthy",
    "Active health check verdict per target: 1 healthy, 0 unhealthy (the worst worker's).",
    ("target",),
    multiprocess_mode="min",
)
EJECTIONS: Final = Counter(
    "tenantgate_upstream_ejections",
    "Targets taken out of service by outlier ejection.",
    ("target",),
)
LATENCY: Final = Histogram(
    "tenantgate_upstream_latency_seconds",
    "Time from sending a try to its response head.",
    ("route",),
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)

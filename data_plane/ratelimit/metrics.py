"""Prometheus families of the rate limiter. Labels stay low-cardinality: no tenant or route ids."""

from __future__ import annotations

from typing import Final

from prometheus_client import Counter, Gauge, Histogram

from data_plane.ratelimit.base import KIND_NAMES

DECISIONS: Final = Counter(
    "tenantgate_ratelimit_decisions_total",
    "Rate-limit decisions by result (allowed, rejected, shadow_rejected, unavailable) and deciding limit.",
    ["result", "kind"],
)
NEAR_LIMIT: Final = Counter(
    "tenantgate_ratelimit_near_limit_total",
    "Admitted requests that left a limit with 10% or less of its quota remaining.",
)
REDIS_SECONDS: Final = Histogram(
    "tenantgate_ratelimit_redis_seconds",
    "Round-trip time of one pipelined batch of rate-limit commands to Redis.",
    buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25),
)
BATCH_SIZE: Final = Histogram(
    "tenantgate_ratelimit_batch_size",
    "Commands coalesced into one Redis round trip.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)
ROUND_TRIPS: Final = Counter(
    "tenantgate_ratelimit_redis_round_trips_total",
    "Pipelined round trips to Redis made by the rate limiter (per cluster node in cluster mode).",
)
REDIS_ERRORS: Final = Counter(
    "tenantgate_ratelimit_redis_errors_total",
    "Batches that failed or timed out; each opens the circuit to Redis for a short while.",
)
FALLBACK: Final = Gauge(
    "tenantgate_ratelimit_fallback",
    "1 while this worker decides limits without Redis (local limiter, or 503 in closed mode).",
    multiprocess_mode="max",
)
LIVE_NODES: Final = Gauge(
    "tenantgate_ratelimit_live_nodes",
    "Data plane workers seen in Redis heartbeats: the local fallback divides each limit by it.",
    multiprocess_mode="mostrecent",
)

# Children resolved once: .labels() on the request path would hash the label values each time.
ALLOWED: Final = DECISIONS.labels("allowed", "none")
REJECTED: Final = {kind: DECISIONS.labels("rejected", name) for kind, name in KIND_NAMES.items()}
SHADOW_REJECTED: Final = {kind: DECISIONS.labels("shadow_rejected", name) for kind, name in KIND_NAMES.items()}
UNAVAILABLE: Final = DECISIONS.labels("unavailable", "none")

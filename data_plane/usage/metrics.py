"""Prometheus families of usage reporting (exposed by :mod:`data_plane.metrics`)."""

from __future__ import annotations

from typing import Final

from prometheus_client import Counter, Gauge

SPOOL_BYTES: Final = Gauge(
    "tenantgate_dp_usage_spool_bytes",
    "Bytes of usage batches on disk that the control plane has not acknowledged yet.",
    multiprocess_mode="livesum",
)
SPOOL_BATCHES: Final = Gauge(
    "tenantgate_dp_usage_spool_batches",
    "Usage batches on disk that the control plane has not acknowledged yet.",
    multiprocess_mode="livesum",
)
SPOOL_FULL: Final = Gauge(
    "tenantgate_dp_usage_spool_full",
    "1 while the usage spool is at TENANTGATE_USAGE_SPOOL_MAX_BYTES: new counters are held in memory only.",
    multiprocess_mode="livemax",
)
HELD_RECORDS: Final = Gauge(
    "tenantgate_dp_usage_held_records",
    "Usage records held in memory because the spool is full (lost if the process is killed).",
    multiprocess_mode="livesum",
)
BATCHES_SENT: Final = Counter(
    "tenantgate_dp_usage_batches_sent_total",
    "Usage batches acknowledged by the control plane.",
)
SEND_FAILURES: Final = Counter(
    "tenantgate_dp_usage_send_failures_total",
    "Attempts to send usage batches that failed (the batches stay spooled).",
)
DROPPED_RECORDS: Final = Counter(
    "tenantgate_dp_usage_dropped_records_total",
    "Usage records lost: a spool file was corrupt, or the disk refused the last batch at shutdown.",
)

"""Prometheus families of config distribution on the control plane (picked up by /metrics)."""

from __future__ import annotations

from typing import Final

from prometheus_client import Counter, Gauge, Histogram

CONFIG_VERSION: Final = Gauge(
    "tenantgate_cp_config_version",
    "The config version of the snapshot this control plane serves to data planes.",
    multiprocess_mode="max",
)
SNAPSHOT_BUILD_SECONDS: Final = Histogram(
    "tenantgate_cp_snapshot_build_seconds",
    "Time to build a snapshot version from Postgres (a change, or a full read).",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
CONNECTED_NODES: Final = Gauge(
    "tenantgate_cp_connected_nodes",
    "Data-plane nodes with an open Watch stream to this control plane.",
    multiprocess_mode="livesum",
)
UPDATES_SENT: Final = Counter(
    "tenantgate_cp_config_updates_sent_total",
    "Config updates sent to data planes, by kind (full, delta).",
    ["kind"],
)
NACKS: Final = Counter(
    "tenantgate_cp_config_nacks_total",
    "Config versions data planes rejected (NACK); resync requests are not counted.",
)
REFUSED_STREAMS: Final = Counter(
    "tenantgate_cp_cluster_refused_total",
    "Watch streams refused for a wrong cluster token.",
)

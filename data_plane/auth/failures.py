"""Who keeps failing authentication: counts by client address and by tenant, bounded.

A credential-stuffing client or a tenant with a broken deployment shows up here. Client
addresses are unbounded in number and chosen by the other side, so they never become metric
labels: each worker counts them in memory (at most :data:`MAX_CLIENTS` distinct addresses per
interval; the rest are counted together) and logs the worst offenders once per interval — one
line, whatever the attack's size. Tenants are known and finite: with
``TENANTGATE_METRICS_TENANT_LABELS=1`` their failures are also a labelled counter.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
from typing import Final

from prometheus_client import Counter

from data_plane.errors import GatewayError

log = logging.getLogger(__name__)

INTERVAL_S: Final = 60.0
MAX_CLIENTS: Final = 10_000
TOP_CLIENTS: Final = 10
OTHER: Final = "other"

AUTH_FAILURES_BY_TENANT: Final = Counter(
    "tenantgate_auth_failures_by_tenant_total",
    "Requests refused by authorisation for a known tenant (only with TENANTGATE_METRICS_TENANT_LABELS=1).",
    ["tenant", "code"],
)


class FailureTracker:
    """Counts refused authentications of one worker; :meth:`run` reports them per interval."""

    __slots__ = ("_by_client", "_tenant_labels", "total")

    def __init__(self, *, tenant_labels: bool = False) -> None:
        self._tenant_labels = tenant_labels
        self._by_client: dict[str, int] = {}
        self.total = 0

    def add(self, client: str, exc: GatewayError) -> None:
        self.total += 1
        counts = self._by_client
        if client in counts:
            counts[client] += 1
        elif len(counts) < MAX_CLIENTS:
            counts[client] = 1
        else:
            counts[OTHER] = counts.get(OTHER, 0) + 1
        if self._tenant_labels and exc.tenant is not None:
            AUTH_FAILURES_BY_TENANT.labels(exc.tenant.id, exc.code).inc()

    def take(self) -> tuple[int, list[tuple[str, int]]]:
        """The interval's total and its worst offenders (most failures first); starts a new interval."""
        total, counts = self.total, self._by_client
        self.total, self._by_client = 0, {}
        return total, heapq.nlargest(TOP_CLIENTS, counts.items(), key=lambda item: item[1])

    def report(self) -> None:
        total, top = self.take()
        if total:
            log.warning(
                "authentication failures",
                extra={
                    "interval_s": INTERVAL_S,
                    "failures": total,
                    "top_clients": ", ".join(f"{client}={count}" for client, count in top),
                },
            )

    async def run(self) -> None:
        """Report every :data:`INTERVAL_S` until cancelled (then once more for what is left)."""
        try:
            while True:
                await asyncio.sleep(INTERVAL_S)
                self.report()
        finally:
            self.report()

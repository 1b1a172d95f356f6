"""One upstream target's live state in this worker: requests in flight, active health, and
passive outlier ejection.

An :class:`Endpoint` is keyed by the target's URL in :class:`~data_plane.upstream.pool.Registry`
and outlives snapshots: a route change that keeps a target keeps its health, its ejection
and its connection count. Every route naming the same URL shares the one Endpoint.

Outlier ejection (passive, like Envoy's ``consecutive_5xx``): ``CONSECUTIVE_FAILURES``
failures in a row (connect errors, timeouts, 5xx) eject the target for
``BASE_EJECTION_S * n`` seconds, n being how many times it was ejected lately (capped at
``MAX_EJECTION_S``); n decays back to 0 after ``DECAY_S`` without an ejection. The pool asking
for the ejection refuses it when it would leave fewer than half of its targets in service,
so ejection never takes out every target (a single target is never ejected).
"""

from __future__ import annotations

from typing import Final

from data_plane.upstream.client import Target

CONSECUTIVE_FAILURES: Final = 5
BASE_EJECTION_S: Final = 10.0
MAX_EJECTION_S: Final = 300.0
DECAY_S: Final = 300.0


class Endpoint:
    __slots__ = (
        "active",
        "consecutive_failures",
        "ejected_until",
        "ejections",
        "healthy",
        "last_ejected_at",
        "target",
        "url",
    )

    def __init__(self, url: str) -> None:
        self.url = url
        self.target = Target.parse(url)
        self.active = 0  # requests in flight through this worker (least-connections)
        self.healthy = True  # the active health check's verdict; True until it says otherwise
        self.consecutive_failures = 0
        self.ejected_until = 0.0
        self.ejections = 0
        self.last_ejected_at = -DECAY_S

    def in_service(self, now: float) -> bool:
        """Healthy and not ejected: may be picked (its breaker permitting)."""
        return self.healthy and now >= self.ejected_until

    def ejected(self, now: float) -> bool:
        return now < self.ejected_until

    def record_success(self) -> None:
        self.consecutive_failures = 0

    def record_failure(self) -> bool:
        """Count a failure; True when the streak reached the ejection threshold."""
        self.consecutive_failures += 1
        return self.consecutive_failures >= CONSECUTIVE_FAILURES

    def eject(self, now: float) -> float:
        """Take the target out of service; returns for how many seconds."""
        if now - self.last_ejected_at > DECAY_S:
            self.ejections = 0
        self.ejections += 1
        seconds = min(BASE_EJECTION_S * self.ejections, MAX_EJECTION_S)
        self.ejected_until = now + seconds
        self.last_ejected_at = now
        self.consecutive_failures = 0
        return seconds

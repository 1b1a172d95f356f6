"""A per-target circuit breaker: closed → open → half-open → closed.

    closed     every request passes; outcomes are counted in a rolling window of
               ``window_s`` one-second buckets. When the window holds at least
               ``min_requests`` outcomes and failures / outcomes ≥ ``failure_rate``,
               the breaker opens.
    open       nothing passes for ``open_s`` seconds: the caller answers 503 with
               ``Retry-After`` without touching the upstream (or picks another target).
    half-open  up to ``half_open_requests`` probes pass at once. Any probe failure
               reopens the breaker for another ``open_s``; once ``half_open_requests``
               probes have succeeded it closes with an empty window.

A failure is what the caller reports as one (connect error, timeout, any 5xx: see
``upstream.outcome``). The clock is passed in (monotonic seconds) so that tests drive time.
The breaker is local to one worker, like Envoy's: every worker learns on its own.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Final

from shared.snapshot import CircuitBreaker as BreakerConfig

CLOSED: Final = 0
HALF_OPEN: Final = 1
OPEN: Final = 2
STATE_NAMES: Final = ("closed", "half_open", "open")


class Breaker:
    __slots__ = (
        "_buckets",
        "_epoch",
        "_half_open_in_flight",
        "_half_open_successes",
        "_on_change",
        "config",
        "open_until",
        "state",
    )

    def __init__(self, config: BreakerConfig, on_change: Callable[[int], None] | None = None) -> None:
        self.config = config
        self.state = CLOSED
        self.open_until = 0.0
        # _buckets[i] = [second, successes, failures] for second ≡ i (mod window_s).
        self._buckets: list[list[int]] = [[-1, 0, 0] for _ in range(max(1, config.window_s))]
        self._epoch = 0
        self._half_open_in_flight = 0
        self._half_open_successes = 0
        self._on_change = on_change

    # -- asking --------------------------------------------------------------------------

    def allows(self, now: float) -> bool:
        """May a request be sent now? Moves open → half-open when ``open_s`` has passed.
        Does not take a probe slot: call :meth:`acquire` for the request actually sent."""
        state = self.state
        if state == CLOSED:
            return True
        if state == OPEN:
            if now < self.open_until:
                return False
            self._transition(HALF_OPEN)
            self._half_open_in_flight = 0
            self._half_open_successes = 0
        return self._half_open_in_flight < self.config.half_open_requests

    def acquire(self) -> int:
        """The request picked by :meth:`allows` is being sent; returns a ticket for :meth:`record`."""
        if self.state == HALF_OPEN:
            self._half_open_in_flight += 1
        return self._epoch

    def retry_after(self, now: float) -> int:
        """Whole seconds until the breaker lets a probe through (at least 1)."""
        return max(1, math.ceil(self.open_until - now))

    # -- telling -------------------------------------------------------------------------

    def record(self, ticket: int, ok: bool, now: float) -> None:
        """The outcome of a request sent with ``ticket``. Outcomes of requests sent before the
        last state change (a slow request from a previous closed period) still count towards
        the window when closed, but never decide a half-open trial they were not part of."""
        state = self.state
        if state == HALF_OPEN:
            if ticket != self._epoch:
                return
            self._half_open_in_flight = max(0, self._half_open_in_flight - 1)
            if not ok:
                self._open(now)
                return
            self._half_open_successes += 1
            if self._half_open_successes >= self.config.half_open_requests:
                self._close()
            return
        if state == OPEN:
            return
        second = int(now)
        bucket = self._buckets[second % len(self._buckets)]
        if bucket[0] != second:
            bucket[0], bucket[1], bucket[2] = second, 0, 0
        if ok:
            bucket[1] += 1
            return
        bucket[2] += 1
        successes, failures = self._window(second)
        total = successes + failures
        if total >= self.config.min_requests and failures >= self.config.failure_rate * total:
            self._open(now)

    def release(self, ticket: int) -> None:
        """The request sent with ``ticket`` ended without an outcome (the client went away)."""
        if self.state == HALF_OPEN and ticket == self._epoch:
            self._half_open_in_flight = max(0, self._half_open_in_flight - 1)

    # -- inside --------------------------------------------------------------------------

    def _window(self, second: int) -> tuple[int, int]:
        oldest = second - len(self._buckets) + 1
        successes = failures = 0
        for stamp, ok, failed in self._buckets:
            if stamp >= oldest:
                successes += ok
                failures += failed
        return successes, failures

    def _open(self, now: float) -> None:
        self.open_until = now + self.config.open_s
        self._transition(OPEN)

    def _close(self) -> None:
        for bucket in self._buckets:
            bucket[0], bucket[1], bucket[2] = -1, 0, 0
        self._transition(CLOSED)

    def _transition(self, state: int) -> None:
        self.state = state
        self._epoch += 1
        if self._on_change is not None:
            self._on_change(state)

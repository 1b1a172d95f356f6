"""When a failed try may be tried again, and the budget that keeps retries from storming a
failing upstream.

A try is retried only when all of these hold:

- the method is idempotent (:data:`IDEMPOTENT`);
- the failure is a connect error, a timeout of the try, an invalid response, or a 502, 503
  or 504 answer (:data:`RETRYABLE_STATUS`) — never once a response byte went to the client;
- the request body is absent or not a byte of it was read (a streamed body cannot be
  replayed);
- the route's ``retries`` are not used up and the total deadline has time left;
- the route's :class:`RetryBudget` has room.

Each retry goes to a target this request has not tried yet while there is one.
"""

from __future__ import annotations

from typing import Final

IDEMPOTENT: Final = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
RETRYABLE_STATUS: Final = frozenset({502, 503, 504})

BUDGET_RATIO: Final = 0.2
BUDGET_MIN_PER_S: Final = 3
BUDGET_WINDOW_S: Final = 10


class RetryBudget:
    """Retries in the last ``window_s`` seconds may not exceed ``ratio`` * requests in those
    seconds + ``min_per_s`` * ``window_s``. With the defaults, a route taking 1,000 requests
    a second against a dead upstream sends at most ~1,203 tries a second, whatever its
    ``retries`` says; a quiet route can still retry a few requests a second.

    Counted per route per worker in one-second buckets; the clock is passed in.
    """

    __slots__ = ("_buckets", "_floor", "ratio")

    def __init__(
        self, ratio: float = BUDGET_RATIO, min_per_s: int = BUDGET_MIN_PER_S, window_s: int = BUDGET_WINDOW_S
    ) -> None:
        self.ratio = ratio
        self._floor = min_per_s * window_s
        # [second, requests, retries] for second ≡ i (mod window_s)
        self._buckets: list[list[int]] = [[-1, 0, 0] for _ in range(window_s)]

    def _bucket(self, now: float) -> list[int]:
        second = int(now)
        bucket = self._buckets[second % len(self._buckets)]
        if bucket[0] != second:
            bucket[0], bucket[1], bucket[2] = second, 0, 0
        return bucket

    def record_request(self, now: float) -> None:
        self._bucket(now)[1] += 1

    def try_spend(self, now: float) -> bool:
        """Take one retry from the budget; False (and nothing taken) when it is spent."""
        second = int(now)
        oldest = second - len(self._buckets) + 1
        requests = retries = 0
        for stamp, made, retried in self._buckets:
            if stamp >= oldest:
                requests += made
                retries += retried
        if retries >= self.ratio * requests + self._floor:
            return False
        self._bucket(now)[2] += 1
        return True

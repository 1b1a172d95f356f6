"""What both planes agree on about usage counters: the latency buckets a data plane counts
requests into, and how a quantile is read back from merged bucket counts.

Buckets are fixed so that counts from any node, minute or route add up element by element:
the control plane merges them and reads p50/p99 from the sum, never from averages.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from typing import Final

# Upper bounds (inclusive) in milliseconds; one more bucket holds everything slower.
LATENCY_BUCKETS_MS: Final[tuple[float, ...]] = (
    1.0,
    2.5,
    5.0,
    10.0,
    25.0,
    50.0,
    100.0,
    250.0,
    500.0,
    1000.0,
    2500.0,
    5000.0,
    10000.0,
    30000.0,
)
BUCKET_COUNT: Final = len(LATENCY_BUCKETS_MS) + 1


def bucket_index(latency_ms: float) -> int:
    """The bucket a request of ``latency_ms`` falls into."""
    return bisect_left(LATENCY_BUCKETS_MS, latency_ms)


def quantile(buckets: Sequence[int], q: float) -> float | None:
    """The ``q`` quantile (0..1) of a latency histogram in ms, interpolated linearly inside its
    bucket as Prometheus' ``histogram_quantile`` does. None when the histogram is empty; a
    quantile in the open-ended last bucket is reported as that bucket's lower bound."""
    total = sum(buckets)
    if total <= 0:
        return None
    rank = q * total
    seen = 0
    for index, count in enumerate(buckets):
        if count and seen + count >= rank:
            if index >= len(LATENCY_BUCKETS_MS):
                return LATENCY_BUCKETS_MS[-1]
            lower = LATENCY_BUCKETS_MS[index - 1] if index else 0.0
            upper = LATENCY_BUCKETS_MS[index]
            return round(lower + (upper - lower) * (rank - seen) / count, 3)
        seen += count
    return LATENCY_BUCKETS_MS[-1]

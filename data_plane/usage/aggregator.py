"""Usage counters per (tenant, route, minute, status class), in memory until the reporter
takes them.

:meth:`Aggregator.record` is on the per-request path: one dict lookup and a handful of
integer additions, no I/O, no await. The reporter swaps the whole dict out with
:meth:`Aggregator.drain` every flush interval; the event loop is single-threaded, so a swap
never races a record.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Final

from shared._generated.tenantgate.v1 import cluster_pb2
from shared.usage import BUCKET_COUNT, bucket_index

# (tenant id, route id, minute start in Unix seconds, status class 1..5)
Key = tuple[str, str, int, int]
# requests, errors, rejected, bytes in, bytes out, then BUCKET_COUNT latency buckets
Row = list[int]
Counts = dict[Key, Row]

REQUESTS: Final = 0
ERRORS: Final = 1
REJECTED: Final = 2
BYTES_IN: Final = 3
BYTES_OUT: Final = 4
BUCKETS: Final = 5
ROW_LENGTH: Final = BUCKETS + BUCKET_COUNT
# Answers that refuse a known tenant: not allowed (403) or over a limit (429).
REJECTED_STATUSES: Final = frozenset({403, 429})


class Aggregator:
    __slots__ = ("_counts",)

    def __init__(self) -> None:
        self._counts: Counts = {}

    def record(
        self, tenant_id: str, route_id: str, now: float, status: int, bytes_in: int, bytes_out: int, latency_ms: float
    ) -> None:
        """Count one finished request of a known tenant. ``now`` is wall-clock seconds."""
        minute = int(now) // 60 * 60
        key = (tenant_id, route_id, minute, status // 100)
        row = self._counts.get(key)
        if row is None:
            row = self._counts[key] = [0] * ROW_LENGTH
        row[REQUESTS] += 1
        if status >= 500:
            row[ERRORS] += 1
        elif status in REJECTED_STATUSES:
            row[REJECTED] += 1
        row[BYTES_IN] += bytes_in
        row[BYTES_OUT] += bytes_out
        row[BUCKETS + bucket_index(latency_ms)] += 1

    def drain(self) -> Counts:
        """Everything counted since the last drain; the aggregator starts empty again."""
        counts, self._counts = self._counts, {}
        return counts

    def __len__(self) -> int:
        return len(self._counts)


def merge(into: Counts, more: Counts) -> Counts:
    """Add ``more`` into ``into`` (the same keys add up) and return ``into``."""
    for key, row in more.items():
        have = into.get(key)
        if have is None:
            into[key] = list(row)
        else:
            for i, value in enumerate(row):
                have[i] += value
    return into


def to_records(counts: Counts) -> Iterator[cluster_pb2.UsageRecord]:
    for (tenant_id, route_id, minute, status_class), row in counts.items():
        yield cluster_pb2.UsageRecord(
            tenant_id=tenant_id,
            route_id=route_id,
            minute=minute,
            status_class=status_class,
            requests=row[REQUESTS],
            errors=row[ERRORS],
            rejected=row[REJECTED],
            bytes_in=row[BYTES_IN],
            bytes_out=row[BYTES_OUT],
            latency_buckets=row[BUCKETS:],
        )


def batches(
    counts: Counts, node_id: str, next_seq: Callable[[], int], max_records: int
) -> Iterable[cluster_pb2.UsageBatch]:
    """``counts`` as batches of at most ``max_records`` records, each with the next sequence number."""
    records = list(to_records(counts))
    for start in range(0, len(records), max_records):
        yield cluster_pb2.UsageBatch(node_id=node_id, seq=next_seq(), records=records[start : start + max_records])

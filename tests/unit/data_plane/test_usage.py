"""data_plane.usage: per-request aggregation, and the on-disk spool that keeps unsent batches."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from data_plane.usage import aggregator as agg
from data_plane.usage.spool import CorruptBatch, Spool
from shared._generated.tenantgate.v1 import cluster_pb2
from shared.usage import BUCKET_COUNT, LATENCY_BUCKETS_MS, bucket_index, quantile

pytestmark = pytest.mark.unit

T0 = 1_800_000_000.0  # a minute boundary


def test_requests_of_one_minute_add_up_per_status_class() -> None:
    a = agg.Aggregator()
    a.record("t1", "r1", T0 + 1, 200, 10, 100, 3.0)
    a.record("t1", "r1", T0 + 59, 201, 5, 50, 70.0)
    a.record("t1", "r1", T0 + 30, 503, 0, 20, 2.0)
    a.record("t1", "r1", T0 + 31, 429, 0, 20, 0.5)
    a.record("t1", "r1", T0 + 32, 403, 0, 20, 0.5)
    a.record("t1", "r1", T0 + 60, 200, 0, 0, 1.0)  # the next minute
    counts = a.drain()
    assert len(a) == 0 and a.drain() == {}
    ok = counts[("t1", "r1", int(T0), 2)]
    assert ok[: agg.BUCKETS] == [2, 0, 0, 15, 150]
    assert ok[agg.BUCKETS + bucket_index(3.0)] == 1 and ok[agg.BUCKETS + bucket_index(70.0)] == 1
    assert counts[("t1", "r1", int(T0), 5)][: agg.BUCKETS] == [1, 1, 0, 0, 20]
    assert counts[("t1", "r1", int(T0), 4)][: agg.BUCKETS] == [2, 0, 2, 0, 40]
    assert counts[("t1", "r1", int(T0) + 60, 2)][agg.REQUESTS] == 1


def test_batches_carry_every_record_with_increasing_seqs() -> None:
    a = agg.Aggregator()
    for i in range(7):
        a.record(f"t{i}", "r", T0, 200, 1, 2, 1.0)
    seqs = iter(range(100, 200))
    batches = list(agg.batches(a.drain(), "node", lambda: next(seqs), max_records=3))
    assert [b.seq for b in batches] == [100, 101, 102]
    assert [len(b.records) for b in batches] == [3, 3, 1]
    record = batches[0].records[0]
    assert record.minute == int(T0) and record.status_class == 2 and len(record.latency_buckets) == BUCKET_COUNT


def test_merge_adds_held_counters_to_new_ones() -> None:
    a = agg.Aggregator()
    a.record("t", "r", T0, 200, 1, 1, 1.0)
    held = a.drain()
    a.record("t", "r", T0, 200, 2, 2, 1.0)
    merged = agg.merge(held, a.drain())
    assert merged[("t", "r", int(T0), 2)][: agg.BUCKETS] == [2, 0, 0, 3, 3]


def test_quantiles_from_merged_buckets() -> None:
    buckets = [0] * BUCKET_COUNT
    assert quantile(buckets, 0.5) is None
    buckets[bucket_index(3.0)] = 50  # (2.5, 5]
    buckets[bucket_index(80.0)] = 50  # (50, 100]
    p50, p99 = quantile(buckets, 0.5), quantile(buckets, 0.99)
    assert p50 is not None and 2.5 < p50 <= 5.0
    assert p99 is not None and 50.0 < p99 <= 100.0
    slow = [0] * BUCKET_COUNT
    slow[-1] = 1
    assert quantile(slow, 0.99) == LATENCY_BUCKETS_MS[-1]


def _batch(node: str, seq: int) -> cluster_pb2.UsageBatch:
    record = cluster_pb2.UsageRecord(tenant_id="t", route_id="r", minute=60, status_class=2, requests=1)
    return cluster_pb2.UsageBatch(node_id=node, seq=seq, records=[record])


def test_spooled_batches_survive_a_restart_in_order(tmp_path: Path) -> None:
    clock = iter([5, 5, 5])
    spool = Spool(tmp_path, "node-a", 1 << 20, clock_us=lambda: next(clock))
    spool.open()
    seqs = [spool.next_seq() for _ in range(3)]
    assert seqs == [5, 6, 7]
    for seq in seqs:
        assert spool.append(_batch("node-a", seq))
    spool.close()

    again = Spool(tmp_path, "node-a", 1 << 20, clock_us=lambda: 0)
    again.open()
    assert again.batches == 3
    pending = again.pending(10)
    assert [again.read(p).seq for p in pending] == [5, 6, 7]
    assert again.next_seq() == 8  # never reuses a number, whatever the clock says
    mode = stat.S_IMODE(os.stat(pending[0]).st_mode)
    assert mode == 0o600 and stat.S_IMODE(os.stat(tmp_path / "usage").st_mode) == 0o700
    again.remove(pending[:2])
    assert again.batches == 1
    again.close()


def test_seq_increases_across_restarts_even_when_the_spool_is_empty(tmp_path: Path) -> None:
    spool = Spool(tmp_path, "n", 1 << 20, clock_us=lambda: 10)
    spool.open()
    seq = spool.next_seq()
    spool.append(_batch("n", seq))
    spool.remove(spool.pending(10))
    spool.close()
    again = Spool(tmp_path, "n", 1 << 20, clock_us=lambda: 1)
    again.open()
    assert again.next_seq() == seq + 1
    again.close()


def test_a_new_node_adopts_the_batches_of_a_stopped_one(tmp_path: Path) -> None:
    old = Spool(tmp_path, "host-111", 1 << 20)
    old.open()
    old.append(_batch("host-111", old.next_seq()))
    live = Spool(tmp_path, "host-222", 1 << 20)
    live.open()
    live.append(_batch("host-222", live.next_seq()))
    old.close()  # host-111 is gone; host-222 still runs

    new = Spool(tmp_path, "host-333", 1 << 20)
    assert new.open() == 1
    [adopted] = new.pending(10)
    assert new.read(adopted).node_id == "host-111"  # keeps its identity for the control plane
    assert not (tmp_path / "usage" / "host-111").exists()
    assert live.batches == 1 and (tmp_path / "usage" / "host-222").exists()
    new.close()
    live.close()


def test_the_bound_refuses_appends_unless_forced(tmp_path: Path) -> None:
    spool = Spool(tmp_path, "n", 1)
    spool.open()
    assert spool.append(_batch("n", spool.next_seq()))
    assert spool.full
    assert not spool.append(_batch("n", spool.next_seq()))
    assert spool.append(_batch("n", spool.next_seq()), force=True)
    assert spool.batches == 2
    spool.close()


def test_a_corrupt_batch_is_set_aside(tmp_path: Path) -> None:
    spool = Spool(tmp_path, "n", 1 << 20)
    spool.open()
    spool.append(_batch("n", spool.next_seq()))
    [path] = spool.pending(10)
    path.write_bytes(b"\xff\xff\xff")
    with pytest.raises(CorruptBatch):
        spool.read(path)
    assert spool.batches == 0 and path.with_suffix(".corrupt").exists()
    spool.close()

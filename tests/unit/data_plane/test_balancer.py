"""data_plane.upstream.balancer: smooth weighted round robin, least connections, rendezvous hashing."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from data_plane.upstream.balancer import ConsistentHash, LeastConnections, RoundRobin
from data_plane.upstream.endpoint import Endpoint

pytestmark = pytest.mark.unit

URLS = ["http://a.internal:80", "http://b.internal:80", "http://c.internal:80"]


def _within_5_percent(counts: Counter[int], weights: list[int], total: int) -> None:
    for i, weight in enumerate(weights):
        expected = total * weight / sum(weights)
        assert abs(counts[i] - expected) <= 0.05 * expected, (i, counts[i], expected)


def test_smooth_round_robin_interleaves_like_nginx() -> None:
    rr = RoundRobin([5, 1, 1])
    picks = "".join("abc"[rr.pick([0, 1, 2], None)] for _ in range(7))
    assert picks == "aabacaa"


def test_round_robin_follows_weights_over_10000_picks() -> None:
    rr = RoundRobin([5, 3, 2])
    counts = Counter(rr.pick([0, 1, 2], None) for _ in range(10_000))
    assert counts == Counter({0: 5000, 1: 3000, 2: 2000})


def test_round_robin_shares_out_among_the_candidates_left() -> None:
    rr = RoundRobin([1, 1, 2])
    counts = Counter(rr.pick([0, 2], None) for _ in range(300))
    assert counts == Counter({0: 100, 2: 200})


def test_least_connections_prefers_fewest_in_flight_per_weight() -> None:
    endpoints = [Endpoint(u) for u in URLS]
    lc = LeastConnections(endpoints, [1, 1, 4], random.Random(1))
    endpoints[0].active, endpoints[1].active, endpoints[2].active = 2, 1, 3  # 2/1, 1/1, 3/4
    assert lc.pick([0, 1, 2], None) == 2
    endpoints[2].active = 5  # 5/4 > 1/1
    assert lc.pick([0, 1, 2], None) == 1
    assert lc.pick([0, 2], None) == 2  # 5/4 < 2/1


def test_least_connections_breaks_ties_at_random_by_weight() -> None:
    endpoints = [Endpoint(u) for u in URLS]
    lc = LeastConnections(endpoints, [1, 2, 1], random.Random(7))
    counts = Counter(lc.pick([0, 1, 2], None) for _ in range(10_000))
    _within_5_percent(counts, [1, 2, 1], 10_000)


def test_consistent_hash_is_the_same_in_every_process_and_sticky() -> None:
    one, other = ConsistentHash(URLS, [1, 1, 1]), ConsistentHash(URLS, [1, 1, 1])
    keys = [f"tenant-{i}".encode() for i in range(1000)]
    first = [one.pick([0, 1, 2], k) for k in keys]
    assert first == [one.pick([0, 1, 2], k) for k in keys]
    assert first == [other.pick([0, 1, 2], k) for k in keys]


def test_consistent_hash_follows_weights() -> None:
    ch = ConsistentHash(URLS, [1, 2, 1])
    counts = Counter(ch.pick([0, 1, 2], f"k{i}".encode()) for i in range(10_000))
    _within_5_percent(counts, [1, 2, 1], 10_000)


def test_consistent_hash_moves_only_the_removed_targets_keys() -> None:
    keys = [f"user-{i}".encode() for i in range(5000)]
    full = ConsistentHash(URLS, [1, 1, 1])
    before = {k: URLS[full.pick([0, 1, 2], k)] for k in keys}
    # Removing c from the route (a new snapshot without it) and c being out of service
    # (not a candidate) move the same keys, and only c's.
    shrunk = ConsistentHash(URLS[:2], [1, 1])
    after_removal = {k: URLS[shrunk.pick([0, 1], k)] for k in keys}
    after_outage = {k: URLS[full.pick([0, 1], k)] for k in keys}
    moved = {k for k in keys if after_removal[k] != before[k]}
    assert moved == {k for k in keys if before[k] == URLS[2]}
    assert after_outage == after_removal
    assert 0.28 < len(moved) / len(keys) < 0.38


def test_consistent_hash_without_a_key_is_round_robin() -> None:
    ch = ConsistentHash(URLS, [2, 1, 1])
    assert Counter(ch.pick([0, 1, 2], None) for _ in range(400)) == Counter({0: 200, 1: 100, 2: 100})

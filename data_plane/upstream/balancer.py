"""Load balancing across a route's targets, built once per snapshot per route.

Each balancer chooses among *candidates*: indices of the route's targets that may be picked
right now (in service, breaker closed or probing, not already tried by this request), given
in ascending order and never empty. Weights are the route's; state that must outlive a
snapshot (connections in flight) lives in the :class:`~data_plane.upstream.endpoint.Endpoint`.

- :class:`RoundRobin`: smooth weighted round-robin (nginx): each pick adds every
  candidate's weight to its running score, takes the highest, and subtracts the total from
  the winner. Weights 5:1:1 give ``a a b a c a a``, never five ``a`` in a row.
- :class:`LeastConnections`: the fewest requests in flight per unit of weight; ties are
  broken at random in proportion to weight (so an idle pool still follows the weights).
- :class:`ConsistentHash`: weighted rendezvous hashing (highest random weight): every
  (key, target) pair gets a stable pseudo-random score ``-weight / ln(u)``; the highest
  wins. A key stays on its target while that target is a candidate; removing a target
  moves only the keys it held, each to the next-highest target. No ring to build, so
  compiling 10,000 routes costs nothing extra. A request without a key (no tenant, no such
  header) is balanced round-robin.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence
from typing import Final, Protocol

from data_plane.upstream.endpoint import Endpoint

_MASK64: Final = (1 << 64) - 1
_TWO_TO_53: Final = float(1 << 53)


class Balancer(Protocol):
    def pick(self, candidates: Sequence[int], key: bytes | None) -> int:
        """One of ``candidates`` (never empty)."""
        ...


class RoundRobin:
    __slots__ = ("_current", "_weights")

    def __init__(self, weights: Sequence[int]) -> None:
        self._weights = tuple(weights)
        self._current = [0] * len(weights)

    def pick(self, candidates: Sequence[int], key: bytes | None) -> int:
        if len(candidates) == 1:
            return candidates[0]
        current, weights = self._current, self._weights
        best = -1
        best_score = 0
        total = 0
        for i in candidates:
            weight = weights[i]
            total += weight
            score = current[i] + weight
            current[i] = score
            if best < 0 or score > best_score:
                best, best_score = i, score
        current[best] -= total
        return best


class LeastConnections:
    __slots__ = ("_endpoints", "_rng", "_weights")

    def __init__(self, endpoints: Sequence[Endpoint], weights: Sequence[int], rng: random.Random) -> None:
        self._endpoints = tuple(endpoints)
        self._weights = tuple(weights)
        self._rng = rng

    def pick(self, candidates: Sequence[int], key: bytes | None) -> int:
        if len(candidates) == 1:
            return candidates[0]
        endpoints, weights = self._endpoints, self._weights
        tied: list[int] = []
        best_active = best_weight = 0
        for i in candidates:
            active, weight = endpoints[i].active, weights[i]
            if not tied:
                tied.append(i)
                best_active, best_weight = active, weight
                continue
            # active/weight compared without division: a/w < b/v ⇔ a·v < b·w.
            lhs, rhs = active * best_weight, best_active * weight
            if lhs < rhs:
                tied.clear()
                tied.append(i)
                best_active, best_weight = active, weight
            elif lhs == rhs:
                tied.append(i)
        if len(tied) == 1:
            return tied[0]
        point = self._rng.random() * sum(weights[i] for i in tied)
        for i in tied:
            point -= weights[i]
            if point < 0:
                return i
        return tied[-1]


class ConsistentHash:
    __slots__ = ("_fallback", "_seeds", "_weights")

    def __init__(self, urls: Sequence[str], weights: Sequence[int]) -> None:
        # A target's seed depends on its URL only, so every worker and every node agrees, and
        # adding or removing another target changes nothing for it.
        self._seeds = tuple(stable_hash(url.encode()) for url in urls)
        self._weights = tuple(float(w) for w in weights)
        self._fallback = RoundRobin(weights)

    def pick(self, candidates: Sequence[int], key: bytes | None) -> int:
        if key is None:
            return self._fallback.pick(candidates, None)
        if len(candidates) == 1:
            return candidates[0]
        hashed = stable_hash(key)
        seeds, weights = self._seeds, self._weights
        best = candidates[0]
        best_score = -1.0
        for i in candidates:
            unit = ((_mix(hashed ^ seeds[i]) >> 11) + 0.5) / _TWO_TO_53  # uniform in (0, 1)
            score = -weights[i] / math.log(unit)
            if score > best_score:
                best, best_score = i, score
        return best


def stable_hash(data: bytes) -> int:
    """64 bits that are the same in every process (unlike ``hash()``)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def _mix(x: int) -> int:
    """splitmix64's finaliser: spreads the bits of (key ^ seed) over the whole word."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)

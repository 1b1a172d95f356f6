"""A read-only mapping that a change copies only a small part of.

Snapshots are immutable values, and a config delta makes the next one from the last: with
plain dicts, adding one API key to a table of 100,000 copies all 100,000 entries. A
:class:`ShardMap` keeps its entries in :data:`SHARDS` dicts chosen by the key's hash, and
:meth:`ShardMap.patched` returns a new map that shares every shard the change leaves alone,
so a change costs a few shards of ``len / SHARDS`` entries each. A lookup is one hash (which
``str`` and ``bytes`` cache on the key) and one dict probe.

Iteration goes shard by shard: it is not insertion order.
"""

from __future__ import annotations

from collections.abc import Generator, Hashable, Iterable, Iterator, Mapping
from itertools import chain
from typing import Final, TypeVar, overload

SHARDS: Final = 256
MASK: Final = SHARDS - 1

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
D = TypeVar("D")


class ShardMap(Mapping[K, V]):
    """``Mapping`` of ``K`` to ``V`` in :data:`SHARDS` dicts; never changed once built."""

    __slots__ = ("_len", "shards")

    shards: tuple[dict[K, V], ...]

    def __init__(self, items: Iterable[tuple[K, V]] = ()) -> None:
        shards: list[dict[K, V]] = [{} for _ in range(SHARDS)]
        for key, value in items:
            shards[hash(key) & MASK][key] = value
        self.shards = tuple(shards)
        self._len = sum(len(s) for s in shards)

    @classmethod
    def filling(cls, items: Iterable[tuple[K, V]], step: int = 500) -> Generator[None, None, ShardMap[K, V]]:
        """Build a map of ``items`` a little at a time: yields every ``step`` items and returns
        the map (``table = yield from ShardMap.filling(items)``)."""
        shards: list[dict[K, V]] = [{} for _ in range(SHARDS)]
        for n, (key, value) in enumerate(items, 1):
            shards[hash(key) & MASK][key] = value
            if not n % step:
                yield
        new: ShardMap[K, V] = ShardMap.__new__(ShardMap)
        new.shards = tuple(shards)
        new._len = sum(len(s) for s in shards)
        return new

    def __getitem__(self, key: K) -> V:
        return self.shards[hash(key) & MASK][key]

    @overload
    def get(self, key: K, /) -> V | None: ...
    @overload
    def get(self, key: K, default: V | D, /) -> V | D: ...
    def get(self, key: K, default: object = None, /) -> object:
        return self.shards[hash(key) & MASK].get(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self.shards[hash(key) & MASK]

    def __iter__(self) -> Iterator[K]:
        return chain.from_iterable(self.shards)

    def __len__(self) -> int:
        return self._len

    def values(self) -> Iterator[V]:  # type: ignore[override]
        return chain.from_iterable(s.values() for s in self.shards)

    def items(self) -> Iterator[tuple[K, V]]:  # type: ignore[override]
        return chain.from_iterable(s.items() for s in self.shards)

    def __repr__(self) -> str:
        return f"ShardMap({len(self)} entries)"

    def patched(self, removed: Iterable[K], upserts: Iterable[tuple[K, V]]) -> ShardMap[K, V]:
        """A map without ``removed`` and with ``upserts`` set (in that order), sharing every
        shard neither touches with this one; this one itself when nothing changes."""
        copied: dict[int, dict[K, V]] = {}

        def own(key: K) -> dict[K, V]:
            index = hash(key) & MASK
            shard = copied.get(index)
            if shard is None:
                shard = copied[index] = dict(self.shards[index])
            return shard

        for key in removed:
            if key in self:
                own(key).pop(key, None)  # a key named twice is removed once
        for key, value in upserts:
            own(key)[key] = value
        if not copied:
            return self
        new: ShardMap[K, V] = ShardMap.__new__(ShardMap)
        shards = list(self.shards)
        size = self._len
        for index, shard in copied.items():
            size += len(shard) - len(shards[index])
            shards[index] = shard
        new.shards = tuple(shards)
        new._len = size
        return new

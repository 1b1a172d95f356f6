"""shared.shardmap: a mapping whose next version shares every shard a change leaves alone."""

from __future__ import annotations

import pytest

from shared.shardmap import SHARDS, ShardMap


def numbers(n: int) -> ShardMap[str, int]:
    return ShardMap((f"k{i}", i) for i in range(n))


def test_reads_like_the_dict_it_was_built_from() -> None:
    table = numbers(1000)
    plain = {f"k{i}": i for i in range(1000)}
    assert len(table) == 1000 and table == plain
    assert table["k7"] == 7 and table.get("k7") == 7 and "k7" in table
    assert table.get("nope") is None and table.get("nope", -1) == -1 and "nope" not in table
    with pytest.raises(KeyError):
        table["nope"]
    assert sorted(table) == sorted(plain) and sorted(table.values()) == sorted(plain.values())
    assert dict(table.items()) == plain


def test_patched_copies_only_the_shards_it_changes() -> None:
    table = numbers(10 * SHARDS)
    patched = table.patched(["k1", "absent"], [("k2", -2), ("new", 99)])
    assert len(patched) == len(table) and "k1" not in patched and patched["k2"] == -2 and patched["new"] == 99
    # The original is untouched, and shares every shard but those of k1, k2 and new.
    assert table["k1"] == 1 and table["k2"] == 2 and "new" not in table and len(table) == 10 * SHARDS
    copied = [i for i in range(SHARDS) if patched.shards[i] is not table.shards[i]]
    assert 1 <= len(copied) <= 3
    assert all(table.shards[i] == patched.shards[i] for i in range(SHARDS) if i not in copied)


def test_patched_with_nothing_to_change_is_the_same_map() -> None:
    table = numbers(10)
    assert table.patched([], []) is table
    assert table.patched(["absent"], []) is table


def test_removed_then_set_in_one_patch_is_set() -> None:
    table = numbers(10)
    assert table.patched(["k3"], [("k3", 33)])["k3"] == 33

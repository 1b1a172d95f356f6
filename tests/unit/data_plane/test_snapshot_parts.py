"""A whole snapshot in parts (``SnapshotPart``): the control plane cuts its encoding between
fields, and a data plane gathers the parts in order and applies the snapshot they make
whole, or refuses a run that lost, repeated or reordered a part without serving any of it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from control_plane.cluster.snapshots import Published, SnapshotCache, build
from data_plane import cluster, disk
from data_plane.cluster import ConfigClient, _gathered, _PartRun
from data_plane.snapshot import Holder, decode_full, snapshot_part
from shared import settings
from shared._generated.tenantgate.v1 import cluster_pb2
from shared._generated.tenantgate.v1 import snapshot_pb2 as pb
from shared.errors import InvalidSnapshot
from tests.unit.control_plane.test_cluster_snapshots import key, route, rows, tenant

TOKEN = "0123456789abcdef-cluster-token"


def published(version: int = 5, tenants: int = 20, keys: int = 300, routes: int = 40) -> Published:
    return build(
        None,
        rows(
            version,
            True,
            tenants={f"t{i}": tenant(i) for i in range(tenants)},
            api_keys={f"k{i}": key(i, i % tenants) for i in range(keys)},
            routes={f"r{i}": (i, route(i)) for i in range(routes)},
        ),
    )


def parts_of(pub: Published, part_bytes: int = 2000) -> list[cluster_pb2.SnapshotPart]:
    out = []
    for raw in pub.catalog.full_parts(part_bytes):
        part = snapshot_part(raw)
        assert part is not None
        out.append(part)
    return out


def test_the_parts_are_the_whole_snapshot_cut_between_fields() -> None:
    pub = published()
    parts = parts_of(pub, part_bytes=2000)
    whole = cluster_pb2.ConfigUpdate.FromString(pub.full()).snapshot
    assert len(parts) > 5
    assert [p.index for p in parts] == list(range(len(parts)))
    assert [p.last for p in parts] == [False] * (len(parts) - 1) + [True]
    assert {p.version for p in parts} == {5}
    # In order they are the encoded snapshot, and each alone is an encoded snapshot too.
    assert b"".join(p.data for p in parts) == whole.SerializeToString()
    pieces = [pb.Snapshot.FromString(p.data) for p in parts]
    assert sum(len(p.api_keys) for p in pieces) == 300 and sum(len(p.routes) for p in pieces) == 40
    # Cut once a piece reaches the size: no piece is larger than the size and one entry.
    largest_entry = max(len(k.SerializeToString()) for k in (*whole.api_keys, *whole.routes, *whole.tenants))
    assert max(len(p.data) for p in parts[:-1]) < 2000 + largest_entry + 8


def test_a_small_snapshot_is_one_part() -> None:
    [only] = parts_of(published(tenants=1, keys=1, routes=1), part_bytes=256 * 1024)
    assert (only.index, only.last, only.version) == (0, True, 5)


def test_a_node_that_takes_parts_is_sent_them_and_any_other_one_message() -> None:
    cache = SnapshotCache(db=None)  # type: ignore[arg-type]
    pub = published()
    asyncio.run(cache._publish(pub))
    version, [whole], full = cache.updates_for(0)
    assert (version, full) == (5, True)
    assert cluster_pb2.ConfigUpdate.FromString(whole).WhichOneof("kind") == "snapshot"
    version, parts, full = cache.updates_for(0, parts=True)
    assert (version, full, parts) == (5, True, pub.catalog.full_parts())
    assert pub.whole(parts=True) is pub.whole(parts=True)  # encoded once, shared by every stream


def gather(parts: list[cluster_pb2.SnapshotPart]) -> list[_PartRun]:
    """The runs a stream of parts completes, in order."""
    run: _PartRun | None = None
    done = []
    for part in parts:
        run = _gathered(run, part)
        if part.last:
            done.append(run)
            run = None
    return done


def test_a_run_with_a_part_lost_repeated_or_out_of_order_is_broken() -> None:
    parts = parts_of(published())
    [ok] = gather(parts)
    assert not ok.error and ok.pieces == [p.data for p in parts]
    for broken, missing in (
        ([parts[0], *parts[2:]], "part 2 of version 5 came where part 1 was due"),
        ([*parts[:3], parts[2], *parts[3:]], "part 2 of version 5 came where part 3 was due"),
        ([parts[0], parts[2], parts[1], *parts[3:]], "part 2 of version 5 came where part 1 was due"),
        (parts[1:], "part 1 of version 5 came where part 0 was due"),
    ):
        [run] = gather(broken)
        assert (run.error, run.pieces) == (missing, [])


def test_part_zero_or_another_version_starts_a_new_run() -> None:
    old, new = parts_of(published(5)), parts_of(published(6))
    [run] = gather([*old[:3], *new])
    assert (run.version, run.error, run.pieces) == (6, "", [p.data for p in new])
    [run] = gather([*old[:3], *old])
    assert (run.version, run.error, len(run.pieces)) == (5, "", len(old))


def client(tmp_path: Path) -> tuple[ConfigClient, Holder]:
    env = {
        "TENANTGATE_CLUSTER_TOKEN": TOKEN,
        "TENANTGATE_DATA_DIR": str(tmp_path / "data"),
        "TENANTGATE_NODE_ID": "dp-parts",
    }
    holder = Holder()
    return ConfigClient(settings.load(environ=env), holder), holder


def test_a_gathered_run_is_applied_saved_and_acked(tmp_path: Path) -> None:
    dp, holder = client(tmp_path)
    pub = published()
    [run] = gather(parts_of(pub))

    async def apply() -> cluster_pb2.WatchRequest:
        answer = await dp._apply(run)
        assert dp._saving is not None
        await dp._saving
        return answer

    answer = asyncio.run(apply())
    assert answer.WhichOneof("kind") == "ack" and answer.ack.version == 5
    whole = cluster_pb2.ConfigUpdate.FromString(pub.full()).snapshot
    assert holder.current is not None and holder.current.objects == decode_full(whole)
    saved = disk.load(tmp_path / "data")
    assert saved is not None and saved[0] == whole


@pytest.mark.parametrize("how", ["part lost", "other version inside", "too large"])
def test_a_broken_run_is_nacked_and_the_old_snapshot_keeps_serving(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    dp, holder = client(tmp_path)
    [first] = gather(parts_of(published(5)))
    parts = parts_of(published(6, keys=400))
    if how == "part lost":
        del parts[3]
        expected = "part 4 of version 6 came where part 3 was due"
    elif how == "other version inside":
        # Parts that say version 6 around a snapshot of version 7: refused whole.
        parts = parts_of(published(7, keys=400))
        for part in parts:
            part.version = 6
        expected = "the parts of version 6 hold a snapshot of version 7"
    else:
        monkeypatch.setattr(cluster, "MAX_MESSAGE_BYTES", 10_000)
        expected = "the snapshot of version 6 is larger than 10000 bytes"
    [run] = gather(parts)

    async def apply() -> tuple[cluster_pb2.WatchRequest, cluster_pb2.WatchRequest]:
        return await dp._apply(first), await dp._apply(run)

    good, refused = asyncio.run(apply())
    assert good.ack.version == 5
    assert refused.WhichOneof("kind") == "nack"
    assert (refused.nack.version, refused.nack.error, refused.nack.resync) == (6, expected, False)
    assert holder.current is not None and holder.current.version == 5
    assert dp.status.nacks == 1


def test_an_update_that_is_no_part_is_not_taken_for_one() -> None:
    pub = published()
    assert snapshot_part(pub.full()) is None
    # The part tag, then bytes that are no message.
    with pytest.raises(InvalidSnapshot, match="snapshot part cannot be decoded"):
        snapshot_part(pub.catalog.full_parts()[0][:-5])

"""control_plane.cluster.snapshots: versions encoded once, full snapshots by concatenation,
deltas that bring a node exactly to the snapshot it would get whole."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib

import pytest

from control_plane.cluster.snapshots import Published, build
from control_plane.store.config import ConfigRows
from shared import snapshot as model
from shared._generated.tenantgate.v1 import cluster_pb2
from shared._generated.tenantgate.v1 import snapshot_pb2 as pb


def tenant(i: int, active: bool = True) -> model.Tenant:
    return model.Tenant(f"t{i}", f"tenant {i}", "free", 60, 1000, 0, 0, active)


def key(i: int, owner: int) -> model.ApiKey:
    return model.ApiKey(f"k{i}", f"t{owner}", hashlib.sha256(str(i).encode()).digest())


def route(i: int, priority: int = 0) -> model.Route:
    upstream = (model.Upstream("http://127.0.0.1:9000", 1),)
    return model.Route(f"r{i}", f"/svc{i}/*", ("GET",), upstream, True, 0, 30000, False, priority)


def rows(version: int, full: bool, **kinds: dict[str, object]) -> ConfigRows:
    empty: dict[str, object] = {}
    return ConfigRows(
        version,
        full,
        kinds.get("tenants", empty),  # type: ignore[arg-type]
        kinds.get("api_keys", empty),  # type: ignore[arg-type]
        kinds.get("routes", empty),  # type: ignore[arg-type]
        {},
        {},
        {},
    )


def first() -> Published:
    return build(
        None,
        rows(
            5,
            True,
            tenants={f"t{i}": tenant(i) for i in range(3)},
            api_keys={f"k{i}": key(i, i % 3) for i in range(6)},
            routes={f"r{i}": (i, route(i)) for i in range(4)},
        ),
    )


def snapshot_of(published: Published) -> cluster_pb2.ConfigUpdate:
    return cluster_pb2.ConfigUpdate.FromString(published.full())


def by_id(msg: pb.Snapshot) -> pb.Snapshot:
    """``msg`` with its tenants and keys sorted by id: a catalog keeps those in shards, in no
    particular order (routes keep theirs: it decides ties)."""
    out = pb.Snapshot()
    out.CopyFrom(msg)
    for kind in ("tenants", "api_keys"):
        ordered = sorted(getattr(msg, kind), key=lambda m: m.id)
        del getattr(out, kind)[:]
        getattr(out, kind).extend(ordered)
    return out


def test_full_update_by_concatenation_equals_the_encoded_snapshot() -> None:
    published = first()
    whole = snapshot_of(published)
    expected = model.to_proto(
        model.Snapshot(
            version=5,
            built_at_ms=published.catalog.built_at_ms,
            tenants=tuple(tenant(i) for i in range(3)),
            api_keys=tuple(key(i, i % 3) for i in range(6)),
            routes=tuple(route(i) for i in range(4)),
        )
    )
    assert whole.WhichOneof("kind") == "snapshot"
    assert by_id(whole.snapshot) == expected
    assert published.delta is None  # the first version has nothing to be a delta from


def test_delta_names_only_what_changed() -> None:
    before = first()
    after = build(
        before.catalog,
        rows(
            6,
            False,
            tenants={"t1": tenant(1, active=False), "t2": tenant(2)},  # t2 read again but unchanged
            api_keys={"k0": None},
            routes={"r9": (9, route(9)), "r2": (2, route(2, priority=5)), "r3": None},
        ),
    )
    assert after.delta is not None and after.from_version == 5
    delta = cluster_pb2.ConfigUpdate.FromString(after.delta).delta
    assert delta.from_version == 5 and delta.upserts.version == 6
    assert [t.id for t in delta.upserts.tenants] == ["t1"]
    assert [r.id for r in delta.upserts.routes] == ["r2", "r9"]
    assert (list(delta.removed_api_keys), list(delta.removed_routes)) == (["k0"], ["r3"])
    whole = snapshot_of(after).snapshot
    assert [r.id for r in whole.routes] == ["r0", "r1", "r2", "r9"]
    assert sorted(k.id for k in whole.api_keys) == ["k1", "k2", "k3", "k4", "k5"]
    assert not next(t for t in whole.tenants if t.id == "t1").is_active


def test_a_route_back_with_an_older_seq_is_no_delta() -> None:
    before = build(first().catalog, rows(6, False, routes={"r1": None}))
    back = build(before.catalog, rows(7, False, routes={"r1": (1, route(1))}))
    assert back.delta is None
    assert [r.id for r in snapshot_of(back).snapshot.routes] == ["r0", "r1", "r2", "r3"]


def test_full_read_after_a_gap_becomes_a_delta_by_comparison() -> None:
    before = first()
    again = build(
        before.catalog,
        rows(
            9,
            True,
            tenants={f"t{i}": tenant(i) for i in range(3)},
            api_keys={f"k{i}": key(i, i % 3) for i in range(5)},
            routes={f"r{i}": (i, route(i)) for i in range(4)},
        ),
    )
    assert again.delta is not None
    delta = cluster_pb2.ConfigUpdate.FromString(again.delta).delta
    assert (delta.from_version, list(delta.removed_api_keys), len(delta.upserts.tenants)) == (5, ["k5"], 0)


def test_a_node_gets_the_deltas_that_reach_back_to_it_else_one_full_snapshot() -> None:
    from control_plane.cluster.snapshots import SnapshotCache

    cache = SnapshotCache(db=None)  # type: ignore[arg-type]
    v5 = first()
    v6 = build(v5.catalog, rows(6, False, tenants={"t1": tenant(1, active=False)}))
    v7 = build(v6.catalog, rows(7, False, api_keys={"k2": None}))

    async def publish() -> None:
        for published in (v5, v6, v7):
            await cache._publish(published)

    asyncio.run(publish())
    assert cache.updates_for(7) == (7, [], False)
    assert cache.updates_for(6) == (7, [v7.delta], False)
    assert cache.updates_for(5) == (7, [v6.delta, v7.delta], False)
    for behind in (0, 3):  # nothing held, or older than any delta kept
        version, [whole], full = cache.updates_for(behind)
        assert (version, full) == (7, True)
        assert cluster_pb2.ConfigUpdate.FromString(whole).snapshot.version == 7


def test_a_change_of_many_objects_is_published_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    from control_plane.cluster import snapshots

    monkeypatch.setattr(snapshots, "MAX_DELTA_OBJECTS", 3)
    before = first()
    few = build(before.catalog, rows(6, False, api_keys={f"k{i}": None for i in range(3)}))
    many = build(few.catalog, rows(7, False, tenants={f"t9{i}": tenant(90 + i) for i in range(4)}))
    assert few.delta is not None and many.delta is None
    assert sorted(t.id for t in snapshot_of(many).snapshot.tenants) == ["t0", "t1", "t2", "t90", "t91", "t92", "t93"]


def with_epoch(config: ConfigRows, epoch: str) -> ConfigRows:
    return dataclasses.replace(config, epoch=epoch)


def test_every_update_carries_the_config_epoch() -> None:
    v5 = build(None, with_epoch(rows(5, True, tenants={"t0": tenant(0)}, routes={"r0": (0, route(0))}), "epoch-a"))
    whole = snapshot_of(v5).snapshot
    assert (whole.version, whole.epoch) == (5, "epoch-a")
    assert by_id(whole) == by_id(model.to_proto(dataclasses.replace(model.decode(whole), epoch="epoch-a")))
    v6 = build(v5.catalog, with_epoch(rows(6, False, tenants={"t1": tenant(1)}), "epoch-a"))
    assert v6.delta is not None
    upserts = cluster_pb2.ConfigUpdate.FromString(v6.delta).delta.upserts
    assert (upserts.version, upserts.epoch) == (6, "epoch-a")


def test_rows_of_another_epoch_are_never_a_delta_of_the_last_version() -> None:
    """Another database's rows (recreated, or restored and given a new epoch): its versions are
    another history, so the version built from them is sent whole, never as a delta."""
    a = build(None, with_epoch(rows(5, True, tenants={"t0": tenant(0)}), "epoch-a"))
    b = build(a.catalog, with_epoch(rows(6, True, tenants={"t0": tenant(0), "t1": tenant(1)}), "epoch-b"))
    assert (b.delta, b.from_version, b.epoch) == (None, 0, "epoch-b")
    whole = snapshot_of(b).snapshot
    assert (whole.epoch, sorted(t.id for t in whole.tenants)) == ("epoch-b", ["t0", "t1"])


def test_a_new_epoch_wakes_watchers_whatever_its_version() -> None:
    from control_plane.cluster.snapshots import SnapshotCache

    cache = SnapshotCache(db=None)  # type: ignore[arg-type]
    a = build(None, with_epoch(rows(5, True, tenants={"t0": tenant(0)}), "epoch-a"))
    b = build(a.catalog, with_epoch(rows(3, True, tenants={"t1": tenant(1)}), "epoch-b"))

    async def run() -> str:
        await cache._publish(a)
        waiting = asyncio.ensure_future(cache.wait_newer(5, "epoch-a"))
        await asyncio.sleep(0)
        assert not waiting.done()
        await cache._publish(b)
        async with asyncio.timeout(5):
            return (await waiting).epoch

    assert asyncio.run(run()) == "epoch-b"

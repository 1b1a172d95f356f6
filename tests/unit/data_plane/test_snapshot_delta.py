"""data_plane.snapshot: a delta applied to the snapshot held gives what the whole next
snapshot would, validated against what it touches, and reuses what it leaves alone."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest

from data_plane import disk
from data_plane.errors import Unauthenticated
from data_plane.snapshot import (
    StaleBase,
    apply_delta,
    compile_objects,
    compile_snapshot,
    decode_full,
    decode_full_bytes,
)
from shared import snapshot as model
from shared._generated.tenantgate.v1 import cluster_pb2
from shared._generated.tenantgate.v1 import snapshot_pb2 as pb
from shared.errors import InvalidSnapshot


def tenant(i: int, active: bool = True) -> model.Tenant:
    return model.Tenant(f"t{i}", f"tenant {i}", "free", 60, 1000, 0, 0, active)


def key(i: int, owner: int) -> model.ApiKey:
    return model.ApiKey(f"k{i}", f"t{owner}", hashlib.sha256(f"key-{i}".encode()).digest())


def route(i: int, path: str | None = None) -> model.Route:
    upstream = (model.Upstream("http://127.0.0.1:9000", 1),)
    return model.Route(f"r{i}", path or f"/svc{i}/*", ("GET",), upstream, True, 0, 30000, False, 0)


BASE = model.Snapshot(
    version=5,
    built_at_ms=1,
    tenants=(tenant(0), tenant(1)),
    api_keys=(key(0, 0), key(1, 1)),
    routes=(route(0), route(1)),
)


def delta(
    *,
    from_version: int = 5,
    tenants: tuple[model.Tenant, ...] = (),
    api_keys: tuple[model.ApiKey, ...] = (),
    routes: tuple[model.Route, ...] = (),
    **removed: list[str],
) -> cluster_pb2.SnapshotDelta:
    upserts = model.to_proto(model.Snapshot(6, 2, tenants, api_keys, routes))
    return cluster_pb2.SnapshotDelta(from_version=from_version, upserts=upserts, **removed)


def test_delta_gives_the_next_snapshot_and_reuses_what_it_leaves() -> None:
    held = compile_snapshot(model.to_proto(BASE))
    objects, changes = apply_delta(
        held.objects, delta(tenants=(tenant(1, active=False),), api_keys=(key(2, 0),), removed_api_keys=["k0"])
    )
    compiled = compile_objects(objects, held, changes)
    assert compiled.version == 6
    assert compiled.router is held.router  # no route changed
    with pytest.raises(Exception, match="invalid API key"):
        compiled.auth.keys.lookup("key-0")
    assert compiled.auth.keys.lookup("key-2").tenant.id == "t0"
    assert compiled.auth.keys.lookup("key-1").tenant.is_active is False  # the tenant's change reached its key
    assert sorted(objects.api_keys) == ["k1", "k2"]
    assert objects.tenants["t1"].is_active is False
    assert objects.keys_by_tenant == {"t0": ("k2",), "t1": ("k1",)}


def test_route_changes_rebuild_the_router_keeping_order() -> None:
    held = compile_snapshot(model.to_proto(BASE))
    objects, changes = apply_delta(held.objects, delta(routes=(route(1, "/moved/*"), route(7)), removed_routes=["r0"]))
    compiled = compile_objects(objects, held, changes)
    assert list(objects.routes) == ["r1", "r7"]
    assert compiled.router is not held.router
    match = compiled.router.match("/moved/x", "GET")
    assert match is not None and match.route.route.id == "r1"
    assert set(compiled.upstreams) == {"r1", "r7"}


def test_delta_on_another_version_asks_for_a_full_snapshot() -> None:
    held = decode_full(model.to_proto(BASE))
    with pytest.raises(StaleBase):
        apply_delta(held, delta(from_version=4))


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (delta(api_keys=(model.ApiKey("k9", "t0", key(1, 1).key_hash),)), "unique"),
        (
            delta(
                api_keys=(model.ApiKey("k8", "t0", key(8, 0).key_hash), model.ApiKey("k9", "t1", key(8, 0).key_hash))
            ),
            "unique",
        ),
        (delta(api_keys=(key(9, 7),)), "unknown tenant"),
        (delta(removed_tenants=["t1"]), "still has keys"),
        (delta(routes=(route(3, "no-slash/*"),)), "path must start with '/'"),
    ],
)
def test_bad_delta_is_refused_whole(bad: cluster_pb2.SnapshotDelta, message: str) -> None:
    held = decode_full(model.to_proto(BASE))
    with pytest.raises(InvalidSnapshot, match=message):
        apply_delta(held, bad)


def test_a_hash_given_up_in_a_delta_may_be_taken_in_it() -> None:
    held = compile_snapshot(model.to_proto(BASE))
    moved = model.ApiKey("k9", "t0", key(1, 1).key_hash)  # k1's hash, now k9's, of another tenant
    objects, changes = apply_delta(held.objects, delta(api_keys=(moved,), removed_api_keys=["k1"]))
    compiled = compile_objects(objects, held, changes)
    identity = compiled.auth.keys.lookup("key-1")
    assert (identity.subject, identity.tenant.id) == ("k9", "t0")
    assert objects.key_by_hash[moved.key_hash] == "k9"
    assert dict(objects.keys_by_tenant) == {"t0": ("k0", "k9")}
    # The snapshot the delta applied to is unchanged: it may still be serving.
    assert held.auth.keys.lookup("key-1").subject == "k1"
    assert held.objects.key_by_hash[moved.key_hash] == "k1"
    assert dict(held.objects.keys_by_tenant) == {"t0": ("k0",), "t1": ("k1",)}


def test_a_tenant_goes_with_its_last_key_in_one_delta() -> None:
    held = compile_snapshot(model.to_proto(BASE))
    objects, changes = apply_delta(held.objects, delta(removed_api_keys=["k1"], removed_tenants=["t1"]))
    compiled = compile_objects(objects, held, changes)
    assert sorted(objects.tenants) == ["t0"] and "t1" not in objects.keys_by_tenant
    with pytest.raises(Unauthenticated):
        compiled.auth.keys.lookup("key-1")
    assert len(compiled.auth.keys) == 1


def test_disk_keeps_the_snapshot_and_the_deltas_since(tmp_path: Path) -> None:
    disk.save(tmp_path, model.to_proto(BASE))
    disk.append(tmp_path, delta(api_keys=(key(2, 0),)))
    with (tmp_path / disk.JOURNAL_FILE).open("ab") as f:
        f.write(b"\x00\x00\x01\x00torn")  # a crash in the middle of an append
    loaded = disk.load(tmp_path)
    assert loaded is not None
    msg, deltas = loaded
    assert isinstance(msg, pb.Snapshot) and msg.version == 5
    assert [d.upserts.version for d in deltas] == [6]
    objects, _ = apply_delta(decode_full(msg), deltas[0])
    assert sorted(objects.api_keys) == ["k0", "k1", "k2"]
    disk.save(tmp_path, model.to_proto(objects.snapshot()))
    assert not (tmp_path / disk.JOURNAL_FILE).exists()


def test_a_whole_snapshot_parsed_in_pieces_equals_one_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    from data_plane import snapshot

    many = model.Snapshot(
        version=9,
        built_at_ms=3,
        tenants=tuple(tenant(i) for i in range(50)),
        api_keys=tuple(key(i, i % 50) for i in range(200)),
        routes=tuple(route(i) for i in range(30)),
    )
    update = cluster_pb2.ConfigUpdate(snapshot=model.to_proto(many)).SerializeToString()
    whole = snapshot.whole_snapshot_bytes(update)
    assert whole is not None
    monkeypatch.setattr(snapshot, "PARSE_CHUNK_BYTES", 300)  # dozens of pieces
    assert list(snapshot._chunks(whole))[1:]  # really more than one
    assert snapshot.decode_full_bytes(whole) == decode_full(model.to_proto(many))
    with pytest.raises(InvalidSnapshot, match="cannot be decoded"):
        snapshot.decode_full_bytes(whole[:-3])
    delta_update = cluster_pb2.ConfigUpdate(delta=delta()).SerializeToString()
    assert snapshot.whole_snapshot_bytes(delta_update) is None


def test_compiling_in_steps_gives_what_compiling_at_once_does(monkeypatch: pytest.MonkeyPatch) -> None:
    from data_plane import snapshot

    monkeypatch.setattr(snapshot, "ROUTE_STEP", 7)  # routes over several steps
    # Ties between equally specific routes are broken by their order in the snapshot.
    tied = (route(40, "/same/*"), route(41, "/same/*"), route(42, "/svc3/x"), route(43, "/svc3/{id}"))
    many = model.Snapshot(
        version=9,
        built_at_ms=3,
        tenants=tuple(tenant(i) for i in range(30)),
        api_keys=tuple(key(i, i % 30) for i in range(3000)),
        routes=(*tuple(route(i) for i in range(30)), *tied),
    )
    objects = decode_full(model.to_proto(many))
    steps = snapshot.compiling(objects)
    taken = 0
    while True:
        try:
            next(steps)
            taken += 1
        except StopIteration as done:
            stepped: snapshot.Compiled = done.value
            break
    at_once = compile_objects(objects)
    assert taken > 5
    assert stepped.router.size == at_once.router.size == 34
    for path in ("/same/a", "/svc3/x", "/svc3/y", "/svc7/deep/er", "/nothing"):
        one, other = stepped.router.match(path, "GET"), at_once.router.match(path, "GET")
        assert (one and one.route.route.id) == (other and other.route.route.id), path
    assert stepped.router.match("/same/a", "GET").route.route.id == "r40"  # type: ignore[union-attr]
    assert sorted(stepped.upstreams) == sorted(at_once.upstreams)
    for i in (0, 1234, 2999):
        assert stepped.auth.keys.lookup(f"key-{i}") == at_once.auth.keys.lookup(f"key-{i}")
    assert len(stepped.auth.keys) == 3000


def of_epoch(update: cluster_pb2.SnapshotDelta, epoch: str) -> cluster_pb2.SnapshotDelta:
    update.upserts.epoch = epoch
    return update


def test_a_delta_of_another_epoch_asks_for_a_full_snapshot() -> None:
    """Two databases reach the same version numbers with other content: a delta counted in
    another epoch than the snapshot held is not on its base, whatever from_version says."""
    held = decode_full(model.to_proto(dataclasses.replace(BASE, epoch="epoch-a")))
    assert held.epoch == "epoch-a"
    for other in ("epoch-b", ""):
        with pytest.raises(StaleBase, match="epoch"):
            apply_delta(held, of_epoch(delta(api_keys=(key(2, 0),)), other))
    objects, _ = apply_delta(held, of_epoch(delta(api_keys=(key(2, 0),)), "epoch-a"))
    assert (objects.version, objects.epoch) == (6, "epoch-a")
    assert objects.snapshot().epoch == "epoch-a"
    # A snapshot from before epochs and the deltas on it still fit together.
    unknown = decode_full(model.to_proto(BASE))
    assert apply_delta(unknown, delta(api_keys=(key(2, 0),)))[0].epoch == ""


def test_the_epoch_survives_parsing_in_pieces_and_the_disk(tmp_path: Path) -> None:
    encoded = model.to_proto(dataclasses.replace(BASE, epoch="epoch-a")).SerializeToString()
    assert decode_full_bytes(encoded).epoch == "epoch-a"
    disk.save_bytes(tmp_path, encoded)
    disk.append(tmp_path, of_epoch(delta(api_keys=(key(2, 0),)), "epoch-a"))
    loaded = disk.load(tmp_path)
    assert loaded is not None
    msg, [journalled] = loaded
    assert (msg.epoch, journalled.upserts.epoch) == ("epoch-a", "epoch-a")
    assert apply_delta(decode_full(msg), journalled)[0].epoch == "epoch-a"

"""data_plane.cluster: a snapshot replaced whole is freed a piece at a time, once nothing
else (a request in flight, the rate limiter's last snapshot) refers to it."""

from __future__ import annotations

import asyncio
import hashlib
import sys

import pytest

from data_plane import cluster
from data_plane.snapshot import Compiled, compile_snapshot, run_steps
from shared import snapshot as model
from shared.shardmap import SHARDS


def large(version: int = 5, keys: int = 2000, routes: int = 300) -> Compiled:
    tenants = tuple(model.Tenant(f"t{i}", f"tenant {i}", "free", 0, 0, 0, 0, True) for i in range(20))
    api_keys = tuple(
        model.ApiKey(f"k{i}", f"t{i % 20}", hashlib.sha256(f"key-{i}".encode()).digest()) for i in range(keys)
    )
    upstream = (model.Upstream("http://127.0.0.1:9000", 1),)
    rs = tuple(model.Route(f"r{i}", f"/svc{i}/*", ("GET",), upstream, True, 0, 30000, False, 0) for i in range(routes))
    return compile_snapshot(model.to_proto(model.Snapshot(version, 1, tenants, api_keys, rs)))


def test_pieces_are_the_items_of_the_wide_containers() -> None:
    compiled = large()
    pieces = run_steps(cluster._pieces(compiled))
    ids = {id(p) for p in pieces}
    # Every shard of the key table and of the key maps, every route and every pool.
    assert all(id(shard) in ids for shard in compiled.objects.api_keys.shards)
    assert all(id(route) in ids for route in compiled.objects.routes.values())
    assert all(id(pool) in ids for pool in compiled.upstreams.values())
    assert sum(1 for p in pieces if isinstance(p, dict)) >= 4 * SHARDS
    assert not any(isinstance(p, Compiled) for p in pieces)


def test_release_waits_for_the_last_other_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cluster, "RELEASE_POLL_S", 0.001)
    compiled = large()
    shard = compiled.objects.api_keys.shards[0]
    pieces = run_steps(cluster._pieces(compiled))
    held = len(pieces)

    async def scenario() -> None:
        nonlocal compiled
        in_flight = compiled  # a request still serving on the old snapshot
        task = asyncio.ensure_future(cluster._release(compiled, pieces))
        del compiled
        for _ in range(20):
            await asyncio.sleep(0.001)
        assert not task.done() and len(pieces) == held
        before = sys.getrefcount(shard)
        del in_flight  # the request ends: its snapshot's frame goes, the pieces one by one
        await asyncio.wait_for(task, 10)
        assert pieces == [] and sys.getrefcount(shard) < before

    asyncio.run(scenario())

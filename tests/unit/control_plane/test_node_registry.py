"""control_plane.cluster.watch.NodeRegistry: a stop always ends the background writer."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from control_plane.cluster import watch
from control_plane.store.db import Database
from shared._generated.tenantgate.v1 import cluster_pb2


async def test_stop_right_after_a_disconnect_ends_the_writer(monkeypatch: pytest.MonkeyPatch) -> None:
    writes: list[str] = []

    async def upsert(db: object, replica: str, nodes: list[Any]) -> None:
        writes.extend(n.node_id for n in nodes)

    async def disconnected(db: object, replica: str, node: Any) -> None:
        writes.append(f"-{node.node_id}")

    monkeypatch.setattr(watch.node_store, "upsert", upsert)
    monkeypatch.setattr(watch.node_store, "disconnected", disconnected)
    registry = watch.NodeRegistry(cast(Database, object()), "replica")
    registry.start()
    node = registry.connect(cluster_pb2.Hello(node_id="dp1", last_version=3), "ipv4:127.0.0.1:1")
    async with asyncio.timeout(5):
        while "dp1" not in writes:
            await asyncio.sleep(0.001)
    # A stream ends (as every stream does when the cluster server stops) and the stop comes
    # one loop turn later: the writer's wait has just finished, its waker not yet run. On
    # Python 3.11 an asyncio.wait_for there would swallow the cancellation and stop() hang.
    registry.disconnect(node)
    await asyncio.sleep(0)
    async with asyncio.timeout(5):
        await registry.stop()
    assert "-dp1" in writes


@pytest.mark.parametrize(
    ("node_epoch", "current_epoch", "acked"),
    [("epoch-a", "epoch-a", 3), ("epoch-b", "epoch-a", 0), ("", "epoch-a", 0), ("epoch-a", None, 0)],
    ids=["same-epoch", "other-epoch", "no-epoch", "config-not-built"],
)
async def test_a_version_of_another_epoch_does_not_count_as_acknowledged(
    node_epoch: str, current_epoch: str | None, acked: int
) -> None:
    """/admin/nodes must not show a node synced because its version number, counted in another
    database's history, equals this config's."""
    registry = watch.NodeRegistry()
    hello = cluster_pb2.Hello(node_id="dp1", last_version=3, last_epoch=node_epoch)
    node = registry.connect(hello, "ipv4:127.0.0.1:1", current_epoch)
    assert node.acked_version == acked

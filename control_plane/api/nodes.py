"""``/admin/nodes``: every data-plane node any control-plane replica has seen, and whether it
serves the current config.

Each replica records the nodes connected to it in Postgres and refreshes them every few
seconds, so any replica answers for all. Status:

- ``disconnected``: no replica holds a stream to it (or none has vouched for it lately:
  the replica that held it may have died);
- ``nacked``: it rejected a newer version and serves an older one (``last_error`` says why);
- ``synced``: it serves the current version;
- ``stale``: connected, behind, and not refusing (an update is on its way).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Final, Literal

from fastapi import APIRouter
from pydantic import BaseModel

from control_plane.api.deps import Caller, State
from control_plane.cluster.watch import HEARTBEAT_S
from control_plane.store import nodes as node_store

router = APIRouter(prefix="/admin/nodes", tags=["nodes"])

# A connected node not vouched for by any replica for three heartbeats is disconnected.
DISCONNECTED_AFTER_S: Final = 3 * HEARTBEAT_S

Status = Literal["synced", "stale", "nacked", "disconnected"]


class NodeOut(BaseModel):
    node_id: str
    address: str
    config_version: int
    status: Status
    last_seen: datetime
    last_error: str | None


def status_of(node: node_store.NodeRecord, current_version: int) -> Status:
    if not node.connected or node.age_s > DISCONNECTED_AFTER_S:
        return "disconnected"
    if node.nacked_version > node.config_version:
        return "nacked"
    if node.config_version >= current_version:
        return "synced"
    return "stale"


@router.get("", response_model=list[NodeOut])
async def list_nodes(state: State, caller: Caller) -> list[dict[str, Any]]:
    caller.require_global_read()
    version, nodes = await node_store.list_all(state.db)
    return [
        {
            "node_id": n.node_id,
            "address": n.address,
            "config_version": n.config_version,
            "status": status_of(n, version),
            "last_seen": n.last_seen,
            "last_error": n.last_error,
        }
        for n in nodes
    ]

"""The ``Watch`` stream: pushes snapshots to data planes and records their ACK/NACK.

Per stream: the node's Hello tells the version it has; the server sends the current snapshot
when the node is behind, then every newer one. A NACKed version is never resent; the next
newer version is. Per-node state lives in :class:`NodeRegistry` for status reporting.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Final

import grpc
from grpc import aio

from control_plane.cluster.snapshots import SnapshotCache
from shared import keys
from shared._generated.tenantgate.v1 import cluster_pb2, cluster_pb2_grpc
from shared.settings import Secret

log = logging.getLogger(__name__)

HELLO_TIMEOUT_S: Final = 10.0
MAX_MESSAGE_BYTES: Final = 256 * 1024 * 1024
# Server-side keepalive; data planes ping no more often than every 20 s (see data_plane/cluster.py),
# which MIN_PING_INTERVAL permits, so neither side closes the other for "too many pings".
SERVER_OPTIONS: Final = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
]


@dataclass(slots=True)
class NodeState:
    node_id: str
    address: str
    software_version: str
    connected: bool = True
    sent_version: int = 0
    acked_version: int = 0
    nacked_version: int = 0
    last_error: str = ""
    last_seen: float = field(default_factory=time.time)


class NodeRegistry:
    """What this replica knows of the nodes connected to it."""

    def __init__(self) -> None:
        self.nodes: dict[str, NodeState] = {}

    def connect(self, hello: cluster_pb2.Hello, address: str) -> NodeState:
        node = NodeState(hello.node_id, address, hello.software_version, acked_version=hello.last_version)
        self.nodes[hello.node_id] = node
        return node


class ClusterService(cluster_pb2_grpc.ClusterServicer):  # type: ignore[misc]
    def __init__(self, cache: SnapshotCache, cluster_token: Secret, registry: NodeRegistry) -> None:
        self._cache = cache
        self._token = cluster_token.reveal()
        self._registry = registry

    async def Watch(self, request_iterator: object, context: aio.ServicerContext) -> None:
        if not self._authorised(context):
            log.warning("refused a data plane with a wrong cluster token", extra={"peer": context.peer()})
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "invalid cluster token")
        try:
            first = await asyncio.wait_for(context.read(), HELLO_TIMEOUT_S)
        except TimeoutError:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "no Hello received")
        if first is aio.EOF or not first.HasField("hello") or not first.hello.node_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message must be a Hello")
        node = self._registry.connect(first.hello, context.peer())
        # Headers now tell the node it is accepted, even if it is up to date and no snapshot follows.
        await context.send_initial_metadata(())
        log.info(
            "data plane connected",
            extra={"node_id": node.node_id, "peer": node.address, "last_version": node.acked_version},
        )
        reader = asyncio.create_task(self._read_acks(context, node))
        try:
            await self._send_updates(context, node, reader)
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            node.connected = False
            node.last_seen = time.time()
            log.info("data plane disconnected", extra={"node_id": node.node_id})

    def _authorised(self, context: aio.ServicerContext) -> bool:
        for key, value in context.invocation_metadata() or ():
            if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
                return keys.secrets_equal(value[len("Bearer ") :], self._token)
        return False

    async def _send_updates(self, context: aio.ServicerContext, node: NodeState, reader: asyncio.Task[None]) -> None:
        have = node.acked_version
        while not reader.done():
            waiter = asyncio.ensure_future(self._cache.wait_newer(have))
            done, _ = await asyncio.wait({waiter, reader}, return_when=asyncio.FIRST_COMPLETED)
            if waiter not in done:
                waiter.cancel()
                await asyncio.gather(waiter, return_exceptions=True)
                return
            built = waiter.result()
            have = built.version
            if built.version == node.nacked_version:
                continue
            await context.write(built.update)
            node.sent_version = built.version

    async def _read_acks(self, context: aio.ServicerContext, node: NodeState) -> None:
        while True:
            msg = await context.read()
            if msg is aio.EOF:
                return
            node.last_seen = time.time()
            kind = msg.WhichOneof("kind")
            if kind == "ack":
                node.acked_version = msg.ack.version
                node.last_error = ""
                log.debug("snapshot acked", extra={"node_id": node.node_id, "config_version": msg.ack.version})
            elif kind == "nack":
                node.nacked_version = msg.nack.version
                node.last_error = msg.nack.error[:1000]
                log.warning(
                    "snapshot nacked",
                    extra={
                        "node_id": node.node_id,
                        "config_version": msg.nack.version,
                        "error": node.last_error,
                    },
                )


def create_server(service: ClusterService) -> aio.Server:
    server = aio.server(options=SERVER_OPTIONS)
    cluster_pb2_grpc.add_ClusterServicer_to_server(service, server)
    return server

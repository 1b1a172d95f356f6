"""The cluster gRPC server of one control-plane replica: the Watch service, its node
registry, and TLS when a certificate is configured."""

from __future__ import annotations

import socket
import uuid
from dataclasses import dataclass

import grpc
from grpc import aio

from control_plane.cluster.snapshots import SnapshotCache
from control_plane.cluster.usage import UsageIngest
from control_plane.cluster.watch import ClusterService, NodeRegistry, create_server
from control_plane.store.db import Database
from shared.settings import Settings


@dataclass(slots=True)
class ClusterServer:
    server: aio.Server
    registry: NodeRegistry

    async def stop(self) -> None:
        await self.server.stop(grace=1.0)
        await self.registry.stop()


def credentials(settings: Settings) -> grpc.ServerCredentials | None:
    if settings.cluster_tls_cert is None or settings.cluster_tls_key is None:
        return None
    pair = (settings.cluster_tls_key.read_bytes(), settings.cluster_tls_cert.read_bytes())
    return grpc.ssl_server_credentials([pair])


async def start_cluster(
    settings: Settings, cache: SnapshotCache, db: Database, usage: UsageIngest | None = None
) -> ClusterServer:
    """Listen on ``CLUSTER_LISTEN`` and serve Watch streams until :meth:`ClusterServer.stop`."""
    assert settings.cluster_token is not None
    # Names this replica in cluster_nodes (which replica holds which node).
    replica = f"{socket.gethostname()}:{settings.cluster_listen.port}:{uuid.uuid4().hex[:8]}"
    registry = NodeRegistry(db, replica)
    server = create_server(
        ClusterService(cache, settings.cluster_token, registry, usage, settings.cluster_token_previous),
        credentials(settings),
        str(settings.cluster_listen),
    )
    await server.start()
    registry.start()
    return ClusterServer(server, registry)

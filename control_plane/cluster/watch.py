"""The ``Watch`` stream: pushes snapshots to data planes and records their ACK/NACK.

Per stream: the node's Hello tells the version it has. The server sends what brings it to
the current version (the recent deltas when they reach back to it, else one full snapshot,
in parts to a node that takes them), then every newer version as a delta. A NACKed version
is never resent; the next newer version is, as a full snapshot (the node's base is then the
version before the NACKed one).
A node that finds a delta on the wrong base asks for a resync and gets the full snapshot.

A version counts in one database's history, named by its config epoch: a node whose Hello
names another epoch than the current snapshot's (or none: a node that holds nothing, or
older software) is sent the whole config whatever the version numbers say, and so is every
node when the epoch changes under a running replica. A node of this epoch ahead of this
replica for longer than a replica needs to catch up holds a version of this database the
database no longer has (restored from an older backup whose epoch was not changed, see
docs/operations.md): it gets ours whole too.

Per-node state lives in :class:`NodeRegistry`, which writes it to Postgres (on Hello, ACK,
NACK, disconnect, and a heartbeat) so that every replica can answer ``GET /admin/nodes``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Final

import grpc
from grpc import aio

from control_plane.cluster import metrics
from control_plane.cluster.snapshots import SnapshotCache
from control_plane.cluster.usage import UsageIngest
from control_plane.errors import StoreUnavailable
from control_plane.store import nodes as node_store
from control_plane.store.db import Database
from shared import keys
from shared._generated.tenantgate.v1 import cluster_pb2, cluster_pb2_grpc
from shared.settings import Secret

log = logging.getLogger(__name__)

HELLO_TIMEOUT_S: Final = 10.0
# Sent in the response headers once the token and Hello are accepted (data_plane/cluster.py).
ACCEPTED_HEADER: Final = "tenantgate-accepted"
MAX_MESSAGE_BYTES: Final = 256 * 1024 * 1024
# Keepalive, aligned with data_plane/cluster.py: both sides ping every 10 s of silence, and
# each permits the other's pings down to 5 s apart (gRPC closes a connection that pings more
# often than the peer permits: "too_many_pings").
KEEPALIVE_TIME_MS: Final = 10_000
KEEPALIVE_TIMEOUT_MS: Final = 5_000
MIN_RECV_PING_INTERVAL_MS: Final = 5_000
SERVER_OPTIONS: Final = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", MIN_RECV_PING_INTERVAL_MS),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.http2.max_ping_strikes", 2),
]
# How often each replica rewrites its connected nodes' last_seen, and forgets long-gone nodes.
HEARTBEAT_S: Final = 5.0
# A node of this epoch ahead of this replica's config for longer than this holds a version
# the database lost (restored from a backup): it gets the whole config. Twice the builder's
# safety-net poll.
AHEAD_GRACE_S: Final = 10.0
PRUNE_AFTER_S: Final = 24 * 3600.0
PRUNE_INTERVAL_S: Final = 600.0
STORE_WARNING_INTERVAL_S: Final = 30.0
# At shutdown, how long the last write of this replica's nodes may take.
STOP_FLUSH_S: Final = 3.0


@dataclass(slots=True)
class NodeState:
    node_id: str
    address: str
    software_version: str
    session: str = field(default_factory=lambda: str(uuid.uuid4()))
    connected: bool = True
    sent_version: int = 0
    acked_version: int = 0
    nacked_version: int = 0
    last_error: str = ""
    last_seen: float = field(default_factory=time.time)

    def as_write(self) -> node_store.NodeWrite:
        return node_store.NodeWrite(
            node_id=self.node_id,
            address=self.address,
            software_version=self.software_version,
            session=self.session,
            connected=self.connected,
            config_version=self.acked_version,
            nacked_version=self.nacked_version,
            last_error=self.last_error,
        )


class NodeRegistry:
    """What this replica knows of the nodes connected to it, written to Postgres in the
    background (a slow or absent Postgres never holds up a stream)."""

    def __init__(self, db: Database | None = None, replica: str = "") -> None:
        self.nodes: dict[str, NodeState] = {}
        self._db = db
        self._replica = replica
        self._dirty: dict[str, NodeState] = {}
        self._ended: list[NodeState] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._last_prune = 0.0
        self._store_failing = False
        self._last_store_warning = float("-inf")

    def connect(self, hello: cluster_pb2.Hello, address: str, epoch: str | None = None) -> NodeState:
        """Record a node that said Hello. Its last_version counts as acknowledged only when
        its last_epoch is ``epoch`` (the current config's; None: not known yet): a version of
        another database says nothing about this config."""
        same = epoch is not None and hello.last_epoch == epoch
        node = NodeState(
            hello.node_id, address, hello.software_version, acked_version=hello.last_version if same else 0
        )
        self.nodes[hello.node_id] = node
        metrics.CONNECTED_NODES.set(len(self.nodes))
        self.changed(node)
        return node

    def changed(self, node: NodeState) -> None:
        node.last_seen = time.time()
        self._dirty[node.node_id] = node
        self._wake.set()

    def disconnect(self, node: NodeState) -> None:
        node.connected = False
        node.last_seen = time.time()
        if self.nodes.get(node.node_id) is node:
            del self.nodes[node.node_id]
        metrics.CONNECTED_NODES.set(len(self.nodes))
        self._ended.append(node)
        self._wake.set()

    def start(self) -> None:
        if self._db is not None:
            self._task = asyncio.create_task(self._run(), name="node-registry")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        # Tell the other replicas at once that these nodes are gone from here — best effort and
        # bounded: a pooled connection to a Postgres that went away can hang a query for its
        # whole command timeout, and the others see these nodes go stale by themselves anyway.
        for node in list(self.nodes.values()):
            self.disconnect(node)
        try:
            async with asyncio.timeout(STOP_FLUSH_S):
                await self._flush(heartbeat=False)
        except TimeoutError:
            log.warning("could not record the data planes' disconnection before stopping")

    async def _run(self) -> None:
        next_heartbeat = time.monotonic() + HEARTBEAT_S
        while True:
            # asyncio.timeout, not wait_for: on Python 3.11, wait_for swallows a cancellation
            # that arrives just after the event is set, and stop() would wait forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, next_heartbeat - time.monotonic())):
                    await self._wake.wait()
            self._wake.clear()
            heartbeat = time.monotonic() >= next_heartbeat
            if heartbeat:
                next_heartbeat = time.monotonic() + HEARTBEAT_S
            await self._flush(heartbeat)

    async def _flush(self, heartbeat: bool) -> None:
        if self._db is None:
            return
        live = list(self.nodes.values()) if heartbeat else [n for n in self._dirty.values() if n.connected]
        ended, self._ended = self._ended, []
        dirty, self._dirty = self._dirty, {}
        try:
            await node_store.upsert(self._db, self._replica, [n.as_write() for n in live])
            for node in ended:
                await node_store.disconnected(self._db, self._replica, node.as_write())
            if heartbeat and time.monotonic() - self._last_prune > PRUNE_INTERVAL_S:
                self._last_prune = time.monotonic()
                await node_store.prune(self._db, PRUNE_AFTER_S)
        except StoreUnavailable as exc:
            # Once when Postgres goes away, then at most every STORE_WARNING_INTERVAL_S: an
            # outage is one story in the log, not a line a second.
            now = time.monotonic()
            if now - self._last_store_warning >= STORE_WARNING_INTERVAL_S:
                self._last_store_warning = now
                log.warning("cannot record data-plane nodes; retrying", extra={"error": str(exc)})
            self._store_failing = True
            self._ended = ended + self._ended
            self._dirty = dirty | self._dirty
            await asyncio.sleep(1.0)
            self._wake.set()
        else:
            if self._store_failing:
                self._store_failing = False
                self._last_store_warning = float("-inf")
                log.info("recording data-plane nodes again")


class ClusterService(cluster_pb2_grpc.ClusterServicer):  # type: ignore[misc]
    def __init__(
        self,
        cache: SnapshotCache,
        cluster_token: Secret,
        registry: NodeRegistry,
        usage: UsageIngest | None = None,
        previous_token: Secret | None = None,
    ) -> None:
        self._cache = cache
        # The token, and during a rotation the previous one too (TENANTGATE_CLUSTER_TOKEN_PREVIOUS).
        self._tokens = tuple(t.reveal() for t in (cluster_token, previous_token) if t is not None)
        self._registry = registry
        self._usage = usage

    async def ReportUsage(
        self, request_iterator: AsyncIterator[cluster_pb2.UsageBatch], context: aio.ServicerContext
    ) -> cluster_pb2.UsageAck:
        """Usage batches, stored exactly once each (control_plane/cluster/usage.py)."""
        if not self._authorised(context):
            log.warning("refused usage from a wrong cluster token", extra={"peer": context.peer()})
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "invalid cluster token")
        if self._usage is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this control plane does not take usage")
        assert self._usage is not None  # abort() raised otherwise
        return await self._usage.report(request_iterator, context)

    async def Watch(self, request_iterator: object, context: aio.ServicerContext) -> None:
        if not self._authorised(context):
            metrics.REFUSED_STREAMS.inc()
            log.warning("refused a data plane with a wrong cluster token", extra={"peer": context.peer()})
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "invalid cluster token")
        try:
            first = await asyncio.wait_for(context.read(), HELLO_TIMEOUT_S)
        except TimeoutError:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "no Hello received")
        if first is aio.EOF or not first.HasField("hello") or not first.hello.node_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message must be a Hello")
        current = self._cache.current
        node = self._registry.connect(first.hello, context.peer(), None if current is None else current.epoch)
        # Headers now tell the node it is accepted, even if it is up to date and no snapshot follows.
        await context.send_initial_metadata(((ACCEPTED_HEADER, "1"),))
        log.info(
            "data plane connected",
            extra={
                "node_id": node.node_id,
                "peer": node.address,
                "last_version": first.hello.last_version,
                "last_epoch": first.hello.last_epoch,
            },
        )
        stream = _Stream(node, epoch=first.hello.last_epoch, parts=first.hello.snapshot_parts)
        reader = asyncio.create_task(self._read_acks(context, stream))
        try:
            await self._send_updates(context, stream, reader)
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            self._registry.disconnect(node)
            log.info("data plane disconnected", extra={"node_id": node.node_id})

    def _authorised(self, context: aio.ServicerContext) -> bool:
        for key, value in context.invocation_metadata() or ():
            if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
                sent = value[len("Bearer ") :]
                # Compare with every accepted token, never stopping early: timing tells nothing.
                return sum(keys.secrets_equal(sent, token) for token in self._tokens) > 0
        return False

    async def _send_updates(self, context: aio.ServicerContext, stream: _Stream, reader: asyncio.Task[None]) -> None:
        node = stream.node
        while not reader.done():
            current = self._cache.current
            if current is not None and stream.epoch != current.epoch:
                # Another database's config, or one from before the epoch (""): its version
                # number means nothing here.
                if stream.epoch:
                    log.warning(
                        "data plane holds another config epoch; sending the whole config",
                        extra={"node_id": node.node_id, "node_epoch": stream.epoch, "epoch": current.epoch},
                    )
                stream.base, stream.full_needed, stream.ahead_since = 0, True, None
                stream.epoch = current.epoch
                # Not synced with this config until it ACKs it; a version it refused was
                # another history's.
                node.acked_version = node.nacked_version = 0
                self._registry.changed(node)
            elif current is not None and self._foreign(stream, current.version):
                log.warning(
                    "data plane holds a version this config never reached; sending the whole config",
                    extra={"node_id": node.node_id, "node_version": stream.base, "config_version": current.version},
                )
                stream.base, stream.full_needed = 0, True
            if current is not None and current.version > stream.base and current.version != node.nacked_version:
                if stream.full_needed:
                    version, payloads, full = current.version, current.whole(stream.parts), True
                else:
                    version, payloads, full = self._cache.updates_for(stream.base, stream.parts)
                stream.base, stream.full_needed = version, False
                for payload in payloads:
                    await context.write(payload)
                node.sent_version = version
                metrics.UPDATES_SENT.labels("full" if full else "delta").inc(1 if full else len(payloads))
                continue
            seen = current.version if current is not None else 0
            newer = asyncio.ensure_future(self._cache.wait_newer(seen, current.epoch if current is not None else None))
            woken = asyncio.ensure_future(stream.wake.wait())
            ahead = stream.ahead_since is not None
            await asyncio.wait(
                {newer, woken, reader}, timeout=AHEAD_GRACE_S if ahead else None, return_when=asyncio.FIRST_COMPLETED
            )
            for waiter in (newer, woken):
                waiter.cancel()
            await asyncio.gather(newer, woken, return_exceptions=True)
            stream.wake.clear()

    @staticmethod
    def _foreign(stream: _Stream, version: int) -> bool:
        """Whether the node's version is ahead of this config for longer than a replica takes
        to catch up with another: then it came from another database (recreated, restored
        from a backup) and would otherwise never be sent anything."""
        if stream.base <= version:
            stream.ahead_since = None
            return False
        now = time.monotonic()
        if stream.ahead_since is None:
            stream.ahead_since = now
        return now - stream.ahead_since >= AHEAD_GRACE_S

    async def _read_acks(self, context: aio.ServicerContext, stream: _Stream) -> None:
        node = stream.node
        while True:
            msg = await context.read()
            if msg is aio.EOF:
                return
            kind = msg.WhichOneof("kind")
            if kind == "ack":
                node.acked_version = msg.ack.version
                node.last_error = ""
                log.debug("snapshot acked", extra={"node_id": node.node_id, "config_version": msg.ack.version})
            elif kind == "nack" and msg.nack.resync:
                # Nothing wrong with the content: the node missed a version. Send it everything.
                stream.base, stream.full_needed = node.acked_version, True
                stream.wake.set()
                log.info(
                    "data plane asked for a full snapshot",
                    extra={"node_id": node.node_id, "config_version": node.acked_version},
                )
            elif kind == "nack":
                node.nacked_version = msg.nack.version
                node.last_error = msg.nack.error[: node_store.MAX_ERROR_LENGTH]
                stream.base, stream.full_needed = node.acked_version, True
                stream.wake.set()
                metrics.NACKS.inc()
                log.warning(
                    "snapshot nacked",
                    extra={
                        "node_id": node.node_id,
                        "config_version": msg.nack.version,
                        "error": node.last_error,
                    },
                )
            self._registry.changed(node)


@dataclass(slots=True)
class _Stream:
    """One Watch stream's view of its node: the version and epoch the node holds once it
    applies what was sent (``base``, ``epoch``), and whether the next update must be a full
    snapshot."""

    node: NodeState
    base: int = 0
    full_needed: bool = False
    epoch: str = ""
    # The node takes a full snapshot in parts (Hello.snapshot_parts).
    parts: bool = False
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    # Since when the node has held a version newer than this replica's (see _foreign).
    ahead_since: float | None = None

    def __post_init__(self) -> None:
        self.base = self.node.acked_version


def _raw(payload: bytes) -> bytes:
    return payload


def create_server(service: ClusterService, credentials: grpc.ServerCredentials | None, listen: str) -> aio.Server:
    """The cluster gRPC server on ``listen`` (TLS when ``credentials`` are given).

    Watch writes updates already serialised (one encoding per version, shared by every
    stream), so its handler is registered with a pass-through serialiser; every other method
    keeps its generated handler."""
    server = aio.server(options=SERVER_OPTIONS)
    capture = _HandlerCapture()
    cluster_pb2_grpc.add_ClusterServicer_to_server(service, capture)
    handlers = dict(capture.handlers)
    handlers["Watch"] = handlers["Watch"]._replace(response_serializer=_raw)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(capture.service, handlers),))
    server.add_registered_method_handlers(capture.service, handlers)
    try:
        if credentials is None:
            server.add_insecure_port(listen)
        else:
            server.add_secure_port(listen, credentials)
    except RuntimeError as exc:
        raise OSError(f"cannot listen on {listen} (TENANTGATE_CLUSTER_LISTEN)") from exc
    return server


class _HandlerCapture:
    """Stands in for a server to collect the generated method handlers."""

    def __init__(self) -> None:
        self.service = ""
        self.handlers: dict[str, Any] = {}

    def add_generic_rpc_handlers(self, _handlers: object) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self.service, self.handlers = service, handlers

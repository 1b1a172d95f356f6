"""The Watch client: keeps this worker's snapshot in step with the control plane.

It connects with the cluster token, says which version it has, and applies each snapshot it
receives: validated and compiled whole, then swapped in by one reference assignment and
ACKed. A snapshot that fails validation is NACKed with the reason and the old one keeps
serving. When the stream breaks, it reconnects with jittered exponential backoff and
resumes from the version it has.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass
from typing import Final

import grpc
from grpc import aio

import shared
from data_plane import disk
from data_plane.snapshot import Holder, compile_snapshot
from shared._generated.tenantgate.v1 import cluster_pb2, cluster_pb2_grpc, snapshot_pb2
from shared.errors import InvalidSnapshot
from shared.settings import Settings

log = logging.getLogger(__name__)

BACKOFF_INITIAL_S: Final = 0.2
BACKOFF_MAX_S: Final = 10.0
MAX_MESSAGE_BYTES: Final = 256 * 1024 * 1024
# Pings every 20 s; the control plane permits one per 10 s (control_plane/cluster/watch.py).
CHANNEL_OPTIONS: Final = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.enable_retries", 0),
]


@dataclass(slots=True)
class ClusterStatus:
    connected: bool = False
    last_error: str = ""
    nacks: int = 0


class ConfigClient:
    def __init__(self, settings: Settings, holder: Holder, rng: random.Random | None = None) -> None:
        self._data_dir = settings.data_dir
        assert settings.cluster_token is not None
        self._addr = str(settings.cp_addr)
        self._metadata = (("authorization", f"Bearer {settings.cluster_token.reveal()}"),)
        self._node_id = settings.node_id
        self._holder = holder
        self._rng = rng or random.Random()  # noqa: S311 - backoff jitter, not a secret
        self.status = ClusterStatus()
        self._saving: asyncio.Future[None] | None = None

    def restore_from_disk(self) -> bool:
        """Serve the last snapshot saved on disk until the control plane answers. True if one was loaded."""
        msg = disk.load(self._data_dir)
        if msg is None or self._holder.current is not None:
            return False
        try:
            compiled = compile_snapshot(msg)
        except (InvalidSnapshot, ValueError) as exc:
            log.warning("the snapshot on disk is invalid; ignoring it", extra={"error": str(exc)})
            return False
        self._holder.swap(compiled, "disk")
        log.info("serving the snapshot saved on disk", extra={"config_version": compiled.version})
        return True

    async def run(self) -> None:
        """Stay connected until cancelled."""
        delay = BACKOFF_INITIAL_S
        while True:
            try:
                received = await self._session()
            except aio.AioRpcError as exc:
                received = False
                self._disconnected(exc)
            finally:
                self.status.connected = False
            if received:
                delay = BACKOFF_INITIAL_S
            sleep = delay * (0.5 + self._rng.random())  # jitter: 0.5x-1.5x
            await asyncio.sleep(sleep)
            delay = min(delay * 2, BACKOFF_MAX_S)

    def _disconnected(self, exc: aio.AioRpcError) -> None:
        code = exc.code()
        if code == grpc.StatusCode.UNAUTHENTICATED:
            message = f"the control plane at {self._addr} refused the cluster token; check TENANTGATE_CLUSTER_TOKEN"
        elif code == grpc.StatusCode.UNAVAILABLE:
            message = f"control plane at {self._addr} unavailable: {exc.details()}"
        else:
            message = f"config stream from {self._addr} ended: {code.name} {exc.details()}"
        if message != self.status.last_error:
            log.warning(message)
        self.status.last_error = message

    async def _session(self) -> bool:
        """One stream's life; True if it delivered at least one snapshot."""
        received = False
        async with aio.insecure_channel(self._addr, options=CHANNEL_OPTIONS) as channel:
            stub = cluster_pb2_grpc.ClusterStub(channel)
            call = stub.Watch(metadata=self._metadata)
            have = self._holder.current.version if self._holder.current is not None else 0
            await call.write(
                cluster_pb2.WatchRequest(
                    hello=cluster_pb2.Hello(
                        node_id=self._node_id, last_version=have, software_version=shared.__version__
                    )
                )
            )
            # The control plane sends its headers once it has accepted the token and the Hello,
            # even when this node is already up to date and no snapshot follows.
            await call.initial_metadata()
            if not call.done():
                self._on_connected()
            while True:
                update = await call.read()
                if update is aio.EOF:
                    return received
                self._on_connected()
                received = True
                await call.write(self._apply(update))

    def _persist(self, msg: snapshot_pb2.Snapshot) -> None:
        """Save the snapshot off the event loop; saves run one at a time, newest last."""
        previous = self._saving

        async def save() -> None:
            if previous is not None:
                await asyncio.gather(previous, return_exceptions=True)
            try:
                await asyncio.to_thread(disk.save, self._data_dir, msg)
            except OSError as exc:
                log.warning("cannot save the snapshot to disk", extra={"error": str(exc)})

        self._saving = asyncio.ensure_future(save())

    def _on_connected(self) -> None:
        if not self.status.connected:
            self.status.connected = True
            self.status.last_error = ""
            log.info("connected to control plane", extra={"cp_addr": self._addr})

    def _apply(self, update: cluster_pb2.ConfigUpdate) -> cluster_pb2.WatchRequest:
        version = update.snapshot.version
        try:
            compiled = compile_snapshot(update.snapshot)
        except (InvalidSnapshot, ValueError) as exc:
            self.status.nacks += 1
            log.error(
                "snapshot rejected; keeping the previous one",
                extra={"config_version": version, "error": str(exc)},
            )
            return cluster_pb2.WatchRequest(nack=cluster_pb2.Nack(version=version, error=str(exc)[:1000]))
        self._holder.swap(compiled, "control_plane")
        self._persist(update.snapshot)
        log.info(
            "snapshot applied",
            extra={
                "config_version": version,
                "compile_ms": round(compiled.compile_ms, 2),
                "routes": compiled.router.size,
            },
        )
        return cluster_pb2.WatchRequest(ack=cluster_pb2.Ack(version=version))

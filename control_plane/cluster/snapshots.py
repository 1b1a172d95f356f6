"""The snapshot cache: the latest config, built once per version and shared by every Watch stream.

One builder task rebuilds from Postgres whenever it is poked (a local write committed, a
NOTIFY from another replica arrived, or the periodic safety-net check found a newer version).
Pokes that arrive while a build runs coalesce into one more build. Watchers wait on
:meth:`SnapshotCache.wait_newer`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Final

from control_plane.errors import StoreUnavailable
from control_plane.store import config as config_store
from control_plane.store.db import Database, Listener
from shared import snapshot as model
from shared._generated.tenantgate.v1 import cluster_pb2

log = logging.getLogger(__name__)

# The safety net behind NOTIFY: how often the builder checks the version on its own.
POLL_INTERVAL_S: Final = 5.0
RETRY_INTERVAL_S: Final = 1.0


@dataclass(frozen=True, slots=True)
class BuiltSnapshot:
    version: int
    update: cluster_pb2.ConfigUpdate
    build_ms: float


class SnapshotCache:
    def __init__(self, db: Database) -> None:
        self._db = db
        self._current: BuiltSnapshot | None = None
        self._changed = asyncio.Condition()
        self._poke = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._listener: Listener | None = None

    @property
    def current(self) -> BuiltSnapshot | None:
        return self._current

    def poke(self) -> None:
        """Ask for a rebuild (cheap, never blocks)."""
        self._poke.set()

    async def start(self) -> None:
        await self._rebuild()
        self._task = asyncio.create_task(self._run(), name="snapshot-builder")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._close_listener()

    async def wait_newer(self, version: int) -> BuiltSnapshot:
        """Return the current snapshot as soon as its version is greater than ``version``."""
        async with self._changed:
            await self._changed.wait_for(lambda: self._current is not None and self._current.version > version)
            assert self._current is not None
            return self._current

    async def _run(self) -> None:
        while True:
            if self._listener is None or not self._listener.alive:
                await self._listen()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poke.wait(), timeout=POLL_INTERVAL_S)
            self._poke.clear()
            try:
                await self._rebuild()
            except StoreUnavailable as exc:
                log.warning("snapshot rebuild failed; serving the last one", extra={"error": str(exc)})
                await asyncio.sleep(RETRY_INTERVAL_S)
                self._poke.set()

    async def _rebuild(self) -> None:
        have = self._current.version if self._current is not None else 0
        if await config_store.current_version(self._db) <= have:
            return
        started = time.perf_counter()
        snap = await config_store.load_snapshot(self._db)
        if snap.version <= have:
            return
        update = cluster_pb2.ConfigUpdate(snapshot=model.to_proto(snap))
        built = BuiltSnapshot(snap.version, update, (time.perf_counter() - started) * 1000)
        async with self._changed:
            self._current = built
            self._changed.notify_all()
        log.info(
            "snapshot built",
            extra={
                "config_version": snap.version,
                "build_ms": round(built.build_ms, 2),
                "routes": len(snap.routes),
                "tenants": len(snap.tenants),
            },
        )

    async def _listen(self) -> None:
        """(Re)open the LISTEN connection; after a reconnect, rebuild in case a NOTIFY was missed."""
        await self._close_listener()
        try:
            self._listener = await self._db.listen(config_store.NOTIFY_CHANNEL, lambda _payload: self.poke())
        except StoreUnavailable as exc:
            log.warning("config LISTEN failed; polling until Postgres returns", extra={"error": str(exc)})
            return
        self.poke()

    async def _close_listener(self) -> None:
        if self._listener is not None:
            await self._listener.close()
        self._listener = None

"""The snapshot cache: the latest config, built once per version and shared by every Watch stream.

One builder task refreshes from Postgres whenever it is poked (a local write committed, a
NOTIFY from another replica arrived, or the periodic safety-net check). A refresh reads only
the objects the change log (``config_changes``) names since the version it has, so a change
costs the same with ten routes or ten thousand; the first build, and a replica that fell
behind the pruned log, read everything.

What streams send is encoded once per version and shared:

- a **delta** from the previous version (the changed objects and the removed ids), which is
  what a node that is up to date receives after each change;
- the **full** snapshot, for a node that connects without a recent version: assembled on
  first use by concatenating each object's encoded bytes, kept per object across versions,
  so only changed objects are ever encoded again. A node that takes parts (its Hello's
  ``snapshot_parts``) gets it as ``SnapshotPart`` messages of about :data:`PART_BYTES`.

Pokes that arrive while a build runs coalesce into one more build. Watchers wait on
:meth:`SnapshotCache.wait_newer`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final, TypeVar

from control_plane.cluster import metrics
from control_plane.errors import StoreUnavailable
from control_plane.store import config as config_store
from control_plane.store.db import Database, Listener
from shared import snapshot as model
from shared._generated.tenantgate.v1 import cluster_pb2
from shared._generated.tenantgate.v1 import snapshot_pb2 as pb
from shared.shardmap import ShardMap

log = logging.getLogger(__name__)
_T = TypeVar("_T")

# The safety net behind NOTIFY: how often the builder checks the version on its own.
POLL_INTERVAL_S: Final = 5.0
RETRY_INTERVAL_S: Final = 1.0
# Deltas kept for nodes that are a few versions behind; older nodes get a full snapshot.
MAX_DELTAS: Final = 256
# A version that changes more objects than this is published whole, not as a delta: a node
# applies a whole snapshot a slice at a time between requests, a delta in one go (small
# ones) or in a worker thread.
MAX_DELTA_OBJECTS: Final = 2000
MAX_DELTA_BYTES: Final = 32 * 1024 * 1024
# A full snapshot goes to a node that takes parts in pieces of about this size: the node
# gathers each message on its event loop, where one of megabytes holds every request for
# tens of milliseconds, and one of this size for about one.
PART_BYTES: Final = 256 * 1024
# The change log is pruned of rows older than this, checked this often.
CHANGE_LOG_RETENTION_S: Final = 3600.0
PRUNE_INTERVAL_S: Final = 300.0

# Snapshot fields holding objects, in the order a full snapshot carries them.
KINDS: Final = ("tenants", "api_keys", "routes", "jwt_issuers", "oauth_clients", "signing_keys")
_FIELD_NUMBERS: Final = {kind: pb.Snapshot.DESCRIPTOR.fields_by_name[kind].number for kind in KINDS}
_VERSION_TAG: Final = bytes([pb.Snapshot.DESCRIPTOR.fields_by_name["version"].number << 3])
_BUILT_AT_TAG: Final = bytes([pb.Snapshot.DESCRIPTOR.fields_by_name["built_at_ms"].number << 3])
_EPOCH_FIELD: Final = pb.Snapshot.DESCRIPTOR.fields_by_name["epoch"].number
_UPDATE_SNAPSHOT_FIELD: Final = cluster_pb2.ConfigUpdate.DESCRIPTOR.fields_by_name["snapshot"].number
_UPDATE_PART_FIELD: Final = cluster_pb2.ConfigUpdate.DESCRIPTOR.fields_by_name["part"].number
_PART_VERSION_TAG: Final = bytes([cluster_pb2.SnapshotPart.DESCRIPTOR.fields_by_name["version"].number << 3])
_PART_DATA_FIELD: Final = cluster_pb2.SnapshotPart.DESCRIPTOR.fields_by_name["data"].number
_PART_LAST: Final = bytes([cluster_pb2.SnapshotPart.DESCRIPTOR.fields_by_name["last"].number << 3, 1])
_PART_INDEX_TAG: Final = bytes([cluster_pb2.SnapshotPart.DESCRIPTOR.fields_by_name["index"].number << 3])


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _length_prefix(field_number: int, length: int) -> bytes:
    """The tag and length of a length-delimited field (wire type 2)."""
    return _varint(field_number << 3 | 2) + _varint(length)


@dataclass(frozen=True, slots=True)
class Catalog:
    """The config at one version: each object's encoded snapshot entry (tag, length and
    message bytes, ready to concatenate), by kind and id. Routes are in snapshot order
    (their ``seq``), which decides ties between equally specific routes."""

    version: int
    built_at_ms: int
    # Routes in a dict (its order is the snapshot's); the other kinds in ShardMaps, so that
    # the next version shares all but the few shards its changes touch.
    entries: dict[str, Mapping[str, bytes]]
    route_seq: dict[str, int]
    # No route of this catalog, nor any removed before it, has a greater seq.
    seq_bound: int
    # The database's config epoch: versions of different epochs are unrelated.
    epoch: str = ""

    def counts(self) -> dict[str, int]:
        return {kind: len(self.entries[kind]) for kind in KINDS}

    def full_update(self) -> bytes:
        """The serialised ``ConfigUpdate{snapshot}`` for this version, by concatenation."""
        parts = [self._header()]
        for kind in KINDS:
            parts.extend(self.entries[kind].values())
        size = sum(len(p) for p in parts)
        return b"".join([_length_prefix(_UPDATE_SNAPSHOT_FIELD, size), *parts])

    def full_parts(self, part_bytes: int = PART_BYTES) -> list[bytes]:
        """The serialised ``ConfigUpdate{part}`` messages carrying this version whole: the
        snapshot's fields in order, cut between two fields once a piece reaches ``part_bytes``
        (so each piece is an encoded ``Snapshot`` too), numbered from 0, the last marked."""
        pieces: list[list[bytes]] = []
        piece = [self._header()]
        size = len(piece[0])
        for kind in KINDS:
            for entry in self.entries[kind].values():
                if size >= part_bytes:
                    pieces.append(piece)
                    piece, size = [], 0
                piece.append(entry)
                size += len(entry)
        pieces.append(piece)
        version = _PART_VERSION_TAG + _varint(self.version)
        out = []
        for i, piece in enumerate(pieces):
            data = b"".join(piece)
            fields = [version, _length_prefix(_PART_DATA_FIELD, len(data)), data, _PART_INDEX_TAG + _varint(i)]
            if i == len(pieces) - 1:
                fields.append(_PART_LAST)
            length = sum(len(f) for f in fields)
            out.append(b"".join([_length_prefix(_UPDATE_PART_FIELD, length), *fields]))
        return out

    def _header(self) -> bytes:
        """The snapshot's fields other than its objects, encoded."""
        header = _VERSION_TAG + _varint(self.version) + _BUILT_AT_TAG + _varint(self.built_at_ms)
        if self.epoch:
            epoch = self.epoch.encode()
            header += _length_prefix(_EPOCH_FIELD, len(epoch)) + epoch
        return header


@dataclass(slots=True)
class Published:
    """One version as streams send it."""

    catalog: Catalog
    # The previous version and the serialised ``ConfigUpdate{delta}`` from it; None when this
    # version cannot be expressed as a delta (the first build, or routes reordered).
    from_version: int
    delta: bytes | None
    build_ms: float
    _full: bytes | None = field(default=None, repr=False)
    _parts: list[bytes] | None = field(default=None, repr=False)

    @property
    def version(self) -> int:
        return self.catalog.version

    @property
    def epoch(self) -> str:
        return self.catalog.epoch

    def full(self) -> bytes:
        if self._full is None:
            self._full = self.catalog.full_update()
        return self._full

    def whole(self, parts: bool) -> list[bytes]:
        """The serialised updates that carry this version whole: one ``ConfigUpdate{snapshot}``,
        or (to a node that takes them) its ``ConfigUpdate{part}`` messages."""
        if not parts:
            return [self.full()]
        if self._parts is None:
            self._parts = self.catalog.full_parts()
        return self._parts


def _encode(
    rows: config_store.ConfigRows, version: int, built_at_ms: int
) -> tuple[pb.Snapshot, dict[str, dict[str, bytes]]]:
    """The live objects of ``rows`` as a (partial) snapshot message and as encoded entries by id."""
    routes = [v for v in rows.routes.values() if v is not None]
    routes.sort(key=lambda item: item[0])
    partial = model.to_proto(
        model.Snapshot(
            version=version,
            built_at_ms=built_at_ms,
            epoch=rows.epoch,
            tenants=_live(rows.tenants.values()),
            api_keys=_live(rows.api_keys.values()),
            routes=tuple(r for _, r in routes),
            jwt_issuers=_live(rows.jwt_issuers.values()),
            oauth_clients=_live(rows.oauth_clients.values()),
            signing_keys=_live(rows.signing_keys.values()),
        )
    )
    entries: dict[str, dict[str, bytes]] = {}
    for kind in KINDS:
        number = _FIELD_NUMBERS[kind]
        by_id: dict[str, bytes] = {}
        for msg in getattr(partial, kind):
            payload = msg.SerializeToString()
            by_id[msg.kid if kind == "signing_keys" else msg.id] = _length_prefix(number, len(payload)) + payload
        entries[kind] = by_id
    return partial, entries


def _table(kind: str, entries: dict[str, bytes]) -> Mapping[str, bytes]:
    """How a catalog keeps one kind's entries: routes in their (meaningful) order, the rest in
    shards."""
    return entries if kind == "routes" else ShardMap(entries.items())


def _patched(old: Mapping[str, bytes], gone: list[str], new: dict[str, bytes]) -> Mapping[str, bytes]:
    """``old`` without ``gone`` and with ``new``; ``old`` itself when neither names anything
    (catalogs never change their tables: an untouched kind is shared with the last one)."""
    if not gone and not new:
        return old
    if isinstance(old, ShardMap):
        return old.patched(gone, new.items())
    merged = dict(old)
    for oid in gone:
        del merged[oid]
    merged.update(new)
    return merged


def _live(values: Iterable[_T | None]) -> tuple[_T, ...]:
    return tuple(v for v in values if v is not None)


def _rows_by_kind(rows: config_store.ConfigRows) -> dict[str, Mapping[str, object]]:
    return {
        "tenants": rows.tenants,
        "api_keys": rows.api_keys,
        "routes": rows.routes,
        "jwt_issuers": rows.jwt_issuers,
        "oauth_clients": rows.oauth_clients,
        "signing_keys": rows.signing_keys,
    }


def build(previous: Catalog | None, rows: config_store.ConfigRows) -> Published:
    """The next version from the last one and what changed (or everything). CPU-bound for a
    full read of a large config: the cache runs it in a thread. Rows of another epoch than
    ``previous`` are another database's: built afresh, as a version no delta leads to."""
    started = time.perf_counter()
    if previous is not None and previous.epoch != rows.epoch:
        previous = None
    built_at_ms = model.now_ms()
    partial, fresh = _encode(rows, rows.version, built_at_ms)
    route_seq = {rid: v[0] for rid, v in rows.routes.items() if v is not None}
    if previous is None:
        tables = {kind: _table(kind, fresh[kind]) for kind in KINDS}
        catalog = Catalog(rows.version, built_at_ms, tables, route_seq, max(route_seq.values(), default=0), rows.epoch)
        return Published(catalog, 0, None, (time.perf_counter() - started) * 1000)

    # Everything below costs what changed, except a full read (compared object by object)
    # and a route reordered (the route order rebuilt).
    by_kind = _rows_by_kind(rows)
    entries: dict[str, Mapping[str, bytes]] = {}
    removed: dict[str, list[str]] = {}
    changed: dict[str, set[str]] = {}
    for kind in KINDS:
        old = previous.entries[kind]
        new_entries = fresh[kind]
        if rows.full:
            gone = [oid for oid in old if oid not in new_entries]
            merged = _table(kind, new_entries)
        else:
            gone = [oid for oid, value in by_kind[kind].items() if value is None and oid in old]
            merged = _patched(old, gone, new_entries)
        removed[kind] = gone
        changed[kind] = {oid for oid, entry in new_entries.items() if old.get(oid) != entry}
        entries[kind] = merged

    if not rows.full and not rows.routes:
        catalog = Catalog(rows.version, built_at_ms, entries, previous.route_seq, previous.seq_bound, rows.epoch)
        delta = _delta(previous.version, partial, changed, removed, []) if _small(changed, removed) else None
        return Published(catalog, previous.version, delta, (time.perf_counter() - started) * 1000)

    # Routes: order is meaning. A node applying the delta keeps each surviving route where it
    # was and appends new ones; that is the snapshot's order unless a route came back with an
    # older seq (reactivated) or the full read found them reordered.
    seqs = dict(previous.route_seq)
    for oid in removed["routes"]:
        seqs.pop(oid, None)
    # New routes in seq order (as _encode sorts them).
    added = [oid for oid in fresh["routes"] if oid not in previous.entries["routes"]]
    seqs.update(route_seq)
    # A route created since has a seq past every earlier one: then no survivor need be looked at.
    in_order = all(route_seq[oid] > previous.seq_bound for oid in added)
    if not in_order:
        fresh_ids = set(added)
        survivors = max((seq for oid, seq in seqs.items() if oid not in fresh_ids), default=0)
        in_order = all(route_seq[oid] > survivors for oid in added)
    if not rows.full:
        # Surviving routes stay in place and new ones follow in seq order: that is how the
        # merged dict is ordered already, unless a reactivated route goes back in its place.
        if not in_order:
            entries["routes"] = {oid: entries["routes"][oid] for oid in sorted(entries["routes"], key=seqs.__getitem__)}
    else:
        kept = [oid for oid in previous.entries["routes"] if oid in entries["routes"]]
        in_order = in_order and kept == [oid for oid in entries["routes"] if oid in previous.entries["routes"]]

    bound = max(previous.seq_bound, max(route_seq.values(), default=0))
    catalog = Catalog(rows.version, built_at_ms, entries, seqs, bound, rows.epoch)
    small = in_order and _small(changed, removed)
    ordered_delta = _delta(previous.version, partial, changed, removed, added) if small else None
    return Published(catalog, previous.version, ordered_delta, (time.perf_counter() - started) * 1000)


def _small(changed: dict[str, set[str]], removed: dict[str, list[str]]) -> bool:
    """Whether a change is small enough to send as a delta (see :data:`MAX_DELTA_OBJECTS`)."""
    return sum(len(changed[kind]) + len(removed[kind]) for kind in KINDS) <= MAX_DELTA_OBJECTS


def _delta(
    from_version: int,
    partial: pb.Snapshot,
    changed: dict[str, set[str]],
    removed: dict[str, list[str]],
    added_routes: list[str],
) -> bytes:
    """Serialise the delta: only objects whose encoding changed; new routes last, in order."""
    upserts = pb.Snapshot(version=partial.version, built_at_ms=partial.built_at_ms, epoch=partial.epoch)
    for kind in KINDS:
        wanted = changed[kind]
        if not wanted:
            continue
        key = "kid" if kind == "signing_keys" else "id"
        source = [m for m in getattr(partial, kind) if getattr(m, key) in wanted]
        if kind == "routes":
            rank = {oid: i for i, oid in enumerate(added_routes)}
            source.sort(key=lambda m: rank.get(m.id, -1))
        getattr(upserts, kind).extend(source)
    delta = cluster_pb2.SnapshotDelta(
        from_version=from_version,
        upserts=upserts,
        removed_tenants=removed["tenants"],
        removed_api_keys=removed["api_keys"],
        removed_routes=removed["routes"],
        removed_jwt_issuers=removed["jwt_issuers"],
        removed_oauth_clients=removed["oauth_clients"],
        removed_signing_keys=removed["signing_keys"],
    )
    payload: bytes = cluster_pb2.ConfigUpdate(delta=delta).SerializeToString()
    return payload


class SnapshotCache:
    def __init__(self, db: Database) -> None:
        self._db = db
        self._current: Published | None = None
        # Recent versions that carry a delta, oldest first, ending with the current one.
        # (from version, version, serialised delta) of recent versions, oldest first: only the
        # bytes, so keeping many costs what they weigh, not a catalog each.
        self._history: deque[tuple[int, int, bytes]] = deque()
        self._history_bytes = 0
        self._changed = asyncio.Condition()
        self._poke = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._listener: Listener | None = None
        self._last_prune = 0.0

    @property
    def current(self) -> Published | None:
        return self._current

    def poke(self) -> None:
        """Ask for a refresh (cheap, never blocks)."""
        self._poke.set()

    async def start(self) -> None:
        await self._rebuild()
        self._task = asyncio.create_task(self._run(), name="snapshot-builder")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._close_listener()

    async def wait_newer(self, version: int, epoch: str | None = None) -> Published:
        """Return the current snapshot as soon as its version is greater than ``version``, or
        (given ``epoch``) as soon as it is of another epoch, whatever its version."""

        def newer() -> bool:
            current = self._current
            return current is not None and (current.version > version or (epoch is not None and current.epoch != epoch))

        async with self._changed:
            await self._changed.wait_for(newer)
            assert self._current is not None
            return self._current

    def updates_for(self, have: int, parts: bool = False) -> tuple[int, list[bytes], bool]:
        """What brings a node holding version ``have`` to the current version: (the version
        it will hold, the serialised updates in order, whether they are the full snapshot, in
        parts if ``parts``)."""
        current = self._current
        assert current is not None
        if have == current.version:
            return have, [], False
        chain: list[bytes] = []
        expected = have
        for from_version, version, delta in self._history:
            if from_version == expected:
                chain.append(delta)
                expected = version
        if have > 0 and expected == current.version:
            return current.version, chain, False
        return current.version, current.whole(parts), True

    async def _run(self) -> None:
        while True:
            if self._listener is None or not self._listener.alive:
                await self._listen()
            with contextlib.suppress(TimeoutError):  # not wait_for: see NodeRegistry._run
                async with asyncio.timeout(POLL_INTERVAL_S):
                    await self._poke.wait()
            self._poke.clear()
            try:
                await self._rebuild()
                await self._prune()
            except StoreUnavailable as exc:
                log.warning("snapshot refresh failed; serving the last one", extra={"error": str(exc)})
                await asyncio.sleep(RETRY_INTERVAL_S)
                self._poke.set()

    async def _rebuild(self) -> None:
        previous = self._current
        have = previous.version if previous is not None else 0
        started = time.perf_counter()
        rows = None if previous is None else await config_store.load_changes(self._db, have, previous.epoch)
        if rows is None:
            rows = await config_store.load_rows(self._db)
        if previous is not None and rows.epoch != previous.epoch:
            # Another database (or this one restored and given a new epoch): its versions are
            # another history, so whatever its number this one replaces ours whole.
            log.warning(
                "the config epoch changed; publishing the whole config",
                extra={"epoch": rows.epoch, "previous_epoch": previous.epoch, "config_version": rows.version},
            )
        elif rows.version <= have:
            return
        read_ms = (time.perf_counter() - started) * 1000
        with metrics.SNAPSHOT_BUILD_SECONDS.time():
            if rows.full:
                # A full read of a large config is seconds of encoding: keep the loop free.
                published = await asyncio.to_thread(build, None if previous is None else previous.catalog, rows)
            else:
                published = build(None if previous is None else previous.catalog, rows)
            if published.delta is None:
                # Every node is sent this version whole: concatenated here, off the loop, not
                # by the first stream that needs it (tens of milliseconds for a large config).
                await asyncio.to_thread(published.full)
        await self._publish(published)
        log.info(
            "snapshot built",
            extra={
                "config_version": published.version,
                "read_ms": round(read_ms, 2),
                "build_ms": round(published.build_ms, 2),
                "changed": rows.changed if not rows.full else "all",
                "delta": published.delta is not None,
                **published.catalog.counts(),
            },
        )

    async def _publish(self, published: Published) -> None:
        if published.delta is None:
            self._history.clear()
            self._history_bytes = 0
        else:
            self._history.append((published.from_version, published.version, published.delta))
            self._history_bytes += len(published.delta)
        while len(self._history) > MAX_DELTAS or self._history_bytes > MAX_DELTA_BYTES:
            self._history_bytes -= len(self._history.popleft()[2])
        metrics.CONFIG_VERSION.set(published.version)
        async with self._changed:
            self._current = published
            self._changed.notify_all()

    async def _prune(self) -> None:
        now = time.monotonic()
        if now - self._last_prune < PRUNE_INTERVAL_S:
            return
        self._last_prune = now
        await config_store.prune_changes(self._db, CHANGE_LOG_RETENTION_S)

    async def _listen(self) -> None:
        """(Re)open the LISTEN connection; after a reconnect, refresh in case a NOTIFY was missed."""
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

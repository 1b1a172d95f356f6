"""The compiled snapshot a worker serves from, and the one reference that holds it.

Everything a request needs that can be computed per snapshot is computed here, once:
the route trie and the key table (hash → tenant). A request reads :attr:`Holder.current`
once and finishes on that object even if a newer snapshot is swapped in meanwhile.

A snapshot arrives whole (validated whole) or as a delta on the version held: the delta's
objects are validated together with what they touch in the snapshot they join, and the
parts of :class:`Compiled` they do not touch are reused (the route trie when no route
changed, the key table patched for the changed keys and tenants). Compiling runs in a
worker thread, off the event loop: nothing here may touch the loop.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, Final, TypeVar

from google.protobuf.message import DecodeError

from data_plane.auth.apikey import KeyTable
from data_plane.auth.stage import Auth
from data_plane.router import Router
from data_plane.upstream.pool import RoutePool, compile_pools
from shared import snapshot as model
from shared._generated.tenantgate.v1 import cluster_pb2, snapshot_pb2
from shared.errors import InvalidSnapshot
from shared.shardmap import ShardMap

_V = TypeVar("_V")

# A whole snapshot is parsed in pieces of about this size, and indexed and compiled in steps
# of about this many objects and routes: each step a millisecond or so (see decoding).
PARSE_CHUNK_BYTES: Final = 8 * 1024
STEP: Final = 500
ROUTE_STEP: Final = 20
KINDS: Final = ("tenants", "api_keys", "routes", "jwt_issuers", "oauth_clients", "signing_keys")
# Work done a step at a time: ``yield`` between steps, the result returned at the end.
Steps = Generator[None, None, _V]
_UPDATE_SNAPSHOT_TAG: Final = bytes([cluster_pb2.ConfigUpdate.DESCRIPTOR.fields_by_name["snapshot"].number << 3 | 2])
_UPDATE_PART_TAG: Final = bytes([cluster_pb2.ConfigUpdate.DESCRIPTOR.fields_by_name["part"].number << 3 | 2])


class StaleBase(Exception):
    """A delta whose ``from_version`` is not the version held: ask for a full snapshot."""


@dataclass(frozen=True, slots=True)
class Changes:
    """Ids a delta added, changed or removed, by kind."""

    tenants: frozenset[str] = frozenset()
    api_keys: frozenset[str] = frozenset()
    routes: frozenset[str] = frozenset()
    identity: bool = False  # issuers, OAuth clients or signing keys


@dataclass(frozen=True, slots=True)
class Objects:
    """A snapshot's objects by id: what a delta applies to. Never mutated: a delta makes new
    maps. Routes are in snapshot order (it decides ties); the numerous kinds (tenants, keys)
    are :class:`ShardMap` s, so that a delta copies a few shards of them, not all."""

    version: int
    built_at_ms: int
    tenants: ShardMap[str, model.Tenant]
    api_keys: ShardMap[str, model.ApiKey]
    routes: dict[str, model.Route]
    jwt_issuers: dict[str, model.JwtIssuer]
    oauth_clients: dict[str, model.OAuthClient]
    signing_keys: dict[str, model.SigningKey]
    # Key ids per tenant, and the key holding each hash: to patch the key table and to keep
    # hashes unique without scanning every key.
    keys_by_tenant: ShardMap[str, tuple[str, ...]] = field(repr=False)
    key_by_hash: ShardMap[bytes, str] = field(repr=False)
    # The config epoch the version counts in (shared/snapshot.py); "": unknown.
    epoch: str = ""

    @classmethod
    def of(cls, snap: model.Snapshot) -> Objects:
        return run_steps(cls.filling(snap))

    @classmethod
    def filling(cls, snap: model.Snapshot) -> Steps[Objects]:
        """:meth:`of` a little at a time (see :func:`run_steps`)."""
        keys_by_tenant: dict[str, list[str]] = {}
        for n, k in enumerate(snap.api_keys, 1):
            keys_by_tenant.setdefault(k.tenant_id, []).append(k.id)
            if not n % STEP:
                yield
        tenants = yield from ShardMap.filling((t.id, t) for t in snap.tenants)
        api_keys = yield from ShardMap.filling((k.id, k) for k in snap.api_keys)
        by_tenant = yield from ShardMap.filling((tid, tuple(ids)) for tid, ids in keys_by_tenant.items())
        for n in range(len(keys_by_tenant), 0, -1):  # freed a few at a time, not in one go
            keys_by_tenant.popitem()
            if not n % STEP:
                yield
        key_by_hash = yield from ShardMap.filling((k.key_hash, k.id) for k in snap.api_keys)
        return cls(
            version=snap.version,
            built_at_ms=snap.built_at_ms,
            tenants=tenants,
            api_keys=api_keys,
            routes={r.id: r for r in snap.routes},
            jwt_issuers={i.id: i for i in snap.jwt_issuers},
            oauth_clients={c.id: c for c in snap.oauth_clients},
            signing_keys={k.kid: k for k in snap.signing_keys},
            keys_by_tenant=by_tenant,
            key_by_hash=key_by_hash,
            epoch=snap.epoch,
        )

    def identity(self) -> model.Snapshot:
        """A snapshot of the issuers, OAuth clients and signing keys alone (cheap: no key
        or route is copied), for an auth stage given its key table ready-made."""
        return model.Snapshot(
            version=self.version,
            built_at_ms=self.built_at_ms,
            tenants=(),
            api_keys=(),
            routes=(),
            jwt_issuers=tuple(self.jwt_issuers.values()),
            oauth_clients=tuple(self.oauth_clients.values()),
            signing_keys=tuple(self.signing_keys.values()),
        )

    def snapshot(self) -> model.Snapshot:
        return model.Snapshot(
            version=self.version,
            built_at_ms=self.built_at_ms,
            epoch=self.epoch,
            tenants=tuple(self.tenants.values()),
            api_keys=tuple(self.api_keys.values()),
            routes=tuple(self.routes.values()),
            jwt_issuers=tuple(self.jwt_issuers.values()),
            oauth_clients=tuple(self.oauth_clients.values()),
            signing_keys=tuple(self.signing_keys.values()),
        )


def decode_full(msg: snapshot_pb2.Snapshot) -> Objects:
    """Validate a whole snapshot; raises ``InvalidSnapshot``."""
    return Objects.of(model.from_proto(msg))


def decode_full_bytes(data: bytes | memoryview) -> Objects:
    """Parse and validate an encoded whole snapshot. Raises ``InvalidSnapshot``."""
    return run_steps(decoding((data,)))


def decoding(pieces: Iterable[bytes | memoryview]) -> Steps[Objects]:
    """:func:`decode_full_bytes` of the concatenation of ``pieces`` (each cut between two
    fields, as ``SnapshotPart`` data is) a little at a time (see :func:`run_steps`): a chunk
    of :data:`PARSE_CHUNK_BYTES` parsed per step, then validation and indexing in steps."""
    parts: list[model.Snapshot] = []
    for chunk in chain.from_iterable(_chunks(piece) for piece in pieces):
        msg = snapshot_pb2.Snapshot()
        try:
            msg.ParseFromString(chunk)
        except DecodeError as exc:
            raise InvalidSnapshot(f"the snapshot cannot be decoded: {exc}") from None
        parts.append(model.decode(msg))
        yield

    every: dict[str, tuple[Any, ...]] = {}
    for kind in KINDS:
        every[kind] = tuple(chain.from_iterable(getattr(p, kind) for p in parts))
        yield
    snap = model.Snapshot(
        version=max((p.version for p in parts), default=0),
        built_at_ms=max((p.built_at_ms for p in parts), default=0),
        epoch=next((p.epoch for p in parts if p.epoch), ""),
        **every,
    )
    while parts:  # a piece at a time: freeing them is work too
        del parts[-STEP // 10 :]
        yield
    yield from model.validation(snap)
    objects = yield from Objects.filling(snap)
    del snap
    for kind in KINDS:  # the parsed tuples, one at a time
        del every[kind]
        yield
    return objects


def whole_snapshot_bytes(update: bytes) -> memoryview | None:
    """The encoded snapshot inside an encoded ``ConfigUpdate`` that holds exactly one (and
    nothing else), without parsing or copying it; None for anything else."""
    if not update.startswith(_UPDATE_SNAPSHOT_TAG):
        return None
    length, pos = _varint(update, len(_UPDATE_SNAPSHOT_TAG))
    if pos + length != len(update):
        return None
    return memoryview(update)[pos:]


def snapshot_part(update: bytes) -> cluster_pb2.SnapshotPart | None:
    """The ``SnapshotPart`` an encoded ``ConfigUpdate`` holds; None for any other update.
    Raises ``InvalidSnapshot`` when it cannot be parsed."""
    if not update.startswith(_UPDATE_PART_TAG):
        return None
    try:
        msg = cluster_pb2.ConfigUpdate.FromString(update)
    except DecodeError as exc:
        raise InvalidSnapshot(f"the snapshot part cannot be decoded: {exc}") from None
    return msg.part if msg.HasField("part") else None


def _chunks(data: bytes | memoryview) -> Iterator[bytes | memoryview]:
    """``data``, an encoded message, cut at field boundaries into pieces of about
    :data:`PARSE_CHUNK_BYTES`; each piece is itself an encoding of the same message type
    (fields may come in any order, and the entries of a repeated field concatenate)."""
    start = pos = 0
    size = len(data)
    while pos < size:
        tag, pos = _varint(data, pos)
        wire_type = tag & 7
        if wire_type == 0:
            _, pos = _varint(data, pos)
        elif wire_type == 2:
            length, pos = _varint(data, pos)
            pos += length
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        else:
            raise InvalidSnapshot(f"the snapshot cannot be decoded: wire type {wire_type}")
        if pos - start >= PARSE_CHUNK_BYTES:
            yield data[start:pos]
            start = pos
    if pos > size:
        raise InvalidSnapshot("the snapshot cannot be decoded: truncated")
    if start < size:
        yield data[start:]


def _varint(data: bytes | memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise InvalidSnapshot("the snapshot cannot be decoded: bad varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def apply_delta(base: Objects, delta: cluster_pb2.SnapshotDelta) -> tuple[Objects, Changes]:
    """The snapshot ``delta`` makes of ``base``, validated; raises ``StaleBase`` or
    ``InvalidSnapshot`` and then nothing is changed."""
    if delta.from_version != base.version:
        raise StaleBase(f"delta from version {delta.from_version}, but version {base.version} is held")
    if delta.upserts.epoch != base.epoch:
        # Equal version numbers of two databases: the delta's base is not this snapshot.
        raise StaleBase(f"delta of config epoch {delta.upserts.epoch!r}, but epoch {base.epoch!r} is held")
    ups = model.decode(delta.upserts)
    if ups.version <= base.version:
        raise InvalidSnapshot(f"delta to version {ups.version} does not move past {base.version}")

    tenants = base.tenants.patched(delta.removed_tenants, [(t.id, t) for t in ups.tenants])
    api_keys = base.api_keys.patched(delta.removed_api_keys, [(k.id, k) for k in ups.api_keys])
    routes = _patched(base.routes, delta.removed_routes, [(r.id, r) for r in ups.routes])
    issuers = _patched(base.jwt_issuers, delta.removed_jwt_issuers, [(i.id, i) for i in ups.jwt_issuers])
    clients = _patched(base.oauth_clients, delta.removed_oauth_clients, [(c.id, c) for c in ups.oauth_clients])
    signing = _patched(base.signing_keys, delta.removed_signing_keys, [(k.kid, k) for k in ups.signing_keys])

    # Keys: the per-tenant index and the hash owners follow the removed and upserted keys.
    touched_keys = set(delta.removed_api_keys) | {k.id for k in ups.api_keys}
    by_tenant: dict[str, tuple[str, ...]] = {}  # the tenants whose key list changes, as it becomes
    hashes_gone: set[bytes] = set()
    for kid in touched_keys:
        old = base.api_keys.get(kid)
        if old is not None:
            ids = by_tenant.get(old.tenant_id, base.keys_by_tenant.get(old.tenant_id, ()))
            by_tenant[old.tenant_id] = tuple(i for i in ids if i != kid)
            if base.key_by_hash.get(old.key_hash) == kid:
                hashes_gone.add(old.key_hash)
    hashes_new: dict[bytes, str] = {}
    for k in ups.api_keys:
        by_tenant[k.tenant_id] = (*by_tenant.get(k.tenant_id, base.keys_by_tenant.get(k.tenant_id, ())), k.id)
        owner = hashes_new.setdefault(k.key_hash, k.id)
        if owner == k.id and k.key_hash not in hashes_gone:
            owner = base.key_by_hash.get(k.key_hash, k.id)
        if owner != k.id:
            raise InvalidSnapshot(f"api key {k.id}: hash must be {model.KEY_HASH_BYTES} unique bytes")
    key_by_hash = base.key_by_hash.patched(hashes_gone, hashes_new.items())

    # The upserted objects are validated as a snapshot of their own, with the tenants they name.
    named = {k.tenant_id for k in ups.api_keys} | {i.tenant_id for i in ups.jwt_issuers}
    named |= {c.tenant_id for c in ups.oauth_clients}
    referenced = {tid: tenants[tid] for tid in named if tid in tenants} | {t.id: t for t in ups.tenants}
    model.validate(
        model.Snapshot(
            version=ups.version,
            built_at_ms=ups.built_at_ms,
            tenants=tuple(referenced.values()),
            api_keys=ups.api_keys,
            routes=ups.routes,
            jwt_issuers=ups.jwt_issuers,
            oauth_clients=ups.oauth_clients,
            signing_keys=tuple(signing.values()),
        )
    )
    # What only the whole snapshot can tell: nothing left pointing at a removed tenant, and
    # identity names unique across all issuers and clients (there are few of them).
    for tid in delta.removed_tenants:
        if by_tenant.get(tid, base.keys_by_tenant.get(tid)) or any(i.tenant_id == tid for i in issuers.values()):
            raise InvalidSnapshot(f"tenant {tid} is removed but still has keys or issuers")
        if any(c.tenant_id == tid for c in clients.values()):
            raise InvalidSnapshot(f"tenant {tid} is removed but still has OAuth clients")
    keys_by_tenant = base.keys_by_tenant.patched(
        [*delta.removed_tenants, *(tid for tid, ids in by_tenant.items() if not ids)],
        [(tid, ids) for tid, ids in by_tenant.items() if ids],
    )
    if ups.jwt_issuers or ups.oauth_clients:
        if len({(i.tenant_id, i.issuer) for i in issuers.values()}) != len(issuers):
            raise InvalidSnapshot("jwt issuers: issuer must be unique per tenant")
        if len({c.client_id for c in clients.values()}) != len(clients):
            raise InvalidSnapshot("oauth clients: client_id is duplicated")

    objects = Objects(
        version=ups.version,
        built_at_ms=ups.built_at_ms,
        tenants=tenants,
        api_keys=api_keys,
        routes=routes,
        jwt_issuers=issuers,
        oauth_clients=clients,
        signing_keys=signing,
        keys_by_tenant=keys_by_tenant,
        key_by_hash=key_by_hash,
        epoch=base.epoch,
    )
    changes = Changes(
        tenants=frozenset(delta.removed_tenants) | {t.id for t in ups.tenants},
        api_keys=frozenset(touched_keys),
        routes=frozenset(delta.removed_routes) | {r.id for r in ups.routes},
        identity=bool(
            ups.jwt_issuers
            or ups.oauth_clients
            or ups.signing_keys
            or delta.removed_jwt_issuers
            or delta.removed_oauth_clients
            or delta.removed_signing_keys
        ),
    )
    return objects, changes


def _patched(base: dict[str, _V], removed: Sequence[str], upserts: list[tuple[str, _V]]) -> dict[str, _V]:
    """A copy of ``base`` without ``removed``, with ``upserts`` replaced in place or appended;
    ``base`` itself when neither names anything (snapshots never change their dicts)."""
    if not removed and not upserts:
        return base
    out = dict(base)
    for oid in removed:
        out.pop(oid, None)
    out.update(upserts)
    return out


@dataclass(frozen=True, slots=True)
class Compiled:
    version: int
    router: Router
    tenants: ShardMap[str, model.Tenant]
    # Route id → its upstream pool (targets, balancer, breakers, retry budget); target state
    # is shared with the previous snapshot's pools wherever the target URL is unchanged.
    upstreams: dict[str, RoutePool]
    compile_ms: float
    # Key table, token verifier (with its cache) and token endpoint state of this snapshot.
    auth: Auth
    # What the next delta applies to.
    objects: Objects = field(repr=False)


def compile_snapshot(msg: snapshot_pb2.Snapshot) -> Compiled:
    """Validate and compile a whole snapshot; raises ``InvalidSnapshot`` and then nothing is changed."""
    return compile_objects(decode_full(msg))


def compile_objects(objects: Objects, previous: Compiled | None = None, changes: Changes | None = None) -> Compiled:
    """Compile ``objects``; with ``previous`` and the ``changes`` that lead from it, reuse what
    the changes leave alone. Runs in a worker thread."""
    started = time.perf_counter()
    tenants = objects.tenants
    if previous is None or changes is None:
        router = Router(objects.routes.values())
        upstreams = compile_pools(objects.routes.values())
        auth = Auth(objects.snapshot(), tenants)
    else:
        router, upstreams = previous.router, previous.upstreams
        if changes.routes:
            # In snapshot order: new routes come after all others, as in a rebuild.
            changed_routes = [r for rid, r in objects.routes.items() if rid in changes.routes]
            gone = [rid for rid in changes.routes if rid not in objects.routes]
            router = router.with_changes(changed_routes, gone)
            upstreams = dict(upstreams)
            for rid in gone:
                upstreams.pop(rid, None)
            upstreams.update(compile_pools(changed_routes))
        touches_auth = changes.tenants or changes.api_keys or changes.identity
        auth = (
            Auth(objects.identity(), tenants, _patched_keys(previous, objects, changes))
            if touches_auth
            else previous.auth
        )
    compile_ms = (time.perf_counter() - started) * 1000
    return Compiled(objects.version, router, tenants, upstreams, compile_ms, auth, objects)


def compiling(objects: Objects) -> Steps[Compiled]:
    """:func:`compile_objects` of a whole snapshot a little at a time (see :func:`run_steps`):
    :data:`ROUTE_STEP` routes into the trie and their pools per step, then the key table."""
    started = time.perf_counter()
    routes = list(objects.routes.values())
    router = Router(())
    upstreams: dict[str, RoutePool] = {}
    for i in range(0, len(routes), ROUTE_STEP):
        batch = routes[i : i + ROUTE_STEP]
        router = router.with_changes(batch, ())  # appended in order, as Router(routes) would
        upstreams.update(compile_pools(batch))
        yield
    keys = yield from KeyTable.filling(objects.api_keys.values(), objects.tenants)
    auth = Auth(objects.identity(), objects.tenants, keys)
    compile_ms = (time.perf_counter() - started) * 1000
    return Compiled(objects.version, router, objects.tenants, upstreams, compile_ms, auth, objects)


def run_steps(steps: Steps[_V]) -> _V:
    """Run ``steps`` to the end at once and return what they make."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            result: _V = done.value
            return result


def _patched_keys(previous: Compiled, objects: Objects, changes: Changes) -> KeyTable:
    """The previous key table with the changed keys, and every key of a changed tenant (its
    identity names the tenant), taken out and put back as they are now."""
    affected = set(changes.api_keys)
    for tid in changes.tenants:
        affected.update(objects.keys_by_tenant.get(tid, ()))
    old = previous.objects.api_keys
    removed = [old[kid].key_hash for kid in affected if kid in old]
    added = [objects.api_keys[kid] for kid in affected if kid in objects.api_keys]
    return previous.auth.keys.patched(removed, added, objects.tenants)


class Holder:
    """The current compiled snapshot of this worker: swapped by one reference assignment."""

    __slots__ = ("current", "source")

    def __init__(self) -> None:
        self.current: Compiled | None = None
        self.source = "none"  # "control_plane" once a snapshot from the CP is live

    def swap(self, compiled: Compiled, source: str) -> None:
        self.current = compiled
        self.source = source

"""The Watch client: keeps this worker's snapshot in step with the control plane.

It connects with the cluster token (over TLS when ``CLUSTER_TLS_CA`` is set), says which
version it has and the config epoch that version counts in, and applies each update it
receives: a full snapshot, validated whole, or a delta on the version it holds, of the same
epoch. A full snapshot comes in parts of a few hundred kilobytes (the Hello asks for them:
gRPC gathers each message on the event loop, and a message of megabytes would hold every
request for as long), gathered in order and applied after the last. Parsing, validation and
compiling run in a worker thread, so requests keep being served while a large snapshot
applies; the result is swapped in by one reference assignment and ACKed. An update that
fails validation is NACKed with the reason and the old snapshot keeps serving; a delta on
another base or of another epoch asks for a full snapshot (``Nack.resync``). When the stream
breaks, it reconnects with jittered exponential backoff and resumes from the version it has.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import random
import sys
import time
import types
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

import grpc
from google.protobuf.message import DecodeError
from grpc import aio
from prometheus_client import Counter, Gauge, Histogram

import shared
from data_plane import disk
from data_plane.snapshot import (
    Compiled,
    Holder,
    StaleBase,
    Steps,
    apply_delta,
    compile_objects,
    compiling,
    decode_full,
    decoding,
    run_steps,
    snapshot_part,
    whole_snapshot_bytes,
)
from shared import snapshot as model
from shared._generated.tenantgate.v1 import cluster_pb2
from shared.errors import InvalidSnapshot
from shared.settings import Settings

log = logging.getLogger(__name__)

BACKOFF_INITIAL_S: Final = 0.2
BACKOFF_MAX_S: Final = 10.0
MAX_MESSAGE_BYTES: Final = 256 * 1024 * 1024
WATCH_METHOD: Final = "/tenantgate.v1.Cluster/Watch"
# The control plane's response header meaning "token and Hello accepted" (control_plane/cluster/watch.py).
ACCEPTED_HEADER: Final = "tenantgate-accepted"
# Keepalive, aligned with control_plane/cluster/watch.py: ping after 10 s of silence; the
# control plane permits pings down to 5 s apart, so it never answers "too_many_pings".
CHANNEL_OPTIONS: Final = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.enable_retries", 0),
]
# The journal of deltas on disk is folded into a whole snapshot once it is this much larger
# than the snapshot file and past the floor: encoding a whole config again costs a large one
# a second of CPU, so it is done rarely (replaying a long journal at start is cheap).
JOURNAL_COMPACT_RATIO: Final = 4.0
JOURNAL_COMPACT_FLOOR_BYTES: Final = 64 * 1024 * 1024
# After an update this large (or a full snapshot) the live objects are frozen (gc.freeze).
FREEZE_AFTER_OBJECTS: Final = 1000
# The interpreter's thread switch interval while an update compiles (see ConfigClient._apply):
# a request takes the interpreter several times on its way through, each time waiting up to
# this long for the compiling thread to hand it over. At 100,000 keys, 0.1 ms against 1 ms:
# request p50 during a full apply 1.4 ms against 3.1 ms, worst 4.6-6.9 ms against 6.4-12.9,
# the apply itself 5-10% longer.
APPLY_SWITCH_INTERVAL_S: Final = 0.0001
# A delta this small is applied inline (a few hundred objects: well under a millisecond at
# 100,000 keys), skipping the hand-off to a worker thread; anything larger in the thread.
INLINE_DELTA_BYTES: Final = 16 * 1024
# A snapshot replaced whole is freed a piece at a time (see _release): at most this long at
# once on the event loop, once nothing else refers to it (checked this often).
RELEASE_SLICE_S: Final = 0.001
RELEASE_POLL_S: Final = 0.05
# A container of more references than this is taken apart: its items are freed one by one.
_WIDE: Final = 16
_SKIP: Final = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType)

CONFIG_VERSION: Final = Gauge(
    "tenantgate_dp_config_version",
    "Config version this data-plane worker serves (the least up-to-date live worker).",
    multiprocess_mode="livemin",
)
CP_CONNECTED: Final = Gauge(
    "tenantgate_dp_cp_connected",
    "1 while this worker's Watch stream to the control plane is up (least connected live worker).",
    multiprocess_mode="livemin",
)
APPLY_SECONDS: Final = Histogram(
    "tenantgate_dp_snapshot_apply_seconds",
    "Time to parse, validate and compile a config update, by kind (full, delta).",
    ["kind"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
NACKS: Final = Counter(
    "tenantgate_dp_config_nacks_total",
    "Config updates this worker rejected (kept the previous snapshot).",
)


@dataclass(slots=True)
class ClusterStatus:
    connected: bool = False
    last_error: str = ""
    nacks: int = 0


@dataclass(slots=True)
class _PartRun:
    """The parts of one whole snapshot received so far (see ``SnapshotPart``): they must come
    in order, from index 0; a run that breaks is refused once its last part is in."""

    version: int
    started: float = field(default_factory=time.perf_counter)
    pieces: list[bytes] = field(default_factory=list)
    size: int = 0
    error: str = ""

    def add(self, part: cluster_pb2.SnapshotPart) -> None:
        if self.error:
            return
        if part.index != len(self.pieces):
            self._broken(f"part {part.index} of version {self.version} came where part {len(self.pieces)} was due")
        elif self.size + len(part.data) > MAX_MESSAGE_BYTES:
            self._broken(f"the snapshot of version {self.version} is larger than {MAX_MESSAGE_BYTES} bytes")
        else:
            self.pieces.append(part.data)
            self.size += len(part.data)

    def _broken(self, error: str) -> None:
        self.error = error
        self.pieces.clear()


def _gathered(run: _PartRun | None, part: cluster_pb2.SnapshotPart) -> _PartRun:
    """The run ``part`` belongs to, with it added: part 0, or a part of another version than
    ``run``'s, starts a new run (an unfinished one is dropped)."""
    if run is None or part.index == 0 or part.version != run.version:
        run = _PartRun(part.version)
    run.add(part)
    return run


@dataclass(frozen=True, slots=True)
class _Applied:
    compiled: Compiled
    # The encoded snapshot (the concatenation of these), when the update was a whole one.
    full: Sequence[bytes | memoryview] | None
    delta: cluster_pb2.SnapshotDelta | None
    # When the update replaces the snapshot whole: the old one's pieces (see _pieces).
    retired: list[object] | None = None


def _whole(
    encoded: Sequence[bytes | memoryview], current: Compiled | None, version: int | None = None
) -> Steps[_Applied]:
    """Parse, validate and compile a whole snapshot, the concatenation of ``encoded`` (in a
    worker thread), which must be of ``version`` when given. In steps of about a millisecond
    each: no single call holds the interpreter, and with it the event loop, for longer (see
    data_plane/snapshot.py)."""
    objects = yield from decoding(encoded)
    if version is not None and objects.version != version:
        raise InvalidSnapshot(f"the parts of version {version} hold a snapshot of version {objects.version}")
    compiled = yield from compiling(objects)
    retired = None if current is None else (yield from _pieces(current))
    return _Applied(compiled, encoded, None, retired)


def _prepare(raw: bytes, current: Compiled | None) -> _Applied:
    """Parse, validate and compile one update that is not a bare whole snapshot (a delta,
    inline or in a worker thread). The caller turns the cyclic garbage collector off around
    this and :func:`_whole` (see :meth:`ConfigClient._apply`)."""
    update = cluster_pb2.ConfigUpdate.FromString(raw)
    if update.HasField("delta"):
        if current is None:
            raise StaleBase("a delta arrived, but no snapshot is held")
        objects, changes = apply_delta(current.objects, update.delta)
        return _Applied(compile_objects(objects, current, changes), None, update.delta)
    if not update.HasField("snapshot"):
        raise InvalidSnapshot("the update holds neither a snapshot nor a delta")
    compiled = compile_objects(decode_full(update.snapshot))
    retired = None if current is None else run_steps(_pieces(current))
    return _Applied(compiled, (update.snapshot.SerializeToString(),), None, retired)


class ConfigClient:
    def __init__(self, settings: Settings, holder: Holder, rng: random.Random | None = None) -> None:
        self._data_dir = settings.data_dir
        assert settings.cluster_token is not None
        self._addr = str(settings.cp_addr)
        self._ca = settings.cluster_tls_ca.read_bytes() if settings.cluster_tls_ca is not None else None
        self._metadata = (("authorization", f"Bearer {settings.cluster_token.reveal()}"),)
        self._node_id = settings.node_id
        self._holder = holder
        self._rng = rng or random.Random()  # noqa: S311 - backoff jitter, not a secret
        self.status = ClusterStatus()
        # Each reason for being disconnected is logged once per outage, however often the
        # retries alternate between them (a refused token can surface as INTERNAL in a race).
        self._said: set[str] = set()
        self._saving: asyncio.Future[None] | None = None
        self._releasing: set[asyncio.Future[None]] = set()
        CP_CONNECTED.set(0)

    def restore_from_disk(self) -> bool:
        """Serve the last snapshot saved on disk until the control plane answers. True if one was loaded."""
        saved = disk.load(self._data_dir)
        if saved is None or self._holder.current is not None:
            return False
        msg, deltas = saved
        try:
            compiled = compile_objects(decode_full(msg))
        except (InvalidSnapshot, ValueError) as exc:
            log.warning("the snapshot on disk is invalid; ignoring it", extra={"error": str(exc)})
            return False
        for delta in deltas:
            try:
                objects, changes = apply_delta(compiled.objects, delta)
            except (StaleBase, InvalidSnapshot, ValueError) as exc:
                # Start the files afresh from what is served, so later deltas append to it.
                log.warning("stopped replaying the snapshot journal", extra={"error": str(exc)})
                try:
                    disk.save(self._data_dir, model.to_proto(compiled.objects.snapshot()))
                except OSError as save_exc:
                    log.warning("cannot save the snapshot to disk", extra={"error": str(save_exc)})
                break
            compiled = compile_objects(objects, compiled, changes)
        self._holder.swap(compiled, "disk")
        CONFIG_VERSION.set(compiled.version)
        gc.freeze()
        log.info("serving the snapshot saved on disk", extra={"config_version": compiled.version})
        return True

    async def run(self) -> None:
        """Stay connected until cancelled."""
        try:
            await self._run()
        finally:
            for releasing in list(self._releasing):  # the process is stopping: no need to spread it
                releasing.cancel()

    async def _run(self) -> None:
        delay = BACKOFF_INITIAL_S
        while True:
            try:
                received = await self._session()
            except aio.AioRpcError as exc:
                received = False
                self._disconnected(exc)
            except Exception:
                # Whatever went wrong, this task must live on: without it the node never
                # hears of a change again.
                received = False
                log.exception("config stream failed; reconnecting")
            finally:
                self.status.connected = False
                CP_CONNECTED.set(0)
            if received:
                delay = BACKOFF_INITIAL_S
            sleep = delay * (0.5 + self._rng.random())  # jitter: 0.5x-1.5x
            await asyncio.sleep(sleep)
            delay = min(delay * 2, BACKOFF_MAX_S)

    def _disconnected(self, exc: aio.AioRpcError) -> None:
        code = exc.code()
        if code == grpc.StatusCode.UNAUTHENTICATED:
            message = f"the control plane at {self._addr} refused the cluster token; check TENANTGATE_CLUSTER_TOKEN"
        elif code == grpc.StatusCode.UNAVAILABLE and self._ca is not None:
            message = (
                f"control plane at {self._addr} unavailable over TLS (is it up, serving TLS with a"
                f" certificate TENANTGATE_CLUSTER_TLS_CA trusts?): {exc.details()}"
            )
        elif code == grpc.StatusCode.UNAVAILABLE:
            message = f"control plane at {self._addr} unavailable: {exc.details()}"
        else:
            message = f"config stream from {self._addr} ended: {code.name} {exc.details()}"
        if message not in self._said:
            self._said.add(message)
            log.warning(message)
        self.status.last_error = message

    def _channel(self) -> aio.Channel:
        if self._ca is None:
            return aio.insecure_channel(self._addr, options=CHANNEL_OPTIONS)
        return aio.secure_channel(self._addr, grpc.ssl_channel_credentials(root_certificates=self._ca), CHANNEL_OPTIONS)

    async def _session(self) -> bool:
        """One stream's life; True if it delivered at least one update."""
        received = False
        async with self._channel() as channel:
            # Updates come as bytes: they are parsed in a worker thread, not on the loop.
            watch = channel.stream_stream(
                WATCH_METHOD,
                request_serializer=cluster_pb2.WatchRequest.SerializeToString,
                response_deserializer=None,
            )
            call = watch(metadata=self._metadata)
            held = self._holder.current
            await _send(
                call,
                cluster_pb2.WatchRequest(
                    hello=cluster_pb2.Hello(
                        node_id=self._node_id,
                        last_version=held.version if held is not None else 0,
                        last_epoch=held.objects.epoch if held is not None else "",
                        software_version=shared.__version__,
                        snapshot_parts=True,
                    )
                ),
            )
            # The control plane sends its headers once it has accepted the token and the Hello,
            # even when this node is already up to date and no snapshot follows. A refusal
            # comes as trailers only, without the header.
            headers = await call.initial_metadata()
            if any(key == ACCEPTED_HEADER for key, _ in headers or ()):
                self._on_connected()
            run: _PartRun | None = None
            while True:
                raw = await call.read()
                if raw is aio.EOF:
                    return received
                self._on_connected()
                received = True
                try:
                    part = snapshot_part(raw)
                except InvalidSnapshot as exc:
                    version, run = run.version if run is not None else 0, None
                    await _send(call, self._refused(version, exc))
                    continue
                if part is None:
                    run = None
                    await _send(call, await self._apply(raw))
                    continue
                run = _gathered(run, part)
                if part.last:
                    whole, run = run, None
                    await _send(call, await self._apply(whole))

    def _on_connected(self) -> None:
        if not self.status.connected:
            self.status.connected = True
            self.status.last_error = ""
            self._said.clear()
            CP_CONNECTED.set(1)
            log.info("connected to control plane", extra={"cp_addr": self._addr})

    async def _apply(self, update: bytes | _PartRun) -> cluster_pb2.WatchRequest:
        # A config of 100,000 keys is millions of objects: a full collection would scan them
        # all, holding the interpreter (and so every request) for as long, and allocating a
        # compiled snapshot would set off several. Off while compiling; after a large update
        # what is live is frozen out of the collector's way (snapshots hold no reference
        # cycles: the one replaced is freed by reference counting).
        # The compiling thread and the event loop share the interpreter: a shorter switch
        # interval hands it back to the loop within a tenth of a millisecond rather than five.
        interval = sys.getswitchinterval()
        gc.disable()
        sys.setswitchinterval(APPLY_SWITCH_INTERVAL_S)
        try:
            return await self._apply_collector_off(update)
        finally:
            sys.setswitchinterval(interval)
            gc.enable()

    async def _apply_collector_off(self, update: bytes | _PartRun) -> cluster_pb2.WatchRequest:
        previous = self._holder.current
        started = time.perf_counter()
        try:
            if isinstance(update, _PartRun):
                if update.error:
                    raise InvalidSnapshot(update.error)
                applied = await asyncio.to_thread(run_steps, _whole(update.pieces, previous, update.version))
            elif (whole := whole_snapshot_bytes(update)) is not None:
                applied = await asyncio.to_thread(run_steps, _whole((whole,), previous))
            elif len(update) <= INLINE_DELTA_BYTES:
                applied = _prepare(update, previous)
            else:
                applied = await asyncio.to_thread(_prepare, update, previous)
        except StaleBase as exc:
            log.info("asking for a full snapshot", extra={"reason": str(exc)})
            have = previous.version if previous is not None else 0
            return cluster_pb2.WatchRequest(nack=cluster_pb2.Nack(version=have, error=str(exc), resync=True))
        except (InvalidSnapshot, ValueError, DecodeError) as exc:
            return self._refused(update.version if isinstance(update, _PartRun) else _version_of(update), exc)
        compiled = applied.compiled
        self._holder.swap(compiled, "control_plane")
        kind = "full" if applied.full is not None else "delta"
        APPLY_SECONDS.labels(kind).observe(time.perf_counter() - started)
        CONFIG_VERSION.set(compiled.version)
        self._persist(applied)
        large = applied.full is not None or (applied.delta is not None and _size(applied.delta) > FREEZE_AFTER_OBJECTS)
        if applied.retired is not None and previous is not None:
            # Nothing of the old snapshot lives on in this one: freed at once, a large config
            # would hold the loop for tens of milliseconds.
            releasing = asyncio.ensure_future(_release(previous, applied.retired))
            self._releasing.add(releasing)
            releasing.add_done_callback(self._releasing.discard)
        del previous, applied
        if large:
            gc.freeze()
        log.info(
            "snapshot applied",
            extra={
                "config_version": compiled.version,
                "kind": kind,
                "compile_ms": round(compiled.compile_ms, 2),
                "apply_ms": round((time.perf_counter() - started) * 1000, 2),
                "routes": compiled.router.size,
                # From the first part's arrival to the last's, for a snapshot sent in parts.
                "receive_ms": round((started - update.started) * 1000, 2) if isinstance(update, _PartRun) else 0.0,
            },
        )
        return cluster_pb2.WatchRequest(ack=cluster_pb2.Ack(version=compiled.version))

    def _refused(self, version: int, exc: Exception) -> cluster_pb2.WatchRequest:
        """Count and log an update that cannot be applied; the NACK that answers it."""
        self.status.nacks += 1
        NACKS.inc()
        log.error("snapshot rejected; keeping the previous one", extra={"config_version": version, "error": str(exc)})
        return cluster_pb2.WatchRequest(nack=cluster_pb2.Nack(version=version, error=str(exc)[:1000]))

    def _persist(self, applied: _Applied) -> None:
        """Save off the event loop; saves run one at a time, in order."""
        previous = self._saving
        full, delta, compiled = applied.full, applied.delta, applied.compiled

        def write() -> None:
            if full is not None:
                disk.save_bytes(self._data_dir, *full)
                return
            assert delta is not None
            size = disk.append(self._data_dir, delta)
            if size > max(JOURNAL_COMPACT_FLOOR_BYTES, JOURNAL_COMPACT_RATIO * disk.snapshot_size(self._data_dir)):
                disk.save(self._data_dir, model.to_proto(compiled.objects.snapshot()))

        async def save() -> None:
            if previous is not None:
                await asyncio.gather(previous, return_exceptions=True)
            try:
                await asyncio.to_thread(write)
            except OSError as exc:
                log.warning("cannot save the snapshot to disk", extra={"error": str(exc)})

        self._saving = asyncio.ensure_future(save())


def _pieces(root: object) -> Steps[list[object]]:
    """What ``root`` is made of, held so that dropping ``root`` frees only its frame: the items
    of every wide container (shards, routes, trie nodes, pools) reachable through narrow
    objects. Each item then costs little to free on its own. In steps (one per wide container)."""
    held: list[object] = []
    todo = [root]
    seen: set[int] = set()
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        refs = [r for r in gc.get_referents(obj) if not isinstance(r, _SKIP)]
        if len(refs) > _WIDE:
            held.extend(refs)
            yield
        else:
            todo.extend(refs)
    return held


async def _release(old: Compiled, pieces: list[object]) -> None:
    """Free ``old``, a snapshot nothing newer shares, at most :data:`RELEASE_SLICE_S` at a time,
    ``pieces`` (:func:`_pieces`) last.

    Requests in flight may still use it (and the rate limiter keeps the last one it saw until
    the next request): the pieces are let go only once this is the last reference."""
    while sys.getrefcount(old) > 2:  # noqa: ASYNC110 - no event says when the last reference goes
        await asyncio.sleep(RELEASE_POLL_S)
    del old
    while pieces:
        started = time.perf_counter()
        while pieces and time.perf_counter() - started < RELEASE_SLICE_S:
            pieces.pop()
        await asyncio.sleep(0)


async def _send(call: aio.StreamStreamCall, msg: cluster_pb2.WatchRequest) -> None:
    """Write on the stream; if it has ended meanwhile (the control plane refused it, went
    away while an update was being applied), raise its status as the error it is."""
    try:
        await call.write(msg)
    except asyncio.InvalidStateError:
        code = await call.code()
        raise aio.AioRpcError(code, aio.Metadata(), aio.Metadata(), details=await call.details()) from None


def _size(delta: cluster_pb2.SnapshotDelta) -> int:
    """How many objects a delta adds, changes or removes."""
    ups = delta.upserts
    return (
        len(ups.tenants)
        + len(ups.api_keys)
        + len(ups.routes)
        + len(delta.removed_tenants)
        + len(delta.removed_api_keys)
        + len(delta.removed_routes)
    )


def _version_of(raw: bytes) -> int:
    """The version an update names, for a NACK (0 when it cannot even be parsed)."""
    try:
        update = cluster_pb2.ConfigUpdate.FromString(raw)
    except DecodeError:
        return 0
    if update.HasField("delta"):
        return int(update.delta.upserts.version)
    return int(update.snapshot.version)

"""The Redis backend of the rate limiter. The Redis client libraries are used only here (and in
``resp.py``); their errors are mapped here.

One request costs one ``EVALSHA`` of ``decide.lua`` (every limit at once, on Redis time), and
the commands of all requests that arrive within one event-loop tick — decisions, lease
releases, lease renewals — travel in one pipelined round trip (per cluster node with
``TENANTGATE_REDIS_CLUSTER=1``: each command goes to the node of its tenant's hash slot, from
the cluster's slot map, re-read on ``MOVED``). The script is loaded once and again on
``NOSCRIPT``, in the same round trip as the commands it refused.

The request path does no per-command packing: the commands of one (tenant, route) are encoded
once per snapshot (:class:`Wire`, built with the limits), a decision splices in only its lease
id, and a batch is one ``bytes`` join written to a :class:`~data_plane.ratelimit.resp.Link`,
whose replies (parsed by hiredis) resolve the requests' futures as they are read.

Failure handling is a circuit: a batch that errors opens it (and closes the connections, so
nothing else waits on them). A batch that exceeds ``RATELIMIT_TIMEOUT_MS`` starts a probe: a
late answer is more often this worker's own busy loop than a slow Redis, and a batch given up
on may still have been counted in Redis, so the batch keeps waiting (up to
:data:`LATE_WAIT_S`) unless the probe finds Redis gone, which opens the circuit and fails the
batch at once. While the circuit is open no request touches Redis (the limiter falls back at
once); :meth:`RedisBackend.watch_health` probes in the background (with redis-py, on
connections of its own) and closes it when Redis answers. The same loop keeps this worker's
heartbeat in Redis (``tenantgate:nodes``, a sorted set of node id → expiry) so every worker
knows how many live nodes share a limit when it has to fall back, and renews the concurrency
leases of requests still in flight.

Sliding windows: N+1 sub-buckets per window (N = 120, so 0.5 s buckets for a minute, 30 s
for an hour). A window never admits more than its limit in any interval of its nominal
length (no over-admission at all, unlike the weighted two-window estimate, which can admit
up to twice the limit in the worst case); the price is that the counted span is up to one bucket longer
than the window, so a client pacing exactly at the limit is admitted at least N/(N+1) of it
(worst case 0.83% fewer).
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from importlib import resources
from typing import Any, Final

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import RedisError

from data_plane.ratelimit import metrics
from data_plane.ratelimit.base import Decision, Kind, LimiterUnavailable, Limits
from data_plane.ratelimit.resp import Endpoint, Link, LinkClosed, ReplyError, bulk, connect, encode
from shared.settings import Settings

log = logging.getLogger(__name__)

SCRIPT: Final = resources.files("data_plane.ratelimit").joinpath("decide.lua").read_text()
SCRIPT_SHA: Final = hashlib.sha1(SCRIPT.encode()).hexdigest()  # noqa: S324 - Redis names scripts by SHA-1
SCRIPT_LOAD: Final = encode("SCRIPT", "LOAD", SCRIPT)
ASKING: Final = encode("ASKING")
CLUSTER_SLOTS: Final = 16384

SOCKET_TIMEOUT_S: Final = 0.5
# Pipelines in flight at once per worker. While they are all out, new commands queue and
# leave together in the next one: the busier the worker, the bigger (and fewer) the batches.
# Each batch has RATELIMIT_TIMEOUT_MS from the moment it is sent, so a command that had to
# queue behind a full set of pipelines waits at most about twice that.
MAX_IN_FLIGHT: Final = 2
# Lease renewals wait this long for a decision's batch to ride along with, rather than cost
# a round trip of their own.
LAZY_FLUSH_S: Final = 0.005
# A late batch waits at most this long in all while a probe finds Redis reachable: limits stay
# exact under a busy loop, and a Redis that stops answering is given up on within this bound.
LATE_WAIT_S: Final = SOCKET_TIMEOUT_S
# Loop turns a batch past its deadline gets to read an answer that is already there.
GRACE_TURNS: Final = 3
# How often a healthy worker beats (and renews leases); how often an open circuit probes.
HEARTBEAT_S: Final = 1.0
PROBE_S: Final = 0.2
# A node missing this long is dead: its share of every limit goes back to the others.
NODE_TTL_MS: Final = 5000
NODES_KEY: Final = "tenantgate:nodes"
# A concurrency lease lives this long unless its node renews it (every LEASE_RENEW_S, for
# leases older than a second: most requests finish before their lease is ever renewed).
LEASE_TTL_MS: Final = 10_000
LEASE_RENEW_S: Final = 3.0
LEASE_RENEW_AGE_S: Final = 1.0

# Both on Redis time, like the decisions, so no two nodes' clocks need to agree.
HEARTBEAT_SCRIPT: Final = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('PEXPIRE', KEYS[1], 4 * tonumber(ARGV[2]))
return redis.call('ZCARD', KEYS[1])
"""
RENEW_SCRIPT: Final = """
local t = redis.call('TIME')
local expiry = t[1] * 1000 + math.floor(t[2] / 1000) + tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], 'XX', expiry, ARGV[i]) end
redis.call('PEXPIRE', KEYS[1], 2 * tonumber(ARGV[1]))
return 0
"""

Address = tuple[str, int]
# One queued command: its RESP bytes, its cluster hash slot, and who waits for its reply.
_Item = tuple[bytes, int, "asyncio.Future[Any] | None"]


def tenant_keys(tenant_id: str, route_id: str) -> tuple[str, str, str, str, str, str]:
    """The keys of one (tenant, route): all share the hash tag ``{t:<tenant>}``."""
    tag = f"{{t:{tenant_id}}}"
    return (
        f"{tag}:m",
        f"{tag}:h",
        f"{tag}:r:{route_id}",
        f"{tag}:b:{route_id}",
        f"{tag}:q",
        f"{tag}:c",
    )


@dataclass(frozen=True, slots=True, eq=False)
class Wire:
    """The commands of one (tenant, route) as RESP bytes, encoded once per snapshot."""

    # The whole EVALSHA with no lease (no concurrency limit).
    decide: bytes
    # The EVALSHA before and after its lease argument.
    decide_head: bytes
    decide_tail: bytes
    # ZREM of the leases key, before the lease.
    release_head: bytes
    # The tenant's hash slot (every key of the pair has it).
    slot: int


def _array(*args: str | int) -> bytes:
    return b"".join(bulk(str(a).encode()) for a in args)


def wire(limits: Limits, minute_ms: int) -> Wire:
    keys = limits.keys
    head = b"*19\r\n" + _array(
        "EVALSHA",
        SCRIPT_SHA,
        6,
        *keys,
        limits.per_minute,
        limits.per_hour,
        limits.route_limit,
        limits.burst,
        limits.monthly_quota,
        limits.max_concurrency,
    )
    tail = _array(LEASE_TTL_MS, minute_ms, 0)
    return Wire(
        decide=head + bulk(b"") + tail,
        decide_head=head,
        decide_tail=tail,
        release_head=b"*3\r\n" + _array("ZREM", keys[5]),
        slot=key_slot(keys[0].encode()),
    )


class _Flight:
    """One flush: the commands of one loop tick, sent as one part per Redis server, with the
    deadline they share. It ends when every part is answered or when it is given up on."""

    __slots__ = ("backend", "items", "late_deadline", "over", "parts", "started", "timer", "turns")

    def __init__(self, backend: RedisBackend, items: list[_Item], deadline: float, late_deadline: float) -> None:
        self.backend = backend
        self.items = items
        self.late_deadline = late_deadline
        self.over = False
        self.parts = 0
        self.turns = GRACE_TURNS
        self.started = time.perf_counter()
        self.timer: asyncio.TimerHandle = asyncio.get_running_loop().call_at(deadline, self._expired)

    def part_done(self) -> None:
        self.parts -= 1
        if self.parts == 0 and not self.over:
            metrics.REDIS_SECONDS.observe(time.perf_counter() - self.started)
            metrics.BATCH_SIZE.observe(len(self.items))
            self._end()

    def _end(self) -> None:
        self.over = True
        self.timer.cancel()
        self.backend._landed()

    # Past the deadline. An answer that arrived by then but was not read yet — because this
    # worker's loop was busy and runs the timer in the same turn as the socket — still counts:
    # the flight gives the reading side a couple of loop turns first. Then it waits on while a
    # probe finds Redis reachable, until the late deadline.

    def _expired(self) -> None:
        asyncio.get_running_loop().call_soon(self._grace)

    def _grace(self) -> None:
        if self.over:
            return
        loop = asyncio.get_running_loop()
        if self.turns > 1:
            self.turns -= 1
            loop.call_soon(self._grace)
            return
        probe = self.backend._confirm_down()
        if probe is None:
            self.give_up()
            return
        probe.add_done_callback(self._probed)
        self.timer = loop.call_at(self.late_deadline, self.give_up)

    def _probed(self, _: asyncio.Task[bool]) -> None:
        if not self.backend.ok:
            self.give_up()

    def give_up(self) -> None:
        if not self.over:
            metrics.REDIS_ERRORS.inc()
            _fail(self.items, TimeoutError())
            self._end()


class _Part:
    """The commands of one flight written to one server: a :class:`~data_plane.ratelimit.resp.Waiter`.

    ``skip`` replies come first for commands sent ahead (``SCRIPT LOAD``), and with ``stride`` 2
    every command was preceded by ``ASKING``."""

    __slots__ = ("address", "flight", "items", "retried", "skip", "stride")

    def __init__(
        self, flight: _Flight, address: Address, items: list[_Item], skip: int, stride: int, retried: bool
    ) -> None:
        self.flight = flight
        self.address = address
        self.items = items
        self.skip = skip
        self.stride = stride
        self.retried = retried

    def replied(self, replies: list[Any]) -> None:
        flight = self.flight
        if flight.over:
            return  # given up on: the replies came too late
        if self.skip or self.stride != 1:
            replies = replies[self.skip + self.stride - 1 :: self.stride]
        again: list[tuple[_Item, ReplyError]] | None = None
        for item, reply in zip(self.items, replies, strict=True):
            fut = item[2]
            if isinstance(reply, ReplyError):
                if not self.retried and str(reply).startswith(("NOSCRIPT", "MOVED", "ASK ")):
                    if again is None:
                        again = []
                    again.append((item, reply))
                elif fut is not None and not fut.done():
                    fut.set_exception(LimiterUnavailable(f"Redis: {reply!r}"))
            elif fut is not None and not fut.done():
                fut.set_result(reply)
        if again:
            flight.backend._again(flight, self.address, again)
        flight.part_done()

    def failed(self, exc: BaseException) -> None:
        flight = self.flight
        if flight.over:
            return
        flight.backend._trip(exc)
        _fail(self.items, exc)
        flight.part_done()


class RedisBackend:
    """Decides limits in Redis with auto-pipelining; owns the connections and their health."""

    def __init__(self, settings: Settings, *, wall_clock: Callable[[], float] = time.time) -> None:
        url = settings.redis_url.reveal()
        options: dict[str, Any] = {"socket_timeout": SOCKET_TIMEOUT_S, "socket_connect_timeout": SOCKET_TIMEOUT_S}
        # redis-py serves the background work (heartbeat, probes, script loads after an outage);
        # decisions go over this backend's own links.
        self._client: aioredis.Redis | RedisCluster
        if settings.redis_cluster:
            self._client = RedisCluster.from_url(url, **options)
        else:
            self._client = aioredis.Redis.from_url(url, health_check_interval=0, **options)
        self._endpoint = Endpoint.from_url(url)
        self._cluster = settings.redis_cluster
        self._timeout = settings.ratelimit_timeout_ms / 1000
        self._late_wait = max(self._timeout, LATE_WAIT_S)
        self._minute_ms = settings.ratelimit_minute_s * 1000
        self._node_id = settings.node_id
        self._wall_clock = wall_clock
        # ``ok`` is the circuit: True while requests may use Redis. It starts closed: the
        # first requests try Redis (and open it if Redis is away); the first probe runs at
        # once. A node that starts must not refuse requests until a probe has run.
        self.ok = True
        self.live_nodes = 1
        self.round_trips = 0
        self.commands = 0
        self._pending: list[_Item] = []
        self._flush_scheduled = False
        self._lazy_flush: asyncio.TimerHandle | None = None
        self._probe: asyncio.Task[bool] | None = None
        self._in_flight = 0
        self._drained: asyncio.Future[None] | None = None
        self._links: dict[Address, Link] = {}
        self._connecting: dict[Address, asyncio.Task[Link]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # Cluster mode: the node of every hash slot (None until read, and after a failure).
        self._slots: list[Address] | None = None
        self._reading_slots: asyncio.Task[list[Address]] | None = None
        # Leases of this worker's requests in flight: lease → (key, acquired at by the wall clock).
        self._leases: dict[str, tuple[str, float]] = {}
        self._recover_callbacks: list[Callable[[], None]] = []
        self._lease_ids = itertools.count()

    # --- decisions ---

    def wire(self, limits: Limits) -> Wire:
        """The encoded commands of ``limits`` (the limiter keeps them with the limits)."""
        return wire(limits, self._minute_ms)

    def next_lease(self) -> str:
        return f"{self._node_id}:{next(self._lease_ids)}"

    async def decide(self, limits: Limits, lease: str) -> Decision:
        if not self.ok:
            raise LimiterUnavailable("the circuit to Redis is open")
        w = limits.wire or self.wire(limits)
        payload = w.decide_head + bulk(lease.encode()) + w.decide_tail if lease else w.decide
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._pending.append((payload, w.slot, fut))
        self._schedule_flush(loop)
        decision = parse_reply(await fut)
        if decision.allowed and limits.max_concurrency:
            self._leases[lease] = (limits.keys[5], self._wall_clock())
        return decision

    def release(self, limits: Limits, lease: str) -> None:
        if self._leases.pop(lease, None) is not None and self.ok:
            # Not lazy: a client that sends its next request the moment this response ends
            # must find the lease given back.
            w = limits.wire or self.wire(limits)
            self._pending.append((w.release_head + bulk(lease.encode()), w.slot, None))
            self._schedule_flush(asyncio.get_running_loop())

    # --- auto-pipelining ---

    def _submit_lazy(self, payload: bytes, slot: int) -> None:
        """Queue a command whose answer nobody waits for: it leaves with the next batch, or
        after :data:`LAZY_FLUSH_S` at the latest."""
        self._pending.append((payload, slot, None))
        if not self._flush_scheduled and self._lazy_flush is None:
            loop = asyncio.get_running_loop()
            self._lazy_flush = loop.call_later(LAZY_FLUSH_S, self._schedule_flush, loop)

    def _schedule_flush(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._flush_scheduled and self._pending and self._in_flight < MAX_IN_FLIGHT:
            self._flush_scheduled = True
            loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._lazy_flush is not None:
            self._lazy_flush.cancel()
            self._lazy_flush = None
        batch, self._pending = self._pending, []
        if not batch:
            return
        now = asyncio.get_running_loop().time()
        flight = _Flight(self, batch, now + self._timeout, now + self._late_wait)
        self._in_flight += 1
        self.commands += len(batch)  # once each, however many times a reload or redirect resends it
        if self._cluster:
            self._route(flight, batch)
        else:
            self._send(flight, self._endpoint.address, batch)

    def _landed(self) -> None:
        self._in_flight -= 1
        if self._in_flight == 0 and self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        self._schedule_flush(asyncio.get_running_loop())

    def _send(
        self,
        flight: _Flight,
        address: Address,
        items: list[_Item],
        *,
        prefix: bytes = b"",
        stride: int = 1,
        retried: bool = False,
    ) -> None:
        """Write ``items`` (after ``prefix``, one command or none) to the server at ``address``."""
        skip = 1 if prefix else 0
        part = _Part(flight, address, items, skip, stride, retried)
        flight.parts += 1
        self.round_trips += 1
        metrics.ROUND_TRIPS.inc()
        if stride == 2:
            payload = prefix + b"".join(ASKING + item[0] for item in items)
        elif len(items) == 1:
            payload = prefix + items[0][0] if prefix else items[0][0]
        else:
            payload = prefix + b"".join([item[0] for item in items])
        count = skip + stride * len(items)
        link = self._links.get(address)
        if link is not None and not link.closed:
            link.send(payload, count, part)
        else:
            self._spawn(self._send_connected(address, payload, count, part))

    async def _send_connected(self, address: Address, payload: bytes, count: int, part: _Part) -> None:
        try:
            link = await self._link(address)
        except (OSError, TimeoutError) as exc:
            part.failed(exc)
            return
        link.send(payload, count, part)

    async def _link(self, address: Address) -> Link:
        """The connection to ``address``, opened once however many batches wait for it."""
        link = self._links.get(address)
        if link is not None and not link.closed:
            return link
        opening = self._connecting.get(address)
        if opening is None:
            opening = self._connecting[address] = asyncio.get_running_loop().create_task(self._open(address))
        return await asyncio.shield(opening)

    async def _open(self, address: Address) -> Link:
        try:
            endpoint = self._endpoint if address == self._endpoint.address else self._endpoint.at(*address)
            async with asyncio.timeout(SOCKET_TIMEOUT_S):
                link = self._links[address] = await connect(endpoint)
            return link
        finally:
            self._connecting.pop(address, None)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _again(self, flight: _Flight, address: Address, refused: list[tuple[_Item, ReplyError]]) -> None:
        """Send once more what was refused for a reason this backend can fix: the script not
        loaded (load it first, on the same connection) or a slot that moved (to its node)."""
        reload: list[_Item] = []
        moved: dict[tuple[Address, bool], list[_Item]] = {}
        slots_moved = False
        for item, reply in refused:
            kind, _, where = str(reply).partition(" ")
            if kind == "NOSCRIPT":
                reload.append(item)
                continue
            slot, _, target = where.partition(" ")  # "MOVED 3999 127.0.0.1:6381"
            host, _, port = target.rpartition(":")
            if not (slot.isdigit() and port.isdigit()):
                _fail([item], reply)
                continue
            to = (host or address[0], int(port))
            if kind == "MOVED" and self._slots is not None:
                self._slots[int(slot) % CLUSTER_SLOTS] = to
                slots_moved = True
            moved.setdefault((to, kind == "ASK"), []).append(item)
        if slots_moved:
            self._spawn(self._reread_slots())  # one slot moved seldom moves alone
        if reload:
            self._send(flight, address, reload, prefix=SCRIPT_LOAD, retried=True)
        for (to, asking), items in moved.items():
            # The node may never have run the script: load it first, in the same round trip.
            self._send(flight, to, items, prefix=SCRIPT_LOAD, stride=2 if asking else 1, retried=True)

    # --- cluster ---

    def _route(self, flight: _Flight, items: list[_Item]) -> None:
        """Send each command to the node that holds its slot (one part per node)."""
        slots = self._slots
        if slots is None:
            flight.parts += 1  # the routing itself, until the slot map is read
            self._spawn(self._route_later(flight, items))
            return
        by_node: dict[Address, list[_Item]] = {}
        for item in items:
            node = slots[item[1]]
            if node in by_node:
                by_node[node].append(item)
            else:
                by_node[node] = [item]
        for node, part in by_node.items():
            self._send(flight, node, part)

    async def _route_later(self, flight: _Flight, items: list[_Item]) -> None:
        try:
            await self._slot_map()
        except (OSError, TimeoutError, RedisError) as exc:
            if not flight.over:
                self._trip(exc)
                _fail(items, exc)
        else:
            if not flight.over:
                self._route(flight, items)
        if not flight.over:
            flight.part_done()

    async def _slot_map(self) -> list[Address]:
        reading = self._reading_slots
        if reading is None or reading.done():
            reading = self._reading_slots = asyncio.get_running_loop().create_task(self._read_slots())
        return await asyncio.shield(reading)

    async def _reread_slots(self) -> None:
        try:
            await self._slot_map()
        except (OSError, TimeoutError, RedisError) as exc:
            log.info("Redis Cluster slot map not read", extra={"error": repr(exc)})

    async def _read_slots(self) -> list[Address]:
        """``CLUSTER SLOTS`` from the first node that answers (the URL's first)."""
        failure: BaseException = LinkClosed("no Redis Cluster node known")
        known = [self._endpoint.address, *(a for a in self._links if a != self._endpoint.address)]
        for address in known:
            try:
                link = await self._link(address)
                async with asyncio.timeout(SOCKET_TIMEOUT_S):
                    (reply,) = await link.call(("CLUSTER", "SLOTS"))
            except (OSError, TimeoutError) as exc:
                failure = exc
                continue
            if isinstance(reply, ReplyError):
                failure = RedisError(f"CLUSTER SLOTS: {reply}")
                continue
            # Slots no node serves go to the first node, which refuses them (CLUSTERDOWN).
            slots = [address] * CLUSTER_SLOTS
            for first, last, primary, *_ in reply:
                host = primary[0].decode() if primary[0] else address[0]
                node = (host, int(primary[1]))
                for slot in range(int(first), int(last) + 1):
                    slots[slot] = node
            self._slots = slots
            return slots
        raise failure

    # --- circuit, heartbeat, leases ---

    def on_recover(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` whenever the circuit closes again (e.g. to drop local state)."""
        self._recover_callbacks.append(callback)

    def _confirm_down(self) -> asyncio.Task[bool] | None:
        """Probe Redis (once at a time) while the circuit is closed; the probe, if any."""
        if self.ok and (self._probe is None or self._probe.done()):
            self._probe = asyncio.get_running_loop().create_task(self.ping())
        return self._probe if self.ok else None

    def _trip(self, exc: BaseException) -> None:
        metrics.REDIS_ERRORS.inc()
        if self._cluster:
            self._slots = None  # a node may have failed over: read the map again
        if self.ok:
            log.warning("Redis unreachable or slow; rate limits fall back", extra={"error": repr(exc)})
            self.ok = False
            metrics.FALLBACK.set(1)
            # Whatever still waits on a connection fails now, not at its deadline.
            links, self._links = list(self._links.values()), {}
            for link in links:
                link.close()

    async def _beat(self) -> None:
        """Heartbeat and learn the live node count (one round trip, bounded)."""
        async with asyncio.timeout(max(self._timeout, SOCKET_TIMEOUT_S)):
            live = await self._client.eval(HEARTBEAT_SCRIPT, 1, NODES_KEY, self._node_id, NODE_TTL_MS)
        self.live_nodes = max(1, int(live))
        metrics.LIVE_NODES.set(self.live_nodes)

    async def ping(self) -> bool:
        """One probe: heartbeat (and load the script when the circuit was open)."""
        was_ok = self.ok
        try:
            await self._beat()
            if not was_ok:
                async with asyncio.timeout(max(self._timeout, SOCKET_TIMEOUT_S)):
                    await self._client.script_load(SCRIPT)
        except (TimeoutError, RedisError, OSError) as exc:
            self._trip(exc)
            return False
        if not was_ok:
            log.info("Redis reachable; rate limits decided in Redis")
            for callback in self._recover_callbacks:
                callback()
            self.ok = True
            metrics.FALLBACK.set(0)
        return True

    def _renew_leases(self) -> None:
        """Push the expiry of every lease held longer than a renewal period (batched)."""
        wall = self._wall_clock()
        by_key: dict[str, list[str]] = {}
        for lease, (key, acquired) in self._leases.items():
            if wall - acquired >= LEASE_RENEW_AGE_S:
                by_key.setdefault(key, []).append(lease)
        for key, leases in by_key.items():
            self._submit_lazy(encode("EVAL", RENEW_SCRIPT, 1, key, LEASE_TTL_MS, *leases), key_slot(key.encode()))

    async def watch_health(self) -> None:
        """Keep the circuit, the heartbeat and the leases current until cancelled."""
        last_renew = time.monotonic()
        while True:
            ok = await self.ping()
            if ok and time.monotonic() - last_renew >= LEASE_RENEW_S:
                last_renew = time.monotonic()
                self._renew_leases()
            await asyncio.sleep(HEARTBEAT_S if ok else PROBE_S)

    async def close(self) -> None:
        """Send what is queued (lease releases), wait for the batches out, close."""
        if self._pending and self.ok:
            self._flush()
        if self._probe is not None:
            await asyncio.gather(self._probe, return_exceptions=True)
        if self._in_flight:
            self._drained = asyncio.get_running_loop().create_future()
            await self._drained
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, *self._connecting.values(), return_exceptions=True)
        for link in self._links.values():
            link.close()
        self._links = {}
        await self._client.aclose()


def _fail(items: list[_Item], exc: BaseException) -> None:
    for _, _, fut in items:
        if fut is not None and not fut.done():
            fut.set_exception(LimiterUnavailable(f"Redis: {exc!r}"))


def parse_reply(reply: list[int]) -> Decision:
    return Decision(
        allowed=reply[0] == 1,
        kind=Kind(reply[1]),
        retry_ms=reply[2],
        remaining=(reply[3], reply[5], reply[7], reply[9], reply[11]),
        reset_ms=(reply[4], reply[6], reply[8], reply[10], reply[12]),
    )

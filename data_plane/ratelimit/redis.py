"""The Redis backend of the rate limiter. redis-py is used only here; its errors are mapped here.

One request costs one ``EVALSHA`` of ``decide.lua`` (every limit at once, on Redis time), and
the commands of all requests that arrive within one event-loop tick — decisions, lease
releases, lease renewals — travel in one pipelined round trip (per cluster node with
``TENANTGATE_REDIS_CLUSTER=1``). The script is loaded once and reloaded on ``NOSCRIPT``.

Failure handling is a circuit: a batch that errors opens it. A batch that exceeds
``RATELIMIT_TIMEOUT_MS`` starts a probe: a late answer is more often this worker's own busy
loop than a slow Redis, and a batch given up on may still have been counted in Redis, so the
batch keeps waiting (up to :data:`LATE_WAIT_S`) unless the probe finds Redis gone, which opens
the circuit and fails the batch at once. While the circuit is open no request touches Redis
(the limiter falls back at once);
:meth:`RedisBackend.watch_health` probes in the background and closes it when Redis answers.
The same loop keeps this worker's heartbeat in Redis (``tenantgate:nodes``, a sorted set of
node id → expiry) so every worker knows how many live nodes share a limit when it has to
fall back, and renews the concurrency leases of requests still in flight.

Sliding windows: N+1 sub-buckets per window (N = 120, so 0.5 s buckets for a minute, 30 s
for an hour). A window never admits more than its limit in any interval of its nominal
length (no over-admission at all, unlike the weighted two-window estimate, which can admit
up to twice the limit in the worst case); the price is that the counted span is up to one bucket longer
than the window, so a client pacing exactly at the limit is admitted at least N/(N+1) of it
(worst case 0.83% fewer).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import time
from collections.abc import Callable, Coroutine
from importlib import resources
from typing import Any, Final

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError, RedisError

from data_plane.ratelimit import metrics
from data_plane.ratelimit.base import Decision, Kind, LimiterUnavailable, Limits
from shared.settings import Settings

log = logging.getLogger(__name__)

SCRIPT: Final = resources.files("data_plane.ratelimit").joinpath("decide.lua").read_text()
SCRIPT_SHA: Final = hashlib.sha1(SCRIPT.encode()).hexdigest()  # noqa: S324 - Redis names scripts by SHA-1

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

_Pending = tuple[tuple[Any, ...], "asyncio.Future[Any] | None"]


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


class RedisBackend:
    """Decides limits in Redis with auto-pipelining; owns the connection and its health."""

    def __init__(self, settings: Settings, *, wall_clock: Callable[[], float] = time.time) -> None:
        url = settings.redis_url.reveal()
        options: dict[str, Any] = {"socket_timeout": SOCKET_TIMEOUT_S, "socket_connect_timeout": SOCKET_TIMEOUT_S}
        self._client: aioredis.Redis | RedisCluster
        if settings.redis_cluster:
            self._client = RedisCluster.from_url(url, **options)
        else:
            self._client = aioredis.Redis.from_url(url, health_check_interval=0, **options)
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
        self._pending: list[_Pending] = []
        self._flush_scheduled = False
        self._lazy_flush: asyncio.TimerHandle | None = None
        self._probe: asyncio.Task[bool] | None = None
        self._in_flight: set[asyncio.Task[None]] = set()
        # Leases of this worker's requests in flight: lease → (key, acquired at by the wall clock).
        self._leases: dict[str, tuple[str, float]] = {}
        self._recover_callbacks: list[Callable[[], None]] = []
        self._lease_ids = itertools.count()

    # --- decisions ---

    def next_lease(self) -> str:
        return f"{self._node_id}:{next(self._lease_ids)}"

    async def decide(self, limits: Limits, lease: str) -> Decision:
        if not self.ok:
            raise LimiterUnavailable("the circuit to Redis is open")
        fut = self._submit(
            (
                "EVALSHA",
                SCRIPT_SHA,
                6,
                *limits.keys,
                limits.per_minute,
                limits.per_hour,
                limits.route_limit,
                limits.burst,
                limits.monthly_quota,
                limits.max_concurrency,
                lease,
                LEASE_TTL_MS,
                self._minute_ms,
                0,
            )
        )
        reply = await fut
        decision = parse_reply(reply)
        if decision.allowed and limits.max_concurrency:
            self._leases[lease] = (limits.keys[5], self._wall_clock())
        return decision

    def release(self, limits: Limits, lease: str) -> None:
        if self._leases.pop(lease, None) is not None and self.ok:
            # Not lazy: a client that sends its next request the moment this response ends
            # must find the lease given back.
            self._pending.append((("ZREM", limits.keys[5], lease), None))
            self._schedule_flush(asyncio.get_running_loop())

    # --- auto-pipelining ---

    def _submit(self, args: tuple[Any, ...]) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._pending.append((args, fut))
        self._schedule_flush(loop)
        return fut

    def _submit_lazy(self, args: tuple[Any, ...]) -> None:
        """Queue a command whose answer nobody waits for: it leaves with the next batch, or
        after :data:`LAZY_FLUSH_S` at the latest."""
        self._pending.append((args, None))
        if not self._flush_scheduled and self._lazy_flush is None:
            loop = asyncio.get_running_loop()
            self._lazy_flush = loop.call_later(LAZY_FLUSH_S, self._schedule_flush, loop)

    def _schedule_flush(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._flush_scheduled and self._pending and len(self._in_flight) < MAX_IN_FLIGHT:
            self._flush_scheduled = True
            loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._lazy_flush is not None:
            self._lazy_flush.cancel()
            self._lazy_flush = None
        batch, self._pending = self._pending, []
        if batch:
            loop = asyncio.get_running_loop()
            now = loop.time()
            task = loop.create_task(self._send(batch, now + self._timeout, now + self._late_wait))
            self._in_flight.add(task)
            task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        self._schedule_flush(asyncio.get_running_loop())

    async def _send(self, batch: list[_Pending], deadline: float, late_deadline: float) -> None:
        started = time.perf_counter()
        try:
            replies = await self._within(self._execute_reloading(batch), deadline, late_deadline)
        except TimeoutError as exc:
            metrics.REDIS_ERRORS.inc()
            _fail(batch, exc)
            return
        except (RedisError, OSError) as exc:
            self._trip(exc)
            _fail(batch, exc)
            return
        metrics.REDIS_SECONDS.observe(time.perf_counter() - started)
        metrics.BATCH_SIZE.observe(len(batch))
        for (_, fut), reply in zip(batch, replies, strict=True):
            if fut is None or fut.done():
                continue
            if isinstance(reply, Exception):
                fut.set_exception(LimiterUnavailable(f"Redis: {reply!r}"))
            else:
                fut.set_result(reply)

    async def _execute_reloading(self, batch: list[_Pending]) -> list[Any]:
        replies = await self._execute(batch)
        retry = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if retry:
            await self._client.script_load(SCRIPT)
            again = await self._execute([batch[i] for i in retry])
            for i, reply in zip(retry, again, strict=True):
                replies[i] = reply
        return replies

    async def _execute(self, batch: list[_Pending]) -> list[Any]:
        pipe = self._client.pipeline(transaction=False)
        for args, _ in batch:
            pipe.execute_command(*args)
        self.round_trips += 1
        self.commands += len(batch)
        metrics.ROUND_TRIPS.inc()
        replies: list[Any] = await pipe.execute(raise_on_error=False)
        return replies

    # --- circuit, heartbeat, leases ---

    def on_recover(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` whenever the circuit closes again (e.g. to drop local state)."""
        self._recover_callbacks.append(callback)

    def _confirm_down(self) -> asyncio.Task[bool] | None:
        """Probe Redis (once at a time) while the circuit is closed; the probe, if any."""
        if self.ok and (self._probe is None or self._probe.done()):
            self._probe = asyncio.get_running_loop().create_task(self.ping())
        return self._probe if self.ok else None

    async def _within(self, work: Coroutine[Any, Any, list[Any]], deadline: float, late_deadline: float) -> list[Any]:
        """``await work``: by ``deadline`` (loop time) as a rule; past it, while a probe finds
        Redis reachable, until ``late_deadline``; else TimeoutError (the work is cancelled).

        An answer that arrived by the deadline but was not read yet — because this worker's
        loop was busy and runs the timer in the same turn as the socket — still counts: the
        deadline gives the reading task a couple of loop turns first."""
        loop = asyncio.get_running_loop()
        task = loop.create_task(work)
        try:
            await asyncio.wait((task,), timeout=max(0.0, deadline - loop.time()))
            for _ in range(GRACE_TURNS):
                if task.done():
                    return task.result()
                await asyncio.sleep(0)
            probe = self._confirm_down()
            while not task.done() and self.ok and loop.time() < late_deadline:
                waiting: set[asyncio.Future[Any]] = {task}
                if probe is not None and not probe.done():
                    waiting.add(probe)
                await asyncio.wait(waiting, timeout=late_deadline - loop.time(), return_when=asyncio.FIRST_COMPLETED)
                probe = None
            if not task.done():
                raise TimeoutError
            return task.result()
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task

    def _trip(self, exc: BaseException) -> None:
        metrics.REDIS_ERRORS.inc()
        if self.ok:
            log.warning("Redis unreachable or slow; rate limits fall back", extra={"error": repr(exc)})
            self.ok = False
            metrics.FALLBACK.set(1)

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
            self._submit_lazy(("EVAL", RENEW_SCRIPT, 1, key, LEASE_TTL_MS, *leases))

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
            await asyncio.gather(*self._in_flight, return_exceptions=True)
        await self._client.aclose()


def _fail(batch: list[_Pending], exc: BaseException) -> None:
    for _, fut in batch:
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

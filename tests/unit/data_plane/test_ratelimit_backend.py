"""RedisBackend and RateLimiter against the real local Redis: auto-pipelining, script reload,
the circuit and the fallbacks, headers, and the local limiter on a fixed clock."""

from __future__ import annotations

import asyncio
import socket
import uuid

import pytest
import redis

from data_plane.errors import ServiceUnavailable, TooManyRequests
from data_plane.ratelimit import limiter as rl
from data_plane.ratelimit.base import MINUTE, Kind, LimiterUnavailable, Limits
from data_plane.ratelimit.local import LocalBackend
from data_plane.ratelimit.redis import SCRIPT, RedisBackend
from data_plane.router import Router
from shared import settings as tg_settings
from shared.settings import Settings
from shared.snapshot import Route, Tenant, Upstream

pytestmark = pytest.mark.unit


def _settings(redis_url: str, **env: str) -> Settings:
    return tg_settings.load(environ={"TENANTGATE_REDIS_URL": redis_url, "TENANTGATE_NODE_ID": "unit-1", **env})


def _tenant(**limits: int) -> Tenant:
    values = {"rate_limit_per_minute": 0, "rate_limit_per_hour": 0, "monthly_quota": 0, "max_concurrency": 0}
    values.update(limits)
    return Tenant(id=uuid.uuid4().hex, name="t", tier="free", is_active=True, **values)


def _route(rate_limit: int = 0, burst: int = 0) -> Route:
    return Route(
        id="route-1",
        path="/x/*",
        methods=("GET",),
        upstreams=(Upstream("http://127.0.0.1:1", 1),),
        auth_required=True,
        rate_limit=rate_limit,
        timeout_ms=1000,
        strip_prefix=False,
        priority=0,
        burst=burst,
    )


def _limits(limiter: rl.RateLimiter, tenant: Tenant, route: Route | None = None) -> Limits:
    compiled = Router((route or _route(),)).match("/x/y", "GET", "", {})
    assert compiled is not None
    limits = limiter.limits_for(object(), compiled.route, tenant)
    assert limits is not None
    return limits


def _dead_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_concurrent_decisions_share_round_trips(redis_url: str) -> None:
    # A generous timeout: on a busy machine a batch may wait for the loop, which is no failure.
    settings = _settings(redis_url, TENANTGATE_RATELIMIT_TIMEOUT_MS="2000")
    backend = RedisBackend(settings)
    assert await backend.ping()
    limiter = rl.RateLimiter(settings, backend)
    limits = _limits(limiter, _tenant(rate_limit_per_minute=1000, rate_limit_per_hour=10_000, max_concurrency=500))
    try:
        for _ in range(5):  # five waves of 100 concurrent requests
            admissions = await asyncio.gather(*(limiter.admit(limits) for _ in range(100)))
            for admission in admissions:
                limiter.release(admission)
    finally:
        await backend.close()  # sends the releases still queued
    # 500 decisions and 500 lease releases.
    assert backend.commands == 1000
    assert backend.round_trips / 500 < 0.1


async def test_the_script_is_loaded_again_after_a_flush(redis_url: str) -> None:
    backend = RedisBackend(_settings(redis_url))
    assert await backend.ping()
    limiter = rl.RateLimiter(_settings(redis_url), backend)
    limits = _limits(limiter, _tenant(rate_limit_per_minute=5))
    try:
        await limiter.admit(limits)
        redis.Redis.from_url(redis_url).script_flush()
        admission = await limiter.admit(limits)
    finally:
        await backend.close()
    assert dict(admission.headers)["RateLimit"] == f'"minute";r=3;t={dict(admission.headers)["X-RateLimit-Reset"]}'
    assert backend.ok


async def test_headers_on_admission_and_refusal(redis_url: str) -> None:
    backend = RedisBackend(_settings(redis_url))
    assert await backend.ping()
    limiter = rl.RateLimiter(_settings(redis_url), backend)
    limits = _limits(limiter, _tenant(rate_limit_per_minute=2, rate_limit_per_hour=100), _route(rate_limit=50))
    try:
        first = dict((await limiter.admit(limits)).headers)
        await limiter.admit(limits)
        with pytest.raises(TooManyRequests) as refused:
            await limiter.admit(limits)
    finally:
        await backend.close()
    assert first["RateLimit-Policy"] == '"minute";q=2;w=60, "hour";q=100;w=3600, "route";q=50;w=60'
    assert first["RateLimit"].startswith('"minute";r=1;t=6')
    assert (first["X-RateLimit-Limit"], first["X-RateLimit-Remaining"]) == ("2", "1")
    headers = dict(refused.value.headers)
    assert refused.value.code == "rate_limited"
    assert headers["X-RateLimit-Remaining"] == "0"
    assert 60 <= int(headers["Retry-After"]) <= 61
    assert headers["X-RateLimit-Reset"] == headers["Retry-After"]


async def test_open_mode_falls_back_to_the_local_limiter_at_once(redis_url: str) -> None:
    dead = f"redis://127.0.0.1:{_dead_port()}/0"
    settings = _settings(dead, TENANTGATE_RATELIMIT_TIMEOUT_MS="20")
    backend = RedisBackend(settings)
    assert not await backend.ping()
    limiter = rl.RateLimiter(settings, backend)
    limits = _limits(limiter, _tenant(rate_limit_per_minute=3))
    try:
        admitted = 0
        for _ in range(5):
            try:
                await limiter.admit(limits)
                admitted += 1
            except TooManyRequests:
                pass
    finally:
        await backend.close()
    assert limiter.mode == "local"
    assert admitted == 3


async def test_closed_mode_answers_503_without_redis(redis_url: str) -> None:
    dead = f"redis://127.0.0.1:{_dead_port()}/0"
    settings = _settings(dead, TENANTGATE_RATELIMIT_FAILURE_MODE="closed")
    backend = RedisBackend(settings)
    await backend.ping()
    limiter = rl.RateLimiter(settings, backend)
    try:
        with pytest.raises(ServiceUnavailable) as refused:
            await limiter.admit(_limits(limiter, _tenant(rate_limit_per_minute=3)))
    finally:
        await backend.close()
    assert limiter.mode == "closed"
    assert dict(refused.value.headers) == {"Retry-After": "1"}


async def test_a_silent_redis_opens_the_circuit_within_the_timeout() -> None:
    # A server that accepts connections and never answers: Redis hung.
    accepted: list[asyncio.StreamWriter] = []
    silent = await asyncio.start_server(lambda _, writer: accepted.append(writer), "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    backend = RedisBackend(_settings(f"redis://127.0.0.1:{port}/0", TENANTGATE_RATELIMIT_TIMEOUT_MS="30"))
    backend.ok = True  # as if it had answered until now
    limiter = rl.RateLimiter(_settings(f"redis://127.0.0.1:{port}/0"), backend)
    limits = _limits(limiter, _tenant(rate_limit_per_minute=100))
    try:
        with pytest.raises(LimiterUnavailable):
            await backend.decide(limits, "")
        # Late once: a probe must find Redis silent too before the circuit opens.
        async with asyncio.timeout(5):
            while backend.ok:
                await asyncio.sleep(0.01)
        sent = backend.round_trips
        with pytest.raises(LimiterUnavailable):  # while the circuit is open, nothing is sent
            await backend.decide(limits, "")
        assert backend.round_trips == sent
        assert limiter.mode == "local"
    finally:
        await backend.close()
        for writer in accepted:
            writer.close()
        silent.close()
        await silent.wait_closed()


async def _delaying_proxy(target: tuple[str, int], delay_s: float) -> asyncio.Server:
    """A TCP relay to Redis that holds every answer back ``delay_s``: a slow but healthy Redis."""

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
        try:
            while data := await reader.read(65536):
                if delay:
                    await asyncio.sleep(delay)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def serve(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        redis_r, redis_w = await asyncio.open_connection(*target)
        await asyncio.gather(relay(client_r, redis_w, 0.0), relay(redis_r, client_w, delay_s))

    return await asyncio.start_server(serve, "127.0.0.1", 0)


async def test_a_late_answer_from_a_reachable_redis_still_decides(redis_url: str) -> None:
    # Answers arrive 60 ms after they are asked for, past RATELIMIT_TIMEOUT_MS=10: late, but
    # Redis is there. Giving up would decide locally what Redis may already have counted; the
    # decision waits instead (a probe finds Redis reachable).
    parts = redis_url.removeprefix("redis://").split("/")
    host, port = parts[0].split(":")
    proxy = await _delaying_proxy((host, int(port)), 0.06)
    slow_url = f"redis://127.0.0.1:{proxy.sockets[0].getsockname()[1]}/{parts[1]}"
    backend = RedisBackend(_settings(slow_url, TENANTGATE_RATELIMIT_TIMEOUT_MS="10"))
    limiter = rl.RateLimiter(_settings(slow_url), backend)
    limits = _limits(limiter, _tenant(rate_limit_per_minute=2))
    redis.Redis.from_url(redis_url).script_load(SCRIPT)
    try:
        # Two pooled connections, set up before the clock matters: one for decisions, one for probes.
        assert all(await asyncio.gather(backend.ping(), backend.ping()))
        decisions = [await backend.decide(limits, backend.next_lease()) for _ in range(3)]
        assert [d.allowed for d in decisions] == [True, True, False]
        assert backend.ok and limiter.mode == "redis"
    finally:
        await backend.close()
        proxy.close()
        await proxy.wait_closed()


async def test_a_probe_that_reaches_redis_closes_the_circuit(redis_url: str) -> None:
    backend = RedisBackend(_settings(redis_url))
    limiter = rl.RateLimiter(_settings(redis_url), backend)
    recovered: list[bool] = []
    backend.on_recover(lambda: recovered.append(True))
    backend.ok = False  # as after a failure
    try:
        assert limiter.mode == "local"
        assert await backend.ping()
        assert limiter.mode == "redis"
        assert recovered == [True]
        assert backend.live_nodes >= 1
    finally:
        await backend.close()


def test_local_limiter_shares_the_limit_among_live_nodes() -> None:
    now = [1000.0]
    local = LocalBackend(60, lambda: 3, clock=lambda: now[0])
    limiter_limits = Limits(
        tenant_id="t",
        route_id="r",
        per_minute=30,
        per_hour=0,
        route_limit=0,
        burst=0,
        monthly_quota=0,
        max_concurrency=2,
        keys=("a", "b", "c", "d", "e", "f"),
        policies=(),
        policy_header="",
    )
    decisions = [local.decide_now(limiter_limits) for _ in range(3)]
    assert [d.allowed for d in decisions] == [True, False, False]
    assert decisions[1].kind == Kind.CONCURRENCY  # 2 ÷ 3 nodes → 1 in flight here
    local.release(limiter_limits, "")
    admitted = 0
    for _ in range(20):
        if local.decide_now(limiter_limits).allowed:
            admitted += 1
            local.release(limiter_limits, "")
    assert admitted == 9  # 30 ÷ 3 nodes = 10 a minute here, one of them taken above
    now[0] += 61
    assert local.decide_now(limiter_limits).remaining[MINUTE] == 9


async def test_leases_of_long_requests_are_renewed(redis_url: str) -> None:
    wall = [1000.0]
    settings = _settings(redis_url)
    backend = RedisBackend(settings, wall_clock=lambda: wall[0])
    assert await backend.ping()
    limiter = rl.RateLimiter(settings, backend)
    limits = _limits(limiter, _tenant(max_concurrency=5))
    client = redis.Redis.from_url(redis_url)
    try:
        admission = await limiter.admit(limits)
        first = client.zscore(limits.keys[5], admission.lease)
        assert first is not None
        backend._renew_leases()  # held for no time yet: nothing to renew
        client.zadd(limits.keys[5], {admission.lease: 1})  # about to expire
        wall[0] += 2  # the request is still in flight two seconds later
        backend._renew_leases()
    finally:
        await backend.close()
    renewed = client.zscore(limits.keys[5], admission.lease)
    client.close()
    assert renewed is not None and renewed >= first


def test_a_fallback_starts_from_what_redis_admitted_here() -> None:
    now = [50.0]
    local = LocalBackend(60, lambda: 2, clock=lambda: now[0])
    limits = Limits(
        tenant_id="t",
        route_id="r",
        per_minute=20,
        per_hour=0,
        route_limit=0,
        burst=0,
        monthly_quota=0,
        max_concurrency=0,
        keys=("a", "b", "c", "d", "e", "f"),
        policies=(),
        policy_header="",
    )
    for _ in range(7):  # admitted by Redis on this node while it was up
        local.record(limits)
    local.clear()  # Redis went and came back: the windows are kept
    assert sum(local.decide_now(limits).allowed for _ in range(10)) == 3  # 20 ÷ 2 nodes, 7 used

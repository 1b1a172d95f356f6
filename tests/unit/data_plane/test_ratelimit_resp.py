"""The limiter's own Redis connection (resp.Link) and its prebuilt commands, against the real
local Redis: replies in order however the bytes are cut, set-up from the URL (password,
database), a lost connection failing what waits on it, and the encoded commands byte for byte
what a Redis client would send."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import hiredis
import pytest
import redis

from data_plane.ratelimit import limiter as rl
from data_plane.ratelimit.base import MINUTE, LimiterUnavailable
from data_plane.ratelimit.redis import LEASE_TTL_MS, SCRIPT, SCRIPT_SHA, RedisBackend
from data_plane.ratelimit.resp import Endpoint, Link, LinkClosed, ReplyError, bulk, connect
from data_plane.router import Router
from shared import settings as tg_settings
from shared.snapshot import Route, Tenant, Upstream

pytestmark = pytest.mark.unit


class Collect:
    def __init__(self) -> None:
        self.future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()

    def replied(self, replies: list[Any]) -> None:
        self.future.set_result(replies)

    def failed(self, exc: BaseException) -> None:
        self.future.set_exception(exc)


def _host_port_db(redis_url: str) -> tuple[str, int, int]:
    address, db = redis_url.removeprefix("redis://").split("/")
    host, port = address.split(":")
    return host, int(port), int(db)


async def _trickle_proxy(target: tuple[str, int]) -> asyncio.Server:
    """A TCP relay that hands Redis's answers on one byte at a time."""

    async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, piecewise: bool) -> None:
        try:
            while data := await reader.read(65536):
                for piece in [data[i : i + 1] for i in range(len(data))] if piecewise else [data]:
                    writer.write(piece)
                    await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def serve(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        redis_r, redis_w = await asyncio.open_connection(*target)
        await asyncio.gather(pump(client_r, redis_w, False), pump(redis_r, client_w, True))

    return await asyncio.start_server(serve, "127.0.0.1", 0)


@pytest.fixture
async def trickle(redis_url: str) -> AsyncIterator[str]:
    host, port, db = _host_port_db(redis_url)
    proxy = await _trickle_proxy((host, port))
    try:
        yield f"redis://127.0.0.1:{proxy.sockets[0].getsockname()[1]}/{db}"
    finally:
        proxy.close()
        await proxy.wait_closed()


async def test_pipelined_replies_reach_each_waiter_in_order_however_the_bytes_are_cut(trickle: str) -> None:
    async with asyncio.timeout(10):  # SELECT of the test's database, byte by byte too
        link = await connect(Endpoint.from_url(trickle))
    key = f"resp-{uuid.uuid4().hex}"
    try:
        first, second = Collect(), Collect()
        link.send(b"".join(hiredis.pack_command(c) for c in (("SET", key, "v" * 300), ("GET", key))), 2, first)
        link.send(hiredis.pack_command(("INCRBY", key, 1)) + hiredis.pack_command(("DEL", key)), 2, second)
        async with asyncio.timeout(10):
            assert await first.future == [b"OK", b"v" * 300]
            incr, deleted = await second.future
    finally:
        link.close()
    assert isinstance(incr, ReplyError) and "not an integer" in str(incr)
    assert deleted == 1


async def test_the_url_sets_user_password_and_database(redis_url: str) -> None:
    host, port, db = _host_port_db(redis_url)
    admin = redis.Redis(host=host, port=port)
    user, password = f"tg-test-{uuid.uuid4().hex[:12]}", uuid.uuid4().hex
    admin.acl_setuser(user, enabled=True, passwords=[f"+{password}"], keys=["*"], commands=["+@all"])
    key = f"resp-{uuid.uuid4().hex}"
    try:
        async with asyncio.timeout(10):
            link = await connect(Endpoint.from_url(f"redis://{user}:{password}@{host}:{port}/{db}"))
        try:
            assert await link.call(("SET", key, "here")) == [b"OK"]
        finally:
            link.close()
        assert redis.Redis(host=host, port=port, db=db).get(key) == b"here"  # on the URL's database
        with pytest.raises(LinkClosed, match="refused"):
            async with asyncio.timeout(10):
                await connect(Endpoint.from_url(f"redis://{user}:wrong@{host}:{port}/{db}"))
    finally:
        admin.acl_deluser(user)
        redis.Redis(host=host, port=port, db=db).delete(key)
        admin.close()


def test_an_endpoint_never_shows_its_password() -> None:
    endpoint = Endpoint.from_url("redis://u:s3cret@redis.internal:6380/2")
    assert (endpoint.host, endpoint.port, endpoint.db, endpoint.username) == ("redis.internal", 6380, 2, "u")
    assert "s3cret" not in repr(endpoint)
    assert Endpoint.from_url("rediss://:pw@redis.internal:6380/0").ssl is not None
    assert Endpoint.from_url("unix:///run/redis.sock?db=3").path == "/run/redis.sock"


async def test_a_lost_connection_fails_what_waits_and_opens_the_circuit() -> None:
    # A server that reads the first command and hangs up without answering.
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    url = f"redis://127.0.0.1:{server.sockets[0].getsockname()[1]}/0"
    settings = tg_settings.load(environ={"TENANTGATE_REDIS_URL": url, "TENANTGATE_NODE_ID": "unit-1"})
    backend = RedisBackend(settings)  # circuit closed, as at start
    limiter = rl.RateLimiter(settings, backend)
    limits = limiter.limits_for(object(), _route(), _tenant())
    assert limits is not None
    try:
        async with asyncio.timeout(5):  # well before the 0.5 s a silent Redis would get
            with pytest.raises(LimiterUnavailable, match="LinkClosed"):
                await backend.decide(limits, "")
        assert not backend.ok
    finally:
        await backend.close()
        server.close()
        await server.wait_closed()


def _tenant() -> Tenant:
    return Tenant(uuid.uuid4().hex, "t", "free", 7, 70, 700, 3, True)


def _route() -> Any:
    route = Route(
        id="route-1",
        path="/x/*",
        methods=("GET",),
        upstreams=(Upstream("http://127.0.0.1:1", 1),),
        auth_required=True,
        rate_limit=50,
        timeout_ms=1000,
        strip_prefix=False,
        priority=0,
        burst=5,
    )
    match = Router((route,)).match("/x/y", "GET", "", {})
    assert match is not None
    return match.route


async def test_the_prebuilt_commands_are_what_a_redis_client_sends() -> None:
    settings = tg_settings.load(environ={"TENANTGATE_REDIS_URL": "redis://127.0.0.1:1/0", "TENANTGATE_NODE_ID": "n"})
    backend = RedisBackend(settings)
    limits = rl.RateLimiter(settings, backend).limits_for(object(), _route(), _tenant())
    await backend.close()
    assert limits is not None and limits.wire is not None
    w = limits.wire
    args = (limits.per_minute, limits.per_hour, limits.route_limit, limits.burst, limits.monthly_quota, 3)
    assert args == (7, 70, 50, 5, 700, 3)
    for lease in ("n:0", "", "n:123456789"):
        sent = w.decide_head + bulk(lease.encode()) + w.decide_tail if lease else w.decide
        expected = hiredis.pack_command(("EVALSHA", SCRIPT_SHA, 6, *limits.keys, *args, lease, LEASE_TTL_MS, 60_000, 0))
        assert sent == expected
    assert w.release_head + bulk(b"n:7") == hiredis.pack_command(("ZREM", limits.keys[5], "n:7"))
    assert w.slot == redis.crc.key_slot(limits.keys[5].encode())


async def test_a_link_refuses_to_send_once_closed() -> None:
    link = Link()
    waiter = Collect()
    link.close()
    link.send(b"*1\r\n$4\r\nPING\r\n", 1, waiter)
    with pytest.raises(LinkClosed):
        await waiter.future


def test_decisions_on_uvloop(redis_url: str) -> None:
    # The data plane runs on uvloop, whose transports are not asyncio's classes.
    import uvloop

    async def decide() -> list[bool]:
        settings = tg_settings.load(environ={"TENANTGATE_REDIS_URL": redis_url, "TENANTGATE_NODE_ID": "unit-uv"})
        backend = RedisBackend(settings)
        limiter = rl.RateLimiter(settings, backend)
        limits = limiter.limits_for(object(), _route(), _tenant())
        assert limits is not None
        try:
            async with asyncio.timeout(10):
                admitted = []
                for _ in range(4):  # a concurrency limit of 3: one lease more than allowed
                    try:
                        admitted.append(await limiter.admit(limits))
                    except rl.TooManyRequests:
                        admitted.append(None)
                for admission in admitted:
                    if admission is not None:
                        limiter.release(admission)
        finally:
            await backend.close()
        assert backend.ok and limiter.mode == "redis"
        return [admission is not None for admission in admitted]

    assert uvloop.run(decide()) == [True, True, True, False]


async def test_a_batch_given_up_on_leaves_the_connection_in_step(redis_url: str) -> None:
    # The limiter's connection (the first one made) gets its first decision's answer 0.7 s
    # late — past the 0.5 s a late batch may wait while a probe (its own connection, prompt)
    # finds Redis reachable. The next decision on the same connection must get its own answer.
    host, port, db = _host_port_db(redis_url)
    connections = 0

    async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, late_chunk: int) -> None:
        chunk = 0
        try:
            while data := await reader.read(65536):
                if chunk == late_chunk:
                    await asyncio.sleep(0.7)
                chunk += 1
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def serve(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        redis_r, redis_w = await asyncio.open_connection(host, port)
        # Chunk 0 answers the SELECT; chunk 1, the first decision.
        await asyncio.gather(pump(client_r, redis_w, -1), pump(redis_r, client_w, 1 if connections == 1 else -1))

    proxy = await asyncio.start_server(serve, "127.0.0.1", 0)
    url = f"redis://127.0.0.1:{proxy.sockets[0].getsockname()[1]}/{db}"
    settings = tg_settings.load(
        environ={"TENANTGATE_REDIS_URL": url, "TENANTGATE_NODE_ID": "unit-1", "TENANTGATE_RATELIMIT_TIMEOUT_MS": "20"}
    )
    backend = RedisBackend(settings)
    limiter = rl.RateLimiter(settings, backend)
    tenant = Tenant(uuid.uuid4().hex, "t", "free", 2, 0, 0, 0, True)
    limits = limiter.limits_for(object(), _route(), tenant)
    assert limits is not None
    redis.Redis(host=host, port=port, db=db).script_load(SCRIPT)
    try:
        async with asyncio.timeout(10):
            with pytest.raises(LimiterUnavailable, match="TimeoutError"):
                await backend.decide(limits, "")
            assert backend.ok  # late, not gone: the circuit stays closed
            second = await backend.decide(limits, "")
    finally:
        await backend.close()
        proxy.close()
        await proxy.wait_closed()
    # The first decision counted in Redis although nobody waited for it; this answer is the
    # second's own (a connection out of step would hand it the first's: one remaining).
    assert second.allowed and second.remaining[MINUTE] == 0

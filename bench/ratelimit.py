"""Cost of the limits stage: ``python -m bench.ratelimit [--duration S] [--redis-url URL]``.

Runs :meth:`data_plane.ratelimit.limiter.RateLimiter.admit` and ``release`` — what the
pipeline calls — against a real Redis on uvloop, with every limit set (per minute, per hour,
route limit with a burst bucket, monthly quota, concurrency; all far above what is sent so
every request is admitted and takes and gives back a lease), from 1, 50 and 100 concurrent
clients spread over 50 tenants. Prints, per concurrency: decisions per second, Redis round
trips per request (decisions and lease releases share them), and the decision's p50/p99/p99.9
latency as the request sees it (queueing for its batch included), and this process's CPU
time per decision (the limiter's own work plus the client loop: steadier than latency on a
busy machine).

Two loads: ``closed`` (each client decides again as soon as it has an answer: the most the
limiter does, Redis saturated) and ``paced`` (``--rate`` decisions per second in all, spread
over the clients: the latency at a load a data plane worker really sees).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from collections.abc import Sequence
from typing import Any

from bench.gateway import claim_redis
from data_plane.ratelimit.base import Limits
from data_plane.ratelimit.limiter import RateLimiter
from data_plane.ratelimit.redis import RedisBackend
from data_plane.router import Router
from shared import settings as tg_settings
from shared.snapshot import Route, Tenant, Upstream

TENANTS = 50
HIGH = 1_000_000_000


def _limits(limiter: RateLimiter) -> list[Limits]:
    route = Route(
        id="bench-route",
        path="/b/*",
        methods=("GET",),
        upstreams=(Upstream("http://127.0.0.1:1", 1),),
        auth_required=True,
        rate_limit=HIGH,
        timeout_ms=1000,
        strip_prefix=False,
        priority=0,
        burst=HIGH,
    )
    match = Router((route,)).match("/b/x", "GET", "", {})
    assert match is not None
    snap = object()
    out = []
    for _ in range(TENANTS):
        tenant = Tenant(uuid.uuid4().hex, "bench", "enterprise", HIGH, HIGH, HIGH, 100_000, True)
        limits = limiter.limits_for(snap, match.route, tenant)
        assert limits is not None
        out.append(limits)
    return out


async def _run(redis_url: str, clients: int, duration: float, rate: float) -> dict[str, Any]:
    environ = {"TENANTGATE_REDIS_URL": redis_url, "TENANTGATE_NODE_ID": f"bench-{clients}"}
    settings = tg_settings.load(environ=environ)
    backend = RedisBackend(settings)
    if not await backend.ping():
        raise SystemExit(f"Redis at {redis_url} does not answer")
    limiter = RateLimiter(settings, backend)
    tenants = _limits(limiter)
    latencies: list[float] = []
    stop = time.perf_counter() + duration

    interval = clients / rate if rate else 0.0

    async def client(index: int) -> None:
        limits = tenants[index % TENANTS]
        next_at = time.perf_counter() + interval * index / clients
        while time.perf_counter() < stop:
            if interval:
                await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
                next_at += interval
            started = time.perf_counter()
            admission = await limiter.admit(limits)
            latencies.append(time.perf_counter() - started)
            limiter.release(admission)

    cpu = time.process_time()
    await asyncio.gather(*(client(i) for i in range(clients)))  # warm-up round trip included
    cpu = time.process_time() - cpu
    trips, commands = backend.round_trips, backend.commands
    await backend.close()
    latencies.sort()
    count = len(latencies)
    return {
        "load": f"paced {rate:g}/s" if rate else "closed",
        "clients": clients,
        "decisions": count,
        "decisions_per_s": round(count / duration),
        "round_trips_per_request": round(trips / count, 3),
        "commands_per_round_trip": round(commands / trips, 1),
        "fallbacks": limiter.mode != "redis",
        "cpu_us_per_decision": round(cpu / count * 1e6, 1),
        "p50_ms": round(latencies[count // 2] * 1000, 3),
        "p99_ms": round(latencies[min(count - 1, int(count * 0.99))] * 1000, 3),
        "p999_ms": round(latencies[min(count - 1, int(count * 0.999))] * 1000, 3),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ratelimit")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per concurrency level")
    parser.add_argument("--redis-url", default=None, help="default: claim a free database number on 127.0.0.1:6379")
    parser.add_argument("--clients", default="1,50,100", help="comma-separated concurrency levels")
    parser.add_argument("--rate", type=float, default=2000, help="decisions per second of the paced load")
    opts = parser.parse_args(argv)
    claim = claim_redis(opts.redis_url)
    try:
        import uvloop

        rows = [
            uvloop.run(_run(claim.url, int(c), opts.duration, rate))
            for rate in (0.0, opts.rate)
            for c in opts.clients.split(",")
        ]
    finally:
        claim.release()
    for row in rows:
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Data plane processes: a worker (proxy listener + status listener + config stream) and, for
``--workers N``, a small supervisor that runs N workers sharing the ports with SO_REUSEPORT.

Each worker is a node of its own to the control plane (node id ``<NODE_ID>-w<i>``): it holds
its own snapshot and its own upstream pool, so a crash of one never stalls the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, Final

from aiohttp import web

from data_plane import listener, metrics
from data_plane.auth.failures import FailureTracker
from data_plane.cluster import ConfigClient
from data_plane.pipeline import Pipeline
from data_plane.ratelimit.limiter import RateLimiter
from data_plane.ratelimit.redis import RedisBackend
from data_plane.snapshot import Holder
from data_plane.upstream.client import UpstreamClient
from data_plane.upstream.health import HealthMonitor
from data_plane.upstream.websocket import WebSocketClient
from data_plane.usage.worker import Observability
from shared import settings as tg_settings
from shared.settings import Settings

log = logging.getLogger(__name__)

# The default of TENANTGATE_DRAIN_TIMEOUT_S (settings.drain_timeout_s), which is what applies.
DRAIN_TIMEOUT_S: Final = 10.0
WORKER_RESTART_DELAY_S: Final = 1.0
# A worker that dies this soon after start is broken (bad port, bad setting), not unlucky.
EARLY_EXIT_S: Final = 3.0


def _json(status: int, payload: dict[str, Any]) -> web.Response:
    return web.Response(status=status, text=json.dumps(payload), content_type="application/json")


def status_app(
    settings: Settings,
    holder: Holder,
    config: ConfigClient,
    redis: RedisBackend,
    limiter: RateLimiter,
    draining: asyncio.Event | None = None,
) -> web.Application:
    """``draining`` set: the worker is shutting down, /readyz says 503 so balancers move on."""

    async def healthz(_: web.Request) -> web.Response:
        return _json(200, {"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        current = holder.current
        if current is None:
            body = {"error": {"code": "not_ready", "message": "no configuration loaded yet", "request_id": ""}}
            return _json(503, body)
        if draining is not None and draining.is_set():
            body = {"error": {"code": "draining", "message": "shutting down", "request_id": ""}}
            return _json(503, body)
        return _json(200, {"status": "ready", "config_version": current.version})

    async def status(_: web.Request) -> web.Response:
        current = holder.current
        return _json(
            200,
            {
                "node_id": settings.node_id,
                "config_version": current.version if current is not None else 0,
                "cp_connected": config.status.connected,
                "redis_ok": redis.ok,
                "ratelimit_mode": limiter.mode,
                "ratelimit_redis_round_trips": redis.round_trips,
                "ratelimit_redis_commands": redis.commands,
                "ratelimit_live_nodes": redis.live_nodes,
                "snapshot_source": holder.source,
                "last_error": config.status.last_error,
            },
        )

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/status", status)
    return app


async def run_worker(settings: Settings, *, reuse_port: bool, metrics_dir: Path | None = None) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    holder = Holder()
    # First: opening the usage spool is what fails on a bad DATA_DIR, before anything needs closing.
    observability = Observability(settings, lambda: redis.ok, metrics_dir)
    await observability.start()
    client = UpstreamClient(settings.upstream_ca_file)
    await client.start()
    redis = RedisBackend(settings)
    config = ConfigClient(settings, holder)
    config.restore_from_disk()
    limiter = RateLimiter(settings, redis)
    websockets = WebSocketClient(settings.upstream_ca_file)
    await websockets.start()
    failures = FailureTracker(tenant_labels=settings.metrics_tenant_labels)
    pipeline = Pipeline(
        holder, client, settings, limiter, websockets, recorder=observability.recorder, failures=failures
    )

    proxy = web.ServerRunner(
        listener.proxy_server(pipeline.handle),
        handle_signals=False,
        shutdown_timeout=settings.drain_timeout_s,
    )
    status_web = status_app(settings, holder, config, redis, limiter, draining=stop)
    status_web.router.add_get("/metrics", observability.exposition.handle)
    status = web.AppRunner(status_web, handle_signals=False, access_log=None)
    background: list[asyncio.Task[None]] = []
    try:
        await proxy.setup()
        await status.setup()
        for runner, addr, name in (
            (proxy, settings.proxy_listen, "PROXY_LISTEN"),
            (status, settings.status_listen, "STATUS_LISTEN"),
        ):
            site = web.TCPSite(runner, addr.host, addr.port, reuse_port=reuse_port or None, backlog=2048)
            try:
                await site.start()
            except OSError as exc:
                raise OSError(f"cannot listen on {addr} (TENANTGATE_{name}): {exc.strerror}") from exc
        background = [
            asyncio.create_task(config.run(), name="config-stream"),
            asyncio.create_task(redis.watch_health(), name="redis-health"),
            asyncio.create_task(
                HealthMonitor(client, lambda: holder.current.upstreams if holder.current else None).run(),
                name="upstream-health",
            ),
        ]
        background += [asyncio.create_task(job, name=name) for name, job in observability.jobs()]
        background.append(asyncio.create_task(failures.run(), name="auth-failures"))
        log.info(
            "data plane worker ready",
            extra={
                "proxy": str(settings.proxy_listen),
                "status": str(settings.status_listen),
                "cp_addr": str(settings.cp_addr),
                "node_id": settings.node_id,
            },
        )
        await stop.wait()
        log.info("data plane worker draining", extra={"node_id": settings.node_id})
        websockets.begin_shutdown()  # open WebSockets are closed with 1001 rather than cut
    finally:
        # Stop accepting, let in-flight requests finish (bounded), then drop the rest.
        await proxy.cleanup()
        await status.cleanup()
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        await observability.close()  # the drained requests' usage, reported or spooled
        await client.close()
        await websockets.close()
        await redis.close()


def run_event_loop(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every supported platform
        asyncio.run(main())
    else:
        uvloop.run(main())


def supervise(settings: Settings, worker_argv: list[str]) -> int:
    """Run ``settings.workers`` worker processes; restart any that crash; stop them all on
    SIGTERM/SIGINT. Returns the exit code."""
    stopping = False

    def request_stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    base_env = dict(os.environ)
    base_env.update(tg_settings.to_environ(settings, exclude=("NODE_ID", "WORKERS")))
    # Workers write their metrics to files here; whichever answers a scrape merges them all.
    metrics_dir = metrics.prepare_multiprocess_dir(settings.data_dir)
    base_env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    worker_argv = [*worker_argv, "--metrics-dir", str(metrics_dir)]

    def spawn(index: int) -> tuple[subprocess.Popen[bytes], float]:
        env = dict(base_env, TENANTGATE_NODE_ID=f"{settings.node_id}-w{index}", TENANTGATE_WORKERS="1")
        proc = subprocess.Popen([sys.executable, "-m", "data_plane", *worker_argv], env=env)
        return proc, time.monotonic()

    workers = {i: spawn(i) for i in range(settings.workers)}
    exit_code = 0
    while not stopping:
        time.sleep(0.2)
        for index, (proc, started) in list(workers.items()):
            code = proc.poll()
            if code is None or stopping:
                continue
            metrics.mark_worker_dead(proc.pid, metrics_dir)
            if time.monotonic() - started < EARLY_EXIT_S:
                log.error("data plane worker failed at start; stopping", extra={"worker": index, "exit_code": code})
                stopping, exit_code = True, code or 1
                break
            log.error("data plane worker died; restarting", extra={"worker": index, "exit_code": code})
            time.sleep(WORKER_RESTART_DELAY_S)
            workers[index] = spawn(index)
    for proc, _ in workers.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + settings.drain_timeout_s + 2
    for proc, _ in workers.values():
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return exit_code

"""The control plane process: admin REST API (FastAPI on uvicorn) and the gRPC cluster server,
sharing one event loop, one Postgres pool and one snapshot cache."""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import logging
import re
import signal
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Final

import uvicorn
from fastapi import FastAPI, Request, Response

import shared
from control_plane import metrics
from control_plane.api import config, errors, health, issuers, keys, nodes, oauth, routes, tenants, tiers, tokens, usage
from control_plane.api import signing_keys as signing_keys_api
from control_plane.api.deps import AppState
from control_plane.auth import Authenticator
from control_plane.cluster.server import start_cluster
from control_plane.cluster.snapshots import SnapshotCache
from control_plane.cluster.usage import UsageIngest
from control_plane.errors import StoreUnavailable
from control_plane.jwks import JwksFetcher
from control_plane.store import signing_keys
from control_plane.store.db import Database
from control_plane.store.migrate import migrate
from shared.settings import HostPort, Settings

log = logging.getLogger(__name__)

STARTUP_DB_DEADLINE_S: Final = 60.0
SHUTDOWN_GRACE_S: Final = 5.0
# Every step of a stop is bounded well within this; past it the process dumps its stacks and exits.
STOP_DEADLINE_S: Final = 20.0
_BODY_METHODS: Final = frozenset({"POST", "PUT", "PATCH"})
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._\-]{1,128}$")


def create_app(state: AppState) -> FastAPI:
    app = FastAPI(
        title="tenantgate admin API",
        version=shared.__version__,
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.tenantgate = state
    errors.install(app)
    app.include_router(health.router)
    # Every admin endpoint declares the error answers it can give, so /openapi.json is true.
    for module in (tenants, keys, issuers, oauth, routes, tiers, tokens, config, nodes, usage, signing_keys_api):
        app.include_router(module.router, responses=errors.ERROR_RESPONSES)
    metrics.install(app)
    app.include_router(issuers.global_router, responses=errors.ERROR_RESPONSES)

    @app.middleware("http")
    async def request_id(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        sent = request.headers.get("x-request-id", "")
        rid = sent if _REQUEST_ID.match(sent) else uuid.uuid4().hex
        request.state.request_id = rid
        if request.method in _BODY_METHODS and request.headers.get("content-length", "0") != "0":
            ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if ctype != "application/json":
                refused: Response = errors.error_response(
                    request,
                    415,
                    "unsupported_media_type",
                    "send the body as JSON with Content-Type: application/json",
                )
                refused.headers["X-Request-ID"] = rid
                return refused
        response = await call_next(request)
        response.headers["X-Request-ID"] = rid
        return response

    return app


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: this process decides when to stop."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def bind(addr: HostPort) -> socket.socket:
    family = socket.AF_INET6 if ":" in addr.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((addr.host, addr.port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {addr}: {exc.strerror}") from exc
    sock.listen(1024)
    sock.setblocking(False)
    return sock


async def connect_db(settings: Settings) -> Database:
    """Connect to Postgres, retrying with progress messages until the start-up deadline."""
    assert settings.database_url is not None
    deadline = time.monotonic() + STARTUP_DB_DEADLINE_S
    delay = 0.25
    while True:
        try:
            return await Database.connect(settings.database_url.reveal())
        except StoreUnavailable as exc:
            if time.monotonic() + delay > deadline:
                raise StoreUnavailable(
                    f"{exc}; gave up after {STARTUP_DB_DEADLINE_S:.0f}s — check TENANTGATE_DATABASE_URL"
                    " and that Postgres is running"
                ) from exc
            log.warning("waiting for Postgres", extra={"error": str(exc), "retry_in_s": delay})
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


async def run_migrations(settings: Settings) -> int:
    db = await connect_db(settings)
    try:
        async with db.connection() as conn:
            applied = await migrate(conn)
    finally:
        await db.close()
    return len(applied)


async def serve(settings: Settings) -> None:
    assert settings.admin_token is not None and settings.cluster_token is not None
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    admin_sock = bind(settings.admin_listen)
    db = await connect_db(settings)
    try:
        async with db.connection() as conn:
            applied = await migrate(conn)
        if applied:
            log.info("migrations applied", extra={"count": len(applied)})
        await signing_keys.ensure_live(db)  # before the first snapshot, which carries it
        cache = SnapshotCache(db)
        await cache.start()
        fetcher = JwksFetcher(db, cache)
        await fetcher.start()
        usage_ingest = UsageIngest(db)
        usage_ingest.start()  # the scheduled rollup
        cluster = await start_cluster(settings, cache, db, usage_ingest)
        state = AppState(settings, db, cache, Authenticator(settings.admin_token, db))
        server = _Server(
            uvicorn.Config(create_app(state), log_config=None, access_log=False, lifespan="off", server_header=False)
        )
        api = asyncio.create_task(server.serve(sockets=[admin_sock]), name="admin-api")
        log.info(
            "control plane ready",
            extra={"admin": str(settings.admin_listen), "cluster": str(settings.cluster_listen)},
        )
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait({api, stopper}, return_when=asyncio.FIRST_COMPLETED)
        log.info("control plane stopping")
        # The last resort, for a bug that would leave a stopping replica hanging until its
        # orchestrator kills it: every thread's stack on stderr, then exit.
        faulthandler.dump_traceback_later(STOP_DEADLINE_S, exit=True)
        server.should_exit = True
        stopper.cancel()
        await asyncio.wait_for(api, SHUTDOWN_GRACE_S)
        await cluster.stop()
        await usage_ingest.stop()
        await fetcher.stop()
        await cache.stop()
    finally:
        await db.close()
        admin_sock.close()

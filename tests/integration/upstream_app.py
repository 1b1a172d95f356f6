"""A controllable upstream for the upstream-resilience tests.

``python -m tests.integration.upstream_app --listen 127.0.0.1:9000 --name a [--tls-cert C --tls-key K]``

With ``--tls-cert``/``--tls-key`` (PEM files) it speaks HTTPS, and its stats say which server
names clients asked for (SNI) and over how many connections its requests came.

Every request outside ``/_control/`` is counted and answered with JSON naming the instance
(also in the ``X-Upstream-Instance`` header). How it answers, by query parameter:

    status=NNN            answer with that status
    delay_ms=N[&slow=a]   wait first (only on instance ``a`` when ``slow`` is given)
    hang=1                never answer
    close_early=1         send the head and part of the body, then drop the connection
    chunks=N              stream N chunks of 1 KiB

A path ending in ``/health`` is a health check: answered with the health status (200 until
set) and counted apart. The test steers the instance directly, not through the gateway:

    POST /_control/mode    {"status": 503} | {"hang": true} | {"delay_ms": 500} | {}  (every request)
    POST /_control/health  {"status": 500}
    GET  /_control/stats   {"hits", "health_hits", "in_flight", "by_method", "connections", "server_names"}
    POST /_control/reset   counters and modes back to zero
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import ssl
from collections import Counter
from typing import Any

from aiohttp import web


class Instance:
    def __init__(self, name: str) -> None:
        self.name = name
        self.reset()

    def reset(self) -> None:
        self.hits = 0
        self.health_hits = 0
        self.in_flight = 0
        self.by_method: Counter[str] = Counter()
        self.mode: dict[str, Any] = {}
        self.health_status = 200
        self.peers: set[str] = set()  # the client ends of the connections counted requests came over
        self.server_names: list[str | None] = []  # SNI of each TLS handshake

    def _json(self, status: int, payload: dict[str, Any]) -> web.Response:
        return web.Response(
            status=status,
            text=json.dumps(payload),
            content_type="application/json",
            headers={"X-Upstream-Instance": self.name},
        )

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        path = request.path
        if path.startswith("/_control/"):
            return await self.control(request, path.removeprefix("/_control/"))
        if path.endswith("/health"):
            self.health_hits += 1
            return self._json(self.health_status, {"instance": self.name, "health": self.health_status})
        self.hits += 1
        self.by_method[request.method] += 1
        self.peers.add(str(request.transport.get_extra_info("peername") if request.transport else None))
        self.in_flight += 1
        try:
            return await self.answer(request)
        finally:
            self.in_flight -= 1

    async def answer(self, request: web.BaseRequest) -> web.StreamResponse:
        query = request.query
        settings: dict[str, Any] = {**self.mode, **{k: v for k, v in query.items()}}
        if settings.get("hang") in (True, "1"):
            await asyncio.Event().wait()
        delay_ms = int(settings.get("delay_ms", 0))
        if delay_ms and settings.get("slow", self.name) == self.name:
            await asyncio.sleep(delay_ms / 1000)
        if request.can_read_body:
            await request.read()
        if settings.get("close_early") in (True, "1"):
            response = web.StreamResponse(headers={"X-Upstream-Instance": self.name, "Content-Length": "100000"})
            await response.prepare(request)
            await response.write(b"x" * 1000)
            assert request.transport is not None
            request.transport.close()
            return response
        chunks = int(settings.get("chunks", 0))
        if chunks:
            response = web.StreamResponse(headers={"X-Upstream-Instance": self.name})
            await response.prepare(request)
            for _ in range(chunks):
                await response.write(b"y" * 1024)
            await response.write_eof()
            return response
        status = int(settings.get("status", 200))
        return self._json(status, {"instance": self.name, "method": request.method, "path": request.path})

    async def control(self, request: web.BaseRequest, action: str) -> web.Response:
        if action == "stats":
            return self._json(
                200,
                {
                    "hits": self.hits,
                    "health_hits": self.health_hits,
                    "in_flight": self.in_flight,
                    "by_method": dict(self.by_method),
                    "connections": len(self.peers),
                    "server_names": self.server_names,
                },
            )
        if action == "reset":
            self.reset()
            return self._json(200, {})
        body = await request.json() if request.can_read_body else {}
        if action == "mode":
            self.mode = dict(body)
            return self._json(200, self.mode)
        if action == "health":
            self.health_status = int(body.get("status", 200))
            return self._json(200, {"status": self.health_status})
        return self._json(404, {"error": "unknown control action"})


async def serve(host: str, port: int, name: str, tls: tuple[str, str] | None = None) -> None:
    instance = Instance(name)
    context = None
    if tls is not None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(*tls)

        def server_name(_sock: ssl.SSLObject, name: str | None, _context: ssl.SSLContext) -> None:
            instance.server_names.append(name)

        context.sni_callback = server_name
    # Handlers of requests the gateway gave up on are cancelled, so in_flight stays true.
    server = web.Server(instance.handle, access_log=None, handler_cancellation=True)
    runner = web.ServerRunner(server, handle_signals=False, shutdown_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, host, port, backlog=1024, ssl_context=context).start()
    print(f"upstream {name} listening on {'https' if context else 'http'}://{host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.shutdown()
    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(prog="upstream-app")
    parser.add_argument("--listen", required=True, help="HOST:PORT")
    parser.add_argument("--name", required=True)
    parser.add_argument("--tls-cert", help="PEM certificate (chain): serve HTTPS")
    parser.add_argument("--tls-key", help="PEM private key of --tls-cert")
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    tls = (args.tls_cert, args.tls_key) if args.tls_cert else None
    try:
        import uvloop

        uvloop.run(serve(host, int(port), args.name, tls))
    except ImportError:
        asyncio.run(serve(host, int(port), args.name, tls))


if __name__ == "__main__":
    main()

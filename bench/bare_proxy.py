"""The baseline: a reverse proxy with no features, made of aiohttp alone (low-level server on
uvloop, one pooled aiohttp ClientSession, bodies streamed both ways with
``readany``/``iter_any``, hop-by-hop headers dropped) and nothing else: no routing, no auth,
no limits, no metrics.

Every gateway figure is reported as a ratio to this proxy from the same run. The data plane
serves with the same aiohttp server but sends upstream with its own pooled HTTP/1.1 client
(``data_plane/upstream/http1.py``), so a ratio above 1 is possible.

``python -m bench.bare_proxy --listen 127.0.0.1:8080 --upstream http://127.0.0.1:9000 [--workers N]``
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Final

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
    }
)


async def _body(content: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    while True:
        chunk = await content.readany()
        if not chunk:
            return
        yield chunk


class BareProxy:
    def __init__(self, upstream: str) -> None:
        self._base = URL(upstream)
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=4096, limit_per_host=1024, keepalive_timeout=30.0)
        self._session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        assert self._session is not None
        raw_path, _, raw_query = request.raw_path.partition("?")
        url = URL.build(
            scheme=self._base.scheme,
            host=self._base.raw_host or "",
            port=self._base.port,
            path=raw_path,
            query_string=raw_query,
            encoded=True,
        )
        headers: CIMultiDict[str] = CIMultiDict()
        for name, value in request.headers.items():
            if name.lower() not in HOP_BY_HOP:
                headers.add(name, value)
        body = _body(request.content) if request.body_exists else None
        try:
            up = await self._session.request(
                request.method,
                url,
                headers=headers,
                data=body,
                allow_redirects=False,
                compress=None,
                chunked=None,
            )
        except (aiohttp.ClientError, OSError, TimeoutError):
            return web.Response(status=502, text="bad gateway")
        try:
            response = web.StreamResponse(status=up.status, reason=up.reason)
            for name, value in up.headers.items():
                if name.lower() not in HOP_BY_HOP:
                    response.headers.add(name, value)
            await response.prepare(request)
            async for chunk in up.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response
        finally:
            up.release()


async def serve(host: str, port: int, upstream: str, reuse_port: bool) -> None:
    proxy = BareProxy(upstream)
    await proxy.start()
    runner = web.ServerRunner(web.Server(proxy.handle, access_log=None), handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, host, port, reuse_port=reuse_port or None, backlog=2048).start()
    print(f"bare proxy listening on http://{host}:{port} -> {upstream}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()
    await proxy.close()


def _run(host: str, port: int, upstream: str, reuse_port: bool) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(host, port, upstream, reuse_port))
    else:
        uvloop.run(serve(host, port, upstream, reuse_port))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bare_proxy", description=__doc__)
    parser.add_argument("--listen", default="127.0.0.1:8080", help="HOST:PORT")
    parser.add_argument("--upstream", required=True, help="base URL, e.g. http://127.0.0.1:9000")
    parser.add_argument("--workers", type=int, default=1, help="processes sharing the port (SO_REUSEPORT)")
    parser.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    if args.workers <= 1:
        _run(host, int(port), args.upstream, args.reuse_port)
        return 0
    # Like the data plane: a parent that starts N workers sharing the port, and stops them.
    argv_child = [sys.executable, "-m", "bench.bare_proxy", "--listen", args.listen, "--upstream", args.upstream]
    workers = [subprocess.Popen([*argv_child, "--reuse-port"]) for _ in range(args.workers)]
    stopping = False

    def request_stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    while not stopping and all(w.poll() is None for w in workers):
        time.sleep(0.2)
    for worker in workers:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
    for worker in workers:
        worker.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())

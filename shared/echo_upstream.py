"""A small echo service: answers every request with JSON describing what it received.

Used by ``tenantgate up --demo`` as the demo upstream and by the tests as a real upstream.
``python -m shared.echo_upstream --listen 127.0.0.1:9000``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys

from aiohttp import web

MAX_DELAY_MS = 60_000


async def echo(request: web.Request) -> web.Response:
    body = await request.read()
    # ``?delay_ms=N`` answers after N ms: a slow upstream for timeout and concurrency tests.
    delay = request.query.get("delay_ms", "")
    if delay.isdigit():
        await asyncio.sleep(min(int(delay), MAX_DELAY_MS) / 1000)
    payload = {
        "method": request.method,
        "path": request.raw_path.partition("?")[0],
        "query": request.query_string,
        "headers": {k: v for k, v in request.headers.items()},
        "body_bytes": len(body),
        "body": body.decode("utf-8", "replace") if len(body) <= 4096 else None,
    }
    return web.Response(text=json.dumps(payload), content_type="application/json")


async def serve(host: str, port: int) -> None:
    app = web.Application(client_max_size=1024**3)
    app.router.add_route("*", "/{tail:.*}", echo)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    print(f"echo upstream listening on http://{host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="echo-upstream")
    parser.add_argument("--listen", default="127.0.0.1:9000", help="HOST:PORT")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    asyncio.run(serve(host or "127.0.0.1", int(port)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A recording upstream for the proxy tests: it remembers every request it received (raw target,
headers in order, body size) so a test can assert what the gateway let through, and it can
stream large bodies, answer slowly and speak WebSocket.

``python -m tests.integration.recorder --listen 127.0.0.1:PORT``

Behaviour is chosen by the query string, which the gateway forwards untouched:
``?bytes=N`` streams N bytes back in 64 KiB chunks (chunked encoding); ``?sleep=S`` waits S
seconds before answering; ``?ws=1`` accepts a WebSocket and echoes it (see :func:`websocket`).
``GET /__recorded`` (sent directly, never through the gateway) returns the list of requests
seen so far; ``DELETE /__recorded`` clears it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from typing import Any

from aiohttp import WSMsgType, web

CHUNK = 64 * 1024
_recorded: list[dict[str, Any]] = []


def _record(request: web.BaseRequest, **extra: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "method": request.method,
        "target": request.raw_path,
        "path": request.raw_path.partition("?")[0],
        "query": request.query_string,
        "version": f"{request.version.major}.{request.version.minor}",
        "headers": [[k, v] for k, v in request.headers.items()],
        **extra,
    }
    _recorded.append(entry)
    return entry


async def recorded(request: web.BaseRequest) -> web.Response:
    if request.method == "DELETE":
        _recorded.clear()
    return web.Response(text=json.dumps(_recorded), content_type="application/json")


async def websocket(request: web.BaseRequest, entry: dict[str, Any]) -> web.WebSocketResponse:
    """Echo text and binary; ``close:CODE:REASON`` makes the upstream close with that code;
    ``ping:DATA`` makes it send a ping (the pong it gets back is reported as ``pong:DATA``).
    Pings from the gateway are answered by hand and reported as ``got-ping:DATA``; the close
    code and reason it receives are recorded."""
    protocols = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
    ws = web.WebSocketResponse(autoping=False, autoclose=False, protocols=protocols[:1])
    await ws.prepare(request)
    entry["ws_messages"] = []
    while True:
        msg = await ws.receive()
        if msg.type == WSMsgType.TEXT:
            text = msg.data
            entry["ws_messages"].append(text)
            if text.startswith("close:"):
                _, code, reason = text.split(":", 2)
                await ws.close(code=int(code), message=reason.encode())
                break
            if text.startswith("ping:"):
                await ws.ping(text[5:].encode())
                continue
            await ws.send_str(text)
        elif msg.type == WSMsgType.BINARY:
            await ws.send_bytes(msg.data)
        elif msg.type == WSMsgType.PING:
            await ws.pong(msg.data)
            await ws.send_str("got-ping:" + msg.data.decode())
        elif msg.type == WSMsgType.PONG:
            await ws.send_str("pong:" + msg.data.decode())
        elif msg.type == WSMsgType.CLOSE:
            entry["ws_close"] = [msg.data, msg.extra]
            await ws.close(code=msg.data, message=(msg.extra or "").encode())
            break
        else:  # CLOSING, CLOSED, ERROR: the connection is gone
            entry["ws_close"] = [None, msg.type.name]
            break
    return ws


async def handle(request: web.BaseRequest) -> web.StreamResponse:
    if request.raw_path.startswith("/__recorded"):
        return await recorded(request)
    query = request.query
    entry = _record(request)
    if query.get("ws") and request.headers.get("Upgrade", "").lower() == "websocket":
        return await websocket(request, entry)
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
    entry["body_bytes"] = size
    if "sleep" in query:
        await asyncio.sleep(float(query["sleep"]))
        # Whether the gateway gave up on this exchange (closed the connection) meanwhile.
        entry["aborted"] = request.transport is None or request.transport.is_closing()
    if "bytes" in query:
        total = int(query["bytes"])
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        block = b"x" * CHUNK
        sent = 0
        while sent < total:
            n = min(CHUNK, total - sent)
            await response.write(block if n == CHUNK else block[:n])
            sent += n
        await response.write_eof()
        return response
    headers = {"X-Upstream": "recorder"}
    if "gzip" in query:
        # Pre-compressed bytes: the gateway must pass the encoding through untouched.
        headers["Content-Encoding"] = "gzip"
        return web.Response(body=bytes.fromhex(query["gzip"]), headers=headers)
    if "hop" in query:
        # Hop-by-hop response headers the gateway must not pass on, one named by Connection.
        headers.update({"Connection": "close, X-Upstream-Secret", "X-Upstream-Secret": "s3", "Keep-Alive": "5"})
    return web.Response(text=json.dumps(entry), content_type="application/json", headers=headers)


async def serve(host: str, port: int) -> None:
    server = web.Server(handle, access_log=None, auto_decompress=False)
    runner = web.ServerRunner(server, handle_signals=False, shutdown_timeout=1)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    print(f"recorder listening on http://{host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="recorder")
    parser.add_argument("--listen", default="127.0.0.1:9000", help="HOST:PORT")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    asyncio.run(serve(host, int(port)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

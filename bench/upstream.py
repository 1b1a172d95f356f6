"""A minimal, fast HTTP/1.1 upstream: answers every request with the same small body.

Used when nginx is not installed. It must be far cheaper per request than any proxy under
test, so it is a raw asyncio protocol on uvloop rather than a web framework: it reads the
request head, skips the body (Content-Length or chunked) and writes one prebuilt response;
connections stay open (keep-alive) unless the client asks to close.

``python -m bench.upstream --listen 127.0.0.1:9000``
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from typing import Final, cast

BODY: Final = b'{"ok":true,"service":"bench-upstream"}\n'
RESPONSE: Final = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
    + str(len(BODY)).encode()
    + b"\r\n\r\n"
    + BODY
)
RESPONSE_CLOSE: Final = RESPONSE.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1)
BAD_REQUEST: Final = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
MAX_HEAD_BYTES: Final = 64 * 1024


class _Parse(Exception):
    pass


class UpstreamProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self._buf = bytearray()
        self._transport: asyncio.Transport | None = None
        # Body bytes still to skip (Content-Length), or -1 while inside a chunked body.
        self._skip = 0
        self._chunked = False
        self._close_after = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio.Transport, only alike.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._buf += data
        try:
            self._process()
        except _Parse:
            assert self._transport is not None
            self._transport.write(BAD_REQUEST)
            self._transport.close()

    def _process(self) -> None:
        transport = self._transport
        assert transport is not None
        while True:
            if self._skip:
                take = min(self._skip, len(self._buf))
                del self._buf[:take]
                self._skip -= take
                if self._skip:
                    return
                self._finish(transport)
                continue
            if self._chunked:
                if not self._skip_chunks():
                    return
                self._chunked = False
                self._finish(transport)
                continue
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buf) > MAX_HEAD_BYTES:
                    raise _Parse
                return
            head = bytes(self._buf[:end]).lower()
            del self._buf[: end + 4]
            self._close_after = b"\nconnection: close" in head
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name == b"content-length":
                    try:
                        length = int(value.strip())
                    except ValueError as exc:
                        raise _Parse from exc
                elif name == b"transfer-encoding" and b"chunked" in value:
                    self._chunked = True
            if self._chunked:
                continue
            if length:
                self._skip = length
                continue
            self._finish(transport)

    def _skip_chunks(self) -> bool:
        """Consume chunks from the buffer; True once the last chunk and trailers are gone."""
        while True:
            line_end = self._buf.find(b"\r\n")
            if line_end < 0:
                return False
            size_text = bytes(self._buf[:line_end]).split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError as exc:
                raise _Parse from exc
            if size == 0:
                trailers_end = self._buf.find(b"\r\n\r\n", line_end)
                if trailers_end < 0:
                    if self._buf[line_end : line_end + 4] == b"\r\n\r\n":
                        trailers_end = line_end
                    else:
                        return False
                del self._buf[: trailers_end + 4]
                return True
            need = line_end + 2 + size + 2
            if len(self._buf) < need:
                return False
            del self._buf[:need]

    def _finish(self, transport: asyncio.Transport) -> None:
        if self._close_after:
            transport.write(RESPONSE_CLOSE)
            transport.close()
        else:
            transport.write(RESPONSE)


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(UpstreamProtocol, host, port, backlog=4096, reuse_port=True)
    print(f"bench upstream listening on http://{host}:{port}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()
    await server.wait_closed()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.upstream", description=__doc__)
    parser.add_argument("--listen", default="127.0.0.1:9000", help="HOST:PORT")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(host or "127.0.0.1", int(port)))
    else:
        uvloop.run(serve(host or "127.0.0.1", int(port)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

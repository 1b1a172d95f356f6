"""HTTP/1.1 exchanges with upstreams over pooled keep-alive connections.

aiohttp's ``ClientSession`` builds, per request, a ``ClientRequest`` through a dozen update
steps, a timer context, a connector lookup, a ``StreamWriter`` and a ``ClientResponse``:
most of what forwarding a small request costs. This module keeps the part of aiohttp that
needs care — its response protocol (``ResponseHandler``: the llhttp parser, the body
``StreamReader`` with flow control, the read timeout, EOF and error handling) — and does the
rest directly:

    acquire   an idle connection to (scheme, host, port), newest first; else a new one within
              the connect timeout, waiting for a free slot at the pool's limits
    write     the request head as one string, the body (if any) from a task, chunked unless
              the caller gave a Content-Length, with the transport's flow control
    read      the response head; 1xx interim answers (100, 103) are skipped, a 101 is returned
    release   the connection goes back only when the body was read to its end, nothing more
              arrived, and neither side asked to close; anything else closes it

A connection reads at most :data:`READ_BYTES` from its socket at a time (into the pool's one
read buffer) and stops reading once :data:`BODY_BUFFER_BYTES` of body wait unread, twice that
at most: what a response holds while its reader is slow stays small, however fast the upstream
sends. :meth:`Response.hold` stops the reading outright, for a reader that has nowhere to put
more (the client's transport is full).

A request that fails on a reused connection before any answer (the upstream closed it while
it was idle) is sent once more on a new connection when it has no body and its method is
idempotent, as RFC 9112 §9.3.1 allows and as aiohttp does.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import deque
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Final

from aiohttp.client_exceptions import (
    ClientConnectionError,
    ClientOSError,
    ServerDisconnectedError,
)
from aiohttp.client_proto import ResponseHandler
from aiohttp.streams import EofStream, StreamReader
from multidict import CIMultiDictProxy

IDEMPOTENT: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
# Methods that carry a body by definition: without one they say so with Content-Length: 0,
# and without a Content-Type they are sent as application/octet-stream (what aiohttp sends).
_BODY_METHODS: Final = frozenset({"POST", "PUT", "PATCH"})
_NO_BODY_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
# The limits aiohttp's client applies to a response head.
MAX_LINE_BYTES: Final = 8190
MAX_FIELD_BYTES: Final = 8190
MAX_HEADERS: Final = 128
# At most this much is read from an upstream socket at once (uvloop reads 256 KiB otherwise),
# and a body stops being read once more than twice BODY_BUFFER_BYTES of it wait unread: with
# the bytes of the read that crossed that mark, a response holds at most about
# 2 * BODY_BUFFER_BYTES + READ_BYTES. aiohttp's own defaults (256 KiB, 512 KiB) let a response
# hold 0.5-0.75 MiB while its client is slower than its upstream.
READ_BYTES: Final = 64 * 1024
BODY_BUFFER_BYTES: Final = 32 * 1024

Key = tuple[str, str, int]  # scheme, host, port


class RequestHeadInvalid(ValueError):
    """A header name or value holds a line break: it would split the request head."""


class Protocol(ResponseHandler):
    """aiohttp's response protocol with a lazy read timer.

    aiohttp cancels and re-arms a timer on every read and at the end of every body: two
    timer allocations per small exchange. Here a read only moves a deadline; one timer
    checks it when it fires and re-arms itself for what is left, and a dropped timeout
    leaves the timer to find nothing to do. So a busy keep-alive connection arms a timer
    about once per timeout period, and the timeout still fires no earlier than the read
    timeout after the last read (or the request's end), exactly as aiohttp's."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self._deadline = 0.0  # loop time by which the next read must come; 0: none awaited
        self._check: asyncio.TimerHandle | None = None
        self._check_at = 0.0  # when the pending check fires

    def _reschedule_timeout(self) -> None:
        timeout = self._read_timeout
        if not timeout:
            self._deadline = 0.0
            return
        self._deadline = deadline = self._loop.time() + timeout
        check = self._check
        if check is None or self._check_at > deadline:  # none, or too late for a shorter timeout
            if check is not None:
                check.cancel()
            self._check_at = deadline
            self._check = self._loop.call_at(deadline, self._check_deadline)

    def _drop_timeout(self) -> None:
        self._deadline = 0.0

    def _check_deadline(self) -> None:
        self._check = None
        deadline = self._deadline
        if not deadline:
            return
        if self._loop.time() >= deadline:
            self._deadline = 0.0
            self._on_read_timeout()
        else:
            self._check_at = deadline
            self._check = self._loop.call_at(deadline, self._check_deadline)

    def resume_reading(self, resume_parser: bool = True) -> None:
        # aiohttp's body reader asks for this after every read below its low-water mark, paused
        # or not; unpaused, it would only feed the parser nothing and poke the transport.
        if self._reading_paused or self._buffer_paused:
            super().resume_reading(resume_parser)

    @property
    def held(self) -> bool:
        return self._buffer_paused

    def hold(self) -> None:
        """Stop reading the socket until :meth:`release_hold`, whatever the body's own flow
        control says. The read timeout stops too: the upstream is not the one late."""
        if not self._buffer_paused:
            # aiohttp's "buffer" pause: the transport reads again only once neither it nor
            # the body's flow control (``_reading_paused``) holds it.
            self._pause_reading_for_buffer()
            self._drop_timeout()

    def release_hold(self) -> None:
        if self._buffer_paused:
            self._resume_reading_for_buffer()
            payload = self._payload
            if not self._reading_paused and payload is not None and not payload.is_eof():
                self._reschedule_timeout()  # the rest of the body is awaited again

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        self._deadline = 0.0
        if self._check is not None:
            self._check.cancel()  # a closed connection is not kept alive by its timer
            self._check = None


class _Reads(asyncio.BufferedProtocol):
    """What the transport calls: each read lands in ``buffer`` (at most its size, where a plain
    protocol would get whatever uvloop read, up to 256 KiB) and goes on to the response
    protocol as bytes. uvloop reads into a buffer only for a protocol that is not an
    ``asyncio.Protocol``, which aiohttp's is: hence this front. ``buffer`` is the pool's, one
    for all its connections: a read is copied out of it before anything else can read."""

    __slots__ = ("_buffer", "protocol")

    def __init__(self, protocol: Protocol, buffer: memoryview) -> None:
        self.protocol = protocol
        self._buffer = buffer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.protocol.connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.protocol.connection_lost(exc)

    def pause_writing(self) -> None:
        self.protocol.pause_writing()

    def resume_writing(self) -> None:
        self.protocol.resume_writing()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.protocol.data_received(self._buffer[:nbytes].tobytes())

    def eof_received(self) -> None:
        self.protocol.eof_received()  # and the transport closes


class Connection:
    """One keep-alive connection and the pool slot it holds."""

    __slots__ = ("head", "idle_since", "key", "protocol")

    def __init__(self, key: Key, protocol: Protocol) -> None:
        self.key = key
        self.protocol = protocol
        self.idle_since = 0.0
        self.head: bool | None = None  # whether the parser in place reads answers to HEAD; None: no parser yet


class Response:
    """An upstream response whose head has arrived. :meth:`release` (or :meth:`close`) it
    exactly once when done with it."""

    __slots__ = ("_conn", "_pool", "_writer", "content", "headers", "reason", "status")

    def __init__(
        self,
        status: int,
        reason: str,
        headers: CIMultiDictProxy[str],
        content: StreamReader,
        conn: Connection,
        pool: Pool,
        writer: asyncio.Task[None] | None,
    ) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.content = content
        self._conn: Connection | None = conn
        self._pool = pool
        self._writer = writer

    def hold(self) -> None:
        """Read no more of the body from the upstream until :meth:`release_hold`: its reader
        has nowhere to put it. Released at the latest by :meth:`release` or :meth:`close`."""
        if self._conn is not None:
            self._conn.protocol.hold()

    def release_hold(self) -> None:
        if self._conn is not None:
            self._conn.protocol.release_hold()

    def release(self) -> None:
        """Give the connection back if it can carry another request, else close it."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        conn.protocol.release_hold()  # an idle connection reads: that is how it hears of a close
        writer = self._writer
        if writer is not None and not writer.done():
            writer.cancel()  # the answer came before the whole request body: the connection is spent
            self._pool.discard(conn)
        elif self.content.is_eof() and not conn.protocol.should_close:
            self._pool.put(conn)
        else:
            self._pool.discard(conn)

    def close(self) -> None:
        """Close the connection whatever state the exchange is in."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._writer is not None and not self._writer.done():
            self._writer.cancel()
        self._pool.discard(conn)


class Pool:
    """Keep-alive connections to any number of upstreams, for one event loop.

    At most ``limit`` connections are open at once, and ``limit_per_host`` to one (scheme,
    host, port); a request beyond them waits for a slot within its connect timeout. Idle
    connections are closed after ``keepalive_s``."""

    def __init__(self, *, limit: int, limit_per_host: int, keepalive_s: float, ca_file: Path | None = None) -> None:
        self._limit = limit
        self._limit_per_host = limit_per_host
        self._keepalive_s = keepalive_s
        self._idle: dict[Key, list[Connection]] = {}
        self._open: dict[Key, int] = {}
        self._open_total = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._sweep: asyncio.TimerHandle | None = None
        self._ssl: ssl.SSLContext | None = None  # built at the first HTTPS connection
        self._ca_file = ca_file
        self._closed = False
        self._read_buffer = memoryview(bytearray(READ_BYTES))  # see _Reads

    # -- one exchange --------------------------------------------------------------------

    async def request(
        self,
        method: str,
        key: Key,
        host_header: str,
        target: str,
        headers: Iterable[tuple[str, str]],
        body: AsyncIterator[bytes] | None,
        connect_s: float | None,
        read_s: float | None,
    ) -> Response:
        """Send one request and return once its response head has arrived.

        ``target`` is the request target as sent (path and query, already checked);
        ``headers`` are sent as given after ``Host``. Raises aiohttp's client exceptions
        (``ClientOSError``, ``ServerDisconnectedError``, ``SocketTimeoutError`` …),
        ``HttpProcessingError`` for an invalid response, ``OSError`` or ``TimeoutError``
        from connecting, and :class:`RequestHeadInvalid`."""
        head, chunked = _request_head(method, host_header, target, headers, body is not None)
        retry_stale = body is None and method in IDEMPOTENT
        is_head = method == "HEAD"
        loop = asyncio.get_running_loop()
        while True:
            conn, reused = await self._acquire(loop, key, connect_s)
            protocol = conn.protocol
            transport = protocol.transport
            if transport is None or transport.is_closing():
                self.discard(conn)
                if reused:
                    continue
                raise ServerDisconnectedError()
            if conn.head is is_head:
                # A connection given back is between messages, its parser ready for the next
                # answer (as a server's parser is for the next request): only the timeout changes.
                protocol.read_timeout = read_s
            else:
                protocol.set_response_params(
                    skip_payload=is_head,
                    read_until_eof=True,  # a body with neither length nor chunking ends when the upstream closes
                    read_timeout=read_s,
                    auto_decompress=False,
                    max_line_size=MAX_LINE_BYTES,
                    max_field_size=MAX_FIELD_BYTES,
                    max_headers=MAX_HEADERS,
                    read_bufsize=BODY_BUFFER_BYTES,
                )
                conn.head = is_head
            transport.write(head)
            writer: asyncio.Task[None] | None = None
            if body is None:
                protocol.start_timeout()
            else:
                writer = loop.create_task(_write_body(protocol, body, chunked))
            try:
                message, payload = await protocol.read()
                # Interim answers (100 Continue, 103 Early Hints) precede the real one; a 101 is final.
                while 100 <= message.code < 200 and message.code != 101:
                    message, payload = await protocol.read()
            except (ServerDisconnectedError, ClientOSError, EofStream) as exc:
                _stop(writer)
                self.discard(conn)
                if reused and retry_stale:
                    retry_stale = False
                    continue
                if isinstance(exc, EofStream):
                    raise ServerDisconnectedError() from None
                raise
            except BaseException:
                _stop(writer)
                self.discard(conn)
                raise
            return Response(message.code, message.reason, message.headers, payload, conn, self, writer)

    # -- the pool ------------------------------------------------------------------------

    async def _acquire(
        self, loop: asyncio.AbstractEventLoop, key: Key, connect_s: float | None
    ) -> tuple[Connection, bool]:
        idle = self._idle.get(key)
        if idle:
            now = loop.time()
            while idle:
                conn = idle.pop()
                protocol = conn.protocol
                if now - conn.idle_since < self._keepalive_s and protocol.is_connected() and not protocol.should_close:
                    return conn, True
                self.discard(conn)
        async with asyncio.timeout(connect_s):
            while self._open_total >= self._limit or self._open.get(key, 0) >= self._limit_per_host:
                waiter = loop.create_future()
                self._waiters.append(waiter)
                try:
                    await waiter
                finally:
                    if not waiter.done():
                        waiter.cancel()
                    with contextlib.suppress(ValueError):  # already woken: no longer queued
                        self._waiters.remove(waiter)
                # A connection to this key may have gone idle meanwhile.
                idle = self._idle.get(key)
                while idle:
                    conn = idle.pop()
                    if conn.protocol.is_connected() and not conn.protocol.should_close:
                        return conn, True
                    self.discard(conn)
            self._open_total += 1
            self._open[key] = self._open.get(key, 0) + 1
            try:
                return await self._connect(loop, key), False
            except BaseException:
                self._release_slot(key)
                raise

    async def _connect(self, loop: asyncio.AbstractEventLoop, key: Key) -> Connection:
        scheme, host, port = key
        context: ssl.SSLContext | None = None
        if scheme == "https":
            if self._ssl is None:
                self._ssl = tls_context(self._ca_file)
            context = self._ssl
        buffer = self._read_buffer
        _, reads = await loop.create_connection(
            lambda: _Reads(Protocol(loop), buffer), host, port, ssl=context, server_hostname=host if context else None
        )
        return Connection(key, reads.protocol)

    def put(self, conn: Connection) -> None:
        """An idle connection that can carry another request."""
        if self._closed:
            self.discard(conn)
            return
        loop = asyncio.get_running_loop()
        conn.idle_since = loop.time()
        idle = self._idle.get(conn.key)
        if idle is None:
            idle = self._idle[conn.key] = []
        idle.append(conn)
        if self._waiters:
            self._wake()
        if self._sweep is None:
            self._sweep = loop.call_later(self._keepalive_s, self._sweep_idle)

    def discard(self, conn: Connection) -> None:
        """Close ``conn`` and free its slot."""
        conn.protocol.close()
        self._release_slot(conn.key)

    def _release_slot(self, key: Key) -> None:
        self._open_total -= 1
        left = self._open[key] - 1
        if left:
            self._open[key] = left
        else:
            del self._open[key]
        if self._waiters:
            self._wake()

    def _wake(self) -> None:
        # Every waiter checks again: which one can go depends on its key.
        waiters, self._waiters = self._waiters, deque()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _sweep_idle(self) -> None:
        self._sweep = None
        oldest = None
        for key, idle in list(self._idle.items()):
            if not idle:
                del self._idle[key]  # a target whose connections were all taken or closed
                continue
            cutoff = asyncio.get_running_loop().time() - self._keepalive_s
            keep = []
            for conn in idle:
                if conn.idle_since <= cutoff or not conn.protocol.is_connected():
                    self.discard(conn)
                else:
                    keep.append(conn)
                    oldest = conn.idle_since if oldest is None else min(oldest, conn.idle_since)
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]
        if oldest is not None:
            loop = asyncio.get_running_loop()
            self._sweep = loop.call_at(oldest + self._keepalive_s, self._sweep_idle)

    def close(self) -> None:
        """Close every idle connection; connections in use close when released."""
        self._closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                self.discard(conn)

    @property
    def open_connections(self) -> int:
        return self._open_total


def tls_context(ca_file: Path | None) -> ssl.SSLContext:
    """How an HTTPS upstream is checked: its certificate must chain to the system's trust store
    (OpenSSL's default paths, so ``SSL_CERT_FILE``/``SSL_CERT_DIR`` move them) or to a CA in
    ``ca_file``, and must name the host it was reached by (SNI is that host too)."""
    context = ssl.create_default_context()
    if ca_file is not None:
        context.load_verify_locations(cafile=ca_file)
    return context


def _request_head(
    method: str, host_header: str, target: str, headers: Iterable[tuple[str, str]], has_body: bool
) -> tuple[bytes, bool]:
    """The request line and header block, and whether the body goes chunked."""
    lines = [f"{method} {target} HTTP/1.1\r\nHost: {host_header}\r\n"]
    content_length = content_type = False
    for name, value in headers:
        lines.append(f"{name}: {value}\r\n")
        lowered = name.lower()
        if lowered == "content-length":
            content_length = True
        elif lowered == "content-type":
            content_type = True
    count = len(lines) + 2  # the request line and Host share the first piece; the blank line ends the head
    chunked = has_body and not content_length
    if method in _BODY_METHODS and not content_type:
        lines.append("Content-Type: application/octet-stream\r\n")
        count += 1
    if chunked:
        lines.append("Transfer-Encoding: chunked\r\n")
        count += 1
    elif not has_body and not content_length and method not in _NO_BODY_METHODS:
        lines.append("Content-Length: 0\r\n")
        count += 1
    lines.append("\r\n")
    text = "".join(lines)
    # Every line ends in the one CRLF put there above: a CR or LF inside a name or value
    # (which the server's parser never lets through) would add a line of its own.
    if text.count("\n") != count or text.count("\r") != count:
        raise RequestHeadInvalid("a request header holds a line break")
    return text.encode("utf-8", "surrogateescape"), chunked


async def _write_body(protocol: Protocol, body: AsyncIterator[bytes], chunked: bool) -> None:
    """Stream ``body`` after the head; a failure (the client's body broke off or was too large,
    the connection dropped) fails the exchange waiting on ``protocol``."""
    try:
        async for chunk in body:
            transport = protocol.transport
            if transport is None or transport.is_closing():
                raise ClientOSError("the upstream connection closed while the request body was sent")
            if chunked:
                transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
            else:
                transport.write(chunk)
            if protocol.writing_paused:
                await protocol._drain_helper()
        if chunked:
            transport = protocol.transport
            if transport is None or transport.is_closing():
                raise ClientOSError("the upstream connection closed while the request body was sent")
            transport.write(b"0\r\n\r\n")
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        error = ClientConnectionError(f"the request body could not be sent: {exc!r}")
        error.__cause__ = exc
        protocol.set_exception(error)
        protocol.abort()
        return
    protocol.start_timeout()


def _stop(writer: asyncio.Task[None] | None) -> None:
    if writer is not None and not writer.done():
        writer.cancel()

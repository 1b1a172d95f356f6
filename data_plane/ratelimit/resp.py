"""One pipelined connection to one Redis server, spoken in RESP2 with hiredis parsing the replies.

The rate limiter writes a whole batch of commands it encoded itself (most bytes of a decision
are encoded once per snapshot) with one ``transport.write``, and the replies are handed to the
batch's :class:`Waiter` from ``data_received`` itself: no task, no stream reader, no per-command
packing between the socket and the futures of the requests waiting.

Redis answers in the order it was asked, so a :class:`Link` keeps a FIFO of who waits for how
many replies. A waiter that gave up (its batch timed out) still has its replies read and
dropped when they come, so the connection stays in step and usable.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from dataclasses import dataclass, replace
from typing import Any, Final, Protocol, cast

import hiredis
from hiredis import ReplyError as ReplyError
from redis.asyncio.connection import SSLConnection, parse_url

DEFAULT_HOST: Final = "localhost"
DEFAULT_PORT: Final = 6379


class Waiter(Protocol):
    def replied(self, replies: list[Any]) -> None:
        """Every reply of the commands written for this waiter, in order. Must not raise."""
        ...

    def failed(self, exc: BaseException) -> None:
        """The connection ended before every reply came. Must not raise."""
        ...


class LinkClosed(ConnectionError):
    """The connection to Redis is closed (lost, refused, or closed by this side)."""


def bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


def encode(*args: str | int | bytes) -> bytes:
    """One command as a RESP array of bulk strings."""
    packed: bytes = hiredis.pack_command(cast(Any, args))  # its stub types one argument only
    return packed


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where and how to connect: from the ``REDIS_URL``; a cluster node is the same with its address."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    path: str = ""
    db: int = 0
    username: str = ""
    password: str = ""
    ssl: ssl.SSLContext | None = None

    @classmethod
    def from_url(cls, url: str) -> Endpoint:
        kwargs: dict[str, Any] = dict(parse_url(url))
        context = None
        if kwargs.get("connection_class") is SSLConnection:
            # The same TLS settings (query parameters ssl_*) as a redis-py client of this URL.
            tls = {k: v for k, v in kwargs.items() if k.startswith("ssl_")}
            context = SSLConnection(**tls).ssl_context.get()
        return cls(
            host=str(kwargs.get("host", DEFAULT_HOST)),
            port=int(kwargs.get("port", DEFAULT_PORT)),
            path=str(kwargs.get("path", "")),
            db=int(kwargs.get("db", 0)),
            username=str(kwargs.get("username") or ""),
            password=str(kwargs.get("password") or ""),
            ssl=context,
        )

    def at(self, host: str, port: int) -> Endpoint:
        """A cluster node: this endpoint's credentials and TLS at another address."""
        return replace(self, host=host, port=port, path="")

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def __repr__(self) -> str:  # never the password
        return f"Endpoint({self.path or f'{self.host}:{self.port}'}, db={self.db})"


class _Call:
    """A waiter for a command whose caller awaits its replies (set-up, script load, slots)."""

    __slots__ = ("future",)

    def __init__(self, future: asyncio.Future[list[Any]]) -> None:
        self.future = future

    def replied(self, replies: list[Any]) -> None:
        if not self.future.done():
            self.future.set_result(replies)

    def failed(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


class Link(asyncio.Protocol):
    """One connection. :meth:`send` never blocks; replies reach the waiters in order."""

    def __init__(self) -> None:
        self._reader = hiredis.Reader()
        # [waiter, replies expected, replies so far], oldest first.
        self._waiting: deque[tuple[Waiter, int, list[Any]]] = deque()
        self._transport: asyncio.Transport | None = None
        self._closed: BaseException | None = None

    @property
    def closed(self) -> bool:
        return self._closed is not None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's are not subclasses of asyncio.Transport).
        self._transport = cast(asyncio.Transport, transport)

    def send(self, payload: bytes, count: int, waiter: Waiter) -> None:
        """Write ``count`` encoded commands; ``waiter`` gets their replies (or the failure)."""
        if self._closed is not None or self._transport is None:
            waiter.failed(LinkClosed("the connection to Redis is closed"))
            return
        self._waiting.append((waiter, count, []))
        self._transport.write(payload)

    async def call(self, *commands: tuple[str | int | bytes, ...]) -> list[Any]:
        """Send ``commands`` and wait for their replies (errors come back as ``ReplyError`` values)."""
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self.send(b"".join(encode(*c) for c in commands), len(commands), _Call(future))
        return await future

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        waiting = self._waiting
        while True:
            try:
                reply = reader.gets()
            except hiredis.ProtocolError as exc:
                self._end(LinkClosed(f"Redis sent an invalid reply: {exc}"))
                return
            if reply is False:
                return
            if not waiting:
                self._end(LinkClosed("Redis sent a reply nothing asked for"))
                return
            waiter, count, replies = waiting[0]
            replies.append(reply)
            if len(replies) == count:
                waiting.popleft()
                waiter.replied(replies)
                if self._closed is not None:  # the waiter had the link closed
                    return

    def connection_lost(self, exc: Exception | None) -> None:
        self._end(LinkClosed(f"the connection to Redis was lost: {exc!r}" if exc else "Redis closed the connection"))

    def close(self) -> None:
        """Close now: every waiter still waiting fails at once."""
        self._end(LinkClosed("the connection to Redis was closed"))

    def _end(self, exc: BaseException) -> None:
        if self._closed is None:
            self._closed = exc
        if self._transport is not None:
            self._transport.close()
        waiting = self._waiting
        while waiting:
            waiting.popleft()[0].failed(exc)


async def connect(endpoint: Endpoint) -> Link:
    """A ready link: connected, authenticated and on the URL's database. Unbounded: the caller
    bounds it (``asyncio.timeout``)."""
    loop = asyncio.get_running_loop()
    link: Link
    if endpoint.path:
        _, link = await loop.create_unix_connection(Link, endpoint.path)
    else:
        _, link = await loop.create_connection(Link, endpoint.host, endpoint.port, ssl=endpoint.ssl)
    try:
        setup: list[tuple[str | int | bytes, ...]] = []
        if endpoint.password:
            user = (endpoint.username,) if endpoint.username else ()
            setup.append(("AUTH", *user, endpoint.password))
        if endpoint.db:
            setup.append(("SELECT", endpoint.db))
        if setup:
            for reply in await link.call(*setup):
                if isinstance(reply, ReplyError):
                    raise LinkClosed(f"Redis refused the connection's set-up: {reply}")
    except BaseException:
        link.close()
        raise
    return link

"""The Postgres connection pool and the mapping of driver errors to our own.

asyncpg is used only under ``control_plane/store``. Any failure to reach Postgres becomes
:class:`~control_plane.errors.StoreUnavailable` (503 at the API), raised ``from`` the driver's error.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Final

import asyncpg

from control_plane.errors import StoreUnavailable, Unprocessable

log = logging.getLogger(__name__)

POOL_MIN_SIZE: Final = 1
POOL_MAX_SIZE: Final = 10
CONNECT_TIMEOUT_S: Final = 5.0
COMMAND_TIMEOUT_S: Final = 30.0
# Shutdown waits this long for connections to close gracefully before dropping them.
CLOSE_TIMEOUT_S: Final = 5.0

# Errors that mean "Postgres is not there right now", as opposed to a bad query.
UNAVAILABLE_ERRORS: Final = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
)


class Database:
    """A pool plus the two ways code here uses it: one transaction, or one connection."""

    def __init__(self, pool: asyncpg.Pool, url: str) -> None:
        self.pool = pool
        self._url = url

    @classmethod
    async def connect(cls, url: str) -> Database:
        try:
            pool = await asyncpg.create_pool(
                url,
                min_size=POOL_MIN_SIZE,
                max_size=POOL_MAX_SIZE,
                timeout=CONNECT_TIMEOUT_S,
                command_timeout=COMMAND_TIMEOUT_S,
            )
        except UNAVAILABLE_ERRORS as exc:
            raise StoreUnavailable(f"cannot connect to Postgres: {describe(exc)}") from exc
        return cls(pool, url)

    async def close(self) -> None:
        """Close every connection, gracefully within :data:`CLOSE_TIMEOUT_S`; past it (a query
        stuck on a connection Postgres no longer answers) drop them, so shutdown never hangs."""
        try:
            await asyncio.wait_for(self.pool.close(), CLOSE_TIMEOUT_S)
        except (TimeoutError, *UNAVAILABLE_ERRORS) as exc:
            log.warning("Postgres connections did not close in time; dropping them", extra={"error": repr(exc)})
            self.pool.terminate()

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[asyncpg.Connection]:
        try:
            async with self.pool.acquire(timeout=CONNECT_TIMEOUT_S) as conn:
                yield conn
        except UNAVAILABLE_ERRORS as exc:
            raise StoreUnavailable(f"Postgres is unavailable: {describe(exc)}") from exc
        except asyncpg.exceptions.DataError as exc:
            # The last line of defence behind the API's validation (e.g. a NUL in a string).
            raise Unprocessable("body", "contains a value the database cannot store") from exc

    @asynccontextmanager
    async def transaction(self, isolation: str = "read_committed") -> AsyncIterator[asyncpg.Connection]:
        async with self.connection() as conn:
            try:
                async with conn.transaction(isolation=isolation):
                    yield conn
            except UNAVAILABLE_ERRORS as exc:
                raise StoreUnavailable(f"Postgres is unavailable: {describe(exc)}") from exc

    async def listen(self, channel: str, callback: Callable[[str], None]) -> Listener:
        """Open a dedicated connection that calls ``callback(payload)`` for every NOTIFY on ``channel``."""
        try:
            conn = await asyncpg.connect(self._url, timeout=CONNECT_TIMEOUT_S)
            await conn.add_listener(channel, lambda _c, _pid, _ch, payload: callback(payload))
        except UNAVAILABLE_ERRORS as exc:
            raise StoreUnavailable(f"cannot LISTEN on Postgres: {describe(exc)}") from exc
        return Listener(conn)

    async def ping(self) -> bool:
        try:
            async with self.connection() as conn:
                await conn.fetchval("SELECT 1", timeout=CONNECT_TIMEOUT_S)
        except StoreUnavailable:
            return False
        return True


def describe(exc: BaseException) -> str:
    """A one-line description of a driver error that never includes the connection password."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Listener:
    """A LISTEN connection; when Postgres drops it, :attr:`alive` turns false and the owner reopens it."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn

    @property
    def alive(self) -> bool:
        return not self._conn.is_closed()

    async def close(self) -> None:
        if not self._conn.is_closed():
            try:
                await self._conn.close(timeout=2)
            except UNAVAILABLE_ERRORS:
                self._conn.terminate()

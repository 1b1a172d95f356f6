"""The control plane's database pool never holds shutdown hostage."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from control_plane.store import db as db_module
from control_plane.store.db import Database

pytestmark = pytest.mark.integration


async def test_close_drops_a_connection_still_borrowed_after_the_grace(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A connection never given back (a query stuck on a link Postgres no longer answers):
    # asyncpg's graceful close would wait for it for ever.
    monkeypatch.setattr(db_module, "CLOSE_TIMEOUT_S", 0.5)
    database = await Database.connect(database_url)
    stuck = await database.pool.acquire()
    await asyncio.wait_for(database.close(), 30)  # without the grace: for ever
    with pytest.raises(asyncpg.InterfaceError):  # the pool is closed, the stuck connection dropped
        await stuck.fetchval("SELECT 1")

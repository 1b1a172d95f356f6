"""The data plane's Redis connection. redis-py is used only here; its errors are mapped here."""

from __future__ import annotations

import asyncio
import logging
from typing import Final

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from shared.settings import Settings

log = logging.getLogger(__name__)

SOCKET_TIMEOUT_S: Final = 0.5
HEALTH_INTERVAL_S: Final = 2.0


class RedisBackend:
    def __init__(self, settings: Settings) -> None:
        self._client: aioredis.Redis = aioredis.Redis.from_url(
            settings.redis_url.reveal(),
            socket_timeout=SOCKET_TIMEOUT_S,
            socket_connect_timeout=SOCKET_TIMEOUT_S,
            health_check_interval=0,
        )
        self.ok = False

    async def ping(self) -> bool:
        try:
            await self._client.ping()
        except (TimeoutError, RedisError, OSError) as exc:
            if self.ok:
                log.warning("Redis unreachable", extra={"error": repr(exc)})
            self.ok = False
        else:
            if not self.ok:
                log.info("Redis reachable")
            self.ok = True
        return self.ok

    async def watch_health(self) -> None:
        """Keep :attr:`ok` current until cancelled."""
        while True:
            await self.ping()
            await asyncio.sleep(HEALTH_INTERVAL_S)

    async def close(self) -> None:
        await self._client.aclose()

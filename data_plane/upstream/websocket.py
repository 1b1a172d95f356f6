"""The upstream side of a proxied WebSocket: the handshake to the upstream, with aiohttp's
errors mapped to the gateway's (502 refused or unreachable, 504 too slow).

WebSocket connections are long-lived and never reused, so they get a session of their own
rather than a place in the pooled HTTP client's keep-alive pool.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from pathlib import Path
from typing import Final

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from data_plane.errors import UpstreamTimeout, UpstreamUnavailable
from data_plane.upstream.http1 import tls_context

# Largest message relayed in either direction; a larger one closes the connection with 1009.
MAX_MESSAGE_BYTES: Final = 4 * 1024 * 1024
# How long a close handshake may take before the connection is dropped.
CLOSE_TIMEOUT_S: Final = 5.0

UpstreamWebSocket = aiohttp.ClientWebSocketResponse


class WebSocketClient:
    """Opens WebSockets to upstreams. Call :meth:`start` inside the running loop. ``wss://``
    upstreams are verified as HTTPS ones are (see :class:`~data_plane.upstream.client.UpstreamClient`)."""

    def __init__(self, ca_file: Path | None = None) -> None:
        self._ca_file = ca_file
        self._session: aiohttp.ClientSession | None = None
        # Set when the worker starts to drain: relays close their connections with 1001.
        self.shutting_down = asyncio.Event()

    def begin_shutdown(self) -> None:
        self.shutting_down.set()

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=tls_context(self._ca_file) if self._ca_file is not None else True),
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            skip_auto_headers=("User-Agent",),
            timeout=aiohttp.ClientTimeout(total=None),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def connect(
        self, url: URL, headers: CIMultiDict[str], protocols: Iterable[str], timeout_s: float
    ) -> UpstreamWebSocket:
        """Complete the upstream handshake within ``timeout_s``. Pings, pongs and close frames
        are left to the caller (no auto-ping, no auto-close), so they can be relayed."""
        assert self._session is not None, "WebSocketClient.start() was not called"
        try:
            async with asyncio.timeout(timeout_s):
                return await self._session.ws_connect(
                    url,
                    headers=headers,
                    protocols=tuple(protocols),
                    autoclose=False,
                    autoping=False,
                    compress=0,
                    max_msg_size=MAX_MESSAGE_BYTES,
                    timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=CLOSE_TIMEOUT_S),
                )
        except TimeoutError as exc:
            raise UpstreamTimeout("the upstream did not complete the WebSocket handshake in time") from exc
        except aiohttp.WSServerHandshakeError as exc:
            raise UpstreamUnavailable(
                f"the upstream refused the WebSocket upgrade (status {exc.status})", code="upstream_ws_refused"
            ) from exc
        except aiohttp.ClientConnectorError as exc:
            raise UpstreamUnavailable("cannot connect to the upstream", code="upstream_connect_error") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamUnavailable("the upstream sent an invalid response", code="upstream_error") from exc

"""The upstream HTTP client: one pooled aiohttp session per worker, streaming both ways.

aiohttp is used as a client only here; its exceptions become :class:`UpstreamUnavailable`
(502) or :class:`UpstreamTimeout` (504) at the call site. URLs are built with
``encoded=True`` so that the raw path that was matched is sent byte for byte, never
re-normalised.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from data_plane.errors import UpstreamTimeout, UpstreamUnavailable

BODY_CHUNK_BYTES: Final = 64 * 1024
KEEPALIVE_TIMEOUT_S: Final = 30.0
DNS_CACHE_TTL_S: Final = 10

# RFC 9110 §7.6.1 connection-specific fields, plus the legacy ones proxies meet in practice.
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
    }
)


@dataclass(frozen=True, slots=True)
class Target:
    """A route's upstream base URL, parsed once per snapshot."""

    scheme: str
    host: str
    port: int
    base_path: str  # without a trailing "/"
    timeout: aiohttp.ClientTimeout

    @classmethod
    def parse(cls, url: str, timeout_ms: int) -> Target:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)
        seconds = timeout_ms / 1000
        return cls(
            scheme=parts.scheme,
            host=host.encode("idna").decode("ascii") if not host.isascii() else host,
            port=port,
            base_path=parts.path.rstrip("/"),
            timeout=aiohttp.ClientTimeout(total=None, connect=seconds, sock_read=seconds),
        )

    def url(self, raw_path: str, raw_query: str) -> URL:
        return URL.build(
            scheme=self.scheme,
            host=self.host,
            port=self.port,
            path=self.base_path + raw_path,
            query_string=raw_query,
            encoded=True,
        )


class UpstreamClient:
    """Owns the worker's connection pool. Call :meth:`start` inside the running loop."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=0,
            limit_per_host=0,
            ttl_dns_cache=DNS_CACHE_TTL_S,
            keepalive_timeout=KEEPALIVE_TIMEOUT_S,
            enable_cleanup_closed=True,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def send(
        self,
        method: str,
        url: URL,
        headers: CIMultiDict[str],
        body: AsyncIterator[bytes] | None,
        client_timeout: aiohttp.ClientTimeout,
    ) -> aiohttp.ClientResponse:
        """Send the request and return once the response head has arrived."""
        assert self._session is not None, "UpstreamClient.start() was not called"
        try:
            return await self._session.request(
                method,
                url,
                headers=headers,
                data=body,
                allow_redirects=False,
                timeout=client_timeout,
                compress=None,
                chunked=None,
            )
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise UpstreamTimeout("the upstream did not answer in time") from exc
        except aiohttp.ClientConnectorError as exc:
            raise UpstreamUnavailable("cannot connect to the upstream", code="upstream_connect_error") from exc
        except (aiohttp.ClientError, OSError, BodyTooLarge) as exc:
            raise UpstreamUnavailable("the upstream sent an invalid response", code="upstream_error") from exc


class BodyCounter:
    """Counts request body bytes against a route's limit (0: none) while they stream."""

    __slots__ = ("exceeded", "limit", "seen")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.seen = 0
        self.exceeded = False


class BodyTooLarge(Exception):
    """Raised inside the body stream to abort the upstream request."""


async def stream_body(content: aiohttp.StreamReader, counter: BodyCounter) -> AsyncIterator[bytes]:
    """The client's request body as chunks, never held whole, cut off past the limit."""
    limit = counter.limit
    while True:
        chunk = await content.readany()
        if not chunk:
            return
        counter.seen += len(chunk)
        if limit and counter.seen > limit:
            counter.exceeded = True
            raise BodyTooLarge
        yield chunk

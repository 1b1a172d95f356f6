"""The upstream HTTP client of a worker: pooled keep-alive HTTP/1.1 connections
(:mod:`data_plane.upstream.http1`), streaming both ways, plus an aiohttp session for health
checks.

aiohttp is used as a client only in this package; its exceptions become
:class:`UpstreamUnavailable` (502) or :class:`UpstreamTimeout` (504) here. The request
target is the raw path that was matched, sent byte for byte, never re-normalised.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

import aiohttp
from aiohttp.http_exceptions import HttpProcessingError
from yarl import URL

from data_plane.errors import BadRequest, UpstreamTimeout, UpstreamUnavailable
from data_plane.upstream.http1 import Key, Pool, RequestHeadInvalid, Response, tls_context

BODY_CHUNK_BYTES: Final = 64 * 1024
# Idle keep-alive connections are closed after this; below the 60-75 s most servers use, so
# we close first and rarely meet a connection the upstream has just dropped.
KEEPALIVE_TIMEOUT_S: Final = 30.0
DNS_CACHE_TTL_S: Final = 10
# Open connections per worker, in total and to one host:port. A request beyond them waits
# for a free connection within its connect timeout (then 504), so a hanging upstream cannot
# make a worker open sockets without bound.
POOL_LIMIT: Final = 4096
POOL_LIMIT_PER_HOST: Final = 1024

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
    """An upstream base URL, parsed once."""

    scheme: str
    host: str
    port: int
    base_path: str  # without a trailing "/"
    key: Key  # the connection pool's key: (scheme, host, port)
    host_header: str  # the Host header sent: the host (IPv6 in brackets), and the port unless the default

    @classmethod
    def parse(cls, url: str) -> Target:
        parts = urlsplit(url)
        host = parts.hostname or ""
        host = host.encode("idna").decode("ascii") if not host.isascii() else host
        default_port = 443 if parts.scheme == "https" else 80
        port = parts.port or default_port
        authority = f"[{host}]" if ":" in host else host
        return cls(
            scheme=parts.scheme,
            host=host,
            port=port,
            base_path=parts.path.rstrip("/"),
            key=(parts.scheme, host, port),
            host_header=authority if port == default_port else f"{authority}:{port}",
        )

    def request_target(self, raw_path: str, raw_query: str) -> str:
        """What goes on the request line: the base path, the raw path, and the query if any."""
        path = self.base_path + raw_path
        return f"{path}?{raw_query}" if raw_query else path

    def url(self, raw_path: str, raw_query: str) -> URL:
        return URL.build(
            scheme=self.scheme,
            host=self.host,
            port=self.port,
            path=self.base_path + raw_path,
            query_string=raw_query,
            encoded=True,
        )


@functools.lru_cache(maxsize=1024)
def try_timeout(seconds: float) -> aiohttp.ClientTimeout:
    """One try's limits: ``seconds`` to connect (pool wait included) and ``seconds`` between
    reads, so for the response head and for every pause while the body streams."""
    return aiohttp.ClientTimeout(total=None, connect=seconds, sock_read=seconds)


class UpstreamClient:
    """Owns the worker's connection pool. Call :meth:`start` inside the running loop.

    HTTPS upstreams are verified against the system's trust store plus the CAs in ``ca_file``
    (``UPSTREAM_CA_FILE``), for the requests and for the health checks alike."""

    def __init__(self, ca_file: Path | None = None) -> None:
        self._ca_file = ca_file
        self._pool = Pool(
            limit=POOL_LIMIT, limit_per_host=POOL_LIMIT_PER_HOST, keepalive_s=KEEPALIVE_TIMEOUT_S, ca_file=ca_file
        )
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        # Health checks only: a few requests a second at most, so aiohttp's own client.
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=POOL_LIMIT_PER_HOST,
                ttl_dns_cache=DNS_CACHE_TTL_S,
                ssl=tls_context(self._ca_file) if self._ca_file is not None else True,
            ),
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("Accept", "Accept-Encoding"),
        )

    async def close(self) -> None:
        self._pool.close()
        if self._session is not None:
            await self._session.close()

    @property
    def open_connections(self) -> int:
        """Connections to upstreams open now, idle or in use (not counting health checks)."""
        return self._pool.open_connections

    async def send(
        self,
        method: str,
        target: Target,
        raw_path: str,
        raw_query: str,
        headers: Iterable[tuple[str, str]],
        body: AsyncIterator[bytes] | None,
        client_timeout: aiohttp.ClientTimeout,
    ) -> Response:
        """Send the request and return once the response head has arrived. ``headers`` go
        upstream exactly as given, after ``Host``; nothing of the client's own is added but
        the body's framing (and aiohttp's ``Content-Type`` default for a POST, PUT or PATCH)."""
        try:
            return await self._pool.request(
                method,
                target.key,
                target.host_header,
                target.request_target(raw_path, raw_query),
                headers,
                body,
                client_timeout.connect,
                client_timeout.sock_read,
            )
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise UpstreamTimeout("the upstream did not answer in time") from exc
        except (aiohttp.ClientError, HttpProcessingError) as exc:
            raise UpstreamUnavailable("the upstream sent an invalid response", code="upstream_error") from exc
        except RequestHeadInvalid as exc:
            raise BadRequest("a header holds a line break", code="bad_header") from exc
        except OSError as exc:
            # Connecting failed (refused, unreachable, name not resolved, TLS handshake):
            # every other OSError of an exchange arrives as aiohttp's ClientOSError above.
            raise UpstreamUnavailable("cannot connect to the upstream", code="upstream_connect_error") from exc

    async def probe(self, url: URL, timeout_s: float) -> int | None:
        """GET ``url`` for a health check: the status, or None when no valid answer came in ``timeout_s``."""
        assert self._session is not None, "UpstreamClient.start() was not called"
        try:
            async with self._session.get(
                url, allow_redirects=False, timeout=aiohttp.ClientTimeout(total=timeout_s), headers=_PROBE_HEADERS
            ) as response:
                # Drain a little so the connection can be reused; a longer body closes it.
                await response.content.read(PROBE_READ_BYTES)
                return response.status
        except (aiohttp.ClientError, OSError, TimeoutError):
            return None


_PROBE_HEADERS: Final = {"User-Agent": "tenantgate-health-check"}
PROBE_READ_BYTES: Final = 64 * 1024


class UpstreamBrokenOff(ConnectionResetError):
    """The upstream failed after the response head was sent on to the client: there is no
    status left to answer with, only the client connection to cut. Deliberately not a
    GatewayError."""


async def response_body(response: Response) -> AsyncIterator[bytes]:
    """The upstream response body as it arrives. A response broken off mid-body raises
    :class:`UpstreamBrokenOff`, and its connection is closed rather than returned to the pool."""
    try:
        async for chunk in response.content.iter_any():
            yield chunk
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        response.close()
        raise UpstreamBrokenOff(f"the upstream broke off mid-response: {exc!r}") from exc


class BodyCounter:
    """Counts request body bytes against a route's limit (0: none) while they stream, and
    notes when the client, not the upstream, is why a try failed."""

    __slots__ = ("client_failed", "exceeded", "limit", "seen")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.seen = 0
        self.exceeded = False
        self.client_failed = False  # the client's body broke off (it went away, bad framing)

    @property
    def client_fault(self) -> bool:
        return self.exceeded or self.client_failed


class BodyTooLarge(Exception):
    """Raised inside the body stream to abort the upstream request."""


async def stream_body(content: aiohttp.StreamReader, counter: BodyCounter) -> AsyncIterator[bytes]:
    """The client's request body as chunks, never held whole, cut off past the limit."""
    limit = counter.limit
    while True:
        try:
            chunk = await content.readany()
        except Exception:
            counter.client_failed = True
            raise
        if not chunk:
            return
        counter.seen += len(chunk)
        if limit and counter.seen > limit:
            counter.exceeded = True
            raise BodyTooLarge
        yield chunk

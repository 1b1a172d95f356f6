"""Sending one admitted request to its route's pool: pick a target, try, learn, maybe retry.

    pick      balancer over targets in service whose breaker lets a request through
              (none: 503 circuit_open or no_healthy_upstream, with Retry-After)
    try       per-try timeout = the route's timeout_ms (connect, then each read), cut short
              by the total deadline (DEADLINE_FACTOR * timeout_ms for the response head)
    learn     connect error, timeout, invalid response, any 5xx → failure; else success —
              for the target's breaker and for outlier ejection
    retry     see data_plane.upstream.retry: idempotent, retryable failure, body replayable,
              retries left, deadline left, budget left; a different target when there is one

The response head is returned as an :class:`Exchange`; nothing has gone to the client yet.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Final

import aiohttp
from yarl import URL

from data_plane.errors import UpstreamError, UpstreamTimeout
from data_plane.upstream import metrics
from data_plane.upstream.client import BodyCounter, UpstreamClient, response_body, stream_body, try_timeout
from data_plane.upstream.endpoint import Endpoint
from data_plane.upstream.http1 import Response
from data_plane.upstream.pool import RoutePool
from data_plane.upstream.retry import IDEMPOTENT, RETRYABLE_STATUS

# A retry is not started with less time than this left before the deadline.
MIN_TRY_S: Final = 0.05

_STATUS_CLASS = ("1xx", "1xx", "2xx", "3xx", "4xx", "5xx")


class RequestBody:
    """The client's request body as the source of each try: replayable until a byte is read."""

    __slots__ = ("_content", "counter")

    def __init__(self, content: aiohttp.StreamReader, counter: BodyCounter) -> None:
        self._content = content
        self.counter = counter

    def stream(self) -> AsyncIterator[bytes]:
        return stream_body(self._content, self.counter)

    @property
    def replayable(self) -> bool:
        return self.counter.seen == 0 and not self.counter.exceeded


class Exchange:
    """An upstream response whose head has arrived. :meth:`close` it when done, however it ended:
    that returns the connection to the pool only if the body was read to its end."""

    __slots__ = ("_endpoint", "response")

    def __init__(self, response: Response, endpoint: Endpoint) -> None:
        self.response = response
        self._endpoint: Endpoint | None = endpoint

    def body(self) -> AsyncIterator[bytes]:
        return response_body(self.response)

    def complete_body(self) -> bytes | None:
        """The whole body if it has arrived to its end already (a small response usually
        comes in the same read as its head), taken out of the stream; else None, and the
        body is read with :meth:`body` as it streams."""
        content = self.response.content
        if not content.is_eof():
            return None
        try:
            return content.read_nowait(-1)
        except (aiohttp.ClientError, OSError, RuntimeError):
            return None

    @property
    def body_ready(self) -> bool:
        """Whether the body's first chunk (or the end of an empty body) is in memory already,
        so reading it will not wait: a small response usually arrives with its head."""
        content = self.response.content
        return content.total_bytes > 0 or content.is_eof()

    def close(self) -> None:
        endpoint, self._endpoint = self._endpoint, None
        if endpoint is not None:
            endpoint.active -= 1
        self.response.release()


class Dispatcher:
    def __init__(self, client: UpstreamClient, clock: Callable[[], float] = time.monotonic) -> None:
        self._client = client
        self._clock = clock

    def choose_url(self, pool: RoutePool, raw_path: str, raw_query: str, key: bytes | None) -> URL:
        """A target for a request that is not dispatched here (a WebSocket upgrade): picked the
        same way, without retries; 503 when no target may take it."""
        now = self._clock()
        index = pool.pick(now, key)
        if index is None:
            raise pool.unavailable(now)
        return pool.members[index].endpoint.target.url(raw_path, raw_query)

    async def open(
        self,
        pool: RoutePool,
        method: str,
        raw_path: str,
        raw_query: str,
        headers: list[tuple[str, str]],
        body: RequestBody | None,
        key: bytes | None,
    ) -> Exchange:
        clock = self._clock
        now = clock()
        budget = pool.budget
        if budget is not None:
            budget.record_request(now)
        deadline = now + pool.deadline_s
        index = pool.pick(now, key)
        if index is None:
            raise pool.unavailable(now)
        tried: list[int] = []
        retryable_method = method in IDEMPOTENT
        while True:
            member = pool.members[index]
            endpoint, breaker = member.endpoint, member.breaker
            ticket = breaker.acquire() if breaker is not None else 0
            remaining = deadline - now
            timeout = pool.timeout if remaining >= pool.timeout_s else try_timeout(round(max(remaining, 0.001), 3))
            endpoint.active += 1
            started = now
            recorded = False
            try:
                response = await self._client.send(
                    method,
                    endpoint.target,
                    raw_path,
                    raw_query,
                    headers,
                    body.stream() if body is not None else None,
                    timeout,
                )
            except UpstreamError as exc:
                endpoint.active -= 1
                if body is not None and body.counter.client_fault:
                    raise  # the client's body was too large or broke off: nothing to learn or retry
                now = clock()
                pool.record(index, ticket, False, now)
                recorded = True
                member.count(pool.route_id, _error_result(exc))
                outcome: UpstreamError | Exchange = exc
            except BaseException:
                endpoint.active -= 1
                raise
            else:
                now = clock()
                status = response.status
                pool.record(index, ticket, status < 500, now)
                recorded = True
                member.count(pool.route_id, _STATUS_CLASS[min(status // 100, 5)])
                pool.observe_latency(now - started)
                outcome = Exchange(response, endpoint)
                if status not in RETRYABLE_STATUS:
                    return outcome
            finally:
                if not recorded and breaker is not None:
                    breaker.release(ticket)

            # A retryable failure: try again only if everything allows it.
            next_index = None
            if (
                retryable_method
                and len(tried) < pool.retries
                and (body is None or body.replayable)
                and now + MIN_TRY_S < deadline
            ):
                tried.append(index)
                next_index = pool.pick(now, key, tried)
                if next_index is not None and budget is not None and not budget.try_spend(now):
                    metrics.BUDGET_EXHAUSTED.labels(pool.route_id).inc()
                    next_index = None
            if next_index is None:
                if isinstance(outcome, Exchange):
                    return outcome  # the upstream's own 502/503/504 goes to the client as it is
                raise outcome
            if isinstance(outcome, Exchange):
                outcome.close()
            metrics.RETRIES.labels(pool.route_id).inc()
            index = next_index


def _error_result(exc: UpstreamError) -> str:
    if isinstance(exc, UpstreamTimeout):
        return "timeout"
    return "connect_error" if exc.code == "upstream_connect_error" else "invalid_response"

"""The proxy listener: aiohttp's low-level server with the limits a public edge needs, and
malformed requests answered with the SPEC error body.

aiohttp's parser refuses a malformed message (bad framing, oversized line or header, CR/LF in
a value…) before any handler runs, and by default answers with a plain-text 400 that echoes
the offending bytes and logs a traceback per request. Here that answer is the gateway's
``{"error": …}`` body with ``Connection: close``, and the refusal is one log line: a hostile
client cannot fill the log with tracebacks. An unexpected exception in the pipeline gets the
same treatment with status 500 and no detail for the client.

An answer given before the request's body had arrived whole (a 413 on ``Content-Length``, a
401 or 429 on an upload) ends the connection in stages, as RFC 9112 §9.6 asks: ``Connection:
close`` on the answer, the write side shut after it, and what the client still sends read and
dropped until it closes or :data:`LINGERING_TIME_S` passes. aiohttp's own lingering fed those
bytes through its parser, a payload stream with flow control and a task per read, about 1 ms
of the event loop per MiB: a client posting oversized bodies cost every other client on the
node. Here they are read into one scratch buffer by the transport and nothing else sees them.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Final

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from data_plane.errors import BadRequest, GatewayError
from data_plane.pipeline import error_response, request_id
from data_plane.proxy import PacedHandler

log = logging.getLogger(__name__)

# Limits on what a client may send before the pipeline sees it (aiohttp answers 400 past them).
MAX_REQUEST_LINE_BYTES: Final = 8190
MAX_HEADER_FIELD_BYTES: Final = 16 * 1024
MAX_HEADERS: Final = 100
# Idle keep-alive connections are closed after this long (nginx's default).
KEEPALIVE_TIMEOUT_S: Final = 75.0
# After an answer given before the request's body had arrived whole, what the client still
# sends is read and dropped for at most this long (a client that sends its whole body before
# reading its answer then sees it); then the connection is closed.
LINGERING_TIME_S: Final = 5.0
# What lingering connections read into: one buffer for all of them, never looked at.
_SCRATCH: Final = memoryview(bytearray(256 * 1024))


class _Linger(asyncio.BufferedProtocol):
    """A connection's protocol after its last answer, while the client may still be sending:
    whatever arrives lands in :data:`_SCRATCH` and is dropped; the client's EOF or
    :data:`LINGERING_TIME_S` closes the connection, and the handler hears of its end."""

    __slots__ = ("_handler", "_timer")

    def __init__(self, handler: web.RequestHandler, transport: asyncio.Transport) -> None:
        self._handler = handler
        self._timer = asyncio.get_running_loop().call_later(LINGERING_TIME_S, transport.close)

    def get_buffer(self, sizehint: int) -> memoryview:
        return _SCRATCH

    def buffer_updated(self, nbytes: int) -> None:
        pass

    def eof_received(self) -> bool:
        return False  # the transport closes itself

    def connection_lost(self, exc: BaseException | None) -> None:
        self._timer.cancel()
        self._handler.connection_lost(exc)


class _Handler(PacedHandler):
    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            # Part of a response is out already: all that is left is to drop the connection.
            raise ConnectionError("response already started; cannot send an error answer")
        error: GatewayError
        if status == 400 and isinstance(exc, HttpProcessingError):
            reason = (exc.message or "malformed request").splitlines()[0].split(":")[0].strip()
            error = BadRequest(f"malformed HTTP request: {reason}", code="malformed_request")
            log.info("refused a malformed request", extra={"remote": request.remote, "reason": reason})
        elif status < 500:
            error = BadRequest("malformed HTTP request", code="malformed_request")
            log.info("refused a malformed request", extra={"remote": request.remote, "reason": repr(exc)})
        else:
            error = GatewayError("the gateway failed to handle this request")
            log.error("unhandled error in the request pipeline", exc_info=exc)
        response = error_response(error, request_id(request))
        response.force_close()
        return response

    async def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        unread = not request.content.is_eof()
        if unread and not resp.prepared:
            resp.force_close()  # "Connection: close": the rest of this body is never parsed
        resp, reset = await super().finish_response(request, resp, start_time)
        transport = self.transport
        if unread and not reset and transport is not None and not transport.is_closing():
            # The connection passes to _Linger: aiohttp's loop for it ends without closing it
            # (its _force_close), and _Linger tells this handler when it is gone.
            self._force_close = True
            transport.set_protocol(_Linger(self, transport))
            transport.write_eof()  # after the answer still buffered, if any
            if not transport.is_reading():
                transport.resume_reading()  # paused by the body's flow control
        return resp, reset


class _Server(web.Server):
    def __call__(self) -> web.RequestHandler:
        # aiohttp builds one handler per connection: here one whose flow control reaches the
        # upstream of a streamed answer, with the gateway's error answers and lingering.
        return _Handler(self, loop=self._loop, **self._kwargs)


def proxy_server(handler: Any) -> web.Server:
    """The low-level server for the proxy port, around the pipeline's ``handle``.

    Request bodies are never decompressed (``auto_decompress=False``): a body goes upstream
    byte for byte with its ``Content-Encoding``, and a compressed bomb is never inflated here.
    A client that goes away cancels its request (``handler_cancellation``), which aborts the
    upstream exchange as Envoy resets the upstream stream: an abandoned request does not keep
    an upstream busy until its timeout.
    """
    return _Server(
        handler,
        handler_cancellation=True,
        access_log=None,
        auto_decompress=False,
        max_line_size=MAX_REQUEST_LINE_BYTES,
        max_field_size=MAX_HEADER_FIELD_BYTES,
        max_headers=MAX_HEADERS,
        keepalive_timeout=KEEPALIVE_TIMEOUT_S,
        lingering_time=0,  # the handler lingers itself (_Linger), without parsing what it drops
    )

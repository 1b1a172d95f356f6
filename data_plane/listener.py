"""The proxy listener: aiohttp's low-level server with the limits a public edge needs, and
malformed requests answered with the SPEC error body.

aiohttp's parser refuses a malformed message (bad framing, oversized line or header, CR/LF in
a value…) before any handler runs, and by default answers with a plain-text 400 that echoes
the offending bytes and logs a traceback per request. Here that answer is the gateway's
``{"error": …}`` body with ``Connection: close``, and the refusal is one log line: a hostile
client cannot fill the log with tracebacks. An unexpected exception in the pipeline gets the
same treatment with status 500 and no detail for the client.
"""

from __future__ import annotations

import logging
from typing import Any, Final

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from data_plane.errors import BadRequest, GatewayError
from data_plane.pipeline import error_response, request_id

log = logging.getLogger(__name__)

# Limits on what a client may send before the pipeline sees it (aiohttp answers 400 past them).
MAX_REQUEST_LINE_BYTES: Final = 8190
MAX_HEADER_FIELD_BYTES: Final = 16 * 1024
MAX_HEADERS: Final = 100
# Idle keep-alive connections are closed after this long (nginx's default).
KEEPALIVE_TIMEOUT_S: Final = 75.0
# After an error answer, unread request body is drained this long so the client sees it.
LINGERING_TIME_S: Final = 5.0


class _Handler(web.RequestHandler):
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


class _Server(web.Server):
    def __call__(self) -> web.RequestHandler:
        # aiohttp builds one handler per connection; the only change is the error answer.
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
        lingering_time=LINGERING_TIME_S,
    )

"""The data plane's error tree. Each class carries its HTTP status and error code; the
pipeline turns any of them into the SPEC error body in one place (``pipeline.error_response``).

    TenantgateError (shared.errors)
    └── GatewayError
        ├── BadRequest              400  malformed or ambiguous request, conflicting credentials
        ├── Unauthenticated         401  missing or invalid credentials
        ├── Forbidden               403  tenant not allowed / inactive
        ├── RouteNotFound           404
        ├── MethodNotAllowed        405  (``allow`` lists the methods)
        ├── PayloadTooLarge         413
        ├── TooManyRequests         429  a rate limit, quota or concurrency limit (``headers``: Retry-After, RateLimit…)
        ├── ServiceUnavailable      503  circuit open, no healthy target, limits undecidable (``Retry-After``)
        ├── NotReady                503  no snapshot loaded yet
        └── UpstreamError
            ├── UpstreamUnavailable 502  connect error or invalid response (mapped in upstream/)
            └── UpstreamTimeout     504
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from shared.errors import TenantgateError

if TYPE_CHECKING:
    from shared.snapshot import Tenant


class GatewayError(TenantgateError):
    status = 500
    code = "internal_error"
    # Extra response headers that go with this error (e.g. Retry-After).
    headers: tuple[tuple[str, str], ...] = ()
    # The tenant the refused request came from, when it was known (its usage counts it).
    tenant: Tenant | None = None

    def __init__(self, message: str, *, code: str | None = None, headers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if headers:
            self.headers = headers


class BadRequest(GatewayError):
    status = 400
    code = "bad_request"


class Unauthenticated(GatewayError):
    status = 401
    code = "unauthenticated"


class Forbidden(GatewayError):
    status = 403
    code = "forbidden"


class RouteNotFound(GatewayError):
    status = 404
    code = "route_not_found"


class MethodNotAllowed(GatewayError):
    status = 405
    code = "method_not_allowed"

    def __init__(self, allow: tuple[str, ...]) -> None:
        super().__init__("method not allowed on this route")
        self.allow = allow


class PayloadTooLarge(GatewayError):
    status = 413
    code = "payload_too_large"


class TooManyRequests(GatewayError):
    status = 429
    code = "rate_limited"


class ServiceUnavailable(GatewayError):
    status = 503
    code = "service_unavailable"


class NotReady(GatewayError):
    status = 503
    code = "not_ready"


class UpstreamError(GatewayError):
    pass


class UpstreamUnavailable(UpstreamError):
    status = 502
    code = "bad_gateway"


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "gateway_timeout"

"""The control plane's error tree; each class maps to one HTTP status in ``api/errors.py``.

TenantgateError (shared.errors)
└── ControlPlaneError
    ├── ApiError                       an admin API request cannot be served as asked
    │   ├── Unauthorized        401
    │   ├── Forbidden           403
    │   ├── NotFound            404
    │   ├── Conflict            409
    │   └── Unprocessable       422   (``field`` names the offending field)
    └── StoreUnavailable        503   Postgres cannot be reached (asyncpg/OSError mapped in store/)
"""

from __future__ import annotations

from shared.errors import TenantgateError


class ControlPlaneError(TenantgateError):
    status = 500
    code = "internal_error"


class ApiError(ControlPlaneError):
    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class Unauthorized(ApiError):
    status = 401
    code = "unauthorized"


class Forbidden(ApiError):
    status = 403
    code = "forbidden"


class NotFound(ApiError):
    status = 404
    code = "not_found"


class Conflict(ApiError):
    status = 409
    code = "conflict"


class Unprocessable(ApiError):
    status = 422
    code = "invalid_request"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class StoreUnavailable(ControlPlaneError):
    status = 503
    code = "database_unavailable"

"""Every admin API error leaves as ``{"error": {"code", "message", "request_id"}}``, mapped here."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from control_plane.errors import ControlPlaneError, StoreUnavailable, Unauthorized

log = logging.getLogger(__name__)

_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    503: "unavailable",
}


class ErrorDetail(BaseModel):
    code: str
    message: str
    request_id: str


class ErrorBody(BaseModel):
    """Every error the admin API returns."""

    error: ErrorDetail


def _described(description: str) -> dict[str, Any]:
    return {"model": ErrorBody, "description": description}


# Declared on every router so that the OpenAPI document matches what the API really answers.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: _described("Malformed request (e.g. the body is not JSON)"),
    401: _described("Missing or invalid admin token"),
    403: _described("The token's role does not allow this"),
    404: _described("No such object (or not visible to this token)"),
    409: _described("Conflicts with an existing object"),
    415: _described("The body is not application/json"),
    422: _described("A field has an impossible value; the message names it"),
    503: _described("Postgres is unreachable; retry shortly"),
}


def error_response(
    request: Request, status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    request_id = getattr(request.state, "request_id", "")
    body = {"error": {"code": code, "message": message, "request_id": request_id}}
    return JSONResponse(body, status_code=status, headers=headers)


def _location(loc: tuple[Any, ...]) -> str:
    if loc and loc[0] in ("body", "query", "path", "header"):
        loc = loc[1:]
    return ".".join(str(p) for p in loc) or "body"


def install(app: FastAPI) -> None:
    @app.exception_handler(ControlPlaneError)
    async def _own(request: Request, exc: ControlPlaneError) -> JSONResponse:
        headers = {"WWW-Authenticate": 'Bearer realm="tenantgate-admin"'} if isinstance(exc, Unauthorized) else None
        if isinstance(exc, StoreUnavailable):
            log.warning("admin request failed: Postgres unavailable", extra={"error": str(exc)})
            headers = {"Retry-After": "1"}
            message = "the database is unavailable; retry shortly"
        else:
            message = getattr(exc, "message", str(exc))
        return error_response(request, exc.status, exc.code, message, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":
            return error_response(request, 400, "invalid_json", "the request body is not valid JSON")
        detail = str(first.get("msg", "invalid")).removeprefix("Value error, ")
        message = f"{_location(tuple(first.get('loc', ())))}: {detail}"
        return error_response(request, 422, "invalid_request", message)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _STATUS_CODES.get(exc.status_code, "error")
        return error_response(request, exc.status_code, code, str(exc.detail), dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error in admin API", extra={"request_id": getattr(request.state, "request_id", "")})
        return error_response(request, 500, "internal_error", "internal error; see the control plane log")

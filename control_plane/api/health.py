"""``/healthz`` (process alive) and ``/readyz`` (Postgres reachable). No token needed."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from control_plane.api.deps import State
from control_plane.api.errors import ERROR_RESPONSES, error_response

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", response_model=None, responses={503: ERROR_RESPONSES[503]})
async def readyz(request: Request, state: State) -> dict[str, Any] | JSONResponse:
    if not await state.db.ping():
        return error_response(request, 503, "database_unavailable", "Postgres is unreachable")
    current = state.cache.current
    return {"status": "ready", "config_version": current.version if current else None}

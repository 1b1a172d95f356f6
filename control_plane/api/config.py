"""``/admin/config``: the whole current configuration at one version (no secrets)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel

from control_plane.api.deps import Caller, State
from control_plane.api.routes import route_out
from control_plane.api.tenants import tenant_out
from control_plane.store import config as config_store

router = APIRouter(prefix="/admin/config", tags=["config"])


class ConfigOut(BaseModel):
    version: int
    updated_at: datetime
    routes: list[dict[str, Any]]
    tenants: list[dict[str, Any]]


@router.get("", response_model=ConfigOut)
async def get_config(state: State, caller: Caller) -> dict[str, Any]:
    caller.require_global_read()
    view = await config_store.read_all(state.db)
    return {
        "version": view.version,
        "updated_at": view.updated_at,
        "routes": [route_out(r) for r in view.routes],
        "tenants": [tenant_out(t) for t in view.tenants],
    }

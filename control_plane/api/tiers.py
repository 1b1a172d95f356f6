"""``/admin/tiers``: the tiers and their default limits."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from fastapi import APIRouter

from control_plane.api.deps import Caller
from control_plane.tiers import TIERS

router = APIRouter(prefix="/admin/tiers", tags=["tiers"])


@router.get("")
async def list_tiers(caller: Caller) -> dict[str, Any]:
    return {"tiers": [{"name": name, **asdict(defaults)} for name, defaults in TIERS.items()]}
